//! Transparent refresh: an access token that has expired, or expires within
//! `session.refresh_before`, is renewed with the refresh token before forwarding.
//!
//! Exactly once per session and refresh token: concurrent requests wait for the one
//! in-flight refresh, and a just-refreshed result is remembered briefly so requests that
//! still carry the old cookie reuse it instead of spending the old refresh token again
//! (providers that rotate refresh tokens revoke the whole grant on reuse).

use crate::app::App;
use crate::body::Body;
use crate::error::GatewayError;
use crate::metrics::{answered_for, AbandonGuard, ResponseFacts};
use crate::oidc::ProviderError;
use crate::policy::Rejected;
use crate::session::layer::{take_ready, BoxFuture};
use crate::session::{now_secs, ActiveSession, CookieJar, CookieReject, Session};
use crate::singleflight::SingleFlight;
use http::header::{HeaderMap, HeaderValue, CACHE_CONTROL, SET_COOKIE};
use http::{Request, Response};
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::Service;

/// How long a refresh result is reused by requests carrying the pre-refresh cookie.
const REUSE_WINDOW: Duration = Duration::from_secs(60);

/// How long a refresh may take once under way, whoever still waits for it (a request waits
/// `timeouts.provider` at most): an answer the provider sends late still carries the rotated
/// refresh token, and asking again with the spent one would end the grant.
const REFRESH_PATIENCE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshFailure {
    /// The provider refused the refresh token (revoked, expired, reused): the session is over.
    InvalidGrant,
    /// The provider could not be asked (down, 5xx, timeout): try again later.
    Unavailable,
    /// The provider answered, but not with a usable refresh (an error other than
    /// `invalid_grant`, such as `invalid_client`; an ID token that does not validate; a bad
    /// answer): asking again would get the same, so the session is over.
    Rejected,
    /// The refreshed session does not fit in the session cookie: the session is over (kept,
    /// its old cookie would spend the refresh token again, and rotation revokes the grant).
    TooLarge,
    /// Renewed, but the session ended (a sign-out, a back-channel logout) while the provider
    /// was asked: it stays ended.
    Ended,
}

impl RefreshFailure {
    /// Its `refreshes_total` outcome: what the provider did.
    fn label(self) -> &'static str {
        match self {
            Self::InvalidGrant => "invalid_grant",
            Self::Unavailable => "unavailable",
            Self::Rejected => "rejected",
            Self::TooLarge => "too_large",
            Self::Ended => "success",
        }
    }
}

type Outcome = Result<Arc<Session>, RefreshFailure>;

/// Who obtained a flight's outcome: this replica, or another one (through Redis).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum By {
    Here,
    Elsewhere,
}

/// One refresh per (session id, token generation). The generation is a digest of the access
/// token, not its expiry: two tokens issued in the same second share an expiry.
type Key = ([u8; 16], String);

pub struct Refresher {
    flights: SingleFlight<Key, (Outcome, By)>,
    /// Sessions refreshed while the Redis store could not take the result: written by the
    /// next request that reuses it.
    unsaved: std::sync::Mutex<std::collections::HashSet<[u8; 16]>>,
}

impl Default for Refresher {
    fn default() -> Self {
        Self {
            flights: SingleFlight::new(REUSE_WINDOW),
            unsaved: Default::default(),
        }
    }
}

/// Does this session need a refresh now? When its token expires within `refresh_before`, or
/// has expired, but never before half its life: a token that lives about as long as
/// `refresh_before` would otherwise be due soon after it arrives (a 61 s token with the
/// default 60 s: a refresh a second).
pub fn needs_refresh(s: &Session, now: u64, refresh_before: Duration) -> bool {
    if s.access_expires_at == 0 {
        return false;
    }
    let mut before = refresh_before.as_secs();
    if s.access_issued_at != 0 {
        let lifetime = s.access_expires_at.saturating_sub(s.access_issued_at);
        before = before.min(lifetime / 2);
    }
    now + before >= s.access_expires_at
}

