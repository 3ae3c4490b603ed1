//! Back-channel logout tokens (OpenID Connect Back-Channel Logout 1.0 §2.6).

use super::jwks::{KeySet, Refusal};
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
    #[error("logout token signature does not verify with the provider's keys")]
    BadSignature,
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
    #[error("logout token iat is missing, in the future or older than a day")]
    Iat,
    #[error("logout token not valid yet (nbf)")]
    NotYetValid,
    #[error("logout token has expired (exp)")]
    Expired,
    #[error("logout token is typed as another kind of token (typ)")]
    Type,
}

impl LogoutTokenError {
    /// Refused for its times alone (signed by the provider, for this client): the provider's
    /// clock and this one's are apart, or the token was delayed.
    pub fn is_timing(&self) -> bool {
        matches!(self, Self::Expired | Self::Iat | Self::NotYetValid)
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default, deserialize_with = "super::idtoken::optional_numeric_date")]
    iat: Option<u64>,
    #[serde(default, deserialize_with = "super::idtoken::optional_numeric_date")]
    nbf: Option<u64>,
    jti: Option<String>,
    sub: Option<String>,
    sid: Option<String>,
    events: Option<serde_json::Map<String, serde_json::Value>>,
    /// Present at all (`"nonce": null` included): a logout token must not have one.
    #[serde(default, deserialize_with = "present")]
    nonce: bool,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutToken {
    pub jti: String,
    pub sid: Option<String>,
    pub sub: Option<String>,
    pub iat: u64,
}

/// How long a logout token's `jti` is remembered, and so the oldest token accepted: an older
/// one could be a replay whose `jti` is forgotten, and a sub-only one would end the user's
/// newer sessions.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(24 * 3600);

