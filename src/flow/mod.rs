//! The gateway's own endpoints under `/oauth2/`, plus `/healthz` and `/readyz`.

mod backchannel;
mod callback;
pub mod forward_auth;
pub mod redirect;
mod sign_out;
mod userinfo;

use crate::app::App;
use crate::body::Body;
use crate::error::GatewayError;
use crate::metrics::{answered_for, AbandonGuard, ResponseFacts};
use crate::pages;
use crate::refresh::{ensure_fresh, Fresh};
use crate::session::store::Loaded;
use crate::session::{now_secs, CookieJar, FlowState, Session};
use http::header::{HeaderValue, SET_COOKIE};
use http::{Method, Request, Response, StatusCode};
use std::sync::Arc;

/// How many pending logins (flow cookies) one browser may have at once.
pub const MAX_FLOWS: usize = 8;

pub fn is_flow_path(path: &str) -> bool {
    path.starts_with(crate::config::FLOW_PREFIX) || path == "/healthz" || path == "/readyz"
}

/// `/oauth2/auth`, or Envoy's form of it with the original path appended.
pub fn is_forward_auth_path(path: &str) -> bool {
    path == "/oauth2/auth" || path.starts_with(forward_auth::ENVOY_PREFIX)
}

pub async fn handle(app: Arc<App>, req: Request<Body>) -> Response<Body> {
    let path = req.uri().path();
    // HEAD is answered as GET (the body is left out by the server), except at the callback:
    // a HEAD there (a link checker) must not spend the one-time code.
    let method = match req.method() {
        &Method::HEAD if path != "/oauth2/callback" => Method::GET,
        m => m.clone(),
    };
    match (path, &method) {
        ("/healthz", &Method::GET) => pages::text(StatusCode::OK, "ok\n"),
        ("/readyz", &Method::GET) => readyz(&app),
        ("/oauth2/start", &Method::GET) => {
            let rd = query_param(req.uri().query(), "rd");
            let jar = CookieJar::parse(req.headers());
            let target = redirect::or_root_with(
                rd.as_deref(),
                &app.cfg.public_origin,
                &app.cfg.allowed_redirect_domains,
            );
            start_login(&app, &target, &jar)
        }
        ("/oauth2/callback", &Method::GET) => callback::handle(&app, &req).await,
        ("/oauth2/sign_out", &Method::GET) => sign_out::page(&app, &req).await,
        ("/oauth2/sign_out", &Method::POST) => sign_out::submit(&app, req).await,
        ("/oauth2/signed_out", &Method::GET) => sign_out::signed_out(&app, &req).await,
        ("/oauth2/userinfo", &Method::GET) => userinfo::handle(&app, &req).await,
        // Any method: Envoy's ext_authz asks with the original one (a check changes nothing).
        (p, _) if is_forward_auth_path(p) => forward_auth::handle(&app, &req).await,
        ("/oauth2/backchannel_logout", &Method::POST) => backchannel::handle(&app, req).await,
        (
            "/healthz"
            | "/readyz"
            | "/oauth2/start"
            | "/oauth2/callback"
            | "/oauth2/sign_out"
            | "/oauth2/signed_out"
            | "/oauth2/userinfo"
            | "/oauth2/backchannel_logout",
            _,
        ) => pages::method_not_allowed(match path {
            "/oauth2/sign_out" => "GET, HEAD, POST",
            "/oauth2/backchannel_logout" => "POST",
            "/oauth2/callback" => "GET",
            _ => "GET, HEAD",
        }),
        _ => pages::html(
            StatusCode::NOT_FOUND,
            "Not found",
            "No such gateway endpoint.",
            "",
        ),
    }
}

pub fn readyz(app: &App) -> Response<Body> {
    match app.is_ready() {
        Ok(()) => pages::text(StatusCode::OK, "ready\n"),
        Err(why) => {
            let mut r = pages::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n");
            *r.body_mut() = Body::full(format!("not ready: {why}\n"));
            r
        }
    }
}

/// First value of a query parameter, percent-decoded.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn random_token() -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(crate::session::crypto::random_bytes::<32>())
}

/// The caller of a gateway endpoint that answers for a session (userinfo, forward-auth):
/// its session loaded and brought up to date as a proxied request's would be.
enum Caller {
    /// Signed in; `cookies`: the re-sealed session to send back, when it was refreshed;
    /// `user`: its subject, for the access log (see `answered_for`).
    Session {
        session: Arc<Session>,
        cookies: Vec<HeaderValue>,
        user: Arc<str>,
    },
    /// No session: `clear` when a cookie came that opens none any more (to be cleared).
    Anonymous { clear: bool },
    /// The store or the provider cannot say now: the 503 (naming the user, when known).
    Unavailable(Response<Body>),
}

