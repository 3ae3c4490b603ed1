//! Operations fixtures (tests/ops.rs): a gateway process with full control over its
//! config file (admin listener, log settings, redirect URL), its signals and its exit
//! status; the Prometheus text exposition; and the external tools the operations tests
//! run for real (`promtool`, `prometheus`, `nginx`), each a child process killed on drop.

use super::procs::{free_port, gateway_command, GatewayOpts, Proc};
use super::{auth_redirect, idp_walk, query_param, try_send, Browser, Resp};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often `eventually` polls.
pub const POLL: Duration = Duration::from_millis(100);

/// The path of an external tool: from `PATH`, else the usual system directories
/// (`nginx` lives in /usr/sbin). Missing tools fail the test, never skip it.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path
        .split(':')
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .chain(
            [
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
                "/usr/local/sbin",
                "/usr/local/bin",
            ]
            .iter()
            .map(|d| d.to_string()),
        );
    for d in dirs {
        let p = Path::new(&d).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{name}` is not installed (looked in PATH, /usr/sbin, /usr/bin): run `make deps` \
         (scripts/install-deps.sh installs nginx, prometheus/promtool and redis-server)"
    );
}

/// Sends `sig` (a name such as `TERM` or `HUP`) to `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new(tool("kill"))
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
    assert!(st.success(), "kill -{sig} {pid} failed: {st}");
}

