//! `GET /oauth2/userinfo`: the session's identity as JSON — after the same freshness decision
//! as a proxied request, so a session whose refresh was refused (or that has no refresh token
//! and an expired access token) is reported as over, not as logged in.

use super::{caller, unauthorized, Caller};
use crate::app::App;
use crate::body::Body;
use crate::error::error_as_json;
use crate::pages;
use crate::session::{CookieJar, Session};
use http::header::SET_COOKIE;
use http::{Request, Response, StatusCode};

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
    match caller(app, &jar).await {
        Caller::Session {
            session,
            cookies,
            user,
        } => {
            let mut resp = identity(&session);
            for v in cookies {
                resp.headers_mut().append(SET_COOKIE, v);
            }
            crate::metrics::answered_for(&mut resp, user);
            resp
        }
        Caller::Anonymous { clear } => unauthorized(app, &jar, clear, "/oauth2/start"),
        // A JSON endpoint: its 503 is JSON too, whoever asks.
        Caller::Unavailable(resp) => error_as_json(resp),
    }
}
