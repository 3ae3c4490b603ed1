//! `GET /oauth2/auth`: the forward-auth answer for ingress-nginx `auth_request`, Traefik
//! ForwardAuth and Envoy ext_authz. 202 with identity headers for a valid session
//! (refreshed if due, the new cookie passed back), 401 otherwise.

use crate::app::App;
use crate::body::Body;
use crate::config::ForwardAuthConfig;
use crate::error::GatewayError;
use crate::pages;
use crate::refresh::{ensure_fresh, Fresh};
use crate::session::store::Loaded;
use crate::session::{now_secs, CookieJar, Session};
use http::header::{HeaderMap, HeaderName, HeaderValue, SET_COOKIE};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

fn put(h: &mut HeaderMap, name: &HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name.clone(), v);
    }
}

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

pub async fn handle(app: &App, req: &Request<Incoming>) -> Response<Body> {
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
