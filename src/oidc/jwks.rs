//! The provider's signing keys, parsed once per fetch.

use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::time::{Duration, Instant};

/// An unknown `kid` forces a JWKS re-fetch at most this often.
pub const REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(10);

/// When a token signed with an unknown `kid` may force a JWKS re-fetch: at most once per
/// [`REFETCH_MIN_INTERVAL`], counted from the last *forced* re-fetch. The start-up fetch does not
/// count, so a key the provider rotated in just after the gateway started is fetched at once; a
/// flood of bogus `kid`s still costs the provider one fetch per interval.
#[derive(Debug, Default)]
pub struct RefetchLimit {
    last_forced: Option<Instant>,
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
        self.last_forced = Some(now);
        true
    }
}

pub struct Key {
    kid: Option<String>,
    alg: Option<Algorithm>,
    key: DecodingKey,
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

    /// The key for a token: by `kid` when it has one, else the only key fitting the algorithm.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&DecodingKey> {
        let fits = |k: &&Key| k.alg.is_none_or(|a| a == alg);
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(fits)
                .find(|k| k.kid.as_deref() == Some(kid))
                .map(|k| &k.key),
            None => {
                let mut it = self.keys.iter().filter(fits);
                match (it.next(), it.next()) {
                    (Some(k), None) => Some(&k.key),
                    _ => None,
                }
            }
        }
    }
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
}
