//! The outer layers: the request id, then the split between the gateway's own
//! endpoints and the application's routes.

use crate::app::App;
use crate::body::Body;
use crate::flow;
use crate::metrics::{AbandonGuard, CallWithId, ResponseFacts, RouteKind};
use crate::pages;
use crate::policy::routes::{host_only, method_override, valid_host, Route};
use crate::proxy::headers::valid_request_id;
use crate::proxy::path::{normalize, PathError};
use http::{HeaderValue, Request, Response};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

crate::app::app_layer!(
    /// Keeps a valid client-sent request id, else makes one; echoes it on the response.
    RequestIdLayer => RequestId
);

static COUNTER: AtomicU64 = AtomicU64::new(1);

impl<S> RequestId<S> {
    fn id_for(&self, req: &Request<Body>) -> HeaderValue {
        let name = &self.app.cfg.headers.request_id;
        match req.headers().get(name) {
            Some(v) if valid_request_id(v) => v.clone(),
            _ => new_request_id(
                &self.app.request_id_prefix,
                COUNTER.fetch_add(1, Ordering::Relaxed),
            ),
        }
    }
}

/// `<prefix>-<n in hex>`, written without the formatting machinery (once per request) into
/// the thread's slab of ids: the request's copy and the response's share that memory, so an
/// id costs no allocation of its own (one 16 KiB slab per ~600 ids, freed with its last id).
fn new_request_id(prefix: &str, n: u64) -> HeaderValue {
    thread_local! {
        static SLAB: std::cell::RefCell<bytes::BytesMut> =
            std::cell::RefCell::new(bytes::BytesMut::new());
    }
    const SLAB_BYTES: usize = 16 * 1024;
    let len = prefix.len() + 17;
    SLAB.with_borrow_mut(|slab| {
        if slab.capacity() < len {
            *slab = bytes::BytesMut::with_capacity(SLAB_BYTES.max(len));
        }
        slab.extend_from_slice(prefix.as_bytes());
        slab.extend_from_slice(b"-");
        let digits = (64 - n.leading_zeros()).div_ceil(4).max(1);
        for shift in (0..digits).rev() {
            let digit = (n >> (shift * 4)) as usize & 0xf;
            slab.extend_from_slice(&[crate::session::crypto::HEX_DIGITS[digit]]);
        }
        HeaderValue::from_maybe_shared(slab.split().freeze())
            .unwrap_or(HeaderValue::from_static("-"))
    })
}

