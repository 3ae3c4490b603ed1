//! ID-token validation (OpenID Connect Core §3.1.3.7): signature via JWKS,
//! `iss`, `aud`, `azp`, `exp`/`iat`/`nbf` with clock skew, `nonce`, a usable `sub`, and
//! `at_hash` against the access token issued with it (§3.1.3.8) when the token states one.

use super::jwks::{KeySet, Refusal};
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
    #[error("the provider's keys, fetched just now, hold none for the ID token (kid {0})")]
    UnpublishedKey(String),
    #[error("ID token signature does not verify with the provider's keys")]
    BadSignature,
    #[error("ID token rejected: {0}")]
    Invalid(String),
    #[error("ID token nonce does not match")]
    Nonce,
    #[error("ID token azp does not name this client (or several audiences and no azp)")]
    Azp,
    #[error("ID token issued in the future")]
    IssuedInFuture,
    #[error("ID token not valid yet (nbf)")]
    NotYetValid,
    #[error("ID token sub is empty or cannot be sent in a header")]
    Subject,
    #[error("ID token at_hash does not match the access token issued with it")]
    AccessTokenHash,
}

/// Whether `sub` can identify a user upstream: non-empty (OpenID Connect Core §2), and a
/// header value that arrives unchanged — printable ASCII (§2: ASCII; a control character or
/// line break cannot be sent at all), no surrounding blanks (a receiver strips them, so
/// ` alice` would arrive as `alice`). A session for any other sub would reach the upstream
/// without its user header, or with someone else's.
fn usable_subject(sub: &str) -> bool {
    !sub.is_empty() && sub.trim() == sub && sub.bytes().all(|b| (b' '..=b'~').contains(&b))
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

/// An RFC 7519 NumericDate: seconds, a JSON number that may be fractional (read to the
/// second below it). Negative, non-finite or non-numeric values are refused.
pub(crate) fn numeric_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    whole_seconds(&serde_json::Number::deserialize(d)?)
        .ok_or_else(|| serde::de::Error::custom("not a NumericDate"))
}

/// A JSON number of seconds, fractions dropped (saturating); `None` if negative or not finite.
pub(crate) fn whole_seconds(n: &serde_json::Number) -> Option<u64> {
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
    })
}

pub(crate) fn optional_numeric_date<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    struct Date(#[serde(deserialize_with = "numeric_date")] u64);
    Ok(Option::<Date>::deserialize(d)?.map(|Date(secs)| secs))
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(deserialize_with = "numeric_date")]
    iat: u64,
    /// Seconds (a JSON number, possibly fractional, as RFC 7519 §2 NumericDate allows).
    nbf: Option<f64>,
    aud: OneOrMany,
    azp: Option<String>,
    nonce: Option<String>,
    sid: Option<String>,
    at_hash: Option<String>,
    #[serde(flatten)]
    profile: Profile,
}

/// The claims about the user, as an ID token or the userinfo endpoint states them.
#[derive(Debug, Deserialize)]
pub struct Profile {
    sub: String,
    email: Option<String>,
    #[serde(default)]
    email_verified: Option<serde_json::Value>,
    name: Option<String>,
    preferred_username: Option<String>,
}

pub type ClaimSet = serde_json::Map<String, serde_json::Value>;

/// The groups claim `claim` of a token's or userinfo's claims, when stated at all (a string
/// or a list of strings). Looked up in all the claims, not in what the structs above leave
/// over: any claim may hold the groups, a standard one (`preferred_username`, `email`) too.
///
/// A claim of that exact name wins; otherwise a dotted name is a path into nested objects
/// (Keycloak's `realm_access.roles`). Exact first, since claim names may hold dots
/// themselves (Auth0's namespaced `https://example.com/groups`).
fn groups(claims: &ClaimSet, claim: &str) -> Option<Vec<String>> {
    let value = match claims.get(claim) {
        Some(v) => v,
        None => {
            let mut names = claim.split('.');
            let first = claims.get(names.next()?)?;
            names.try_fold(first, |v, name| v.as_object()?.get(name))?
        }
    };
    match value {
        serde_json::Value::String(s) => Some(vec![s.clone()]),
        serde_json::Value::Array(a) => Some(
            a.iter()
                .filter_map(|g| g.as_str().map(str::to_string))
                .collect(),
        ),
        _ => None,
    }
}

