//! Configuration: YAML file + `PORTCULLIS_*` environment overrides + secret files,
//! parsed and validated once into typed structs.

mod env;
pub mod raw;
pub mod secret;
mod validate;

pub use secret::{CookieKey, Secret};
pub use validate::*;

/// `admin.listen`'s default (also Prometheus's own port: see `bind_admin`).
pub const DEFAULT_ADMIN_LISTEN: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9090),
);

use std::fmt;
use std::io::Read;
use std::path::Path;

/// The largest configuration file read: far past any real one (a few KB), and small enough
/// that a file gone wrong (`/dev/zero`, a log written over it, deeply nested YAML) is
/// refused at once rather than read until memory runs out or parsed for minutes.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The largest secret, certificate or key file read (a CA bundle of every public root is
/// ~250 KB), and the most read of any file to tell whether it changed.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// A file's bytes, refused past `limit` (never read further).
pub fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::other(format!(
            "larger than {} KiB",
            limit >> 10
        )));
    }
    Ok(bytes)
}

/// A text file's contents, refused past `limit` or when not UTF-8.
pub fn read_text_bounded(path: &Path, limit: u64) -> std::io::Result<String> {
    String::from_utf8(read_bounded(path, limit)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

/// One configuration problem, naming the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    /// Always one line (the README's promise, and what log shippers expect): a line break
    /// in a message (a library's error text, a key or value quoted from the file) becomes a
    /// space.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = if self.key.is_empty() {
            format!("config error: {}", self.message)
        } else {
            format!("config error: {}: {}", self.key, self.message)
        };
        if !line.contains(['\n', '\r']) {
            return f.write_str(&line);
        }
        let parts: Vec<&str> = line
            .split(['\n', '\r'])
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        f.write_str(&parts.join(" "))
    }
}

/// All problems found in one configuration (never empty).
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        Self(vec![e])
    }
}

/// Reads, overlays the environment, and validates the configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = read_text_bounded(path, MAX_CONFIG_BYTES).map_err(|e| {
        ConfigError::new(
            "",
            format!("cannot read config file {}: {e}", path.display()),
        )
    })?;
    load_str(&text, std::env::vars())
}

/// Parses YAML text with the given environment (`PORTCULLIS_*` variables override keys).
pub fn load_str(
    text: &str,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigErrors> {
    let mut value = parse_yaml(text)
        .map_err(|e| ConfigError::new("", format!("invalid YAML: {}", plain_message(&e))))?;
    let vars: Vec<(String, String)> = vars.into_iter().collect();
    // `RUST_LOG` overrides `log.level` under the same rules; set but empty (a common chart
    // default), it is not set.
    let rust_log = vars
        .iter()
        .find(|(k, _)| k == "RUST_LOG")
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty());
    let ours: Vec<String> = vars
        .iter()
        .filter(|(k, _)| k.starts_with("PORTCULLIS_"))
        .map(|(k, _)| k.clone())
        .collect();
    env::overlay(&mut value, vars)?;
    let mut raw: raw::RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        let message = plain_message(&e.into_inner().to_string());
        // A serde alias written beside its key is a "duplicate" of a key the file never spelt.
        let (key, message) = match (key.as_str(), message.as_str()) {
            ("timeouts", "duplicate field `shutdown`") => (
                "timeouts.shutdown_timeout".to_string(),
                "another spelling of timeouts.shutdown: set one".to_string(),
            ),
            _ => (key, message),
        };
        let message = if holds_secret(&key) {
            without_value(&message)
        } else {
            message
        };
        ConfigError::new(key.clone(), message + &from_variable(&key, &ours))
    })?;
    if let Some(level) = rust_log {
        validate::check_log_level(&level).map_err(|m| ConfigError::new("RUST_LOG", m))?;
        raw.log.level = level;
    }
    validate::validate(raw).map_err(|ConfigErrors(errors)| {
        let named = |mut e: ConfigError| {
            e.message += &from_variable(&e.key, &ours);
            e
        };
        ConfigErrors(errors.into_iter().map(named).collect())
    })
}

/// The secret files the config file at `path` names, as far as it can be read: for a config
/// that was refused (perhaps because such a file is not there yet), so that a reload watches
/// for them. Empty when the file does not parse.
pub fn named_secret_files(path: Option<&Path>) -> Vec<std::path::PathBuf> {
    let text = match path.map(|p| read_text_bounded(p, MAX_CONFIG_BYTES)) {
        Some(Ok(text)) => text,
        Some(Err(_)) => return Vec::new(),
        None => String::new(),
    };
    let Ok(mut value) = parse_yaml(&text) else {
        return Vec::new();
    };
    if env::overlay(&mut value, std::env::vars()).is_err() {
        return Vec::new();
    }
    serde_yaml::from_value::<raw::RawConfig>(value)
        .map(|raw| validate::secret_files(&raw))
        .unwrap_or_default()
}

