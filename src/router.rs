//! The outer layers: the request id, then the split between the gateway's own
//! endpoints and the application's routes.

use crate::app::App;
use crate::body::Body;
use crate::flow;
use crate::metrics::{ResponseFacts, RouteKind};
use crate::proxy::headers::valid_request_id;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{Layer, Service};

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

#[derive(Clone)]
pub struct RequestIdLayer {
    app: Arc<App>,
}

impl RequestIdLayer {
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;
    fn layer(&self, inner: S) -> RequestId<S> {
        RequestId {
            app: self.app.clone(),
            inner,
        }
    }
}

/// Keeps a valid client-sent request id, else makes one; echoes it on the response.
#[derive(Clone)]
pub struct RequestId<S> {
    app: Arc<App>,
    inner: S,
}

static COUNTER: AtomicU64 = AtomicU64::new(1);

impl<S> RequestId<S> {
    fn id_for(&self, req: &Request<Incoming>) -> HeaderValue {
        let name = &self.app.cfg.headers.request_id;
        match req.headers().get(name) {
            Some(v) if valid_request_id(v) => v.clone(),
            _ => {
                let n = COUNTER.fetch_add(1, Ordering::Relaxed);
                HeaderValue::from_str(&format!("{}-{n:x}", self.app.request_id_prefix))
                    .unwrap_or(HeaderValue::from_static("-"))
            }
        }
    }
}

pin_project_lite::pin_project! {
    pub struct WithRequestId<F> {
        #[pin]
        inner: F,
        id: Option<(http::HeaderName, HeaderValue)>,
    }
}

impl<F> Future for WithRequestId<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut resp = match this.inner.poll(cx) {
            Poll::Ready(Ok(r)) => r,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        if let Some((name, value)) = this.id.take() {
            resp.headers_mut().insert(name, value);
        }
        Poll::Ready(Ok(resp))
    }
}

impl<S> Service<Request<Incoming>> for RequestId<S>
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = WithRequestId<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let id = self.id_for(&req);
        let name = self.app.cfg.headers.request_id.clone();
        req.headers_mut().insert(name.clone(), id.clone());
        WithRequestId {
            inner: self.inner.call(req),
            id: Some((name, id)),
        }
    }
}

/// Sends `/oauth2/*`, `/healthz` and `/readyz` to the gateway's handlers, the rest to `app`.
#[derive(Clone)]
pub struct Router<S> {
    app: Arc<App>,
    routes: S,
}

impl<S> Router<S> {
    pub fn new(app: Arc<App>, routes: S) -> Self {
        Self { app, routes }
    }
}

impl<S> Service<Request<Incoming>> for Router<S>
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures_util::future::Either<S::Future, BoxFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.routes.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        use futures_util::future::Either;
        if flow::is_flow_path(req.uri().path()) {
            let app = self.app.clone();
            Either::Right(Box::pin(async move {
                let route = if req.uri().path() == "/oauth2/auth" {
                    RouteKind::ForwardAuth
                } else {
                    RouteKind::Flow
                };
                let mut resp = flow::handle(app, req).await;
                resp.extensions_mut().insert(ResponseFacts {
                    route: Some(route),
                    ..Default::default()
                });
                Ok(resp)
            }))
        } else {
            Either::Left(self.routes.call(req))
        }
    }
}
