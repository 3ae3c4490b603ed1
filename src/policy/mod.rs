//! Who must log in, and how an unauthenticated request is answered.

pub mod cidr;
pub mod routes;

use routes::{AuthMode, Authorization, Denied, Rules};

use crate::body::Body;
use crate::flow;
use crate::pages;
use crate::session::{ActiveSession, CookieJar, CookieReject, Session};
use http::header::{HeaderMap, ACCEPT, SET_COOKIE};
use http::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::task::{Context, Poll};
use tower::Service;

/// What to do with a request for an app route.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Authenticated: forward it.
    Forward,
    /// A browser navigation without a session: send it to the provider.
    Login,
    /// Anything else without a session: 401, never a redirect.
    Unauthorized,
    /// Logged in, but not allowed here: 403 with the reason.
    Forbidden(Denied),
}

/// Is this a top-level browser navigation (the kind that may be redirected to a login page)?
pub fn is_browser_navigation(method: &Method, h: &HeaderMap) -> bool {
    if method != Method::GET && method != Method::HEAD {
        return false;
    }
    let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    if header("x-requested-with").is_some_and(|v| v.eq_ignore_ascii_case("xmlhttprequest")) {
        return false;
    }
    if header("sec-fetch-mode").is_some_and(|m| m != "navigate") {
        return false;
    }
    prefers_html(h)
}

/// A browser's top-level navigation that is not a GET (a form sent): it gets the 401 every
/// request that cannot be redirected gets, but as a page a person can act on rather than JSON.
/// Whether a person's browser is showing the answer (a navigation, or a form's submission):
/// the gateway's own error answers are pages for them and JSON for anything else.
pub fn is_page_navigation(method: &Method, h: &HeaderMap) -> bool {
    is_browser_navigation(method, h) || is_form_navigation(method, h)
}

pub fn is_form_navigation(method: &Method, h: &HeaderMap) -> bool {
    let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    method != Method::GET
        && method != Method::HEAD
        && header("sec-fetch-mode") == Some("navigate")
        && header("sec-fetch-dest").is_none_or(|d| d == "document")
        && prefers_html(h)
}

/// Whether a denial goes to a program rather than a person, and is answered in JSON: on an
/// `auth: api` route, for a script's request (`X-Requested-With`, a `Sec-Fetch-Mode` other
/// than `navigate`), or for one that asks for JSON rather than HTML. Anything else (curl's
/// `*/*` too) gets the page.
pub fn wants_json(mode: AuthMode, h: &HeaderMap) -> bool {
    let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    mode == AuthMode::Api
        || header("x-requested-with").is_some_and(|v| v.eq_ignore_ascii_case("xmlhttprequest"))
        || header("sec-fetch-mode").is_some_and(|m| m != "navigate")
        || (h.get_all(ACCEPT).iter().any(|v| {
            v.as_bytes()
                .windows(4)
                .any(|w| w.eq_ignore_ascii_case(b"json"))
        }) && !prefers_html(h))
}

/// 401 for a form sent without a session: not redirected to the provider (the form's body
/// would be lost, and its target fetched with a GET), but a page offering to sign in and
/// return to the page the form was on (its `Referer`, when on this origin).
fn session_needed_page(own_origin: &str, h: &HeaderMap) -> Response<Body> {
    // A form another site sent: the browser kept the session cookie from it (SameSite), so
    // the user may well be signed in; saying the session ended would mislead.
    if h.get("sec-fetch-site").is_some_and(|v| v == "cross-site") {
        return pages::html(
            StatusCode::UNAUTHORIZED,
            "Form not sent",
            "This form came from another site, which your browser does not send your session with, so it was not sent. Open the app and send it from there.",
            "<p><a href=\"/\">Open the app</a></p>",
        );
    }
    let back = h
        .get(http::header::REFERER)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix(own_origin))
        .filter(|rest| rest.starts_with('/'));
    let back = flow::redirect::or_root(back);
    pages::html(
        StatusCode::UNAUTHORIZED,
        "Sign-in needed",
        "You are not signed in (or your session has ended), so this form was not sent. Sign in, \
         then send it once more.",
        &format!(
            "<p><a href=\"{}\">Sign in</a></p>",
            pages::escape(&flow::redirect::start_url(&back))
        ),
    )
}