/// The file's YAML as one value: a byte-order mark (Windows editors write one) skipped, merge
/// keys (`<<: *defaults`) applied, an empty file an empty mapping.
fn parse_yaml(text: &str) -> Result<serde_yaml::Value, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return Ok(serde_yaml::Value::Mapping(Default::default()));
    }
    let mut value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    value.apply_merge().map_err(|e| e.to_string())?;
    Ok(value)
}

/// serde's message in the words of the file: what it expected rather than the schema's type
/// names (`expected struct RawRoute`), and a number too large for any setting said so.
fn plain_message(message: &str) -> String {
    if message.contains("as u128") || message.contains("as i128") {
        let at = message.find(" at line ").map_or("", |i| &message[i..]);
        let key = message
            .split_once(": invalid type")
            .map_or(String::new(), |(k, _)| format!("{k}: "));
        return format!("{key}the number is too large{at}");
    }
    let mut out = message.to_string();
    while let Some(i) = out.find("expected struct Raw") {
        let end = out[i..]
            .find(|c: char| !c.is_ascii_alphanumeric() && c != ' ')
            .map_or(out.len(), |e| i + e);
        out.replace_range(i..end, "expected a mapping of settings");
    }
    out
}

/// For an error in a value the environment set, the variable's name, which the user wrote
/// rather than the key (` (from PORTCULLIS_COOKIE_SECURE)`).
fn from_variable(key: &str, vars: &[String]) -> String {
    let path: Vec<String> = key
        .split('[')
        .next()
        .unwrap_or_default()
        .split('.')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    if path.is_empty() {
        return String::new();
    }
    let var = env::var_name(&path);
    match vars.contains(&var) {
        true => format!(" (from {var})"),
        false => String::new(),
    }
}

/// Keys whose values are secrets (also an item of a list, `cookie.secrets[0]`).
const SECRET_KEYS: &[&str] = &[
    "provider.client_secret",
    "cookie.secrets",
    "session.redis.password",
];

fn holds_secret(key: &str) -> bool {
    let key = key.split_once('[').map_or(key, |(list, _)| list);
    SECRET_KEYS.contains(&key)
}

/// serde's message without the value it quotes (`invalid type: string "<the key>", expected
/// a sequence`): a config error is printed at start-up and logged by a reload, and a secret
/// written with the wrong type (a key as a string instead of a list) must not land there.
fn without_value(message: &str) -> String {
    let what = message
        .split_once(':')
        .map_or("invalid value", |(what, _)| what);
    let expected = message.find(", expected").map_or("", |i| &message[i..]);
    format!("{what} (the value is a secret: not shown){expected}")
}

/// Every key with its environment variable and default, e.g. for `portcullis env-vars`.
/// `PORTCULLIS_*` environment variables that name no configuration key.
pub fn unknown_env_vars(vars: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    env::unknown_vars(vars)
}

pub fn env_keys() -> Vec<((String, String), String)> {
    env::schema_keys()
        .into_iter()
        .map(|(path, default)| {
            let d = match default {
                // An alias holds no default of its own: the key it spells does.
                _ if path == ["timeouts", "shutdown_timeout"] => {
                    "unset: another spelling of timeouts.shutdown".to_string()
                }
                serde_yaml::Value::Null => "unset".to_string(),
                v => one_line_value(&v),
            };
            ((path.join("."), env::var_name(&path)), d)
        })
        .collect()
}