impl Profile {
    fn email_verified(&self) -> bool {
        match &self.email_verified {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::String(s)) => s == "true",
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserinfoError {
    #[error("userinfo answer is not a JSON object with a sub: {0}")]
    Malformed(String),
    #[error("userinfo names another subject than the ID token")]
    Subject,
}

/// What a validated ID token tells the gateway.
#[derive(Debug, Clone)]
pub struct ValidIdToken {
    pub identity: Identity,
    /// Whether the token states the groups claim (an empty list is a statement too).
    pub groups_stated: bool,
    /// Whether `email_verified` was there at all (absent is not "unverified" for an email
    /// the session already knew verified).
    pub email_verified_stated: bool,
}

impl ValidIdToken {
    /// Whether the token leaves out claims the userinfo endpoint may have: a provider that
    /// follows OpenID Connect Core §5.4 puts scope claims in the ID token only when asked to.
    pub fn incomplete(&self) -> bool {
        self.identity.email.is_none() || !self.groups_stated
    }

    /// Fills the claims the token left out from a userinfo answer (JSON), which must be about
    /// the same subject (OpenID Connect Core §5.3.2). What the token states is kept.
    pub fn complete_from(
        &mut self,
        userinfo: &[u8],
        groups_claim: &str,
    ) -> Result<(), UserinfoError> {
        let claims: ClaimSet = serde_json::from_slice(userinfo)
            .map_err(|e| UserinfoError::Malformed(e.to_string()))?;
        self.complete_from_claims(claims, groups_claim)
    }

    /// [`complete_from`](Self::complete_from) for claims already read (a signed answer's).
    pub fn complete_from_claims(
        &mut self,
        claims: ClaimSet,
        groups_claim: &str,
    ) -> Result<(), UserinfoError> {
        let stated_groups = groups(&claims, groups_claim);
        let p: Profile = serde_json::from_value(serde_json::Value::Object(claims))
            .map_err(|e| UserinfoError::Malformed(e.to_string()))?;
        if !ct_eq(p.sub.as_bytes(), self.identity.sub.as_bytes()) {
            return Err(UserinfoError::Subject);
        }
        let id = &mut self.identity;
        if id.email.is_none() && p.email.is_some() {
            id.email_verified = p.email_verified();
            id.email = p.email.clone();
        }
        if id.name.is_none() {
            id.name = p.name.clone();
        }
        if id.preferred_username.is_none() {
            id.preferred_username = p.preferred_username.clone();
        }
        if !self.groups_stated {
            if let Some(groups) = stated_groups {
                id.groups = groups;
                self.groups_stated = true;
            }
        }
        Ok(())
    }

    /// A refreshed token's identity: what it (and userinfo) stated, the rest kept from the
    /// session's identity `before` (a provider may leave claims out of refreshed tokens).
    pub fn refreshed_identity(self, before: &Identity) -> Identity {
        let mut id = self.identity;
        if id.email.is_none() {
            id.email.clone_from(&before.email);
            id.email_verified = before.email_verified;
        } else if !self.email_verified_stated && id.email == before.email {
            id.email_verified = before.email_verified;
        }
        if id.name.is_none() {
            id.name.clone_from(&before.name);
        }
        if id.preferred_username.is_none() {
            id.preferred_username.clone_from(&before.preferred_username);
        }
        if !self.groups_stated {
            id.groups.clone_from(&before.groups);
        }
        if id.sid.is_none() {
            id.sid.clone_from(&before.sid);
        }
        id
    }
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
    /// The access token issued with the ID token, which its `at_hash` (if any) must match.
    pub access_token: Option<&'a str>,
}

/// The `kid` and algorithm a token says it was signed with (to pick/refresh keys).
pub fn header(token: &str) -> Result<(Option<String>, Algorithm), IdTokenError> {
    let h = jsonwebtoken::decode_header(token).map_err(|_| match stated_algorithm(token) {
        // An algorithm jsonwebtoken has no name for (ES512, Ed25519 as RFC 9864 names it):
        // said as such, so that the provider's setting can be changed.
        Some(alg) => IdTokenError::Algorithm(alg),
        None => IdTokenError::Malformed,
    })?;
    if !ACCEPTED_ALGORITHMS.contains(&h.alg) {
        return Err(IdTokenError::Algorithm(format!("{:?}", h.alg)));
    }
    Ok((h.kid, h.alg))
}

/// Why the key set did not verify a token with `kid`, as the token's error.
fn refused(e: Refusal, kid: Option<&str>) -> IdTokenError {
    match e {
        Refusal::NoKey => IdTokenError::UnknownKey(kid_named(kid)),
        Refusal::BadSignature => IdTokenError::BadSignature,
        Refusal::Invalid(e) => IdTokenError::Invalid(e.to_string()),
    }
}

/// A token's `kid` as errors name it: without one, only a key set holding exactly one key of
/// the token's type can verify it (OpenID Connect Core §10.1).
pub(crate) fn kid_named(kid: Option<&str>) -> String {
    kid.map_or_else(
        || "none, and the key set does not hold exactly one key of its type".to_string(),
        str::to_string,
    )
}

/// The `alg` a JWS header states, whatever it is (for the error message only; bounded).
fn stated_algorithm(token: &str) -> Option<String> {
    use base64::Engine;
    let header = token.split('.').next()?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let alg = v.get("alg")?.as_str()?;
    let printable = !alg.is_empty()
        && alg.len() <= 32
        && alg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    printable.then(|| alg.to_string())
}

pub fn validate(
    token: &str,
    keys: &KeySet,
    exp: &Expectations<'_>,
) -> Result<ValidIdToken, IdTokenError> {
    let (kid, alg) = header(token)?;
    let mut v = Validation::new(alg);
    v.leeway = exp.clock_skew.as_secs();
    v.set_issuer(&[exp.issuer]);
    v.set_audience(&[exp.client_id]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let all = keys
        .decode::<ClaimSet>(token, kid.as_deref(), alg, &v)
        .map_err(|e| refused(e, kid.as_deref()))?;
    let groups = groups(&all, exp.groups_claim);
    let c: Claims = serde_json::from_value(serde_json::Value::Object(all))
        .map_err(|e| IdTokenError::Invalid(e.to_string()))?;
    let latest = exp.now + exp.clock_skew.as_secs();
    if c.iat > latest {
        return Err(IdTokenError::IssuedInFuture);
    }
    // Checked here, against the same clock and skew as iat (jsonwebtoken skips nbf by default).
    if c.nbf.is_some_and(|nbf| nbf > latest as f64) {
        return Err(IdTokenError::NotYetValid);
    }
    if !usable_subject(&c.profile.sub) {
        return Err(IdTokenError::Subject);
    }
    let aud = c.aud.into_vec();
    match &c.azp {
        Some(azp) if azp != exp.client_id => return Err(IdTokenError::Azp),
        None if aud.len() > 1 => return Err(IdTokenError::Azp),
        _ => {}
    }
    if let (Some(stated), Some(token)) = (&c.at_hash, exp.access_token) {
        // Ties the access token to the signed ID token: one swapped in on the way (or by a
        // token endpoint mixing up answers) is not forwarded under this identity.
        if !ct_eq(stated.as_bytes(), access_token_hash(alg, token).as_bytes()) {
            return Err(IdTokenError::AccessTokenHash);
        }
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
    let email_verified = c.profile.email_verified();
    let email_verified_stated = c.profile.email_verified.is_some();
    let p = c.profile;
    Ok(ValidIdToken {
        groups_stated: groups.is_some(),
        email_verified_stated,
        identity: Identity {
            sub: p.sub,
            email: p.email,
            email_verified,
            name: p.name,
            preferred_username: p.preferred_username,
            groups: groups.unwrap_or_default(),
            sid: c.sid,
        },
    })
}

/// The claims of a signed userinfo answer (OpenID Connect Core §5.3.2, `application/jwt`),
/// once its signature holds with the provider's keys and its `iss` and `aud`, when
/// stated (they SHOULD be), name the provider and this client.
pub fn signed_userinfo(
    token: &str,
    keys: &KeySet,
    issuer: &str,
    client_id: &str,
) -> Result<ClaimSet, IdTokenError> {
    let (kid, alg) = header(token)?;
    let mut v = Validation::new(alg);
    v.validate_exp = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    let claims: ClaimSet = keys
        .decode(token, kid.as_deref(), alg, &v)
        .map_err(|e| refused(e, kid.as_deref()))?;
    if claims
        .get("iss")
        .is_some_and(|i| i.as_str() != Some(issuer))
    {
        return Err(IdTokenError::Invalid("iss names another issuer".into()));
    }
    let for_us = |a: &serde_json::Value| a.as_str() == Some(client_id);
    let aud_ok = match claims.get("aud") {
        None => true,
        Some(serde_json::Value::Array(list)) => list.iter().any(for_us),
        Some(one) => for_us(one),
    };
    if !aud_ok {
        return Err(IdTokenError::Invalid(
            "aud does not name this client".into(),
        ));
    }
    Ok(claims)
}

/// An access token's `at_hash` (OpenID Connect Core §3.2.2.9): the left half of its digest
/// under the hash of the ID token's algorithm, base64url. Ed25519 signs with SHA-512.
pub(crate) fn access_token_hash(alg: Algorithm, token: &str) -> String {
    use base64::Engine as _;
    use sha2::{Digest, Sha256, Sha384, Sha512};
    let digest: Vec<u8> = match alg {
        Algorithm::RS256 | Algorithm::PS256 | Algorithm::ES256 | Algorithm::HS256 => {
            Sha256::digest(token).to_vec()
        }
        Algorithm::RS384 | Algorithm::PS384 | Algorithm::ES384 | Algorithm::HS384 => {
            Sha384::digest(token).to_vec()
        }
        Algorithm::RS512 | Algorithm::PS512 | Algorithm::HS512 | Algorithm::EdDSA => {
            Sha512::digest(token).to_vec()
        }
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..digest.len() / 2])
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
    pub const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","alg":"ES256","use":"sig",
        "x":"rwqlmPo6FdhmaSBysKFDD65b0vWaMW-a9KWPsGGiv28","y":"ygc29Sag4kVBVhH4wsSj7eQaJa_ZqH6IYy9ATqEX0Dk"}]}"#;
    pub const NOW: u64 = 1_800_000_000;

