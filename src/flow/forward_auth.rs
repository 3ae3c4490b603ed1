//! `GET /oauth2/auth`: the forward-auth answer for ingress-nginx `auth_request`, Traefik
//! ForwardAuth and Envoy ext_authz. 202 with identity headers for a valid session
//! (refreshed if due, the new cookie passed back), 401 otherwise (a browser navigation is
//! told where to log in). The original request is believed only from `trusted_proxies`.

use crate::app::App;
use crate::body::Body;
use crate::config::{ForwardAuthConfig, HeaderConfig};
use crate::pages;
use crate::policy::cidr::trusted;
use crate::policy::routes::{
    host_only, method_override, valid_forwarded_host, AuthMode, Denied, Route,
};
use crate::policy::{decide, Decision};
use crate::proxy::forward::ConnInfo;
use crate::proxy::headers::put;
use crate::proxy::path::normalize;
use crate::session::{CookieJar, Session};
use http::header::{HeaderMap, HeaderValue, SET_COOKIE};
use http::{Request, Response, StatusCode};
use std::sync::atomic::AtomicU64;

/// The answer's identity headers; the access token only when `pass_token`.
fn identity_headers(
    h: &mut HeaderMap,
    s: &Session,
    cfg: &ForwardAuthConfig,
    app: &HeaderConfig,
    pass_token: bool,
) {
    put(h, &cfg.user, s.user(app));
    if let Some(e) = s.email(app.unverified_email) {
        put(h, &cfg.email, e);
    }
    if !s.identity.groups.is_empty() {
        put(
            h,
            &cfg.groups,
            &crate::proxy::headers::groups_value(&s.identity.groups),
        );
    }
    if let Some(u) = &s.identity.preferred_username {
        put(h, &cfg.preferred_username, u);
    }
    if pass_token {
        if let Ok(mut v) = HeaderValue::from_str(&s.access_token) {
            v.set_sensitive(true);
            h.insert(cfg.access_token.clone(), v);
        }
    }
}

/// The header naming where to send the browser to log in, back to the original request:
/// a proxy cannot percent-encode `rd` itself (nginx has no escaping function).
const LOGIN_HEADER: &str = "x-auth-request-login";
/// The longest `X-Auth-Request-Login` sent (see `unauthorized`).
const MAX_LOGIN_URL: usize = 2048;

/// The answer without a session: 401. Only a browser navigation on a login route (`login`)
/// is told where to log in, in `X-Auth-Request-Login`, for a proxy that redirects on it
/// (the README's nginx snippet); anything else gets a bare 401, which the snippet passes on:
/// API callers get 401, never a redirect.
fn unauthorized(
    app: &App,
    jar: &CookieJar<'_>,
    clear: bool,
    original: &Original<'_>,
    login: bool,
) -> Response<Body> {
    // The target rides in a response header, which the proxy must hold in one buffer (nginx:
    // 4 KB for all of them, else a 500): one the login would not return to anyway (see
    // `safe_relative`), or too long once encoded, leaves `rd` out (the login returns to `/`).
    let login_url = original
        .target
        .as_deref()
        .filter(|t| super::redirect::safe_relative(t).is_some())
        .map(super::redirect::start_url)
        .filter(|url| url.len() <= MAX_LOGIN_URL)
        .unwrap_or_else(|| "/oauth2/start".to_string());
    let mut resp = super::unauthorized(app, jar, clear, &login_url);
    if login {
        if let Ok(v) = HeaderValue::from_str(&login_url) {
            resp.headers_mut().insert(LOGIN_HEADER, v);
        }
    }
    resp
}

/// Envoy ext_authz's HTTP service asks `<path_prefix><original path>` with the original
/// method, and takes only 200 as "allowed".
pub const ENVOY_PREFIX: &str = "/oauth2/auth/";

