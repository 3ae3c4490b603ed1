//! A session on the request path: decoded once per distinct cookie and shared by every request
//! that carries that cookie, with its upstream headers built once.

use super::Session;
use crate::config::HeaderConfig;
use http::{HeaderName, HeaderValue};
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::{Arc, OnceLock};

/// What the request path carries in the request's extensions once a session was found.
pub struct ActiveSession {
    pub session: Session,
    /// The subject, for the access log (shared, not copied per request).
    pub sub: Arc<str>,
    upstream_headers: OnceLock<Vec<(HeaderName, HeaderValue)>>,
}

impl ActiveSession {
    pub fn new(session: Session) -> Arc<Self> {
        Arc::new(Self {
            sub: Arc::from(session.identity.sub.as_str()),
            session,
            upstream_headers: OnceLock::new(),
        })
    }

    /// The bearer and identity headers for the upstream. Built on first use; `cfg` is the
    /// generation's header config, the same for every request that shares this value (the
    /// cache belongs to one generation).
    pub fn upstream_headers(&self, cfg: &HeaderConfig) -> &[(HeaderName, HeaderValue)] {
        self.upstream_headers
            .get_or_init(|| crate::proxy::headers::identity_headers(&self.session, cfg))
    }
}

impl Deref for ActiveSession {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.session
    }
}

impl std::fmt::Debug for ActiveSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.session.fmt(f)
    }
}

/// Sessions of recently seen cookie values (cookie store only). A hit skips base64, AES-GCM and
/// decoding; a value is only ever inserted after it decrypted, and expiry, idle timeout and
/// revocation are still checked by the caller on every request.
pub struct SessionCache {
    entries: Option<quick_cache::sync::Cache<SealedValue, Arc<ActiveSession>, ByBytes>>,
}

impl SessionCache {
    /// A cache holding at most about `bytes` of cookie values and sessions (0: disabled).
    pub fn new(bytes: u64) -> Self {
        // A 1.5 KB cookie and its session take about 3 KB.
        let estimated_items = (bytes / 3072).clamp(16, 1 << 20) as usize;
        Self {
            entries: (bytes > 0)
                .then(|| quick_cache::sync::Cache::with_weighter(estimated_items, bytes, ByBytes)),
        }
    }

    pub fn get(&self, sealed: &[u8]) -> Option<Arc<ActiveSession>> {
        self.entries.as_ref()?.get(&SealedRef(sealed))
    }

    pub fn insert(&self, sealed: &[u8], session: Arc<ActiveSession>) {
        if let Some(c) = &self.entries {
            c.insert(SealedValue(sealed.into()), session);
        }
    }

    /// Empties the cache (its generation was replaced by a reload).
    pub fn clear(&self) {
        if let Some(c) = &self.entries {
            c.clear();
        }
    }
}

/// A sealed cookie value as a cache key.
struct SealedValue(Box<[u8]>);

/// The borrowed form, for lookups without copying the request's cookie.
struct SealedRef<'a>(&'a [u8]);

/// Hashes the length and the last 32 bytes: the tail of a sealed value is its AES-GCM tag,
/// uniformly random for genuine values, so it spreads keys as well as hashing the whole value
/// would, at a fraction of the cost. (A forged value only picks its own slot; equality below
/// still compares every byte.)
fn hash_tail<H: Hasher>(v: &[u8], state: &mut H) {
    state.write_usize(v.len());
    state.write(&v[v.len().saturating_sub(32)..]);
}

impl Hash for SealedValue {
    fn hash<H: Hasher>(&self, state: &mut H) {
        hash_tail(&self.0, state);
    }
}

impl Hash for SealedRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        hash_tail(self.0, state);
    }
}

impl PartialEq for SealedValue {
    fn eq(&self, other: &Self) -> bool {
        crate::config::secret::ct_eq(&self.0, &other.0)
    }
}

impl Eq for SealedValue {}

impl quick_cache::Equivalent<SealedValue> for SealedRef<'_> {
    fn equivalent(&self, key: &SealedValue) -> bool {
        crate::config::secret::ct_eq(self.0, &key.0)
    }
}

#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<SealedValue, Arc<ActiveSession>> for ByBytes {
    fn weight(&self, key: &SealedValue, val: &Arc<ActiveSession>) -> u64 {
        let s = &val.session;
        let i = &s.identity;
        let len = |o: &Option<String>| o.as_ref().map_or(0, String::len);
        let strings = s.access_token.len()
            + len(&s.refresh_token)
            + len(&s.id_token)
            + i.sub.len()
            + len(&i.email)
            + len(&i.name)
            + len(&i.preferred_username)
            + len(&i.sid)
            + i.groups.iter().map(|g| g.len() + 24).sum::<usize>();
        // The built headers repeat the access token and the identity; plus the structs and the
        // table's own overhead. (A 1.5 KB cookie: about 3 KB, so 32 MiB hold ~10,000 sessions.)
        (key.0.len() + strings + s.access_token.len() + 512) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(sub: &str) -> Arc<ActiveSession> {
        let mut s = crate::session::tests::sample();
        s.identity.sub = sub.into();
        ActiveSession::new(s)
    }

    #[test]
    fn hit_only_on_the_exact_value() {
        let cache = SessionCache::new(1 << 20);
        let sealed = "k1.".to_string() + &"A".repeat(1500) + "tagtagtagtagtagtagtagtagtagtagta";
        let sealed = sealed.as_bytes();
        cache.insert(sealed, active("alice"));
        assert_eq!(&*cache.get(sealed).unwrap().sub, "alice");
        // Same length and tail, one byte changed in the middle: a miss.
        let mut forged = sealed.to_vec();
        forged[100] = b'B';
        assert!(cache.get(&forged).is_none());
        assert!(cache.get(&sealed[1..]).is_none());
        assert!(cache.get(b"").is_none());
        cache.clear();
        assert!(cache.get(sealed).is_none());
    }

    #[test]
    fn disabled_and_bounded() {
        let off = SessionCache::new(0);
        off.insert(b"abc", active("a"));
        assert!(off.get(b"abc").is_none());
        let small = SessionCache::new(64 * 1024);
        for i in 0..1000 {
            small.insert(format!("{i:0>40}").as_bytes(), active("a"));
        }
        let kept = (0..1000)
            .filter(|i| small.get(format!("{i:0>40}").as_bytes()).is_some())
            .count();
        // Every entry weighs more than 512 bytes.
        assert!(kept > 0 && kept <= 64 * 1024 / 512, "{kept}");
    }
}
