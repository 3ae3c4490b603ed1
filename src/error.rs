//! Errors on the request path, tagged by the side that failed. One mapping to HTTP.

use crate::body::Body;
use crate::pages;
use crate::server::h1::io::ClientBodyError;
use http::header::{HeaderMap, RETRY_AFTER};
use http::{Method, Response, StatusCode};

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

/// Marks a response as one of the gateway's own error pages (not an upstream's answer) and names
/// the error, so that a layer that still has the request can answer an API client in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorPage(pub &'static str);

impl GatewayError {
    /// A short machine-readable name (the `error` of a JSON answer).
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::ClientBody(ClientBodyError::Stalled) => "request_timeout",
            GatewayError::ClientBody(ClientBodyError::Incomplete) => "client_closed_request",
            GatewayError::ClientBody(_) => "bad_request",
            GatewayError::Upstream(..) => "upstream_unavailable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::ProviderUnavailable(_) => "provider_unavailable",
            GatewayError::StoreUnavailable(_) => "session_store_unavailable",
            GatewayError::Internal(_) => "internal_error",
        }
    }

    /// The answer to a request the gateway has in hand: like [`into_response`](Self::into_response),
    /// in JSON for an API client (anything but a browser navigation, as for the 401).
    pub fn response_for(self, method: &Method, headers: &HeaderMap) -> Response<Body> {
        let resp = self.into_response();
        if crate::policy::is_page_navigation(method, headers) {
            resp
        } else {
            error_as_json(resp)
        }
    }

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
            // The client left mid-body (a closed connection, a reset stream): counted and
            // logged as an abandoned request (nginx's 499), which nobody is left to receive.
            GatewayError::ClientBody(ClientBodyError::Incomplete) => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
            }
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
        self.page(None)
    }

    /// Like [`into_response`](Self::into_response), for a request for `return_to` (a path on
    /// this origin): the provider-unavailable page's "sign in again" comes back to it.
    pub fn into_response_returning(self, return_to: &str) -> Response<Body> {
        self.page(Some(return_to))
    }

    fn page(self, return_to: Option<&str>) -> Response<Body> {
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
            GatewayError::Upstream(UpstreamFailure::Connect, _) => (
                "Bad gateway",
                "The application behind this gateway is not reachable. Please try again shortly.",
            ),
            GatewayError::Upstream(UpstreamFailure::Reset, _) => (
                "Bad gateway",
                "The application behind this gateway broke off the connection before answering.",
            ),
            // E.g. not HTTP, or a head over 100 header fields (hyper's limit for answers).
            GatewayError::Upstream(UpstreamFailure::Other, _) => (
                "Bad gateway",
                "The application behind this gateway sent an answer that could not be read.",
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
        // A session whose refresh keeps failing is not stuck: signing in again replaces it.
        let extra = match &self {
            GatewayError::ProviderUnavailable(_) => {
                let back = crate::flow::redirect::or_root(return_to);
                let start = crate::flow::redirect::start_url(&back);
                format!(
                    "<p>If this goes on, <a href=\"{}\">sign in again</a>.</p>",
                    pages::escape(&start)
                )
            }
            _ => String::new(),
        };
        let mut resp = pages::html(status, title, msg, &extra);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(RETRY_AFTER, RETRY_SOON);
        }
        resp.extensions_mut().insert(ErrorPage(self.code()));
        resp
    }
}

/// `Retry-After` on the gateway's own 503s: the provider or Redis blinked, try again shortly.
pub const RETRY_SOON: http::HeaderValue = http::HeaderValue::from_static("5");

/// One of the gateway's own error pages (a 503, a 502 or 504 in place of the app's answer) as
/// `{"error": "<code>"}` for an API client, status and `Retry-After` kept; any other response
/// (the app's own 502 or 503 included) as it is.
pub fn error_as_json(mut resp: Response<Body>) -> Response<Body> {
    // Taken out: the JSON answer is not a page, so a second pass leaves it alone.
    let Some(ErrorPage(code)) = resp.extensions_mut().remove::<ErrorPage>() else {
        return resp;
    };
    let mut json = pages::json(resp.status(), &serde_json::json!({ "error": code }));
    if let Some(v) = resp.headers().get(RETRY_AFTER) {
        json.headers_mut().insert(RETRY_AFTER, v.clone());
    }
    // Who asked, for the access log.
    if let Some(facts) = resp
        .extensions_mut()
        .remove::<crate::metrics::ResponseFacts>()
    {
        json.extensions_mut().insert(facts);
    }
    json
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

    /// The 502 page says what happened: an upstream that answered something unreadable (say,
    /// over 100 header fields) is not "not reachable".
    #[test]
    fn bad_gateway_pages_name_the_failure() {
        let page = |f| {
            let r = GatewayError::Upstream(f, "x".into()).into_response();
            assert_eq!(r.status(), 502);
            match r.into_body() {
                Body::Full(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
                other => panic!("{other:?}"),
            }
        };
        assert!(page(UpstreamFailure::Connect).contains("not reachable"));
        assert!(page(UpstreamFailure::Reset).contains("broke off the connection"));
        assert!(page(UpstreamFailure::Other).contains("could not be read"));
    }

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
            GatewayError::ClientBody(ClientBodyError::Incomplete).status(),
            499
        );
        assert_eq!(
            GatewayError::ClientBody(ClientBodyError::Invalid).status(),
            400
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

    #[test]
    fn api_clients_get_error_pages_in_json() {
        let api = {
            let mut h = HeaderMap::new();
            h.insert(http::header::ACCEPT, "application/json".parse().unwrap());
            h
        };
        let browser = {
            let mut h = HeaderMap::new();
            h.insert(http::header::ACCEPT, "text/html".parse().unwrap());
            h
        };
        let r = GatewayError::StoreUnavailable("x".into()).response_for(&Method::GET, &api);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(r.headers()[RETRY_AFTER], "5");
        let r = GatewayError::ProviderUnavailable("x".into()).response_for(&Method::GET, &browser);
        assert_eq!(r.status(), 503);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        assert_eq!(r.headers()[RETRY_AFTER], "5");
        // A 504 or 502 in place of the app's answer likewise; the JSON is not converted again.
        let r = GatewayError::UpstreamTimeout.response_for(&Method::GET, &api);
        assert_eq!(r.status(), 504);
        assert_eq!(r.headers()["content-type"], "application/json");
        let r = error_as_json(r);
        assert_eq!(r.headers()["content-type"], "application/json");
        let r = GatewayError::Upstream(UpstreamFailure::Connect, "x".into())
            .response_for(&Method::GET, &browser);
        assert_eq!(r.status(), 502);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        // The app's own 503 stays as it is.
        let mut upstream = Response::new(Body::full("busy"));
        *upstream.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let r = error_as_json(upstream);
        assert!(r.headers().get("content-type").is_none());
    }
}
