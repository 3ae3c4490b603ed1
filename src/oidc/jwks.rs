//! The provider's signing keys, parsed once per fetch.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::time::{Duration, Instant};

/// An unknown `kid` forces a JWKS re-fetch at most this often.
pub const REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(10);

/// The most keys a token is tried against: keys of different types, or a rotation, may share
/// a `kid`, but a key set of hundreds under one `kid` would make every token (logout tokens
/// come from anyone) cost hundreds of signature checks.
const MAX_TRIED: usize = 4;

/// When a token signed with an unknown `kid` may force a JWKS re-fetch: at most once per
/// [`REFETCH_MIN_INTERVAL`], counted from the last *forced* re-fetch. The start-up fetch does not
/// count, so a key the provider rotated in just after the gateway started is fetched at once; a
/// flood of bogus `kid`s still costs the provider one fetch per interval.
#[derive(Debug, Default)]
pub struct RefetchLimit {
    last_forced: Option<Instant>,
    /// `last_forced` before the latest claim, for [`RefetchLimit::unclaim`].
    before: Option<Instant>,
}

impl RefetchLimit {
    /// May an unknown `kid` re-fetch now? If so, the re-fetch is recorded as done at `now`.
    pub fn claim(&mut self, now: Instant) -> bool {
        if self
            .last_forced
            .is_some_and(|t| now.saturating_duration_since(t) < REFETCH_MIN_INTERVAL)
        {
            return false;
        }
        self.before = self.last_forced.replace(now);
        true
    }

    /// The re-fetch just claimed failed: it does not count, and the next unknown `kid` may
    /// try again at once.
    pub fn unclaim(&mut self) {
        self.last_forced = self.before;
    }
}

pub struct Key {
    kid: Option<String>,
    alg: Option<Algorithm>,
    family: Family,
    key: DecodingKey,
}

/// What a key can verify: keys of different types may share a `kid` (RFC 7517 §4.5), and a
/// key's `alg` is optional, so the token's algorithm picks among them by type and curve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    P256,
    P384,
    Ed25519,
    Other,
}

impl Family {
    fn of_key(params: &AlgorithmParameters) -> Self {
        match params {
            AlgorithmParameters::RSA(_) => Family::Rsa,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => Family::P256,
                EllipticCurve::P384 => Family::P384,
                _ => Family::Other,
            },
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                Family::Ed25519
            }
            _ => Family::Other,
        }
    }

    fn of_algorithm(alg: Algorithm) -> Self {
        use Algorithm::*;
        match alg {
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Family::Rsa,
            ES256 => Family::P256,
            ES384 => Family::P384,
            EdDSA => Family::Ed25519,
            _ => Family::Other,
        }
    }
}

#[derive(Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeySet({} keys)", self.keys.len())
    }
}

#[derive(serde::Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

impl KeySet {
    /// Parses a JWKS document, skipping keys it cannot use (encryption keys, unknown types).
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        let raw: RawSet = serde_json::from_slice(json).map_err(|e| format!("invalid JWKS: {e}"))?;
        let mut keys = Vec::new();
        for v in raw.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(v) else {
                continue;
            };
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            if let AlgorithmParameters::OctetKeyPair(p) = &jwk.algorithm {
                if p.curve == EllipticCurve::Ed25519 && is_weak_ed25519(&p.x) {
                    tracing::warn!(
                        kid = jwk.common.key_id.as_deref().unwrap_or("-"),
                        "the provider's key set holds an Ed25519 key of small order: skipped"
                    );
                    continue;
                }
            }
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| format!("{a:?}").parse::<Algorithm>().ok());
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                alg,
                family: Family::of_key(&jwk.algorithm),
                key,
            });
        }
        Ok(Self { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys that may have signed a token: those of its `kid` (several keys of different
    /// types, or a rotation, may share one) that fit its algorithm; without a `kid`, the only
    /// key fitting the algorithm.
    fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a DecodingKey> + 'a {
        let family = Family::of_algorithm(alg);
        let fits = move |k: &&Key| {
            family != Family::Other && k.family == family && k.alg.is_none_or(|a| a == alg)
        };
        let only = match kid {
            Some(_) => None,
            None => {
                let mut it = self.keys.iter().filter(fits);
                match (it.next(), it.next()) {
                    (Some(k), None) => Some(k),
                    _ => None,
                }
            }
        };
        let by_kid = self
            .keys
            .iter()
            .filter(move |k| kid.is_some() && k.kid.as_deref() == kid)
            .filter(fits);
        only.into_iter()
            .chain(by_kid)
            .take(MAX_TRIED)
            .map(|k| &k.key)
    }

    /// Decodes and verifies `token` with the first of its candidate keys whose signature
    /// holds.
    pub fn decode<T: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        kid: Option<&str>,
        alg: Algorithm,
        validation: &jsonwebtoken::Validation,
    ) -> Result<T, Refusal> {
        use jsonwebtoken::errors::ErrorKind;
        let mut refusal = Refusal::NoKey;
        for key in self.candidates(kid, alg) {
            match jsonwebtoken::decode::<T>(token, key, validation) {
                Ok(data) => return Ok(data.claims),
                // Another key of the same kid may be the one: try it.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                    refusal = Refusal::BadSignature
                }
                // A key that cannot verify this algorithm says nothing of the signature.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidKeyFormat) => {
                    if !matches!(refusal, Refusal::BadSignature) {
                        refusal = Refusal::Invalid(e)
                    }
                }
                // Signature good, claims bad (signature is checked first): final.
                Err(e) => return Err(Refusal::Invalid(e)),
            }
        }
        Err(refusal)
    }
}

