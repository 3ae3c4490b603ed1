//! `portcullis check` and `portcullis secret`: configuration validation as the
//! operator sees it (exit codes, one line per error naming its key), environment
//! overrides and secret files, some of them proven on a running gateway.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::{Path, PathBuf};
use support::procs::gateway_command;
use support::*;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn lines(&self) -> Vec<&str> {
        self.stderr.lines().collect()
    }
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = gateway_command();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run portcullis");
    Run {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A valid configuration, as in the documentation.
fn minimal() -> String {
    format!(
        r#"listen: "127.0.0.1:4180"
upstream: "http://127.0.0.1:8081"
provider: {{ issuer_url: "http://127.0.0.1:9000", client_id: "portcullis", client_secret: "s3cret", scopes: ["openid","email","profile","offline_access"] }}
redirect_url: "http://127.0.0.1:4180/oauth2/callback"
cookie: {{ secrets: ["{}"], secure: false }}
"#,
        key(1)
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn check_text(text: &str, env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "portcullis.yaml", text);
    run(&["check", "--config", p.to_str().unwrap()], env)
}

/// Asserts exit 2 and exactly the given number of error lines, each one a
/// `config error: ...` line; returns the lines.
fn assert_invalid(r: &Run, n: usize) -> Vec<String> {
    assert_eq!(r.code, 2, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    let lines = r.lines();
    assert_eq!(lines.len(), n, "expected {n} error line(s):\n{}", r.stderr);
    for l in &lines {
        assert!(l.starts_with("config error: "), "{l}");
    }
    assert!(!r.stdout.contains("config ok"), "{}", r.stdout);
    lines.iter().map(|l| l.to_string()).collect()
}

#[test]
fn minimal_config_is_valid() {
    // Also with settings near the refused ones: a leading @ on an email domain, a
    // forward-auth answer header named Authorization (Traefik's authResponseHeaders).
    let near = format!(
        "{}authorization: {{ allowed_email_domains: [\"@example.com\"] }}\n\
         forward_auth: {{ access_token: Authorization }}\n",
        minimal()
    );
    let r = check_text(&near, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "ok.yaml", &minimal());
    let r = run(&["check", "--config", p.to_str().unwrap()], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), format!("config ok: {}", p.display()));
    assert_eq!(r.stderr, "");
    // PORTCULLIS_CONFIG works as well as --config.
    let r = run(&["check"], &[("PORTCULLIS_CONFIG", p.to_str().unwrap())]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let top = check_text(&format!("{}bogus_key: 1\n", minimal()), &[]);
    let l = assert_invalid(&top, 1);
    assert!(l[0].contains("`bogus_key`"), "{}", l[0]);

    let nested = check_text(&minimal().replace("client_secret:", "client_sekret:"), &[]);
    let l = assert_invalid(&nested, 1);
    assert!(
        l[0].contains("provider") && l[0].contains("`client_sekret`"),
        "{}",
        l[0]
    );

    let deeper = check_text(
        &format!("{}timeouts: {{ upstream_respons: 1s }}\n", minimal()),
        &[],
    );
    let l = assert_invalid(&deeper, 1);
    assert!(
        l[0].contains("timeouts") && l[0].contains("`upstream_respons`"),
        "{}",
        l[0]
    );
}

/// A TLS file that does not load is reported under its own key.
#[test]
fn tls_file_errors_name_the_file_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = write(dir.path(), "not.pem", "neither a certificate nor a key\n");
    let missing = dir.path().join("missing.pem");
    let (not_pem, missing) = (not_pem.display(), missing.display());
    let cases = [
        (
            // The listener is still declared TLS, so the plain-http redirect_url at its
            // address is refused as well.
            format!("tls: {{ cert_file: \"{missing}\", key_file: \"{not_pem}\" }}"),
            vec!["tls.cert_file", "tls.key_file", "redirect_url"],
        ),
        (
            format!("tls: {{ client_cert_file: \"{not_pem}\", client_key_file: \"{missing}\" }}"),
            vec!["tls.client_cert_file", "tls.client_key_file"],
        ),
        (
            format!("tls: {{ ca_file: \"{missing}\" }}"),
            vec!["tls.ca_file"],
        ),
    ];
    for (tls, keys) in cases {
        let r = check_text(&format!("{}{tls}\n", minimal()), &[]);
        let lines = assert_invalid(&r, keys.len());
        for (line, key) in lines.iter().zip(&keys) {
            assert!(
                line.starts_with(&format!("config error: {key}: ")),
                "{tls}: want {key}, got {line}"
            );
        }
    }
}

/// With the listener serving HTTPS, a plain-http `redirect_url` at the same address would
/// bring every login back to the HTTPS port over plain HTTP: refused. Another address (a
/// proxy in front) or https is fine.
#[test]
fn a_plain_http_redirect_url_at_the_tls_listener_is_refused() {
    let pki = support::pki::Pki::new();
    let (cert, key) = pki.issue("gateway", "gateway");
    let tls = format!(
        "tls: {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
        cert.display(),
        key.display()
    );
    let with_tls = format!("{}{tls}", minimal());
    let l = assert_invalid(&check_text(&with_tls, &[]), 1);
    assert!(
        l[0].starts_with("config error: redirect_url: ") && l[0].contains("https://"),
        "{}",
        l[0]
    );
    for ok in [
        with_tls.replace(
            "http://127.0.0.1:4180/oauth2",
            "https://127.0.0.1:4180/oauth2",
        ),
        with_tls.replace(
            "http://127.0.0.1:4180/oauth2",
            "http://app.example:8080/oauth2",
        ),
        minimal(),
    ] {
        let r = check_text(&ok, &[]);
        assert_eq!(r.code, 0, "{ok}\n{}", r.stderr);
    }
}

#[test]
fn bad_values_name_their_key() {
    let cases: Vec<(String, &str)> = vec![
        (
            minimal().replace("http://127.0.0.1:9000", "not a url"),
            "config error: provider.issuer_url: ",
        ),
        (
            minimal().replace("http://127.0.0.1:9000", "ftp://idp.example"),
            "config error: provider.issuer_url: ",
        ),
        (
            minimal().replace(&key(1), "AAAAAAAAAAAAAAAAAAAAAA=="),
            "config error: cookie.secrets[0]: must be 32 bytes after base64 decoding, got 16",
        ),
        (
            minimal().replace(&key(1), "not base64 at all!"),
            "config error: cookie.secrets[0]: ",
        ),
        (
            minimal().replace(
                &format!("[\"{}\"]", key(1)),
                &format!("[\"{}\", \"c2hvcnQ=\"]", key(1)),
            ),
            "config error: cookie.secrets[1]: ",
        ),
        (
            minimal().replace("4180/oauth2/callback", "4180/callback"),
            "config error: redirect_url: ",
        ),
        (
            minimal().replace("secure: false", "secure: maybe"),
            "config error: cookie.secure: ",
        ),
        (
            minimal().replace("\"127.0.0.1:4180\"", "\"localhost\""),
            "config error: listen: ",
        ),
        (
            minimal().replace("scopes: [\"openid\",", "scopes: ["),
            "config error: provider.scopes: ",
        ),
        // A misspelt level: `tracing` would read it as a target and log nothing else.
        (
            format!("{}log: {{ level: verbose }}\n", minimal()),
            "config error: log.level: `verbose` is not a level",
        ),
        // The gateway's host, but another origin (port, scheme).
        (
            format!(
                "{}post_logout_redirect_url: \"http://127.0.0.1:9999/bye\"\n",
                minimal()
            ),
            "config error: post_logout_redirect_url: ",
        ),
        (
            format!(
                "{}post_logout_redirect_url: \"https://127.0.0.1:4180/bye\"\n",
                minimal()
            ),
            "config error: post_logout_redirect_url: ",
        ),
        // What the Redis client refuses at start-up is refused by `check` too.
        (
            format!(
                "{}session: {{ store: redis, redis: {{ url: \"redis://127.0.0.1:6379/abc\" }} }}\n",
                minimal()
            ),
            "config error: session.redis.url: ",
        ),
        (
            format!(
                "{}session: {{ coordination: {{ redis_url: \"redis:///0\" }} }}\n",
                minimal()
            ),
            "config error: session.coordination.redis_url: ",
        ),
        // An identity header cannot take over a header the gateway or HTTP sets.
        (
            format!("{}headers: {{ user: Authorization }}\n", minimal()),
            "config error: headers.user: ",
        ),
        (
            format!("{}headers: {{ email: Host }}\n", minimal()),
            "config error: headers.email: ",
        ),
        (
            format!("{}forward_auth: {{ groups: Set-Cookie }}\n", minimal()),
            "config error: forward_auth.groups: ",
        ),
        // A cookie domain the browser would refuse for the gateway's host.
        (
            minimal().replace("secure: false", "secure: false, domain: evil.com"),
            "config error: cookie.domain: ",
        ),
        (
            minimal()
                .replace("127.0.0.1:4180/oauth2", "app.example.co.uk:4180/oauth2")
                .replace("secure: false", "secure: false, domain: .co.uk"),
            "config error: cookie.domain: ",
        ),
        (
            format!("{}allowed_redirect_domains: [\".com\"]\n", minimal()),
            "config error: allowed_redirect_domains[0]: ",
        ),
        (
            format!(
                "{}allowed_redirect_domains: [\".example.co.uk\", \".co.uk\"]\n",
                minimal()
            ),
            "config error: allowed_redirect_domains[1]: ",
        ),
        (
            format!(
                "{}authorization: {{ allowed_email_domains: [\"example.com\", \".example.com\"] }}\n",
                minimal()
            ),
            "config error: authorization.allowed_email_domains[1]: ",
        ),
        (
            format!(
                "{}routes: [ {{ prefix: /a/, allow: {{ email_domains: [\".example.com\"] }} }} ]\n",
                minimal()
            ),
            "config error: routes[0].allow.allowed_email_domains[0]: ",
        ),
        // An entry that is no address could never match a verified email.
        (
            format!(
                "{}authorization: {{ allowed_emails: [\"alice@example.com\", \"bob\"] }}\n",
                minimal()
            ),
            "config error: authorization.allowed_emails[1]: ",
        ),
        (
            format!(
                "{}routes: [ {{ prefix: /a/, allow: {{ allowed_emails: [\"@example.com\"] }} }} ]\n",
                minimal()
            ),
            "config error: routes[0].allow.allowed_emails[0]: ",
        ),
        (
            format!(
                "{}authorization: {{ allowed_emails: [\"a b@example.com\"] }}\n",
                minimal()
            ),
            "config error: authorization.allowed_emails[0]: ",
        ),
    ];
    for (text, want) in cases {
        let r = check_text(&text, &[]);
        let l = assert_invalid(&r, 1);
        assert!(l[0].starts_with(want), "want {want:?}, got {:?}", l[0]);
    }
    // The redirect_url error names the path it refuses.
    let r = check_text(
        &minimal().replace("4180/oauth2/callback", "4180/callback"),
        &[],
    );
    assert!(r.stderr.contains("`/callback`"), "{}", r.stderr);
}

#[test]
fn every_error_is_reported_on_its_own_line() {
    let text = minimal()
        .replace("http://127.0.0.1:9000", "not a url")
        .replace(&key(1), "AAAAAAAAAAAAAAAAAAAAAA==")
        .replace("4180/oauth2/callback", "4180/callback")
        .replace("client_id: \"portcullis\"", "client_id: \"\"");
    let r = check_text(&text, &[]);
    let lines = assert_invalid(&r, 4);
    for key in [
        "provider.issuer_url",
        "cookie.secrets[0]",
        "redirect_url",
        "provider.client_id",
    ] {
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.starts_with(&format!("config error: {key}: ")))
                .count(),
            1,
            "{key}:\n{}",
            r.stderr
        );
    }
    // A bad route regex too (the regex crate's own message spans four lines).
    let r = check_text(
        &format!(
            "{}routes: [ {{ prefix: /a/ }}, {{ path: \"^/(x\" }} ]\n",
            minimal()
        ),
        &[],
    );
    let l = assert_invalid(&r, 1);
    assert_eq!(
        l[0],
        "config error: routes[1].path: invalid regex `^/(x`: unclosed group"
    );
    // A route prefix no normalised request path can start with.
    let r = check_text(
        &format!("{}routes: [ {{ prefix: \"/a/../admin/\" }} ]\n", minimal()),
        &[],
    );
    let l = assert_invalid(&r, 1);
    assert!(
        l[0].starts_with("config error: routes[0].prefix: `/a/../admin/` never matches"),
        "{}",
        l[0]
    );
    // A YAML syntax error is one line too.
    let r = check_text("listen: [unclosed\n", &[]);
    let l = assert_invalid(&r, 1);
    assert!(l[0].starts_with("config error: invalid YAML"), "{}", l[0]);
    // So are a missing file and no file at all.
    let r = run(&["check", "--config", "/nonexistent/portcullis.yaml"], &[]);
    let l = assert_invalid(&r, 1);
    assert!(l[0].contains("/nonexistent/portcullis.yaml"), "{}", l[0]);
    // No file and no environment: said first, then each missing key on a line of its own.
    let r = run(&["check"], &[]);
    let l = assert_invalid(&r, 7);
    assert!(l[0].contains("no configuration file"), "{}", l[0]);
    assert!(l[1].starts_with("config error: upstream: "), "{}", l[1]);
}

