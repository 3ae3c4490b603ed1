//! The OpenID provider as the gateway sees it: discovery, JWKS, the authorization URL,
//! code exchange and refresh (through the `oauth2` crate over our hyper client).

pub mod http;
pub mod idtoken;
pub mod jwks;
pub mod logout;
pub mod revoke;

use self::http::{ProviderHttp, ProviderHttpError};
use self::idtoken::{Expectations, IdTokenError, ValidIdToken};
use self::jwks::{KeySet, RefetchLimit};
use crate::config::{Config, TokenAuthMethod};
use arc_swap::{ArcSwap, ArcSwapOption};
use oauth2::basic::{
    BasicErrorResponse, BasicErrorResponseType, BasicRevocationErrorResponse,
    BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AccessToken, AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken,
    EndpointNotSet, EndpointSet, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken,
    RequestTokenError, Scope, StandardRevocableToken, TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The discovery document fields the gateway uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub userinfo_endpoint: Option<String>,
    #[serde(default)]
    pub end_session_endpoint: Option<String>,
    /// RFC 7009 token revocation (RFC 8414 metadata; OpenID providers list it too).
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub token_endpoint_auth_methods_supported: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub backchannel_logout_supported: bool,
    /// RFC 9207: the provider names itself (`iss`) in every authorization response.
    #[serde(default, deserialize_with = "null_as_default")]
    pub authorization_response_iss_parameter_supported: bool,
}

/// An optional metadata value stated as `null` reads as left out (as the `Option` fields do):
/// one such field would otherwise keep the gateway from ever becoming ready.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A token endpoint answer (RFC 6749 §5.1, with the OpenID Connect ID token), read as
/// providers send it: `token_type` in any case, and `expires_in` as a number or a numeric
/// string (Azure AD's v1.0 endpoint), fractions dropped; any other `expires_in` (negative,
/// not a number) counts as not stated instead of failing the login.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResp {
    access_token: AccessToken,
    #[serde(deserialize_with = "token_type", serialize_with = "token_type_name")]
    token_type: BasicTokenType,
    #[serde(
        default,
        deserialize_with = "lenient_seconds",
        skip_serializing_if = "Option::is_none"
    )]
    expires_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<RefreshToken>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id_token: Option<String>,
}

fn token_type<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BasicTokenType, D::Error> {
    let name = String::deserialize(d)?;
    Ok(match name.to_ascii_lowercase().as_str() {
        "bearer" => BasicTokenType::Bearer,
        "mac" => BasicTokenType::Mac,
        _ => BasicTokenType::Extension(name),
    })
}

fn token_type_name<S: serde::Serializer>(t: &BasicTokenType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t.as_ref())
}

fn lenient_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    let secs = match &v {
        serde_json::Value::Number(n) => idtoken::whole_seconds(n),
        serde_json::Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    Ok(secs)
}

impl TokenResponse for TokenResp {
    type TokenType = BasicTokenType;
    fn access_token(&self) -> &AccessToken {
        &self.access_token
    }
    fn token_type(&self) -> &BasicTokenType {
        &self.token_type
    }
    fn expires_in(&self) -> Option<Duration> {
        self.expires_in.map(Duration::from_secs)
    }
    fn refresh_token(&self) -> Option<&RefreshToken> {
        self.refresh_token.as_ref()
    }
    fn scopes(&self) -> Option<&Vec<Scope>> {
        None
    }
}
type OAuthClient = oauth2::Client<
    BasicErrorResponse,
    TokenResp,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// Whether the gateway can use a token response's access token: of `token_type` Bearer
/// (RFC 6749 §7.1, compared case-insensitively; a MAC or other token sent as a bearer would
/// not authenticate) and sendable as `Authorization: Bearer <token>` (not empty, no line
/// breaks or control characters). Otherwise a session would forward requests without the
/// bearer, or with a wrong one: refused at the callback, a failed refresh on refresh.
fn usable_access_token(resp: &TokenResp) -> Result<(), ProviderError> {
    if *resp.token_type() != BasicTokenType::Bearer {
        return Err(ProviderError::Invalid(format!(
            "token_type `{}` is not Bearer",
            resp.token_type().as_ref()
        )));
    }
    let token = resp.access_token().secret();
    if token.is_empty() || !token.bytes().all(bearer_char) {
        return Err(ProviderError::Invalid(
            "access_token is empty or cannot be sent in an Authorization header".into(),
        ));
    }
    Ok(())
}

/// A character a bearer token may hold: visible ASCII, as RFC 6750's `b64token` and the
/// tokens providers issue beyond it (Salesforce's `!`), but for a comma, quote or backslash,
/// which an app's HTTP parser may take apart. A space would split the credential, and other
/// bytes reach the app as whatever its parser makes of them.
fn bearer_char(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b',' | b'"' | b'\\')
}

