//! Serde mirror of the YAML file. Every struct denies unknown keys so a typo fails fast;
//! every field has a default so the minimal file works as written.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Durations as `humantime` writes them (`10s`, `7d`), at most a century: a longer one is a
/// typo, and would overflow a cookie's `Max-Age` and the token checks' clock arithmetic.
mod duration {
    use serde::{de::Error, Deserialize, Deserializer, Serialize, Serializer};
    use std::time::Duration;

    const LONGEST: Duration = Duration::from_secs(100 * 366 * 24 * 3600);

    pub trait Longest {
        fn longest(&self) -> Duration;
    }
    impl Longest for Duration {
        fn longest(&self) -> Duration {
            *self
        }
    }
    impl Longest for Option<Duration> {
        fn longest(&self) -> Duration {
            self.unwrap_or_default()
        }
    }

    pub fn serialize<T, S: Serializer>(d: &T, s: S) -> Result<S::Ok, S::Error>
    where
        for<'a> humantime_serde::Serde<&'a T>: Serialize,
    {
        humantime_serde::serialize(d, s)
    }

    pub fn deserialize<'de, T: Longest, D: Deserializer<'de>>(d: D) -> Result<T, D::Error>
    where
        humantime_serde::Serde<T>: Deserialize<'de>,
    {
        let v: T = humantime_serde::deserialize(d)?;
        if v.longest() > LONGEST {
            return Err(D::Error::custom("is longer than 100 years"));
        }
        Ok(v)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub listen: String,
    pub upstream: String,
    pub redirect_url: String,
    pub provider: RawProvider,
    pub cookie: RawCookie,
    pub session: RawSession,
    pub headers: RawHeaders,
    pub timeouts: RawTimeouts,
    pub limits: RawLimits,
    pub post_logout_redirect_url: String,
    pub log: RawLog,
    pub admin: RawAdmin,
    pub lifecycle: RawLifecycle,
    /// The drain time, as `timeouts.shutdown` (which it overrides when set); also
    /// `PORTCULLIS_SHUTDOWN_TIMEOUT`. Must agree with `lifecycle.shutdown_timeout` if both are set.
    #[serde(with = "duration")]
    pub shutdown_timeout: Option<Duration>,
    pub trusted_proxies: Vec<String>,
    pub forward_auth: RawForwardAuth,
    pub routes: Vec<RawRoute>,
    pub authorization: RawAuthorization,
    pub allowed_redirect_domains: Vec<String>,
    pub tls: RawTls,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTls {
    /// Serve HTTPS with this certificate chain and key (PEM); reloaded when they change.
    pub cert_file: String,
    pub key_file: String,
    /// Extra CA certificates (PEM) trusted for https upstreams and the provider.
    pub ca_file: String,
    /// Client certificate and key (PEM) presented to https upstreams (mTLS).
    pub client_cert_file: String,
    pub client_key_file: String,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:4180".into(),
            upstream: String::new(),
            redirect_url: String::new(),
            provider: RawProvider::default(),
            cookie: RawCookie::default(),
            session: RawSession::default(),
            headers: RawHeaders::default(),
            timeouts: RawTimeouts::default(),
            limits: RawLimits::default(),
            post_logout_redirect_url: String::new(),
            log: RawLog::default(),
            admin: RawAdmin::default(),
            lifecycle: RawLifecycle::default(),
            shutdown_timeout: None,
            trusted_proxies: Vec::new(),
            forward_auth: RawForwardAuth::default(),
            routes: Vec::new(),
            authorization: RawAuthorization::default(),
            allowed_redirect_domains: Vec::new(),
            tls: RawTls::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawProvider {
    pub issuer_url: String,
    pub client_id: String,
    pub client_secret: String,
    pub client_secret_file: String,
    pub scopes: Vec<String>,
    /// `auto` (from discovery), `client_secret_basic` or `client_secret_post`.
    pub token_auth_method: String,
    #[serde(with = "duration")]
    pub clock_skew: Duration,
    /// How often the provider's JWKS is fetched again, so that a key it removed stops being
    /// trusted without a restart.
    #[serde(with = "duration")]
    pub jwks_refresh_interval: Duration,
    /// On sign-out, revoke the session's refresh token at the provider's
    /// `revocation_endpoint` (RFC 7009), when discovery names one.
    pub revoke_on_sign_out: bool,
}

impl Default for RawProvider {
    fn default() -> Self {
        Self {
            issuer_url: String::new(),
            client_id: String::new(),
            client_secret: String::new(),
            client_secret_file: String::new(),
            scopes: vec!["openid".into(), "email".into(), "profile".into()],
            token_auth_method: "auto".into(),
            clock_skew: Duration::from_secs(60),
            jwks_refresh_interval: Duration::from_secs(3600),
            revoke_on_sign_out: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCookie {
    pub name: String,
    pub secrets: Vec<String>,
    pub secrets_file: String,
    pub secure: bool,
    pub domain: String,
    pub same_site: String,
    #[serde(with = "duration")]
    pub flow_lifetime: Duration,
}

impl Default for RawCookie {
    fn default() -> Self {
        Self {
            name: "_portcullis".into(),
            secrets: Vec::new(),
            secrets_file: String::new(),
            secure: true,
            domain: String::new(),
            same_site: "lax".into(),
            flow_lifetime: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSession {
    #[serde(with = "duration")]
    pub lifetime: Duration,
    #[serde(with = "duration")]
    pub refresh_before: Duration,
    /// End sessions unused for this long (0: no idle timeout).
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// `cookie` (the session lives in the cookie) or `redis` (the cookie holds only an id).
    pub store: String,
    pub redis: RawRedis,
    pub coordination: RawCoordination,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    /// `redis://host:port/db` or `rediss://` (TLS).
    pub url: String,
    pub password: String,
    pub password_file: String,
    /// Every Redis call gives up after this.
    #[serde(with = "duration")]
    pub timeout: Duration,
    pub key_prefix: String,
}

impl Default for RawRedis {
    fn default() -> Self {
        Self {
            url: String::new(),
            password: String::new(),
            password_file: String::new(),
            timeout: Duration::from_secs(1),
            key_prefix: "portcullis:".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCoordination {
    /// Cookie-store deployments: a Redis used only to coordinate refreshes across replicas
    /// and to share back-channel logouts. Uses session.redis's password, timeout and prefix.
    pub redis_url: String,
}

impl Default for RawSession {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(7 * 24 * 3600),
            refresh_before: Duration::from_secs(60),
            idle_timeout: Duration::ZERO,
            store: "cookie".into(),
            redis: RawRedis::default(),
            coordination: RawCoordination::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHeaders {
    /// Claim sent as the user header: `sub` or `email`.
    pub user_claim: String,
    pub user: String,
    pub email: String,
    pub groups: String,
    pub preferred_username: String,
    pub request_id: String,
    pub pass_access_token: bool,
}

impl Default for RawHeaders {
    fn default() -> Self {
        Self {
            user_claim: "sub".into(),
            user: "X-Forwarded-User".into(),
            email: "X-Forwarded-Email".into(),
            groups: "X-Forwarded-Groups".into(),
            preferred_username: "X-Forwarded-Preferred-Username".into(),
            request_id: "X-Request-Id".into(),
            pass_access_token: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTimeouts {
    #[serde(with = "duration")]
    pub upstream_connect: Duration,
    #[serde(with = "duration")]
    pub upstream_response: Duration,
    #[serde(with = "duration")]
    pub provider: Duration,
    #[serde(with = "duration")]
    pub header_read: Duration,
    #[serde(with = "duration")]
    pub idle: Duration,
    #[serde(with = "duration")]
    pub tunnel_idle: Duration,
    #[serde(with = "duration")]
    #[serde(alias = "shutdown_timeout")]
    pub shutdown: Duration,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        Self {
            upstream_connect: Duration::from_secs(5),
            upstream_response: Duration::from_secs(60),
            provider: Duration::from_secs(10),
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(90),
            tunnel_idle: Duration::from_secs(3600),
            shutdown: Duration::from_secs(25),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_cookie_chunks: usize,
    pub max_connections: usize,
    /// Memory for sessions decoded from recently seen cookies (0: decode every request).
    pub session_cache_bytes: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_cookie_chunks: 8,
            max_connections: 10_000,
            session_cache_bytes: 32 << 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub level: String,
    pub format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    /// `/metrics`, `/healthz`, `/readyz`; empty disables the admin listener.
    pub listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: super::DEFAULT_ADMIN_LISTEN.to_string(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLifecycle {
    /// After SIGTERM: readiness fails at once, the listener keeps accepting this long.
    #[serde(with = "duration")]
    pub shutdown_delay: Duration,
    /// The drain time (same as `timeouts.shutdown`, which it overrides when set; must agree
    /// with the top-level `shutdown_timeout` if both are set).
    #[serde(with = "duration")]
    pub shutdown_timeout: Option<Duration>,
}

impl Default for RawLifecycle {
    fn default() -> Self {
        Self {
            shutdown_delay: Duration::from_secs(5),
            shutdown_timeout: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawForwardAuth {
    pub user: String,
    pub email: String,
    pub groups: String,
    pub preferred_username: String,
    pub access_token: String,
    pub pass_access_token: bool,
}

impl Default for RawForwardAuth {
    fn default() -> Self {
        Self {
            user: "X-Auth-Request-User".into(),
            email: "X-Auth-Request-Email".into(),
            groups: "X-Auth-Request-Groups".into(),
            preferred_username: "X-Auth-Request-Preferred-Username".into(),
            access_token: "X-Auth-Request-Access-Token".into(),
            pass_access_token: true,
        }
    }
}

/// One entry of `routes` (ordered; the first match wins).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRoute {
    /// Regular expression, anchored at the start of the normalised path.
    pub path: Option<String>,
    /// Literal prefix of the normalised path.
    pub prefix: Option<String>,
    /// Left out: every method. An empty list is refused (it reads as "none").
    pub methods: Option<Vec<String>>,
    pub host: Option<String>,
    /// skip | api | login
    pub auth: Option<String>,
    pub upstream: Option<String>,
    pub allow: Option<RawAllow>,
    pub timeouts: Option<RawRouteTimeouts>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRouteTimeouts {
    #[serde(with = "duration")]
    pub upstream_response: Option<Duration>,
    /// For connections opened for this route's requests (to its upstream, or the main one).
    #[serde(with = "duration")]
    pub upstream_connect: Option<Duration>,
}

/// Who may pass: any match of any list (all empty: every authenticated user).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAllow {
    #[serde(alias = "emails")]
    pub allowed_emails: Vec<String>,
    #[serde(alias = "email_domains")]
    pub allowed_email_domains: Vec<String>,
    #[serde(alias = "groups")]
    pub allowed_groups: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuthorization {
    pub allowed_emails: Vec<String>,
    pub allowed_email_domains: Vec<String>,
    pub allowed_groups: Vec<String>,
    pub groups_claim: String,
    pub require_email_verified: bool,
}

impl Default for RawAuthorization {
    fn default() -> Self {
        Self {
            allowed_emails: Vec::new(),
            allowed_email_domains: Vec::new(),
            allowed_groups: Vec::new(),
            groups_claim: "groups".into(),
            require_email_verified: true,
        }
    }
}