/// When an access token issued at `now` expires: from the provider's `expires_in`, or, when
/// the answer leaves it out, from the token's own `exp` if it is a JWT (0: unknown, never
/// refreshed for its age). A lifetime past the end of time is no reason to wrap into the past.
/// An `expires_in` of 0 says as little as an `exp` already past: taken at its word, every
/// request would refresh (and get 0 again).
pub fn access_expiry(now: u64, expires_in: Option<Duration>, access_token: &str) -> u64 {
    match expires_in.filter(|d| d.as_secs() > 0) {
        Some(d) => now.saturating_add(d.as_secs()),
        None => jwt_expiry(access_token)
            .filter(|exp| *exp > now)
            .unwrap_or(0),
    }
}

/// A JWT's `exp`, read without checking its signature: only when to refresh depends on it,
/// and the token came straight from the provider. An `exp` already past (a provider whose
/// clock is behind) says nothing usable: refreshing for it would refresh on every request.
fn jwt_expiry(token: &str) -> Option<u64> {
    use base64::Engine as _;
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<f64>,
    }
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > 8 * 1024 {
        return None;
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let exp = serde_json::from_slice::<Claims>(&json).ok()?.exp?;
    // Saturating: a NaN or negative `exp` is 0, a huge one the end of time.
    (exp.is_finite() && exp >= 1.0).then_some(exp as u64)
}

/// The token generation a session carries, as refresh coordination names it: a digest of the
/// access token, unkeyed so that replicas (and a reload that rotates cookie keys) agree on it.
/// A bearer token has too much entropy for its digest to give anything away.
fn generation(s: &Session) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(s.access_token.as_bytes());
    crate::session::crypto::hex(&d[..16])
}

impl Refresher {
    /// Has a refresh of `s`'s tokens begun here since `s` was read (or finished within the
    /// reuse window)? Then `s` is stale: written back (an activity update, a cookie sent with
    /// a slow answer), it would replace the newer tokens with spent ones.
    pub fn superseded(&self, s: &Session) -> bool {
        self.flights.contains(&(s.id, generation(s)))
    }

    /// Refreshes `s` (or joins the refresh already under way for it). Waits at most until
    /// `timeouts.provider` after the refresh began; the refresh itself goes on for later
    /// requests to find.
    pub async fn refresh(&self, app: &Arc<App>, s: &Session) -> Outcome {
        if s.refresh_token.is_none() {
            return Err(RefreshFailure::InvalidGrant);
        }
        let key = (s.id, generation(s));
        let (flight, ran, since) = self.flights.run(
            key,
            || {
                let (app, s) = (app.clone(), s.clone());
                // Counted here, once, by the replica that asked the provider (the task runs
                // to its end even when every request waiting on it has gone).
                async move {
                    let (outcome, by) = coordinated_refresh(&app, &s).await;
                    if by == By::Here {
                        let label = outcome.as_ref().map_or_else(|e| e.label(), |_| "success");
                        app.metrics.refreshes.with_label_values(&[label]).inc();
                    }
                    (outcome, by)
                }
            },
            // An unavailable provider is asked again by the next request.
            |(o, _)| *o != Err(RefreshFailure::Unavailable),
            (Err(RefreshFailure::Unavailable), By::Here),
        );
        // `timeouts.provider` counts from when the provider was asked: a request joining a
        // refresh under way waits for what is left of it, so a hung provider stalls a
        // session's requests once per attempt instead of each of them in turn.
        let deadline = tokio::time::Instant::from_std(since) + app.cfg.timeouts.provider;
        let (mut outcome, by) = match tokio::time::timeout_at(deadline, flight).await {
            Ok(done) => done,
            Err(_) => {
                // A hung provider shows now, not once the refresh gives up: counted by the
                // request that started the refresh, not by each one that joined it.
                if ran {
                    let unavailable = &["unavailable"];
                    app.metrics.refreshes.with_label_values(unavailable).inc();
                }
                (Err(RefreshFailure::Unavailable), By::Here)
            }
        };
        // Counted as a refresh by the replica that asked the provider only.
        let ran = ran && by == By::Here;
        if let (Ok(next), false) = (&outcome, ran) {
            // Reused by a request that loaded the session before it was stored, and the
            // Redis store missed it (down when it came): written now.
            let unsaved = self.unsaved.lock().is_ok_and(|u| u.contains(&next.id));
            if unsaved {
                if let Err(e) = save_refreshed(app, next).await {
                    outcome = Err(e);
                }
            }
        }
        if outcome.is_ok() && !ran {
            app.metrics.refreshes.with_label_values(&["reused"]).inc();
        }
        outcome
    }
}