/// Does `Accept` prefer HTML? Yes when `text/html` or `application/xhtml+xml` is listed with a
/// q above 0 and no other listed type has a higher q. Wildcards (`*/*`, `text/*`) are fallbacks:
/// they do not compete, nor do they count as HTML. Ties go to HTML (browsers list images at
/// q=1 too); a range whose q does not parse is ignored.
pub fn prefers_html(h: &HeaderMap) -> bool {
    let mut html: Option<f32> = None;
    let mut other = 0.0f32;
    for value in h.get_all(ACCEPT).iter().filter_map(|v| v.to_str().ok()) {
        for range in value.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or_default().trim();
            if media.is_empty() || media == "*" || media.ends_with("/*") {
                continue;
            }
            let mut q = Some(1.0f32);
            for param in parts {
                if let Some((k, v)) = param.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("q") {
                        q = v.trim().parse().ok().filter(|q| (0.0..=1.0).contains(q));
                    }
                }
            }
            let Some(q) = q else { continue };
            if media.eq_ignore_ascii_case("text/html")
                || media.eq_ignore_ascii_case("application/xhtml+xml")
            {
                html = Some(html.map_or(q, |h| h.max(q)));
            } else {
                other = other.max(q);
            }
        }
    }
    html.is_some_and(|q| q > 0.0 && q >= other)
}

/// The whole policy for an app route, as a plain function.
pub fn decide(
    method: &Method,
    h: &HeaderMap,
    mode: AuthMode,
    session: Option<&Session>,
    authz: &Authorization,
    route_rules: Option<&Rules>,
) -> Decision {
    match (mode, session) {
        (AuthMode::Skip, _) => Decision::Forward,
        (_, Some(s)) => match authz.check(&s.identity, route_rules) {
            Ok(()) => Decision::Forward,
            Err(d) => Decision::Forbidden(d),
        },
        (AuthMode::Login, None) if is_browser_navigation(method, h) => Decision::Login,
        (_, None) => Decision::Unauthorized,
    }
}

/// 403 for signed-in `user`, whom a rule keeps out: logged with who and which request, and
/// named in the request's access-log line. A page saying why and offering sign-out, or the
/// same in JSON for a program (`wants_json`).
pub fn forbidden<B>(
    app: &crate::app::App,
    req: &Request<B>,
    user: std::sync::Arc<str>,
    why: &str,
    json: bool,
) -> Response<Body> {
    let request_id = req
        .headers()
        .get(&app.cfg.headers.request_id)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info!(
        reason = why,
        user = &*user,
        request_id,
        "authenticated user denied"
    );
    let mut resp = if json {
        pages::json(
            StatusCode::FORBIDDEN,
            &serde_json::json!({
                "error": "forbidden",
                "message": format!(
                    "Access denied: you are signed in, but {why}. Sign out to use another account."
                ),
                "sign_out_url": "/oauth2/sign_out",
            }),
        )
    } else {
        pages::forbidden(why)
    };
    crate::metrics::answered_for(&mut resp, user);
    resp
}

/// The result of opening the session cookie, left in the request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct Rejected(pub CookieReject);

crate::app::app_layer!(
    /// Lets authenticated requests through; answers the rest (login redirect or 401).
    AuthGateLayer => AuthGate
);

impl<S> Service<Request<Body>> for AuthGate<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    /// A denial's response is boxed, not held inline: an inline response (168 bytes) would
    /// make every request's future that large in each layer, each moving it on.
    type Future = futures_util::future::Either<S::Future, crate::session::layer::BoxFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        use futures_util::future::Either;
        let session = req
            .extensions()
            .get::<std::sync::Arc<ActiveSession>>()
            .map(|s| &s.session);
        let route = self.app.route_of(&req);
        let mode = route.map_or(AuthMode::Login, |r| r.auth);
        let rules = route.and_then(|r| r.allow.as_ref());
        match decide(
            req.method(),
            req.headers(),
            mode,
            session,
            &self.app.cfg.authorization,
            rules,
        ) {
            Decision::Forward => Either::Left(self.inner.call(req)),
            d => Either::Right(Box::pin(std::future::ready(Ok(self.deny(d, mode, &req))))),
        }
    }
}

