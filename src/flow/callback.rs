//! `GET /oauth2/callback`: check the state against its flow cookie, exchange the code,
//! validate the ID token, seal the session, and send the user back.

use super::{query_param, redirect};
use crate::app::App;
use crate::body::Body;
use crate::config::SameSite;
use crate::oidc::ProviderError;
use crate::pages;
use crate::session::store::{Loaded, SaveError};
use crate::session::{crypto::random_bytes, now_secs, CookieJar, FlowState, Session};
use http::header::SET_COOKIE;
use http::{Request, Response, StatusCode};

/// The error page of a failed sign-in; `flow`, when the attempt is known: its cookie is
/// cleared, and "try again" returns to where that attempt was going.
fn fail(
    app: &App,
    reason: &str,
    status: StatusCode,
    title: &str,
    msg: &str,
    flow: Option<&FlowState>,
) -> Response<Body> {
    app.metrics.flow_failed(reason);
    let back = flow.map_or("/", |f| f.return_to.as_str());
    let mut resp = pages::html(
        status,
        title,
        msg,
        &format!(
            "<p><a href=\"{}\">Try signing in again</a></p>",
            pages::escape(&redirect::start_url(back))
        ),
    );
    if let Some(v) = flow.and_then(|f| app.cookies.clear_flow(&f.state)) {
        resp.headers_mut().append(SET_COOKIE, v);
    }
    resp
}

/// The provider's error code alone, for a callback whose state does not check out: the text is
/// anybody's (no description is echoed), but the user still learns the provider said no.
fn unverified_provider_error(app: &App, query: Option<&str>) -> Option<Response<Body>> {
    let error = query_param(query, "error")?;
    let code = if !error.is_empty()
        && error.len() <= 64
        && error.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        error
    } else {
        "unknown_error".into()
    };
    Some(provider_error(app, &code, "", None))
}

/// The page for the provider's `error` (and its description, when the state checked out).
/// RFC 6749 §4.1.2.1's stand-ins for the 500 and 503 a redirect cannot send are the provider
/// failing, not refusing: a 503 to try again, as the refresh answers.
fn provider_error(app: &App, error: &str, desc: &str, flow: Option<&FlowState>) -> Response<Body> {
    let failed = matches!(error, "server_error" | "temporarily_unavailable");
    let (status, title, said) = if failed {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "Sign-in unavailable",
            "The identity provider could not complete the sign-in right now \
                 (please try again shortly)",
        )
    } else {
        (
            StatusCode::FORBIDDEN,
            "Sign-in refused",
            "The identity provider refused the sign-in",
        )
    };
    let msg = if desc.is_empty() {
        format!("{said}: {error}.")
    } else {
        format!("{said}: {error}: {desc}")
    };
    let msg: String = msg.chars().take(500).collect();
    let mut resp = fail(app, "provider_error", status, title, &msg, flow);
    if failed {
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, crate::error::RETRY_SOON);
    }
    resp
}

/// The response parameters a callback reads; each may appear once (RFC 6749 §3.1): with two,
/// which one counts would be a guess (the `iss` checked, or another one).
const RESPONSE_PARAMS: [&str; 5] = ["state", "code", "iss", "error", "error_description"];

fn repeated_param(query: Option<&str>) -> Option<&'static str> {
    let mut seen = [false; RESPONSE_PARAMS.len()];
    for (k, _) in url::form_urlencoded::parse(query?.as_bytes()) {
        if let Some(i) = RESPONSE_PARAMS.iter().position(|p| *p == k) {
            if std::mem::replace(&mut seen[i], true) {
                return Some(RESPONSE_PARAMS[i]);
            }
        }
    }
    None
}

