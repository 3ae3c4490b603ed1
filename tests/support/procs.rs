//! Child processes: the test IdP (node) and the gateway binary, killed on drop,
//! with their output kept in files and shown when a test fails.

use super::{send, START_TIMEOUT};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port that was free a moment ago on 127.0.0.1, never handed out twice in this process.
///
/// Ports come from 20000..32000, below Linux's ephemeral range, so a port released here cannot
/// be taken meanwhile by some outgoing connection; each test binary starts at its own offset.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        let mut used = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if used.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            used.push(port);
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

/// A child process killed (and reaped) on drop. Its stdout and stderr go to files in
/// its own temporary directory; their tails are printed when the test is failing.
pub struct Proc {
    name: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, dir: tempfile::TempDir) -> Proc {
        let out = File::create(dir.path().join("stdout")).expect("stdout file");
        let err = File::create(dir.path().join("stderr")).expect("stderr file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child,
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// The exit status, if the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit, for at most `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.exited() {
                return st;
            }
            assert!(
                t0.elapsed() < within,
                "{} still running after {within:?}\n{}",
                self.name,
                self.tails()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines of both outputs, for failure messages.
    pub fn tails(&self) -> String {
        fn tail(s: &str, n: usize) -> String {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        format!(
            "---- {} (pid {}) stdout tail ----\n{}\n---- {} stderr tail ----\n{}\n",
            self.name,
            self.child.id(),
            tail(&self.stdout(), 40),
            self.name,
            tail(&self.stderr(), 40)
        )
    }

    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("{}", self.tails());
        }
    }
}

/// "name state wchan" of each thread of a running process, from /proc (Linux).
fn thread_states(pid: u32) -> String {
    let dir = format!("/proc/{pid}/task");
    let Ok(tasks) = std::fs::read_dir(&dir) else {
        return "unknown".into();
    };
    tasks
        .flatten()
        .map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let comm = stat
                .split_once('(')
                .and_then(|(_, r)| r.rsplit_once(')'))
                .map_or("?", |(c, _)| c);
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, r)| r.get(..1))
                .unwrap_or("?");
            let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
            let wchan = if wchan == "0" { "" } else { wchan.as_str() };
            format!("{comm} {state} {wchan}").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The test OpenID provider, `node tests/js/idp.mjs`.
pub struct Idp {
    pub port: u16,
    proc: Proc,
}

impl Idp {
    /// Starts the IdP with the given environment (added to the defaults) and waits
    /// for its `READY` line. Retries on another port if the port was taken, or if the start
    /// hangs (seen rarely on a busy CI machine: the first line printed, then nothing).
    pub async fn start(env: &[(&str, &str)]) -> Idp {
        let mut last = String::new();
        for _attempt in 0..3 {
            let port = free_port();
            match Idp::launch(port, env).await {
                Ok(proc) => return Idp { port, proc },
                // Port taken between free_port() and node's listen(): another one.
                Err(Launch::Exited(why)) if why.contains("EADDRINUSE") => last = why,
                Err(Launch::Exited(why)) => panic!("cannot start the idp: {why}"),
                Err(Launch::Hung(why)) => last = why,
            }
        }
        panic!("cannot start the idp: {last}");
    }

