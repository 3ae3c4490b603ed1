//! `GET /oauth2/userinfo`: the session's identity as JSON — after the same freshness decision
//! as a proxied request, so a session whose refresh was refused (or that has no refresh token
//! and an expired access token) is reported as over, not as logged in.

use crate::app::App;
use crate::body::Body;
use crate::error::{unavailable_as_json, GatewayError};
use crate::pages;
use crate::refresh::{ensure_fresh, Fresh};
use crate::session::store::Loaded;
use crate::session::{now_secs, CookieJar, Session};
use http::header::SET_COOKIE;
use http::{Request, Response, StatusCode};

/// 401 JSON; `clear`: the session cookie is cleared too (it did not open, or its session ended).
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

fn identity(s: &Session) -> Response<Body> {
    let i = &s.identity;
    pages::json(
        StatusCode::OK,
        &serde_json::json!({
            "sub": i.sub,
            "email": i.email,
            "email_verified": i.email_verified,
            "name": i.name,
            "preferred_username": i.preferred_username,
            "groups": i.groups,
            "session_expires_at": s.expires_at,
        }),
    )
}

pub async fn handle(app: &std::sync::Arc<App>, req: &Request<Body>) -> Response<Body> {
    let jar = CookieJar::parse(req.headers());
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
        Err(e) => {
            tracing::warn!(error = %e, "session store unavailable");
            return unavailable_as_json(
                GatewayError::StoreUnavailable(e.to_string()).into_response(),
            );
        }
    };
    match ensure_fresh(app, session, now_secs()).await {
        Fresh::Unchanged(s) => identity(&s),
        Fresh::Refreshed(s) => {
            let mut resp = identity(&s);
            for v in app.refreshed_cookie(&s, &jar) {
                resp.headers_mut().append(SET_COOKIE, v);
            }
            resp
        }
        // A JSON endpoint: its 503 is JSON too, whoever asks.
        Fresh::Unavailable => unavailable_as_json(
            GatewayError::ProviderUnavailable(
                "refresh failed and the access token has expired".into(),
            )
            .into_response(),
        ),
        Fresh::Ended => unauthorized(app, &jar, true),
    }
}
