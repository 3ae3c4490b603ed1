//! portcullis: an OpenID Connect authentication gateway in front of unmodified web apps.

pub mod app;
pub mod body;
pub mod cli;
pub mod config;
pub mod error;
pub mod flow;
pub mod oidc;
pub mod pages;
pub mod policy;
pub mod proxy;
pub mod refresh;
pub mod router;
pub mod server;
pub mod session;
pub mod stack;

use config::Config;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(std::io::Error),
}

/// Builds everything from the config and serves until SIGTERM/SIGINT.
pub async fn run(cfg: Config) -> Result<(), StartError> {
    let cfg = Arc::new(cfg);
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
        },
    ));
    tokio::spawn(provider.clone().discover_until_ready());
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: cfg.listen,
            source,
        })?;
    tracing::info!(listen = %cfg.listen, upstream = %format!("{}://{}", cfg.upstream.scheme, cfg.upstream.authority), "portcullis listening");
    let app = Arc::new(app::App::new(cfg, provider, client));
    server::serve(app, listener, shutdown_signal()).await;
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
