//! Shared harness for the integration tests: child processes (the test OpenID
//! provider and the gateway binary), an in-process echo upstream, a small HTTP
//! client with a per-origin cookie jar, and the browser login walk.
//!
//! Every test starts its own IdP, upstream and gateway on free 127.0.0.1 ports,
//! so tests in one binary can run in parallel.

#![allow(dead_code, unused_imports)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod browser;
pub mod html;
pub mod pki;
pub mod procs;
pub mod upstream;

pub use browser::{send, send_h2, try_send, Browser, Resp, SetCookie};
pub use procs::{free_port, Gateway, GatewayOpts, Idp};
pub use upstream::{Recorded, Upstream};

use std::time::Duration;

/// Upper bound for any single HTTP exchange in the tests.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for a child process to become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

pub const CLIENT_ID: &str = "portcullis";
pub const CLIENT_SECRET: &str = "portcullis-demo-secret";
pub const BROWSER_ACCEPT: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";

/// A browser navigation (`Accept: text/html`) to `path` with a raw `Cookie` header.
pub async fn navigate(gw: &Gateway, path: &str, cookie: &str) -> Resp {
    navigate_url(&gw.url(path), cookie).await
}

/// A login walked through the provider up to its callback, which is not opened yet: the
/// callback URL and the browser's flow cookie for it (what an attacker who captured both
/// would replay).
pub async fn captured_callback(b: &Browser, gw: &Gateway, user: &str) -> (String, String) {
    let (auth, _) = auth_redirect(&b.get(&gw.url("/")).await);
    let callback = idp_walk(b, &auth, user).await;
    let flow_cookie = b.cookie_header(&callback);
    assert!(
        flow_cookie.starts_with("_portcullis_flow_"),
        "{flow_cookie}"
    );
    (callback, flow_cookie)
}

/// A browser navigation to `url` (absolute) with `cookie` as its only cookie.
pub async fn navigate_url(url: &str, cookie: &str) -> Resp {
    send(
        "GET",
        url,
        &[("accept", BROWSER_ACCEPT), ("cookie", cookie)],
        Vec::new(),
    )
    .await
}