/// How long one replica may hold a session's refresh lock: longer than a refresh may take.
const LOCK_TTL: Duration = Duration::from_secs(REFRESH_PATIENCE.as_secs() + 15);

/// With Redis, one refresh across all replicas: the lock holder refreshes and publishes the
/// result (sealed) for the others, which wait for it instead of spending the token again.
/// Without Redis the refresh is local; with Redis down it waits for Redis (see below).
async fn coordinated_refresh(app: &Arc<App>, s: &Session) -> (Outcome, By) {
    let Some(rt) = s.refresh_token.as_deref() else {
        return (Err(RefreshFailure::InvalidGrant), By::Here);
    };
    let Some(redis) = app.redis.as_deref() else {
        return (
            persisted(app, run_refresh(app, s, rt).await).await,
            By::Here,
        );
    };
    let id = s.id_hex();
    let generation = generation(s);
    let result_key = redis.key(&["refreshed", &id, &generation]);
    let lock_key = redis.key(&["lock", &id, &generation]);
    let token = app
        .cookies
        .keys
        .mac(b"lock", &crate::session::crypto::random_bytes::<16>());
    let deadline = Instant::now() + LOCK_TTL;
    let mut pause = Duration::from_millis(25);
    let redis_down = |e: crate::store::StoreError| {
        tracing::warn!(
            error = e.to_string().as_str(),
            "redis unavailable for refresh coordination"
        );
    };
    let elsewhere = |o: Outcome| (o, By::Elsewhere);
    loop {
        match redis.get(&result_key).await {
            Ok(Some(v)) => return elsewhere(shared_result(app, &result_key, &v)),
            Ok(None) => {}
            // Not refreshed here alone: other replicas may be refreshing the same token, and
            // with rotating refresh tokens a second use ends the grant (the user logged out
            // because Redis blinked). As with a provider that is down: the token is used
            // while it is valid, then 503.
            Err(e) => {
                redis_down(e);
                return (Err(RefreshFailure::Unavailable), By::Here);
            }
        }
        match redis.try_lock(&lock_key, &token, LOCK_TTL).await {
            Ok(true) => {
                // Another replica may have finished between our read and our lock.
                if let Ok(Some(v)) = redis.get(&result_key).await {
                    let _ = redis.unlock(&lock_key, &token).await;
                    return elsewhere(shared_result(app, &result_key, &v));
                }
                let outcome = persisted(app, run_refresh(app, s, rt).await).await;
                let held = Held {
                    result_key,
                    lock_key,
                    token,
                };
                if !held.settle(app, &outcome).await {
                    // Redis failed after the provider answered: the new tokens exist only here,
                    // and the other replicas wait on the lock. Written as soon as Redis is back.
                    tokio::spawn(held.settle_later(app.clone(), outcome.clone()));
                }
                return (outcome, By::Here);
            }
            Ok(false) if Instant::now() < deadline => {
                // Soon at first (a refresh usually takes a few ms), then more gently: a slow
                // provider must not turn waiting replicas into a load on Redis.
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Ok(false) => return (Err(RefreshFailure::Unavailable), By::Here),
            // Not refreshed here alone: other replicas may be refreshing the same token, and
            // with rotating refresh tokens a second use ends the grant (the user logged out
            // because Redis blinked). As with a provider that is down: the token is used
            // while it is valid, then 503.
            Err(e) => {
                redis_down(e);
                return (Err(RefreshFailure::Unavailable), By::Here);
            }
        }
    }
}

/// A refresh lock this replica holds, and where its result goes.
struct Held {
    result_key: String,
    lock_key: String,
    token: String,
}

impl Held {
    /// Makes the outcome known to the other replicas: the session saved (Redis store), the
    /// result published, the lock freed. False: Redis failed at some step.
    async fn settle(&self, app: &App, outcome: &Outcome) -> bool {
        let Some(redis) = app.redis.as_deref() else {
            return true;
        };
        let unsaved = |next: &Session| {
            app.refresher
                .unsaved
                .lock()
                .is_ok_and(|u| u.contains(&next.id))
        };
        let mut outcome = outcome.clone();
        if let Ok(next) = &outcome {
            if unsaved(next) {
                if let Err(e) = save_refreshed(app, next).await {
                    outcome = Err(e);
                }
                if outcome.as_ref().is_ok_and(|next| unsaved(next)) {
                    return false;
                }
            }
        }
        let published = match &outcome {
            Ok(next) => Some([&[1u8][..], &next.encode()].concat()),
            Err(
                RefreshFailure::InvalidGrant
                | RefreshFailure::Rejected
                | RefreshFailure::TooLarge
                | RefreshFailure::Ended,
            ) => Some(vec![0u8]),
            Err(RefreshFailure::Unavailable) => None,
        };
        if let Some(p) = published {
            let sealed = app.cookies.keys.seal(self.result_key.as_bytes(), &p);
            if let Err(e) = redis
                .set_ex(&self.result_key, sealed.as_bytes(), REUSE_WINDOW)
                .await
            {
                tracing::warn!(
                    error = e.to_string().as_str(),
                    "cannot publish the refresh result yet"
                );
                return false;
            }
        }
        redis.unlock(&self.lock_key, &self.token).await.is_ok()
    }

    /// `settle`, again every second until it succeeds or the reuse window has passed.
    async fn settle_later(self, app: Arc<App>, outcome: Outcome) {
        let until = Instant::now() + REUSE_WINDOW;
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if self.settle(&app, &outcome).await {
                tracing::info!("refresh result stored after Redis came back");
                return;
            }
        }
    }
}

