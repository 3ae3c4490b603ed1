//! The admin listener: `/metrics`, `/healthz`, `/readyz` on their own port, so probes and
//! scrapes never share the application's listener or its limits.

use crate::app::App;
use crate::body::Body;
use crate::pages;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
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

/// Serves the admin endpoints until the process exits.
pub async fn serve(live: crate::live::Live, listener: TcpListener) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5));
    let builder = Arc::new(builder);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let live = live.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = handle(&live.load().app, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
