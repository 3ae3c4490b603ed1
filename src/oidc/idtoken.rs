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

/// Signed test tokens, shared with the logout-token tests.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    /// A throwaway P-256 key for these tests only; `JWKS` holds its public half, kid `k1`.
    const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQguplBSjcpCtSIcOHi
WyHx5XeRYTHQk5Nk+Gxtvut6kSyhRANCAASvCqWY+joV2GZpIHKwoUMPrlvS9Zox
b5r0pY+wYaK/b8oHNvUmoOJFQVYR+MLEo+3kGiWv2ah+iGMvQE6hF9A5
-----END PRIVATE KEY-----";
    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","alg":"ES256","use":"sig",
        "x":"rwqlmPo6FdhmaSBysKFDD65b0vWaMW-a9KWPsGGiv28","y":"ygc29Sag4kVBVhH4wsSj7eQaJa_ZqH6IYy9ATqEX0Dk"}]}"#;
    pub const NOW: u64 = 1_800_000_000;

    pub fn keys() -> KeySet {
        KeySet::parse(JWKS.as_bytes()).unwrap()
    }

    fn claims() -> serde_json::Value {
        json!({"iss": "https://idp", "aud": "client", "sub": "alice", "exp": NOW + 300,
               "iat": NOW, "nonce": "n1", "email": "a@x", "email_verified": true,
               "groups": ["g1", "g2"], "sid": "s1"})
    }

    pub fn sign(c: &serde_json::Value, kid: Option<&str>) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = kid.map(str::to_string);
        encode(
            &h,
            c,
            &EncodingKey::from_ec_pem(TEST_KEY.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    /// `claims` as `f` changes them, signed with `k1`.
    pub fn signed(
        mut claims: serde_json::Value,
        f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    ) -> String {
        if let Some(m) = claims.as_object_mut() {
            f(m);
        }
        sign(&claims, Some("k1"))
    }

    fn check(token: &str) -> Result<ValidIdToken, IdTokenError> {
        let exp = Expectations {
            issuer: "https://idp",
            client_id: "client",
            nonce: Some("n1"),
            clock_skew: Duration::from_secs(60),
            groups_claim: "groups",
            now: NOW,
        };
        validate(token, &keys(), &exp)
    }

    fn with(f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
        signed(claims(), f)
    }

    #[test]
    fn a_valid_token_yields_the_identity() {
        // jsonwebtoken checks exp against the real clock: use a far-future exp for this one.
        let t = with(|m| {
            m.insert("exp".into(), json!(4_000_000_000u64));
        });
        let id = check(&t).unwrap().identity;
        assert_eq!(id.sub, "alice");
        assert_eq!(id.groups, ["g1", "g2"]);
        assert_eq!(id.sid.as_deref(), Some("s1"));
        assert!(id.email_verified);
    }

    #[test]
    fn every_rule_is_enforced() {
        let far = |m: &mut serde_json::Map<String, serde_json::Value>| {
            m.insert("exp".into(), json!(4_000_000_000u64));
        };
        type Case = (&'static str, String, fn(&IdTokenError) -> bool);
        let cases: Vec<Case> = vec![
            (
                "wrong issuer",
                with(|m| {
                    far(m);
                    m.insert("iss".into(), json!("https://evil"));
                }),
                |e| matches!(e, IdTokenError::Invalid(_)),
            ),
            (
                "issuer with a slash",
                with(|m| {
                    far(m);
                    m.insert("iss".into(), json!("https://idp/"));
                }),
                |e| matches!(e, IdTokenError::Invalid(_)),
            ),
            (
                "wrong audience",
                with(|m| {
                    far(m);
                    m.insert("aud".into(), json!("other"));
                }),
                |e| matches!(e, IdTokenError::Invalid(_)),
            ),
            (
                "expired",
                with(|m| {
                    m.insert("exp".into(), json!(1_000_000u64));
                }),
                |e| matches!(e, IdTokenError::Invalid(_)),
            ),
            (
                "nonce mismatch",
                with(|m| {
                    far(m);
                    m.insert("nonce".into(), json!("n2"));
                }),
                |e| *e == IdTokenError::Nonce,
            ),
            (
                "nonce missing",
                with(|m| {
                    far(m);
                    m.remove("nonce");
                }),
                |e| *e == IdTokenError::Nonce,
            ),
            (
                "azp for another client",
                with(|m| {
                    far(m);
                    m.insert("azp".into(), json!("other"));
                }),
                |e| *e == IdTokenError::Azp,
            ),
            (
                "several audiences, no azp",
                with(|m| {
                    far(m);
                    m.insert("aud".into(), json!(["client", "other"]));
                }),
                |e| *e == IdTokenError::Azp,
            ),
            (
                "issued in the future",
                with(|m| {
                    far(m);
                    m.insert("iat".into(), json!(NOW + 3600));
                }),
                |e| *e == IdTokenError::IssuedInFuture,
            ),
            (
                "no sub",
                with(|m| {
                    far(m);
                    m.remove("sub");
                }),
                |e| matches!(e, IdTokenError::Invalid(_)),
            ),
        ];
        for (what, token, expected) in cases {
            let err = check(&token)
                .err()
                .unwrap_or_else(|| panic!("{what}: accepted"));
            assert!(expected(&err), "{what}: {err:?}");
        }
        // Several audiences with azp naming this client are fine.
        let t = with(|m| {
            far(m);
            m.insert("aud".into(), json!(["client", "other"]));
            m.insert("azp".into(), json!("client"));
        });
        assert!(check(&t).is_ok());
    }

    #[test]
    fn signatures_and_algorithms() {
        let good = with(|m| {
            m.insert("exp".into(), json!(4_000_000_000u64));
        });
        // Unknown kid.
        let c: serde_json::Value = serde_json::from_str(
            &String::from_utf8(
                base64::Engine::decode(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                    good.split('.').nth(1).unwrap(),
                )
                .unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        assert!(matches!(
            check(&sign(&c, Some("k9"))),
            Err(IdTokenError::UnknownKey(_))
        ));
        // No kid: the only fitting key is used.
        assert!(check(&sign(&c, None)).is_ok());
        // Tampered payload.
        let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
        parts[1] = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            br#"{"sub":"mallory"}"#,
        );
        assert!(check(&parts.join(".")).is_err());
        // alg none and HS256 are refused before any key is looked at.
        let none = format!(
            "{}.{}.",
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                br#"{"alg":"none","kid":"k1"}"#
            ),
            parts[1]
        );
        assert!(check(&none).is_err());
        let hs = encode(
            &Header::new(Algorithm::HS256),
            &c,
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        assert!(matches!(check(&hs), Err(IdTokenError::Algorithm(_))));
        for garbage in ["", "a.b.c", "not a token", "...."] {
            assert!(check(garbage).is_err());
        }
    }
}
