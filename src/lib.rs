//! portcullis: an OpenID Connect authentication gateway in front of unmodified web apps.

pub mod admin;
pub mod app;
pub mod body;
pub mod cli;
pub mod config;
pub mod error;
pub mod flow;
pub mod live;
pub mod logging;
pub mod metrics;
pub mod oidc;
pub mod pages;
pub mod policy;
pub mod proxy;
pub mod refresh;
pub mod router;
pub mod server;
pub mod session;
pub mod singleflight;
pub mod stack;
pub mod store;

use config::Config;
use std::sync::Arc;
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(std::io::Error),
    #[error("cannot use redis: {0}")]
    Redis(store::StoreError),
    #[error("{key}: redis unreachable: {error}")]
    RedisUnreachable {
        key: &'static str,
        error: store::StoreError,
    },
    #[error("provider.issuer_url `{issuer}`: {error}")]
    Provider { issuer: String, error: String },
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Builds everything from the config and serves until SIGTERM/SIGINT. With `config_path`,
/// the configuration is reloaded on SIGHUP and when its files change.
pub async fn run(cfg: Config, config_path: Option<std::path::PathBuf>) -> Result<(), StartError> {
    let cfg = Arc::new(cfg);
    let shared = app::Shared::new(Arc::new(metrics::Metrics::new()?));
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| StartError::Bind {
            key: "listen",
            addr: cfg.listen,
            source,
        })?;
    let admin = match cfg.admin_listen {
        Some(addr) => Some(bind_admin(addr).await?),
        None => None,
    };
    let live: live::Live = Arc::new(arc_swap::ArcSwap::from_pointee(
        live::build(cfg.clone(), &shared, None).await?,
    ));
    // Where it listens, which is not the configured address when that default was taken.
    let admin_addr = admin
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map_or_else(|| "off".to_string(), |a| a.to_string());
    tracing::info!(listen = %cfg.listen, admin = %admin_addr, upstream = %format!("{}://{}", cfg.upstream.scheme, cfg.upstream.authority), "portcullis listening");
    if let Some(l) = admin {
        tokio::spawn(admin::serve(live.clone(), l));
    }
    tokio::spawn(live::watch(config_path, live.clone(), shared.clone()));
    // SIGTERM: fail readiness at once, keep accepting for shutdown_delay (so endpoints are
    // removed first), then stop accepting and drain.
    let draining = {
        let live = live.clone();
        let flag = shared.draining.clone();
        // Listened to from start-up: a signal is not lost while the first one is handled.
        let mut signals = ShutdownSignals::new();
        async move {
            signals.next().await;
            tracing::info!("shutdown signal received");
            // A second one (Ctrl-C again) does not wait for the drain.
            tokio::spawn(async move {
                signals.next().await;
                tracing::warn!("second shutdown signal: exiting without draining");
                crate::logging::flush(std::time::Duration::from_millis(500));
                std::process::exit(130);
            });
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
            let delay = live.load().app.cfg.shutdown_delay;
            tracing::info!(?delay, "not ready; closing the listener after the delay");
            tokio::time::sleep(delay).await;
        }
    };
    server::serve(live, listener, draining).await;
    Ok(())
}

/// SIGTERM and SIGINT, registered once: each delivery is kept until `next` takes it.
struct ShutdownSignals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl ShutdownSignals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(term), Ok(int)) => Some((term, int)),
                _ => None,
            };
            Self { streams }
        }
        #[cfg(not(unix))]
        Self {}
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        match &mut self.streams {
            Some((term, int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            None => std::future::pending::<()>().await,
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Binds the admin listener. Its default address (`admin.listen`'s, 127.0.0.1:9090) is also
/// Prometheus's: when that one is taken, a free port on the same address serves instead, and
/// the log says which, so that a config that does not name the admin listener still starts.
/// Any other address is the operator's: not available, the gateway does not start.
async fn bind_admin(addr: std::net::SocketAddr) -> Result<TcpListener, StartError> {
    let refused = |source| StartError::Bind {
        key: "admin.listen",
        addr,
        source,
    };
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e)
            if e.kind() == std::io::ErrorKind::AddrInUse
                && addr == config::DEFAULT_ADMIN_LISTEN =>
        {
            let l = TcpListener::bind((addr.ip(), 0)).await.map_err(refused)?;
            let instead = l.local_addr().map_err(refused)?;
            tracing::warn!(
                %instead,
                "admin.listen: its default {addr} is taken (by Prometheus?); /metrics, /healthz \
                 and /readyz are served on {instead} instead: set admin.listen to choose"
            );
            Ok(l)
        }
        Err(e) => Err(refused(e)),
    }
}