pub async fn handle(app: &App, req: &Request<Body>) -> Response<Body> {
    let query = req.uri().query();
    if let Some(name) = repeated_param(query) {
        tracing::info!(name, "callback with a repeated parameter");
        return fail(
            app,
            "bad_request",
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "The sign-in response repeats a parameter. Please start again.",
            None,
        );
    }
    let Some(state) = query_param(query, "state").filter(|s| !s.is_empty() && s.len() <= 512)
    else {
        if let Some(resp) = unverified_provider_error(app, query) {
            return resp;
        }
        return fail(
            app,
            "bad_request",
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "The sign-in response has no state.",
            None,
        );
    };
    let jar = CookieJar::parse(req.headers());
    let Some(flow) = app.cookies.open_flow(&jar, &state) else {
        // No flow cookie at all: the usual cause is a login started at another host name
        // than redirect_url's (the browser keeps the flow cookie for that one).
        let flow_cookies = app.cookies.flow_names(&jar).next().is_some();
        tracing::info!(
            flow_cookies,
            "callback with an unknown or expired state{}",
            if flow_cookies {
                ""
            } else {
                " (no flow cookie came with it: did the login start at another host name than redirect_url's?)"
            }
        );
        if let Some(resp) = unverified_provider_error(app, query) {
            return resp;
        }
        // The callback opened again by someone signed in (a reload, the Back button): still
        // refused, but the way on is the app, not another sign-in.
        if let Ok(Loaded::Session(_)) = app.load_session(&jar).await {
            app.metrics.flow_failed("unknown_state");
            return pages::html(
                StatusCode::BAD_REQUEST,
                "Already signed in",
                "This sign-in response was used already (a reload, or the browser's Back button), and you are signed in.",
                "<p><a href=\"/\">Continue to the app</a></p>",
            );
        }
        return fail(
            app,
            "unknown_state",
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "This sign-in attempt is unknown or has expired. Please start again.",
            None,
        );
    };
    let now = now_secs();
    if now.saturating_sub(flow.created_at) > app.cookies.flow_lifetime.as_secs() {
        return fail(
            app,
            "expired",
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "This sign-in attempt has expired. Please start again.",
            Some(&flow),
        );
    }
    if let Some(error) = query_param(query, "error") {
        let desc = query_param(query, "error_description").unwrap_or_default();
        // Quoted: anyone can send this parameter (`error=x user=admin` is one value); cut
        // short (the page shows 500 characters of it).
        tracing::info!(
            error = crate::logging::at_most(&error, 128),
            "provider returned an error to the callback"
        );
        return provider_error(app, &error, &desc, Some(&flow));
    }
    // Checked for a code (what a mix-up attack is after); an error page says no more either way.
    if !app
        .provider
        .accepts_response_issuer(query_param(query, "iss").as_deref())
    {
        tracing::warn!("callback from another issuer than the provider (RFC 9207 iss)");
        return fail(
            app,
            "wrong_issuer",
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "The sign-in response did not come from the configured identity provider.",
            Some(&flow),
        );
    }
    let Some(code) = query_param(query, "code").filter(|c| !c.is_empty() && c.len() <= 4096) else {
        return fail(
            app,
            "bad_request",
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "The sign-in response has no code.",
            Some(&flow),
        );
    };
    // One use per state, even if the flow cookie is replayed (on another replica too).
    if !app
        .used_states
        .claim(&state, now + app.cookies.flow_lifetime.as_secs())
        || !claimed_across_replicas(app, &state).await
    {
        return fail(
            app,
            "replayed_state",
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "This sign-in response was already used. Please start again.",
            Some(&flow),
        );
    }
    let tokens = match app
        .provider
        .exchange_code(&code, &flow.pkce_verifier, &flow.nonce)
        .await
    {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = e.to_string().as_str(), "code exchange failed");
            let (reason, status, msg) = match &e {
                ProviderError::InvalidGrant(_) => (
                    "invalid_grant",
                    StatusCode::BAD_REQUEST,
                    "The sign-in code is invalid, expired or was already used. Please start again.",
                ),
                e if e.is_unavailable() => (
                    "provider_unavailable",
                    StatusCode::BAD_GATEWAY,
                    "The identity provider cannot be reached right now. Please try again shortly.",
                ),
                ProviderError::IdToken(_) => (
                    "invalid_id_token",
                    StatusCode::BAD_REQUEST,
                    "The identity provider's ID token did not validate.",
                ),
                _ => (
                    "token_error",
                    StatusCode::BAD_GATEWAY,
                    "The identity provider answered the code exchange with an error.",
                ),
            };
            return fail(app, reason, status, "Sign-in failed", msg, Some(&flow));
        }
    };
    let Some(id) = tokens.id else {
        return fail(
            app,
            "no_id_token",
            StatusCode::BAD_GATEWAY,
            "Sign-in failed",
            "No ID token.",
            Some(&flow),
        );
    };
    let lifetime = app.cookies.lifetime.as_secs();
    let access_expires_at =
        crate::refresh::access_expiry(now, tokens.expires_in, &tokens.access_token);
    let mut session = Session {
        id: random_bytes::<16>(),
        created_at_ms: crate::session::now_millis(),
        expires_at: now + lifetime,
        access_token: tokens.access_token,
        access_expires_at,
        access_issued_at: now,
        refresh_token: tokens.refresh_token,
        id_token: tokens.id_token,
        identity: id.identity,
        last_seen: now,
    };
    // Not fitting even so: `save_session` says TooLarge below.
    app.fit_in_cookie(&mut session, now);
    let lines = match app.save_session(&session, &jar, true).await {
        Ok(lines) => lines,
        Err(SaveError::TooLarge) => {
            tracing::warn!(
                sub = &*session.identity.sub,
                "login refused: the session does not fit in limits.max_cookie_chunks \
                 (session.store: redis keeps large sessions)"
            );
            return fail(
                app,
                "cookie_too_large",
                StatusCode::BAD_GATEWAY,
                "Sign-in failed",
                "The provider's tokens are too large to keep in a session cookie.",
                Some(&flow),
            );
        }
        // (`Ended` is for updates only; a new session is written whatever was there.)
        Err(e @ (SaveError::Store(_) | SaveError::Ended)) => {
            tracing::warn!(
                error = e.to_string().as_str(),
                "cannot store the new session"
            );
            return fail(
                app,
                "store_unavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                "Sign-in failed",
                "Sessions cannot be stored right now. Please try again shortly.",
                Some(&flow),
            );
        }
    };
    tracing::info!(sub = &*session.identity.sub, "login completed");
    app.metrics
        .login_flows
        .with_label_values(&["completed", ""])
        .inc();
    let target = redirect::or_root_with(
        Some(&flow.return_to),
        &app.cfg.public_origin,
        &app.cfg.allowed_redirect_domains,
    );
    // A SameSite=Strict cookie is not sent on a redirect chain that began on the provider's
    // site: a 302 would arrive without the session and start another login, forever. A page of
    // ours that navigates on is a same-site initiator, so the cookie goes with it.
    let mut resp = if app.cfg.cookie.same_site == SameSite::Strict {
        pages::continue_to(&target)
    } else {
        pages::redirect(&target)
    };
    let h = resp.headers_mut();
    for v in lines {
        h.append(SET_COOKIE, v);
    }
    if let Some(v) = app.cookies.clear_flow(&state) {
        h.append(SET_COOKIE, v);
    }
    // The access log names who signed in.
    crate::metrics::answered_for(
        &mut resp,
        std::sync::Arc::from(session.identity.sub.as_str()),
    );
    resp
}

/// Records `state` as used in the shared Redis, when there is one, so that a replica other
/// than the one that took the callback refuses it too, before spending its code at the
/// provider again (which may revoke what the first use issued, RFC 6749 §4.1.2). False if it
/// was used already. A Redis that cannot be asked does not hold up sign-ins: this replica's
/// own record still refuses replays here.
async fn claimed_across_replicas(app: &App, state: &str) -> bool {
    let Some(redis) = app.redis.as_deref() else {
        return true;
    };
    let key = redis.key(&[
        "state",
        &crate::session::crypto::sha256_hex(state.as_bytes()),
    ]);
    match redis.try_lock(&key, "1", app.cookies.flow_lifetime).await {
        Ok(first) => first,
        Err(e) => {
            tracing::warn!(
                error = e.to_string().as_str(),
                "cannot record the sign-in state in redis"
            );
            true
        }
    }
}