    /// Spawns `node tests/js/idp.mjs` on `port` with `env` and waits for its `READY` line;
    /// a start that hangs is killed and tried again on the same port, twice at most.
    async fn launch(port: u16, env: &[(&str, &str)]) -> Result<Proc, Launch> {
        let js = repo().join("tests/js");
        assert!(
            js.join("node_modules/oidc-provider").is_dir(),
            "tests/js/node_modules is missing: run `make deps-node` (or `npm ci` in tests/js)"
        );
        let node = std::env::var("NODE").unwrap_or_else(|_| "node".to_string());
        let mut hung = String::new();
        for _attempt in 0..3 {
            let mut cmd = Command::new(&node);
            cmd.arg(js.join("idp.mjs")).current_dir(&js);
            for (k, _) in std::env::vars() {
                if k.starts_with("IDP_") {
                    cmd.env_remove(k);
                }
            }
            cmd.env("IDP_PORT", port.to_string());
            for (k, v) in env {
                cmd.env(k, v);
            }
            let dir = tempfile::Builder::new()
                .prefix("portcullis-idp-")
                .tempdir()
                .expect("tempdir");
            let mut proc = Proc::spawn("idp", cmd, dir);
            let t0 = Instant::now();
            loop {
                if proc.stdout().lines().any(|l| l.starts_with("READY ")) {
                    return Ok(proc);
                }
                if let Some(st) = proc.exited() {
                    return Err(Launch::Exited(format!(
                        "idp on port {port} exited with {st}\n{}",
                        proc.tails()
                    )));
                }
                if t0.elapsed() > START_TIMEOUT * 2 / 3 {
                    hung = format!(
                        "idp on port {port} not READY after {:?} (threads: {})\n{}",
                        t0.elapsed(),
                        thread_states(proc.pid()),
                        proc.tails()
                    );
                    eprintln!("{hung}\nstarting it again");
                    proc.stop();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        Err(Launch::Hung(hung))
    }

    /// An IdP whose client accepts the callback of a gateway on `gw_port`.
    pub async fn start_for_gateway(gw_port: u16, env: &[(&str, &str)]) -> Idp {
        let redirect = format!("http://127.0.0.1:{gw_port}/oauth2/callback");
        let mut all: Vec<(&str, &str)> = vec![("IDP_REDIRECT_URIS", redirect.as_str())];
        all.extend_from_slice(env);
        Idp::start(&all).await
    }

    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.issuer())
    }

    /// The provider's userinfo (`/me`) asked with `access_token`: 200 while the token lives.
    pub async fn userinfo(&self, access_token: &str) -> super::Resp {
        let bearer = format!("Bearer {access_token}");
        send(
            "GET",
            &self.url("/me"),
            &[("authorization", &bearer)],
            Vec::new(),
        )
        .await
    }

    /// The `REQ ...` lines logged so far (one per request the IdP served).
    pub fn requests(&self) -> Vec<String> {
        self.proc
            .stdout()
            .lines()
            .filter(|l| l.starts_with("REQ "))
            .map(str::to_string)
            .collect()
    }

    /// How many requests the IdP served.
    pub fn request_count(&self) -> usize {
        self.requests().len()
    }

    /// Freezes (`SIGSTOP`) or resumes (`SIGCONT`) the IdP: a provider that hangs, then answers
    /// everything it was sent meanwhile.
    pub fn signal(&self, signal: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.proc.pid().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} {}", self.proc.pid());
    }

    /// How many token endpoint requests (code exchanges, refreshes) the IdP served.
    pub fn token_requests(&self) -> usize {
        self.requests()
            .iter()
            .filter(|l| l.contains(" POST /token "))
            .count()
    }

    pub fn tails(&self) -> String {
        self.proc.tails()
    }
}

/// The admin listener (`/metrics`) defaults to the fixed 127.0.0.1:9090, which
/// parallel gateways cannot share: the tests turn it off.
pub const ADMIN_YAML: &str = "admin: { listen: \"\" }";

/// What goes into the gateway's YAML file (and its environment).
#[derive(Clone, Debug)]
pub struct GatewayOpts {
    pub port: u16,
    pub issuer: String,
    pub upstream: String,
    /// Left out of the file when empty.
    pub client_secret: String,
    /// `cookie.secrets`; left out of the file when empty.
    pub secrets: Vec<String>,
    /// Extra lines of the `provider:` mapping, e.g. `client_secret_file: "/x"`.
    pub provider_extra: Vec<String>,
    /// Extra lines of the `cookie:` mapping.
    pub cookie_extra: Vec<String>,
    /// Extra top-level YAML (must not repeat the keys written here).
    pub extra: String,
    /// Environment variables for the gateway process.
    pub env: Vec<(String, String)>,
}

impl GatewayOpts {
    pub fn new(port: u16, idp: &Idp, upstream: &str) -> GatewayOpts {
        GatewayOpts {
            port,
            issuer: idp.issuer(),
            upstream: upstream.to_string(),
            client_secret: super::CLIENT_SECRET.to_string(),
            secrets: vec![super::key(1)],
            provider_extra: Vec::new(),
            cookie_extra: Vec::new(),
            extra: String::new(),
            env: Vec::new(),
        }
    }

    pub fn yaml(&self) -> String {
        let mut y = String::new();
        y.push_str(&format!("listen: \"127.0.0.1:{}\"\n", self.port));
        y.push_str(&format!("upstream: \"{}\"\n", self.upstream));
        y.push_str("provider:\n");
        y.push_str(&format!("  issuer_url: \"{}\"\n", self.issuer));
        y.push_str(&format!("  client_id: \"{}\"\n", super::CLIENT_ID));
        if !self.client_secret.is_empty() {
            y.push_str(&format!("  client_secret: \"{}\"\n", self.client_secret));
        }
        y.push_str("  scopes: [\"openid\", \"email\", \"profile\", \"offline_access\"]\n");
        for l in &self.provider_extra {
            y.push_str(&format!("  {l}\n"));
        }
        y.push_str(&format!(
            "redirect_url: \"http://127.0.0.1:{}/oauth2/callback\"\n",
            self.port
        ));
        y.push_str("cookie:\n");
        if !self.secrets.is_empty() {
            let secrets: Vec<String> = self.secrets.iter().map(|s| format!("\"{s}\"")).collect();
            y.push_str(&format!("  secrets: [{}]\n", secrets.join(", ")));
        }
        y.push_str("  secure: false\n");
        for l in &self.cookie_extra {
            y.push_str(&format!("  {l}\n"));
        }
        y.push_str("log: { level: \"portcullis=debug,info\" }\n");
        y.push_str(ADMIN_YAML);
        y.push('\n');
        y.push_str(&self.extra);
        y.push('\n');
        y
    }
}

