//! The last two steps: header hygiene and injection, then the streamed forward to the upstream.

use super::headers::{
    inject_identity, sanitize_request, sanitize_response, sanitize_switch, set_forwarded,
};
use crate::app::App;
use crate::body::{Body, BodyError};
use crate::config::UpstreamConfig;
use crate::error::{error_as_json, source_chain, GatewayError, UpstreamFailure};
use crate::metrics::{AbandonGuard, ResponseFacts, RouteKind};
use crate::policy::cidr::trusted;
use crate::policy::is_page_navigation;
use crate::policy::routes::{AuthMode, Route};
use crate::proxy::pool::{broke_off, SendError};
use crate::server::h1::io::{ClientBodyError, ClientUpgrade};
use crate::session::ActiveSession;
use http::uri::PathAndQuery;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

/// Where a request came from, set by the listener.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub tls: bool,
    /// The peer address as an X-Forwarded-For value.
    pub ip: http::HeaderValue,
}

crate::app::app_layer!(
    /// Strips what a client must not send upstream, then adds what the upstream trusts.
    HeaderHygieneLayer => HeaderHygiene
);

impl<S, B> Service<Request<B>> for HeaderHygiene<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> S::Future {
        let app = &self.app;
        // In parts: the headers change while the connection and session are read in place.
        let (mut parts, body) = req.into_parts();
        let conn = parts.extensions.get::<ConnInfo>();
        let trusted_hop = conn.is_some_and(|c| trusted(&app.cfg.trusted_proxies, c.remote.ip()));
        let h = &mut parts.headers;
        let clean = sanitize_request(
            h,
            // An HTTP/1.1 connection the server can hand over (see `ClientUpgrade`), and a
            // GET: a websocket handshake is one (RFC 6455 §4.1); another method goes on as a
            // plain request.
            || {
                parts.method == http::Method::GET
                    && parts.extensions.get::<ClientUpgrade>().is_some()
            },
            trusted_hop,
            &app.spoofable,
            |n| app.cookies.is_ours(n),
        );
        // HTTP/2 clients carry the host in the URI, not a Host header: give the upstream one.
        let host = clean.host.or_else(|| {
            let v = http::HeaderValue::from_str(parts.uri.authority()?.as_str()).ok()?;
            h.insert(header::HOST, v.clone());
            Some(v)
        });
        let no_host = host.is_none();
        if let Some(c) = conn {
            let proto = if c.tls { "https" } else { "http" };
            set_forwarded(h, &c.ip, proto, clean.prior, host);
        }
        if no_host {
            // Neither (an HTTP/1.0 request): the upstream's own authority.
            let up = app.upstream_for(app.route_in(&parts.extensions));
            if let Ok(v) = http::HeaderValue::from_str(up.authority.as_str()) {
                h.insert(header::HOST, v);
            }
        }
        // The gateway's own 502 or 504 is a page for a person's browser, else JSON (as its 401
        // and 503 are). Decided here, where the headers are read anyway: only a request with
        // `Accept` can be a navigation, and only a navigation is marked.
        if clean.accept && is_page_navigation(&parts.method, h) {
            parts.extensions.insert(PageCaller);
        }
        // Left in place: `Forward` takes the subject from it for the access log.
        if let Some(s) = parts.extensions.get::<Arc<ActiveSession>>() {
            inject_identity(h, s.upstream_headers(&app.cfg.headers));
        }
        self.inner.call(Request::from_parts(parts, body))
    }
}

/// Marks a request a person's browser shows the answer to (see `is_page_navigation`).
#[derive(Debug, Clone, Copy)]
struct PageCaller;

/// Sends the request to the upstream over the pooled client, streaming both bodies.
#[derive(Clone)]
pub struct Forward {
    app: Arc<App>,
}