/// Why a token did not decode against the key set.
#[derive(Debug)]
pub enum Refusal {
    /// No key fits its `kid` and algorithm: one the provider may have added since.
    NoKey,
    /// Its signature holds with none of the keys of its `kid`: a forgery, or a key the
    /// provider replaced under the same `kid`.
    BadSignature,
    Invalid(jsonwebtoken::errors::Error),
}

/// An Ed25519 public key of small order (the identity among them), or not a key at all:
/// with one, a signature that says anything verifies (R the identity, S zero), and
/// aws-lc does not refuse them. The y coordinates of the eight small-order points, and the
/// non-canonical p and p + 1, as libsodium's blocklist; the sign bit is ignored.
fn is_weak_ed25519(x: &str) -> bool {
    use base64::Engine;
    // p - 1, p and p + 1: 0xec, 0xed, 0xee, then 0xff up to a last 0x7f.
    const fn near_p(first: u8) -> [u8; 32] {
        let mut b = [0xff; 32];
        b[0] = first;
        b[31] = 0x7f;
        b
    }
    const fn one() -> [u8; 32] {
        let mut b = [0; 32];
        b[0] = 1;
        b
    }
    const BLOCKED: [[u8; 32]; 7] = [
        [0; 32],
        one(),
        [
            0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef,
            0x98, 0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88,
            0x6d, 0x53, 0xfc, 0x05,
        ],
        [
            0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10,
            0x67, 0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77,
            0x92, 0xac, 0x03, 0x7a,
        ],
        near_p(0xec),
        near_p(0xed),
        near_p(0xee),
    ];
    let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(x.trim_end_matches('='));
    let Some(mut key) = key.ok().and_then(|k| <[u8; 32]>::try_from(k).ok()) else {
        return true;
    };
    key[31] &= 0x7f;
    BLOCKED.contains(&key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_forced_refetch_per_interval_and_the_first_at_once() {
        let mut limit = RefetchLimit::default();
        let t0 = Instant::now();
        // The first unknown kid re-fetches at once, however recent the start-up fetch was.
        assert!(limit.claim(t0));
        // A flood of unknown kids: no more re-fetches within the interval.
        assert!(!limit.claim(t0));
        assert!(!limit.claim(t0 + Duration::from_secs(1)));
        assert!(!limit.claim(t0 + REFETCH_MIN_INTERVAL - Duration::from_millis(1)));
        // Then one again, counted from that one.
        let t1 = t0 + REFETCH_MIN_INTERVAL;
        assert!(limit.claim(t1));
        assert!(!limit.claim(t1 + Duration::from_secs(9)));
        assert!(limit.claim(t1 + Duration::from_secs(10)));
    }

    #[test]
    fn a_failed_refetch_does_not_count() {
        let mut limit = RefetchLimit::default();
        let t0 = Instant::now();
        assert!(limit.claim(t0));
        let t1 = t0 + REFETCH_MIN_INTERVAL;
        assert!(limit.claim(t1));
        limit.unclaim();
        // The one before it counts again: the next may go at once.
        assert!(limit.claim(t1 + Duration::from_millis(1)));
        assert!(!limit.claim(t1 + Duration::from_secs(1)));
    }
}
