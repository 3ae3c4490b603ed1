//! The listener: accept loop, per-connection hyper (h1/h2), graceful shutdown.

use crate::live::Live;
use crate::proxy::forward::ConnInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::Service;

/// Serves until `shutdown` resolves, then drains connections for up to `timeouts.shutdown`.
/// Connection-level settings (limits, timeouts) come from the config at start-up.
pub async fn serve(
    live: Live,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let cfg = live.load().app.cfg.clone();
    let metrics = live.load().app.metrics.clone();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.timeouts.header_read)
        .max_buf_size(cfg.limits.max_header_bytes.max(8192))
        .max_headers(cfg.limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.limits.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(cfg.limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, remote) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: log, breathe, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let info = ConnInfo { remote, tls: false };
        let live = live.clone();
        let hyper_svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            req.extensions_mut().insert(info);
            // The current generation: a config reload applies to the very next request.
            let mut svc = live.load().stack.clone();
            svc.call(req)
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), hyper_svc)
            .into_owned();
        let conn = graceful.watch(conn);
        let connections = metrics.connections.clone();
        connections.inc();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed with error");
            }
            connections.dec();
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("draining connections");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(cfg.timeouts.shutdown) => tracing::warn!("shutdown timeout: closing remaining connections"),
    }
}