#[test]
fn environment_overrides_the_file() {
    let without_secret = minimal().replace("client_secret: \"s3cret\", ", "");
    let r = check_text(&without_secret, &[]);
    let l = assert_invalid(&r, 1);
    assert!(
        l[0].starts_with("config error: provider.client_secret: "),
        "{}",
        l[0]
    );
    let r = check_text(
        &without_secret,
        &[("PORTCULLIS_PROVIDER_CLIENT_SECRET", "from-env")],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("config ok: "), "{}", r.stdout);
    // An override wins over the file's value (here: making it invalid).
    let r = check_text(
        &minimal(),
        &[("PORTCULLIS_PROVIDER_ISSUER_URL", "not a url")],
    );
    let l = assert_invalid(&r, 1);
    assert!(
        l[0].starts_with("config error: provider.issuer_url: "),
        "{}",
        l[0]
    );
    // Lists from the environment: comma separated.
    let no_secrets = minimal().replace(&format!("secrets: [\"{}\"], ", key(1)), "");
    let r = check_text(&no_secrets, &[]);
    assert_invalid(&r, 1);
    let both = format!("{},{}", key(2), key(3));
    let r = check_text(&no_secrets, &[("PORTCULLIS_COOKIE_SECRETS", &both)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn secret_files_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let cs = write(dir.path(), "client_secret", "from-a-file\n");
    let ks = write(
        dir.path(),
        "cookie_secrets",
        &format!("# current first\n{}\n\n{}\n", key(4), key(5)),
    );
    let text = minimal()
        .replace(
            "client_secret: \"s3cret\"",
            &format!("client_secret_file: \"{}\"", cs.display()),
        )
        .replace(
            &format!("secrets: [\"{}\"]", key(1)),
            &format!("secrets_file: \"{}\"", ks.display()),
        );
    let r = check_text(&text, &[]);
    assert_eq!(r.code, 0, "{}\n{text}", r.stderr);
    // Saved by a Windows editor: a byte-order mark before the config and before a secret.
    write(dir.path(), "client_secret", "\u{feff}from-a-file\r\n");
    let r = check_text(&format!("\u{feff}{text}"), &[]);
    assert_eq!(r.code, 0, "{}\n{text}", r.stderr);

    // A missing file names its key.
    let missing = text.replace(cs.to_str().unwrap(), "/nonexistent/client_secret");
    let l = assert_invalid(&check_text(&missing, &[]), 1);
    assert!(
        l[0].starts_with("config error: provider.client_secret_file: ")
            && l[0].contains("/nonexistent/client_secret"),
        "{}",
        l[0]
    );
    // A bad entry in the secrets file names the entry.
    write(
        dir.path(),
        "cookie_secrets",
        &format!("{}\nc2hvcnQ=\n", key(4)),
    );
    let l = assert_invalid(&check_text(&text, &[]), 1);
    assert!(
        l[0].starts_with("config error: cookie.secrets_file"),
        "{}",
        l[0]
    );
    assert!(l[0].contains('2'), "names the second entry: {}", l[0]);
    // Both a secret and a secret file: ambiguous.
    let both = minimal().replace(
        "client_secret: \"s3cret\"",
        &format!(
            "client_secret: \"x\", client_secret_file: \"{}\"",
            cs.display()
        ),
    );
    let l = assert_invalid(&check_text(&both, &[]), 1);
    assert!(
        l[0].starts_with("config error: provider.client_secret"),
        "{}",
        l[0]
    );
    // The same for cookie keys, also when the environment names the file: merged, the
    // inline key would seal and the rotated file change nothing.
    let both = text.replace(
        &format!("secrets_file: \"{}\"", ks.display()),
        &format!(
            "secrets: [\"{}\"], secrets_file: \"{}\"",
            key(1),
            ks.display()
        ),
    );
    let l = assert_invalid(&check_text(&both, &[]), 1);
    assert!(
        l[0].starts_with("config error: cookie.secrets: ") && l[0].contains("not both"),
        "{}",
        l[0]
    );
    // A variable for either form replaces the file's, as a variable replaces any key: the
    // reference config's example key is not merged in (it would seal), nor warned about.
    write(dir.path(), "cookie_secrets", &format!("{}\n", key(4)));
    let env_file = ks.display().to_string();
    let example = minimal().replace(&key(1), "UkVQTEFDRXhXSVRIeFBPUlRDVUxMSVN4U0VDUkVUeHg=");
    let r = check_text(
        &example,
        &[("PORTCULLIS_COOKIE_SECRETS_FILE", env_file.as_str())],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("example"), "{}", r.stderr);
    let r = check_text(&example, &[]);
    assert!(r.stderr.contains("example"), "{}", r.stderr);
}

/// A secret file with nothing but line breaks or blanks in it (a Secret created from an
/// empty literal, a truncated write) holds no secret: refused, naming the key, rather than a
/// gateway whose every login (or Redis command) fails.
/// The minimal config with its client secret, a Redis password and its cookie keys each read
/// from `f` instead, with the error line prefix naming that key.
fn configs_reading_secret_file(f: &Path) -> [(String, &'static str); 3] {
    let client = minimal().replace(
        "client_secret: \"s3cret\"",
        &format!("client_secret_file: \"{}\"", f.display()),
    );
    let redis = format!(
        "{}session: {{ store: redis, redis: {{ url: \"redis://127.0.0.1:6379\", password_file: \"{}\" }} }}\n",
        minimal(),
        f.display()
    );
    let cookie = minimal().replace(
        &format!("secrets: [\"{}\"]", key(1)),
        &format!("secrets_file: \"{}\"", f.display()),
    );
    [
        (client, "config error: provider.client_secret_file: "),
        (redis, "config error: session.redis.password_file: "),
        (cookie, "config error: cookie.secrets_file: "),
    ]
}

#[test]
fn empty_secret_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("secret");
    for (text, want) in &configs_reading_secret_file(&f) {
        for content in ["", "\n", "\r\n", "\n\n\n", "  \n\t\n"] {
            std::fs::write(&f, content).unwrap();
            let l = assert_invalid(&check_text(text, &[]), 1);
            assert!(
                l[0].starts_with(want) && l[0].contains(f.to_str().unwrap()),
                "{content:?}: {}",
                l[0]
            );
        }
        // A real value in the same file is fine.
        std::fs::write(&f, format!("{}\n", key(7))).unwrap();
        let r = check_text(text, &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
}

/// A client secret or Redis password file holds the secret alone: a second line or a NUL
/// inside it is refused at start-up, naming the key, instead of failing the first login with
/// `invalid_client` (the value is not echoed).
#[test]
fn secret_files_with_a_second_line_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("secret");
    // (Cookie key files hold one key a line: theirs is another rule.)
    for (text, want) in configs_reading_secret_file(&f).iter().take(2) {
        for content in [
            "hunter2\nsecond\n",
            "hunter2\r\nx",
            "hun\0ter2\n",
            "hunter2\n\nx\n",
        ] {
            std::fs::write(&f, content).unwrap();
            let l = assert_invalid(&check_text(text, &[]), 1);
            assert!(l[0].starts_with(want), "{content:?}: {}", l[0]);
            assert!(!l[0].contains("hunter2"), "{}", l[0]);
        }
        std::fs::write(&f, "hunter 2\r\n").unwrap();
        let r = check_text(text, &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
}

/// A config (or secret) file past its size limit is refused at once, naming the file: a path
/// pointed at `/dev/zero` is not read until memory runs out.
#[test]
fn files_past_their_size_limit_are_refused() {
    let r = run(&["check", "--config", "/dev/zero"], &[]);
    let l = assert_invalid(&r, 1);
    assert!(
        l[0].contains("/dev/zero") && l[0].contains("larger than"),
        "{}",
        l[0]
    );
    let client = minimal().replace(
        "client_secret: \"s3cret\"",
        "client_secret_file: \"/dev/zero\"",
    );
    let l = assert_invalid(&check_text(&client, &[]), 1);
    assert!(
        l[0].starts_with("config error: provider.client_secret_file: ")
            && l[0].contains("larger than"),
        "{}",
        l[0]
    );
}

#[test]
fn secret_command_prints_a_fresh_32_byte_key() {
    use base64::Engine;
    let a = run(&["secret"], &[]);
    let b = run(&["secret"], &[]);
    assert_eq!(a.code, 0, "{}", a.stderr);
    assert_eq!(a.stderr, "");
    assert!(
        a.stdout.ends_with('\n') && a.stdout.lines().count() == 1,
        "{:?}",
        a.stdout
    );
    let key_a = a.stdout.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key_a)
        .expect("standard base64");
    assert_eq!(bytes.len(), 32);
    assert_ne!(key_a, b.stdout.trim(), "two runs, two keys");
    // It is accepted as a cookie secret.
    let r = check_text(&minimal().replace(&key(1), key_a), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// Every 32-byte base64 key written in a file this project ships as an example.
fn keys_in_shipped_examples() -> Vec<(String, String)> {
    use base64::Engine;
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        if p.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                walk(&e.unwrap().path(), out);
            }
        } else {
            out.push(p.to_path_buf());
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    walk(&root.join("config"), &mut files);
    walk(&root.join("deploy"), &mut files);
    let b64 = |c: char| c.is_ascii_alphanumeric() || "+/=-_".contains(c);
    let mut found = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for word in text.split(|c: char| !b64(c)) {
            let bare = word.trim_end_matches('=');
            let decoded = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(bare)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(bare));
            if decoded.is_ok_and(|k| k.len() == 32) {
                found.push((word.to_string(), f.display().to_string()));
            }
        }
    }
    found
}

/// The example keys this project published (the reference config, the Kubernetes examples,
/// the demo) would let anyone forge sessions: warned about wherever a key is read (`check`
/// and start-up), as a config copied from the examples still has to load.
#[test]
fn published_example_keys_are_warned_about() {
    const WANT: &str = "warning: cookie.secrets: a key is one this project published as an \
                        example: anyone can forge sessions with it; generate one with \
                        `portcullis secret`";
    let shipped = keys_in_shipped_examples();
    assert!(
        shipped
            .iter()
            .any(|(k, _)| k == "UkVQTEFDRXhXSVRIeFBPUlRDVUxMSVN4U0VDUkVUeHg="),
        "the reference config's example key: {shipped:?}"
    );
    let demo_key = "gJDGcaRi/uH1koUW7MEmgnrRe/4o4uH2RZXQRJVpoUM=";
    let mut published: Vec<String> = shipped.into_iter().map(|(k, _)| k).collect();
    published.push(demo_key.into());
    // The same key in the URL-safe alphabet without padding is the same key.
    published.push(demo_key.replace('/', "_").trim_end_matches('=').into());
    let warned = |r: &Run, what: &str| {
        assert_eq!(r.code, 0, "{what}: {}", r.stderr);
        assert!(r.stderr.lines().any(|l| l == WANT), "{what}: {}", r.stderr);
    };
    for k in &published {
        warned(&check_text(&minimal().replace(&key(1), k), &[]), k);
    }
    let k = &published[0];
    // Second in the list (an old key kept for rotation) is just as forgeable.
    let two = minimal().replace(&key(1), &format!("{}\", \"{k}", key(2)));
    warned(&check_text(&two, &[]), "second");
    // From the environment and from a secrets file.
    let no_secrets = minimal().replace(&format!("secrets: [\"{}\"], ", key(1)), "");
    warned(
        &check_text(&no_secrets, &[("PORTCULLIS_COOKIE_SECRETS", k)]),
        "env",
    );
    let dir = tempfile::tempdir().unwrap();
    let ks = write(dir.path(), "cookie_secrets", &format!("{k}\n"));
    let from_file = minimal().replace(
        &format!("secrets: [\"{}\"]", key(1)),
        &format!("secrets_file: \"{}\"", ks.display()),
    );
    warned(&check_text(&from_file, &[]), "file");
    // A key of one's own: no warning.
    let r = check_text(&minimal(), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    // Beyond loopback (a real deployment, e.g. an example Secret applied over the real one)
    // a published key is refused, naming where it came from.
    let exposed =
        |text: &str| text.replace("listen: \"127.0.0.1:4180\"", "listen: \"0.0.0.0:4180\"");
    for (text, key) in [
        (minimal().replace(&key(1), k), "cookie.secrets"),
        (from_file.clone(), "cookie.secrets_file"),
    ] {
        let l = assert_invalid(&check_text(&exposed(&text), &[]), 1);
        assert!(
            l[0].starts_with(&format!("config error: {key}: ")) && l[0].contains("published"),
            "{}",
            l[0]
        );
    }
    let r = check_text(&exposed(&minimal()), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// The drain time's spellings: `timeouts.shutdown` (alias `timeouts.shutdown_timeout`),
/// `lifecycle.shutdown_timeout`, and a top-level `shutdown_timeout` /
/// `PORTCULLIS_SHUTDOWN_TIMEOUT`; two explicit ones that disagree are refused.
#[test]
fn shutdown_timeout_is_accepted_at_the_top_level_and_from_the_environment() {
    let r = check_text(&format!("{}shutdown_timeout: 40s\n", minimal()), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = check_text(&minimal(), &[("PORTCULLIS_SHUTDOWN_TIMEOUT", "40s")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = check_text(
        &format!(
            "{}shutdown_timeout: 40s\nlifecycle: {{ shutdown_timeout: 30s }}\n",
            minimal()
        ),
        &[],
    );
    let l = assert_invalid(&r, 1);
    assert!(
        l[0].starts_with(
            "config error: shutdown_timeout: 40s conflicts with lifecycle.shutdown_timeout"
        ),
        "{}",
        l[0]
    );
    let r = check_text(&minimal(), &[("PORTCULLIS_SHUTDOWN_TIMEOUT", "later")]);
    let l = assert_invalid(&r, 1);
    assert!(
        l[0].starts_with("config error: shutdown_timeout: "),
        "{}",
        l[0]
    );
}

/// `portcullis env-vars`: one line per variable, its key and its default (lists in flow
/// style, as the variable accepts them).
#[test]
fn env_vars_prints_one_line_per_variable() {
    let r = run(&["env-vars"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines.len() > 50, "{}", r.stdout);
    for l in &lines {
        assert!(
            l.starts_with("PORTCULLIS_") && l.contains(" (default: ") && l.ends_with(')'),
            "not a variable line: {l:?}\n{}",
            r.stdout
        );
    }
    let scopes = lines
        .iter()
        .find(|l| l.starts_with("PORTCULLIS_PROVIDER_SCOPES "))
        .unwrap();
    assert!(
        scopes.ends_with("provider.scopes  (default: [openid, email, profile])"),
        "{scopes}"
    );
    // The process's own variables too.
    for var in ["PORTCULLIS_CONFIG ", "PORTCULLIS_WORKER_THREADS "] {
        assert!(
            lines.iter().any(|l| l.starts_with(var)),
            "{var}\n{}",
            r.stdout
        );
    }
    // A reader that stops early (`portcullis env-vars | head -1`) gets no panic message.
    let mut child = gateway_command()
        .arg("env-vars")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}

/// A `PORTCULLIS_WORKER_THREADS` that is not a number from 1 to 1024 is refused, naming it (it
/// used to be ignored silently; 100000 ran the process out of memory), by `check` as by `serve`.
#[test]
fn a_bad_worker_threads_value_is_refused() {
    for bad in ["0", "two", "-1", "100000"] {
        let r = check_text(&minimal(), &[("PORTCULLIS_WORKER_THREADS", bad)]);
        let lines = assert_invalid(&r, 1);
        assert!(
            lines[0].contains("PORTCULLIS_WORKER_THREADS") && lines[0].contains(bad),
            "{lines:?}"
        );
    }
    let r = check_text(&minimal(), &[("PORTCULLIS_WORKER_THREADS", "2")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// The secret file and the environment override are what a running gateway uses:
/// the provider only accepts the right client secret at the token endpoint.
#[tokio::test]
async fn running_gateway_uses_secret_files_and_env_overrides() {
    let port = free_port();
    let idp = Idp::start_for_gateway(port, &[("IDP_CLIENT_SECRET", "only-in-a-file")]).await;
    let upstream = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    // As a Windows editor saves it: a byte-order mark, which is no part of the secret.
    let cs = write(dir.path(), "client_secret", "\u{feff}only-in-a-file\n");
    let ks = write(dir.path(), "cookie_secrets", &format!("{}\n", key(9)));

    // From files.
    let gw = Gateway::start(GatewayOpts {
        client_secret: String::new(),
        secrets: Vec::new(),
        provider_extra: vec![format!("client_secret_file: \"{}\"", cs.display())],
        cookie_extra: vec![format!("secrets_file: \"{}\"", ks.display())],
        ..GatewayOpts::new(port, &idp, &upstream.url())
    })
    .await;
    let b = Browser::new();
    let r = login(&b, &gw, "/file", "alice").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let cookie = b.cookie_header(&gw.url("/"));
    drop(gw);

    // A wrong secret in the file, the right one from the environment.
    let gw = Gateway::start(GatewayOpts {
        client_secret: "wrong-secret".to_string(),
        secrets: vec![key(9)],
        env: vec![(
            "PORTCULLIS_PROVIDER_CLIENT_SECRET".to_string(),
            "only-in-a-file".to_string(),
        )],
        ..GatewayOpts::new(port, &idp, &upstream.url())
    })
    .await;
    // The cookie sealed with the key from the file opens with the same key inline.
    let r = send(
        "GET",
        &gw.url("/env"),
        &[("accept", "application/json"), ("cookie", &cookie)],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let b = Browser::new();
    let r = login(&b, &gw, "/env", "bob").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(upstream.last().header("x-forwarded-user"), Some("bob"));
    drop(gw);

    // Control: the wrong secret alone fails the code exchange.
    let gw = Gateway::start(GatewayOpts {
        client_secret: "wrong-secret".to_string(),
        ..GatewayOpts::new(port, &idp, &upstream.url())
    })
    .await;
    let b = Browser::new();
    let first = b.get(&gw.url("/")).await;
    let (auth, _) = auth_redirect(&first);
    let callback = idp_walk(&b, &auth, "carol").await;
    let r = b.get(&callback).await;
    assert_eq!(
        r.status,
        502,
        "invalid_client at the token endpoint: {}",
        r.dump()
    );
    assert!(r.set_cookie("_portcullis").is_none(), "{}", r.dump());
}

/// Every value can come from the environment: with no configuration file at all, the
/// `PORTCULLIS_*` variables alone configure the gateway; what is missing is named.
#[test]
fn the_environment_alone_is_a_configuration() {
    let k = key(1);
    let env = [
        ("PORTCULLIS_LISTEN", "127.0.0.1:4180"),
        ("PORTCULLIS_UPSTREAM", "http://127.0.0.1:8081"),
        ("PORTCULLIS_PROVIDER_ISSUER_URL", "http://127.0.0.1:9000"),
        ("PORTCULLIS_PROVIDER_CLIENT_ID", "portcullis"),
        ("PORTCULLIS_PROVIDER_CLIENT_SECRET", "s3cret"),
        (
            "PORTCULLIS_REDIRECT_URL",
            "http://127.0.0.1:4180/oauth2/callback",
        ),
        ("PORTCULLIS_COOKIE_SECRETS", k.as_str()),
        ("PORTCULLIS_COOKIE_SECURE", "false"),
    ];
    let r = run(&["check"], &env);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), "config ok: (environment)");
    // One key short: it is named, exit 2.
    let short: Vec<_> = env
        .iter()
        .copied()
        .filter(|(k, _)| *k != "PORTCULLIS_PROVIDER_CLIENT_ID")
        .collect();
    // Set but empty (a chart's default), PORTCULLIS_CONFIG is not set.
    let mut empty = env.to_vec();
    empty.push(("PORTCULLIS_CONFIG", ""));
    let r = run(&["check"], &empty);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for command in ["secret", "env-vars"] {
        let r = run(&[command], &[("PORTCULLIS_CONFIG", "")]);
        assert_eq!(r.code, 0, "{command}: {}", r.stderr);
    }
    let r = run(&["check"], &short);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let lines = r.lines();
    assert_eq!(lines.len(), 2, "{}", r.stderr);
    assert!(lines[0].contains("no configuration file"), "{}", r.stderr);
    assert!(
        lines[1].starts_with("config error: provider.client_id: "),
        "{}",
        r.stderr
    );
    // A bad value is only that: one line naming its key.
    let mut bad = env.to_vec();
    bad.push(("PORTCULLIS_TIMEOUTS_IDLE", "abc"));
    let r = run(&["check"], &bad);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let lines = r.lines();
    assert_eq!(lines.len(), 1, "{}", r.stderr);
    assert!(
        lines[0].starts_with("config error: timeouts.idle: "),
        "{}",
        r.stderr
    );
}

/// A misspelt `PORTCULLIS_*` variable is named by `check` as by `serve`: otherwise the
/// check passes and the setting silently does nothing.
#[test]
fn check_names_variables_that_name_no_key() {
    let r = check_text(&minimal(), &[("PORTCULLIS_TIMEOUT_IDLE", "5s")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.lines().any(|l| l.starts_with("warning: ")
            && l.contains("PORTCULLIS_TIMEOUT_IDLE")
            && l.contains("names no configuration key")),
        "{}",
        r.stderr
    );
    let r = check_text(&minimal(), &[("PORTCULLIS_TIMEOUTS_IDLE", "5s")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
}

/// `session.redis.url` is the Redis *store*'s: with `session.store: cookie` nothing uses it (the
/// cookie store's coordination Redis is `session.coordination.redis_url`). A config that sets it
/// there still loads, with a warning that names the key and what to set instead.
#[test]
fn a_redis_url_the_cookie_store_does_not_use_is_warned_about() {
    let want = "warning: session.redis.url: not used with session.store: cookie";
    let warned = |r: &Run, what: &str| {
        assert_eq!(r.code, 0, "{what}: {}", r.stderr);
        assert!(
            r.stderr
                .lines()
                .any(|l| l.starts_with(want) && l.contains("session.coordination.redis_url")),
            "{what}: {}",
            r.stderr
        );
    };
    let url = "redis://127.0.0.1:6379";
    let cookie = format!("{}session: {{ redis: {{ url: \"{url}\" }} }}\n", minimal());
    warned(&check_text(&cookie, &[]), "file");
    warned(
        &check_text(&minimal(), &[("PORTCULLIS_SESSION_REDIS_URL", url)]),
        "env",
    );
    // Where it is used: no warning.
    for used in [
        format!("session: {{ store: redis, redis: {{ url: \"{url}\" }} }}\n"),
        format!("session: {{ coordination: {{ redis_url: \"{url}\" }} }}\n"),
    ] {
        let r = check_text(&format!("{}{used}", minimal()), &[]);
        assert_eq!(r.code, 0, "{used}: {}", r.stderr);
        assert!(!r.stderr.contains("warning"), "{used}: {}", r.stderr);
    }
}

/// Every address as a trusted proxy makes every client one: allowed (a gateway reachable only
/// through its proxies), with a warning.
#[test]
fn trusting_every_address_is_warned_about() {
    for everything in ["0.0.0.0/0", "::/0"] {
        let yaml = format!(
            "{}trusted_proxies: [\"10.0.0.0/8\", \"{everything}\"]\n",
            minimal()
        );
        let r = check_text(&yaml, &[]);
        assert_eq!(r.code, 0, "{everything}: {}", r.stderr);
        assert!(
            r.stderr
                .lines()
                .any(|l| l.starts_with("warning: trusted_proxies: a range of every address")),
            "{everything}: {}",
            r.stderr
        );
    }
    let r = check_text(
        &format!("{}trusted_proxies: [\"10.0.0.0/8\"]\n", minimal()),
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
}

/// A URL that fails to parse is quoted back without the credentials it may carry (an operator's
/// `https://user:password@…` with a typo in the port).
#[test]
fn bad_urls_are_quoted_without_their_credentials() {
    let cases = [
        ("http://127.0.0.1:8081", "upstream"),
        ("http://127.0.0.1:9000", "provider.issuer_url"),
    ];
    for (url, key) in cases {
        for bad in [
            "http://admin:hunter2@127.0.0.1:99999",
            "ftp://admin:hunter2@idp.example/x",
        ] {
            let r = check_text(&minimal().replace(url, bad), &[]);
            let lines = assert_invalid(&r, 1);
            assert!(
                lines[0].starts_with(&format!("config error: {key}: ")),
                "{}",
                r.stderr
            );
            assert!(!r.stderr.contains("hunter2"), "{key}: {}", r.stderr);
            assert!(!r.stderr.contains("admin"), "{key}: {}", r.stderr);
        }
    }
}

/// `check` says when a certificate the config names has expired or is about to (a failed
/// renewal), naming its key; the config is still valid.
#[test]
fn check_warns_of_certificates_about_to_expire() {
    let pki = support::pki::Pki::new();
    let (cert, key) = pki.issue("gateway", "gateway");
    let (client, client_key) = pki.issue_for_days("client", "portcullis", 90);
    let yaml = format!(
        "{}tls: {{ cert_file: \"{}\", key_file: \"{}\", client_cert_file: \"{}\", client_key_file: \"{}\" }}\n",
        minimal().replace("http://127.0.0.1:4180/oauth2", "https://127.0.0.1:4180/oauth2"),
        cert.display(),
        key.display(),
        client.display(),
        client_key.display()
    );
    let r = check_text(&yaml, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let warnings: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", r.stderr);
    assert!(
        warnings[0].starts_with("warning: tls.cert_file: the certificate expires on ")
            && warnings[0].contains("(days left: 1)"),
        "{}",
        r.stderr
    );
}