impl Forward {
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl Service<Request<Body>> for Forward {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        let app = self.app.clone();
        // The request's extensions stay here, not sent with it: their map (allocated for the
        // connection info) carries the response's facts back, no second map per request.
        let mut extensions = std::mem::take(req.extensions_mut());
        let user = extensions
            .remove::<Arc<ActiveSession>>()
            .map(|s| s.sub.clone());
        // Only an upgrade the hygiene layer let through (it keeps `Upgrade` for those alone).
        let client_upgrade = extensions
            .remove::<ClientUpgrade>()
            .filter(|_| req.headers().contains_key(header::UPGRADE));
        Box::pin(async move {
            let route = app.route_in(&extensions);
            let kind = match route.map(|r| r.auth) {
                Some(AuthMode::Skip) => RouteKind::SkipAuth,
                _ => RouteKind::Proxied,
            };
            let start = std::time::Instant::now();
            let waiting = AbandonGuard::arm(ResponseFacts {
                route: Some(kind),
                user,
                upstream_start: Some(start),
                ..Default::default()
            });
            let result = forward(&app, route, req, client_upgrade, start).await;
            let mut facts = waiting.disarm();
            let end = std::time::Instant::now();
            let upstream_time = end.saturating_duration_since(start);
            let mut resp = match result {
                Ok(r) => {
                    app.metrics
                        .upstream_seconds
                        .observe(upstream_time.as_secs_f64());
                    r
                }
                Err(e) => {
                    let kind = match &e {
                        GatewayError::UpstreamTimeout => Some("timeout"),
                        GatewayError::Upstream(failure, _) => Some(failure.label()),
                        _ => None,
                    };
                    if let Some(kind) = kind {
                        app.metrics.upstream_errors.with_label_values(&[kind]).inc();
                        // Logged where the request's id is known (see `metrics::finish`).
                        facts.upstream_failure = Some(Arc::new((kind, e.to_string())));
                    } else {
                        tracing::debug!(error = e.to_string().as_str(), "request not forwarded");
                    }
                    match extensions.get::<PageCaller>() {
                        Some(PageCaller) => e.into_response(),
                        None => error_as_json(e.into_response()),
                    }
                }
            };
            facts.upstream_time = Some(upstream_time);
            facts.end = Some(end);
            extensions.insert(facts);
            let from_upstream = std::mem::replace(resp.extensions_mut(), extensions);
            resp.extensions_mut().extend(from_upstream);
            Ok(resp)
        })
    }
}

/// Whose fault a failed exchange was, and of what kind: the client's request body (it
/// stalled or was malformed), or the upstream's.
fn send_failure(e: SendError) -> GatewayError {
    let e = match e {
        SendError::Timeout => return GatewayError::UpstreamTimeout,
        SendError::ClientStalled => return GatewayError::ClientBody(ClientBodyError::Stalled),
        SendError::Connect(m) => return GatewayError::Upstream(UpstreamFailure::Connect, m),
        SendError::Http(e) => e,
    };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        match c.downcast_ref::<BodyError>() {
            Some(BodyError::Client(fault)) => return GatewayError::ClientBody(*fault),
            // The client's HTTP/2 upload broke off (a stream reset).
            Some(BodyError::Http(_)) => {
                return GatewayError::ClientBody(ClientBodyError::Incomplete)
            }
            // Only upstream response bodies stall so.
            Some(BodyError::UpstreamStalled) | None => {}
        }
        cause = c.source();
    }
    let failure = if e.is_timeout() {
        return GatewayError::UpstreamTimeout;
    } else if broke_off(&e) {
        UpstreamFailure::Reset
    } else {
        UpstreamFailure::Other
    };
    GatewayError::Upstream(failure, source_chain(&e))
}

