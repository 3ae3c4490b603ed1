//! Back-channel logout tokens (OpenID Connect Back-Channel Logout 1.0 §2.6).

use super::jwks::KeySet;
use jsonwebtoken::Validation;
use serde::Deserialize;
use std::time::Duration;

pub const EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogoutTokenError {
    #[error("malformed logout token")]
    Malformed,
    #[error("no provider key for the logout token")]
    UnknownKey,
    #[error("logout token rejected: {0}")]
    Invalid(String),
    #[error("logout token has no back-channel logout event")]
    Event,
    #[error("logout token must not contain a nonce")]
    Nonce,
    #[error("logout token names neither sid nor sub")]
    NoSubject,
    #[error("logout token has no jti")]
    NoJti,
    #[error("logout token iat is missing or in the future")]
    Iat,
}

#[derive(Debug, Deserialize)]
struct Claims {
    iat: Option<u64>,
    jti: Option<String>,
    sub: Option<String>,
    sid: Option<String>,
    events: Option<serde_json::Map<String, serde_json::Value>>,
    nonce: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutToken {
    pub jti: String,
    pub sid: Option<String>,
    pub sub: Option<String>,
    pub iat: u64,
}

pub fn validate(
    token: &str,
    keys: &KeySet,
    issuer: &str,
    client_id: &str,
    skew: Duration,
    now: u64,
) -> Result<LogoutToken, LogoutTokenError> {
    let (kid, alg) = super::idtoken::header(token).map_err(|_| LogoutTokenError::Malformed)?;
    let key = keys
        .find(kid.as_deref(), alg)
        .ok_or(LogoutTokenError::UnknownKey)?;
    let mut v = Validation::new(alg);
    v.leeway = skew.as_secs();
    v.set_issuer(&[issuer]);
    v.set_audience(&[client_id]);
    // exp is optional in logout tokens but checked when present.
    v.set_required_spec_claims(&["iss", "aud"]);
    let c = jsonwebtoken::decode::<Claims>(token, key, &v)
        .map_err(|e| LogoutTokenError::Invalid(e.to_string()))?
        .claims;
    match c.iat {
        Some(iat) if iat <= now + skew.as_secs() => {}
        _ => return Err(LogoutTokenError::Iat),
    }
    if !c
        .events
        .as_ref()
        .and_then(|e| e.get(EVENT))
        .is_some_and(|v| v.is_object())
    {
        return Err(LogoutTokenError::Event);
    }
    if c.nonce.is_some() {
        return Err(LogoutTokenError::Nonce);
    }
    if c.sid.is_none() && c.sub.is_none() {
        return Err(LogoutTokenError::NoSubject);
    }
    let jti = c
        .jti
        .filter(|j| !j.is_empty())
        .ok_or(LogoutTokenError::NoJti)?;
    Ok(LogoutToken {
        jti,
        sid: c.sid,
        sub: c.sub,
        iat: c.iat.unwrap_or(now),
    })
}