/// Saves a refreshed session in the Redis store (the cookie store sends it as a cookie).
async fn persisted(app: &App, outcome: Outcome) -> Outcome {
    if let Ok(next) = &outcome {
        save_refreshed(app, next).await?;
    }
    outcome
}

/// A refreshed session into the Redis store, over the one it renews. Redis failing is no
/// reason to drop the new tokens (the old refresh token may be spent already): they serve
/// this request and, kept for `REUSE_WINDOW`, are written by a later one.
async fn save_refreshed(app: &App, next: &Session) -> Result<(), RefreshFailure> {
    if app.cfg.session.store != crate::config::StoreKind::Redis {
        return Ok(());
    }
    let saved = app.save_session(next, &CookieJar::default(), false).await;
    let mut unsaved = app.refresher.unsaved.lock().ok();
    match saved {
        Ok(_) => {
            if let Some(u) = unsaved.as_mut() {
                u.remove(&next.id);
            }
            Ok(())
        }
        // Signed out while the provider was asked: it stays signed out.
        Err(crate::session::store::SaveError::Ended) => Err(RefreshFailure::Ended),
        Err(e) => {
            tracing::warn!(
                error = e.to_string().as_str(),
                "cannot save the refreshed session yet"
            );
            if let Some(u) = unsaved.as_mut() {
                // Bounded: after a long outage the results are gone from the reuse window anyway.
                if u.len() >= 10_000 {
                    u.clear();
                }
                u.insert(next.id);
            }
            Ok(())
        }
    }
}

fn shared_result(app: &App, key: &str, sealed: &[u8]) -> Outcome {
    let plain = app
        .cookies
        .keys
        .open(key.as_bytes(), sealed)
        .map_err(|_| RefreshFailure::Unavailable)?;
    match plain.split_first() {
        Some((1, rest)) => Session::decode(rest)
            .map(Arc::new)
            .map_err(|_| RefreshFailure::Unavailable),
        Some((0, _)) => Err(RefreshFailure::InvalidGrant),
        _ => Err(RefreshFailure::Unavailable),
    }
}

