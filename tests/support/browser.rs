//! A small HTTP client over hyper-util's legacy client: no redirects followed,
//! no connection reuse, and (for `Browser`) a cookie jar keyed by host:port with
//! RFC 6265 path matching.

use super::REQUEST_TIMEOUT;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::convert::Infallible;
use std::sync::Mutex;

pub type ReqBody = BoxBody<Bytes, Infallible>;
type HttpClient = Client<HttpConnector, ReqBody>;

fn client(h2: bool) -> HttpClient {
    let mut b = Client::builder(TokioExecutor::new());
    // A fresh connection per request: gateways get restarted on the same port.
    b.pool_max_idle_per_host(0);
    // Clearing many chunk cookies takes many Set-Cookie lines.
    b.http1_max_headers(1000);
    if h2 {
        b.http2_only(true);
    }
    b.build_http()
}

/// A full body from bytes.
pub fn full(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).boxed()
}

/// A chunked body (no Content-Length) made of `chunks`.
pub fn chunked(chunks: Vec<Bytes>) -> ReqBody {
    let frames = futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, Infallible>(hyper::body::Frame::data(c))),
    );
    http_body_util::StreamBody::new(frames).boxed()
}

/// A response, fully read.
#[derive(Clone, Debug)]
pub struct Resp {
    pub method: String,
    pub url: String,
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body's trailers (HTTP/2 only: HTTP/1.1 answers from the gateway carry none).
    pub trailers: HeaderMap,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", self.dump()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    pub fn location(&self) -> Option<&str> {
        self.header("location")
    }

    /// The Location header resolved against the request URL.
    pub fn location_abs(&self) -> Option<String> {
        let loc = self.location()?;
        Some(url::Url::parse(&self.url).ok()?.join(loc).ok()?.to_string())
    }

    pub fn set_cookies(&self) -> Vec<SetCookie> {
        self.header_all("set-cookie")
            .iter()
            .map(|l| SetCookie::parse(l))
            .collect()
    }

    /// The Set-Cookie named `name`, if any.
    pub fn set_cookie(&self, name: &str) -> Option<SetCookie> {
        self.set_cookies().into_iter().find(|c| c.name == name)
    }

    /// Everything about the response, for assertion messages.
    pub fn dump(&self) -> String {
        let mut s = format!(
            "{} {} -> {} {:?}\n",
            self.method, self.url, self.status, self.version
        );
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        let body = self.text();
        let cut: String = body.chars().take(2000).collect();
        s.push_str(&format!("\n{cut}"));
        if body.len() > cut.len() {
            s.push_str("...");
        }
        s
    }
}

/// One `Set-Cookie` line, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetCookie {
    pub name: String,
    pub value: String,
    /// Attribute names lower-cased, values as sent.
    pub attrs: Vec<(String, Option<String>)>,
    pub raw: String,
}

impl SetCookie {
    pub fn parse(line: &str) -> SetCookie {
        let mut parts = line.split(';');
        let first = parts.next().unwrap_or("");
        let (name, value) = first.split_once('=').unwrap_or((first, ""));
        let attrs = parts
            .map(|a| {
                let a = a.trim();
                match a.split_once('=') {
                    Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.trim().to_string())),
                    None => (a.to_ascii_lowercase(), None),
                }
            })
            .collect();
        SetCookie {
            name: name.trim().to_string(),
            value: value.trim().to_string(),
            attrs,
            raw: line.to_string(),
        }
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    pub fn flag(&self, name: &str) -> bool {
        self.attrs.iter().any(|(k, _)| k == name)
    }

    pub fn path(&self) -> Option<&str> {
        self.attr("path")
    }

    /// Does this line delete the cookie (Max-Age <= 0 or an Expires in the past)?
    pub fn is_removal(&self) -> bool {
        if let Some(ma) = self.attr("max-age") {
            return ma.parse::<i64>().is_ok_and(|n| n <= 0);
        }
        self.attr("expires")
            .is_some_and(|e| e.contains("1970") || e.contains("1969"))
    }
}

/// Sends one request without any cookie jar; `Err` on connection errors or timeout.
pub async fn try_send_body(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: ReqBody,
    h2: bool,
) -> Result<Resp, String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(body).map_err(|e| format!("bad request: {e}"))?;
    let c = client(h2);
    let work = async {
        let resp = c
            .request(req)
            .await
            .map_err(|e| portcullis::error::source_chain(&e))?;
        let (parts, body) = resp.into_parts();
        let collected = body
            .collect()
            .await
            .map_err(|e| format!("reading body: {e}"))?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        Ok::<_, String>(Resp {
            method: method.to_string(),
            url: url.to_string(),
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        })
    };
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .map_err(|_| format!("{method} {url}: no answer within {REQUEST_TIMEOUT:?}"))?
}

