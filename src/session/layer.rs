//! Opens the session cookie and leaves the session (or why it was rejected) in the request.

use crate::app::App;
use crate::policy::Rejected;
use crate::session::{now_secs, CookieJar};
use http::Request;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{Layer, Service};

#[derive(Clone)]
pub struct SessionLayer {
    app: Arc<App>,
}

impl SessionLayer {
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;
    fn layer(&self, inner: S) -> SessionService<S> {
        SessionService {
            app: self.app.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct SessionService<S> {
    app: Arc<App>,
    inner: S,
}

impl<S, B> Service<Request<B>> for SessionService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        let opened = {
            let jar = CookieJar::parse(req.headers());
            self.app.cookies.open_session(&jar, now_secs())
        };
        match opened {
            Ok(Some(session)) => {
                req.extensions_mut().insert(session);
            }
            Ok(None) => {}
            Err(reason) => {
                tracing::debug!(reason = reason.label(), "session cookie rejected");
                self.app
                    .metrics
                    .cookies_rejected
                    .with_label_values(&[reason.label()])
                    .inc();
                req.extensions_mut().insert(Rejected(reason));
            }
        }
        self.inner.call(req)
    }
}