/// A trusted proxy named the original request, but not unambiguously: refused, never
/// guessed, since a guess could match a laxer route than the one the upstream will serve.
#[derive(Debug)]
struct Ambiguous(&'static str);

/// A header that must come at most once: `Err` when it came twice or is not text.
fn at_most_once<'a>(h: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, Ambiguous> {
    let mut all = h.get_all(name).iter();
    let Some(first) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(Ambiguous(name));
    }
    first.to_str().map(Some).map_err(|_| Ambiguous(name))
}

fn find_route<'a>(
    app: &'a App,
    method: &http::Method,
    host: Option<&str>,
    path: &str,
) -> Option<&'a Route> {
    app.route_for(method, host, path)
        .and_then(|i| app.cfg.routes.get(i))
}

/// A request that asks to be taken as another method (the proxy passes the client's headers on)
/// must fall under the same route either way, as for proxied requests (see `Router`).
fn held_under_override(
    app: &App,
    method: &http::Method,
    h: &HeaderMap,
    query: Option<&str>,
    host: Option<&str>,
    path: &str,
) -> Result<(), Ambiguous> {
    match method_override(h, query) {
        Ok(None) => Ok(()),
        Ok(Some(m)) if app.route_for(&m, host, path) == app.route_for(method, host, path) => Ok(()),
        _ => Err(Ambiguous("x-http-method-override")),
    }
}

/// The route of a request whose method the proxy did not say (nginx's `auth_request` asks
/// with GET and names the method only when configured to): known when the first route that
/// fits the path applies to every method, ambiguous when it names methods, since the
/// request may be one it does not cover.
fn route_whatever_the_method<'a>(
    app: &'a App,
    host: Option<&str>,
    path: &str,
) -> Result<Option<&'a Route>, Ambiguous> {
    let path = crate::proxy::path::RoutePath::new(path);
    match app.cfg.routes.iter().find(|r| r.covers(host, &path)) {
        Some(r) if !r.methods.is_empty() => Err(Ambiguous("x-forwarded-method")),
        found => Ok(found),
    }
}

/// How the original request was named, which decides how an anonymous caller is answered.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum Form {
    /// Not named: a plain "is this session valid?", judged by the global rules.
    #[default]
    Unnamed,
    /// `X-Original-URL` (nginx, ingress-nginx) or `X-Forwarded-Uri` (Traefik).
    Headers,
    /// Envoy's `/oauth2/auth/<original path>`.
    Envoy,
}

/// The original request, as far as a trusted proxy named it.
#[derive(Default)]
struct Original<'a> {
    route: Option<&'a Route>,
    /// Its path and query, to come back to after a login.
    target: Option<String>,
    /// Its method, when the proxy said it (or, for Envoy, asked with it).
    method: Option<http::Method>,
    form: Form,
}

/// A peer not in `trusted_proxies` named the original request (by this header, or the Envoy
/// path). What it says is ignored — a client does not choose the route — but if the peer is
/// the proxy itself, left out of the list, its routes' rules are skipped: the operator is
/// told, once a minute at most (a client can send these headers at will).
fn warn_untrusted(peer: Option<std::net::IpAddr>, named_by: &'static str) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    if !crate::session::once_per(&LAST, 60) {
        return;
    }
    tracing::warn!(
        peer = %peer.map_or_else(|| "unknown".to_string(), |ip| ip.to_string()),
        named_by,
        "forward-auth: original request named by a peer not in trusted_proxies, ignored (the \
         global rules decide); if that peer is the forward-auth proxy, list it in \
         trusted_proxies so that its routes' rules apply"
    );
}

/// The access token was withheld from a peer not in `trusted_proxies`: told once a minute at
/// most, for the operator whose proxy was left out of the list.
fn warn_token_withheld(peer: Option<std::net::IpAddr>) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    if !crate::session::once_per(&LAST, 60) {
        return;
    }
    tracing::warn!(
        peer = %peer.map_or_else(|| "unknown".to_string(), |ip| ip.to_string()),
        "forward-auth: access token not passed to a peer not in trusted_proxies (a browser \
         script must not read it); if that peer is the forward-auth proxy, list it in \
         trusted_proxies"
    );
}

