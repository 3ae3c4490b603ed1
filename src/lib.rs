//! portcullis: an OpenID Connect authentication gateway in front of unmodified web apps.

pub mod admin;
pub mod app;
pub mod body;
pub mod cli;
pub mod config;
pub mod error;
pub mod flow;
pub mod metrics;
pub mod oidc;
pub mod pages;
pub mod policy;
pub mod proxy;
pub mod refresh;
pub mod router;
pub mod server;
pub mod session;
pub mod stack;
pub mod store;

use config::Config;
use std::sync::Arc;
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(std::io::Error),
    #[error("cannot use redis: {0}")]
    Redis(store::StoreError),
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Builds everything from the config and serves until SIGTERM/SIGINT.
pub async fn run(cfg: Config) -> Result<(), StartError> {
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(metrics::Metrics::new()?);
    let client = proxy::client::build(&proxy::client::ClientOptions {
        connect_timeout: cfg.timeouts.upstream_connect,
        idle_timeout: cfg.timeouts.idle,
        max_idle_per_host: 1024,
    })
    .map_err(StartError::Client)?;
    let provider = Arc::new(oidc::Provider::new(
        &cfg,
        oidc::http::ProviderHttp {
            client: client.clone(),
            timeout: cfg.timeouts.provider,
            metrics: metrics.clone(),
        },
    ));
    tokio::spawn(provider.clone().discover_until_ready());
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let admin = match cfg.admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?,
        ),
        None => None,
    };
    tracing::info!(listen = %cfg.listen, admin = ?cfg.admin_listen, upstream = %format!("{}://{}", cfg.upstream.scheme, cfg.upstream.authority), "portcullis listening");
    let redis = match &cfg.session.redis {
        Some(rc) => Some(Arc::new(store::Redis::new(rc).map_err(StartError::Redis)?)),
        None => {
            tracing::warn!("back-channel logout is unavailable: it needs session.store: redis or session.coordination.redis_url");
            None
        }
    };
    let app = Arc::new(app::App::new(
        cfg.clone(),
        provider,
        client,
        metrics,
        redis.clone(),
    ));
    if let Some(r) = redis {
        tokio::spawn(r.clone().watch_health());
        tokio::spawn(app.revocations.clone().sync(r, cfg.session.lifetime));
    }
    if let Some(l) = admin {
        tokio::spawn(admin::serve(app.clone(), l));
    }
    // SIGTERM: fail readiness at once, keep accepting for shutdown_delay (so endpoints are
    // removed first), then stop accepting and drain.
    let draining = {
        let app = app.clone();
        async move {
            shutdown_signal().await;
            app.draining
                .store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(delay = ?app.cfg.shutdown_delay, "not ready; closing the listener after the delay");
            tokio::time::sleep(app.cfg.shutdown_delay).await;
        }
    };
    server::serve(app, listener, draining).await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}
