//! `GET /oauth2/auth`: the forward-auth answer for ingress-nginx `auth_request`, Traefik
//! ForwardAuth and Envoy ext_authz. 202 with identity headers for a valid session
//! (refreshed if due, the new cookie passed back), 401 otherwise.

use crate::app::App;
use crate::body::Body;
use crate::config::{ForwardAuthConfig, HeaderConfig};
use crate::pages;
use crate::policy::cidr::trusted;
use crate::policy::routes::{host_only, AuthMode, Denied, Route};
use crate::proxy::forward::ConnInfo;
use crate::proxy::headers::put;
use crate::proxy::path::normalize;
use crate::session::{CookieJar, Session};
use http::header::{HeaderMap, HeaderValue, SET_COOKIE};
use http::{Request, Response, StatusCode};

fn identity_headers(h: &mut HeaderMap, s: &Session, cfg: &ForwardAuthConfig, app: &HeaderConfig) {
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
    if cfg.pass_access_token {
        if let Ok(mut v) = HeaderValue::from_str(&s.access_token) {
            v.set_sensitive(true);
            h.insert(cfg.access_token.clone(), v);
        }
    }
}

/// The header naming where to send the browser to log in, back to the original request:
/// a proxy cannot percent-encode `rd` itself (nginx has no escaping function).
const LOGIN_HEADER: &str = "x-auth-request-login";

/// The 401, with the login URL that returns to the original request in a header too.
fn unauthorized(
    app: &App,
    jar: &CookieJar<'_>,
    clear: bool,
    original: Option<&str>,
) -> Response<Body> {
    let login_url = match original {
        Some(target) => format!(
            "/oauth2/start?rd={}",
            url::form_urlencoded::byte_serialize(target.as_bytes()).collect::<String>()
        ),
        None => "/oauth2/start".to_string(),
    };
    let mut resp = super::unauthorized(app, jar, clear, &login_url);
    if let Ok(v) = HeaderValue::from_str(&login_url) {
        resp.headers_mut().insert(LOGIN_HEADER, v);
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

/// The route of a request whose method the proxy did not say (nginx's `auth_request` asks
/// with GET and names the method only when configured to): known when the first route that
/// fits the path applies to every method, ambiguous when it names methods, since the
/// request may be one it does not cover.
fn route_whatever_the_method<'a>(
    app: &'a App,
    host: Option<&str>,
    path: &str,
) -> Result<Option<&'a Route>, Ambiguous> {
    match app.cfg.routes.iter().find(|r| r.covers(host, path)) {
        Some(r) if !r.methods.is_empty() => Err(Ambiguous("x-forwarded-method")),
        found => Ok(found),
    }
}

/// The original request, as far as a trusted proxy named it.
#[derive(Default)]
struct Original<'a> {
    route: Option<&'a Route>,
    /// Its path and query, to come back to after a login.
    target: Option<String>,
}

/// The route the original request would take — known only when a trusted proxy says which
/// request it was (`X-Original-URL` from ingress-nginx, `X-Forwarded-Uri` from Traefik, the
/// path after `/oauth2/auth` from Envoy); a client anywhere else cannot choose it. Without
/// one, `Original::default()`: no route, no target.
fn original<'a>(app: &'a App, req: &Request<Body>) -> Result<Original<'a>, Ambiguous> {
    let Some(peer) = req.extensions().get::<ConnInfo>() else {
        return Ok(Original::default());
    };
    if !trusted(&app.cfg.trusted_proxies, peer.remote.ip()) {
        return Ok(Original::default());
    }
    let h = req.headers();
    let forwarded_host = at_most_once(h, "x-forwarded-host")?.map(host_only);
    let (method, host, path, target) = if let Some(rest) = req
        .uri()
        .path()
        .strip_prefix("/oauth2/auth")
        .filter(|rest| rest.starts_with('/'))
    {
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
        (req.method(), host, rest, target)
    } else {
        // ingress-nginx sets X-Original-URL, Traefik X-Forwarded-Uri, and each passes the
        // other on from the client: both present, they must name the same request.
        let parse = |v: &str| {
            v.parse::<http::Uri>()
                .map_err(|_| Ambiguous("x-original-url"))
        };
        let url = at_most_once(h, "x-original-url")?.map(parse).transpose()?;
        let fwd = at_most_once(h, "x-forwarded-uri")?.map(parse).transpose()?;
        let uri = match (url, fwd) {
            (Some(url), Some(fwd)) if url.path_and_query() != fwd.path_and_query() => {
                return Err(Ambiguous("x-forwarded-uri"))
            }
            (Some(uri), _) | (None, Some(uri)) => uri,
            (None, None) => return Ok(Original::default()),
        };
        let path = normalize(uri.path()).map_err(|_| Ambiguous("x-original-url"))?;
        let method = match (
            at_most_once(h, "x-forwarded-method")?,
            at_most_once(h, "x-original-method")?,
        ) {
            (Some(a), Some(b)) if a != b => return Err(Ambiguous("x-forwarded-method")),
            (Some(m), _) | (None, Some(m)) => Some(
                http::Method::from_bytes(m.as_bytes())
                    .map_err(|_| Ambiguous("x-forwarded-method"))?,
            ),
            (None, None) => None,
        };
        let host = uri
            .authority()
            .map(|a| host_only(a.as_str()))
            .or(forwarded_host);
        let route = match method {
            Some(method) => find_route(app, &method, host, &path),
            None => route_whatever_the_method(app, host, &path)?,
        };
        return Ok(Original {
            route,
            target: uri.path_and_query().map(|pq| pq.to_string()),
        });
    };
    Ok(Original {
        route: find_route(app, method, host, path),
        target: Some(target),
    })
}

pub async fn handle(app: &std::sync::Arc<App>, req: &Request<Body>) -> Response<Body> {
    let (route, target) = match original(app, req) {
        Ok(o) => (o.route, o.target),
        Err(Ambiguous(header)) => {
            tracing::debug!(header, "forward-auth: ambiguous original request refused");
            return pages::text(StatusCode::BAD_REQUEST, "ambiguous original request\n");
        }
    };
    // Envoy allows on 200 only; ingress-nginx and Traefik take any 2xx, 202 by convention.
    let allowed = if req.uri().path().starts_with(ENVOY_PREFIX) {
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
            return unauthorized(app, &jar, clear, target.as_deref())
        }
        super::Caller::Unavailable(resp) => return resp,
    };
    if let Err(Denied(why)) = app
        .cfg
        .authorization
        .check(&session.identity, route.and_then(|r| r.allow.as_ref()))
    {
        return crate::policy::forbidden(app, req, user, why);
    }
    let mut resp = pages::text(allowed, "");
    let h = resp.headers_mut();
    identity_headers(h, &session, &app.cfg.forward_auth, &app.cfg.headers);
    for v in cookie_lines {
        h.append(SET_COOKIE, v);
    }
    crate::metrics::answered_for(&mut resp, user);
    resp
}