/// A default as one line that its variable accepts: a scalar as YAML writes it, a list in
/// flow style (`[openid, email, profile]`), which the variables take as well as `a,b`.
fn one_line_value(v: &serde_yaml::Value) -> String {
    use serde_yaml::Value;
    let scalar = |v: &Value| match v {
        // Flow style for anything nested (JSON is YAML flow syntax): one line whatever it is.
        Value::Sequence(_) | Value::Mapping(_) | Value::Tagged(_) => {
            serde_json::to_string(v).unwrap_or_default()
        }
        v => serde_yaml::to_string(v)
            .unwrap_or_default()
            .trim()
            .to_string(),
    };
    match v {
        Value::Sequence(items) => {
            let items: Vec<String> = items.iter().map(scalar).collect();
            format!("[{}]", items.join(", "))
        }
        v => scalar(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
listen: "127.0.0.1:4180"
upstream: "http://127.0.0.1:8081"
provider:
  issuer_url: "http://127.0.0.1:9000"
  client_id: "portcullis"
  client_secret: "s"
  scopes: ["openid", "email", "profile", "offline_access"]
redirect_url: "http://127.0.0.1:4180/oauth2/callback"
cookie:
  secrets: ["AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]
  secure: false
"#;

    fn none() -> Vec<(String, String)> {
        Vec::new()
    }

    fn keys_of(r: Result<Config, ConfigErrors>) -> Vec<String> {
        r.err()
            .map(|e| e.0.into_iter().map(|e| e.key).collect())
            .unwrap_or_default()
    }

    #[test]
    fn minimal_file_works_with_defaults() {
        let c = load_str(MINIMAL, none()).unwrap();
        assert_eq!(c.cookie.name, "_portcullis");
        assert_eq!(c.session.lifetime.as_secs(), 7 * 24 * 3600);
        assert_eq!(c.public_origin, "http://127.0.0.1:4180");
        assert_eq!(
            c.post_logout_redirect_url,
            "http://127.0.0.1:4180/oauth2/signed_out"
        );
        assert_eq!(c.upstream.authority.as_str(), "127.0.0.1:8081");
    }

    #[test]
    fn post_logout_redirect_url_is_a_safe_target() {
        let with = |url: &str, domains: &str| {
            load_str(
                &format!(
                    "{MINIMAL}post_logout_redirect_url: \"{url}\"\nallowed_redirect_domains: [{domains}]\n"
                ),
                none(),
            )
        };
        let ok = |url: &str, domains: &str| with(url, domains).unwrap().post_logout_redirect_url;
        assert_eq!(ok("/bye?x=1", ""), "http://127.0.0.1:4180/bye?x=1");
        assert_eq!(
            ok("http://127.0.0.1:4180/bye", ""),
            "http://127.0.0.1:4180/bye"
        );
        assert_eq!(
            ok("https://www.example.com/bye", "\".example.com\""),
            "https://www.example.com/bye"
        );
        for bad in [
            "https://evil.example.net/x",
            "https://www.example.com.evil.net/",
            "//evil.example.net/",
            "/\\\\evil.example.net/",
            "javascript:alert(1)",
            "https://user@www.example.com/",
            "bye",
        ] {
            assert_eq!(
                keys_of(with(bad, "\".example.com\"")),
                ["post_logout_redirect_url"],
                "{bad}"
            );
        }
    }

    /// `RUST_LOG` overrides `log.level`, held to the same rules (a misspelt level would
    /// silence every line, errors included); empty, it is not set.
    #[test]
    fn rust_log_overrides_the_level_under_the_same_rules() {
        let env = |v: &str| vec![("RUST_LOG".to_string(), v.to_string())];
        let text = format!("{MINIMAL}log: {{ level: warn }}\n");
        assert_eq!(load_str(&text, none()).unwrap().log.level, "warn");
        assert_eq!(load_str(&text, env("")).unwrap().log.level, "warn");
        assert_eq!(load_str(&text, env("  ")).unwrap().log.level, "warn");
        assert_eq!(load_str(&text, env("debug")).unwrap().log.level, "debug");
        assert_eq!(
            load_str(&text, env("info,portcullis::proxy=debug"))
                .unwrap()
                .log
                .level,
            "info,portcullis::proxy=debug"
        );
        for bad in ["verbose", "information", "garbage=", "info,nonsense"] {
            let e = load_str(&text, env(bad)).unwrap_err();
            assert_eq!(keys_of(Err(e)), ["RUST_LOG"], "{bad}");
        }
    }

    #[test]
    fn identity_headers_need_names_of_their_own() {
        let with =
            |headers: &str| keys_of(load_str(&format!("{MINIMAL}headers: {headers}\n"), none()));
        assert_eq!(with("{ user: X-Request-Id }"), ["headers.request_id"]);
        assert_eq!(with("{ email: x-forwarded-user }"), ["headers.email"]);
        // Spellings a CGI-style app reads as one name are one name.
        assert_eq!(with("{ user: X_Forwarded_Email }"), ["headers.email"]);
        assert_eq!(with("{ groups: X_Forwarded_For }"), ["headers.groups"]);
        assert_eq!(with("{ groups: Content_Length }"), ["headers.groups"]);
        assert!(with("{ user: X-Auth-User, email: X-Auth-Email }").is_empty());
        let forward_auth = |names: &str| {
            keys_of(load_str(
                &format!("{MINIMAL}forward_auth: {names}\n"),
                none(),
            ))
        };
        // A forward-auth answer may carry the bearer as `Authorization` (the proxy copies it
        // onto its request), but never a `Host`, which would reroute that request.
        assert!(forward_auth("{ access_token: Authorization }").is_empty());
        assert_eq!(forward_auth("{ user: Host }"), ["forward_auth.user"]);
        assert_eq!(
            forward_auth("{ user: X-Auth, email: X_Auth }"),
            ["forward_auth.email"]
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let k = keys_of(load_str(&format!("{MINIMAL}bogus: 1\n"), none()));
        assert_eq!(k, ["bogus"]);
        let text = MINIMAL.replace("client_id:", "client_idd:");
        let e = load_str(&text, none()).unwrap_err().to_string();
        assert!(e.contains("provider") && e.contains("client_idd"), "{e}");
    }

    #[test]
    fn bad_values_are_all_reported() {
        let text = MINIMAL
            .replace("http://127.0.0.1:9000", "not a url")
            .replace(
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                "AAAAAAAAAAAAAAAAAAAAAA==",
            )
            .replace("/oauth2/callback", "/callback");
        let k = keys_of(load_str(&text, none()));
        assert_eq!(
            k,
            ["redirect_url", "provider.issuer_url", "cookie.secrets[0]"]
        );
    }

    #[test]
    fn environment_overrides_file() {
        let text = MINIMAL.replace("  client_secret: \"s\"\n", "");
        assert_eq!(keys_of(load_str(&text, none())), ["provider.client_secret"]);
        let env = vec![
            (
                "PORTCULLIS_PROVIDER_CLIENT_SECRET".to_string(),
                "12345".to_string(),
            ),
            ("PORTCULLIS_COOKIE_SECURE".to_string(), "false".to_string()),
            ("PORTCULLIS_SESSION_LIFETIME".to_string(), "1h".to_string()),
            (
                "PORTCULLIS_PROVIDER_SCOPES".to_string(),
                "openid, email".to_string(),
            ),
        ];
        let c = load_str(&text, env).unwrap();
        assert_eq!(c.provider.client_secret.expose(), "12345");
        assert_eq!(c.session.lifetime.as_secs(), 3600);
        assert_eq!(c.provider.scopes, ["openid", "email"]);
    }

    #[test]
    fn unset_by_default_keys_have_variables_too() {
        let text = MINIMAL.to_string();
        let env = vec![(
            "PORTCULLIS_LIFECYCLE_SHUTDOWN_TIMEOUT".to_string(),
            "3s".to_string(),
        )];
        let c = load_str(&text, env).unwrap();
        assert_eq!(c.timeouts.shutdown.as_secs(), 3);
        let bad = vec![(
            "PORTCULLIS_LIFECYCLE_SHUTDOWN_TIMEOUT".to_string(),
            "banana".to_string(),
        )];
        assert_eq!(
            keys_of(load_str(&text, bad)),
            ["lifecycle.shutdown_timeout"]
        );
    }

    #[test]
    fn env_var_defaults_are_one_line_and_read_back() {
        let keys = env_keys();
        for ((key, var), default) in &keys {
            assert!(!default.contains('\n'), "{var} ({key}): {default:?}");
        }
        let default_of = |key: &str| {
            keys.iter()
                .find(|((k, _), _)| k == key)
                .map(|(_, d)| d.clone())
                .unwrap()
        };
        assert_eq!(default_of("provider.scopes"), "[openid, email, profile]");
        assert_eq!(default_of("cookie.secrets"), "[]");
        assert_eq!(default_of("listen"), "127.0.0.1:4180");
        assert_eq!(default_of("lifecycle.shutdown_timeout"), "unset");
        // What is printed is what the variable takes.
        let text = MINIMAL.replace(
            "  scopes: [\"openid\", \"email\", \"profile\", \"offline_access\"]\n",
            "",
        );
        let env = vec![(
            "PORTCULLIS_PROVIDER_SCOPES".to_string(),
            default_of("provider.scopes"),
        )];
        let c = load_str(&text, env).unwrap();
        assert_eq!(c.provider.scopes, ["openid", "email", "profile"]);
    }

    #[test]
    fn misspelled_variables_are_found() {
        let vars = [
            ("PORTCULLIS_PROVIDER_CLIENT_SECRT", "x"),
            ("PORTCULLIS_PROVIDER_CLIENT_SECRET", "x"),
            ("PORTCULLIS_CONFIG", "/x"),
            ("PORTCULLIS_WORKER_THREADS", "2"),
            ("PORTCULLIS_TIMEOUTS_IDLE", "1s"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(unknown_env_vars(vars), ["PORTCULLIS_PROVIDER_CLIENT_SECRT"]);
    }

    #[test]
    fn shutdown_timeout_spellings() {
        let t = |extra: &str| {
            load_str(&format!("{MINIMAL}{extra}"), none())
                .unwrap()
                .timeouts
                .shutdown
                .as_secs()
        };
        assert_eq!(t(""), 25);
        assert_eq!(t("timeouts: { shutdown: 7s }\n"), 7);
        assert_eq!(t("timeouts: { shutdown_timeout: 8s }\n"), 8);
        assert_eq!(t("lifecycle: { shutdown_timeout: 9s }\n"), 9);
        // Top level, as issues and other gateways spell it.
        assert_eq!(t("shutdown_timeout: 10s\n"), 10);
        assert_eq!(t("shutdown_timeout: 10s\ntimeouts: { shutdown: 7s }\n"), 10);
        assert_eq!(
            t("shutdown_timeout: 11s\nlifecycle: { shutdown_timeout: 11s }\n"),
            11
        );
        // Two explicit spellings that disagree: refused, naming the key.
        let both = "shutdown_timeout: 10s\nlifecycle: { shutdown_timeout: 9s }\n";
        let e = load_str(&format!("{MINIMAL}{both}"), none()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config error: shutdown_timeout: 10s conflicts with lifecycle.shutdown_timeout \
             (9s): they are the same setting, set one"
        );
        let e = load_str(
            &format!("{MINIMAL}timeouts: {{ shutdown: 7s, shutdown_timeout: 8s }}\n"),
            none(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "config error: timeouts.shutdown_timeout: another spelling of timeouts.shutdown: set one"
        );
        assert_eq!(
            keys_of(load_str(
                &format!("{MINIMAL}shutdown_timeout: soon\n"),
                none()
            )),
            ["shutdown_timeout"]
        );
    }

    #[test]
    fn shutdown_timeout_from_the_environment() {
        let var = |v: &str| vec![("PORTCULLIS_SHUTDOWN_TIMEOUT".to_string(), v.to_string())];
        let c = load_str(
            &format!("{MINIMAL}timeouts: {{ shutdown: 7s }}\n"),
            var("3s"),
        )
        .unwrap();
        assert_eq!(c.timeouts.shutdown.as_secs(), 3);
        assert_eq!(
            keys_of(load_str(MINIMAL, var("banana"))),
            ["shutdown_timeout"]
        );
        // The variable wins over another spelling in the file (no conflict: it is not there).
        let c = load_str(
            &format!("{MINIMAL}lifecycle: {{ shutdown_timeout: 9s }}\n"),
            var("3s"),
        )
        .unwrap();
        assert_eq!(c.timeouts.shutdown.as_secs(), 3);
        // A known variable: no start-up warning, and `portcullis env-vars` lists it; so is
        // the one of the serde alias `timeouts.shutdown_timeout`.
        assert!(unknown_env_vars(var("3s")).is_empty());
        let alias = vec![(
            "PORTCULLIS_TIMEOUTS_SHUTDOWN_TIMEOUT".to_string(),
            "3s".to_string(),
        )];
        assert!(unknown_env_vars(alias.clone()).is_empty());
        assert_eq!(
            load_str(MINIMAL, alias)
                .unwrap()
                .timeouts
                .shutdown
                .as_secs(),
            3
        );
        assert!(env_keys()
            .iter()
            .any(|((k, v), _)| k == "timeouts.shutdown_timeout"
                && v == "PORTCULLIS_TIMEOUTS_SHUTDOWN_TIMEOUT"));
        assert!(env_keys().iter().any(|((k, v), d)| k == "shutdown_timeout"
            && v == "PORTCULLIS_SHUTDOWN_TIMEOUT"
            && d == "unset"));
    }

    #[test]
    fn the_environment_wins_whichever_spelling_the_file_uses() {
        let files = [
            "timeouts: { shutdown: 10s }\n",
            "timeouts: { shutdown_timeout: 10s }\n",
            "lifecycle: { shutdown_timeout: 10s }\n",
            "shutdown_timeout: 10s\n",
            "shutdown_timeout: 10s\nlifecycle: { shutdown_timeout: 10s }\ntimeouts: { shutdown: 10s }\n",
        ];
        let vars = [
            "PORTCULLIS_TIMEOUTS_SHUTDOWN",
            "PORTCULLIS_TIMEOUTS_SHUTDOWN_TIMEOUT",
            "PORTCULLIS_LIFECYCLE_SHUTDOWN_TIMEOUT",
            "PORTCULLIS_SHUTDOWN_TIMEOUT",
        ];
        for file in files {
            for var in vars {
                let env = vec![(var.to_string(), "2s".to_string())];
                let c = load_str(&format!("{MINIMAL}{file}"), env)
                    .unwrap_or_else(|e| panic!("{var} with {file:?}: {e}"));
                assert_eq!(c.timeouts.shutdown.as_secs(), 2, "{var} with {file:?}");
            }
        }
        // Two variables for one setting meet the file's rules: they must agree.
        let both = vec![
            ("PORTCULLIS_SHUTDOWN_TIMEOUT".to_string(), "2s".to_string()),
            (
                "PORTCULLIS_LIFECYCLE_SHUTDOWN_TIMEOUT".to_string(),
                "3s".to_string(),
            ),
        ];
        assert_eq!(keys_of(load_str(MINIMAL, both)), ["shutdown_timeout"]);
    }

    /// Every serde alias of the schema is one spelling of a setting the environment overlay
    /// knows, so that a variable wins over it (new aliases must be added to the list).
    #[test]
    fn every_alias_is_a_known_spelling() {
        let spellings: Vec<&str> = env::SPELLINGS
            .iter()
            .flat_map(|g| g.iter().copied())
            .collect();
        // `routes[].allow`: inside a list, which a variable sets as a whole (`PORTCULLIS_ROUTES`).
        let in_lists = ["emails", "email_domains", "groups"];
        let source = include_str!("raw.rs");
        let mut found = 0;
        for alias in source.split("alias = \"").skip(1) {
            let alias = alias.split('"').next().unwrap_or_default();
            found += 1;
            assert!(
                in_lists.contains(&alias)
                    || spellings
                        .iter()
                        .any(|s| s.rsplit('.').next() == Some(alias)),
                "serde alias `{alias}` is missing from config::env::SPELLINGS"
            );
        }
        assert!(found >= 4, "{found}");
    }

    #[test]
    fn log_level_is_a_level_or_directives_with_levels() {
        let with =
            |level: &str| load_str(&format!("{MINIMAL}log: {{ level: \"{level}\" }}\n"), none());
        for ok in [
            "info",
            "WARN",
            "off",
            "trace",
            "3",
            "info,portcullis=debug",
            "portcullis::proxy=trace",
            "access=off, info",
            "warn,portcullis[request{method=GET}]=debug",
        ] {
            assert_eq!(with(ok).unwrap().log.level, ok);
        }
        // A bare word is a target to `tracing`'s filter: everything else would go silent.
        for bad in [
            "verbose",
            "",
            " ",
            "portcullis",
            "info,verbos",
            "portcullis=verbose",
            "portcullis[span{a=b}]",
            "inf o",
        ] {
            let e = with(bad).unwrap_err();
            assert_eq!(
                e.0.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
                ["log.level"],
                "{bad:?}"
            );
            assert!(!e.to_string().contains('\n'), "{e}");
        }
        let e = with("verbose").unwrap_err().to_string();
        assert!(e.contains("`verbose`") && e.contains("debug"), "{e}");
        // The environment's value is checked the same way.
        let env = vec![("PORTCULLIS_LOG_LEVEL".to_string(), "verbose".to_string())];
        assert_eq!(keys_of(load_str(MINIMAL, env)), ["log.level"]);
    }

    #[test]
    fn a_secret_of_the_wrong_type_is_not_quoted_back() {
        let key = "gJDGcaRi/uH1koUW7MEmgnrRe/4o4uH2RZXQRJVpoUM=";
        let listed = "secrets: [\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"]";
        for (text, at) in [
            // The key as a string, not a list: the likeliest slip.
            (
                MINIMAL.replace(listed, &format!("secrets: \"{key}\"")),
                "cookie.secrets",
            ),
            (
                MINIMAL.replace(listed, "secrets: [2718281828459045]"),
                "cookie.secrets[0]",
            ),
            (
                MINIMAL.replace("client_secret: \"s\"", "client_secret: 2718281828459045"),
                "provider.client_secret",
            ),
            (
                format!("{MINIMAL}session: {{ redis: {{ password: 2718281828459045 }} }}\n"),
                "session.redis.password",
            ),
        ] {
            let e = load_str(&text, none()).unwrap_err();
            let line = e.to_string();
            assert_eq!(keys_of(Err(e)), [at], "{line}");
            assert!(
                !line.contains(key) && !line.contains("2718281828459045"),
                "{line}"
            );
            assert!(
                line.contains("invalid type") && line.contains("expected"),
                "{line}"
            );
        }
        // Other keys still say what they found.
        let e = load_str(&MINIMAL.replace("secure: false", "secure: maybe"), none()).unwrap_err();
        assert!(e.to_string().contains("maybe"), "{e}");
    }

    #[test]
    fn every_error_is_one_line() {
        let e = ConfigError::new(
            "routes[0].path",
            "regex parse error:\n    (\n    ^\r\nerror: x",
        );
        assert_eq!(
            e.to_string(),
            "config error: routes[0].path: regex parse error: ( ^ error: x"
        );
        let text = format!("{MINIMAL}routes: [ {{ path: \"/(unclosed\" }} ]\n");
        let e = load_str(&text, none()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config error: routes[0].path: invalid regex `/(unclosed`: unclosed group"
        );
        // A key with a line break in it, quoted back by the unknown-key error.
        let e = load_str(&format!("{MINIMAL}\"bad\\nkey\": 1\n"), none()).unwrap_err();
        assert_eq!(e.to_string().lines().count(), 1, "{e}");
    }

    /// What a new user writes by accident: each accepted as meant, or refused naming the key.
    #[test]
    fn accidents_of_writing_a_config() {
        let with = |extra: &str| load_str(&format!("{MINIMAL}{extra}\n"), none());
        // A byte-order mark, and YAML merge keys.
        assert!(load_str(&format!("\u{feff}{MINIMAL}"), none()).is_ok());
        let merged = with("defaults: &d { idle: 5s }\ntimeouts: { <<: *d, provider: 3s }");
        assert_eq!(
            keys_of(merged),
            ["defaults"],
            "merged, the anchor's key stays unknown"
        );
        let c = load_str(
            &format!(
                "{}timeouts: {{ <<: {{ idle: 5s }}, provider: 3s }}\n",
                MINIMAL
            ),
            none(),
        )
        .unwrap();
        assert_eq!(c.timeouts.idle.as_secs(), 5);
        // serde's type names and integer widths are not the user's words.
        for text in ["[]\n", "hello\n", "session: []\n", "routes: [[]]\n"] {
            let e = load_str(text, none()).unwrap_err().to_string();
            assert!(!e.contains("Raw") && e.contains("mapping"), "{e}");
        }
        let e = with("limits: { max_header_bytes: 99999999999999999999999 }")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the number is too large") && !e.contains("u128"),
            "{e}"
        );
        // An error in a variable's value names the variable: one the schema refuses, and one
        // validation refuses.
        for (var, value, key) in [
            ("PORTCULLIS_COOKIE_SECURE", "maybe", "cookie.secure"),
            ("PORTCULLIS_COOKIE_SAME_SITE", "bogus", "cookie.same_site"),
            ("PORTCULLIS_COOKIE_SECRETS", "abc", "cookie.secrets[0]"),
            ("PORTCULLIS_UPSTREAM", "notaurl", "upstream"),
            ("PORTCULLIS_LIMITS_MAX_HEADERS", "0", "limits.max_headers"),
            (
                "PORTCULLIS_ROUTES",
                "[{prefix: /a/, methods: []}]",
                "routes[0].methods",
            ),
        ] {
            let vars = vec![(var.to_string(), value.to_string())];
            let e = load_str(MINIMAL, vars).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{key}:")) && e.contains(&format!("(from {var})")),
                "{var}: {e}"
            );
        }
        // Not a variable's doing: no variable named.
        let vars = vec![("PORTCULLIS_COOKIE_SECURE".to_string(), "true".to_string())];
        let e = load_str(&MINIMAL.replace("8081", "x:y"), vars)
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstream:") && !e.contains("(from "), "{e}");
        // Limits with upper bounds (a slot table, a semaphore, a buffer are sized from them).
        for (extra, key) in [
            (
                "limits: { max_connections: 2305843009213693952 }",
                "limits.max_connections",
            ),
            (
                "limits: { max_headers: 18446744073709551615 }",
                "limits.max_headers",
            ),
            (
                "limits: { max_header_bytes: 4294967296 }",
                "limits.max_header_bytes",
            ),
        ] {
            assert_eq!(keys_of(with(extra)), [key], "{extra}");
        }
        let skew = MINIMAL.replace("  scopes:", "  clock_skew: 21000d\n  scopes:");
        assert_eq!(keys_of(load_str(&skew, none())), ["provider.clock_skew"]);
        let skew = MINIMAL.replace("  scopes:", "  clock_skew: 1h\n  scopes:");
        assert!(load_str(&skew, none()).is_ok());
        let jwks = MINIMAL.replace("  scopes:", "  jwks_refresh_interval: 0s\n  scopes:");
        assert_eq!(
            keys_of(load_str(&jwks, none())),
            ["provider.jwks_refresh_interval"]
        );
        let jwks = MINIMAL.replace("  scopes:", "  jwks_refresh_interval: 15m\n  scopes:");
        let cfg = load_str(&jwks, none()).unwrap();
        assert_eq!(
            cfg.provider.jwks_refresh_interval,
            std::time::Duration::from_secs(900)
        );
        // Forward-auth's names, like the forwarded ones, each need their own.
        assert_eq!(
            keys_of(with("forward_auth: { access_token: X-Auth-Request-User }")),
            ["forward_auth.access_token"]
        );
        // An empty method list would read as "no method" and match every one.
        assert_eq!(
            keys_of(with(
                "routes: [ { prefix: /pub/, methods: [], auth: skip } ]"
            )),
            ["routes[0].methods"]
        );
        assert!(with("routes: [ { prefix: /pub/, methods: [GET], auth: skip } ]").is_ok());
        // The gateway's own address as an upstream loops.
        let own = |upstream: &str, listen: &str| {
            let text = MINIMAL.replace("http://127.0.0.1:8081", upstream).replace(
                "listen: \"127.0.0.1:4180\"",
                &format!("listen: \"{listen}\""),
            );
            keys_of(load_str(&text, none()))
        };
        assert_eq!(own("http://127.0.0.1:4180", "127.0.0.1:4180"), ["upstream"]);
        assert_eq!(
            own("http://localhost:4180/app", "0.0.0.0:4180"),
            ["upstream"]
        );
        assert_eq!(own("http://[::1]:4180", "[::]:4180"), ["upstream"]);
        assert_eq!(own("http://127.0.0.1:80", "127.0.0.1:80"), ["upstream"]);
        assert!(own("http://127.0.0.2:4180", "127.0.0.1:4180").is_empty());
        assert!(own("http://127.0.0.1:4181", "127.0.0.1:4180").is_empty());
        assert!(own("http://app:4180", "0.0.0.0:4180").is_empty());
        assert_eq!(own("http://127.0.0.1:0", "127.0.0.1:4180"), ["upstream"]);
        assert_eq!(
            keys_of(with(
                "routes: [ { prefix: /x/, upstream: \"http://127.0.0.1:4180\" } ]"
            )),
            ["routes[0].upstream"]
        );
    }

    #[test]
    fn durations_are_at_most_a_century() {
        let with = |extra: &str| load_str(&format!("{MINIMAL}{extra}\n"), none());
        assert!(with("session: { lifetime: 100y }").is_ok());
        for (extra, key) in [
            (
                "session: { lifetime: 18446744073709551615s }",
                "session.lifetime",
            ),
            ("timeouts: { idle: 101y }", "timeouts.idle"),
        ] {
            let e = with(extra).unwrap_err().to_string();
            assert_eq!(e, format!("config error: {key}: is longer than 100 years"));
        }
        let e = load_str(
            MINIMAL,
            vec![("PORTCULLIS_TIMEOUTS_PROVIDER".into(), "200years".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("timeouts.provider: is longer than 100 years"),
            "{e}"
        );
    }

    #[test]
    fn a_secure_cookie_takes_the_host_prefix() {
        let secure = MINIMAL.replace("secure: false", "secure: true").replace(
            "http://127.0.0.1:4180/oauth2",
            "https://app.example.com/oauth2",
        );
        let name = |text: &str| load_str(text, none()).unwrap().cookie.name;
        assert_eq!(name(&secure), "__Host-_portcullis");
        assert_eq!(name(MINIMAL), "_portcullis", "not secure: as given");
        assert_eq!(
            name(&format!("{secure}  domain: example.com\n")),
            "__Secure-_portcullis",
            "a domain cookie cannot be __Host-"
        );
        for given in ["__Host-_portcullis", "__Secure-app"] {
            assert_eq!(name(&format!("{secure}  name: {given}\n")), given);
        }
        // A prefix browsers would not honour is refused, naming the key.
        for (text, why) in [
            (format!("{MINIMAL}  name: __Host-_portcullis\n"), "secure"),
            (
                format!("{secure}  name: __Host-x\n  domain: example.com\n"),
                "domain",
            ),
            (format!("{MINIMAL}  name: __Secure-x\n"), "secure"),
        ] {
            let e = load_str(&text, none()).unwrap_err().to_string();
            assert!(e.starts_with("config error: cookie.name: "), "{why}: {e}");
        }
    }

    #[test]
    fn secrets_never_in_debug() {
        let c = load_str(MINIMAL, none()).unwrap();
        let d = format!("{c:?}");
        assert!(
            !d.contains("AAAAAAAA") && !d.contains("client_secret: Secret(\"s\")"),
            "{d}"
        );
    }
}