async fn caller(app: &Arc<App>, jar: &CookieJar<'_>) -> Caller {
    let session = match app.load_session(jar).await {
        Ok(Loaded::Session(s)) => s,
        Ok(Loaded::None) => return Caller::Anonymous { clear: false },
        Ok(Loaded::Rejected(reason)) => {
            app.metrics
                .cookies_rejected
                .with_label_values(&[reason.label()])
                .inc();
            return Caller::Anonymous { clear: true };
        }
        Err(e) => {
            tracing::debug!(error = e.to_string().as_str(), "session store unavailable");
            return Caller::Unavailable(
                GatewayError::StoreUnavailable(e.to_string()).into_response(),
            );
        }
    };
    let user: Arc<str> = Arc::from(session.identity.sub.as_str());
    // A client that leaves during the wait on the provider: its 499 names the user.
    let waiting = AbandonGuard::arm(ResponseFacts {
        user: Some(user.clone()),
        ..Default::default()
    });
    let fresh = ensure_fresh(app, session, now_secs()).await;
    waiting.disarm();
    match fresh {
        Fresh::Unchanged(session) => Caller::Session {
            session: Arc::new(session),
            cookies: Vec::new(),
            user,
        },
        Fresh::Refreshed(session) => Caller::Session {
            cookies: app.refreshed_cookie(&session, jar),
            session,
            user,
        },
        Fresh::Unavailable => {
            let mut resp = GatewayError::ProviderUnavailable(
                "refresh failed and the access token has expired".into(),
            )
            .into_response();
            answered_for(&mut resp, user);
            Caller::Unavailable(resp)
        }
        Fresh::Ended => Caller::Anonymous { clear: true },
    }
}

/// 401 JSON naming where to log in; `clear`: the session cookie is cleared too.
fn unauthorized(app: &App, jar: &CookieJar<'_>, clear: bool, login_url: &str) -> Response<Body> {
    let mut resp = pages::json(
        StatusCode::UNAUTHORIZED,
        &serde_json::json!({"error": "unauthorized", "login_url": login_url}),
    );
    if clear {
        for v in app.cookies.clear_session(jar) {
            resp.headers_mut().append(SET_COOKIE, v);
        }
    }
    resp
}

/// The flow cookies to expire so that a new login leaves at most `MAX_FLOWS` pending, looked at
/// only when there are that many already: every unreadable one (it can finish no login), then
/// the oldest by the start time sealed inside them (not by cookie order, which browsers do not
/// promise). The other tabs' logins go on.
///
/// At most `4 × MAX_FLOWS` distinct names are looked at: a client that sends thousands of
/// flow-like cookies gets no quadratic work (nor thousands of `Set-Cookie` lines).
fn flows_to_evict<'a>(app: &'a App, jar: &'a CookieJar<'_>) -> Vec<&'a str> {
    let mut pending: Vec<&str> = Vec::new();
    for n in app.cookies.flow_names(jar) {
        if pending.len() == 4 * MAX_FLOWS {
            break;
        }
        if !pending.contains(&n) {
            pending.push(n);
        }
    }
    if pending.len() < MAX_FLOWS {
        return Vec::new();
    }
    let mut evict = Vec::new();
    let mut live: Vec<(u64, &str)> = Vec::new();
    for n in pending {
        match app.cookies.flow_created_at(jar, n) {
            Some(created) => live.push((created, n)),
            None => evict.push(n),
        }
    }
    // Stable: among equal start times (one second), the cookie order decides.
    live.sort_by_key(|&(created, _)| created);
    let excess = (live.len() + 1).saturating_sub(MAX_FLOWS);
    evict.extend(live.into_iter().take(excess).map(|(_, n)| n));
    evict
}

/// Redirects to the provider with a fresh state, nonce and PKCE challenge; the flow
/// cookie (named after the state) remembers them and where to return.
pub fn start_login(app: &App, return_to: &str, jar: &CookieJar<'_>) -> Response<Body> {
    let state = random_token();
    let nonce = random_token();
    let (url, verifier) = match app.provider.authorization_url(&state, &nonce) {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(error = e.to_string().as_str(), "cannot start login");
            return crate::error::GatewayError::ProviderUnavailable(e.to_string()).into_response();
        }
    };
    let flow = FlowState {
        state,
        nonce,
        pkce_verifier: verifier,
        return_to: return_to.to_string(),
        created_at: now_secs(),
    };
    let mut resp = pages::redirect(&url);
    let h = resp.headers_mut();
    // Cap pending logins per browser: with this one, at most MAX_FLOWS; the oldest go.
    for n in flows_to_evict(app, jar) {
        if let Some(v) = app.cookies.expire_flow_named(n) {
            h.append(SET_COOKIE, v);
        }
    }
    if let Some(v) = app.cookies.set_flow(&flow) {
        h.append(SET_COOKIE, v);
    }
    app.metrics
        .login_flows
        .with_label_values(&["started", ""])
        .inc();
    resp
}