pin_project_lite::pin_project! {
    pub struct WithRequestId<F> {
        #[pin]
        inner: F,
        id: Option<(http::HeaderName, HeaderValue)>,
        // Draining after SIGTERM: tell HTTP/1 clients not to reuse the connection.
        close: bool,
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
        if *this.close {
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some((name, value)) = this.id.take() {
            resp.headers_mut().insert(name, value);
        }
        Poll::Ready(Ok(resp))
    }
}

impl<S> Service<Request<Body>> for RequestId<S>
where
    S: CallWithId<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = WithRequestId<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let id = self.id_for(&req);
        let name = self.app.cfg.headers.request_id.clone();
        req.headers_mut().insert(name.clone(), id.clone());
        let close = req.version() < http::Version::HTTP_2
            && self.app.draining.load(std::sync::atomic::Ordering::Relaxed);
        WithRequestId {
            inner: self.inner.call_with_id(req, &id),
            id: Some((name, id)),
            close,
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

impl<S> Service<Request<Body>> for Router<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures_util::future::Either<S::Future, BoxFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.routes.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        use futures_util::future::Either;
        // The HTTP/1 reader checks Host and counts header fields as it parses; HTTP/2
        // requests come from hyper, which bounds only their size.
        if req.version() == http::Version::HTTP_2 {
            if !valid_h2_host(&req) {
                tracing::debug!("invalid :authority or Host refused");
                return Either::Right(bad_request("The request's host is not a valid host name."));
            }
            if too_many_headers(req.headers(), self.app.cfg.limits.max_headers) {
                tracing::debug!("request with more header fields than limits.max_headers refused");
                let resp = pages::html(
                    http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "Request header fields too large",
                    "The request has too many header fields.",
                    "",
                );
                return Either::Right(Box::pin(std::future::ready(Ok(resp))));
            }
        }
        // A method in lower case (`delete`, `Get`) is one thing to the routes and another to
        // apps that upper-case it (Django, Flask, Symfony) or treat every non-`GET` as a
        // write: refused, as nginx refuses it, rather than guessed.
        if req
            .method()
            .as_str()
            .bytes()
            .any(|b| b.is_ascii_lowercase())
        {
            tracing::debug!("request method not in upper case refused");
            return Either::Right(bad_request("The request method is not in upper case."));
        }
        // A tunnel through the gateway is no request to the app (and hyper's client takes a
        // 2xx answer to it for a protocol switch, cutting its body off), as with nginx; its
        // target (`host:port`) is no path.
        if req.method() == http::Method::CONNECT {
            let resp = pages::method_not_allowed("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH");
            return Either::Right(Box::pin(std::future::ready(Ok(resp))));
        }
        // One normalised path for everything after this point, the upstream included.
        if let Err(e) = normalize_uri(&mut req) {
            tracing::debug!(
                error = e.to_string().as_str(),
                "ambiguous request path refused"
            );
            return Either::Right(bad_request("The request path is ambiguous."));
        }
        if flow::is_flow_path(req.uri().path()) {
            let app = self.app.clone();
            Either::Right(Box::pin(async move {
                let path = req.uri().path();
                let route = if flow::is_forward_auth_path(path) {
                    RouteKind::ForwardAuth
                } else if path == "/healthz" || path == "/readyz" {
                    RouteKind::Health
                } else {
                    RouteKind::Flow
                };
                let waiting = AbandonGuard::arm(ResponseFacts {
                    route: Some(route),
                    ..Default::default()
                });
                let mut resp = flow::handle(app, req).await;
                let facts = waiting.disarm();
                match resp.extensions_mut().get_mut::<ResponseFacts>() {
                    // The handler named the user (`answered_for`); the route is ours to say.
                    Some(f) => f.route = facts.route,
                    None => {
                        resp.extensions_mut().insert(facts);
                    }
                }
                Ok(resp)
            }))
        } else {
            if !self.app.cfg.routes.is_empty() {
                let host = request_host(&req);
                let matched = self.app.route_for(req.method(), host, req.uri().path());
                // A request that asks to be taken as another method must fall under the same
                // route either way: apps that honour the override act on the other method,
                // those that do not on its own, and the route's rules must hold for both.
                let same = method_override(req.headers(), req.uri().query()).is_ok_and(|m| {
                    m.is_none_or(|m| self.app.route_for(&m, host, req.uri().path()) == matched)
                });
                if !same {
                    return Either::Right(bad_request(
                        "The request's method override falls under another route.",
                    ));
                }
                if let Some(i) = matched {
                    req.extensions_mut().insert(RouteIdx(i));
                }
            }
            Either::Left(self.routes.call(req))
        }
    }
}

/// Which configured route matched (index into `routes`); absent: the default (login).
#[derive(Debug, Clone, Copy)]
pub struct RouteIdx(pub usize);

impl App {
    /// The first configured route a request (its normalised path) matches, as its index;
    /// `None`: the default.
    pub fn route_for(
        &self,
        method: &http::Method,
        host: Option<&str>,
        path: &str,
    ) -> Option<usize> {
        let path = crate::proxy::path::RoutePath::new(path);
        self.cfg
            .routes
            .iter()
            .position(|r| r.matches(method, host, &path))
    }

    pub fn route_of<B>(&self, req: &Request<B>) -> Option<&Route> {
        self.route_in(req.extensions())
    }

    pub fn route_in(&self, extensions: &http::Extensions) -> Option<&Route> {
        extensions
            .get::<RouteIdx>()
            .and_then(|i| self.cfg.routes.get(i.0))
    }

    /// Where a request on `route` goes: the route's own upstream, else the default one.
    pub fn upstream_for<'a>(
        &'a self,
        route: Option<&'a Route>,
    ) -> &'a crate::config::UpstreamConfig {
        route
            .and_then(|r| r.upstream.as_ref())
            .unwrap_or(&self.cfg.upstream)
    }
}