impl<S> AuthGate<S> {
    fn deny(&self, d: Decision, mode: AuthMode, req: &Request<Body>) -> Response<Body> {
        let jar = CookieJar::parse(req.headers());
        let mut resp = match d {
            Decision::Login => {
                let return_to = req
                    .uri()
                    .path_and_query()
                    .map(|pq| pq.as_str())
                    .unwrap_or("/");
                flow::start_login(&self.app, &flow::redirect::or_root(Some(return_to)), &jar)
            }
            Decision::Forbidden(Denied(why)) => {
                match req.extensions().get::<std::sync::Arc<ActiveSession>>() {
                    Some(s) => forbidden(
                        &self.app,
                        req,
                        s.sub.clone(),
                        why,
                        wants_json(mode, req.headers()),
                    ),
                    // Never: only a session is denied.
                    None => pages::forbidden(why),
                }
            }
            _ if mode == AuthMode::Login && is_form_navigation(req.method(), req.headers()) => {
                session_needed_page(&self.app.cfg.public_origin, req.headers())
            }
            _ => pages::json(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"error": "unauthorized", "login_url": "/oauth2/start"}),
            ),
        };
        // A cookie that did not open is cleared, so the browser stops sending it.
        if req.extensions().get::<Rejected>().is_some() {
            for v in self.app.cookies.clear_session(&jar) {
                resp.headers_mut().append(SET_COOKIE, v);
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn denials_go_to_programs_in_json_and_to_people_as_a_page() {
        const BROWSER: &str = "text/html,application/xhtml+xml,*/*;q=0.8";
        for (mode, headers, json) in [
            (AuthMode::Login, vec![("accept", BROWSER)], false),
            (AuthMode::Login, vec![("accept", "*/*")], false),
            (AuthMode::Login, vec![], false),
            (AuthMode::Login, vec![("accept", "application/json")], true),
            (
                AuthMode::Login,
                vec![("accept", "application/problem+JSON")],
                true,
            ),
            (
                AuthMode::Login,
                vec![("accept", "text/html, application/json;q=0.9")],
                false,
            ),
            (
                AuthMode::Login,
                vec![("x-requested-with", "XMLHttpRequest")],
                true,
            ),
            (
                AuthMode::Login,
                vec![("accept", BROWSER), ("sec-fetch-mode", "cors")],
                true,
            ),
            (
                AuthMode::Login,
                vec![("accept", BROWSER), ("sec-fetch-mode", "navigate")],
                false,
            ),
            (AuthMode::Api, vec![("accept", BROWSER)], true),
        ] {
            assert_eq!(wants_json(mode, &h(&headers)), json, "{mode:?} {headers:?}");
        }
    }

    fn d(m: &Method, h: &HeaderMap) -> Decision {
        let authz = routes::build_authorization(&Default::default());
        decide(m, h, AuthMode::Login, None, &authz, None)
    }

    #[test]
    fn route_modes() {
        let authz = routes::build_authorization(&Default::default());
        let html = h(&[("accept", "text/html")]);
        assert_eq!(
            decide(&Method::GET, &html, AuthMode::Skip, None, &authz, None),
            Decision::Forward
        );
        assert_eq!(
            decide(&Method::GET, &html, AuthMode::Api, None, &authz, None),
            Decision::Unauthorized
        );
    }

    #[test]
    fn browser_vs_api() {
        let html = h(&[("accept", "text/html,application/xhtml+xml")]);
        assert_eq!(d(&Method::GET, &html), Decision::Login);
        assert_eq!(d(&Method::HEAD, &html), Decision::Login);
        assert_eq!(d(&Method::POST, &html), Decision::Unauthorized);
        assert_eq!(
            d(&Method::GET, &h(&[("accept", "application/json")])),
            Decision::Unauthorized
        );
        assert_eq!(d(&Method::GET, &h(&[])), Decision::Unauthorized);
        let xhr = h(&[
            ("accept", "text/html"),
            ("x-requested-with", "XMLHttpRequest"),
        ]);
        assert_eq!(d(&Method::GET, &xhr), Decision::Unauthorized);
        let fetch = h(&[("accept", "text/html"), ("sec-fetch-mode", "cors")]);
        assert_eq!(d(&Method::GET, &fetch), Decision::Unauthorized);
    }

    /// A form a browser sends (a non-GET top-level navigation) is still refused with 401,
    /// never redirected; only the page it gets differs.
    #[test]
    fn forms_browsers_send_are_told_from_api_calls() {
        let form = h(&[
            ("accept", "text/html,application/xhtml+xml"),
            ("sec-fetch-mode", "navigate"),
            ("sec-fetch-dest", "document"),
        ]);
        assert_eq!(d(&Method::POST, &form), Decision::Unauthorized);
        assert!(is_form_navigation(&Method::POST, &form));
        assert!(!is_form_navigation(&Method::GET, &form), "GET logs in");
        for api in [
            h(&[("accept", "text/html")]),
            h(&[
                ("accept", "application/json"),
                ("sec-fetch-mode", "navigate"),
            ]),
            h(&[("accept", "text/html"), ("sec-fetch-mode", "cors")]),
            h(&[
                ("accept", "text/html"),
                ("sec-fetch-mode", "navigate"),
                ("sec-fetch-dest", "iframe"),
            ]),
        ] {
            assert!(!is_form_navigation(&Method::POST, &api), "{api:?}");
        }
        let page = |referer: &'static str| {
            let mut h = form.clone();
            h.insert("referer", HeaderValue::from_static(referer));
            let r = session_needed_page("http://gw.test", &h);
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
            r
        };
        let body = |r: Response<Body>| match r.into_body() {
            Body::Full(Some(b)) => String::from_utf8(b.to_vec()).unwrap(),
            _ => panic!("not a full body"),
        };
        let text = body(page("http://gw.test/orders/new?x=1&y=2"));
        assert!(
            text.contains("href=\"/oauth2/start?rd=%2Forders%2Fnew%3Fx%3D1%26y%3D2\""),
            "{text}"
        );
        for elsewhere in [
            "http://gw.test.evil/x",
            "http://evil/x",
            "http://gw.test//evil/x",
            "http://gw.test",
        ] {
            let text = body(page(elsewhere));
            assert!(
                text.contains("href=\"/oauth2/start?rd=%2F\""),
                "{elsewhere}: {text}"
            );
        }
    }

    #[test]
    fn accept_q_values_decide_between_html_and_the_rest() {
        let nav = |accept: &'static str| d(&Method::GET, &h(&[("accept", accept)]));
        for browser in [
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
            "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,\
             image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7",
            "text/html",
            "TEXT/HTML",
            "application/xhtml+xml",
            "application/json;q=0.5, text/html",
            "text/html;q=0.5, application/json;q=0.5",
            "text/html;q=0.2, */*",
            // A bare `*` (older clients) and empty ranges are wildcards too.
            "text/html;q=0.5, *",
            "text/html;q=0.5, , ,",
            "text/html; charset=utf-8; q=0.9, application/json;q=0.8",
            "application/json;q=bogus, text/html;q=0.1",
        ] {
            assert_eq!(nav(browser), Decision::Login, "{browser}");
        }
        for api in [
            "application/json, text/html;q=0.1",
            "application/json;q=1.0, text/html;q=0.9",
            "text/html;q=0",
            "text/html;q=0.000, application/json",
            "text/html;q=2",
            "text/html;q=bogus",
            "*/*",
            "text/*",
            "*/*;q=1, text/plain",
            "text/html-fragment",
            "application/json",
        ] {
            assert_eq!(nav(api), Decision::Unauthorized, "{api}");
        }
        // Several Accept lines count as one list.
        let mut two = h(&[("accept", "text/html;q=0.3")]);
        two.append(ACCEPT, HeaderValue::from_static("application/json"));
        assert_eq!(d(&Method::GET, &two), Decision::Unauthorized);
    }
}
