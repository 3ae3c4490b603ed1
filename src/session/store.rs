//! Where sessions live: in the cookie (default) or in Redis behind a cookie that carries only
//! a sealed session id. Redis values are sealed with the same key ring, so Redis never sees a
//! token in clear. Both paths apply the back-channel logout record.

use super::{now_millis, now_secs, CookieJar, CookieReject, CookieValue, Session};
use crate::app::App;
use crate::config::StoreKind;
use crate::store::{Redis, StoreError};
use http::HeaderValue;
use std::time::Duration;

/// The outcome of looking for the request's session.
#[derive(Debug)]
// Moved once per request; boxing would cost an allocation on the hot path.
#[allow(clippy::large_enum_variant)]
pub enum Loaded {
    None,
    Session(Session),
    Rejected(CookieReject),
}

use super::cookie::NOT_THIS_STORE;

/// Where sessions live in Redis: this prefix, then the session id in hex.
fn session_prefix(redis: &Redis) -> String {
    redis.key(&["session", ""])
}

/// The back-channel index a session is in by its provider session: `sid:<sid>`, or, when
/// its ID token named no sid, `nosid:<sub>` (a logout token naming a sid and the user then
/// ends it: see `end_sessions`).
fn index_key(redis: &Redis, s: &Session) -> String {
    match &s.identity.sid {
        Some(sid) => redis.key(&["sid", sid]),
        None => redis.key(&["nosid", &s.identity.sub]),
    }
}

pub fn session_key(redis: &Redis, id: &[u8; 16]) -> String {
    session_prefix(redis) + &super::crypto::hex(id)
}

impl App {
    /// Opens the session a cookie value stands for (looking it up in Redis for a reference).
    pub async fn resolve(&self, value: CookieValue, now: u64) -> Result<Loaded, StoreError> {
        let session = match value {
            CookieValue::Full(s) => s,
            CookieValue::Ref(id) => {
                // A reference opens only with the Redis store (`SessionCookies::unseal`).
                let Some(redis) = self.redis.as_deref() else {
                    return Ok(Loaded::Rejected(NOT_THIS_STORE));
                };
                let key = session_key(redis, &id);
                let sealed = match redis.get(&key).await {
                    Ok(Some(sealed)) => sealed,
                    Ok(None) => return Ok(Loaded::Rejected(CookieReject::Expired)),
                    // Not one the gateway wrote: no session, as for one that won't open.
                    Err(StoreError::Oversized) => {
                        return Ok(Loaded::Rejected(CookieReject::Oversize))
                    }
                    Err(e) => return Err(e),
                };
                let opened = self
                    .cookies
                    .keys
                    .open(key.as_bytes(), &sealed)
                    .map_err(CookieReject::from)
                    .and_then(|p| Session::decode(&p).map_err(CookieReject::from));
                match opened {
                    Ok(s) if s.id == id && !s.is_expired(now) => s,
                    Ok(_) => return Ok(Loaded::Rejected(CookieReject::Expired)),
                    Err(r) => return Ok(Loaded::Rejected(r)),
                }
            }
        };
        Ok(self.check_revoked(session))
    }

    /// A session ended by back-channel logout, or idle for too long, is no session.
    pub fn check_revoked(&self, s: Session) -> Loaded {
        match self.ended(&s, now_secs()) {
            Some(reason) => Loaded::Rejected(reason),
            None => Loaded::Session(s),
        }
    }

    /// Why a session that decrypted fine is over anyway, if it is. The current
    /// `session.lifetime` bounds every session, also one sealed under a longer one: the
    /// record of logouts is kept for that lifetime only, so an older session must not live on.
    pub fn ended(&self, s: &Session, now: u64) -> Option<CookieReject> {
        if self.revocations.is_revoked(s) {
            Some(CookieReject::Revoked)
        } else if s.is_idle(now, self.cfg.session.idle_timeout)
            || s.outlived(now, self.cfg.session.lifetime)
        {
            Some(CookieReject::Expired)
        } else {
            None
        }
    }

    /// The request's session, from the cookie and (for the Redis store) Redis.
    pub async fn load_session(&self, jar: &CookieJar<'_>) -> Result<Loaded, StoreError> {
        let now = now_secs();
        match self.cookies.open(jar, now, |s| self.ended(s, now)) {
            Ok(None) => Ok(Loaded::None),
            Err(r) => Ok(Loaded::Rejected(r)),
            Ok(Some(CookieValue::Ref(id))) => self.resolve_ref(id, jar, now).await,
            Ok(Some(v)) => self.resolve(v, now).await,
        }
    }