/// A token endpoint answer, validated.
#[derive(Clone)]
pub struct Tokens {
    pub access_token: String,
    /// Seconds until the access token expires, when the provider said.
    pub expires_in: Option<Duration>,
    pub refresh_token: Option<String>,
    pub id_token: Option<String>,
    pub id: Option<ValidIdToken>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("provider not discovered yet")]
    NotReady,
    #[error(transparent)]
    Http(#[from] ProviderHttpError),
    #[error("provider returned HTTP {0}")]
    Status(u16),
    #[error("invalid provider response: {0}")]
    Invalid(String),
    /// The grant (code or refresh token) was refused: used, expired or revoked.
    #[error("grant refused by the provider: {0}")]
    InvalidGrant(String),
    #[error("token endpoint error: {0}")]
    TokenError(String),
    /// The token endpoint answered with no OAuth answer (a maintenance or WAF page, a 404, an
    /// empty body): whatever stands in front of the provider, not the provider's word.
    #[error("no OAuth answer from the token endpoint: {0}")]
    NoOAuthAnswer(String),
    #[error(transparent)]
    IdToken(#[from] IdTokenError),
    #[error(transparent)]
    LogoutToken(#[from] logout::LogoutTokenError),
}

/// The `error` member of a JSON object, if the body is one that names an error code: a
/// token endpoint's refusal whatever status it came with.
fn error_code(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Refusal {
        error: String,
    }
    serde_json::from_slice::<Refusal>(body)
        .ok()
        .map(|r| r.error)
        .filter(|e| !e.is_empty() && e.len() <= 64 && e.bytes().all(|b| b.is_ascii_graphic()))
}

/// The ID token's signing key is not known and could not be fetched (the JWKS re-fetch
/// failed, or was not due yet).
fn key_not_available(e: &ProviderError) -> bool {
    e.is_unavailable() || matches!(e, ProviderError::IdToken(IdTokenError::UnknownKey(_)))
}

impl ProviderError {
    /// True when the provider itself failed (unreachable, 5xx, 429): the user did nothing wrong.
    pub fn is_unavailable(&self) -> bool {
        match self {
            ProviderError::NotReady
            | ProviderError::Http(_)
            | ProviderError::NoOAuthAnswer(_)
            | ProviderError::Status(429 | 500..=599) => true,
            // RFC 6749 error codes a provider sends when it cannot serve the request now.
            ProviderError::TokenError(code) => {
                matches!(code.as_str(), "server_error" | "temporarily_unavailable")
            }
            _ => false,
        }
    }
}

struct Discovered {
    meta: Metadata,
    client: OAuthClient,
    use_post: AtomicBool,
}

pub struct Provider {
    issuer: String,
    client_id: String,
    client_secret: String,
    redirect_url: String,
    scopes: Vec<Scope>,
    auth_method: TokenAuthMethod,
    clock_skew: Duration,
    jwks_refresh_interval: Duration,
    groups_claim: String,
    http: ProviderHttp,
    discovered: ArcSwapOption<Discovered>,
    keys: ArcSwap<KeySet>,
    /// Held while a forced (unknown-`kid`) JWKS re-fetch runs: concurrent callers wait for it
    /// and then use its keys.
    jwks_refetch: tokio::sync::Mutex<RefetchLimit>,
    /// Logout tokens have a budget of their own: anyone can post one, and an unknown `kid`
    /// in them must not use up the re-fetch that a login's new signing key needs.
    logout_jwks_refetch: tokio::sync::Mutex<RefetchLimit>,
}

/// Every endpoint is an `http(s)` URL (browsers are sent to some: a `javascript:` one would
/// run in the app's page), and an `https` issuer's endpoints must be `https` too: one over
/// plain http would carry the client secret, codes and tokens in clear, and serve signing
/// keys anyone on the path could replace. (Another origin is allowed: Google's token and key
/// endpoints are not on its issuer's host.)
fn endpoints_fit_issuer(issuer: &str, meta: &Metadata) -> Result<(), ProviderError> {
    let scheme = |u: &str| url::Url::parse(u).map(|u| u.scheme().to_owned());
    let https_only = scheme(issuer).is_ok_and(|s| s == "https");
    let endpoints = [
        ("authorization_endpoint", Some(&meta.authorization_endpoint)),
        ("token_endpoint", Some(&meta.token_endpoint)),
        ("jwks_uri", Some(&meta.jwks_uri)),
        ("userinfo_endpoint", meta.userinfo_endpoint.as_ref()),
        ("end_session_endpoint", meta.end_session_endpoint.as_ref()),
        ("revocation_endpoint", meta.revocation_endpoint.as_ref()),
    ];
    for (key, url) in endpoints {
        let Some(url) = url else { continue };
        match scheme(url).as_deref() {
            Ok("https") => {}
            Ok("http") if !https_only => {}
            Ok("http") => {
                return Err(ProviderError::Invalid(format!(
                    "discovery document: {key} `{url}` is not https, as provider.issuer_url is"
                )))
            }
            _ => {
                return Err(ProviderError::Invalid(format!(
                    "discovery document: {key} `{url}` is not an http(s) URL"
                )))
            }
        }
    }
    Ok(())
}

fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

impl Provider {
    pub fn new(cfg: &Config, http: ProviderHttp) -> Self {
        Self {
            issuer: cfg.provider.issuer_url.clone(),
            client_id: cfg.provider.client_id.clone(),
            client_secret: cfg.provider.client_secret.expose().to_string(),
            redirect_url: cfg.redirect_url.to_string(),
            scopes: cfg
                .provider
                .scopes
                .iter()
                .cloned()
                .map(Scope::new)
                .collect(),
            auth_method: cfg.provider.token_auth_method,
            clock_skew: cfg.provider.clock_skew,
            jwks_refresh_interval: cfg.provider.jwks_refresh_interval,
            groups_claim: cfg.authorization.groups_claim.clone(),
            http,
            discovered: ArcSwapOption::empty(),
            keys: ArcSwap::from_pointee(KeySet::default()),
            jwks_refetch: tokio::sync::Mutex::new(RefetchLimit::default()),
            logout_jwks_refetch: tokio::sync::Mutex::new(RefetchLimit::default()),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.discovered.load().is_some() && !self.keys.load().is_empty()
    }

    pub fn metadata(&self) -> Option<Metadata> {
        self.discovered.load().as_ref().map(|d| d.meta.clone())
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Fetches discovery and JWKS once.
    pub async fn discover(&self) -> Result<(), ProviderError> {
        let resp = self
            .http
            .get(
                &discovery_url(&self.issuer),
                self::http::Endpoint::Discovery,
            )
            .await?;
        if !resp.status().is_success() {
            return Err(ProviderError::Status(resp.status().as_u16()));
        }
        let meta: Metadata = serde_json::from_slice(resp.body())
            .map_err(|e| ProviderError::Invalid(format!("discovery document: {e}")))?;
        if meta.issuer != self.issuer {
            return Err(ProviderError::Invalid(format!(
                "discovery issuer `{}` differs from provider.issuer_url `{}` (they must match exactly)",
                meta.issuer, self.issuer
            )));
        }
        endpoints_fit_issuer(&self.issuer, &meta)?;
        let discovered = self.discovered_from(meta, None)?;
        self.fetch_jwks(&discovered.meta.jwks_uri).await?;
        self.discovered.store(Some(Arc::new(discovered)));
        Ok(())
    }

    /// After a config reload: take over what the previous provider already discovered when
    /// it is the same provider (the client secret may have changed). True if ready now.
    pub fn adopt(&self, old: &Provider) -> bool {
        if old.issuer != self.issuer {
            return false;
        }
        let Some(prev) = old.discovered.load_full() else {
            return false;
        };
        let learned_post =
            self.auth_method == old.auth_method && prev.use_post.load(Ordering::Relaxed);
        match self.discovered_from(prev.meta.clone(), Some(learned_post)) {
            Ok(d) => {
                self.keys.store(old.keys.load_full());
                self.discovered.store(Some(Arc::new(d)));
                self.is_ready()
            }
            Err(_) => false,
        }
    }

    fn discovered_from(
        &self,
        meta: Metadata,
        use_post: Option<bool>,
    ) -> Result<Discovered, ProviderError> {
        let use_post = use_post.unwrap_or(false)
            || match self.auth_method {
                TokenAuthMethod::ClientSecretBasic => false,
                TokenAuthMethod::ClientSecretPost => true,
                TokenAuthMethod::Auto => {
                    let m = &meta.token_endpoint_auth_methods_supported;
                    !m.is_empty()
                        && !m.iter().any(|x| x == "client_secret_basic")
                        && m.iter().any(|x| x == "client_secret_post")
                }
            };
        let bad = |k: &str, e: url::ParseError| ProviderError::Invalid(format!("{k}: {e}"));
        let client = oauth2::Client::new(ClientId::new(self.client_id.clone()))
            .set_client_secret(ClientSecret::new(self.client_secret.clone()))
            .set_auth_uri(
                AuthUrl::new(meta.authorization_endpoint.clone())
                    .map_err(|e| bad("authorization_endpoint", e))?,
            )
            .set_token_uri(
                TokenUrl::new(meta.token_endpoint.clone()).map_err(|e| bad("token_endpoint", e))?,
            )
            .set_redirect_uri(
                RedirectUrl::new(self.redirect_url.clone()).map_err(|e| bad("redirect_url", e))?,
            );
        Ok(Discovered {
            meta,
            client,
            use_post: AtomicBool::new(use_post),
        })
    }

    /// Discovery with exponential backoff until it succeeds (the gateway is not ready until
    /// then), or until the config generation this provider belongs to is gone: a reload swaps
    /// in a provider of its own, and the old one's retries (perhaps of an issuer no longer
    /// configured) must stop rather than go on warning, and piling up, forever.
    pub async fn discover_until_ready(self: Arc<Self>) {
        let provider = Arc::downgrade(&self);
        drop(self);
        let mut delay = Duration::from_millis(250);
        while let Some(p) = provider.upgrade() {
            match p.discover().await {
                Ok(()) => {
                    tracing::info!(issuer = %p.issuer, "provider discovered");
                    return;
                }
                Err(e) => {
                    tracing::warn!(issuer = %p.issuer, error = e.to_string().as_str(), retry_in = ?delay, "provider discovery failed");
                }
            }
            // Not held while waiting: that is when a reload lets it go.
            drop(p);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }

    /// Fetches the JWKS again every `provider.jwks_refresh_interval`, so that a key the
    /// provider removed stops being trusted (and one it added is held before a token names
    /// it), until the config generation this provider belongs to is gone. A failed fetch keeps
    /// the keys: tokens signed with them still validate while the provider is down.
    pub async fn keep_keys_fresh(self: Arc<Self>) {
        let interval = self.jwks_refresh_interval;
        let provider = Arc::downgrade(&self);
        drop(self);
        loop {
            tokio::time::sleep(interval).await;
            let Some(p) = provider.upgrade() else {
                return;
            };
            // Not discovered yet: discovery fetches the keys.
            let Ok(d) = p.discovered() else {
                continue;
            };
            match p.fetch_jwks(&d.meta.jwks_uri).await {
                Ok(()) => tracing::debug!(keys = p.keys.load().len(), "provider JWKS refreshed"),
                Err(e) => {
                    tracing::warn!(
                        error = e.to_string().as_str(),
                        "provider JWKS refresh failed; the keys held are kept"
                    )
                }
            }
        }
    }

    async fn fetch_jwks(&self, uri: &str) -> Result<(), ProviderError> {
        let resp = self.http.get(uri, self::http::Endpoint::Jwks).await?;
        if !resp.status().is_success() {
            return Err(ProviderError::Status(resp.status().as_u16()));
        }
        let set = KeySet::parse(resp.body()).map_err(ProviderError::Invalid)?;
        if set.is_empty() {
            return Err(ProviderError::Invalid(
                "JWKS has no usable signing key".into(),
            ));
        }
        self.keys.store(Arc::new(set));
        Ok(())
    }

    /// RFC 9207 (mix-up defence): an authorization response's `iss` must be this provider's
    /// issuer, and must be there when the provider says it always sends it.
    pub fn accepts_response_issuer(&self, iss: Option<&str>) -> bool {
        match iss {
            Some(iss) => iss == self.issuer,
            None => self
                .discovered
                .load()
                .as_ref()
                .is_none_or(|d| !d.meta.authorization_response_iss_parameter_supported),
        }
    }

    fn discovered(&self) -> Result<Arc<Discovered>, ProviderError> {
        self.discovered.load_full().ok_or(ProviderError::NotReady)
    }

    /// The authorization URL for a new login: code flow with state, nonce and PKCE S256.
    /// Returns the URL and the PKCE verifier to keep.
    pub fn authorization_url(
        &self,
        state: &str,
        nonce: &str,
    ) -> Result<(String, String), ProviderError> {
        let d = self.discovered()?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let state = state.to_string();
        let (url, _) = d
            .client
            .authorize_url(move || CsrfToken::new(state))
            .add_scopes(self.scopes.iter().cloned())
            .set_pkce_challenge(challenge)
            .add_extra_param("nonce", nonce)
            .url();
        Ok((url.into(), verifier.secret().clone()))
    }

    fn map_token_error(
        e: RequestTokenError<ProviderHttpError, BasicErrorResponse>,
    ) -> ProviderError {
        match e {
            RequestTokenError::ServerResponse(r) => match r.error() {
                BasicErrorResponseType::InvalidGrant => {
                    ProviderError::InvalidGrant(r.error_description().cloned().unwrap_or_default())
                }
                other => ProviderError::TokenError(other.to_string()),
            },
            RequestTokenError::Request(e) => ProviderError::Http(e),
            // A body that is neither a token nor an RFC 6749 error, or (`Other`) an empty body
            // or one that is not JSON: no refusal was said.
            RequestTokenError::Parse(e, body) => match error_code(&body) {
                // An RFC 6749 error, sent with the wrong status (a 200): still the provider's.
                Some(code) if code == "invalid_grant" => ProviderError::InvalidGrant(String::new()),
                Some(code) => ProviderError::TokenError(code),
                None => ProviderError::NoOAuthAnswer(e.to_string()),
            },
            RequestTokenError::Other(s) => ProviderError::NoOAuthAnswer(s),
        }
    }

    fn is_invalid_client(e: &RequestTokenError<ProviderHttpError, BasicErrorResponse>) -> bool {
        matches!(e, RequestTokenError::ServerResponse(r) if *r.error() == BasicErrorResponseType::InvalidClient)
    }

    /// Exchanges an authorization code (with the PKCE verifier) and validates the ID token.
    pub async fn exchange_code(
        &self,
        code: &str,
        verifier: &str,
        nonce: &str,
    ) -> Result<Tokens, ProviderError> {
        let d = self.discovered()?;
        let mut post = d.use_post.load(Ordering::Relaxed);
        let resp = loop {
            let client = d.client.clone().set_auth_type(if post {
                AuthType::RequestBody
            } else {
                AuthType::BasicAuth
            });
            let r = client
                .exchange_code(AuthorizationCode::new(code.to_string()))
                .set_pkce_verifier(PkceCodeVerifier::new(verifier.to_string()))
                .request_async(&self.http)
                .await;
            match r {
                // Client registered for client_secret_post although discovery lists basic too:
                // learn it once (the code is not consumed by a failed client authentication).
                Err(e)
                    if !post
                        && self.auth_method == TokenAuthMethod::Auto
                        && Self::is_invalid_client(&e) =>
                {
                    post = true;
                    d.use_post.store(true, Ordering::Relaxed);
                }
                r => break r.map_err(Self::map_token_error)?,
            }
        };
        self.tokens(resp, Some(nonce)).await
    }

    /// Spends a refresh token, waiting for the answer up to `patience` (not the usual
    /// provider timeout: an answer abandoned here may carry the only copy of a rotated refresh
    /// token). The ID token, when the provider returns one, is validated too.
    pub async fn refresh_within(
        &self,
        refresh_token: &str,
        patience: std::time::Duration,
    ) -> Result<Tokens, ProviderError> {
        let d = self.discovered()?;
        let http = http::ProviderHttp {
            timeout: patience,
            ..self.http.clone()
        };
        let post = d.use_post.load(Ordering::Relaxed);
        let client = d.client.clone().set_auth_type(if post {
            AuthType::RequestBody
        } else {
            AuthType::BasicAuth
        });
        let resp = client
            .exchange_refresh_token(&RefreshToken::new(refresh_token.to_string()))
            .request_async(&http)
            .await
            .map_err(Self::map_token_error)?;
        self.tokens(resp, None).await
    }

    /// A token endpoint answer (code exchange or refresh) into [`Tokens`]: the access token
    /// checked ([`usable_access_token`]), the ID token validated (required with a `nonce`, on
    /// code exchange), missing claims read from userinfo.
    async fn tokens(&self, resp: TokenResp, nonce: Option<&str>) -> Result<Tokens, ProviderError> {
        usable_access_token(&resp)?;
        let id_token = resp.id_token.clone();
        let access_token = resp.access_token().secret();
        let id = match &id_token {
            Some(t) => match self.validate_id_token(t, nonce, access_token).await {
                Ok(mut id) => {
                    if id.incomplete() {
                        let told = self.complete_from_userinfo(&mut id, access_token).await;
                        // At login, an identity short of what the provider could not tell
                        // right now would deny the user for the whole session: the login
                        // fails, to be tried again. A refresh keeps the session's earlier
                        // claims instead.
                        if let (Err(e), Some(_)) = (told, nonce) {
                            return Err(e);
                        }
                    }
                    Some(id)
                }
                // A refresh signed with a key that cannot be had right now (rotated in, its
                // JWKS not fetched): the answer, straight from the token endpoint, may hold
                // the only usable refresh token, so its tokens are kept; the session keeps
                // its identity and logout hint until a refresh brings an ID token that
                // validates.
                Err(e) if nonce.is_none() && key_not_available(&e) => {
                    tracing::warn!(error = e.to_string().as_str(), "refreshed ID token not checked now (its key cannot be fetched); tokens kept, identity unchanged");
                    None
                }
                Err(e) => return Err(e),
            },
            None if nonce.is_some() => {
                return Err(ProviderError::Invalid(
                    "token response has no id_token".into(),
                ))
            }
            None => None,
        };
        Ok(Tokens {
            access_token: resp.access_token().secret().clone(),
            expires_in: resp.expires_in(),
            refresh_token: resp.refresh_token().map(|r| r.secret().clone()),
            // Only an ID token that validated is kept (as the next logout hint).
            id_token: id_token.filter(|_| id.is_some()),
            id,
        })
    }

    /// Fills the claims an ID token left out (email, name, groups) from the userinfo endpoint,
    /// when the provider has one. When the endpoint refuses or answers nonsense, the identity
    /// stays as the token stated it: the policy then decides on what is known (a missing
    /// email or group denies, never allows). When the provider is unavailable (unreachable,
    /// timing out, `429`, `5xx`), that is the error.
    async fn complete_from_userinfo(
        &self,
        id: &mut ValidIdToken,
        access_token: &str,
    ) -> Result<(), ProviderError> {
        let Ok(d) = self.discovered() else {
            return Ok(());
        };
        let Some(url) = d.meta.userinfo_endpoint.as_deref() else {
            return Ok(());
        };
        let result = async {
            let req = ::http::Request::get(url)
                .header(::http::header::ACCEPT, "application/json")
                .header(
                    ::http::header::AUTHORIZATION,
                    format!("Bearer {access_token}"),
                )
                .body(crate::body::Body::Empty)
                .map_err(|e| ProviderError::Invalid(e.to_string()))?;
            let resp = self.http.send(req, self::http::Endpoint::Userinfo).await?;
            if !resp.status().is_success() {
                return Err(ProviderError::Status(resp.status().as_u16()));
            }
            let signed = resp
                .headers()
                .get(::http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| {
                    v.split(';')
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .eq_ignore_ascii_case("application/jwt")
                });
            let completed = if signed {
                let jwt = std::str::from_utf8(resp.body())
                    .map_err(|_| ProviderError::Invalid("signed userinfo is not text".into()))?;
                let claims = idtoken::signed_userinfo(
                    jwt.trim(),
                    &self.keys.load(),
                    &self.issuer,
                    &self.client_id,
                )
                .map_err(|e| ProviderError::Invalid(format!("signed userinfo: {e}")))?;
                id.complete_from_claims(claims, &self.groups_claim)
            } else {
                id.complete_from(resp.body(), &self.groups_claim)
            };
            completed.map_err(|e| ProviderError::Invalid(e.to_string()))
        }
        .await;
        match result {
            Err(e) if e.is_unavailable() => {
                tracing::warn!(
                    error = e.to_string().as_str(),
                    "userinfo request failed: the provider is unavailable"
                );
                Err(e)
            }
            Err(e) => {
                tracing::warn!(
                    error = e.to_string().as_str(),
                    "userinfo request failed; identity from the ID token only"
                );
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Validates an ID token; an unknown `kid`, or a signature that does not verify,
    /// re-fetches the JWKS (rate-limited) once.
    pub async fn validate_id_token(
        &self,
        token: &str,
        nonce: Option<&str>,
        access_token: &str,
    ) -> Result<ValidIdToken, ProviderError> {
        let exp = Expectations {
            issuer: &self.issuer,
            client_id: &self.client_id,
            nonce,
            clock_skew: self.clock_skew,
            groups_claim: &self.groups_claim,
            now: crate::session::now_secs(),
            access_token: Some(access_token),
        };
        match idtoken::validate(token, &self.keys.load(), &exp) {
            // A key we do not have, or one the provider replaced under the same `kid` (or
            // its only key, without one): the keys are re-fetched. An ID token comes from the
            // token endpoint for a valid code or refresh token, so it cannot be sent in a
            // flood: a failed re-fetch is not counted, and the next login asks again instead
            // of failing the token as unsigned.
            Err(IdTokenError::UnknownKey(_) | IdTokenError::BadSignature) => {
                let fetched = self.refetch_jwks(&self.jwks_refetch, true).await?;
                match idtoken::validate(token, &self.keys.load(), &exp) {
                    // No re-fetch was due: the provider's new key may simply not be here
                    // yet, so the key is not available rather than the token forged.
                    Err(IdTokenError::BadSignature) if !fetched => {
                        let kid = idtoken::header(token).ok().and_then(|(kid, _)| kid);
                        Err(IdTokenError::UnknownKey(idtoken::kid_named(kid.as_deref())).into())
                    }
                    // The provider's keys, fetched just now, do not hold the token's: it is
                    // not the provider's, not merely signed with a key still on its way.
                    Err(IdTokenError::UnknownKey(kid)) if fetched => {
                        Err(IdTokenError::UnpublishedKey(kid).into())
                    }
                    r => Ok(r?),
                }
            }
            r => Ok(r?),
        }
    }

    /// Validates a back-channel logout token (an unknown `kid`, or a signature that does not
    /// verify, re-fetches the JWKS once, within the logout tokens' own budget).
    pub async fn validate_logout_token(
        &self,
        token: &str,
    ) -> Result<logout::LogoutToken, ProviderError> {
        let now = crate::session::now_secs();
        let check = |keys: &KeySet| {
            logout::validate(
                token,
                keys,
                &self.issuer,
                &self.client_id,
                self.clock_skew,
                now,
            )
        };
        match check(&self.keys.load()) {
            Err(logout::LogoutTokenError::UnknownKey | logout::LogoutTokenError::BadSignature) => {
                self.refetch_jwks(&self.logout_jwks_refetch, false).await?;
                Ok(check(&self.keys.load())?)
            }
            r => Ok(r?),
        }
    }

    /// A token named a key we do not have, or its signature did not verify with the one we
    /// have: re-fetch the JWKS, unless a token already forced a re-fetch within `budget`'s
    /// interval (then the keys stay as they are: `Ok(false)`). A caller that waited for
    /// another's re-fetch validates against the keys it brought. With `retry_failed`, a fetch
    /// that failed is not counted against the budget.
    async fn refetch_jwks(
        &self,
        budget: &tokio::sync::Mutex<RefetchLimit>,
        retry_failed: bool,
    ) -> Result<bool, ProviderError> {
        let d = self.discovered()?;
        let mut limit = budget.lock().await;
        if !limit.claim(Instant::now()) {
            return Ok(false);
        }
        tracing::info!(
            "token signed with a key not among the provider's known ones: re-fetching its JWKS"
        );
        let fetched = self.fetch_jwks(&d.meta.jwks_uri).await;
        if fetched.is_err() && retry_failed {
            limit.unclaim();
        }
        fetched.map(|()| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_https_issuers_endpoints_must_be_https() {
        let meta = |token: &str, revocation: Option<&str>| -> Metadata {
            serde_json::from_value(json!({
                "issuer": "https://idp.example",
                "authorization_endpoint": "https://idp.example/auth",
                "token_endpoint": token,
                "jwks_uri": "https://keys.example/jwks",
                "revocation_endpoint": revocation,
            }))
            .unwrap()
        };
        let ok = meta("https://other.example/token", None);
        assert!(endpoints_fit_issuer("https://idp.example", &ok).is_ok());
        for m in [
            meta("http://idp.example/token", None),
            meta("HTTP://idp.example/token", None),
            meta(
                "https://idp.example/token",
                Some("http://idp.example/revoke"),
            ),
        ] {
            let e = endpoints_fit_issuer("https://idp.example", &m)
                .unwrap_err()
                .to_string();
            assert!(e.contains("is not https"), "{e}");
        }
        // A plain-http issuer (a provider on loopback) is the operator's choice.
        let plain = meta("http://127.0.0.1:9000/token", None);
        assert!(endpoints_fit_issuer("http://127.0.0.1:9000", &plain).is_ok());
        // Whatever the issuer, every endpoint is an http(s) URL.
        for issuer in ["http://127.0.0.1:9000", "https://idp.example"] {
            for m in [
                meta("file:///etc/passwd", None),
                meta("https://idp.example/token", Some("gopher://idp.example/")),
                meta("not a url", None),
            ] {
                let e = endpoints_fit_issuer(issuer, &m).unwrap_err().to_string();
                assert!(e.contains("is not an http(s) URL"), "{e}");
            }
            let mut script = meta("https://idp.example/token", None);
            script.end_session_endpoint = Some("javascript:alert(1)//".into());
            let e = endpoints_fit_issuer(issuer, &script)
                .unwrap_err()
                .to_string();
            assert!(e.contains("end_session_endpoint"), "{e}");
        }
    }

    /// A provider for `issuer` / `client`, with its HTTP client and metrics; not discovered.
    fn provider_for(issuer: &str) -> (Provider, Arc<crate::metrics::Metrics>) {
        let cfg = crate::config::load_str(
            &format!(
                r#"
upstream: "http://127.0.0.1:8081"
provider: {{ issuer_url: "{issuer}", client_id: "client", client_secret: "s" }}
redirect_url: "http://127.0.0.1:4180/oauth2/callback"
cookie: {{ secrets: ["AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="], secure: false }}
"#
            ),
            Vec::new(),
        )
        .unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new().unwrap());
        let clients =
            crate::proxy::client::UpstreamClients::new(&crate::proxy::client::ClientOptions {
                tls: cfg.tls_client.clone(),
                connect_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(1),
                max_idle_per_host: 1,
            })
            .unwrap();
        let http = ProviderHttp {
            client: clients.shared(),
            timeout: Duration::from_secs(1),
            metrics: metrics.clone(),
        };
        (Provider::new(&cfg, http), metrics)
    }

    /// A provider for `https://idp` / `client` that knows the test signing key; never
    /// discovered, so it makes no call (no userinfo lookup).
    fn provider() -> Provider {
        let (p, _) = provider_for("https://idp");
        p.keys.store(Arc::new(idtoken::tests::keys()));
        p
    }

    #[tokio::test]
    async fn discovery_retries_end_with_the_provider() {
        // Nothing listens on port 1: discovery fails, and is retried with backoff.
        let (p, metrics) = provider_for("http://127.0.0.1:1");
        let p = Arc::new(p);
        let retries = tokio::spawn(p.clone().discover_until_ready());
        let attempts = || {
            metrics
                .provider_seconds
                .with_label_values(&["discovery"])
                .get_sample_count()
        };
        while attempts() < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!p.is_ready());
        // A reload replaced the generation holding it: its retries stop.
        drop(p);
        tokio::time::timeout(Duration::from_secs(60), retries)
            .await
            .expect("discovery retries go on for a provider nobody holds")
            .unwrap();
    }

    /// A valid ID token for nonce `n1`, as `f` changes its claims.
    fn id_token(f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
        let now = crate::session::now_secs();
        let claims = json!({"iss": "https://idp", "aud": "client", "sub": "alice",
            "exp": now + 300, "iat": now, "nonce": "n1", "email": "a@x",
            "email_verified": true, "groups": ["g1"]});
        idtoken::tests::signed(claims, f)
    }

    /// A token response: a valid one as `f` changes it.
    fn response(
        id_token: Option<String>,
        f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    ) -> TokenResp {
        let mut v = json!({"access_token": "at-1.x_y~z+/=", "token_type": "Bearer",
            "expires_in": 300, "refresh_token": "rt-1"});
        if let Some(m) = v.as_object_mut() {
            if let Some(t) = id_token {
                m.insert("id_token".into(), json!(t));
            }
            f(m);
        }
        serde_json::from_value(v).unwrap()
    }

    /// A refresh answer whose ID token is signed with a key that cannot be had now (rotated
    /// in, the JWKS not fetched) keeps its tokens, the rotated refresh token may exist nowhere
    /// else, and brings no identity; at login the same answer fails, as the provider being
    /// unavailable. An ID token that fails for any other reason fails the refresh.
    #[tokio::test]
    async fn a_refreshed_id_token_whose_key_cannot_be_had_keeps_the_tokens() {
        let (p, _) = provider_for("https://idp"); // knows no key, cannot fetch any
        let t = p
            .tokens(response(Some(id_token(|_| {})), |_| {}), None)
            .await
            .unwrap();
        assert_eq!(t.access_token, "at-1.x_y~z+/=");
        assert_eq!(t.refresh_token.as_deref(), Some("rt-1"));
        assert!(t.id.is_none() && t.id_token.is_none());
        let login = p
            .tokens(response(Some(id_token(|_| {})), |_| {}), Some("n1"))
            .await;
        assert!(login.is_err_and(|e| e.is_unavailable()));
        let wrong_audience = id_token(|m| {
            m.insert("aud".into(), json!("other"));
        });
        let r = provider()
            .tokens(response(Some(wrong_audience), |_| {}), None)
            .await;
        assert!(matches!(r, Err(ProviderError::IdToken(_))), "{:?}", r.err());
    }

    /// The access token a code exchange or refresh answer carries is the one its ID token's
    /// `at_hash` names: an answer pairing the ID token with another access token is refused,
    /// at login and on refresh alike.
    #[tokio::test]
    async fn an_id_tokens_at_hash_names_the_access_token_of_its_answer() {
        let hash_of = |t: &str| idtoken::access_token_hash(jsonwebtoken::Algorithm::ES256, t);
        let stating = |h: String| {
            id_token(move |m| {
                m.insert("at_hash".into(), json!(h));
            })
        };
        for nonce in [Some("n1"), None] {
            let paired = stating(hash_of("at-1.x_y~z+/="));
            let t = provider()
                .tokens(response(Some(paired), |_| {}), nonce)
                .await
                .unwrap();
            assert_eq!(t.id.map(|id| id.identity.sub).as_deref(), Some("alice"));
            let swapped = stating(hash_of("another-users-access-token"));
            let r = provider()
                .tokens(response(Some(swapped), |_| {}), nonce)
                .await;
            assert!(
                matches!(
                    r,
                    Err(ProviderError::IdToken(IdTokenError::AccessTokenHash))
                ),
                "{:?}",
                r.map(|t| t.access_token)
            );
        }
    }

    /// A refreshed ID token under a `kid` that the provider's keys, fetched just now, do not
    /// hold is not the provider's: the refresh fails (its tokens are not kept under the
    /// session's identity), where a key that could not be fetched keeps them (above).
    #[tokio::test]
    async fn a_refreshed_id_token_under_a_key_the_provider_does_not_publish_fails() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let jwks_fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let fetches = jwks_fetches.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                fetches.fetch_add(1, Ordering::SeqCst);
                let body = idtoken::tests::JWKS;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(resp.as_bytes()).await;
            }
        });
        let p = provider();
        let meta: Metadata = serde_json::from_value(json!({
            "issuer": "https://idp",
            "authorization_endpoint": "https://idp/auth",
            "token_endpoint": "https://idp/token",
            "jwks_uri": format!("http://127.0.0.1:{port}/jwks"),
        }))
        .unwrap();
        let discovered = p.discovered_from(meta, None).unwrap();
        p.discovered.store(Some(Arc::new(discovered)));
        let now = crate::session::now_secs();
        let claims = json!({"iss": "https://idp", "aud": "client", "sub": "mallory",
            "exp": now + 300, "iat": now});
        let foreign = idtoken::tests::sign(&claims, Some("not-published"));
        let r = p.tokens(response(Some(foreign), |_| {}), None).await;
        assert!(
            matches!(
                r,
                Err(ProviderError::IdToken(IdTokenError::UnpublishedKey(_)))
            ),
            "{:?}",
            r.map(|t| t.access_token)
        );
        assert_eq!(jwks_fetches.load(Ordering::SeqCst), 1);
    }

    /// Optional metadata stated as `null` reads as left out, for every optional field.
    #[test]
    fn null_metadata_reads_as_left_out() {
        let meta: Metadata = serde_json::from_value(json!({
            "issuer": "https://idp",
            "authorization_endpoint": "https://idp/auth",
            "token_endpoint": "https://idp/token",
            "jwks_uri": "https://idp/jwks",
            "userinfo_endpoint": null,
            "end_session_endpoint": null,
            "revocation_endpoint": null,
            "token_endpoint_auth_methods_supported": null,
            "backchannel_logout_supported": null,
            "authorization_response_iss_parameter_supported": null,
        }))
        .unwrap();
        assert!(meta.token_endpoint_auth_methods_supported.is_empty());
        assert!(!meta.backchannel_logout_supported);
        assert!(!meta.authorization_response_iss_parameter_supported);
        assert!(meta.end_session_endpoint.is_none());
        let stated: Metadata = serde_json::from_value(json!({
            "issuer": "https://idp",
            "authorization_endpoint": "https://idp/auth",
            "token_endpoint": "https://idp/token",
            "jwks_uri": "https://idp/jwks",
            "token_endpoint_auth_methods_supported": ["client_secret_post"],
            "authorization_response_iss_parameter_supported": true,
        }))
        .unwrap();
        assert_eq!(
            stated.token_endpoint_auth_methods_supported,
            ["client_secret_post"]
        );
        assert!(stated.authorization_response_iss_parameter_supported);
    }

    /// `expires_in` as providers send it: a number, a numeric string (Azure AD v1.0), a
    /// fraction; anything else is not stated rather than a failed login.
    #[test]
    fn expires_in_is_read_leniently() {
        let secs = |v: serde_json::Value| {
            response(None, |m| {
                m.insert("expires_in".into(), v);
            })
            .expires_in()
            .map(|d| d.as_secs())
        };
        assert_eq!(secs(json!(3599)), Some(3599));
        assert_eq!(secs(json!("3599")), Some(3599));
        assert_eq!(secs(json!(" 60 ")), Some(60));
        assert_eq!(secs(json!(59.9)), Some(59));
        assert_eq!(secs(json!(u64::MAX)), Some(u64::MAX));
        for unstated in [
            json!(-5),
            json!("soon"),
            json!(null),
            json!("-1"),
            json!([1]),
        ] {
            assert_eq!(secs(unstated.clone()), None, "{unstated}");
        }
        let without = response(None, |m| {
            m.remove("expires_in");
        });
        assert_eq!(without.expires_in(), None);
        assert_eq!(
            without.refresh_token().map(|r| r.secret().as_str()),
            Some("rt-1")
        );
    }

    /// A token endpoint that answers 5xx or 429 is unavailable, whatever its body (a load
    /// balancer's HTML page, an OAuth `server_error`): never taken for a refusal. Other
    /// statuses reach the oauth2 crate as they are.
    #[tokio::test]
    async fn token_endpoint_outages_are_told_from_refusals() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let answers = [
            ("503 Service Unavailable", "text/html", "<h1>down</h1>"),
            (
                "500 Internal Server Error",
                "application/json",
                r#"{"error":"server_error"}"#,
            ),
            ("429 Too Many Requests", "text/plain", "slow down"),
            (
                "401 Unauthorized",
                "application/json",
                r#"{"error":"invalid_client"}"#,
            ),
        ];
        tokio::spawn(async move {
            for (status, ty, body) in answers {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {ty}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(resp.as_bytes()).await;
            }
        });
        let (p, _) = provider_for("https://idp");
        let call = || {
            let req = ::http::Request::post(format!("http://127.0.0.1:{port}/token"))
                .body(b"grant_type=refresh_token&refresh_token=r".to_vec())
                .unwrap();
            p.http.oauth2(req)
        };
        for want in [503, 500, 429] {
            match call().await {
                Err(e @ http::ProviderHttpError::Unavailable(code)) => {
                    assert_eq!(code, want);
                    assert!(ProviderError::Http(e).is_unavailable());
                }
                other => panic!("{want}: {other:?}"),
            }
        }
        let refused = call().await.unwrap();
        assert_eq!(refused.status(), 401);
        assert!(!ProviderError::TokenError("invalid_client".into()).is_unavailable());
        assert!(ProviderError::TokenError("temporarily_unavailable".into()).is_unavailable());
        assert!(!ProviderError::Invalid("no id_token".into()).is_unavailable());
    }

    /// Token responses the gateway could not use as they are: a token type other than
    /// Bearer, an access token no Authorization header can carry. Refused on code exchange
    /// (with a nonce and an ID token) and on refresh (without) alike: both go through
    /// `Provider::tokens`.
    #[tokio::test]
    async fn unusable_access_tokens_are_refused_on_exchange_and_refresh() {
        let p = provider();
        type Change = fn(&mut serde_json::Map<String, serde_json::Value>);
        let bad: [(&str, Change); 12] = [
            ("mac", |m| {
                m.insert("token_type".into(), json!("mac"));
            }),
            ("MAC", |m| {
                m.insert("token_type".into(), json!("MAC"));
            }),
            ("DPoP", |m| {
                m.insert("token_type".into(), json!("DPoP"));
            }),
            ("empty type", |m| {
                m.insert("token_type".into(), json!(""));
            }),
            ("CRLF", |m| {
                m.insert(
                    "access_token".into(),
                    json!("at\r\nX-Forwarded-User: admin"),
                );
            }),
            ("LF", |m| {
                m.insert("access_token".into(), json!("at\n"));
            }),
            ("NUL", |m| {
                m.insert("access_token".into(), json!("a\u{0}t"));
            }),
            ("DEL", |m| {
                m.insert("access_token".into(), json!("a\u{7f}t"));
            }),
            ("empty token", |m| {
                m.insert("access_token".into(), json!(""));
            }),
            ("space", |m| {
                m.insert("access_token".into(), json!("abc def"));
            }),
            ("comma", |m| {
                m.insert("access_token".into(), json!("abc,def"));
            }),
            ("non-ASCII", |m| {
                m.insert("access_token".into(), json!("abc\u{e9}\u{20ac}"));
            }),
        ];
        for (what, change) in bad {
            for nonce in [Some("n1"), None] {
                let r = p
                    .tokens(response(Some(id_token(|_| {})), change), nonce)
                    .await;
                assert!(
                    matches!(r, Err(ProviderError::Invalid(_))),
                    "{what} (nonce {nonce:?}): {:?}",
                    r.err()
                );
            }
            // A refresh answer without an ID token too.
            let r = p.tokens(response(None, change), None).await;
            assert!(
                matches!(r, Err(ProviderError::Invalid(_))),
                "{what}: refresh"
            );
        }
        // Bearer in any case (RFC 6749 §7.1: case-insensitive) is fine.
        for tt in ["Bearer", "bearer", "BEARER"] {
            let resp = response(Some(id_token(|_| {})), |m| {
                m.insert("token_type".into(), json!(tt));
            });
            let t = p.tokens(resp, Some("n1")).await.map_err(|e| e.to_string());
            let t = t.unwrap_or_else(|e| panic!("{tt}: {e}"));
            assert_eq!(t.access_token, "at-1.x_y~z+/=");
            assert_eq!(t.id.map(|id| id.identity.sub).as_deref(), Some("alice"));
            let refreshed = p.tokens(response(None, |_| {}), None).await;
            assert!(refreshed.is_ok(), "{tt}: refresh");
        }
    }

    /// An ID token whose sub no identity header can carry fails as an ID token (the
    /// callback's "did not validate" page; a failed refresh).
    #[tokio::test]
    async fn an_unusable_subject_fails_the_id_token() {
        let p = provider();
        for sub in ["", "alice\r\n", "al\u{1}ice"] {
            let token = id_token(|m| {
                m.insert("sub".into(), json!(sub));
            });
            for nonce in [Some("n1"), None] {
                let r = p.tokens(response(Some(token.clone()), |_| {}), nonce).await;
                assert!(
                    matches!(r, Err(ProviderError::IdToken(IdTokenError::Subject))),
                    "{sub:?} (nonce {nonce:?}): {:?}",
                    r.err()
                );
            }
        }
    }
}
