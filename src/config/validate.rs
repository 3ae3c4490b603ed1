//! Raw → typed configuration. Every problem is collected, each naming its key.

use super::raw::RawConfig;
use super::secret::{decode_cookie_key, CookieKey, Secret};
use super::{ConfigError, ConfigErrors};
use crate::flow::redirect;
use crate::proxy::headers::same_dashed;
use http::header::HeaderName;
use std::net::SocketAddr;
use std::time::Duration;
use url::Url;

/// The path prefix of the gateway's own endpoints.
pub const FLOW_PREFIX: &str = "/oauth2/";
pub const CALLBACK_PATH: &str = "/oauth2/callback";

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: UpstreamConfig,
    pub redirect_url: Url,
    /// Scheme + host (+ port) of `redirect_url`: where this gateway is reached.
    pub public_origin: String,
    pub post_logout_redirect_url: String,
    pub provider: ProviderConfig,
    pub cookie: CookieConfig,
    pub session: SessionConfig,
    pub headers: HeaderConfig,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub log: LogConfig,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`); `None` when disabled.
    pub admin_listen: Option<SocketAddr>,
    /// After SIGTERM, how long to keep accepting while readiness reports 503.
    pub shutdown_delay: Duration,
    /// Only from these are X-Forwarded-* and the original URI honoured.
    pub trusted_proxies: Vec<crate::policy::cidr::Cidr>,
    pub forward_auth: ForwardAuthConfig,
    /// Secret files this config was read from (watched for hot reload).
    pub watched_files: Vec<std::path::PathBuf>,
    pub routes: Vec<crate::policy::routes::Route>,
    pub authorization: crate::policy::routes::Authorization,
    /// Hosts (exact, or `.suffix`) that redirect targets may point to besides this one.
    pub allowed_redirect_domains: Vec<String>,
    /// Serve HTTPS: (certificate chain, key) files.
    pub tls_server: Option<(std::path::PathBuf, std::path::PathBuf)>,
    pub tls_client: TlsClient,
}

/// Outbound TLS (upstream and provider): extra roots and an optional client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsClient {
    pub ca_file: Option<std::path::PathBuf>,
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// A digest of those files' contents: a reload that finds them renewed in place (the same
    /// paths) builds new clients instead of keeping the ones that loaded the old files.
    pub contents: [u8; 32],
}

/// Response headers of `GET /oauth2/auth`.
#[derive(Debug, Clone)]
pub struct ForwardAuthConfig {
    pub user: HeaderName,
    pub email: HeaderName,
    pub groups: HeaderName,
    pub preferred_username: HeaderName,
    pub access_token: HeaderName,
    pub pass_access_token: bool,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// Path prefix without a trailing slash ("" for none).
    pub path_prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenAuthMethod {
    Auto,
    ClientSecretBasic,
    ClientSecretPost,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub issuer_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub scopes: Vec<String>,
    pub token_auth_method: TokenAuthMethod,
    pub clock_skew: Duration,
    /// How often the JWKS is fetched again (besides a token naming a key not held).
    pub jwks_refresh_interval: Duration,
    /// Revoke a signed-out session's refresh token (or access token) at the provider.
    pub revoke_on_sign_out: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

#[derive(Debug, Clone)]
pub struct CookieConfig {
    /// The name the session cookie is set under (`cookie.name`).
    pub name: String,
    pub keys: Vec<CookieKey>,
    pub secure: bool,
    pub domain: Option<String>,
    pub same_site: SameSite,
    pub flow_lifetime: Duration,
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub lifetime: Duration,
    /// Where sessions live; `None` redis means no Redis at all.
    pub store: StoreKind,
    /// The Redis used for sessions (store: redis) or coordination only.
    pub redis: Option<RedisConfig>,
    /// Refresh the access token when it expires within this.
    pub refresh_before: Duration,
    /// End sessions unused for this long (zero: never).
    pub idle_timeout: Duration,
    /// `session.redis.url` was set with `store: cookie`, which does not use it (warned about).
    pub unused_redis_url: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Cookie,
    Redis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    pub url: String,
    pub password: Option<Secret>,
    pub timeout: Duration,
    pub key_prefix: String,
    /// `tls.ca_file`'s certificates (PEM), trusted besides the system's for a `rediss://` URL.
    pub ca_pem: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserClaim {
    Sub,
    Email,
}

#[derive(Debug, Clone)]
pub struct HeaderConfig {
    pub user_claim: UserClaim,
    pub user: HeaderName,
    pub email: HeaderName,
    pub groups: HeaderName,
    pub preferred_username: HeaderName,
    pub request_id: HeaderName,
    pub pass_access_token: bool,
    /// Pass an email the provider does not say is verified (`authorization.require_email_verified:
    /// false`); otherwise it is no identity to hand the app.
    pub unverified_email: bool,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub upstream_connect: Duration,
    pub upstream_response: Duration,
    pub provider: Duration,
    pub header_read: Duration,
    pub idle: Duration,
    /// A websocket tunnel with no byte either way for this long is closed (zero: never).
    pub tunnel_idle: Duration,
    pub shutdown: Duration,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_cookie_chunks: usize,
    pub max_connections: usize,
    pub session_cache_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub json: bool,
}

