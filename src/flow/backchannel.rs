//! `POST /oauth2/backchannel_logout` (OpenID Connect Back-Channel Logout 1.0): the provider
//! says a user or provider session logged out; every matching session ends on every replica.

use crate::app::App;
use crate::body::{read_limited, Body};
use crate::pages;
use crate::session::crypto::sha256_hex;
use http::{header, HeaderValue, Request, Response, StatusCode};

const MAX_BODY: usize = 16 * 1024;

fn answer(status: StatusCode, error: Option<&str>) -> Response<Body> {
    let mut resp = match error {
        Some(e) => pages::json(
            status,
            &serde_json::json!({"error": "invalid_request", "error_description": e}),
        ),
        None => pages::text(status, ""),
    };
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub async fn handle(app: &App, req: Request<Body>) -> Response<Body> {
    if app.redis.is_none() {
        return answer(
            StatusCode::NOT_IMPLEMENTED,
            Some(
                "back-channel logout needs session.store: redis or session.coordination.redis_url",
            ),
        );
    }
    // The spec's form post (§2.5); a charset parameter is fine, no content type at all too.
    let form_post = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| {
            v.as_bytes()
                .split(|&b| b == b';')
                .next()
                .unwrap_or_default()
                .trim_ascii()
        })
        .is_none_or(|t| t.eq_ignore_ascii_case(b"application/x-www-form-urlencoded"));
    if !form_post {
        return answer(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Some("a form post (application/x-www-form-urlencoded) is expected"),
        );
    }
    let form = match read_limited(req.into_body(), MAX_BODY, app.cfg.timeouts.idle).await {
        Ok(b) => b,
        Err(e) => return answer(e.status(), Some(e.reason())),
    };
    // One logout_token: a parameter sent twice is an ambiguous request (RFC 6749 §3.1).
    let mut tokens = url::form_urlencoded::parse(&form).filter(|(k, _)| k == "logout_token");
    let token = match (tokens.next(), tokens.next()) {
        (Some((_, v)), None) => v.into_owned(),
        (None, _) => return answer(StatusCode::BAD_REQUEST, Some("missing logout_token")),
        (Some(_), Some(_)) => {
            return answer(
                StatusCode::BAD_REQUEST,
                Some("logout_token sent more than once"),
            )
        }
    };
    let claims = match app.provider.validate_logout_token(&token).await {
        Ok(c) => c,
        Err(e) => {
            let error = e.to_string();
            // A provider's own token refused for its times: logouts fail silently while
            // logins still work (ID tokens live longer), so it is worth a warning.
            if matches!(&e, crate::oidc::ProviderError::LogoutToken(t) if t.is_timing()) {
                tracing::warn!(
                    error = error.as_str(),
                    "back-channel logout token rejected for its times: are this host's and the provider's clocks apart (beyond provider.clock_skew)?"
                );
            } else {
                tracing::info!(error = error.as_str(), "back-channel logout token rejected");
            }
            return answer(StatusCode::BAD_REQUEST, Some("invalid logout_token"));
        }
    };
    // Each logout token is accepted once (jti), across replicas, named by an unkeyed digest
    // of the jti (not a secret): replicas agree on it whatever their cookie keys. The token
    // is acted on first and recorded after: a record made before would outlive a failure to
    // act (a connection lost in between, a Redis that crashed after persisting it) and
    // refuse the provider's retry as a replay, leaving the sessions alive. Two deliveries at
    // once may both act: ending sessions twice is the same as once.
    let jti_key = app
        .redis
        .as_deref()
        .map(|r| r.key(&["jti", &sha256_hex(claims.jti.as_bytes())]));
    if let (Some(redis), Some(key)) = (app.redis.as_deref(), jti_key.as_ref()) {
        match redis.get(key).await {
            Ok(None) => {}
            Ok(Some(_)) => return answer(StatusCode::BAD_REQUEST, Some("logout_token replayed")),
            Err(e) => {
                tracing::warn!(
                    error = e.to_string().as_str(),
                    "cannot check the logout token for a replay"
                );
                return answer(StatusCode::SERVICE_UNAVAILABLE, Some("try again"));
            }
        }
    }
    // With a sid, only that provider session ends (the user's other devices stay signed in),
    // and with the user named too, that user's sessions whose ID token named no sid (they
    // cannot be told apart); without one, every session of the user (Back-Channel Logout 1.0
    // §2.4).
    match app
        .end_sessions(claims.sid.as_deref(), claims.sub.as_deref())
        .await
    {
        Ok(()) => {
            if let (Some(redis), Some(key)) = (app.redis.as_deref(), jti_key.as_ref()) {
                let recorded = redis
                    .set_ex(key, b"1", crate::oidc::logout::REPLAY_WINDOW)
                    .await;
                if let Err(e) = recorded {
                    // Done all the same: a replay would only end the same sessions again.
                    tracing::warn!(
                        error = e.to_string().as_str(),
                        "logout token acted on but not recorded"
                    );
                }
            }
            tracing::info!(
                sub = claims.sub.as_deref().unwrap_or("-"),
                "back-channel logout"
            );
            app.metrics
                .logouts
                .with_label_values(&["backchannel"])
                .inc();
            answer(StatusCode::OK, None)
        }
        Err(e) => {
            // Nothing recorded: the provider's retry goes through.
            tracing::warn!(
                error = e.to_string().as_str(),
                "back-channel logout could not be recorded"
            );
            answer(StatusCode::SERVICE_UNAVAILABLE, Some("try again"))
        }
    }
}