/// An upstream response body that failed after its head went to the client (and to the
/// access log, as a success): the client got a truncated answer. Counted with the upstream's
/// errors and logged, never with any of the body. Called by the connection writers where
/// they see the body's error, so that answered requests pay nothing for it.
pub fn upstream_body_failed(
    metrics: &crate::metrics::Metrics,
    e: &BodyError,
    request_id: Option<&http::HeaderValue>,
) {
    let kind = match e {
        BodyError::Http(e) if broke_off(e) => UpstreamFailure::Reset.label(),
        BodyError::UpstreamStalled => "timeout",
        _ => UpstreamFailure::Other.label(),
    };
    metrics.upstream_errors.with_label_values(&[kind]).inc();
    tracing::warn!(
        request_id = request_id.and_then(|v| v.to_str().ok()).unwrap_or("-"),
        kind,
        error = source_chain(e).as_str(),
        "upstream response body failed"
    );
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`: base64(SHA-1(key + the RFC's GUID)).
fn websocket_accept(key: &[u8]) -> String {
    use base64::Engine;
    use sha1::Digest;
    let mut sha = sha1::Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A `101` that completes the client's websocket handshake: `Upgrade: websocket` and the
/// `Sec-WebSocket-Accept` its key calls for (`expected`; `None`: the client sent no key, so
/// nothing the upstream says can complete it).
fn is_websocket_handshake(h: &http::HeaderMap, expected: Option<&str>) -> bool {
    let one = |name| {
        let mut all = h.get_all(name).iter();
        all.next().filter(|_| all.next().is_none())
    };
    let upgrade = one(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"));
    let accepted = one(header::SEC_WEBSOCKET_ACCEPT)
        .zip(expected)
        .is_some_and(|(v, want)| v.as_bytes().trim_ascii() == want.as_bytes());
    upgrade && accepted
}

/// The request target for the upstream, in origin form (`/path?query`).
fn upstream_uri(up: &UpstreamConfig, original: Uri) -> Result<Uri, GatewayError> {
    let pq = match original.into_parts().path_and_query {
        // The common case: the (normalised) target as it is, no copy.
        Some(pq) if up.path_prefix.is_empty() => pq,
        pq => PathAndQuery::try_from(format!(
            "{}{}",
            up.path_prefix,
            pq.as_ref().map_or("/", |pq| pq.as_str())
        ))
        .map_err(|_| GatewayError::BadRequest("invalid request target"))?,
    };
    Ok(Uri::from(pq))
}

async fn forward(
    app: &App,
    route: Option<&Route>,
    mut req: Request<Body>,
    client_upgrade: Option<ClientUpgrade>,
    start: std::time::Instant,
) -> Result<Response<Body>, GatewayError> {
    let up = app.upstream_for(route);
    let timeout = route
        .and_then(|r| r.upstream_response)
        .unwrap_or(app.cfg.timeouts.upstream_response);
    // Host is there: the hygiene layer saw to it.
    *req.uri_mut() = upstream_uri(up, std::mem::take(req.uri_mut()))?;
    *req.version_mut() = Version::HTTP_11;
    // hyper's client sends a GET's or HEAD's body of unknown length only when told to: a
    // chunked one (a search API's query) would be dropped.
    if matches!(*req.method(), Method::GET | Method::HEAD)
        && req.body().size_hint().exact().is_none()
        && !req.body().is_end_stream()
    {
        req.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    let upgrade = client_upgrade.is_some();
    // What a genuine websocket handshake answers (RFC 6455 §4.2.2); none without a key.
    let accept = client_upgrade
        .as_ref()
        .and_then(|_| req.headers().get("sec-websocket-key"))
        .map(|key| websocket_accept(key.as_bytes()));
    let deadline = tokio::time::Instant::from_std(start) + timeout;
    let connect_timeout = route.and_then(|r| r.upstream_connect);
    let sent = app.upstream.send(
        &up.scheme,
        &up.authority,
        req,
        start,
        deadline,
        connect_timeout,
        upgrade,
    );
    let mut resp = match sent.await {
        Ok(r) => r,
        Err(e) => return Err(send_failure(e)),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // The connection becomes the tunnel: it never goes back to the pool.
        resp.body_mut().detach();
        let Some(client_upgrade) = client_upgrade else {
            return Err(GatewayError::Upstream(
                UpstreamFailure::Other,
                "the upstream switched protocols unasked".into(),
            ));
        };
        // Only a real handshake opens the tunnel: a bare `101` (an app endpoint relaying a
        // status an attacker picks) would hand the client a raw upstream connection, past
        // the auth gate and the header hygiene (websocket smuggling).
        if !is_websocket_handshake(resp.headers(), accept.as_deref()) {
            return Err(GatewayError::Upstream(
                UpstreamFailure::Other,
                "the upstream's 101 is no websocket handshake".into(),
            ));
        }
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let open_tunnel = app.tunnels.hold();
        let idle = app.cfg.timeouts.tunnel_idle;
        tokio::spawn(async move {
            let _open_tunnel = open_tunnel;
            let client = client_upgrade.connection();
            match tokio::join!(client, upstream_upgrade) {
                (Ok(mut c), Ok(u)) => {
                    let mut u = TokioIo::new(u);
                    if super::tunnel::relay(&mut c, &mut u, idle).await == super::tunnel::Idle::Yes
                    {
                        tracing::debug!("websocket tunnel idle for timeouts.tunnel_idle, closed");
                    }
                }
                (Err(e), _) => {
                    tracing::debug!(error = e.to_string().as_str(), "client upgrade failed")
                }
                (_, Err(e)) => {
                    tracing::debug!(error = e.to_string().as_str(), "upstream upgrade failed")
                }
            }
        });
        let (mut parts, _) = resp.into_parts();
        sanitize_switch(&mut parts.headers, |n| app.cookies.is_ours(n));
        return Ok(Response::from_parts(parts, Body::Empty));
    }
    let (mut parts, body) = resp.into_parts();
    sanitize_response(&mut parts.headers, |n| app.cookies.is_ours(n))
        .map_err(|why| GatewayError::Upstream(UpstreamFailure::Other, why.into()))?;
    // An answer that has no body has no length either (an HTTP/2 client refuses one).
    if parts.status == StatusCode::NO_CONTENT {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    Ok(Response::from_parts(parts, Body::from(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_value_is_the_rfc_6455_one() {
        // RFC 6455 §1.3's example.
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn only_a_101_that_completes_the_handshake_opens_a_tunnel() {
        let want = websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ==");
        let head = |pairs: &[(&'static str, &'static str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, http::HeaderValue::from_static(v));
            }
            h
        };
        let good = [
            ("upgrade", "WebSocket"),
            ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        ];
        assert!(is_websocket_handshake(&head(&good), Some(&want)));
        for bad in [
            head(&[]),
            head(&good[1..]),
            head(&good[..1]),
            head(&[("upgrade", "h2c"), good[1]]),
            head(&[good[0], ("sec-websocket-accept", "AAAA")]),
            head(&[good[0], good[0], good[1]]),
            head(&[good[0], good[1], good[1]]),
        ] {
            assert!(!is_websocket_handshake(&bad, Some(&want)), "{bad:?}");
        }
        // No key from the client: no answer completes it.
        assert!(!is_websocket_handshake(&head(&good), None));
    }
}