impl Config {
    /// What is allowed but unsafe or unused, for start-up and `check` to say: a published
    /// example cookie key (anyone can forge sessions with it), a Redis URL nothing uses, every
    /// address as a trusted proxy.
    pub fn warnings(&self) -> Vec<String> {
        let published = self.cookie.keys.iter().any(super::secret::is_published);
        let published = published.then(|| {
            "cookie.secrets: a key is one this project published as an example: anyone can \
             forge sessions with it; generate one with `portcullis secret`"
                .to_string()
        });
        let unused_redis = self.session.unused_redis_url.then(|| {
            "session.redis.url: not used with session.store: cookie (no refresh coordination \
             across replicas, no back-channel logout); set session.store: redis to keep sessions \
             there, or session.coordination.redis_url for coordination only"
                .to_string()
        });
        let everyone_trusted = self
            .trusted_proxies
            .iter()
            .any(|c| c.is_everything())
            .then(|| {
                "trusted_proxies: a range of every address makes every client a trusted proxy: \
                 anyone can set X-Forwarded-For/Proto/Host and name the original request to \
                 forward-auth; list only the proxies in front of the gateway"
                    .to_string()
            });
        published
            .into_iter()
            .chain(unused_redis)
            .chain(everyone_trusted)
            .collect()
    }
}

struct Collector(Vec<ConfigError>);

impl Collector {
    fn err(&mut self, key: &str, msg: impl Into<String>) {
        self.0.push(ConfigError::new(key, msg));
    }
}

fn read_secret_file(c: &mut Collector, key: &str, path: &str) -> Option<String> {
    match super::read_text_bounded(std::path::Path::new(path), super::MAX_FILE_BYTES) {
        // A byte-order mark (Windows editors write one) is no part of a secret.
        Ok(s) => Some(match s.strip_prefix('\u{feff}') {
            Some(rest) => rest.to_string(),
            None => s,
        }),
        Err(e) => {
            c.err(key, format!("cannot read {path}: {e}"));
            None
        }
    }
}

/// A secret held in a file (a Kubernetes Secret mount): its text without the line break an
/// editor or `echo` adds. A file with nothing else in it holds no secret: refused here, where
/// the key can be named, rather than failing later (every login, every Redis command).
fn read_secret_value(c: &mut Collector, key: &str, path: &str) -> Option<Secret> {
    let text = read_secret_file(c, key, path)?;
    let value = text.trim_end_matches(['\r', '\n']);
    if value.trim().is_empty() {
        c.err(key, format!("{path} is empty"));
        return None;
    }
    // A second line, or a NUL, would only be found out at the first login (`invalid_client`).
    if value.chars().any(char::is_control) {
        c.err(
            key,
            format!("{path} holds a line break or a control character inside the secret; it must hold the secret alone"),
        );
        return None;
    }
    Some(Secret::new(value.to_string()))
}

fn parse_url(c: &mut Collector, key: &str, text: &str) -> Option<Url> {
    if text.is_empty() {
        c.err(key, "is required");
        return None;
    }
    match Url::parse(text) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            if !u.username().is_empty() || u.password().is_some() {
                c.err(key, "must not contain credentials");
                return None;
            }
            Some(u)
        }
        Ok(_) => {
            let text = shown(text);
            c.err(key, format!("`{text}` is not an http(s) URL with a host"));
            None
        }
        Err(e) => {
            let text = shown(text);
            c.err(key, format!("`{text}` is not a valid URL: {e}"));
            None
        }
    }
}

/// A URL as an error may quote it: credentials in it (`https://user:pass@host`) are left out,
/// whether or not the rest parses.
fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    let Some(start) = text.find("://").map(|i| i + 3) else {
        return text.into();
    };
    let authority_end = text[start..]
        .find(['/', '?', '#'])
        .map_or(text.len(), |i| start + i);
    match text[start..authority_end].rfind('@') {
        Some(at) => format!("{}…@{}", &text[..start], &text[start + at + 1..]).into(),
        None => text.into(),
    }
}

/// An upstream base URL: http(s), a host, an optional path prefix, nothing else.
pub fn parse_upstream(text: &str) -> Result<UpstreamConfig, String> {
    let u = Url::parse(text).map_err(|e| format!("`{}` is not a valid URL: {e}", shown(text)))?;
    if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
        return Err(format!(
            "`{}` is not an http(s) URL with a host",
            shown(text)
        ));
    }
    if u.query().is_some() || u.fragment().is_some() || !u.username().is_empty() {
        return Err("must not have credentials, a query or a fragment".into());
    }
    let scheme = http::uri::Scheme::try_from(u.scheme()).map_err(|e| e.to_string())?;
    let host = match u.host() {
        Some(url::Host::Ipv6(a)) => format!("[{a}]"),
        Some(h) => h.to_string(),
        None => return Err("has no host".into()),
    };
    let authority = match u.port() {
        Some(0) => return Err("port 0 is no port to connect to".into()),
        Some(p) => format!("{host}:{p}"),
        None => host,
    };
    let authority =
        http::uri::Authority::try_from(authority.as_str()).map_err(|e| e.to_string())?;
    Ok(UpstreamConfig {
        scheme,
        authority,
        path_prefix: u.path().trim_end_matches('/').to_string(),
    })
}

const MAX_HEADER_BYTES: usize = 1 << 20;
const MAX_HEADERS: usize = 10_000;
const MAX_CONNECTIONS: usize = 1 << 24;
/// More would accept ID tokens long expired, or issued in the future.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// Whether an upstream URL names `addr` (a loopback name or address for a wildcard listener).
fn is_address_of(u: &UpstreamConfig, addr: SocketAddr) -> bool {
    let default_port = if u.scheme == http::uri::Scheme::HTTPS {
        443
    } else {
        80
    };
    if u.authority.port_u16().unwrap_or(default_port) != addr.port() {
        return false;
    }
    let host = u.authority.host();
    let ip = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .ok();
    let localhost = host.eq_ignore_ascii_case("localhost");
    match ip {
        Some(ip) => ip == addr.ip() || (addr.ip().is_unspecified() && ip.is_loopback()),
        None => localhost && (addr.ip().is_unspecified() || addr.ip().is_loopback()),
    }
}