/// The original path of Envoy's form, `/oauth2/auth/<path>`.
fn envoy_path(path: &str) -> Option<&str> {
    path.strip_prefix("/oauth2/auth")
        .filter(|rest| rest.starts_with('/'))
}

/// What in `req` names an original request, if anything does: the Envoy path or one of
/// the headers a proxy names it by.
fn names_original(req: &Request<Body>) -> Option<&'static str> {
    if envoy_path(req.uri().path()).is_some() {
        return Some("/oauth2/auth/<path>");
    }
    [
        "x-original-url",
        "x-forwarded-uri",
        "x-forwarded-method",
        "x-original-method",
    ]
    .into_iter()
    .find(|name| req.headers().contains_key(*name))
}

/// The route the original request would take — known only when a trusted proxy says which
/// request it was (`X-Original-URL` from ingress-nginx, `X-Forwarded-Uri` from Traefik, the
/// path after `/oauth2/auth` from Envoy): a client cannot choose the route. From anyone else,
/// or named by no one, `Original::default()` (the global rules decide).
fn original<'a>(
    app: &'a App,
    req: &Request<Body>,
    peer: Option<std::net::IpAddr>,
    trusted_peer: bool,
) -> Result<Original<'a>, Ambiguous> {
    if !trusted_peer {
        if let Some(named_by) = names_original(req) {
            warn_untrusted(peer, named_by);
        }
        return Ok(Original::default());
    }
    let h = req.headers();
    if let Some(rest) = envoy_path(req.uri().path()) {
        // Envoy: the router already normalised the whole path, this part with it. A proxy
        // that names the original request in headers too was pointed at `/oauth2/auth/` by
        // mistake: which path is meant is unknown.
        if h.contains_key("x-original-url") || h.contains_key("x-forwarded-uri") {
            return Err(Ambiguous("x-original-url"));
        }
        // Envoy sets Host to the original authority; an X-Forwarded-Host would be the client's.
        let host = at_most_once(h, "host")?
            .map(host_only)
            .or_else(|| req.uri().authority().map(|a| host_only(a.as_str())));
        let target = match req.uri().query() {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_string(),
        };
        held_under_override(app, req.method(), h, req.uri().query(), host, rest)?;
        return Ok(Original {
            route: find_route(app, req.method(), host, rest),
            target: Some(target),
            method: Some(req.method().clone()),
            form: Form::Envoy,
        });
    }
    // ingress-nginx sets X-Original-URL, Traefik X-Forwarded-Uri, and each passes the
    // other on from the client: both present, they must name the same request.
    let parse = |v: &str| {
        if !names_a_path(v) {
            return Err(Ambiguous("x-original-url"));
        }
        v.parse::<http::Uri>()
            .map_err(|_| Ambiguous("x-original-url"))
    };
    let url = at_most_once(h, "x-original-url")?.map(parse).transpose()?;
    let fwd = at_most_once(h, "x-forwarded-uri")?.map(parse).transpose()?;
    let (uri, form) = match (url, fwd) {
        (Some(url), Some(fwd)) if url.path_and_query() != fwd.path_and_query() => {
            return Err(Ambiguous("x-forwarded-uri"))
        }
        (Some(uri), _) | (None, Some(uri)) => (uri, Form::Headers),
        (None, None) => return Ok(Original::default()),
    };
    // The routes are matched on it.
    let forwarded_host = match at_most_once(h, "x-forwarded-host")? {
        Some(v) if !valid_forwarded_host(v.as_bytes()) => {
            return Err(Ambiguous("x-forwarded-host"))
        }
        v => v.map(host_only),
    };
    let path = normalize(uri.path()).map_err(|_| Ambiguous("x-original-url"))?;
    let method = match (
        at_most_once(h, "x-forwarded-method")?,
        at_most_once(h, "x-original-method")?,
    ) {
        (Some(a), Some(b)) if a != b => return Err(Ambiguous("x-forwarded-method")),
        // In lower case (`get`) it is one method to the routes and another to an app that
        // treats every non-`GET` as a write: refused, as the proxied path refuses it.
        (Some(m), _) | (None, Some(m)) if m.bytes().any(|b| b.is_ascii_lowercase()) => {
            return Err(Ambiguous("x-forwarded-method"))
        }
        (Some(m), _) | (None, Some(m)) => Some(
            http::Method::from_bytes(m.as_bytes()).map_err(|_| Ambiguous("x-forwarded-method"))?,
        ),
        (None, None) => None,
    };
    // The site the proxy served. The URL's authority is held to a Host's rules: nginx picks
    // its server by the Host up to the first `:`, so `app.test:abc` or `app.test:80@x` would
    // be judged as no site of the routes' while nginx serves `app.test`. Both it and an
    // X-Forwarded-Host naming a site, they must name the same one: Traefik sends its own
    // X-Forwarded-Host and passes a client's X-Original-URL on.
    let url_host = match uri.authority() {
        Some(a) if !valid_forwarded_host(a.as_str().as_bytes()) => {
            return Err(Ambiguous("x-original-url"))
        }
        a => a.map(|a| host_only(a.as_str())),
    };
    if let (Some(u), Some(f)) = (url_host, forwarded_host) {
        if !u.eq_ignore_ascii_case(f) {
            return Err(Ambiguous("x-forwarded-host"));
        }
    }
    let host = url_host.or(forwarded_host);
    let route = match &method {
        Some(method) => {
            held_under_override(app, method, h, uri.query(), host, &path)?;
            find_route(app, method, host, &path)
        }
        None => route_whatever_the_method(app, host, &path)?,
    };
    Ok(Original {
        route,
        target: uri.path_and_query().map(|pq| pq.to_string()),
        method,
        form,
    })
}

