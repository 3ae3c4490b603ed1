//! The one outbound HTTP client (hyper + rustls), used for the upstream and the provider.

use crate::body::Body;
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

/// Builds a pooled client that speaks http and https (system roots plus `tls.ca_file`,
/// TLS 1.2+, h1/h2 via ALPN, optional client certificate).
pub fn build(opts: &ClientOptions) -> Result<HttpClient, std::io::Error> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(opts.connect_timeout));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));
    let tls = crate::server::tls::client_config(
        opts.tls.ca_file.as_deref(),
        opts.tls
            .client_cert
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .map_err(std::io::Error::other)?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        // HTTP/1.1 upstream: keeps websocket upgrades and legacy apps simple.
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(opts.idle_timeout)
        .pool_max_idle_per_host(opts.max_idle_per_host)
        .build(https))
}
