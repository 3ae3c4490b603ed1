//! Sign-out: a GET shows a confirmation form (so a third-party page cannot log users out);
//! the POST, with a CSRF token bound to the session, clears it and ends the provider session.

use crate::app::App;
use crate::body::{read_limited, Body};
use crate::config::SameSite;
use crate::pages;
use crate::session::store::Loaded;
use crate::session::{CookieJar, Session};
use http::header::{HeaderValue, ORIGIN, SET_COOKIE};
use http::{Request, Response, StatusCode};
use std::sync::Arc;

const MAX_FORM: usize = 4096;

fn csrf_token(app: &App, s: &Session) -> String {
    app.cookies.keys.mac(b"sign_out", &s.id)
}

/// The session signed out of; `Err` when the store cannot say (then nothing is pretended:
/// a sign-out that could not end the stored session is no sign-out).
async fn current(app: &App, jar: &CookieJar<'_>) -> Result<Option<Session>, Response<Body>> {
    match app.load_session(jar).await {
        Ok(Loaded::Session(s)) => Ok(Some(s)),
        Ok(_) => Ok(None),
        Err(e) => Err(crate::error::GatewayError::StoreUnavailable(e.to_string()).into_response()),
    }
}

/// `resp`, naming the signed-in user (if any) for the access log.
fn for_session(mut resp: Response<Body>, s: Option<&Session>) -> Response<Body> {
    if let Some(s) = s {
        crate::metrics::answered_for(&mut resp, Arc::from(s.identity.sub.as_str()));
    }
    resp
}

pub async fn page(app: &App, req: &Request<Body>) -> Response<Body> {
    let jar = CookieJar::parse(req.headers());
    let session = match current(app, &jar).await {
        Ok(s) => s,
        Err(unavailable) => return unavailable,
    };
    let (msg, csrf) = match &session {
        Some(s) => (
            format!(
                "You are signed in as {}.",
                s.identity.email.as_deref().unwrap_or(&s.identity.sub)
            ),
            csrf_token(app, s),
        ),
        None => ("You are not signed in.".to_string(), String::new()),
    };
    let form = format!(
        "<form method=\"post\" action=\"/oauth2/sign_out\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
<button type=\"submit\">Sign out</button></form>",
        pages::escape(&csrf)
    );
    let mut resp = pages::html(StatusCode::OK, "Sign out", &msg, &form);
    // The form posts here, and the answer redirects to the provider's logout page.
    if let Some(origin) = app
        .provider
        .metadata()
        .and_then(|m| m.end_session_endpoint)
        .and_then(|e| url::Url::parse(&e).ok())
        .map(|u| u.origin().ascii_serialization())
    {
        pages::security_headers(resp.headers_mut(), Some(&origin));
    }
    for_session(resp, session.as_ref())
}

pub async fn submit(app: &App, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    // A cross-site form post carries a foreign Origin: refuse it outright. `null` is what
    // this page's own form sends (its Referrer-Policy is no-referrer), and also what a
    // sandboxed frame or a no-referrer page elsewhere sends: believed only when the browser
    // says the request is same-origin (`Sec-Fetch-Site`), or says nothing of it.
    if let Some(origin) = parts.headers.get(ORIGIN) {
        let foreign = if origin == "null" {
            parts
                .headers
                .get("sec-fetch-site")
                .is_some_and(|site| site != "same-origin")
        } else {
            origin.as_bytes() != app.cfg.public_origin.as_bytes()
        };
        if foreign {
            return pages::html(
                StatusCode::FORBIDDEN,
                "Sign-out refused",
                "Cross-site sign-out request.",
                "",
            );
        }
    }
    let jar = CookieJar::parse(&parts.headers);
    let session = match current(app, &jar).await {
        Ok(s) => s,
        Err(unavailable) => return unavailable,
    };
    let resp = end_session(app, &jar, session.as_ref(), body).await;
    for_session(resp, session.as_ref())
}

/// Ends `session` (checked against the form's CSRF token) and sends the browser on.
async fn end_session(
    app: &App,
    jar: &CookieJar<'_>,
    session: Option<&Session>,
    body: Body,
) -> Response<Body> {
    if let Some(s) = session {
        let form = match read_limited(body, MAX_FORM, app.cfg.timeouts.idle).await {
            Ok(b) => b,
            Err(e) => return pages::html(e.status(), "Sign-out refused", e.reason(), ""),
        };
        let sent = url::form_urlencoded::parse(&form)
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        // Made with the first cookie key, checked with each: a form shown before a key
        // rotation, or by a replica that has not rotated yet, still signs out.
        if !app
            .cookies
            .keys
            .mac_matches(b"sign_out", &s.id, sent.as_bytes())
        {
            return pages::html(
                StatusCode::FORBIDDEN,
                "Sign-out refused",
                "The sign-out form has expired. Please use the sign-out page again.",
                "<p><a href=\"/oauth2/sign_out\">Sign out</a></p>",
            );
        }
        tracing::info!(sub = &*s.identity.sub, "signed out");
        if let Err(e) = app.delete_session(s).await {
            tracing::warn!(
                error = e.to_string().as_str(),
                "cannot delete the session from the store"
            );
            return crate::error::GatewayError::StoreUnavailable(e.to_string()).into_response();
        }
        app.metrics.logouts.with_label_values(&["user"]).inc();
        revoke_at_provider(app, s);
    }
    // Without a session too: the gateway's cookie may be gone (expired, cleared) while the
    // provider's session lives on, and would sign the user straight back in. The provider
    // then asks for confirmation itself, having no ID token to go by.
    let target = app
        .provider
        .metadata()
        .and_then(|m| m.end_session_endpoint)
        .and_then(|end| end_session_url(app, &end, session))
        .unwrap_or_else(|| app.cfg.post_logout_redirect_url.clone());
    let mut resp = pages::redirect(&target);
    for v in app.cookies.clear_session(jar) {
        resp.headers_mut().append(SET_COOKIE, v);
    }
    forget_cached_pages(&mut resp);
    resp
}