/// The gateway binary under test, running `--config` on a generated file.
pub struct Gateway {
    pub port: u16,
    pub opts: GatewayOpts,
    proc: Proc,
}

/// The binary built by cargo for these tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_portcullis")
}

/// A `Command` for the gateway binary without any inherited configuration variables.
pub fn gateway_command() -> Command {
    let mut cmd = Command::new(bin());
    cmd.env("NO_COLOR", "1");
    for (k, _) in std::env::vars() {
        if k.starts_with("PORTCULLIS_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd
}

impl Gateway {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Writes the config, starts the gateway and waits until `/readyz` answers 200.
    pub async fn start(opts: GatewayOpts) -> Gateway {
        Self::start_until(opts, "/readyz").await
    }

    /// Like `start`, but waits only until it serves `/healthz` (200), not until it is
    /// ready: for providers that are missing or misconfigured.
    pub async fn start_unready(opts: GatewayOpts) -> Gateway {
        Self::start_until(opts, "/healthz").await
    }

    async fn start_until(opts: GatewayOpts, probe: &str) -> Gateway {
        let dir = tempfile::Builder::new()
            .prefix("portcullis-gw-")
            .tempdir()
            .expect("tempdir");
        let cfg = dir.path().join("portcullis.yaml");
        std::fs::write(&cfg, opts.yaml()).expect("write config");
        let mut cmd = gateway_command();
        cmd.arg("--config").arg(&cfg);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut proc = Proc::spawn("gateway", cmd, dir);
        let t0 = Instant::now();
        let url = format!("http://127.0.0.1:{}{probe}", opts.port);
        loop {
            if let Some(st) = proc.exited() {
                panic!(
                    "gateway exited with {st} before {probe} answered\nconfig:\n{}\n{}",
                    opts.yaml(),
                    proc.tails()
                );
            }
            if let Ok(r) = super::try_send("GET", &url, &[], Vec::new()).await {
                if r.status == 200 {
                    break;
                }
            }
            assert!(
                t0.elapsed() < START_TIMEOUT,
                "gateway {probe} not 200 after {START_TIMEOUT:?}\nconfig:\n{}\n{}",
                opts.yaml(),
                proc.tails()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Gateway {
            port: opts.port,
            opts,
            proc,
        }
    }

    pub fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin())
    }

    /// Is the process still running?
    pub fn alive(&mut self) -> bool {
        self.proc.exited().is_none()
    }

    pub fn stderr(&self) -> String {
        self.proc.stderr()
    }

    pub fn tails(&self) -> String {
        self.proc.tails()
    }

    /// Asserts the gateway answers `/healthz` with 200 (it kept serving).
    pub async fn assert_healthy(&mut self) {
        assert!(self.alive(), "gateway died\n{}", self.tails());
        let r = send("GET", &self.url("/healthz"), &[], Vec::new()).await;
        assert_eq!(r.status, 200, "healthz: {}", r.dump());
        assert_eq!(r.text(), "ok\n");
    }
}

// Stopping and restarting the IdP on its port (tests/sessions.rs).
impl Idp {
    /// Everything the IdP printed on stdout so far (`REQ ...`, `BCL ...` lines).
    pub fn stdout(&self) -> String {
        self.proc.stdout()
    }

    /// Kills the IdP process: its port stops answering until `restart`.
    pub fn kill(&mut self) {
        self.proc.stop();
    }

    /// Starts a new IdP process on the same port with `env` (which must repeat what the
    /// first start was given, e.g. `IDP_REDIRECT_URIS`). It is a fresh provider: empty
    /// token store and a new signing key. Its log starts empty.
    pub async fn restart(&mut self, env: &[(&str, &str)]) {
        self.proc.stop();
        match Idp::launch(self.port, env).await {
            Ok(proc) => self.proc = proc,
            Err(Launch::Exited(why) | Launch::Hung(why)) => panic!("restarted {why}"),
        }
    }
}

/// Why the IdP did not start.
enum Launch {
    Exited(String),
    Hung(String),
}

// Starting processes without waiting for readiness, and the IdP on a chosen port
// (tests/provider.rs).
impl Idp {
    /// Starts the IdP on `port` (which must be free) with `env` and waits for its
    /// `READY` line. Unlike `start`, no other port is tried.
    pub async fn start_on(port: u16, env: &[(&str, &str)]) -> Idp {
        let proc = match Idp::launch(port, env).await {
            Ok(proc) => proc,
            Err(Launch::Exited(why) | Launch::Hung(why)) => panic!("{why}"),
        };
        Idp { port, proc }
    }
}