    pub fn keys() -> KeySet {
        KeySet::parse(JWKS.as_bytes()).unwrap()
    }

    fn claims() -> serde_json::Value {
        json!({"iss": "https://idp", "aud": "client", "sub": "alice", "exp": NOW + 300,
               "iat": NOW as f64 + 0.5, "nonce": "n1", "email": "a@x", "email_verified": true,
               "groups": ["g1", "g2"], "sid": "s1"})
    }

    pub fn sign(c: &serde_json::Value, kid: Option<&str>) -> String {
        sign_typed(c, kid, Some("JWT"))
    }

    /// As `sign`, with this `typ` header (`None`: none).
    pub fn sign_typed(c: &serde_json::Value, kid: Option<&str>, typ: Option<&str>) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = kid.map(str::to_string);
        h.typ = typ.map(str::to_string);
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
        check_groups_in(token, "groups")
    }

    fn check_groups_in(token: &str, groups_claim: &str) -> Result<ValidIdToken, IdTokenError> {
        validate(token, &keys(), &expectations(groups_claim))
    }

    /// The tests' provider, client and clock, a login's nonce, and a minute of clock skew.
    fn expectations(groups_claim: &str) -> Expectations<'_> {
        Expectations {
            issuer: "https://idp",
            client_id: "client",
            nonce: Some("n1"),
            clock_skew: Duration::from_secs(60),
            groups_claim,
            now: NOW,
            access_token: None,
        }
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

    /// A far-future `exp` (jsonwebtoken checks it against the real clock) and `f`'s changes.
    fn valid(f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> ValidIdToken {
        check(&with(|m| {
            m.insert("exp".into(), json!(4_000_000_000u64));
            f(m);
        }))
        .unwrap()
    }

    #[test]
    fn userinfo_fills_only_what_the_token_left_out() {
        // A token with the scope claims (a provider that puts them in the ID token).
        let full = valid(|_| {});
        assert!(!full.incomplete());
        // Only sub and sid, as OIDC Core §5.4 has it when the claims go to userinfo.
        let mut bare = valid(|m| {
            for k in ["email", "email_verified", "groups"] {
                m.remove(k);
            }
        });
        assert!(bare.incomplete());
        assert!(bare.identity.email.is_none() && bare.identity.groups.is_empty());
        let info = br#"{"sub":"alice","email":"alice@corp.test","email_verified":true,
            "name":"Alice","groups":["admins"],"extra":1}"#;
        bare.complete_from(info, "groups").unwrap();
        assert_eq!(bare.identity.email.as_deref(), Some("alice@corp.test"));
        assert!(bare.identity.email_verified);
        assert_eq!(bare.identity.name.as_deref(), Some("Alice"));
        assert_eq!(bare.identity.groups, ["admins"]);
        assert!(!bare.incomplete());
        assert_eq!(bare.identity.sid.as_deref(), Some("s1"));

        // What the token states wins, an empty group list included.
        let mut stated = valid(|m| {
            m.insert("groups".into(), json!([]));
            m.remove("email");
        });
        assert!(stated.groups_stated);
        stated.complete_from(info, "groups").unwrap();
        assert!(stated.identity.groups.is_empty());
        assert_eq!(stated.identity.email.as_deref(), Some("alice@corp.test"));
        // An unverified userinfo email stays unverified.
        let mut bare2 = valid(|m| {
            m.remove("email");
        });
        bare2
            .complete_from(br#"{"sub":"alice","email":"a@b"}"#, "groups")
            .unwrap();
        assert!(!bare2.identity.email_verified);
    }

    #[test]
    fn userinfo_about_someone_else_or_malformed_changes_nothing() {
        let mut bare = valid(|m| {
            m.remove("email");
            m.remove("groups");
        });
        let other = br#"{"sub":"mallory","email":"m@evil.test","groups":["admins"]}"#;
        assert_eq!(
            bare.complete_from(other, "groups"),
            Err(UserinfoError::Subject)
        );
        for junk in [
            &b"not json"[..],
            b"[]",
            br#"{"email":"x@y"}"#,
            br#""alice""#,
        ] {
            assert!(matches!(
                bare.complete_from(junk, "groups"),
                Err(UserinfoError::Malformed(_))
            ));
        }
        assert!(bare.identity.email.is_none() && bare.identity.groups.is_empty());
    }

    #[test]
    fn a_refreshed_token_keeps_what_it_leaves_out() {
        let before = valid(|_| {}).identity;
        // The refreshed token states a new email and no groups claim, and no sid.
        let fresh = valid(|m| {
            m.insert("email".into(), json!("new@x"));
            m.remove("groups");
            m.remove("sid");
        });
        let id = fresh.refreshed_identity(&before);
        assert_eq!(id.email.as_deref(), Some("new@x"));
        assert_eq!(id.groups, ["g1", "g2"]);
        assert_eq!(id.sid.as_deref(), Some("s1"));
        // A stated empty group list is a change: the user left every group.
        let left = valid(|m| {
            m.insert("groups".into(), json!([]));
        });
        assert!(left.refreshed_identity(&before).groups.is_empty());
        // The same email without email_verified stays verified; a new one, or a stated
        // false, does not.
        assert!(before.email_verified);
        let silent = valid(|m| {
            m.remove("email_verified");
        });
        assert!(silent.refreshed_identity(&before).email_verified);
        let moved = valid(|m| {
            m.remove("email_verified");
            m.insert("email".into(), json!("new@x"));
        });
        assert!(!moved.refreshed_identity(&before).email_verified);
        let denied = valid(|m| {
            m.insert("email_verified".into(), json!(false));
        });
        assert!(!denied.refreshed_identity(&before).email_verified);
    }

    #[test]
    fn at_hash_is_the_left_half_of_the_access_tokens_digest() {
        // OpenID Connect Core, Appendix A.3 (RS256), and the same token under SHA-384/512.
        let t = "jHkWEdUXMU1BwAsC4vtUsZwnNvTIxEl0z9K3vx5KF0Y";
        assert_eq!(
            access_token_hash(Algorithm::RS256, t),
            "77QmUPtjPfzWtF2AnpK9RQ"
        );
        assert_eq!(
            access_token_hash(Algorithm::ES384, t),
            "jtAeDp945y1dDqU3nkIVGNZP1HjH_MFs"
        );
        assert_eq!(
            access_token_hash(Algorithm::EdDSA, t),
            "q7nS86GgvvFaZkzALLWqJYaJIKw2wCDAVfCAsm5CrBM"
        );
    }

    #[test]
    fn an_at_hash_must_match_the_access_token_issued_with_it() {
        let issued = "access-token-issued-with-the-id-token";
        let token = |at_hash: Option<&str>| {
            with(|m| {
                m.insert("exp".into(), json!(4_000_000_000u64));
                if let Some(h) = at_hash {
                    m.insert("at_hash".into(), json!(h));
                }
            })
        };
        let check_with = |t: &str, access_token: Option<&str>| {
            let exp = Expectations {
                access_token,
                ..expectations("groups")
            };
            validate(t, &keys(), &exp)
        };
        let right = access_token_hash(Algorithm::ES256, issued);
        assert!(check_with(&token(Some(&right)), Some(issued)).is_ok());
        // Another access token than the one the ID token was issued with.
        assert_eq!(
            check_with(&token(Some(&right)), Some("a-swapped-access-token")).err(),
            Some(IdTokenError::AccessTokenHash)
        );
        // The hash under another algorithm than the token's (ES256: SHA-256).
        let sha512 = access_token_hash(Algorithm::EdDSA, issued);
        assert_eq!(
            check_with(&token(Some(&sha512)), Some(issued)).err(),
            Some(IdTokenError::AccessTokenHash)
        );
        // at_hash is optional in the code flow: a token without one is not refused for it.
        assert!(check_with(&token(None), Some(issued)).is_ok());
        // Not a string: the claims do not parse.
        let numeric = with(|m| {
            m.insert("exp".into(), json!(4_000_000_000u64));
            m.insert("at_hash".into(), json!(7));
        });
        assert!(matches!(
            check_with(&numeric, Some(issued)),
            Err(IdTokenError::Invalid(_))
        ));
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
            (
                "not valid for an hour (nbf)",
                with(|m| {
                    far(m);
                    m.insert("nbf".into(), json!(NOW + 3600));
                }),
                |e| *e == IdTokenError::NotYetValid,
            ),
            (
                "nbf just past the clock skew, as a fraction",
                with(|m| {
                    far(m);
                    m.insert("nbf".into(), json!(NOW as f64 + 60.5));
                }),
                |e| *e == IdTokenError::NotYetValid,
            ),
            (
                "nbf not a number",
                with(|m| {
                    far(m);
                    m.insert("nbf".into(), json!("soon"));
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
        // A sub the identity header cannot carry as it is: empty, line breaks, control
        // characters, non-ASCII, surrounding blanks.
        for sub in [
            "",
            "alice\r\nX-Forwarded-Groups: admins",
            "alice\n",
            "\ralice",
            "al\u{0}ice",
            "al\tice",
            "al\u{7f}ice",
            "jos\u{e9}",
            " alice",
            "alice ",
        ] {
            let t = with(|m| {
                far(m);
                m.insert("sub".into(), json!(sub));
            });
            assert_eq!(check(&t).err(), Some(IdTokenError::Subject), "{sub:?}");
        }
        for sub in ["auth0|5f7c8ec7c33c6c004bbafe82", "alice smith", "a"] {
            let t = with(|m| {
                far(m);
                m.insert("sub".into(), json!(sub));
            });
            assert_eq!(check(&t).unwrap().identity.sub, sub);
        }
        // iat ahead by up to the clock skew (60 s) is fine; one second more is not.
        for (iat, ok) in [(NOW + 60, true), (NOW + 61, false)] {
            let t = with(|m| {
                far(m);
                m.insert("iat".into(), json!(iat));
            });
            assert_eq!(check(&t).is_ok(), ok, "iat now + {}", iat - NOW);
        }
        // nbf in the past, or ahead within the clock skew, is fine.
        for nbf in [json!(NOW - 10), json!(NOW + 60), json!(NOW as f64 + 59.9)] {
            let t = with(|m| {
                far(m);
                m.insert("nbf".into(), nbf.clone());
            });
            assert!(check(&t).is_ok(), "nbf {nbf}");
        }
        // Several audiences with azp naming this client are fine.
        let t = with(|m| {
            far(m);
            m.insert("aud".into(), json!(["client", "other"]));
            m.insert("azp".into(), json!("client"));
        });
        assert!(check(&t).is_ok());
    }

    /// `authorization.groups_claim` may name any claim, also one the token's claims are
    /// parsed into named fields for (`preferred_username`, `sub`, `sid`, `aud`, ...).
    #[test]
    fn a_signed_userinfo_answer_must_verify_and_name_this_provider_and_client() {
        let keys = keys();
        let read = |c: serde_json::Value| {
            signed_userinfo(&sign(&c, Some("k1")), &keys, "https://idp", "client")
        };
        let ok =
            read(json!({"sub": "alice", "iss": "https://idp", "aud": "client", "email": "a@x"}));
        assert_eq!(ok.unwrap()["email"], "a@x");
        assert!(read(json!({"sub": "alice", "aud": ["other", "client"]})).is_ok());
        assert!(
            read(json!({"sub": "alice"})).is_ok(),
            "iss and aud are SHOULDs"
        );
        assert!(read(json!({"sub": "alice", "iss": "https://evil"})).is_err());
        assert!(read(json!({"sub": "alice", "aud": "other"})).is_err());
        let good = sign(&json!({"sub": "alice"}), Some("k1"));
        let (head, rest) = good.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let forged = format!(
            "{head}.{}.{sig}",
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                br#"{"sub":"mallory"}"#
            )
        );
        assert!(signed_userinfo(&forged, &keys, "https://idp", "client").is_err());
    }

    #[test]
    fn a_dotted_groups_claim_is_a_path_unless_a_claim_has_that_name() {
        let t = with(|m| {
            m.insert("exp".into(), json!(4_000_000_000u64));
            m.insert("realm_access".into(), json!({"roles": ["admin", "dev"]}));
            m.insert("https://example.com/groups".into(), json!(["ns"]));
            m.insert("a.b".into(), json!("exact"));
            m.insert("a".into(), json!({"b": "nested"}));
        });
        for (claim, want) in [
            ("realm_access.roles", vec!["admin", "dev"]),
            ("https://example.com/groups", vec!["ns"]),
            ("a.b", vec!["exact"]),
        ] {
            let v = check_groups_in(&t, claim).unwrap();
            assert!(v.groups_stated, "{claim}");
            assert_eq!(v.identity.groups, want, "{claim}");
        }
        for claim in [
            "realm_access.missing",
            "realm_access",
            "realm_access.roles.x",
            ".",
        ] {
            let v = check_groups_in(&t, claim).unwrap();
            assert!(!v.groups_stated && v.identity.groups.is_empty(), "{claim}");
        }
        // From userinfo too.
        let bare = with(|m| {
            m.insert("exp".into(), json!(4_000_000_000u64));
        });
        let mut v = check_groups_in(&bare, "realm_access.roles").unwrap();
        v.complete_from(
            br#"{"sub":"alice","realm_access":{"roles":["ops"]}}"#,
            "realm_access.roles",
        )
        .unwrap();
        assert_eq!(v.identity.groups, ["ops"]);
    }

    #[test]
    fn the_groups_claim_may_be_a_standard_claim() {
        let t = with(|m| {
            m.insert("exp".into(), json!(4_000_000_000u64));
            m.insert("preferred_username".into(), json!("alice.b"));
            m.insert("name".into(), json!("Alice B"));
            m.insert("roles".into(), json!(["r1", 7, "r2"]));
        });
        for (claim, want) in [
            ("preferred_username", vec!["alice.b"]),
            ("name", vec!["Alice B"]),
            ("sub", vec!["alice"]),
            ("email", vec!["a@x"]),
            ("sid", vec!["s1"]),
            ("aud", vec!["client"]),
            ("iss", vec!["https://idp"]),
            ("nonce", vec!["n1"]),
            ("roles", vec!["r1", "r2"]),
            ("groups", vec!["g1", "g2"]),
        ] {
            let v = check_groups_in(&t, claim).unwrap();
            assert!(v.groups_stated, "{claim}");
            assert_eq!(v.identity.groups, want, "{claim}");
            // What else is read from the claim is unchanged.
            assert_eq!(v.identity.preferred_username.as_deref(), Some("alice.b"));
            assert_eq!(v.identity.sub, "alice");
            assert_eq!(v.identity.sid.as_deref(), Some("s1"));
        }
        // Not a string or a list (a number, a bool), or absent: no groups stated.
        for claim in ["iat", "email_verified", "missing"] {
            let v = check_groups_in(&t, claim).unwrap();
            assert!(!v.groups_stated && v.identity.groups.is_empty(), "{claim}");
        }
        // The same from userinfo, for a token that leaves the claim out.
        let bare = with(|m| {
            m.insert("exp".into(), json!(4_000_000_000u64));
            m.remove("email");
        });
        let mut v = check_groups_in(&bare, "preferred_username").unwrap();
        assert!(!v.groups_stated);
        v.complete_from(
            br#"{"sub":"alice","email":"a@x","preferred_username":"alice.b"}"#,
            "preferred_username",
        )
        .unwrap();
        assert_eq!(v.identity.groups, ["alice.b"]);
        assert_eq!(v.identity.preferred_username.as_deref(), Some("alice.b"));
    }

    /// Keys of different types, and a rotation, may share a kid (RFC 7517 §4.5) and need
    /// not name their `alg`: the token's algorithm picks by type and curve, and each key of
    /// the kid is tried.
    #[test]
    fn keys_sharing_a_kid_are_told_apart() {
        let shared = r#"{"keys":[
            {"kty":"RSA","kid":"k1","e":"AQAB","n":"yz5Jz6443zRqNejwsgdmTJ7yng5akWbzX3U5HSwBOf18WscsZi_jg9OP3-C1Efq4Fp0pj82PoE2s0LdmBu7BVGm6-sTLqFT007vEpSDGCwt_7zwlUdy6JGgYsTVQONZkdvD5--2VsTghq611RaltK0BUZtYQBTka0OrdgQD1Kfs"},
            {"kty":"EC","crv":"P-256","kid":"k1","x":"YFdquIo26TV4uYzu83b6fwYbMCeFTXYaCzRNX_f3h6o","y":"QIcxwBrjnbvgHlZ0fkJvCz6POamNXfOBHX6fFNVLMVc"},
            {"kty":"EC","crv":"P-256","kid":"k1","x":"rwqlmPo6FdhmaSBysKFDD65b0vWaMW-a9KWPsGGiv28","y":"ygc29Sag4kVBVhH4wsSj7eQaJa_ZqH6IYy9ATqEX0Dk"}]}"#;
        let keys = KeySet::parse(shared.as_bytes()).unwrap();
        assert_eq!(keys.len(), 3);
        let exp = expectations("groups");
        let good = with(|m| {
            m.insert("exp".into(), json!(4_000_000_000u64));
        });
        let v = validate(&good, &keys, &exp).unwrap();
        assert_eq!(v.identity.sub, "alice");
        // Signed by none of them: a bad signature (the provider's keys are then re-fetched
        // once, for a key replaced under the same kid), not taken for an unknown key.
        let mut forged: Vec<&str> = good.split('.').collect();
        let other = with(|m| {
            m.insert("exp".into(), json!(4_000_000_001u64));
        });
        forged[2] = other.split('.').nth(2).unwrap();
        assert_eq!(
            validate(&forged.join("."), &keys, &exp).err(),
            Some(IdTokenError::BadSignature)
        );
        // An ES384 token has no P-384 key to go to under that kid.
        let mut h: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                good.split('.').next().unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        h["alg"] = json!("ES384");
        let header = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            h.to_string(),
        );
        let relabelled = format!("{header}.{}.{}", forged[1], forged[2]);
        assert!(matches!(
            validate(&relabelled, &keys, &exp),
            Err(IdTokenError::UnknownKey(_))
        ));
    }

    /// Many keys under one kid cost a token at most four signature checks (logout tokens come
    /// from anyone): the signing key behind four others of its kid and type is not reached.
    #[test]
    fn at_most_four_keys_of_a_kid_are_tried() {
        let decoy = r#"{"kty":"EC","crv":"P-256","kid":"k1","x":"YFdquIo26TV4uYzu83b6fwYbMCeFTXYaCzRNX_f3h6o","y":"QIcxwBrjnbvgHlZ0fkJvCz6POamNXfOBHX6fFNVLMVc"}"#;
        let signing = r#"{"kty":"EC","crv":"P-256","kid":"k1","x":"rwqlmPo6FdhmaSBysKFDD65b0vWaMW-a9KWPsGGiv28","y":"ygc29Sag4kVBVhH4wsSj7eQaJa_ZqH6IYy9ATqEX0Dk"}"#;
        let set = |decoys: usize| {
            let keys = format!("{decoy},").repeat(decoys) + signing;
            KeySet::parse(format!(r#"{{"keys":[{keys}]}}"#).as_bytes()).unwrap()
        };
        let exp = expectations("groups");
        let good = with(|m| {
            m.insert("exp".into(), json!(4_000_000_000u64));
        });
        assert_eq!(
            validate(&good, &set(3), &exp).unwrap().identity.sub,
            "alice"
        );
        assert_eq!(
            validate(&good, &set(4), &exp).err(),
            Some(IdTokenError::BadSignature)
        );
    }

    /// ES384 (P-384) and EdDSA (Ed25519) providers sign in as well as ES256 and RS256 ones,
    /// their keys sharing the kid with a P-256 one.
    #[test]
    fn p384_and_ed25519_keys_verify_their_tokens() {
        const P384: &str = "-----BEGIN PRIVATE KEY-----
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDAkgL3lZMAMB8De+gbf
sjZMqeb0e4YCZvkCmlXvx/eNOY96je6QGfyjfpofehAl8SShZANiAARoxuzdvM6I
g82wBUoTaoO+12mwaaj/raUUJv/TG4f7vVtkFVXlOw0TOgXmu0g9susSqWRbRIyC
uQpl4OMaTvosnA4grNFP7yuwdBSVJ1v+Aj25NOw5+N3CUtIDd+dEaAQ=
-----END PRIVATE KEY-----";
        const ED25519: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIFhMqk3bB9YbG6cHKYQHPc1578vtVGqKCuc3rOzXEUZ7
-----END PRIVATE KEY-----";
        let jwks = r#"{"keys":[
            {"kty":"EC","crv":"P-256","kid":"k1","x":"rwqlmPo6FdhmaSBysKFDD65b0vWaMW-a9KWPsGGiv28","y":"ygc29Sag4kVBVhH4wsSj7eQaJa_ZqH6IYy9ATqEX0Dk"},
            {"kty":"EC","crv":"P-384","kid":"k1","x":"aMbs3bzOiIPNsAVKE2qDvtdpsGmo_62lFCb_0xuH-71bZBVV5TsNEzoF5rtIPbLr","y":"EqlkW0SMgrkKZeDjGk76LJwOIKzRT-8rsHQUlSdb_gI9uTTsOfjdwlLSA3fnRGgE"},
            {"kty":"OKP","crv":"Ed25519","kid":"k1","x":"K1rdwAFGLm_ZKObHzK61cwydU88y6agTopwUGR77dKo"}]}"#;
        let keys = KeySet::parse(jwks.as_bytes()).unwrap();
        let exp = expectations("groups");
        let signers = [
            (
                Algorithm::ES384,
                EncodingKey::from_ec_pem(P384.as_bytes()).unwrap(),
            ),
            (
                Algorithm::EdDSA,
                EncodingKey::from_ed_pem(ED25519.as_bytes()).unwrap(),
            ),
        ];
        for (alg, key) in signers {
            let mut h = Header::new(alg);
            h.kid = Some("k1".into());
            let token = encode(&h, &claims(), &key).unwrap();
            let v = validate(&token, &keys, &exp);
            assert_eq!(
                v.map(|v| v.identity.sub).ok().as_deref(),
                Some("alice"),
                "{alg:?}"
            );
        }
    }

    /// An Ed25519 key of small order in the provider's key set (the identity point, say)
    /// would verify a signature of anyone's making: such keys are skipped, and a token
    /// "signed" for one finds no key.
    #[test]
    fn small_order_ed25519_keys_verify_nothing() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        use base64::Engine as _;
        let hex = [
            "0000000000000000000000000000000000000000000000000000000000000000",
            "0000000000000000000000000000000000000000000000000000000000000080",
            "0100000000000000000000000000000000000000000000000000000000000000",
            "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
            "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
            "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
            "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
            "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        ];
        let weak: Vec<String> = hex
            .iter()
            .map(|h| {
                let bytes: Vec<u8> = (0..32)
                    .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap())
                    .collect();
                format!(
                    r#"{{"kty":"OKP","crv":"Ed25519","kid":"ed0","x":"{}"}}"#,
                    B64.encode(bytes)
                )
            })
            .collect();
        let good = r#"{"kty":"OKP","crv":"Ed25519","kid":"k1","x":"K1rdwAFGLm_ZKObHzK61cwydU88y6agTopwUGR77dKo"}"#;
        let jwks = format!(r#"{{"keys":[{},{good}]}}"#, weak.join(","));
        assert_eq!(KeySet::parse(jwks.as_bytes()).unwrap().len(), 1);
        // R the identity, S zero: valid for the identity key, whatever was signed.
        let header = B64.encode(r#"{"alg":"EdDSA","kid":"ed0"}"#);
        let body = B64.encode(claims().to_string());
        let mut sig = [0u8; 64];
        sig[0] = 1;
        let forged = format!("{header}.{body}.{}", B64.encode(sig));
        let identity = format!(r#"{{"keys":[{}]}}"#, weak[2]);
        let keys = KeySet::parse(identity.as_bytes()).unwrap();
        assert!(validate(&forged, &keys, &expectations("groups")).is_err());
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
        // Algorithms without a name here are named in the refusal, not called malformed.
        for alg in ["Ed25519", "ES512"] {
            let t = format!(
                "{}.{}.c2ln",
                base64::Engine::encode(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                    format!(r#"{{"alg":"{alg}","kid":"k1"}}"#)
                ),
                parts[1]
            );
            match check(&t) {
                Err(e @ IdTokenError::Algorithm(_)) => assert!(e.to_string().contains(alg), "{e}"),
                other => panic!("{alg}: {:?}", other.map(|v| v.identity.sub)),
            }
        }
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
