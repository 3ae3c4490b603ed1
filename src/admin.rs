//! The admin listener: `/metrics`, `/healthz`, `/readyz` on their own port, so probes and
//! scrapes never share the application's listener or its limits.

use crate::app::App;
use crate::body::Body;
use crate::pages;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

fn handle(app: &App, req: &Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if known && !matches!(*req.method(), http::Method::GET | http::Method::HEAD) {
        return pages::method_not_allowed("GET, HEAD");
    }
    match path {
        "/metrics" => {
            let mut r = Response::new(Body::full(app.metrics.render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/healthz" => pages::text(StatusCode::OK, "ok\n"),
        "/readyz" => crate::flow::readyz(app),
        _ => pages::text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Admin connections served at once: probes and scrapes need a handful; past this, new
/// connections are closed at once rather than holding descriptors.
const MAX_ADMIN_CONNECTIONS: usize = 256;

/// Time for a request head to arrive, from the connection's start or its last answer.
const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the admin endpoints until the process exits (HTTP/1.1: what probes and Prometheus
/// speak; a connection that sends nothing is closed after `ADMIN_HEAD_TIMEOUT`).
pub async fn serve(live: crate::live::Live, listener: TcpListener) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEAD_TIMEOUT);
    let builder = Arc::new(builder);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = e.to_string().as_str(), "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let live = live.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // hyper's head timer starts with the first byte: a silent connection is ours.
            match tokio::time::timeout(ADMIN_HEAD_TIMEOUT, stream.readable()).await {
                Ok(Ok(())) => {}
                _ => return,
            }
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = handle(&live.load().app, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