/// Writes `content` to `path` the way config managers do: a temporary file in the same
/// directory, then a rename, so a reader never sees half a file.
pub fn write_atomic(path: &Path, content: &str) {
    let dir = path.parent().expect("a file path with a parent");
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    std::fs::write(&tmp, content).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// Replaces the top-level `key:` line of a generated config (or appends one).
pub fn set_top_level(yaml: &str, key: &str, value: &str) -> String {
    let prefix = format!("{key}:");
    let mut found = false;
    let mut out: Vec<String> = Vec::new();
    for line in yaml.lines() {
        if line.starts_with(&prefix) {
            if !found {
                out.push(format!("{key}: {value}"));
                found = true;
            }
        } else {
            out.push(line.to_string());
        }
    }
    if !found {
        out.push(format!("{key}: {value}"));
    }
    let mut s = out.join("\n");
    s.push('\n');
    s
}

/// Polls `f` until it returns `Ok`, for at most `within`; panics with `what` and the last
/// error otherwise.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let t0 = Instant::now();
    loop {
        let last = match f().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        if t0.elapsed() > within {
            panic!("{what}: not within {within:?}; last: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A gateway config: the harness' usual YAML (`GatewayOpts::yaml`) with the admin
/// listener, the `log` mapping and the `redirect_url` under the test's control.
#[derive(Clone, Debug)]
pub struct OpsConfig {
    pub gw: GatewayOpts,
    /// `admin.listen` on 127.0.0.1:<port>; `None` disables the admin listener.
    pub admin_port: Option<u16>,
    /// The `log:` value, e.g. `{ level: info }`.
    pub log: String,
    /// Overrides `redirect_url` (default: the gateway's own callback).
    pub redirect_url: Option<String>,
}

impl OpsConfig {
    /// An admin listener on a free port and `log: { level: info }`.
    pub fn new(gw: GatewayOpts) -> OpsConfig {
        OpsConfig {
            gw,
            admin_port: Some(free_port()),
            log: "{ level: info }".to_string(),
            redirect_url: None,
        }
    }

    pub fn yaml(&self) -> String {
        let mut y = self.gw.yaml();
        let admin = match self.admin_port {
            Some(p) => format!("{{ listen: \"127.0.0.1:{p}\" }}"),
            None => "{ listen: \"\" }".to_string(),
        };
        y = set_top_level(&y, "admin", &admin);
        y = set_top_level(&y, "log", &self.log);
        if let Some(r) = &self.redirect_url {
            y = set_top_level(&y, "redirect_url", &format!("\"{r}\""));
        }
        y
    }
}

/// A gateway process started from a config file the test controls.
pub struct OpsGateway {
    pub port: u16,
    pub admin_port: Option<u16>,
    /// The file given to `--config` (may be a symlink).
    pub config: PathBuf,
    proc: Proc,
}

impl OpsGateway {
    /// Writes `cfg` to `<tempdir>/portcullis.yaml` and starts the gateway on it.
    pub async fn start(cfg: &OpsConfig) -> OpsGateway {
        let dir = tempfile::Builder::new()
            .prefix("portcullis-ops-gw-")
            .tempdir()
            .expect("tempdir");
        let path = dir.path().join("portcullis.yaml");
        std::fs::write(&path, cfg.yaml()).expect("write config");
        Self::spawn(dir, path, cfg.gw.port, cfg.admin_port).await
    }

    /// Starts the gateway on an existing config file; `dir` keeps its output files.
    /// Waits until `/readyz` answers 200 (on the admin listener too, if any).
    pub async fn spawn(
        dir: tempfile::TempDir,
        config: PathBuf,
        port: u16,
        admin_port: Option<u16>,
    ) -> OpsGateway {
        let mut cmd = gateway_command();
        cmd.arg("--config").arg(&config);
        let mut gw = OpsGateway {
            port,
            admin_port,
            config,
            proc: Proc::spawn("gateway", cmd, dir),
        };
        let mut urls = vec![gw.url("/readyz")];
        if admin_port.is_some() {
            urls.push(gw.admin_url("/readyz"));
        }
        let t0 = Instant::now();
        for url in urls {
            loop {
                if let Some(st) = gw.proc.exited() {
                    panic!(
                        "gateway exited with {st} before ready\nconfig:\n{}\n{}",
                        std::fs::read_to_string(&gw.config).unwrap_or_default(),
                        gw.tails()
                    );
                }
                if let Ok(r) = try_send("GET", &url, &[], Vec::new()).await {
                    if r.status == 200 {
                        break;
                    }
                }
                assert!(
                    t0.elapsed() < super::START_TIMEOUT,
                    "gateway not ready ({url})\nconfig:\n{}\n{}",
                    std::fs::read_to_string(&gw.config).unwrap_or_default(),
                    gw.tails()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        gw
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The gateway's temporary directory (output files, default config location).
    pub fn dir(&self) -> &Path {
        self.proc.dir()
    }

    pub fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin())
    }

    pub fn admin_url(&self, path: &str) -> String {
        let p = self.admin_port.expect("this gateway has no admin listener");
        format!("http://127.0.0.1:{p}{path}")
    }

    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.proc.exited()
    }

    /// Waits for the process to exit, for at most `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        self.proc.wait_exit(within).await
    }

    pub fn stderr(&self) -> String {
        self.proc.stderr()
    }

    pub fn tails(&self) -> String {
        self.proc.tails()
    }

    /// `GET /metrics` on the admin listener, parsed.
    pub async fn metrics(&self) -> Exposition {
        admin_metrics(self.admin_port.expect("this gateway has no admin listener"))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.tails()))
    }

    /// Waits (up to 30 s) until `series` reads `value` on the admin listener.
    pub async fn await_metric(&self, series: &str, value: f64, what: &str) {
        eventually(Duration::from_secs(30), what, || async {
            let v = self.metrics().await.value(series);
            if v == value {
                Ok(())
            } else {
                Err(format!("{series} = {v}"))
            }
        })
        .await;
    }
}

/// `GET /metrics` on the admin listener at `port`, parsed (`Err` if it does not answer 200).
pub async fn admin_metrics(port: u16) -> Result<Exposition, String> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let r = try_send("GET", &url, &[], Vec::new())
        .await
        .map_err(|e| format!("GET /metrics: {e}"))?;
    if r.status != 200 {
        return Err(format!("/metrics: {}", r.dump()));
    }
    Ok(Exposition::parse(&r.text()))
}

impl OpsGateway {
    /// `portcullis_config_reloads_total{result=...}` (0 while absent).
    pub async fn reloads(&self, result: &str) -> f64 {
        self.metrics()
            .await
            .get(&format!(
                "portcullis_config_reloads_total{{result=\"{result}\"}}"
            ))
            .unwrap_or(0.0)
    }

    /// Polls until `portcullis_config_reloads_total{result=...}` reaches `n`.
    pub async fn await_reloads(&self, result: &str, n: f64, within: Duration) {
        eventually(
            within,
            &format!("{n} config reload(s) with result {result}"),
            || async {
                let v = self.reloads(result).await;
                if v >= n {
                    Ok(())
                } else {
                    Err(format!("{v}\n{}", self.tails()))
                }
            },
        )
        .await;
    }

    /// Asserts the process runs and answers `/healthz` with 200 (on the admin listener too).
    pub async fn assert_healthy(&mut self) {
        assert!(self.alive(), "gateway died\n{}", self.tails());
        let mut urls = vec![self.url("/healthz")];
        if self.admin_port.is_some() {
            urls.push(self.admin_url("/healthz"));
        }
        for url in urls {
            let r = super::send("GET", &url, &[], Vec::new()).await;
            assert_eq!(r.status, 200, "{}", r.dump());
        }
    }

    /// Is the gateway process still running?
    pub fn alive(&mut self) -> bool {
        self.proc.exited().is_none()
    }
}

/// A Prometheus text exposition: sample lines by series (`name{labels}`).
#[derive(Clone, Debug)]
pub struct Exposition {
    pub text: String,
    pub samples: BTreeMap<String, f64>,
}

impl Exposition {
    pub fn parse(text: &str) -> Exposition {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
            let v: f64 = value
                .parse()
                .unwrap_or_else(|e| panic!("bad sample value in {line:?}: {e}"));
            samples.insert(series.to_string(), v);
        }
        Exposition {
            text: text.to_string(),
            samples,
        }
    }

    pub fn get(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }

    /// The value of `series`; panics (showing the exposition) when it is absent.
    pub fn value(&self, series: &str) -> f64 {
        self.get(series)
            .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{}", self.text))
    }

    /// Every label value of every sample.
    pub fn label_values(&self) -> Vec<String> {
        let mut out = Vec::new();
        for series in self.samples.keys() {
            let Some((_, labels)) = series.split_once('{') else {
                continue;
            };
            let labels = labels.trim_end_matches('}');
            // Values never contain `",` in this exposition (no paths, no free text).
            for pair in labels.split("\",") {
                if let Some((_, v)) = pair.split_once("=\"") {
                    out.push(v.trim_end_matches('"').to_string());
                }
            }
        }
        out
    }
}

