//! ID-token validation (OpenID Connect Core §3.1.3.7): signature via JWKS,
//! `iss`, `aud`, `azp`, `exp`/`iat` with clock skew, `nonce`.

use super::jwks::KeySet;
use crate::config::secret::ct_eq;
use crate::session::Identity;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdTokenError {
    #[error("malformed ID token")]
    Malformed,
    #[error("ID token algorithm {0} is not accepted")]
    Algorithm(String),
    #[error("no provider key for the ID token (kid {0})")]
    UnknownKey(String),
    #[error("ID token rejected: {0}")]
    Invalid(String),
    #[error("ID token nonce does not match")]
    Nonce,
    #[error("ID token azp does not name this client")]
    Azp,
    #[error("ID token issued in the future")]
    IssuedInFuture,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    aud: OneOrMany,
    azp: Option<String>,
    nonce: Option<String>,
    email: Option<String>,
    #[serde(default)]
    email_verified: Option<serde_json::Value>,
    name: Option<String>,
    preferred_username: Option<String>,
    sid: Option<String>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// What a validated ID token tells the gateway.
#[derive(Debug, Clone)]
pub struct ValidIdToken {
    pub identity: Identity,
}

pub const ACCEPTED_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

pub struct Expectations<'a> {
    pub issuer: &'a str,
    pub client_id: &'a str,
    /// `None` on refresh responses (no nonce is sent then).
    pub nonce: Option<&'a str>,
    pub clock_skew: Duration,
    pub groups_claim: &'a str,
    pub now: u64,
}

/// The `kid` and algorithm a token says it was signed with (to pick/refresh keys).
pub fn header(token: &str) -> Result<(Option<String>, Algorithm), IdTokenError> {
    let h = jsonwebtoken::decode_header(token).map_err(|_| IdTokenError::Malformed)?;
    if !ACCEPTED_ALGORITHMS.contains(&h.alg) {
        return Err(IdTokenError::Algorithm(format!("{:?}", h.alg)));
    }
    Ok((h.kid, h.alg))
}

pub fn validate(
    token: &str,
    keys: &KeySet,
    exp: &Expectations<'_>,
) -> Result<ValidIdToken, IdTokenError> {
    let (kid, alg) = header(token)?;
    let key = keys
        .find(kid.as_deref(), alg)
        .ok_or_else(|| IdTokenError::UnknownKey(kid.clone().unwrap_or_default()))?;
    let mut v = Validation::new(alg);
    v.leeway = exp.clock_skew.as_secs();
    v.set_issuer(&[exp.issuer]);
    v.set_audience(&[exp.client_id]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let data = jsonwebtoken::decode::<Claims>(token, key, &v)
        .map_err(|e| IdTokenError::Invalid(e.to_string()))?;
    let c = data.claims;
    if c.iat > exp.now + exp.clock_skew.as_secs() {
        return Err(IdTokenError::IssuedInFuture);
    }
    let aud = c.aud.into_vec();
    match &c.azp {
        Some(azp) if azp != exp.client_id => return Err(IdTokenError::Azp),
        None if aud.len() > 1 => return Err(IdTokenError::Azp),
        _ => {}
    }
    if let Some(expected) = exp.nonce {
        let ok = c
            .nonce
            .as_deref()
            .is_some_and(|n| ct_eq(n.as_bytes(), expected.as_bytes()));
        if !ok {
            return Err(IdTokenError::Nonce);
        }
    }
    let groups = match c.rest.get(exp.groups_claim) {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|g| g.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    let email_verified = match c.email_verified {
        Some(serde_json::Value::Bool(b)) => b,
        Some(serde_json::Value::String(s)) => s == "true",
        _ => false,
    };
    Ok(ValidIdToken {
        identity: Identity {
            sub: c.sub,
            email: c.email,
            email_verified,
            name: c.name,
            preferred_username: c.preferred_username,
            groups,
            sid: c.sid,
        },
    })
}