async fn run_refresh(app: &App, s: &Session, refresh_token: &str) -> Outcome {
    match app
        .provider
        .refresh_within(refresh_token, REFRESH_PATIENCE)
        .await
    {
        Ok(t) => {
            let now = now_secs();
            let mut next = s.clone();
            if let Some(id) = t.id {
                // OIDC Core §12.2: a refreshed ID token must name the same user.
                if id.identity.sub != s.identity.sub {
                    tracing::warn!("refreshed ID token has a different subject; ending session");
                    return Err(RefreshFailure::Rejected);
                }
                next.identity = id.refreshed_identity(&s.identity);
                next.id_token = t.id_token;
            }
            next.access_expires_at = access_expiry(now, t.expires_in, &t.access_token);
            next.access_token = t.access_token;
            next.last_seen = now;
            next.access_issued_at = now;
            if let Some(rt) = t.refresh_token {
                next.refresh_token = Some(rt);
            }
            if !app.fit_in_cookie(&mut next, now) {
                tracing::warn!(
                    sub = &*next.identity.sub,
                    "refreshed session too large for limits.max_cookie_chunks; session ended \
                     (session.store: redis keeps large sessions)"
                );
                return Err(RefreshFailure::TooLarge);
            }
            tracing::info!(sub = &*next.identity.sub, "access token refreshed");
            Ok(Arc::new(next))
        }
        Err(ProviderError::InvalidGrant(reason)) => {
            tracing::info!(sub = &*s.identity.sub, reason = ?reason, "refresh token refused; session ended");
            Err(RefreshFailure::InvalidGrant)
        }
        // Never log anyone out because the provider blinked: down, 5xx, overloaded. (A new
        // signing key not fetched yet keeps the refreshed tokens: see `Provider::tokens`.)
        Err(e) if e.is_unavailable() => {
            tracing::warn!(
                error = e.to_string().as_str(),
                "refresh failed; the provider will be asked again"
            );
            Err(RefreshFailure::Unavailable)
        }
        Err(e) => {
            tracing::warn!(
                sub = &*s.identity.sub,
                error = e.to_string().as_str(),
                "provider refused the refresh; session ended"
            );
            Err(RefreshFailure::Rejected)
        }
    }
}

crate::app::app_layer!(
    RefreshLayer => RefreshService
);

impl<S, B> Service<Request<B>> for RefreshService<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures_util::future::Either<S::Future, BoxFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        use futures_util::future::Either;
        let now = now_secs();
        let due = req
            .extensions()
            .get::<Arc<ActiveSession>>()
            .is_some_and(|s| {
                needs_refresh(s, now, self.app.cfg.session.refresh_before)
                    || s.needs_touch(now, self.app.cfg.session.idle_timeout)
            });
        if !due {
            return Either::Left(self.inner.call(req));
        }
        let mut inner = take_ready(&mut self.inner);
        let app = self.app.clone();
        Either::Right(Box::pin(async move {
            let Some(old) = req.extensions_mut().remove::<Arc<ActiveSession>>() else {
                return inner.call(req).await;
            };
            // A client that leaves during the wait on the provider: its 499 names the user.
            let waiting = AbandonGuard::arm(ResponseFacts {
                user: Some(old.sub.clone()),
                ..Default::default()
            });
            let outcome = ensure_fresh(&app, old.session.clone(), now).await;
            let user = waiting.disarm().user;
            match outcome {
                Fresh::Unchanged(s) => {
                    req.extensions_mut().insert(ActiveSession::new(s));
                    inner.call(req).await
                }
                Fresh::Refreshed(next) => {
                    let lines = {
                        let jar = CookieJar::parse(req.headers());
                        app.refreshed_cookie(&next, &jar)
                    };
                    req.extensions_mut()
                        .insert(ActiveSession::new((*next).clone()));
                    let mut resp = inner.call(req).await?;
                    // Renewed again while the upstream answered (another request of the
                    // session): that one's cookie is the newer, and this one must not undo it.
                    if !app.refresher.superseded(&next) {
                        append_cookies(&mut resp, lines);
                    }
                    Ok(resp)
                }
                Fresh::Unavailable => {
                    let back = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
                    let mut resp = GatewayError::ProviderUnavailable(
                        "refresh failed and the access token has expired".into(),
                    )
                    .into_response_returning(back);
                    if let Some(user) = user {
                        answered_for(&mut resp, user);
                    }
                    Ok(resp)
                }
                Fresh::Ended => {
                    // The session is over: the auth gate sends browsers to login, API calls get 401.
                    req.extensions_mut().insert(Rejected(CookieReject::Expired));
                    inner.call(req).await
                }
            }
        }))
    }
}

/// A session after the refresh step.
// Moved once per request; boxing would cost an allocation on the hot path.
#[allow(clippy::large_enum_variant)]
pub enum Fresh {
    /// Usable as it is (refresh not due, or the provider is down but the token still valid).
    Unchanged(Session),
    /// Renewed: forward with it and send its cookie back.
    Refreshed(Arc<Session>),
    /// Expired and the provider cannot renew it right now: 503.
    Unavailable,
    /// Over (refresh token refused, or none and the token expired): log in again.
    Ended,
}

