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
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
pub struct Revocations {
    /// "sid:<sid>" / "sub:<sub>" / "id:<session id>" → unix time of the logout.
    map: ArcSwap<HashMap<String, u64>>,
    synced_to: AtomicU64,
}

const SYNC_EVERY: Duration = Duration::from_millis(500);

impl Revocations {
    pub fn is_revoked(&self, s: &Session) -> bool {
        let map = self.map.load();
        if map.is_empty() {
            return false;
        }
        let hit = |kind: &str, value: &str| {
            let mut k = String::with_capacity(kind.len() + value.len());
            k.push_str(kind);
            k.push_str(value);
            map.get(&k).is_some_and(|t| *t >= s.created_at)
        };
        s.identity
            .sid
            .as_deref()
            .is_some_and(|sid| hit("sid:", sid))
            || hit("sub:", &s.identity.sub)
            || hit("id:", &s.id_hex())
    }

    fn apply(&self, items: impl IntoIterator<Item = (String, u64)>, horizon: u64) {
        let mut next: HashMap<String, u64> = (**self.map.load()).clone();
        for (k, t) in items {
            let e = next.entry(k).or_insert(0);
            *e = (*e).max(t);
        }
        next.retain(|_, t| *t >= horizon);
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

    /// Mirrors the Redis record into this replica, forever.
    pub async fn sync(self: Arc<Self>, redis: Arc<Redis>, lifetime: Duration) {
        let key = redis.key(&["revoked"]);
        loop {
            let now = crate::session::now_secs();
            let horizon = now.saturating_sub(lifetime.as_secs());
            let from = self.synced_to.load(Ordering::Relaxed).max(horizon);
            if let Ok(items) = redis.zrange_from(&key, from).await {
                if !items.is_empty() {
                    self.apply(items, horizon);
                }
                // Re-read the last second: logouts recorded in the same second are not missed.
                self.synced_to
                    .store(now.saturating_sub(1), Ordering::Relaxed);
            }
            tokio::time::sleep(SYNC_EVERY).await;
        }
    }
}
