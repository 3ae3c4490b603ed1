//! Sessions ended by back-channel logout, by provider session id (`sid`) or subject (`sub`),
//! with the time of the logout: a session created before it is over; and single sessions
//! signed out of (`id`), whose cookies may live on elsewhere (the cookie store). Kept in the
//! coordination Redis (a sorted set scored by time) and mirrored in every replica, so the
//! per-request check is a local lookup.
//!
//! Times are in milliseconds: a user who logs in again in the second their sessions were
//! ended must not find the new session ended too. A signed-out session id, and a provider
//! session (`sid`) that ended, are over whatever the times say: the replica that recorded it
//! may have a clock behind the one that made the session, and a login of that provider
//! session may finish after its logout (its code issued before). An ended provider session
//! starts no new login (Back-Channel Logout 1.0 §2.7).
//!
//! Entries are scored by the recording replica's clock, so each replica reads back
//! `provider.clock_skew` (plus a second) of them on every pass: a replica whose clock is
//! behind by up to that much is still heard. Redis members carry their millisecond as
//! `ms:<millis>:<what>` and are scored in seconds (older releases wrote `<what>` alone, read
//! as the end of its second).

use crate::session::Session;
use crate::store::Redis;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// What is revoked (each with the logout's time in milliseconds), each kind in a map of its
/// own, so that a check looks up borrowed keys and allocates nothing.
#[derive(Clone, Default)]
struct Revoked {
    sids: HashMap<String, u64>,
    subs: HashMap<String, u64>,
    /// Users whose sessions without a sid ended (a logout token naming a sid and the user).
    sidless_subs: HashMap<String, u64>,
    ids: HashMap<[u8; 16], u64>,
}

impl Revoked {
    fn is_empty(&self) -> bool {
        self.sids.is_empty()
            && self.subs.is_empty()
            && self.sidless_subs.is_empty()
            && self.ids.is_empty()
    }

    /// Adds a "sid:<sid>" / "sub:<sub>" / "nosid:<sub>" / "id:<hex id>" entry (the Redis
    /// member format) of a logout at `at_ms`.
    fn add(&mut self, key: &str, at_ms: u64) {
        let newest = |t: &mut u64| *t = (*t).max(at_ms);
        match Named::parse(key) {
            Some(Named::Sid(sid)) => newest(self.sids.entry(sid.to_string()).or_default()),
            Some(Named::Sub(sub)) => newest(self.subs.entry(sub.to_string()).or_default()),
            Some(Named::SidlessSub(sub)) => {
                newest(self.sidless_subs.entry(sub.to_string()).or_default())
            }
            Some(Named::Id(id)) => newest(self.ids.entry(id).or_default()),
            None => {}
        }
    }

    /// When the logout of what `key` names happened, if it is held.
    fn held(&self, key: &str) -> Option<u64> {
        match Named::parse(key)? {
            Named::Sid(sid) => self.sids.get(sid),
            Named::Sub(sub) => self.subs.get(sub),
            Named::SidlessSub(sub) => self.sidless_subs.get(sub),
            Named::Id(id) => self.ids.get(&id),
        }
        .copied()
    }

    /// Adds a member as Redis holds it, scored in seconds.
    fn add_member(&mut self, member: &str, score_secs: u64) {
        let (at_ms, what) = parse_member(member, score_secs);
        self.add(what, at_ms);
    }

    fn retain_after(&mut self, horizon_ms: u64) {
        self.sids.retain(|_, t| *t >= horizon_ms);
        self.subs.retain(|_, t| *t >= horizon_ms);
        self.sidless_subs.retain(|_, t| *t >= horizon_ms);
        self.ids.retain(|_, t| *t >= horizon_ms);
    }

    /// Does the mirror already hold this Redis member (as late a logout, or later)? Each
    /// pass reads back a window of entries it mostly has: only news costs a new mirror.
    /// Garbage counts as held: there is nothing to add for it.
    fn holds_member(&self, member: &str, score_secs: u64) -> bool {
        let (at_ms, what) = parse_member(member, score_secs);
        Named::parse(what).is_none() || self.held(what).is_some_and(|t| t >= at_ms)
    }
}

