//! The few pages the gateway renders itself. Everything echoed is escaped, and every
//! page carries the same security headers (also used on the callback's redirects).

use crate::body::Body;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Headers every gateway-rendered response carries.
pub fn security_headers(h: &mut HeaderMap, form_action: Option<&str>) {
    let csp = match form_action.and_then(|o| HeaderValue::from_str(&format!(
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self' {o}; frame-ancestors 'none'; base-uri 'none'"
    )).ok()) {
        Some(v) => v,
        None => HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    };
    h.insert(header::CONTENT_SECURITY_POLICY, csp);
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:36em;margin:4em auto;padding:0 1em;color:#222}\
h1{font-size:1.4em}p.detail{color:#555}button{font-size:1em;padding:.4em 1.2em}";

/// A complete HTML page. `title` and `message` are escaped here; `extra_html` is trusted markup.
pub fn html(status: StatusCode, title: &str, message: &str, extra_html: &str) -> Response<Body> {
    page(status, "", title, message, extra_html)
}

/// `html` with trusted markup added to the head.
fn page(
    status: StatusCode,
    head: &str,
    title: &str,
    message: &str,
    extra_html: &str,
) -> Response<Body> {
    let page = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">{head}\
<title>{t}</title><style>{STYLE}</style></head><body><h1>{t}</h1><p class=\"detail\">{m}</p>{extra_html}</body></html>",
        t = escape(title),
        m = escape(message),
    );
    let mut resp = Response::new(Body::full(page));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    security_headers(resp.headers_mut(), None);
    resp
}

/// 403 for a signed-in user who may not pass: says why, offers sign-out. (Logged by
/// `policy::forbidden`, which knows the user and the request.)
pub fn forbidden(why: &str) -> Response<Body> {
    html(
        StatusCode::FORBIDDEN,
        "Access denied",
        &format!("You are signed in, but {why}."),
        "<p><a href=\"/oauth2/sign_out\">Sign out</a> to use another account.</p>",
    )
}

/// A small JSON answer (API callers).
pub fn json(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Body::full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    security_headers(resp.headers_mut(), None);
    resp
}

/// A redirect the gateway issues (login, callback, sign-out).
pub fn redirect(location: &str) -> Response<Body> {
    let mut resp = Response::new(Body::Empty);
    *resp.status_mut() = StatusCode::FOUND;
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    security_headers(resp.headers_mut(), None);
    resp
}

/// A 200 page that goes on to `location` (a validated redirect target) by a meta refresh, no
/// script needed (the CSP allows none), with a link for a browser that does not follow it.
pub fn continue_to(location: &str) -> Response<Body> {
    go_on(location, "Signed in", "Taking you back to where you were.")
}

/// A 200 page that goes on to `location` as [`continue_to`] does, saying `message`: a
/// navigation this site's page starts is same-site, so a `SameSite=Strict` cookie goes with it.
pub fn go_on(location: &str, title: &str, message: &str) -> Response<Body> {
    let url = escape(location);
    page(
        StatusCode::OK,
        &format!("<meta http-equiv=\"refresh\" content=\"0;url={url}\">"),
        title,
        message,
        &format!("<p><a href=\"{url}\">Continue</a></p>"),
    )
}

pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    security_headers(resp.headers_mut(), None);
    resp
}

/// `405` for a method an endpoint does not take, with the ones it does (`Allow`).
pub fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes() {
        assert_eq!(
            super::escape("<script>\"x\"&'y'\u{0}"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;"
        );
    }
}