/// Whether an original URL names a path as a request line does: `/…`, or an absolute URL
/// whose authority is followed by `/`. The proxy builds it from the client's Host (nginx:
/// `$scheme://$http_host$request_uri`), and a Host ending in `?` or `#` (which nginx accepts)
/// would move the real path out of the path: `http://app?/admin/x` parses as `/`, judged as
/// that while the proxy serves `/admin/x`. No fragment either: it is not sent upstream.
fn names_a_path(v: &str) -> bool {
    let path = match v.split_once("://") {
        Some((_, rest)) => rest.find(['/', '?', '#']).map_or("", |i| &rest[i..]),
        None => v,
    };
    path.starts_with('/') && !v.contains('#')
}

pub async fn handle(app: &std::sync::Arc<App>, req: &Request<Body>) -> Response<Body> {
    let peer = req.extensions().get::<ConnInfo>().map(|c| c.remote.ip());
    let trusted_peer = peer.is_some_and(|ip| trusted(&app.cfg.trusted_proxies, ip));
    let original = match original(app, req, peer, trusted_peer) {
        Ok(o) => o,
        Err(Ambiguous(header)) => {
            tracing::debug!(header, "forward-auth: ambiguous original request refused");
            return pages::text(StatusCode::BAD_REQUEST, "ambiguous original request\n");
        }
    };
    let route = original.route;
    // Envoy allows on 200 only; ingress-nginx and Traefik take any 2xx, 202 by convention.
    let allowed = if original.form == Form::Envoy {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    if route.is_some_and(|r| r.auth == AuthMode::Skip) {
        return pages::text(allowed, "");
    }
    let jar = CookieJar::parse(req.headers());
    let (session, cookie_lines, user) = match super::caller(app, &jar).await {
        super::Caller::Session {
            session,
            cookies,
            user,
        } => (session, cookies, user),
        super::Caller::Anonymous { clear } => {
            // The proxied path's own decision: `auth: api` routes and requests that are no
            // browser navigation (XHR, JSON, a POST) are "unauthorized", not "login". The
            // proxy passes the client's headers on; the method is the original one if named.
            let method = original.method.as_ref().unwrap_or(req.method());
            let mode = route.map_or(AuthMode::Login, |r| r.auth);
            let login = decide(
                method,
                req.headers(),
                mode,
                None,
                &app.cfg.authorization,
                None,
            ) == Decision::Login;
            return unauthorized(app, &jar, clear, &original, login);
        }
        super::Caller::Unavailable(resp) => {
            // The proxy passes it on too: a page for a browser navigation, else JSON, as the
            // proxied path answers (and as the 401 above is decided).
            let method = original.method.as_ref().unwrap_or(req.method());
            return if crate::policy::is_page_navigation(method, req.headers()) {
                resp
            } else {
                crate::error::error_as_json(resp)
            };
        }
    };
    if let Err(Denied(why)) = app
        .cfg
        .authorization
        .check(&session.identity, route.and_then(|r| r.allow.as_ref()))
    {
        // Traefik passes a denial's body on to the client: JSON for a program.
        let mode = route.map_or(AuthMode::Login, |r| r.auth);
        let json = crate::policy::wants_json(mode, req.headers());
        return crate::policy::forbidden(app, req, user, why, json);
    }
    let mut resp = pages::text(allowed, "");
    let h = resp.headers_mut();
    // The bearer goes to the proxy that asks, never to a client: a script on the app's
    // origin would read it from this answer (the session cookie is HttpOnly for that reason).
    let pass_token = app.cfg.forward_auth.pass_access_token && trusted_peer;
    if app.cfg.forward_auth.pass_access_token && !trusted_peer {
        warn_token_withheld(peer);
    }
    identity_headers(
        h,
        &session,
        &app.cfg.forward_auth,
        &app.cfg.headers,
        pass_token,
    );
    for v in cookie_lines {
        h.append(SET_COOKIE, v);
    }
    crate::metrics::answered_for(&mut resp, user);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &str, header: Option<&str>) -> Request<Body> {
        let mut b = Request::builder().uri(path);
        if let Some(h) = header {
            b = b.header(h, "/x");
        }
        b.body(Body::Empty).unwrap()
    }

    /// Everything by which a proxy names the original request counts: from an untrusted
    /// peer each one is ignored (the global rules decide) and named in the warning.
    #[test]
    fn what_names_an_original_request() {
        for h in [
            "X-Original-URL",
            "X-Forwarded-Uri",
            "X-Forwarded-Method",
            "X-Original-Method",
        ] {
            assert_eq!(
                names_original(&req("/oauth2/auth", Some(h))),
                Some(h.to_ascii_lowercase().as_str()),
            );
        }
        assert!(names_original(&req("/oauth2/auth/", None)).is_some());
        assert!(names_original(&req("/oauth2/auth/admin/x?q=1", None)).is_some());
        // A plain "is this session valid?" names none.
        assert_eq!(names_original(&req("/oauth2/auth", None)), None);
        assert_eq!(names_original(&req("/oauth2/auth?x=1", None)), None);
        assert_eq!(
            names_original(&req("/oauth2/auth", Some("X-Forwarded-Host"))),
            None
        );
        assert_eq!(envoy_path("/oauth2/authx"), None);
    }

    /// The original URL's path is where a request line has it, or the URL is refused.
    #[test]
    fn an_original_url_names_its_path_after_the_authority() {
        for good in [
            "/x",
            "/",
            "/a?b=c",
            "http://app.test/x",
            "https://app.test:8443/a/b?q=/c",
            "http://app.test/?x",
        ] {
            assert!(names_a_path(good), "{good}");
        }
        for bad in [
            "http://app.test?/admin/x",
            "http://app.test:80?/admin/x",
            "http://app.test#/admin/x",
            "http://app.test",
            "http://app.test/x#frag",
            "/x#frag",
            "x",
            "",
            "*",
        ] {
            assert!(!names_a_path(bad), "{bad}");
        }
        assert_eq!(envoy_path("/oauth2/auth/a/b"), Some("/a/b"));
    }
}