/// What a revocation entry names.
enum Named<'a> {
    Sid(&'a str),
    Sub(&'a str),
    /// A user's sessions whose ID token named no sid.
    SidlessSub(&'a str),
    Id([u8; 16]),
}

impl<'a> Named<'a> {
    fn parse(key: &'a str) -> Option<Self> {
        let (kind, what) = key.split_once(':')?;
        Some(match kind {
            "sid" => Self::Sid(what),
            "sub" => Self::Sub(what),
            "nosid" => Self::SidlessSub(what),
            "id" => Self::Id(parse_id(what)?),
            _ => return None,
        })
    }
}

/// A Redis member's logout time (milliseconds) and what it names.
fn parse_member(member: &str, score_secs: u64) -> (u64, &str) {
    member
        .strip_prefix("ms:")
        .and_then(|m| m.split_once(':'))
        .and_then(|(ms, what)| Some((ms.parse::<u64>().ok()?, what)))
        // An older release's entry: the end of its second, so that it still ends every
        // session created within that second, as it did there.
        .unwrap_or((score_secs.saturating_mul(1000).saturating_add(999), member))
}

/// The Redis member for a logout of `what` at `at_ms`.
fn member(what: &str, at_ms: u64) -> String {
    format!("ms:{at_ms}:{what}")
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
    /// What is revoked → time of the logout (milliseconds since the epoch).
    map: ArcSwap<Revoked>,
    /// Up to when (seconds) the record was read from Redis; 0: not read yet.
    synced_to: AtomicU64,
    /// The current config's `session.lifetime`, in seconds: how long the mirror keeps a
    /// logout (set by every config generation, so that a reload changes it).
    lifetime_secs: AtomicU64,
    /// How far back (seconds) each pass reads: how far behind another replica's clock may be.
    lookback_secs: AtomicU64,
}

const SYNC_EVERY: Duration = Duration::from_millis(500);

impl Revocations {
    pub fn is_revoked(&self, s: &Session) -> bool {
        let map = self.map.load();
        if map.is_empty() {
            return false;
        }
        let since = |t: Option<&u64>| t.is_some_and(|t| *t >= s.created_at_ms);
        let by_session = match s.identity.sid.as_deref() {
            Some(sid) => map.sids.contains_key(sid),
            None => since(map.sidless_subs.get(s.identity.sub.as_str())),
        };
        by_session || since(map.subs.get(s.identity.sub.as_str())) || map.ids.contains_key(&s.id)
    }

    /// Applies Redis members (with their scores, in seconds) to the mirror: a new mirror only
    /// when some of them are news (which is also when entries past the horizon go).
    fn apply(&self, members: Vec<(String, u64)>, horizon_ms: u64) {
        let news: Vec<_> = {
            let map = self.map.load();
            members
                .into_iter()
                .filter(|(m, score)| !map.holds_member(m, *score))
                .collect()
        };
        if news.is_empty() {
            return;
        }
        self.update(horizon_ms, |next| {
            for (m, score) in news {
                next.add_member(&m, score);
            }
        });
    }

    /// A new mirror: `add` to a copy of it, then drop what is older than `horizon_ms`.
    fn update(&self, horizon_ms: u64, add: impl FnOnce(&mut Revoked)) {
        let mut next = Revoked::clone(&self.map.load());
        add(&mut next);
        next.retain_after(horizon_ms);
        self.map.store(Arc::new(next));
    }

    /// Records a logout at `now_ms` here and in Redis.
    pub async fn record(
        &self,
        redis: Option<&Redis>,
        sid: Option<&str>,
        sub: Option<&str>,
        sidless_of: Option<&str>,
        now_ms: u64,
        lifetime: Duration,
    ) -> Result<(), crate::store::StoreError> {
        let items: Vec<String> = sid
            .map(|s| format!("sid:{s}"))
            .into_iter()
            .chain(sub.map(|s| format!("sub:{s}")))
            .chain(sidless_of.map(|s| format!("nosid:{s}")))
            .collect();
        self.record_items(redis, items, now_ms, lifetime).await
    }

    /// Records that one session was signed out of: here at once, in Redis for the others.
    pub async fn record_session(
        &self,
        redis: Option<&Redis>,
        s: &Session,
        now_ms: u64,
        lifetime: Duration,
    ) -> Result<(), crate::store::StoreError> {
        let items = vec![format!("id:{}", s.id_hex())];
        self.record_items(redis, items, now_ms, lifetime).await
    }

    async fn record_items(
        &self,
        redis: Option<&Redis>,
        items: Vec<String>,
        now_ms: u64,
        lifetime: Duration,
    ) -> Result<(), crate::store::StoreError> {
        let horizon_ms = now_ms.saturating_sub(lifetime.as_millis().try_into().unwrap_or(u64::MAX));
        self.update(horizon_ms, |next| {
            for what in &items {
                next.add(what, now_ms);
            }
        });
        if let Some(r) = redis {
            let secs = now_ms / 1000;
            let scored: Vec<(u64, String)> = items
                .iter()
                .map(|what| (secs, member(what, now_ms)))
                .collect();
            r.zadd_trim(&r.key(&["revoked"]), &scored, horizon_ms / 1000)
                .await?;
        }
        Ok(())
    }

    /// Has the record been read from Redis yet (since start-up)?
    pub fn is_loaded(&self) -> bool {
        self.synced_to.load(Ordering::Relaxed) != 0
    }

    /// The current config's `session.lifetime` and `provider.clock_skew`.
    pub fn configure(&self, lifetime: Duration, clock_skew: Duration) {
        self.lifetime_secs
            .store(lifetime.as_secs(), Ordering::Relaxed);
        self.lookback_secs
            .store(clock_skew.as_secs().saturating_add(1), Ordering::Relaxed);
    }

    /// Logouts before this (seconds) are past every session's lifetime.
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
                self.apply(items, horizon.saturating_mul(1000));
                // Read again next time: logouts recorded in the same second, and those of a
                // replica whose clock is behind, are not missed.
                let lookback = self.lookback_secs.load(Ordering::Relaxed).max(1);
                self.synced_to
                    .store(now.saturating_sub(lookback).max(1), Ordering::Relaxed);
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
    fn session_ids_parse_from_their_hex() {
        assert_eq!(parse_id(&"ab".repeat(16)), Some([0xab; 16]));
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i as u8) * 17;
        }
        assert_eq!(parse_id(&crate::session::crypto::hex(&id)), Some(id));
        for bad in [
            "ab".repeat(15),
            "ab".repeat(17),
            "zz".repeat(16),
            String::new(),
        ] {
            assert_eq!(parse_id(&bad), None, "{bad}");
        }
    }

    #[test]
    fn revoked_by_sid_sub_or_id_since_the_logout() {
        let r = Revocations::default();
        let mut s = crate::session::tests::sample();
        s.created_at_ms = 100_000;
        assert!(!r.is_revoked(&s));
        r.apply(
            vec![(member(&format!("id:{}", s.id_hex()), 150_000), 150)],
            0,
        );
        assert!(r.is_revoked(&s), "its id");
        let mut other = s.clone();
        other.id = [9; 16];
        assert!(!r.is_revoked(&other), "another session of the user");
        r.apply(
            vec![(member(&format!("sub:{}", s.identity.sub), 90_000), 90)],
            0,
        );
        assert!(!r.is_revoked(&other), "a logout before it was created");
        r.apply(
            vec![(member(&format!("sub:{}", s.identity.sub), 120_000), 120)],
            0,
        );
        assert!(r.is_revoked(&other), "its user, after it was created");
        // Old entries go (with the next news); garbage is ignored.
        r.apply(
            vec![
                (member("sub:someone-else", 200_000), 200),
                ("id:zz".to_string(), 200),
                ("what".to_string(), 200),
                ("ms:x:sub:a".to_string(), 200),
            ],
            130_000,
        );
        assert!(!r.is_revoked(&other));
        assert!(r.is_revoked(&s));
        assert_eq!(parse_id(&s.id_hex()), Some(s.id));
    }

    #[test]
    fn a_signed_out_session_is_over_whatever_the_recording_clock_said() {
        // Signed out on a replica whose clock is behind the one that made the session.
        let r = Revocations::default();
        let mut s = crate::session::tests::sample();
        s.created_at_ms = 100_000;
        r.apply(vec![(member(&format!("id:{}", s.id_hex()), 98_000), 98)], 0);
        assert!(r.is_revoked(&s));
    }

    #[test]
    fn an_ended_provider_session_ends_sessions_made_after_its_logout_too() {
        // A login of the provider session that finished after the logout (code issued before).
        let r = Revocations::default();
        let mut s = crate::session::tests::sample();
        s.created_at_ms = 100_000;
        s.identity.sid = Some("op-session".into());
        r.apply(vec![(member("sid:op-session", 90_000), 90)], 0);
        assert!(r.is_revoked(&s));
        let mut other = s.clone();
        other.identity.sid = Some("another".into());
        assert!(!r.is_revoked(&other), "another provider session");
    }

    #[test]
    fn entries_read_again_leave_the_mirror_as_it_was() {
        let r = Revocations::default();
        let entries = || {
            vec![
                (member("sub:a", 120_000), 120),
                (member("nosid:b", 120_000), 120),
                (member(&format!("id:{}", "ab".repeat(16)), 120_000), 120),
                ("garbage".to_string(), 120),
            ]
        };
        r.apply(entries(), 0);
        let before = r.map.load_full();
        r.apply(entries(), 0);
        assert!(Arc::ptr_eq(&before, &r.map.load_full()), "nothing new");
        r.apply(vec![(member("sub:a", 130_000), 130)], 0);
        assert_eq!(r.map.load().subs.get("a"), Some(&130_000), "a later logout");
        // Past the horizon, every kind goes.
        r.apply(vec![(member("sub:c", 200_000), 200)], 150_000);
        let map = r.map.load();
        assert!(map.sidless_subs.is_empty() && map.ids.is_empty());
        assert_eq!(map.subs.len(), 1);
    }

    #[test]
    fn a_login_in_the_second_of_a_logout_is_ordered_by_the_millisecond() {
        let r = Revocations::default();
        let mut before = crate::session::tests::sample();
        before.created_at_ms = 100_200;
        let mut after = before.clone();
        after.created_at_ms = 100_700;
        r.apply(
            vec![(
                member(&format!("sub:{}", before.identity.sub), 100_500),
                100,
            )],
            0,
        );
        assert!(r.is_revoked(&before), "logged in before the logout");
        assert!(!r.is_revoked(&after), "logged in again after it");
        // An older release's entry (seconds only) still ends the whole second's sessions.
        let r = Revocations::default();
        r.apply(vec![(format!("sub:{}", before.identity.sub), 100)], 0);
        assert!(r.is_revoked(&before) && r.is_revoked(&after));
    }

    #[test]
    fn a_logout_naming_a_sid_and_the_user_ends_the_users_sessions_without_a_sid() {
        let r = Revocations::default();
        let mut sidless = crate::session::tests::sample();
        sidless.created_at_ms = 100_000;
        sidless.identity.sid = None;
        let mut other_sid = sidless.clone();
        other_sid.identity.sid = Some("another".into());
        let entry = format!("nosid:{}", sidless.identity.sub);
        r.apply(vec![(member(&entry, 120_000), 120)], 0);
        assert!(r.is_revoked(&sidless), "no sid to tell it apart by");
        assert!(
            !r.is_revoked(&other_sid),
            "another provider session of the user"
        );
        let mut other_user = sidless.clone();
        other_user.identity.sub = "someone-else".into();
        assert!(!r.is_revoked(&other_user));
    }

    #[test]
    fn the_mirror_keeps_logouts_for_the_current_lifetime() {
        let r = Revocations::default();
        r.configure(Duration::from_secs(3600), Duration::ZERO);
        assert_eq!(r.horizon(10_000), 6_400);
        // A reload that lengthens sessions keeps older logouts too.
        r.configure(Duration::from_secs(7200), Duration::ZERO);
        assert_eq!(r.horizon(10_000), 2_800);
    }
}