pub async fn try_send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Resp, String> {
    try_send_body(method, url, headers, full(body), false).await
}

/// Sends one request (HTTP/1.1) without any cookie jar; panics on connection errors.
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    try_send(method, url, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {url} failed: {e}"))
}

/// Sends one request over HTTP/2 with prior knowledge (h2c).
pub async fn send_h2(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Resp, String> {
    try_send_body(method, url, headers, full(body), true).await
}

#[derive(Clone, Debug)]
struct Stored {
    origin: String,
    name: String,
    value: String,
    path: String,
}

fn path_matches(cookie_path: &str, req_path: &str) -> bool {
    req_path == cookie_path
        || (req_path.starts_with(cookie_path)
            && (cookie_path.ends_with('/') || req_path[cookie_path.len()..].starts_with('/')))
}

fn default_path(req_path: &str) -> String {
    match req_path.rfind('/') {
        Some(0) | None => "/".to_string(),
        Some(i) => req_path[..i].to_string(),
    }
}

/// A scripted browser: a cookie jar per host:port, manual redirects, a history of
/// every response it got.
#[derive(Default)]
pub struct Browser {
    jar: Mutex<Vec<Stored>>,
    history: Mutex<Vec<Resp>>,
}

impl Browser {
    pub fn new() -> Browser {
        Browser::default()
    }

    /// The `Cookie` header this browser would send to `url` ("" if none).
    pub fn cookie_header(&self, url: &str) -> String {
        let u = url::Url::parse(url).expect("url");
        let origin = super::origin(url);
        let jar = self.jar.lock().unwrap();
        let mut cs: Vec<&Stored> = jar
            .iter()
            .filter(|c| c.origin == origin && path_matches(&c.path, u.path()))
            .collect();
        cs.sort_by_key(|c| std::cmp::Reverse(c.path.len()));
        cs.iter()
            .map(|c| format!("{}={}", c.name, c.value))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Names of the cookies stored for `url`'s host:port (any path).
    pub fn cookie_names(&self, url: &str) -> Vec<String> {
        let origin = super::origin(url);
        let mut v: Vec<String> = self
            .jar
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.origin == origin)
            .map(|c| c.name.clone())
            .collect();
        v.sort();
        v
    }

    /// The value of cookie `name` stored for `url`'s host:port (any path).
    pub fn cookie(&self, url: &str, name: &str) -> Option<String> {
        let origin = super::origin(url);
        self.jar
            .lock()
            .unwrap()
            .iter()
            .find(|c| c.origin == origin && c.name == name)
            .map(|c| c.value.clone())
    }

    /// Stores or replaces a cookie by hand.
    pub fn put_cookie(&self, url: &str, name: &str, value: &str, path: &str) {
        let origin = super::origin(url);
        let mut jar = self.jar.lock().unwrap();
        jar.retain(|c| !(c.origin == origin && c.name == name && c.path == path));
        jar.push(Stored {
            origin,
            name: name.to_string(),
            value: value.to_string(),
            path: path.to_string(),
        });
    }

    /// Every response received so far.
    pub fn history(&self) -> Vec<Resp> {
        self.history.lock().unwrap().clone()
    }

    fn store(&self, url: &str, resp: &Resp) {
        let u = url::Url::parse(url).expect("url");
        let origin = super::origin(url);
        let mut jar = self.jar.lock().unwrap();
        for c in resp.set_cookies() {
            let path = c
                .path()
                .filter(|p| p.starts_with('/'))
                .map(str::to_string)
                .unwrap_or_else(|| default_path(u.path()));
            jar.retain(|s| !(s.origin == origin && s.name == c.name && s.path == path));
            if !c.is_removal() {
                jar.push(Stored {
                    origin: origin.clone(),
                    name: c.name.clone(),
                    value: c.value.clone(),
                    path,
                });
            }
        }
    }

    /// One request with this browser's cookies; stores what it sets.
    pub async fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Resp {
        let cookie = self.cookie_header(url);
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if !cookie.is_empty() {
            all.push(("cookie", cookie.as_str()));
        }
        let resp = send(method, url, &all, body).await;
        self.store(url, &resp);
        self.history.lock().unwrap().push(resp.clone());
        resp
    }

    /// A top-level navigation (`Accept: text/html`).
    pub async fn get(&self, url: &str) -> Resp {
        self.request("GET", url, &[("accept", super::BROWSER_ACCEPT)], Vec::new())
            .await
    }

    /// An API call (`Accept: application/json`).
    pub async fn api_get(&self, url: &str) -> Resp {
        self.request("GET", url, &[("accept", "application/json")], Vec::new())
            .await
    }
}