/// `promtool check metrics` on `text`: (exit status, everything it printed).
pub fn promtool_check_metrics(text: &str) -> (ExitStatus, String) {
    use std::io::Write;
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    let mut printed = String::from_utf8_lossy(&out.stdout).into_owned();
    printed.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status, printed)
}

/// The steps of one login, with the values a log must never show.
#[derive(Debug)]
pub struct LoginTrace {
    /// The provider's authorization URL (state, nonce, PKCE challenge).
    pub auth_url: String,
    /// The callback URL the provider sent the browser to (code, state).
    pub callback: String,
    pub code: String,
    pub state: String,
    /// The flow cookie the gateway set when starting the login.
    pub flow_cookie: String,
    /// The answer to `path` after the login.
    pub last: Resp,
}

/// The full browser login against a gateway reached at `base` (scheme://host:port):
/// GET `path` (302 to the provider), the provider's pages, the callback (302 back to
/// `path`), then `path` again.
pub async fn login_at(b: &Browser, base: &str, path: &str, user: &str) -> LoginTrace {
    let first = b.get(&format!("{base}{path}")).await;
    let (auth_url, flow) = auth_redirect(&first);
    let callback = idp_walk(b, &auth_url, user).await;
    assert!(
        callback.starts_with(&format!("{base}/oauth2/callback?")),
        "the provider did not return to the gateway callback: {callback}"
    );
    let code = query_param(&callback, "code").expect("code in the callback URL");
    let state = query_param(&callback, "state").expect("state in the callback URL");
    let cb = b.get(&callback).await;
    assert_eq!(cb.status, 302, "callback failed: {}", cb.dump());
    assert_eq!(cb.location(), Some(path), "callback target: {}", cb.dump());
    let last = b.get(&format!("{base}{path}")).await;
    LoginTrace {
        auth_url,
        callback,
        code,
        state,
        flow_cookie: flow.value,
        last,
    }
}

/// Logs `user` in at `base` with a fresh browser; the `Cookie` header value of its session.
pub async fn login_cookie_at(base: &str, user: &str) -> String {
    let b = Browser::new();
    let t = login_at(&b, base, "/", user).await;
    assert_eq!(
        t.last.status,
        200,
        "login did not end at the upstream: {}",
        t.last.dump()
    );
    let cookie = b.cookie_header(&format!("{base}/"));
    assert!(
        cookie.starts_with("_portcullis"),
        "no session cookie: {cookie:?}"
    );
    cookie
}

