//! Finds the request's session (cookie, or Redis for the Redis store) and leaves it — or why it
//! was rejected — in the request's extensions. Redis down: 503, the gateway keeps running.

use crate::app::App;
use crate::body::Body;
use crate::error::{error_as_json, GatewayError};
use crate::policy::{is_page_navigation, Rejected};
use crate::refresh::needs_refresh;
use crate::session::store::Loaded;
use crate::session::{now_secs, ActiveSession, CookieJar, CookieReject, Opened};
use http::{Request, Response};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tower::Service;

crate::app::app_layer!(
    SessionLayer => SessionService
);

/// The slow path of the session layers (a Redis lookup, a refresh), boxed.
pub(crate) type BoxFuture =
    Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// The inner service that was polled ready, for a request answered later; a fresh clone is
/// left behind for the next call (tower promises readiness only for the instance polled).
pub(crate) fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

fn attach<B>(app: &App, req: &mut Request<B>, loaded: Loaded) {
    match loaded {
        Loaded::Session(s) => {
            req.extensions_mut().insert(ActiveSession::new(s));
        }
        Loaded::None => {}
        Loaded::Rejected(reason) => reject(app, req, reason),
    }
}

fn reject<B>(app: &App, req: &mut Request<B>, reason: CookieReject) {
    tracing::debug!(reason = reason.label(), "session cookie rejected");
    app.metrics
        .cookies_rejected
        .with_label_values(&[reason.label()])
        .inc();
    req.extensions_mut().insert(Rejected(reason));
}

impl<S, B> Service<Request<B>> for SessionService<S>
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
        // Public routes never look at the session (nor cost a Redis round trip).
        if self
            .app
            .route_of(&req)
            .is_some_and(|r| r.auth == crate::policy::routes::AuthMode::Skip)
        {
            return Either::Left(self.inner.call(req));
        }
        let now = now_secs();
        let opened = {
            let jar = CookieJar::parse(req.headers());
            self.app
                .cookies
                .open_active(&jar, now, &self.app.session_cache, |s| {
                    self.app.ended(s, now)
                })
        };
        let id = match opened {
            Ok(Some(Opened::Session(s))) => {
                // The cookie store: everything is here, no I/O on the hot path.
                let due = needs_refresh(&s, now, self.app.cfg.session.refresh_before);
                req.extensions_mut().insert(s);
                if due {
                    // The refresh step may answer 503 (provider down, token expired).
                    let inner = take_ready(&mut self.inner);
                    return Either::Right(json_503_for_api(inner, req));
                }
                return Either::Left(self.inner.call(req));
            }
            Ok(None) => return Either::Left(self.inner.call(req)),
            Err(reason) => {
                reject(&self.app, &mut req, reason);
                return Either::Left(self.inner.call(req));
            }
            Ok(Some(Opened::Ref(id))) => id,
        };
        // A reference: look the session up in Redis (and, should it name no live session,
        // the others the request's cookies hold).
        let inner = take_ready(&mut self.inner);
        let app = self.app.clone();
        Either::Right(Box::pin(async move {
            let loaded = {
                let jar = CookieJar::parse(req.headers());
                app.resolve_ref(id, &jar, now).await
            };
            match loaded {
                Ok(loaded) => {
                    attach(&app, &mut req, loaded);
                    json_503_for_api(inner, req).await
                }
                Err(e) => {
                    tracing::debug!(error = e.to_string().as_str(), "session store unavailable");
                    Ok(GatewayError::StoreUnavailable(e.to_string())
                        .response_for(req.method(), req.headers()))
                }
            }
        }))
    }
}

/// Calls `inner`; a 503 the gateway answers itself on the way (the refresh step's, when the
/// provider cannot renew an expired token) is JSON for an API client, a page for a browser
/// navigation or a form it submits, as its 401 would be.
/// Only for requests that may meet one: the others keep the unboxed fast path.
fn json_503_for_api<S, B>(mut inner: S, req: Request<B>) -> BoxFuture
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    let api = !is_page_navigation(req.method(), req.headers());
    let call = inner.call(req);
    Box::pin(async move {
        let resp = call.await?;
        Ok(if api { error_as_json(resp) } else { resp })
    })
}