/// Names the gateway sets on the forwarded request itself (the bearer, the forwarding headers).
const SET_BY_GATEWAY: [&str; 6] = [
    "authorization",
    "proxy-authorization",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// Names that frame or route a message, or carry cookies: no header of identity may take them.
const FRAMING: [&str; 11] = [
    "host",
    "cookie",
    "set-cookie",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
];

/// An identity header's name: valid, and none that frames or routes messages or carries
/// cookies; for the forwarded request (`gateway_sets`), none the gateway sets itself either.
/// Forward-auth answers may use those: the proxy copies them onto its request (Traefik's
/// `authResponseHeaders: [Authorization]` is a known setup). Spellings that differ only in
/// punctuation (`X_Forwarded_For`) count as the same name: CGI-style apps read them as one.
fn identity_header(c: &mut Collector, key: &str, text: &str, gateway_sets: bool) -> HeaderName {
    let name = header_name(c, key, text);
    let taken = |names: &[&str]| {
        names
            .iter()
            .any(|n| same_dashed(name.as_str().as_bytes(), n.as_bytes()))
    };
    if taken(&FRAMING) {
        c.err(
            key,
            format!("`{text}` frames or routes messages or carries cookies; pick another name"),
        );
    } else if gateway_sets && taken(&SET_BY_GATEWAY) {
        c.err(
            key,
            format!("`{text}` is a header the gateway sets itself; pick another name"),
        );
    }
    name
}

/// One name, one meaning: a shared name would carry whichever value was set last (the user as
/// the request id, the access token as the user), and so would two spellings a CGI-style app
/// reads as one (`X-Forwarded-Email`, `X_Forwarded_Email`).
fn distinct_names(c: &mut Collector, named: &[(&str, &HeaderName)]) {
    for (i, (key, name)) in named.iter().enumerate() {
        let same = |other: &&(&str, &HeaderName)| {
            same_dashed(other.1.as_str().as_bytes(), name.as_str().as_bytes())
        };
        if let Some((first, _)) = named[..i].iter().find(same) {
            c.err(
                key,
                format!("`{name}` is already {first}'s name; each header needs its own"),
            );
        }
    }
}

/// Entries of `allowed_email_domains` lists: domains (a leading `@` is allowed), compared
/// exactly with the part after `@`: a leading dot could never match.
fn email_domains(c: &mut Collector, key: &str, domains: &[String]) {
    for (i, d) in domains.iter().enumerate() {
        let bare = d.trim();
        if !crate::policy::routes::is_host_name(bare.strip_prefix('@').unwrap_or(bare)) {
            c.err(
                &format!("{key}[{i}]"),
                format!(
                    "`{d}`: must be a domain like example.com (compared exactly, no leading dot)"
                ),
            );
        }
    }
}

/// Entries of `allowed_emails` lists: an address `local@domain`, compared whole (ignoring
/// case) with a verified email; one that is not an address could never match.
fn emails(c: &mut Collector, key: &str, emails: &[String]) {
    for (i, e) in emails.iter().enumerate() {
        let bare = e.trim();
        let valid = match bare.rsplit_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !local.contains('@')
                    && !local
                        .chars()
                        .any(|ch| ch.is_whitespace() || ch.is_control())
                    && crate::policy::routes::is_host_name(domain)
            }
            None => false,
        };
        if !valid {
            c.err(
                &format!("{key}[{i}]"),
                format!("`{e}`: must be an email address like alice@example.com"),
            );
        }
    }
}

fn header_name(c: &mut Collector, key: &str, text: &str) -> HeaderName {
    match HeaderName::from_bytes(text.as_bytes()) {
        // The usual names as static values: the per-request clones touch no reference count.
        Ok(name) => crate::proxy::headers::SPOOFABLE_NAMES
            .into_iter()
            .chain(["x-remote-user", "x-request-id"])
            .find(|known| *known == name.as_str())
            .map_or(name, HeaderName::from_static),
        Err(_) => {
            c.err(key, format!("`{text}` is not a valid header name"));
            HeaderName::from_static("x-invalid")
        }
    }
}

/// The drain time after SIGTERM. One setting, four spellings: `timeouts.shutdown` (or
/// `timeouts.shutdown_timeout`, a serde alias: both in one file is a duplicate key), and
/// `lifecycle.shutdown_timeout` and the top-level `shutdown_timeout`, which override it when
/// set and must agree with each other.
fn shutdown_timeout(c: &mut Collector, raw: &RawConfig) -> Duration {
    match (raw.shutdown_timeout, raw.lifecycle.shutdown_timeout) {
        (Some(top), Some(lifecycle)) if top != lifecycle => {
            c.err(
                "shutdown_timeout",
                format!(
                    "{top:?} conflicts with lifecycle.shutdown_timeout ({lifecycle:?}): \
                     they are the same setting, set one"
                ),
            );
            top
        }
        (Some(d), _) | (None, Some(d)) => d,
        (None, None) => raw.timeouts.shutdown,
    }
}

fn positive(c: &mut Collector, key: &str, d: Duration) -> Duration {
    if d.is_zero() {
        c.err(key, "must be greater than zero");
    }
    d
}