    /// A reference's session; when it names none that is live (a planted reference to a
    /// signed-out session), the other references `jar` opens to, in turn (looked for only
    /// then). The first reference's answer stands when none of them does better, or when
    /// Redis fails on one of them.
    pub async fn resolve_ref(
        &self,
        id: [u8; 16],
        jar: &CookieJar<'_>,
        now: u64,
    ) -> Result<Loaded, StoreError> {
        let first = self.resolve(CookieValue::Ref(id), now).await?;
        if !matches!(first, Loaded::Rejected(_)) {
            return Ok(first);
        }
        for other in self.cookies.other_refs(jar, now, &id) {
            match self.resolve(CookieValue::Ref(other), now).await {
                Ok(found @ Loaded::Session(_)) => return Ok(found),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        Ok(first)
    }

    /// Stores a new or refreshed session; returns the `Set-Cookie` lines to send
    /// (for the Redis store only the first time, as the cookie carries just the id).
    pub async fn save_session(
        &self,
        s: &Session,
        jar: &CookieJar<'_>,
        first: bool,
    ) -> Result<Vec<HeaderValue>, SaveError> {
        let now = now_secs();
        match (self.cfg.session.store, self.redis.as_deref()) {
            (StoreKind::Redis, Some(redis)) => {
                let key = session_key(redis, &s.id);
                let ttl = Duration::from_secs(s.expires_at.saturating_sub(now).max(1));
                let sealed = self.cookies.keys.seal(key.as_bytes(), &s.encode());
                if !first {
                    // Only over a session that is still there: one signed out (or ended by a
                    // back-channel logout) while it was being refreshed stays ended.
                    if !redis.set_ex_existing(&key, sealed.as_bytes(), ttl).await? {
                        return Err(SaveError::Ended);
                    }
                    return Ok(Vec::new());
                }
                redis.set_ex(&key, sealed.as_bytes(), ttl).await?;
                // Indexes for back-channel logout (by provider session and by subject), of
                // the sessions still there.
                let live = session_prefix(redis);
                let id = s.id_hex();
                redis
                    .index_add(&index_key(redis, s), &id, ttl, &live)
                    .await?;
                redis
                    .index_add(&redis.key(&["sub", &s.identity.sub]), &id, ttl, &live)
                    .await?;
                Ok(self.cookies.set_ref(&s.id, s.expires_at, jar, now))
            }
            _ => self
                .cookies
                .set_session(s, jar, now)
                .ok_or(SaveError::TooLarge),
        }
    }

    /// After a refresh: the new cookie (cookie store), or nothing (the Redis store was
    /// updated by the refresh itself and the cookie only names the session).
    /// Makes a cookie-store session fit its cookies if it can, by dropping its ID token (only
    /// a logout hint, and a repeat of the claims). False: it does not fit even so.
    pub fn fit_in_cookie(&self, s: &mut Session, now: u64) -> bool {
        if self.cfg.session.store != StoreKind::Cookie || self.cookies.fits(s, now) {
            return true;
        }
        s.id_token = None;
        self.cookies.fits(s, now)
    }

    pub fn refreshed_cookie(&self, s: &Session, jar: &CookieJar<'_>) -> Vec<HeaderValue> {
        match (self.cfg.session.store, &self.redis) {
            (StoreKind::Redis, Some(_)) => Vec::new(),
            _ => self
                .cookies
                .set_session(s, jar, now_secs())
                .unwrap_or_default(),
        }
    }

    /// Ends a session signed out of. The Redis store deletes it; the cookie store records its
    /// id as revoked (here at once, through the coordination Redis on every replica), so that
    /// a copy of the cookie taken before is refused too.
    pub async fn delete_session(&self, s: &Session) -> Result<(), StoreError> {
        if self.cfg.session.store == StoreKind::Cookie {
            let lifetime = self.cfg.session.lifetime;
            let recorded = self
                .revocations
                .record_session(self.redis.as_deref(), s, now_millis(), lifetime)
                .await;
            if let Err(e) = recorded {
                // Revoked on this replica; the others learn it only if Redis comes back.
                tracing::warn!(
                    error = e.to_string().as_str(),
                    "cannot record the sign-out in Redis"
                );
            }
            return Ok(());
        }
        if let (StoreKind::Redis, Some(redis)) = (self.cfg.session.store, self.redis.as_deref()) {
            // Out of the back-channel indexes too: a provider session's index would otherwise
            // stay for the session lifetime, naming a session that is gone.
            let indexes = [index_key(redis, s), redis.key(&["sub", &s.identity.sub])];
            redis
                .del_indexed(&session_key(redis, &s.id), &s.id_hex(), &indexes)
                .await?;
        }
        Ok(())
    }

    pub async fn delete_session_id(&self, id: &[u8; 16]) -> Result<(), StoreError> {
        if let (StoreKind::Redis, Some(redis)) = (self.cfg.session.store, self.redis.as_deref()) {
            redis.del(&[session_key(redis, id)]).await?;
        }
        Ok(())
    }

    /// Ends every session of a provider session (`sid`) and/or user (`sub`), on every replica.
    /// Ends the sessions a back-channel logout names: by `sid` alone, by `sub` alone (every
    /// session of the user), or by both, which is that provider session plus the user's
    /// sessions whose ID token named no sid (which the provider's sid cannot be matched to).
    pub async fn end_sessions(
        &self,
        sid: Option<&str>,
        sub: Option<&str>,
    ) -> Result<(), StoreError> {
        let (sub, sidless) = match sid {
            Some(_) => (None, sub),
            None => (sub, None),
        };
        self.revocations
            .record(
                self.redis.as_deref(),
                sid,
                sub,
                sidless,
                now_millis(),
                self.cfg.session.lifetime,
            )
            .await?;
        if let (StoreKind::Redis, Some(redis)) = (self.cfg.session.store, self.redis.as_deref()) {
            let mut doomed = Vec::new();
            for (kind, v) in [("sid", sid), ("sub", sub), ("nosid", sidless)] {
                let Some(v) = v else { continue };
                let index = redis.key(&[kind, v]);
                for id in redis.smembers(&index).await? {
                    doomed.push(redis.key(&["session", &id]));
                }
                doomed.push(index);
            }
            redis.del(&doomed).await?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("the session does not fit in limits.max_cookie_chunks cookies")]
    TooLarge,
    /// An update of a stored session that was deleted meanwhile (signed out).
    #[error("the session has ended")]
    Ended,
    #[error(transparent)]
    Store(#[from] StoreError),
}