/// An API request (`Accept: application/json`) with a `Cookie` header.
pub async fn api_get(url: &str, cookie: &str) -> Resp {
    let mut headers = vec![("accept", "application/json")];
    if !cookie.is_empty() {
        headers.push(("cookie", cookie));
    }
    super::send("GET", url, &headers, Vec::new()).await
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
async fn await_listening(proc: &mut Proc, port: u16, what: &str) {
    let t0 = Instant::now();
    loop {
        if let Some(st) = proc.exited() {
            panic!("{what} exited with {st}\n{}", proc.tails());
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        assert!(
            t0.elapsed() < super::START_TIMEOUT,
            "{what} not listening on {port}\n{}",
            proc.tails()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Prometheus server scraping one target every second.
pub struct Prometheus {
    pub port: u16,
    proc: Proc,
}

impl Prometheus {
    /// Starts `prometheus` with a job `job` scraping `target` (host:port, `/metrics`).
    pub async fn start(job: &str, target: &str) -> Prometheus {
        let bin = tool("prometheus");
        let dir = tempfile::Builder::new()
            .prefix("portcullis-prometheus-")
            .tempdir()
            .expect("tempdir");
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: \"{job}\"\n    scrape_interval: 1s\n    \
                 scrape_timeout: 1s\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("write prometheus.yml");
        let data = dir.path().join("data");
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir.path());
        let mut proc = Proc::spawn("prometheus", cmd, dir);
        await_listening(&mut proc, port, "prometheus").await;
        let p = Prometheus { port, proc };
        let ready = format!("http://127.0.0.1:{port}/-/ready");
        let t0 = Instant::now();
        loop {
            if let Ok(r) = try_send("GET", &ready, &[], Vec::new()).await {
                if r.status == 200 {
                    break;
                }
            }
            assert!(
                t0.elapsed() < super::START_TIMEOUT,
                "prometheus not ready\n{}",
                p.proc.tails()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        p
    }

    /// `GET /api/v1/query?query=...`: the `data.result` array.
    pub async fn query(&self, q: &str) -> Result<Vec<serde_json::Value>, String> {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/query?query={}",
            self.port,
            super::enc(q)
        );
        let r = try_send("GET", &url, &[], Vec::new()).await?;
        if r.status != 200 {
            return Err(r.dump());
        }
        let v: serde_json::Value =
            serde_json::from_slice(&r.body).map_err(|e| format!("{e}: {}", r.text()))?;
        if v["status"] != "success" {
            return Err(v.to_string());
        }
        v["data"]["result"]
            .as_array()
            .cloned()
            .ok_or_else(|| v.to_string())
    }

    pub fn tails(&self) -> String {
        self.proc.tails()
    }
}

/// The nginx snippet of README.md's Forward-auth section, its upstreams pointed at the
/// gateway on `gw_port` and the app on `upstream_port`: the tests run what users are told to.
pub fn readme_nginx_snippet(gw_port: u16, upstream_port: u16) -> String {
    let readme = include_str!("../../README.md");
    let fence = "```nginx\n";
    let start = readme.find(fence).expect("README has an nginx snippet") + fence.len();
    let len = readme[start..].find("```").expect("the nginx snippet ends");
    let snippet = &readme[start..start + len];
    assert_eq!(
        snippet.matches("http://portcullis:4180;").count(),
        2,
        "{snippet}"
    );
    assert_eq!(snippet.matches("http://app;").count(), 1, "{snippet}");
    snippet
        .replace(
            "http://portcullis:4180;",
            &format!("http://127.0.0.1:{gw_port};"),
        )
        .replace("http://app;", &format!("http://127.0.0.1:{upstream_port};"))
}

/// nginx in front of a gateway the way ingress-nginx does forward auth
/// (`auth_request /oauth2/auth`, 401 turned into a login redirect for browser navigations).
pub struct Nginx {
    pub port: u16,
    proc: Proc,
}

impl Nginx {
    /// nginx on a free port running README.md's snippet: `/oauth2/` to the gateway on
    /// `gw_port`, everything else to `upstream_port` behind `auth_request`, with the user
    /// and email passed on as `X-User` and `X-Email`.
    pub async fn start_forward_auth(gw_port: u16, upstream_port: u16) -> Nginx {
        let bin = tool("nginx");
        let mut last = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("portcullis-nginx-")
                .tempdir()
                .expect("tempdir");
            let d = dir.path().display().to_string();
            let port = free_port();
            let snippet = readme_nginx_snippet(gw_port, upstream_port);
            let conf = format!(
                r#"# one process, in the foreground, everything under {d}
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        server_name _;
        absolute_redirect off;

{snippet}
    }}
}}
"#
            );
            let conf_path = dir.path().join("nginx.conf");
            std::fs::write(&conf_path, conf).expect("write nginx.conf");
            let mut cmd = Command::new(&bin);
            cmd.arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .arg("-c")
                .arg(&conf_path)
                .arg("-g")
                .arg("daemon off;");
            let mut proc = Proc::spawn("nginx", cmd, dir);
            let t0 = Instant::now();
            loop {
                if let Some(st) = proc.exited() {
                    let log =
                        std::fs::read_to_string(proc.dir().join("error.log")).unwrap_or_default();
                    last = format!("nginx exited with {st}\n{log}\n{}", proc.tails());
                    break;
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return Nginx { port, proc };
                }
                assert!(
                    t0.elapsed() < super::START_TIMEOUT,
                    "nginx not listening\n{}",
                    proc.tails()
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            // The port was taken between free_port() and nginx's bind: try another.
            if !last.contains("Address already in use") {
                break;
            }
        }
        panic!("cannot start nginx: {last}");
    }

    pub fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin())
    }

    /// nginx's error log (where auth_request problems show up).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.proc.dir().join("error.log")).unwrap_or_default()
    }

    pub fn tails(&self) -> String {
        format!(
            "{}---- nginx error.log ----\n{}",
            self.proc.tails(),
            self.error_log()
        )
    }
}