/// A top-level domain, or a second-level one that ccTLD registries sell names under
/// (`co.uk`, `com.au`, `co.jp`): not anyone's own domain. A short list, not the Public
/// Suffix List: it catches the common mistake, and the operator names their own domain.
fn is_registry_suffix(domain: &str) -> bool {
    const REGISTRY_LABELS: [&str; 18] = [
        "ac", "co", "com", "edu", "gob", "go", "gov", "ltd", "me", "mil", "ne", "net", "nhs",
        "nom", "or", "org", "plc", "sch",
    ];
    match domain.split('.').collect::<Vec<_>>()[..] {
        [_] => true,
        [second, tld] => {
            tld.len() == 2
                && tld.bytes().all(|b| b.is_ascii_alphabetic())
                && REGISTRY_LABELS.contains(&second)
        }
        _ => false,
    }
}
pub fn validate(raw: RawConfig) -> Result<Config, ConfigErrors> {
    let mut c = Collector(Vec::new());

    let listen = raw.listen.parse::<SocketAddr>().unwrap_or_else(|_| {
        c.err(
            "listen",
            format!(
                "`{}` is not an address:port like 127.0.0.1:4180",
                raw.listen
            ),
        );
        SocketAddr::from(([127, 0, 0, 1], 4180))
    });

    // The gateway's own address as its upstream would send each request round until every
    // connection slot is taken.
    let upstream_of = |text: &str| {
        parse_upstream(text).and_then(|u| match is_address_of(&u, listen) {
            true => Err(format!(
                "`{}` is the gateway's own listen address: requests would loop",
                shown(text)
            )),
            false => Ok(u),
        })
    };
    let upstream = if raw.upstream.is_empty() {
        c.err("upstream", "is required");
        None
    } else {
        upstream_of(&raw.upstream)
            .map_err(|m| c.err("upstream", m))
            .ok()
    };

    let admin_listen = if raw.admin.listen.is_empty() {
        None
    } else {
        match raw.admin.listen.parse::<SocketAddr>() {
            Ok(a) if a == listen => {
                c.err("admin.listen", "must differ from listen");
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                c.err(
                    "admin.listen",
                    format!(
                        "`{}` is not an address:port like 127.0.0.1:9090",
                        raw.admin.listen
                    ),
                );
                None
            }
        }
    };

    let redirect_url = parse_url(&mut c, "redirect_url", &raw.redirect_url);
    if let Some(u) = &redirect_url {
        if u.path() != CALLBACK_PATH {
            c.err(
                "redirect_url",
                format!(
                    "path `{}` is not served by the gateway: use `{CALLBACK_PATH}`",
                    u.path()
                ),
            );
        }
        if u.query().is_some() || u.fragment().is_some() {
            c.err("redirect_url", "must not have a query or fragment");
        }
    }
    let public_origin = redirect_url
        .as_ref()
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_default();

    // Provider
    let p = &raw.provider;
    let issuer = parse_url(&mut c, "provider.issuer_url", &p.issuer_url);
    if let Some(u) = &issuer {
        if u.query().is_some() || u.fragment().is_some() {
            c.err("provider.issuer_url", "must not have a query or fragment");
        }
    }
    if p.client_id.is_empty() {
        c.err("provider.client_id", "is required");
    }
    let client_secret = match (p.client_secret.is_empty(), p.client_secret_file.is_empty()) {
        (false, false) => {
            c.err(
                "provider.client_secret",
                "set either client_secret or client_secret_file, not both",
            );
            Secret::default()
        }
        (false, true) => Secret::new(p.client_secret.clone()),
        (true, false) => {
            read_secret_value(&mut c, "provider.client_secret_file", &p.client_secret_file)
                .unwrap_or_default()
        }
        (true, true) => {
            c.err(
                "provider.client_secret",
                "is required (or provider.client_secret_file)",
            );
            Secret::default()
        }
    };
    if !p.scopes.iter().any(|s| s == "openid") {
        c.err("provider.scopes", "must include `openid`");
    }
    if let Some(s) = p
        .scopes
        .iter()
        .find(|s| s.is_empty() || s.chars().any(|ch| ch.is_whitespace() || ch == '"'))
    {
        c.err("provider.scopes", format!("`{s}` is not a valid scope"));
    }
    if p.clock_skew > MAX_CLOCK_SKEW {
        c.err(
            "provider.clock_skew",
            "must be at most 1h: a larger skew accepts ID tokens long expired",
        );
    }
    if p.jwks_refresh_interval < Duration::from_secs(1) {
        c.err(
            "provider.jwks_refresh_interval",
            "must be at least 1s (the keys are fetched again this often)",
        );
    }
    let token_auth_method = match p.token_auth_method.as_str() {
        "auto" => TokenAuthMethod::Auto,
        "client_secret_basic" => TokenAuthMethod::ClientSecretBasic,
        "client_secret_post" => TokenAuthMethod::ClientSecretPost,
        other => {
            c.err(
                "provider.token_auth_method",
                format!("`{other}`: use auto, client_secret_basic or client_secret_post"),
            );
            TokenAuthMethod::Auto
        }
    };

    // Cookie
    let ck = &raw.cookie;
    let mut keys = Vec::new();
    for (i, s) in ck.secrets.iter().enumerate() {
        match decode_cookie_key(s) {
            Ok(k) => keys.push(k),
            Err(m) => c.err(&format!("cookie.secrets[{i}]"), m),
        }
    }
    if !ck.secrets.is_empty() && !ck.secrets_file.is_empty() {
        // Merged, the inline list (often the reference config's example key) would seal
        // while the file an operator rotates changed nothing.
        c.err(
            "cookie.secrets",
            "set either secrets or secrets_file, not both",
        );
    } else if !ck.secrets_file.is_empty() {
        if let Some(text) = read_secret_file(&mut c, "cookie.secrets_file", &ck.secrets_file) {
            let mut entries = 0;
            for (i, line) in text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .enumerate()
            {
                entries += 1;
                match decode_cookie_key(line) {
                    Ok(k) => keys.push(k),
                    Err(m) => c.err(&format!("cookie.secrets_file (entry {})", i + 1), m),
                }
            }
            // Named here: keys from cookie.secrets would otherwise hide that the file
            // meant to hold them (the one an operator rotates) is empty.
            if entries == 0 {
                c.err(
                    "cookie.secrets_file",
                    format!(
                        "{} holds no key; generate one with `portcullis secret`",
                        ck.secrets_file
                    ),
                );
            }
        }
    }
    // A published example key seals sessions anyone can forge: tolerated (with a warning) on
    // a loopback listener, for demos and trials; refused anywhere else, at start-up and on
    // reload (an example Secret applied over the real one must not take effect).
    if !listen.ip().is_loopback() && keys.iter().any(super::secret::is_published) {
        c.err(
            if ck.secrets_file.is_empty() {
                "cookie.secrets"
            } else {
                "cookie.secrets_file"
            },
            "a key is one this project published as an example: anyone could forge sessions \
             with it, so it is refused on a listener that is not loopback; generate one with \
             `portcullis secret`",
        );
    }
    if keys.is_empty() && !c.0.iter().any(|e| e.key.starts_with("cookie.secrets")) {
        c.err(
            "cookie.secrets",
            "at least one secret is required (or cookie.secrets_file); generate one with `portcullis secret`",
        );
    }
    let valid_name = !ck.name.is_empty()
        && ck
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if !valid_name {
        c.err(
            "cookie.name",
            "must be non-empty and use only letters, digits, `_`, `-`, `.`",
        );
    }
    let domain = (!ck.domain.is_empty()).then(|| ck.domain.clone());
    // Browsers refuse a cookie whose Domain does not cover the host that sets it: every login
    // would end without a session.
    if let (Some(d), Some(host)) = (&domain, redirect_url.as_ref().and_then(|u| u.host_str())) {
        let d = d.trim_start_matches('.').to_ascii_lowercase();
        if host != d && !host.ends_with(&format!(".{d}")) {
            c.err(
                "cookie.domain",
                format!("`{d}` does not cover redirect_url's host `{host}`: browsers would refuse the cookie"),
            );
        } else if host != d && is_registry_suffix(&d) {
            c.err(
                "cookie.domain",
                format!("`{d}` is a public suffix: browsers refuse a cookie for it"),
            );
        }
    }
    let same_site = match ck.same_site.to_ascii_lowercase().as_str() {
        "lax" => SameSite::Lax,
        "strict" => SameSite::Strict,
        "none" => {
            if !ck.secure {
                c.err("cookie.same_site", "`none` requires cookie.secure: true");
            }
            SameSite::None
        }
        other => {
            c.err(
                "cookie.same_site",
                format!("`{other}`: use lax, strict or none"),
            );
            SameSite::Lax
        }
    };
    // A secure cookie takes the prefix browsers give a meaning to: `__Host-` (host-only,
    // Path=/, Secure: no sibling subdomain can set or overwrite it), or `__Secure-` with a
    // `cookie.domain`. A name that already has a prefix is used as given.
    let cookie_name = match (ck.secure, &domain) {
        (true, _) if ck.name.starts_with("__") => ck.name.clone(),
        (true, None) => format!("__Host-{}", ck.name),
        (true, Some(_)) => format!("__Secure-{}", ck.name),
        (false, _) => ck.name.clone(),
    };
    if cookie_name.starts_with("__Host-") && (!ck.secure || domain.is_some()) {
        c.err(
            "cookie.name",
            "a `__Host-` cookie needs cookie.secure: true and no cookie.domain: browsers refuse it otherwise",
        );
    } else if cookie_name.starts_with("__Secure-") && !ck.secure {
        c.err(
            "cookie.name",
            "a `__Secure-` cookie needs cookie.secure: true: browsers refuse it otherwise",
        );
    }
    if let Some(u) = &redirect_url {
        if ck.secure && u.scheme() != "https" && !is_loopback(u) {
            c.err(
                "cookie.secure",
                "is true but redirect_url is not https: browsers would drop the cookie (set cookie.secure: false for plain-http setups)",
            );
        }
    }
    let flow_lifetime = positive(&mut c, "cookie.flow_lifetime", ck.flow_lifetime);
    let lifetime = positive(&mut c, "session.lifetime", raw.session.lifetime);
    let rs = &raw.session;
    let store = match rs.store.as_str() {
        "cookie" => StoreKind::Cookie,
        "redis" => StoreKind::Redis,
        other => {
            c.err("session.store", format!("`{other}`: use cookie or redis"));
            StoreKind::Cookie
        }
    };
    let redis_url = match store {
        StoreKind::Redis => {
            if rs.redis.url.is_empty() {
                c.err("session.redis.url", "is required with session.store: redis");
            }
            if !rs.coordination.redis_url.is_empty() && rs.coordination.redis_url != rs.redis.url {
                c.err(
                    "session.coordination.redis_url",
                    "not used with session.store: redis (coordination goes through session.redis.url)",
                );
            }
            rs.redis.url.clone()
        }
        StoreKind::Cookie => rs.coordination.redis_url.clone(),
    };
    let redis_key = if store == StoreKind::Redis {
        "session.redis.url"
    } else {
        "session.coordination.redis_url"
    };
    let scheme_ok = redis_url.starts_with("redis://") || redis_url.starts_with("rediss://");
    if !redis_url.is_empty() && !scheme_ok {
        c.err(redis_key, "must start with redis:// or rediss://");
    } else if !redis_url.is_empty() && url::Url::parse(&redis_url).is_err() {
        c.err(redis_key, "is not a valid URL");
    } else if !redis_url.is_empty() {
        // What the Redis client itself refuses (no host, a database that is not a number).
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(redis_url.as_str()) {
            c.err(redis_key, format!("not usable: {e}"));
        }
    }
    let redis_password = match (
        rs.redis.password.is_empty(),
        rs.redis.password_file.is_empty(),
    ) {
        (true, true) => None,
        (false, true) => Some(Secret::new(rs.redis.password.clone())),
        (true, false) => read_secret_value(
            &mut c,
            "session.redis.password_file",
            &rs.redis.password_file,
        ),
        (false, false) => {
            c.err(
                "session.redis.password",
                "set either password or password_file, not both",
            );
            None
        }
    };
    let redis_timeout = positive(&mut c, "session.redis.timeout", rs.redis.timeout);
    let mut redis = (!redis_url.is_empty()).then(|| RedisConfig {
        url: redis_url,
        password: redis_password,
        timeout: redis_timeout,
        key_prefix: rs.redis.key_prefix.clone(),
        ca_pem: None,
    });

    // Headers
    let h = &raw.headers;
    let user_claim = match h.user_claim.as_str() {
        "sub" => UserClaim::Sub,
        "email" => UserClaim::Email,
        other => {
            c.err("headers.user_claim", format!("`{other}`: use sub or email"));
            UserClaim::Sub
        }
    };
    let headers = HeaderConfig {
        user_claim,
        user: identity_header(&mut c, "headers.user", &h.user, true),
        email: identity_header(&mut c, "headers.email", &h.email, true),
        groups: identity_header(&mut c, "headers.groups", &h.groups, true),
        preferred_username: identity_header(
            &mut c,
            "headers.preferred_username",
            &h.preferred_username,
            true,
        ),
        request_id: header_name(&mut c, "headers.request_id", &h.request_id),
        pass_access_token: h.pass_access_token,
        unverified_email: !raw.authorization.require_email_verified,
    };
    distinct_names(
        &mut c,
        &[
            ("headers.user", &headers.user),
            ("headers.email", &headers.email),
            ("headers.groups", &headers.groups),
            ("headers.preferred_username", &headers.preferred_username),
            ("headers.request_id", &headers.request_id),
        ],
    );

    let mut trusted_proxies = Vec::new();
    for (i, p) in raw.trusted_proxies.iter().enumerate() {
        match crate::policy::cidr::Cidr::parse(p) {
            Ok(c) => trusted_proxies.push(c),
            Err(m) => c.err(&format!("trusted_proxies[{i}]"), m),
        }
    }
    let fa = &raw.forward_auth;
    let forward_auth = ForwardAuthConfig {
        user: identity_header(&mut c, "forward_auth.user", &fa.user, false),
        email: identity_header(&mut c, "forward_auth.email", &fa.email, false),
        groups: identity_header(&mut c, "forward_auth.groups", &fa.groups, false),
        preferred_username: identity_header(
            &mut c,
            "forward_auth.preferred_username",
            &fa.preferred_username,
            false,
        ),
        access_token: identity_header(&mut c, "forward_auth.access_token", &fa.access_token, false),
        pass_access_token: fa.pass_access_token,
    };
    distinct_names(
        &mut c,
        &[
            ("forward_auth.user", &forward_auth.user),
            ("forward_auth.email", &forward_auth.email),
            ("forward_auth.groups", &forward_auth.groups),
            (
                "forward_auth.preferred_username",
                &forward_auth.preferred_username,
            ),
            ("forward_auth.access_token", &forward_auth.access_token),
        ],
    );

    let mut routes = Vec::new();
    for (i, r) in raw.routes.iter().enumerate() {
        match crate::policy::routes::build_route(r, upstream_of) {
            Ok(route) => routes.push(route),
            Err((k, m)) => c.err(&format!("routes[{i}].{k}"), m),
        }
    }
    email_domains(
        &mut c,
        "authorization.allowed_email_domains",
        &raw.authorization.allowed_email_domains,
    );
    emails(
        &mut c,
        "authorization.allowed_emails",
        &raw.authorization.allowed_emails,
    );
    for (i, r) in raw.routes.iter().enumerate() {
        if let Some(allow) = &r.allow {
            email_domains(
                &mut c,
                &format!("routes[{i}].allow.allowed_email_domains"),
                &allow.allowed_email_domains,
            );
            emails(
                &mut c,
                &format!("routes[{i}].allow.allowed_emails"),
                &allow.allowed_emails,
            );
        }
    }
    let authorization = crate::policy::routes::build_authorization(&raw.authorization);
    if authorization.groups_claim.is_empty() {
        c.err("authorization.groups_claim", "must not be empty");
    }
    let mut allowed_redirect_domains = Vec::new();
    for (i, d) in raw.allowed_redirect_domains.iter().enumerate() {
        let d = d.trim().to_ascii_lowercase();
        let bare = d.strip_prefix('.').unwrap_or(&d);
        if d.starts_with('.') && is_registry_suffix(bare) {
            c.err(
                &format!("allowed_redirect_domains[{i}]"),
                format!(
                    "`{d}` would allow every site under a public suffix (a top-level domain, \
                     or a registry's like .co.uk); name your own domain"
                ),
            );
        } else if crate::policy::routes::is_host_name(bare) {
            allowed_redirect_domains.push(d);
        } else {
            c.err(
                &format!("allowed_redirect_domains[{i}]"),
                "must be a host name like app.example.com or .example.com",
            );
        }
    }

    // Sent to the provider as post_logout_redirect_uri, so always absolute; like every
    // redirect target, on this host or an allowed domain.
    let post_logout_redirect_url = match raw.post_logout_redirect_url.as_str() {
        "" => format!("{public_origin}/oauth2/signed_out"),
        p if redirect::safe_relative(p).is_some() => format!("{public_origin}{p}"),
        u => redirect::safe_absolute(u, &public_origin, &allowed_redirect_domains).unwrap_or_else(
            || {
                c.err(
                    "post_logout_redirect_url",
                    "must be a path on this host (like /signed-out), a URL of this gateway's \
                     origin (scheme, host and port of redirect_url) or an http(s) URL on a host \
                     in allowed_redirect_domains",
                );
                String::new()
            },
        ),
    };

    let tl = &raw.tls;
    let pair = |c: &mut Collector, a: &str, b: &str, ka: &str, kb: &str| match (
        a.is_empty(),
        b.is_empty(),
    ) {
        (true, true) => None,
        (false, false) => Some((std::path::PathBuf::from(a), std::path::PathBuf::from(b))),
        (false, true) => {
            c.err(kb, format!("is required with {ka}"));
            None
        }
        (true, false) => {
            c.err(ka, format!("is required with {kb}"));
            None
        }
    };
    let tls_server = pair(
        &mut c,
        &tl.cert_file,
        &tl.key_file,
        "tls.cert_file",
        "tls.key_file",
    );
    // Each file on its own first, so that the error names the key at fault.
    use crate::server::tls::{read_chain, read_key};
    if let Some((cert, key)) = &tls_server {
        let chain = read_chain(cert).map_err(|e| c.err("tls.cert_file", e));
        let private = read_key(key).map_err(|e| c.err("tls.key_file", e));
        if chain.is_ok() && private.is_ok() {
            if let Err(e) = crate::server::tls::load_certified_key(cert, key) {
                c.err("tls.key_file", e);
            }
        }
    }
    // The provider would send every login back over plain HTTP to the HTTPS port.
    if let (Some(_), Some(u)) = (&tls_server, &redirect_url) {
        let origin = u.origin().ascii_serialization();
        if u.scheme() == "http" && parse_upstream(&origin).is_ok_and(|o| is_address_of(&o, listen))
        {
            c.err(
                "redirect_url",
                format!(
                    "`{origin}` is plain http but the gateway serves HTTPS there (tls.cert_file): use https://"
                ),
            );
        }
    }
    let client_cert = pair(
        &mut c,
        &tl.client_cert_file,
        &tl.client_key_file,
        "tls.client_cert_file",
        "tls.client_key_file",
    );
    let tls_client = TlsClient {
        ca_file: (!tl.ca_file.is_empty()).then(|| std::path::PathBuf::from(&tl.ca_file)),
        contents: files_digest(
            [&tl.ca_file, &tl.client_cert_file, &tl.client_key_file]
                .into_iter()
                .filter(|f| !f.is_empty())
                .map(std::path::Path::new),
        ),
        client_cert,
    };
    let ca_ok = tls_client
        .ca_file
        .as_deref()
        .is_none_or(|ca| read_chain(ca).map_err(|e| c.err("tls.ca_file", e)).is_ok());
    let client_ok = tls_client.client_cert.as_ref().is_none_or(|(cert, key)| {
        let chain = read_chain(cert).map_err(|e| c.err("tls.client_cert_file", e));
        let private = read_key(key).map_err(|e| c.err("tls.client_key_file", e));
        chain.is_ok() && private.is_ok()
    });
    if ca_ok && client_ok {
        if let Err(e) = crate::server::tls::client_config(
            tls_client.ca_file.as_deref(),
            tls_client
                .client_cert
                .as_ref()
                .map(|(a, b)| (a.as_path(), b.as_path())),
        ) {
            let key = if e.contains("client certificate") {
                "tls.client_key_file"
            } else {
                "tls.ca_file"
            };
            c.err(key, e);
        }
    }

    // A private CA serves every outbound TLS connection, Redis's too (read once here, checked
    // above; a changed file makes a reload build a new Redis client).
    if let Some(rc) = redis.as_mut().filter(|r| r.url.starts_with("rediss://")) {
        rc.ca_pem = tls_client
            .ca_file
            .as_deref()
            .and_then(|p| super::read_bounded(p, super::MAX_FILE_BYTES).ok());
    }

    let t = &raw.timeouts;
    let timeouts = Timeouts {
        upstream_connect: positive(&mut c, "timeouts.upstream_connect", t.upstream_connect),
        upstream_response: positive(&mut c, "timeouts.upstream_response", t.upstream_response),
        provider: positive(&mut c, "timeouts.provider", t.provider),
        header_read: positive(&mut c, "timeouts.header_read", t.header_read),
        idle: positive(&mut c, "timeouts.idle", t.idle),
        tunnel_idle: t.tunnel_idle,
        shutdown: shutdown_timeout(&mut c, &raw),
    };
    let l = &raw.limits;
    // Upper bounds too: each is memory or a slot table sized from it.
    if !(4096..=MAX_HEADER_BYTES).contains(&l.max_header_bytes) {
        c.err(
            "limits.max_header_bytes",
            format!("must be between 4096 and {MAX_HEADER_BYTES}"),
        );
    }
    if !(1..=MAX_HEADERS).contains(&l.max_headers) {
        c.err(
            "limits.max_headers",
            format!("must be between 1 and {MAX_HEADERS}"),
        );
    }
    if !(1..=crate::session::cookie::MAX_CHUNKS).contains(&l.max_cookie_chunks) {
        c.err(
            "limits.max_cookie_chunks",
            format!(
                "must be between 1 and {}",
                crate::session::cookie::MAX_CHUNKS
            ),
        );
    }
    if !(1..=MAX_CONNECTIONS).contains(&l.max_connections) {
        c.err(
            "limits.max_connections",
            format!("must be between 1 and {MAX_CONNECTIONS}"),
        );
    }
    let log_json = match raw.log.format.as_str() {
        "text" => false,
        "json" => true,
        other => {
            c.err("log.format", format!("`{other}`: use text or json"));
            false
        }
    };
    if let Err(m) = check_log_level(&raw.log.level) {
        c.err("log.level", m);
    }

    if !c.0.is_empty() {
        return Err(ConfigErrors(c.0));
    }
    let (Some(upstream), Some(redirect_url), Some(_)) = (upstream, redirect_url, issuer) else {
        return Err(ConfigErrors(vec![ConfigError::new(
            "",
            "invalid configuration",
        )]));
    };
    Ok(Config {
        listen,
        upstream,
        redirect_url,
        public_origin,
        post_logout_redirect_url,
        provider: ProviderConfig {
            // Keep the issuer exactly as written: it must equal discovery's `issuer`.
            issuer_url: p.issuer_url.clone(),
            client_id: p.client_id.clone(),
            client_secret,
            scopes: p.scopes.clone(),
            token_auth_method,
            clock_skew: p.clock_skew,
            jwks_refresh_interval: p.jwks_refresh_interval,
            revoke_on_sign_out: p.revoke_on_sign_out,
        },
        cookie: CookieConfig {
            name: cookie_name,
            keys,
            secure: ck.secure,
            domain,
            same_site,
            flow_lifetime,
        },
        session: SessionConfig {
            lifetime,
            store,
            redis,
            refresh_before: raw.session.refresh_before,
            idle_timeout: raw.session.idle_timeout,
            unused_redis_url: store == StoreKind::Cookie
                && !raw.session.redis.url.is_empty()
                && raw.session.redis.url != raw.session.coordination.redis_url,
        },
        headers,
        timeouts,
        limits: Limits {
            max_header_bytes: l.max_header_bytes,
            max_headers: l.max_headers,
            max_cookie_chunks: l.max_cookie_chunks,
            max_connections: l.max_connections,
            session_cache_bytes: l.session_cache_bytes,
        },
        log: LogConfig {
            level: raw.log.level.clone(),
            json: log_json,
        },
        admin_listen,
        shutdown_delay: raw.lifecycle.shutdown_delay,
        trusted_proxies,
        forward_auth,
        watched_files: secret_files(&raw),
        routes,
        authorization,
        allowed_redirect_domains,
        tls_server,
        tls_client,
    })
}

