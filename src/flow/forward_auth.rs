//! `GET /oauth2/auth`: the forward-auth answer for ingress-nginx `auth_request`, Traefik
//! ForwardAuth and Envoy ext_authz. 202 with identity headers for a valid session
//! (refreshed if due, the new cookie passed back), 401 otherwise.

use crate::app::App;
use crate::body::Body;
use crate::config::ForwardAuthConfig;
use crate::error::GatewayError;
use crate::pages;
use crate::policy::cidr::trusted;
use crate::policy::routes::{host_only, AuthMode, Denied, Route};
use crate::proxy::forward::ConnInfo;
use crate::proxy::headers::{put, single};
use crate::proxy::path::normalize;
use crate::refresh::{ensure_fresh, Fresh};
use crate::session::store::Loaded;
use crate::session::{now_secs, CookieJar, Session};
use http::header::{HeaderMap, HeaderValue, SET_COOKIE};
use http::{Request, Response, StatusCode};

fn identity_headers(h: &mut HeaderMap, s: &Session, cfg: &ForwardAuthConfig, user: &str) {
    put(h, &cfg.user, user);
    if let Some(e) = &s.identity.email {
        put(h, &cfg.email, e);
    }
    if !s.identity.groups.is_empty() {
        put(h, &cfg.groups, &s.identity.groups.join(","));
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

fn unauthorized(app: &App, jar: &CookieJar<'_>, clear: bool) -> Response<Body> {
    let mut resp = pages::json(
        StatusCode::UNAUTHORIZED,
        &serde_json::json!({"error": "unauthorized", "login_url": "/oauth2/start"}),
    );
    if clear {
        for v in app.cookies.clear_session(jar) {
            resp.headers_mut().append(SET_COOKIE, v);
        }
    }
    resp
}

/// The route the original request would take — known only when a trusted proxy says which
/// URI it was (`X-Original-URL` from ingress-nginx, `X-Forwarded-Uri` from Traefik); a
/// client anywhere else cannot choose it.
fn original_route<'a>(app: &'a App, req: &Request<Body>) -> Option<&'a Route> {
    let peer = req.extensions().get::<ConnInfo>()?;
    if !trusted(&app.cfg.trusted_proxies, peer.remote.ip()) {
        return None;
    }
    let h = req.headers();
    let raw = single(h, "x-original-url")
        .or_else(|| single(h, "x-forwarded-uri"))
        .and_then(|v| v.to_str().ok())?;
    let uri: http::Uri = raw.parse().ok()?;
    let path = normalize(uri.path()).ok()?;
    let method = single(h, "x-forwarded-method")
        .or_else(|| single(h, "x-original-method"))
        .and_then(|v| http::Method::from_bytes(v.as_bytes()).ok())
        .unwrap_or(http::Method::GET);
    let host = uri.authority().map(|a| host_only(a.as_str())).or_else(|| {
        single(h, "x-forwarded-host")
            .and_then(|v| v.to_str().ok())
            .map(host_only)
    });
    app.cfg
        .routes
        .iter()
        .find(|r| r.matches(&method, host, &path))
}

pub async fn handle(app: &App, req: &Request<Body>) -> Response<Body> {
    let route = original_route(app, req);
    if route.is_some_and(|r| r.auth == AuthMode::Skip) {
        return pages::text(StatusCode::ACCEPTED, "");
    }
    let jar = CookieJar::parse(req.headers());
    let now = now_secs();
    let session = match app.load_session(&jar).await {
        Ok(Loaded::Session(s)) => s,
        Ok(Loaded::None) => return unauthorized(app, &jar, false),
        Ok(Loaded::Rejected(reason)) => {
            app.metrics
                .cookies_rejected
                .with_label_values(&[reason.label()])
                .inc();
            return unauthorized(app, &jar, true);
        }
        Err(e) => return GatewayError::StoreUnavailable(e.to_string()).into_response(),
    };
    let (session, cookie_lines) = match ensure_fresh(app, session, now).await {
        Fresh::Unchanged(s) => (s, Vec::new()),
        Fresh::Refreshed(s) => {
            let lines = app.refreshed_cookie(&s, &jar);
            ((*s).clone(), lines)
        }
        Fresh::Unavailable => {
            return GatewayError::ProviderUnavailable("refresh failed".into()).into_response()
        }
        Fresh::Ended => return unauthorized(app, &jar, true),
    };
    if let Err(Denied(why)) = app
        .cfg
        .authorization
        .check(&session.identity, route.and_then(|r| r.allow.as_ref()))
    {
        return pages::forbidden(why);
    }
    let mut resp = pages::text(StatusCode::ACCEPTED, "");
    let h = resp.headers_mut();
    identity_headers(
        h,
        &session,
        &app.cfg.forward_auth,
        session.user(app.cfg.headers.user_claim),
    );
    for v in cookie_lines {
        h.append(SET_COOKIE, v);
    }
    resp
}
