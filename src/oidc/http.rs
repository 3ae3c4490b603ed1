//! Provider calls over the gateway's own hyper client: bounded in time and size,
//! never following redirects. Also the adapter the `oauth2` crate calls through.

use crate::body::{read_limited, Body};
use crate::proxy::client::HttpClient;
use bytes::Bytes;
use http::{Request, Response};
use std::time::Duration;

/// Provider answers larger than this are refused (discovery, JWKS, token responses).
pub const MAX_PROVIDER_BODY: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProviderHttpError {
    #[error("provider request timed out")]
    Timeout,
    #[error("provider unreachable: {0}")]
    Connect(String),
    #[error("provider response: {0}")]
    Body(String),
    #[error("invalid provider request: {0}")]
    Request(String),
    /// 5xx or 429: the provider is down or overloaded, whatever its body says.
    #[error("provider answered HTTP {0}")]
    Unavailable(u16),
}

#[derive(Clone)]
pub struct ProviderHttp {
    pub client: HttpClient,
    pub timeout: Duration,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// Which provider endpoint a call goes to (a metrics label).
#[derive(Debug, Clone, Copy)]
pub enum Endpoint {
    Discovery,
    Jwks,
    Token,
    Userinfo,
    Revocation,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::Discovery => "discovery",
            Endpoint::Jwks => "jwks",
            Endpoint::Token => "token",
            Endpoint::Userinfo => "userinfo",
            Endpoint::Revocation => "revocation",
        }
    }
}

impl ProviderHttp {
    pub async fn send(
        &self,
        req: Request<Body>,
        endpoint: Endpoint,
    ) -> Result<Response<Bytes>, ProviderHttpError> {
        let start = std::time::Instant::now();
        let r = self.send_inner(req).await;
        self.metrics
            .provider_seconds
            .with_label_values(&[endpoint.label()])
            .observe(start.elapsed().as_secs_f64());
        r
    }

    async fn send_inner(&self, req: Request<Body>) -> Result<Response<Bytes>, ProviderHttpError> {
        let client = self.client.clone();
        let work = async move {
            let resp = client
                .request(req)
                .await
                .map_err(|e| ProviderHttpError::Connect(crate::error::source_chain(&e)))?;
            let (parts, body) = resp.into_parts();
            let bytes = read_limited(body, MAX_PROVIDER_BODY, self.timeout)
                .await
                .map_err(|e| ProviderHttpError::Body(e.to_string()))?;
            Ok(Response::from_parts(parts, bytes))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| ProviderHttpError::Timeout)?
    }

    pub async fn get(
        &self,
        url: &str,
        endpoint: Endpoint,
    ) -> Result<Response<Bytes>, ProviderHttpError> {
        let req = Request::get(url)
            .header(http::header::ACCEPT, "application/json")
            .body(Body::Empty)
            .map_err(|e| ProviderHttpError::Request(e.to_string()))?;
        self.send(req, endpoint).await
    }

    /// The `oauth2` crate's HTTP client contract.
    pub async fn oauth2(
        &self,
        req: oauth2::HttpRequest,
    ) -> Result<oauth2::HttpResponse, ProviderHttpError> {
        let (parts, body) = req.into_parts();
        let req = Request::from_parts(parts, Body::full(body));
        let resp = self.send(req, Endpoint::Token).await?;
        // Told apart before the oauth2 crate reads the body: a load balancer's 503 page would
        // otherwise be an unparsable answer, as if the provider had refused.
        let status = resp.status();
        if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
            return Err(ProviderHttpError::Unavailable(status.as_u16()));
        }
        let (parts, body) = resp.into_parts();
        Ok(Response::from_parts(parts, body.to_vec()))
    }
}

impl<'c> oauth2::AsyncHttpClient<'c> for ProviderHttp {
    type Error = ProviderHttpError;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<oauth2::HttpResponse, ProviderHttpError>>
                + Send
                + 'c,
        >,
    >;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(self.oauth2(request))
    }
}