/// The request's host (Host header, or the HTTP/2 authority), without the port.
/// The router's refusal of a request it cannot route unambiguously.
fn bad_request(why: &'static str) -> BoxFuture {
    let resp = pages::html(http::StatusCode::BAD_REQUEST, "Bad request", why, "");
    Box::pin(std::future::ready(Ok(resp)))
}

/// More header fields than `limits.max_headers`, an HTTP/2 request's cookie crumbs counted as
/// the one `Cookie` line they stand for (RFC 9113 §8.2.3), as HTTP/1.1 sends it.
fn too_many_headers(h: &http::HeaderMap, max: usize) -> bool {
    h.len() > max && {
        let crumbs = h.get_all(http::header::COOKIE).iter().count();
        h.len() - crumbs.saturating_sub(1) > max
    }
}

/// An HTTP/2 request's `:authority` and Host (either may be absent, not both) are valid host
/// values, with one Host at most, naming the same site as `:authority` (RFC 9113 §8.3.1). With
/// neither, as an HTTP/1.1 request without Host, the upstream would be sent its own address.
fn valid_h2_host<B>(req: &Request<B>) -> bool {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (None, _) => None,
        (Some(v), None) => match v.to_str() {
            Ok(h) if valid_host(h) => Some(h),
            _ => return false,
        },
        (Some(_), Some(_)) => return false,
    };
    match (req.uri().authority(), host) {
        (Some(a), Some(h)) => valid_host(a.as_str()) && a.as_str().eq_ignore_ascii_case(h),
        (Some(a), None) => valid_host(a.as_str()),
        (None, host) => host.is_some(),
    }
}

pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .map(host_only)
}

/// Puts the request's path in normal form (see [`normalize`]), its query unchanged; refuses a
/// path that normalises out of the gateway's own endpoints.
pub fn normalize_uri<B>(req: &mut Request<B>) -> Result<(), PathError> {
    let normalized = match normalize(req.uri().path())? {
        std::borrow::Cow::Borrowed(_) => return Ok(()),
        std::borrow::Cow::Owned(p) => p,
    };
    // `/oauth2/auth/../../x` is no request for `/x`: it was meant for the gateway (Envoy's
    // ext_authz appends the original path to its prefix), and must not reach the upstream.
    if req.uri().path().starts_with(crate::config::FLOW_PREFIX)
        && !normalized.starts_with(crate::config::FLOW_PREFIX)
    {
        return Err(PathError::LeavesGatewayPaths);
    }
    let pq = match req.uri().query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(pq.parse().map_err(|_| PathError::ForbiddenChar)?);
    *req.uri_mut() = http::Uri::from_parts(parts).map_err(|_| PathError::ForbiddenChar)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_http2_request_names_its_host_once_and_at_all() {
        let req = |uri: &str, hosts: &[&str]| {
            let mut b = http::Request::builder().uri(uri);
            for h in hosts {
                b = b.header(http::header::HOST, *h);
            }
            b.body(()).unwrap()
        };
        assert!(super::valid_h2_host(&req("http://app.test/x", &[])));
        assert!(super::valid_h2_host(&req("/x", &["app.test"])));
        assert!(super::valid_h2_host(&req(
            "http://app.test/x",
            &["APP.test"]
        )));
        // Neither (an HTTP/1.1 request without Host is refused too), two, or disagreeing.
        assert!(!super::valid_h2_host(&req("/x", &[])));
        assert!(!super::valid_h2_host(&req("/x", &["a.test", "a.test"])));
        assert!(!super::valid_h2_host(&req(
            "http://app.test/x",
            &["other.test"]
        )));
    }

    #[test]
    fn request_ids() {
        assert_eq!(super::new_request_id("ab12", 0), "ab12-0");
        assert_eq!(super::new_request_id("ab12", 0x1f), "ab12-1f");
        assert_eq!(
            super::new_request_id("ab12", u64::MAX),
            "ab12-ffffffffffffffff"
        );
        // Ids from several slabs in a row stay as they were made, whichever lives on.
        let ids: Vec<_> = (0..5000u64)
            .map(|n| super::new_request_id("p", n))
            .collect();
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(id.to_str().unwrap(), format!("p-{n:x}"));
        }
    }
}
