//! The one outbound HTTP client (hyper + rustls), used for the upstream and the provider.

use super::pool::{Pool, SendError, UpstreamBody};
use crate::body::Body;
use http::uri::{Authority, Scheme};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::time::Duration;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    pub tls: crate::config::TlsClient,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
}

/// The TLS side of every outbound connection: system roots plus `tls.ca_file`, TLS 1.2+,
/// optional client certificate.
fn tls_config(opts: &ClientOptions) -> Result<rustls::ClientConfig, std::io::Error> {
    crate::server::tls::client_config(
        opts.tls.ca_file.as_deref(),
        opts.tls
            .client_cert
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .map_err(std::io::Error::other)
}

/// The TCP side of every outbound connection (`timeouts.upstream_connect` per attempt).
fn http_connector(opts: &ClientOptions) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(opts.connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    http
}

fn connector(tls: rustls::ClientConfig, opts: &ClientOptions) -> HttpsConnector<HttpConnector> {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http_connector(opts))
}

/// Builds a client from an already-built TLS config (loading system roots is slow).
fn build_with(tls: rustls::ClientConfig, opts: &ClientOptions) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(opts.idle_timeout)
        .pool_max_idle_per_host(opts.max_idle_per_host)
        .build(connector(tls, opts))
}

/// The outbound clients of one configuration: the upstream connection pool (per worker
/// thread, see [`Pool`]) and a pooled client for the (rare) provider calls.
pub struct UpstreamClients {
    id: u64,
    pub opts: ClientOptions,
    pool: Pool,
    shared: HttpClient,
}

impl std::fmt::Debug for UpstreamClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UpstreamClients({})", self.id)
    }
}

impl UpstreamClients {
    pub fn new(opts: &ClientOptions) -> Result<Self, std::io::Error> {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let tls = tls_config(opts)?;
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Self {
            id,
            opts: opts.clone(),
            pool: Pool::new(
                id,
                http_connector(opts),
                opts.connect_timeout,
                tls.clone(),
                opts.idle_timeout,
                opts.max_idle_per_host,
            ),
            shared: build_with(tls, opts),
        })
    }

    /// A client with one pool for all threads (provider calls).
    pub fn shared(&self) -> HttpClient {
        self.shared.clone()
    }

    /// Sends `req` (origin-form URI) to the upstream `scheme://authority`. `connect_timeout`:
    /// a route's own `timeouts.upstream_connect`, for a connection opened for this request.
    #[allow(clippy::too_many_arguments)]
    pub fn send<'a>(
        &'a self,
        scheme: &'a Scheme,
        authority: &'a Authority,
        req: http::Request<Body>,
        now: std::time::Instant,
        deadline: tokio::time::Instant,
        connect_timeout: Option<Duration>,
        upgrade: bool,
    ) -> impl std::future::Future<Output = Result<http::Response<UpstreamBody>, SendError>> + Send + 'a
    {
        self.pool.send(
            scheme,
            authority,
            req,
            now,
            deadline,
            connect_timeout,
            upgrade,
        )
    }
}