/// Refreshes `s` when due (once per session, shared with concurrent requests), and records
/// activity for the idle timeout.
pub async fn ensure_fresh(app: &Arc<App>, s: Session, now: u64) -> Fresh {
    let id = s.id;
    match refresh_if_due(app, s, now).await {
        Fresh::Ended => {
            // Nothing may renew it again: a stored session goes now, not at its TTL.
            if let Err(e) = app.delete_session_id(&id).await {
                tracing::warn!(
                    error = e.to_string().as_str(),
                    "cannot delete an ended session from the store"
                );
            }
            Fresh::Ended
        }
        Fresh::Unchanged(mut s) if s.needs_touch(now, app.cfg.session.idle_timeout) => {
            if app.refresher.superseded(&s) {
                // Renewed meanwhile by another request, which recorded the activity too.
                return Fresh::Unchanged(s);
            }
            s.last_seen = now;
            // The Redis store keeps it there; the cookie store sends a new cookie.
            if app.cfg.session.store == crate::config::StoreKind::Redis {
                match app.save_session(&s, &CookieJar::default(), false).await {
                    Ok(_) => {}
                    // Signed out meanwhile: not brought back by this request.
                    Err(crate::session::store::SaveError::Ended) => return Fresh::Ended,
                    Err(e) => tracing::warn!(
                        error = e.to_string().as_str(),
                        "cannot record session activity"
                    ),
                }
            }
            Fresh::Refreshed(Arc::new(s))
        }
        other => other,
    }
}

async fn refresh_if_due(app: &Arc<App>, s: Session, now: u64) -> Fresh {
    if !needs_refresh(&s, now, app.cfg.session.refresh_before) {
        return Fresh::Unchanged(s);
    }
    // Ended while the provider was asked (a sign-out, a back-channel logout, on any replica):
    // not forwarded, with the new tokens or the old. (The Redis store also refuses to write
    // an ended session back; a cookie session is checked here.)
    match refresh_now(app, s, now).await {
        Fresh::Unchanged(s) if app.revocations.is_revoked(&s) => Fresh::Ended,
        Fresh::Refreshed(s) if app.revocations.is_revoked(&s) => Fresh::Ended,
        fresh => fresh,
    }
}

async fn refresh_now(app: &Arc<App>, s: Session, now: u64) -> Fresh {
    let still_valid = now < s.access_expires_at;
    if s.refresh_token.is_none() {
        // No refresh possible: use the token while it lasts.
        return if still_valid {
            Fresh::Unchanged(s)
        } else {
            Fresh::Ended
        };
    }
    let before = app.cfg.session.refresh_before;
    let mut latest = match app.refresher.refresh(app, &s).await {
        Ok(next) => next,
        // Valid after the wait on the provider, not only when the request came.
        Err(RefreshFailure::Unavailable) if now_secs() < s.access_expires_at => {
            return Fresh::Unchanged(s)
        }
        Err(e) => return failed(e),
    };
    // A result reused from an earlier refresh (the request carried a cookie from before it)
    // may be due itself by now, when tokens live shorter than the reuse window: it is renewed
    // in turn (once per generation, as any refresh), so that an expired token is never
    // forwarded. Only a result issued before this request came can be stale: what the
    // provider has just issued is forwarded as it is.
    let stale = |s: &Session| s.access_issued_at < now;
    for _ in 0..MAX_CHAIN {
        if !stale(&latest)
            || latest.refresh_token.is_none()
            || !needs_refresh(&latest, now_secs(), before)
        {
            break;
        }
        match app.refresher.refresh(app, &latest).await {
            Ok(next) => latest = next,
            // Its token serves while it is valid (checked below).
            Err(RefreshFailure::Unavailable) => break,
            Err(e) => return failed(e),
        }
    }
    if stale(&latest) && latest.access_expires_at != 0 && now_secs() >= latest.access_expires_at {
        return match latest.refresh_token {
            Some(_) => Fresh::Unavailable,
            None => Fresh::Ended,
        };
    }
    Fresh::Refreshed(latest)
}

