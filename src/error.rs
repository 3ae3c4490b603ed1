//! Errors on the request path, tagged by the side that failed. One mapping to HTTP.

use crate::body::Body;
use crate::pages;
use crate::server::h1::io::ClientBodyError;
use http::{Response, StatusCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Provider,
    Upstream,
    Internal,
}

/// How an upstream exchange failed, as `upstream_errors_total{kind}` counts it (a timeout is
/// `GatewayError::UpstreamTimeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// No connection: refused, unreachable, name not found, connect timeout, TLS handshake.
    Connect,
    /// The connection broke off: reset, or closed before a whole response.
    Reset,
    /// Anything else: an answer that is not HTTP, a protocol switch nobody asked for.
    Other,
}

impl UpstreamFailure {
    pub fn label(self) -> &'static str {
        match self {
            UpstreamFailure::Connect => "connect",
            UpstreamFailure::Reset => "reset",
            UpstreamFailure::Other => "other",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The client's request body broke off, was malformed, or stalled: not the upstream's
    /// fault, whatever the forward step saw.
    #[error("request body: {0}")]
    ClientBody(#[from] crate::server::h1::io::ClientBodyError),
    #[error("upstream failed ({kind}): {1}", kind = .0.label())]
    Upstream(UpstreamFailure, String),
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("provider unavailable: {0}")]
    ProviderUnavailable(String),
    #[error("session store unavailable: {0}")]
    StoreUnavailable(String),
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl GatewayError {
    pub fn side(&self) -> Side {
        match self {
            GatewayError::BadRequest(_) | GatewayError::ClientBody(_) => Side::Client,
            GatewayError::Upstream(..) | GatewayError::UpstreamTimeout => Side::Upstream,
            GatewayError::ProviderUnavailable(_) => Side::Provider,
            GatewayError::StoreUnavailable(_) => Side::Internal,
            GatewayError::Internal(_) => Side::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::ClientBody(ClientBodyError::Stalled) => StatusCode::REQUEST_TIMEOUT,
            GatewayError::ClientBody(_) => StatusCode::BAD_REQUEST,
            GatewayError::Upstream(..) => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::ProviderUnavailable(_) | GatewayError::StoreUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The page shown: short, no internals (details go to the log).
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let (title, msg) = match &self {
            GatewayError::BadRequest(m) => ("Bad request", *m),
            GatewayError::ClientBody(ClientBodyError::Stalled) => (
                "Request timeout",
                "The request body did not arrive in time.",
            ),
            GatewayError::ClientBody(_) => (
                "Bad request",
                "The request body is incomplete or malformed.",
            ),
            GatewayError::Upstream(..) => (
                "Bad gateway",
                "The application behind this gateway is not reachable. Please try again shortly.",
            ),
            GatewayError::UpstreamTimeout => (
                "Gateway timeout",
                "The application behind this gateway did not answer in time.",
            ),
            GatewayError::ProviderUnavailable(_) => (
                "Sign-in unavailable",
                "The identity provider cannot be reached right now. Please try again shortly.",
            ),
            GatewayError::StoreUnavailable(_) => (
                "Temporarily unavailable",
                "Sessions cannot be read right now. Please try again shortly.",
            ),
            GatewayError::Internal(_) => ("Internal error", "Something went wrong in the gateway."),
        };
        let mut resp = pages::html(status, title, msg, "");
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("5"),
            );
        }
        resp
    }
}

/// An error with its sources, on one line (hyper's errors hide the useful part in `source`).
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping_is_pinned() {
        assert_eq!(GatewayError::BadRequest("x").status(), 400);
        assert_eq!(
            GatewayError::Upstream(UpstreamFailure::Reset, "x".into()).status(),
            502
        );
        assert_eq!(
            GatewayError::ClientBody(ClientBodyError::Stalled).status(),
            408
        );
        assert_eq!(
            GatewayError::ClientBody(ClientBodyError::Invalid).side(),
            Side::Client
        );
        assert_eq!(GatewayError::UpstreamTimeout.status(), 504);
        assert_eq!(GatewayError::ProviderUnavailable("x".into()).status(), 503);
        assert_eq!(GatewayError::Internal("x").status(), 500);
        assert_eq!(GatewayError::UpstreamTimeout.side(), Side::Upstream);
    }
}