/// Revokes the signed-out session's refresh token at the provider (RFC 7009), or its access
/// token when it has none: the grant ends there too, so that a copy of the session cannot be
/// refreshed by a gateway that does not know of this sign-out (restarted, or a replica without
/// the coordination Redis). In the background, within `timeouts.provider`: the sign-out
/// neither waits for the provider nor fails with it. No token is ever logged.
fn revoke_at_provider(app: &App, s: &Session) {
    use crate::oidc::revoke::{Revoked, TokenKind};
    if !app.cfg.provider.revoke_on_sign_out {
        return;
    }
    let (token, kind) = match &s.refresh_token {
        Some(rt) => (rt.clone(), TokenKind::Refresh),
        None => (s.access_token.clone(), TokenKind::Access),
    };
    if token.is_empty() {
        return;
    }
    let provider = app.provider.clone();
    let metrics = app.metrics.clone();
    let sub = s.identity.sub.clone();
    // Shutdown waits for it: a sign-out just before a restart still ends the grant.
    let running = app.background.hold();
    tokio::spawn(async move {
        let _running = running;
        let outcome = match provider.revoke(&token, kind).await {
            Ok(Revoked::Done) => {
                tracing::debug!(%sub, token_type_hint = kind.hint(), "token revoked at the provider");
                "revoked"
            }
            Ok(Revoked::NoEndpoint) => {
                tracing::debug!("the provider has no revocation_endpoint: nothing revoked");
                return;
            }
            Err(e) => {
                tracing::warn!(
                    %sub,
                    token_type_hint = kind.hint(),
                    error = e.to_string().as_str(),
                    "cannot revoke the signed-out session's token at the provider"
                );
                if e.is_unavailable() {
                    "unavailable"
                } else {
                    "refused"
                }
            }
        };
        metrics.revocations.with_label_values(&[outcome]).inc();
    });
}

/// Where the provider sends the browser after its logout. A user who signed out at the
/// provider alone (its own logout page, another app) still has a session here, until it
/// ends or a back-channel logout ends it: the page says so rather than "signed out".
pub async fn signed_out(app: &App, req: &Request<Body>) -> Response<Body> {
    let jar = CookieJar::parse(req.headers());
    let session = current(app, &jar).await.ok().flatten();
    // The provider's redirect here is a cross-site navigation, on which a SameSite=Strict
    // session cookie is not sent: "signed out" would be said to a user still signed in. Once
    // more from a page of this site, which sends it (and says it: no loop).
    let cross_site = req
        .headers()
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site");
    if session.is_none() && cross_site && app.cfg.cookie.same_site == SameSite::Strict {
        let mut resp = pages::go_on("/oauth2/signed_out", "Signing out", "One moment.");
        forget_cached_pages(&mut resp);
        return resp;
    }
    let mut resp = match &session {
        None => pages::html(
            StatusCode::OK,
            "Signed out",
            "You have been signed out.",
            "<p><a href=\"/oauth2/start?rd=%2F\">Sign in again</a></p>",
        ),
        Some(_) => pages::html(
            StatusCode::OK,
            "Still signed in here",
            "You have signed out at the identity provider, but your session on this site is \
             still active.",
            "<p><a href=\"/oauth2/sign_out\">Sign out of this site too</a></p>",
        ),
    };
    // Again here: a browser may not act on it in a redirect.
    forget_cached_pages(&mut resp);
    for_session(resp, session.as_ref())
}

/// Asks the browser to drop what it cached of the site: the app's pages cached while signed
/// in would come back with the back button (legacy apps rarely say `no-store`).
pub fn forget_cached_pages(resp: &mut Response<Body>) {
    resp.headers_mut().insert(
        crate::proxy::headers::CLEAR_SITE_DATA,
        HeaderValue::from_static("\"cache\""),
    );
}

fn end_session_url(app: &App, endpoint: &str, s: Option<&Session>) -> Option<String> {
    let mut u = url::Url::parse(endpoint).ok()?;
    {
        let mut q = u.query_pairs_mut();
        if let Some(t) = s.and_then(|s| s.id_token.as_ref()) {
            q.append_pair("id_token_hint", t);
        }
        q.append_pair("client_id", app.provider.client_id());
        q.append_pair(
            "post_logout_redirect_uri",
            &app.cfg.post_logout_redirect_url,
        );
    }
    HeaderValue::from_str(u.as_str()).ok()?;
    Some(u.into())
}