/// How many reused results a request renews in turn at most (see `refresh_if_due`).
const MAX_CHAIN: usize = 3;

/// A refresh that failed: the session is over, or (provider unavailable, token expired) 503.
fn failed(e: RefreshFailure) -> Fresh {
    match e {
        RefreshFailure::Unavailable => Fresh::Unavailable,
        RefreshFailure::InvalidGrant
        | RefreshFailure::Rejected
        | RefreshFailure::TooLarge
        | RefreshFailure::Ended => Fresh::Ended,
    }
}

fn append_cookies(resp: &mut Response<Body>, lines: Vec<HeaderValue>) {
    if lines.is_empty() {
        return;
    }
    keep_private(resp.headers_mut());
    for v in lines {
        resp.headers_mut().append(SET_COOKIE, v);
    }
}

/// An upstream answer that now carries the user's session cookie must not be stored by a
/// shared cache, which would hand the cookie to whoever asks next (an asset behind the login
/// marked `public, max-age=…`): `private` is added and `public` / `s-maxage` dropped; what
/// the browser's own cache may do (`max-age`, `no-cache`, …) is kept. Fields aimed at CDNs
/// alone (`CDN-Cache-Control`, RFC 9213, and its vendors' `*-CDN-Cache-Control`;
/// `Surrogate-Control`) are dropped: a CDN obeys them instead of `Cache-Control`.
fn keep_private(headers: &mut HeaderMap) {
    let targeted: Vec<_> = headers
        .keys()
        .filter(|n| n.as_str().ends_with("cdn-cache-control") || n.as_str() == "surrogate-control")
        .cloned()
        .collect();
    for n in targeted {
        headers.remove(n);
    }
    let directives: Vec<String> = headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
        .collect();
    let name = |d: &str| {
        d.split('=')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    };
    if directives
        .iter()
        .any(|d| matches!(name(d).as_str(), "private" | "no-store"))
    {
        return;
    }
    let kept = directives
        .iter()
        .filter(|d| !matches!(name(d).as_str(), "public" | "s-maxage"))
        .map(String::as_str);
    let value = std::iter::once("private")
        .chain(kept)
        .collect::<Vec<_>>()
        .join(", ");
    let value = HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("private"));
    headers.insert(CACHE_CONTROL, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Identity;

    #[test]
    fn a_response_carrying_a_session_cookie_is_kept_from_shared_caches() {
        let private = |upstream: &[&str]| {
            let mut h = HeaderMap::new();
            for v in upstream {
                h.append(CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
            }
            keep_private(&mut h);
            let all: Vec<&str> = h
                .get_all(CACHE_CONTROL)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            all.join(" | ")
        };
        assert_eq!(private(&[]), "private");
        assert_eq!(
            private(&["public, max-age=600, s-maxage=3600"]),
            "private, max-age=600"
        );
        assert_eq!(
            private(&["Public", "max-age=60, must-revalidate"]),
            "private, max-age=60, must-revalidate"
        );
        assert_eq!(private(&["no-store"]), "no-store");
        assert_eq!(private(&["private, max-age=5"]), "private, max-age=5");
        // What only CDNs read goes, whatever Cache-Control says; other fields stay.
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("cache-control", "private"),
            ("cdn-cache-control", "public, max-age=600"),
            ("cloudflare-cdn-cache-control", "max-age=600"),
            ("surrogate-control", "max-age=600"),
            ("surrogate-key", "assets"),
            ("etag", "\"x\""),
        ] {
            h.append(n, HeaderValue::from_static(v));
        }
        keep_private(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["cache-control", "etag", "surrogate-key"]);
    }

    #[test]
    fn refresh_window() {
        let mut s = Session {
            id: [0; 16],
            created_at_ms: 0,
            expires_at: 10_000,
            access_token: "a".into(),
            access_expires_at: 1000,
            access_issued_at: 0,
            refresh_token: None,
            id_token: None,
            identity: Identity::default(),
            last_seen: 0,
        };
        let before = Duration::from_secs(60);
        assert!(!needs_refresh(&s, 900, before));
        assert!(needs_refresh(&s, 940, before));
        assert!(needs_refresh(&s, 2000, before));
        s.access_expires_at = 0;
        assert!(
            !needs_refresh(&s, 2000, before),
            "unknown expiry: never refreshed"
        );
        // A 10 s token with refresh_before 60 s: due after half its life, not at once.
        s.access_issued_at = 5000;
        s.access_expires_at = 5010;
        assert!(!needs_refresh(&s, 5000, before));
        assert!(!needs_refresh(&s, 5004, before));
        assert!(needs_refresh(&s, 5005, before));
        // A long-lived token: refresh_before as configured.
        s.access_expires_at = 5000 + 3600;
        assert!(!needs_refresh(&s, 5000 + 3539, before));
        assert!(needs_refresh(&s, 5000 + 3540, before));
        // A token that lives longer than refresh_before, but less than twice as long: due at
        // half-life (45 s of 90), not once it expires within refresh_before (30 s).
        s.access_expires_at = 5000 + 90;
        assert!(!needs_refresh(&s, 5000 + 44, before));
        assert!(needs_refresh(&s, 5000 + 45, before));
        // Just past refresh_before: half-life too, not a second after it came.
        s.access_expires_at = 5000 + 61;
        assert!(!needs_refresh(&s, 5000 + 2, before));
        assert!(!needs_refresh(&s, 5000 + 29, before));
        assert!(needs_refresh(&s, 5000 + 31, before));
        // Twice refresh_before and longer: refresh_before as configured.
        s.access_expires_at = 5000 + 120;
        assert!(needs_refresh(&s, 5000 + 60, before));
        s.access_expires_at = 5000 + 300;
        assert!(!needs_refresh(&s, 5000 + 239, before));
        assert!(needs_refresh(&s, 5000 + 240, before));
        // Exactly refresh_before: half-life.
        s.access_expires_at = 5000 + 60;
        assert!(!needs_refresh(&s, 5000 + 29, before));
        assert!(needs_refresh(&s, 5000 + 30, before));
        // An `expires_in` near 2^64 does not wrap into the past.
        s.access_expires_at =
            access_expiry(5000, Some(Duration::from_secs(u64::MAX - 10)), "opaque");
        assert!(!needs_refresh(&s, 5000 + 3600, before));
        assert_eq!(access_expiry(5000, None, "opaque"), 0, "not stated");
        // `expires_in: 0`: as if not stated (a JWT's `exp` still tells), not due at once.
        let zero = Some(Duration::ZERO);
        assert_eq!(access_expiry(5000, zero, "opaque"), 0);
        assert_eq!(access_expiry(5000, zero, &jwt(r#"{"exp":8600}"#)), 8600);
        s.access_expires_at = access_expiry(5000, zero, "opaque");
        assert!(!needs_refresh(&s, 5000, before));
    }

    fn jwt(claims: &str) -> String {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b64(r#"{"alg":"RS256"}"#), b64(claims))
    }

    /// Without `expires_in`, a JWT access token's own `exp` says when it expires; anything
    /// else leaves it unknown, as before.
    #[test]
    fn without_expires_in_a_jwt_access_token_tells_its_expiry() {
        let now = 5000;
        assert_eq!(access_expiry(now, None, &jwt(r#"{"exp":8600}"#)), 8600);
        assert_eq!(
            access_expiry(now, None, &jwt(r#"{"sub":"a","exp":8600.9}"#)),
            8600
        );
        // The provider's `expires_in` wins when it is there.
        let stated = Some(Duration::from_secs(60));
        assert_eq!(access_expiry(now, stated, &jwt(r#"{"exp":8600}"#)), 5060);
        for unknown in [
            "opaque-token".to_string(),
            jwt(r#"{"sub":"a"}"#),
            jwt(r#"{"exp":"8600"}"#),
            jwt(r#"{"exp":-1}"#),
            jwt(r#"{"exp":4999}"#),
            jwt(r#"{"exp":5000}"#),
            jwt("not json"),
            format!("{}.extra", jwt(r#"{"exp":8600}"#)),
            "a.!!!.c".to_string(),
            format!("a.{}.c", "A".repeat(9000)),
        ] {
            assert_eq!(access_expiry(now, None, &unknown), 0, "{unknown}");
        }
        // Far future: the end of time, not a wrap.
        assert_eq!(access_expiry(now, None, &jwt(r#"{"exp":1e300}"#)), u64::MAX);
    }
}