/// A digest of the named files and their contents (a file that cannot be read counts as
/// missing): what tells a reload that files were renewed in place.
pub fn files_digest<'a>(files: impl IntoIterator<Item = &'a std::path::Path>) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in files {
        h.update(f.as_os_str().as_encoded_bytes());
        match super::read_bounded(f, super::MAX_FILE_BYTES) {
            Ok(bytes) => h.update(&bytes),
            Err(_) => h.update(b"\0missing"),
        }
    }
    h.finalize().into()
}

/// The secret files a config names (watched for hot reload): the provider's, the cookie
/// keys, Redis' password and the outbound TLS files (the server certificate and key have a
/// watch of their own).
pub(super) fn secret_files(raw: &RawConfig) -> Vec<std::path::PathBuf> {
    [
        &raw.provider.client_secret_file,
        &raw.cookie.secrets_file,
        &raw.session.redis.password_file,
        &raw.tls.ca_file,
        &raw.tls.client_cert_file,
        &raw.tls.client_key_file,
    ]
    .into_iter()
    .filter(|f| !f.is_empty())
    .map(std::path::PathBuf::from)
    .collect()
}

/// `log.level`: a level, or filter directives (comma separated) that each end in a level
/// (`target=level`, `target[span{field=value}]=level`). `tracing`'s filter would take a bare
/// word as a target to enable: a misspelt level (`verbose`) would silence every other log line,
/// the access log included.
pub(crate) fn check_log_level(level: &str) -> Result<(), String> {
    use std::str::FromStr;
    use tracing::level_filters::LevelFilter;
    const LEVELS: &str = "off, error, warn, info, debug, trace";
    let is_level = |s: &str| !s.is_empty() && LevelFilter::from_str(s).is_ok();
    if level.trim().is_empty() {
        return Err(format!("is empty: use a level ({LEVELS}) or a filter"));
    }
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if is_level(directive) {
            continue;
        }
        match directive.rsplit_once('=') {
            Some((_, l)) if is_level(l.trim()) => {}
            _ if level.contains(['=', ',']) => {
                return Err(format!(
                    "`{directive}` in `{level}` is neither a level ({LEVELS}) nor a \
                     `target=level` directive"
                ))
            }
            _ => {
                return Err(format!(
                    "`{level}` is not a level ({LEVELS}) or a filter like \
                     `info,portcullis=debug`"
                ))
            }
        }
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(drop)
        .map_err(|e| format!("`{level}` is not a valid filter: {e}"))
}

fn is_loopback(u: &Url) -> bool {
    match u.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        None => false,
    }
}