pub fn validate(
    token: &str,
    keys: &KeySet,
    issuer: &str,
    client_id: &str,
    skew: Duration,
    now: u64,
) -> Result<LogoutToken, LogoutTokenError> {
    let (kid, alg) = super::idtoken::header(token).map_err(|_| LogoutTokenError::Malformed)?;
    // Explicitly typed JWTs of another kind (an access token, `at+jwt`) are no logout token
    // (RFC 8725 §3.11); untyped, `JWT` or `logout+jwt` (the spec's) are.
    let typ = jsonwebtoken::decode_header(token)
        .map_err(|_| LogoutTokenError::Malformed)?
        .typ;
    if let Some(t) = typ {
        let t = t.to_ascii_lowercase();
        let t = t.strip_prefix("application/").unwrap_or(&t);
        if t != "jwt" && t != "logout+jwt" {
            return Err(LogoutTokenError::Type);
        }
    }
    let mut v = Validation::new(alg);
    v.leeway = skew.as_secs();
    v.set_issuer(&[issuer]);
    v.set_audience(&[client_id]);
    // exp is optional in logout tokens but checked when present.
    v.set_required_spec_claims(&["iss", "aud"]);
    let c = keys
        .decode::<Claims>(token, kid.as_deref(), alg, &v)
        .map_err(|e| match e {
            Refusal::NoKey => LogoutTokenError::UnknownKey,
            Refusal::BadSignature => LogoutTokenError::BadSignature,
            Refusal::Invalid(e) => match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => LogoutTokenError::Expired,
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => LogoutTokenError::NotYetValid,
                _ => LogoutTokenError::Invalid(e.to_string()),
            },
        })?;
    match c.iat {
        Some(iat)
            if iat <= now + skew.as_secs()
                && iat + REPLAY_WINDOW.as_secs() > now + skew.as_secs() => {}
        _ => return Err(LogoutTokenError::Iat),
    }
    // Against the same clock and skew as iat (jsonwebtoken skips nbf by default).
    if c.nbf.is_some_and(|nbf| nbf > now + skew.as_secs()) {
        return Err(LogoutTokenError::NotYetValid);
    }
    if !c
        .events
        .as_ref()
        .and_then(|e| e.get(EVENT))
        .is_some_and(|v| v.is_object())
    {
        return Err(LogoutTokenError::Event);
    }
    if c.nonce {
        return Err(LogoutTokenError::Nonce);
    }
    // An empty one names nobody (OIDC Back-Channel Logout: non-empty strings).
    let sid = c.sid.filter(|s| !s.is_empty());
    let sub = c.sub.filter(|s| !s.is_empty());
    if sid.is_none() && sub.is_none() {
        return Err(LogoutTokenError::NoSubject);
    }
    let jti = c
        .jti
        .filter(|j| !j.is_empty())
        .ok_or(LogoutTokenError::NoJti)?;
    Ok(LogoutToken {
        jti,
        sid,
        sub,
        iat: c.iat.unwrap_or(now),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oidc::idtoken::tests::{keys, signed, NOW};
    use serde_json::json;

    fn token(f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
        let claims = json!({"iss": "https://idp", "aud": "client", "iat": NOW as f64 + 0.5, "jti": "j1",
            "sub": "alice", "sid": "s1", "events": {EVENT: {}}});
        signed(claims, f)
    }

    /// A valid logout token's claims under this `typ` header.
    fn typed(typ: Option<&str>) -> String {
        let claims = json!({"iss": "https://idp", "aud": "client", "iat": NOW, "jti": "j1",
            "sub": "alice", "sid": "s1", "events": {EVENT: {}}});
        crate::oidc::idtoken::tests::sign_typed(&claims, Some("k1"), typ)
    }

    fn check(t: &str) -> Result<LogoutToken, LogoutTokenError> {
        validate(
            t,
            &keys(),
            "https://idp",
            "client",
            Duration::from_secs(60),
            NOW,
        )
    }

    #[test]
    fn valid_and_invalid_logout_tokens() {
        let ok = check(&token(|_| {})).unwrap();
        assert_eq!(
            (ok.sid.as_deref(), ok.sub.as_deref(), ok.jti.as_str()),
            (Some("s1"), Some("alice"), "j1")
        );
        assert!(
            check(&token(|m| {
                m.remove("sid");
            }))
            .is_ok(),
            "sub alone is enough"
        );
        for typ in [
            None,
            Some("logout+jwt"),
            Some("application/logout+jwt"),
            Some("JWT"),
        ] {
            assert!(check(&typed(typ)).is_ok(), "typ {typ:?}");
        }
        assert!(
            check(&token(|m| {
                m.insert("nbf".into(), json!(NOW + 30));
            }))
            .is_ok(),
            "nbf within the clock skew"
        );
        let bad: Vec<(&str, String, LogoutTokenError)> = vec![
            (
                "no event",
                token(|m| {
                    m.remove("events");
                }),
                LogoutTokenError::Event,
            ),
            (
                "wrong event",
                token(|m| {
                    m.insert("events".into(), json!({"other": {}}));
                }),
                LogoutTokenError::Event,
            ),
            (
                "event not an object",
                token(|m| {
                    m.insert("events".into(), json!({EVENT: "x"}));
                }),
                LogoutTokenError::Event,
            ),
            (
                "has a nonce",
                token(|m| {
                    m.insert("nonce".into(), json!("n"));
                }),
                LogoutTokenError::Nonce,
            ),
            (
                "has a null nonce",
                token(|m| {
                    m.insert("nonce".into(), json!(null));
                }),
                LogoutTokenError::Nonce,
            ),
            (
                "neither sid nor sub",
                token(|m| {
                    m.remove("sid");
                    m.remove("sub");
                }),
                LogoutTokenError::NoSubject,
            ),
            (
                "an empty sid and sub",
                token(|m| {
                    m.insert("sid".into(), json!(""));
                    m.insert("sub".into(), json!(""));
                }),
                LogoutTokenError::NoSubject,
            ),
            (
                "no jti",
                token(|m| {
                    m.remove("jti");
                }),
                LogoutTokenError::NoJti,
            ),
            (
                "not valid for an hour (nbf)",
                token(|m| {
                    m.insert("nbf".into(), json!(NOW + 3600));
                }),
                LogoutTokenError::NotYetValid,
            ),
            (
                "typed as an access token",
                typed(Some("at+jwt")),
                LogoutTokenError::Type,
            ),
            (
                "no iat",
                token(|m| {
                    m.remove("iat");
                }),
                LogoutTokenError::Iat,
            ),
            (
                "iat in the future",
                token(|m| {
                    m.insert("iat".into(), json!(NOW + 3600));
                }),
                LogoutTokenError::Iat,
            ),
            (
                "older than the replay window",
                token(|m| {
                    m.insert("iat".into(), json!(NOW - 2 * 24 * 3600));
                }),
                LogoutTokenError::Iat,
            ),
        ];
        for (what, t, want) in bad {
            assert_eq!(check(&t).err(), Some(want), "{what}");
        }
        // The replay window is a day, ending where the clock skew reaches back to.
        for (ago, ok) in [
            (2 * 3600, true),
            (24 * 3600 - 61, true),
            (24 * 3600 - 60, false),
        ] {
            let t = token(|m| {
                m.insert("iat".into(), json!(NOW - ago));
            });
            assert_eq!(check(&t).is_ok(), ok, "issued {ago} s ago");
        }
        for (what, t) in [
            (
                "wrong issuer",
                token(|m| {
                    m.insert("iss".into(), json!("https://evil"));
                }),
            ),
            (
                "wrong audience",
                token(|m| {
                    m.insert("aud".into(), json!("other"));
                }),
            ),
        ] {
            assert!(
                matches!(check(&t), Err(LogoutTokenError::Invalid(_))),
                "{what}"
            );
        }
        // Refused for its times: told apart (a warning for the operator's clocks).
        let expired = token(|m| {
            m.insert("exp".into(), json!(1_000_000u64));
        });
        let err = check(&expired).err();
        assert_eq!(err, Some(LogoutTokenError::Expired));
        assert!(err.is_some_and(|e| e.is_timing()));
        assert!(!LogoutTokenError::BadSignature.is_timing());
        assert_eq!(check("garbage").err(), Some(LogoutTokenError::Malformed));
    }
}
