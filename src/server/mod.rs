//! The listener: accept loop, per-connection hyper (h1/h2), graceful shutdown.

mod deadline;
pub mod tls;

use deadline::{Activity, HeadDeadline, Tracked};

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

/// Takes a connection already waiting in the accept queue, if any, without waiting (a plain
/// non-blocking accept: tokio's cached readiness may not know of it yet).
fn accept_now(listener: &TcpListener) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    let (socket, addr) = socket2::SockRef::from(listener).accept().ok()?;
    let addr = addr.as_socket()?;
    let stream = std::net::TcpStream::from(socket);
    stream.set_nonblocking(true).ok()?;
    tokio::net::TcpStream::from_std(stream)
        .ok()
        .map(|s| (s, addr))
}

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
        // Kept by HeadDeadline, without a timer per request.
        .header_read_timeout(None::<Duration>)
        .max_buf_size(cfg.limits.max_header_bytes.max(8192))
        .max_headers(cfg.limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.limits.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let tls = match &cfg.tls_server {
        Some((cert, key)) => match tls::ReloadingCert::new(cert, key).and_then(|certs| {
            tokio::spawn(certs.clone().watch());
            tls::server_config(certs)
        }) {
            Ok(server_config) => Some(tokio_rustls::TlsAcceptor::from(server_config)),
            Err(e) => {
                // Validated at start-up; only a file changed in between can get here.
                tracing::error!(error = %e, "cannot serve TLS");
                return;
            }
        },
        None => None,
    };
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(cfg.limits.max_connections));
    tokio::pin!(shutdown);
    // After the shutdown signal, connections already waiting in the kernel's accept queue are
    // still taken (and served with Connection: close) rather than reset by closing the socket.
    let mut closing = false;
    loop {
        let permit = if closing {
            match permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                _ = &mut shutdown => { closing = true; continue }
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            }
        };
        let accepted = if closing {
            match accept_now(&listener) {
                Some(x) => Ok(x),
                None => break,
            }
        } else {
            tokio::select! {
                _ = &mut shutdown => { closing = true; continue }
                r = listener.accept() => r,
            }
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: log, breathe, go on.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let info = ConnInfo {
            remote,
            tls: tls.is_some(),
            ip: crate::proxy::headers::ip_header(remote.ip()),
        };
        let live = live.clone();
        let activity = Arc::new(Activity::default());
        let seen_by_deadline = activity.clone();
        let hyper_svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            req.extensions_mut().insert(info.clone());
            // The current generation: a config reload applies to the very next request.
            let mut svc = live.load().stack.clone();
            let activity = activity.clone();
            activity.request_started();
            let response = svc.call(req);
            async move {
                let resp = response.await?;
                if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                    activity.upgraded();
                }
                Ok::<_, std::convert::Infallible>(resp.map(|b| Tracked::new(b, activity)))
            }
        });
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let tls = tls.clone();
        let handshake_timeout = cfg.timeouts.header_read;
        let connections = metrics.connections.clone();
        connections.inc();
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    let conn = builder.serve_connection_with_upgrades(
                        TokioIo::new(HeadDeadline::new(
                            stream,
                            handshake_timeout,
                            seen_by_deadline,
                        )),
                        hyper_svc,
                    );
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let conn = builder.serve_connection_with_upgrades(
                                TokioIo::new(HeadDeadline::new(
                                    tls_stream,
                                    handshake_timeout,
                                    seen_by_deadline,
                                )),
                                hyper_svc,
                            );
                            watcher.watch(conn.into_owned()).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection closed with error");
            }
            connections.dec();
            drop(permit);
        });
    }
    drop(listener);
    // Connections accepted just before the listener closed may not have sent their request
    // yet: give them a moment to be served (with Connection: close) before closing idle ones.
    tokio::time::sleep(cfg.timeouts.header_read.min(Duration::from_secs(1))).await;
    tracing::info!("draining connections");
    let tunnels = live.load().app.tunnels.clone();
    let drained = async {
        graceful.shutdown().await;
        // Websocket tunnels live outside hyper's connections: wait for them too.
        while tunnels.count() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        _ = drained => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(cfg.timeouts.shutdown) => tracing::warn!("shutdown timeout: closing remaining connections"),
    }
}
