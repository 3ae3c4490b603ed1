//! Sessions ended by back-channel logout, by provider session id (`sid`) or subject (`sub`),
//! with the time of the logout: a session created before it is over; and single sessions
//! signed out of (`id`), whose cookies may live on elsewhere (the cookie store). Kept in the
//! coordination Redis (a sorted set scored by time) and mirrored in every replica, so the
//! per-request check is a local lookup.

use crate::session::Session;
use crate::store::Redis;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// What is revoked, each kind in a map of its own, so that a check looks up borrowed keys and
/// allocates nothing.
#[derive(Clone, Default)]
struct Revoked {
    sids: HashMap<String, u64>,
    subs: HashMap<String, u64>,
    ids: HashMap<[u8; 16], u64>,
}

impl Revoked {
    fn is_empty(&self) -> bool {
        self.sids.is_empty() && self.subs.is_empty() && self.ids.is_empty()
    }

    /// Adds a "sid:<sid>" / "sub:<sub>" / "id:<hex id>" entry (the Redis member format).
    fn add(&mut self, key: &str, at: u64) {
        let newest = |t: &mut u64| *t = (*t).max(at);
        if let Some(sid) = key.strip_prefix("sid:") {
            newest(self.sids.entry(sid.to_string()).or_default());
        } else if let Some(sub) = key.strip_prefix("sub:") {
            newest(self.subs.entry(sub.to_string()).or_default());
        } else if let Some(id) = key.strip_prefix("id:").and_then(parse_id) {
            newest(self.ids.entry(id).or_default());
        }
    }

    fn retain_after(&mut self, horizon: u64) {
        self.sids.retain(|_, t| *t >= horizon);
        self.subs.retain(|_, t| *t >= horizon);
        self.ids.retain(|_, t| *t >= horizon);
    }
}

fn parse_id(hex: &str) -> Option<[u8; 16]> {
    let b = hex.as_bytes();
    if b.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        id[i] = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(id)
}

#[derive(Default)]
pub struct Revocations {
    /// What is revoked → unix time of the logout.
    map: ArcSwap<Revoked>,
    synced_to: AtomicU64,
    /// The current config's `session.lifetime`, in seconds: how long the mirror keeps a
    /// logout (set by every config generation, so that a reload changes it).
    lifetime_secs: AtomicU64,
}

const SYNC_EVERY: Duration = Duration::from_millis(500);

impl Revocations {
    pub fn is_revoked(&self, s: &Session) -> bool {
        let map = self.map.load();
        if map.is_empty() {
            return false;
        }
        let since = |t: Option<&u64>| t.is_some_and(|t| *t >= s.created_at);
        s.identity
            .sid
            .as_deref()
            .is_some_and(|sid| since(map.sids.get(sid)))
            || since(map.subs.get(s.identity.sub.as_str()))
            || since(map.ids.get(&s.id))
    }

    fn apply(&self, items: impl IntoIterator<Item = (String, u64)>, horizon: u64) {
        let mut next = Revoked::clone(&self.map.load());
        for (k, t) in items {
            next.add(&k, t);
        }
        next.retain_after(horizon);
        self.map.store(Arc::new(next));
    }

    /// Records a logout here and in Redis.
    pub async fn record(
        &self,
        redis: Option<&Redis>,
        sid: Option<&str>,
        sub: Option<&str>,
        now: u64,
        lifetime: Duration,
    ) -> Result<(), crate::store::StoreError> {
        let items: Vec<(String, u64)> = sid
            .map(|s| (format!("sid:{s}"), now))
            .into_iter()
            .chain(sub.map(|s| (format!("sub:{s}"), now)))
            .collect();
        self.record_items(redis, items, now, lifetime).await
    }

    /// Records that one session was signed out of: here at once, in Redis for the others.
    pub async fn record_session(
        &self,
        redis: Option<&Redis>,
        s: &Session,
        now: u64,
        lifetime: Duration,
    ) -> Result<(), crate::store::StoreError> {
        let items = vec![(format!("id:{}", s.id_hex()), now)];
        self.record_items(redis, items, now, lifetime).await
    }

    async fn record_items(
        &self,
        redis: Option<&Redis>,
        items: Vec<(String, u64)>,
        now: u64,
        lifetime: Duration,
    ) -> Result<(), crate::store::StoreError> {
        let horizon = now.saturating_sub(lifetime.as_secs());
        self.apply(items.clone(), horizon);
        if let Some(r) = redis {
            let scored: Vec<(u64, String)> = items.into_iter().map(|(k, t)| (t, k)).collect();
            r.zadd_trim(&r.key(&["revoked"]), &scored, horizon).await?;
        }
        Ok(())
    }

    pub fn set_lifetime(&self, lifetime: Duration) {
        self.lifetime_secs
            .store(lifetime.as_secs(), Ordering::Relaxed);
    }

    /// Logouts before this are past every session's lifetime.
    fn horizon(&self, now: u64) -> u64 {
        now.saturating_sub(self.lifetime_secs.load(Ordering::Relaxed))
    }

    /// Mirrors the Redis record into this replica for as long as the config generations
    /// using `redis` live (a reload that changes the Redis settings starts another).
    pub async fn sync(self: Arc<Self>, redis: Weak<Redis>) {
        while let Some(redis) = redis.upgrade() {
            let key = redis.key(&["revoked"]);
            let now = crate::session::now_secs();
            let horizon = self.horizon(now);
            let from = self.synced_to.load(Ordering::Relaxed).max(horizon);
            if let Ok(items) = redis.zrange_from(&key, from).await {
                if !items.is_empty() {
                    self.apply(items, horizon);
                }
                // Re-read the last second: logouts recorded in the same second are not missed.
                self.synced_to
                    .store(now.saturating_sub(1), Ordering::Relaxed);
            }
            drop(redis);
            tokio::time::sleep(SYNC_EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_by_sid_sub_or_id_since_the_logout() {
        let r = Revocations::default();
        let mut s = crate::session::tests::sample();
        s.created_at = 100;
        assert!(!r.is_revoked(&s));
        r.apply([(format!("id:{}", s.id_hex()), 150)], 0);
        assert!(r.is_revoked(&s), "its id");
        let mut other = s.clone();
        other.id = [9; 16];
        assert!(!r.is_revoked(&other), "another session of the user");
        r.apply([(format!("sub:{}", s.identity.sub), 90)], 0);
        assert!(!r.is_revoked(&other), "a logout before it was created");
        r.apply([(format!("sub:{}", s.identity.sub), 120)], 0);
        assert!(r.is_revoked(&other), "its user, after it was created");
        // Old entries go; garbage is ignored.
        r.apply([("id:zz".to_string(), 200), ("what".to_string(), 200)], 130);
        assert!(!r.is_revoked(&other));
        assert!(r.is_revoked(&s));
        assert_eq!(parse_id(&s.id_hex()), Some(s.id));
    }

    #[test]
    fn the_mirror_keeps_logouts_for_the_current_lifetime() {
        let r = Revocations::default();
        r.set_lifetime(Duration::from_secs(3600));
        assert_eq!(r.horizon(10_000), 6_400);
        // A reload that lengthens sessions keeps older logouts too.
        r.set_lifetime(Duration::from_secs(7200));
        assert_eq!(r.horizon(10_000), 2_800);
    }
}