/// A cookie secret (base64 of 32 bytes) derived from a seed, so tests can name keys.
pub fn key(seed: u8) -> String {
    use base64::Engine;
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = seed.wrapping_mul(31).wrapping_add(i as u8);
    }
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// Percent-encodes a query parameter value.
pub fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A query parameter of a URL (decoded).
pub fn query_param(url: &str, name: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    u.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// `host:port` of an absolute URL.
pub fn origin(url: &str) -> String {
    let u = url::Url::parse(url).unwrap_or_else(|e| panic!("bad url {url}: {e}"));
    format!(
        "{}:{}",
        u.host_str().unwrap_or(""),
        u.port_or_known_default().unwrap_or(0)
    )
}

/// The usual trio: a test IdP, the echo upstream, and a gateway in front of it.
pub struct Stack {
    pub gw: Gateway,
    pub upstream: Upstream,
    pub idp: Idp,
}

impl Stack {
    /// Default stack.
    pub async fn start() -> Stack {
        Self::with(&[], "").await
    }

    /// A stack with extra IdP environment and extra top-level gateway YAML.
    pub async fn with(idp_env: &[(&str, &str)], extra_yaml: &str) -> Stack {
        let gw_port = free_port();
        let idp = Idp::start_for_gateway(gw_port, idp_env).await;
        let upstream = Upstream::start();
        let gw = Gateway::start(GatewayOpts {
            extra: extra_yaml.to_string(),
            ..GatewayOpts::new(gw_port, &idp, &upstream.url())
        })
        .await;
        Stack { gw, upstream, idp }
    }

    /// A stack whose gateway has one more setting in its `cookie:` block.
    pub async fn with_cookie(setting: &str) -> Stack {
        let gw_port = free_port();
        let idp = Idp::start_for_gateway(gw_port, &[]).await;
        let upstream = Upstream::start();
        let gw = Gateway::start(GatewayOpts {
            cookie_extra: vec![setting.to_string()],
            ..GatewayOpts::new(gw_port, &idp, &upstream.url())
        })
        .await;
        Stack { gw, upstream, idp }
    }

    /// Logs `user` in through a fresh browser; returns it with the session established.
    pub async fn login(&self, user: &str) -> Browser {
        let b = Browser::new();
        let r = login(&b, &self.gw, "/", user).await;
        assert_eq!(
            r.status,
            200,
            "login did not end at the upstream: {}",
            r.dump()
        );
        b
    }
}

/// Follows the IdP's redirects and fills its login and consent forms until the IdP
/// redirects back to another origin; returns that URL (the gateway callback) unvisited.
pub async fn idp_walk(b: &Browser, auth_url: &str, user: &str) -> String {
    let idp_origin = origin(auth_url);
    let mut url = auth_url.to_string();
    let mut post: Option<String> = None;
    for _ in 0..20 {
        let r = match post.take() {
            None => b.get(&url).await,
            Some(form) => {
                b.request(
                    "POST",
                    &url,
                    &[
                        ("accept", BROWSER_ACCEPT),
                        ("content-type", "application/x-www-form-urlencoded"),
                    ],
                    form.into_bytes(),
                )
                .await
            }
        };
        if r.status.is_redirection() {
            let loc = r
                .location_abs()
                .unwrap_or_else(|| panic!("redirect without Location: {}", r.dump()));
            if origin(&loc) != idp_origin {
                return loc;
            }
            url = loc;
            continue;
        }
        if r.status == 200 {
            let form = html::first_form(&r.text())
                .unwrap_or_else(|| panic!("IdP page without a form at {url}: {}", r.dump()));
            let fields = html::fill(&form, user, "any-password");
            url = url::Url::parse(&url)
                .unwrap()
                .join(&form.action)
                .unwrap()
                .to_string();
            post = Some(
                url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(fields)
                    .finish(),
            );
            continue;
        }
        panic!("unexpected IdP answer at {url}: {}", r.dump());
    }
    panic!("IdP walk did not finish in 20 steps");
}

/// Answers the provider's logout confirmation `page` with "Yes, sign me out" (`logout=yes`).
pub async fn confirm_provider_logout(b: &Browser, page: &Resp) -> Resp {
    let form =
        html::first_form(&page.text()).unwrap_or_else(|| panic!("no logout form: {}", page.dump()));
    let mut fields: Vec<(String, String)> = form
        .inputs
        .iter()
        .filter(|i| !i.name.is_empty())
        .map(|i| (i.name.clone(), i.value.clone()))
        .collect();
    fields.push(("logout".into(), "yes".into()));
    let action = url::Url::parse(&page.url)
        .unwrap()
        .join(&form.action)
        .unwrap()
        .to_string();
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish();
    b.request(
        "POST",
        &action,
        &[
            ("accept", BROWSER_ACCEPT),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        body,
    )
    .await
}

/// The CSRF token of the browser's sign-out form.
pub async fn sign_out_csrf(b: &Browser, gw: &Gateway) -> String {
    let page = b.get(&gw.url("/oauth2/sign_out")).await;
    html::hidden_value(&page.text(), "csrf").expect("csrf")
}

/// Submits the sign-out form as the browser would.
pub async fn post_sign_out(b: &Browser, gw: &Gateway, csrf: &str) -> Resp {
    b.request(
        "POST",
        &gw.url("/oauth2/sign_out"),
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", &gw.origin()),
        ],
        format!("csrf={}", enc(csrf)),
    )
    .await
}

/// Logs `user` in, keeps a copy of the session's cookies and signs out: the copy still
/// decrypts, but names a session that is over.
pub async fn signed_out_copy(gw: &Gateway, user: &str) -> String {
    let b = Browser::new();
    let r = login(&b, gw, "/", user).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let copy = b.cookie_header(&gw.url("/"));
    let csrf = sign_out_csrf(&b, gw).await;
    let out = post_sign_out(&b, gw, &csrf).await;
    assert!(out.status.as_u16() < 400, "{}", out.dump());
    copy
}

/// The authorization URL and the flow cookie of a login the gateway started
/// (`resp` is the gateway's 302 to the provider).
pub fn auth_redirect(resp: &Resp) -> (String, SetCookie) {
    assert_eq!(
        resp.status,
        302,
        "expected a login redirect: {}",
        resp.dump()
    );
    let loc = resp.location().expect("Location").to_string();
    let flow = resp
        .set_cookies()
        .into_iter()
        .find(|c| c.name.starts_with("_portcullis_flow_") && !c.is_removal())
        .unwrap_or_else(|| panic!("no flow cookie set: {}", resp.dump()));
    (loc, flow)
}

/// The full browser login: GET `path` on the gateway (302 to the IdP), the IdP walk,
/// the callback (302 back to `path`), then `path` again. Returns the last response.
pub async fn login(b: &Browser, gw: &Gateway, path: &str, user: &str) -> Resp {
    let first = b.get(&gw.url(path)).await;
    let (auth, _) = auth_redirect(&first);
    let callback = idp_walk(b, &auth, user).await;
    assert!(
        callback.starts_with(&gw.url("/oauth2/callback?")),
        "IdP did not return to the gateway callback: {callback}"
    );
    let cb = b.get(&callback).await;
    assert_eq!(cb.status, 302, "callback failed: {}", cb.dump());
    assert_eq!(cb.location(), Some(path), "callback target: {}", cb.dump());
    b.get(&gw.url(path)).await
}

/// Logs `user` in on `gw` with a fresh browser; returns the `Cookie` header value
/// carrying the gateway's session (for raw requests).
pub async fn login_cookie(gw: &Gateway, user: &str) -> String {
    let b = Browser::new();
    let r = login(&b, gw, "/", user).await;
    assert_eq!(
        r.status,
        200,
        "login did not end at the upstream: {}",
        r.dump()
    );
    let cookie = b.cookie_header(&gw.url("/"));
    assert!(
        cookie.starts_with("_portcullis"),
        "no session cookie: {cookie:?}"
    );
    cookie
}

/// A real `redis-server` child process and a small RESP client (tests/sessions.rs).
pub mod redis;

/// Gateway processes under operational control, metrics, promtool, prometheus and nginx
/// (tests/ops.rs).
pub mod ops;

/// Hostile inputs (open redirects, path confusion) and a byte-exact HTTP/1.1 sender
/// (tests/policy.rs, tests/edges.rs).
pub mod corpus;

/// Asserts that `resp` sets no (non-deleting) session cookie.
pub fn assert_no_session_set(resp: &Resp) {
    let set: Vec<SetCookie> = resp
        .set_cookies()
        .into_iter()
        .filter(|c| {
            c.name == "_portcullis"
                || (c.name.starts_with("_portcullis_") && !c.name.starts_with("_portcullis_flow_"))
        })
        .filter(|c| !c.is_removal())
        .collect();
    assert!(set.is_empty(), "a session cookie was set: {}", resp.dump());
}
