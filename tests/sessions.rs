//! Sessions over time, against the real test provider and real Redis processes:
//! transparent refresh (once per session, also across two gateway processes),
//! revoked grants, the provider or Redis going down and coming back, back-channel
//! logout across replicas, sign-out with the Redis store, and the metrics they move.
//!
//! Access tokens live 4 s at the test provider; with `session.refresh_before: 1s` a
//! token is due 3 s after it was issued. Waits are either "until a token is surely
//! due" (it was issued before a known instant) or polls with a deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::redis::{RedisServer, Reply};
use support::*;

/// Access-token lifetime at the test provider, in seconds.
const AT_TTL: u64 = 4;
const AT_TTL_ENV: (&str, &str) = ("IDP_ACCESS_TOKEN_TTL", "4");
const ROTATE_ENV: (&str, &str) = ("IDP_ROTATE_REFRESH_TOKEN", "1");
/// How long eventual effects (logouts reaching a replica, recoveries) may take.
const EVENTUALLY: Duration = Duration::from_secs(10);

/// The bearer the upstream received for the request that answered `resp`.
fn bearer_in(resp: &Resp) -> String {
    assert_eq!(resp.status, 200, "{}", resp.dump());
    let j = resp.json();
    let headers = j["headers"].as_array().expect("echoed headers");
    let auth = headers
        .iter()
        .find(|h| h[0] == "authorization")
        .and_then(|h| h[1].as_str())
        .unwrap_or_else(|| panic!("no Authorization at the upstream: {}", resp.dump()));
    auth.strip_prefix("Bearer ").expect("bearer").to_string()
}

/// The session cookie a response sets (not a removal), if any.
fn new_session_cookie(resp: &Resp) -> Option<SetCookie> {
    resp.set_cookie("_portcullis").filter(|c| !c.is_removal())
}

fn assert_session_cleared(resp: &Resp, what: &str) {
    let c = resp
        .set_cookie("_portcullis")
        .unwrap_or_else(|| panic!("{what}: session cookie not cleared: {}", resp.dump()));
    assert!(c.is_removal(), "{what}: {}", c.raw);
}

/// A 503 of the gateway's own: JSON `{"error": code}` for an API client, an HTML page for a
/// browser; `Retry-After` either way.
fn assert_503(resp: &Resp, json_code: Option<&str>, what: &str) {
    assert_eq!(resp.status, 503, "{what}: {}", resp.dump());
    assert!(
        resp.header("retry-after").is_some(),
        "{what}: {}",
        resp.dump()
    );
    let ct = resp.header("content-type").unwrap_or_default();
    match json_code {
        Some(code) => {
            assert_eq!(ct, "application/json", "{what}: {}", resp.dump());
            assert_eq!(resp.json()["error"], code, "{what}: {}", resp.dump());
        }
        None => assert!(ct.starts_with("text/html"), "{what}: {}", resp.dump()),
    }
}

/// `api`, in a task of its own: a request that waits (on a hung provider) while the test
/// goes on.
fn spawn_api(gw: &Gateway, path: &str, cookie: &str) -> tokio::task::JoinHandle<Resp> {
    let (url, cookie) = (gw.url(path), cookie.to_string());
    tokio::spawn(async move {
        send(
            "GET",
            &url,
            &[("accept", "application/json"), ("cookie", &cookie)],
            Vec::new(),
        )
        .await
    })
}

/// Polls `path` with `cookie` until the gateway answers 401 (the session is over there):
/// that answer.
async fn refused_eventually(what: &str, gw: &Gateway, path: &str, cookie: &str) -> Resp {
    eventually(what, || async {
        let r = api(gw, path, cookie).await;
        if r.status == 401 {
            Ok(r)
        } else {
            Err(r.dump())
        }
    })
    .await
}

async fn api(gw: &Gateway, path: &str, cookie: &str) -> Resp {
    send(
        "GET",
        &gw.url(path),
        &[("accept", "application/json"), ("cookie", cookie)],
        Vec::new(),
    )
    .await
}

/// A back-channel logout delivery to `gw`, as the provider posts it (`body`: the form).
async fn post_logout(gw: &Gateway, body: impl Into<bytes::Bytes>) -> Resp {
    send(
        "POST",
        &gw.url("/oauth2/backchannel_logout"),
        &[("content-type", "application/x-www-form-urlencoded")],
        body,
    )
    .await
}

/// Sleeps until a token the gateway received before `issued_by` is due for a refresh
/// (`AT_TTL - refresh_before` later, but not before half its life; the gateway counts whole
/// seconds from its receipt).
async fn until_due(issued_by: Instant, refresh_before: u64) {
    let before = refresh_before.min(AT_TTL / 2);
    let due = issued_by + Duration::from_secs(AT_TTL - before) + Duration::from_millis(200);
    tokio::time::sleep_until(due.into()).await;
}

/// Polls `probe` every 100 ms until it returns `Ok`, for up to `EVENTUALLY` (then panics
/// with its last `Err`).
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not within {EVENTUALLY:?}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Polls the gateway's `/readyz` until its answer is `wanted` (see `eventually`).
async fn readyz_until(gw: &Gateway, what: &str, wanted: impl Fn(&Resp) -> bool) {
    eventually(what, || async {
        let r = send("GET", &gw.url("/readyz"), &[], Vec::new()).await;
        if wanted(&r) {
            Ok(())
        } else {
            Err(r.dump())
        }
    })
    .await
}

/// `IDP_REDIRECT_URIS` for gateways on these ports.
fn redirect_uris(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}/oauth2/callback"))
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    /// Cookie store, no Redis at all.
    CookieOnly,
    /// Cookie store with a coordination Redis.
    Coordinated,
    /// Redis store.
    Redis,
}

/// The `session:` and `timeouts:` YAML of a gateway.
fn session_yaml(store: Store, redis: Option<&RedisServer>, refresh_before: u64) -> String {
    let url = || redis.expect("this store needs a Redis").url();
    let store = match store {
        Store::CookieOnly => "store: cookie".to_string(),
        Store::Coordinated => format!(
            "store: cookie, coordination: {{ redis_url: \"{}\" }}",
            url()
        ),
        Store::Redis => format!("store: redis, redis: {{ url: \"{}\", timeout: 1s }}", url()),
    };
    format!(
        "session: {{ refresh_before: {refresh_before}s, {store} }}\ntimeouts: {{ provider: 2s }}\n"
    )
}

/// Gateway options on `port` with that session config and, optionally, an admin listener.
fn gw_opts(
    port: u16,
    idp: &Idp,
    upstream: &Upstream,
    session: &str,
    admin: Option<u16>,
) -> GatewayOpts {
    let mut o = GatewayOpts::new(port, idp, &upstream.url());
    o.extra = session.to_string();
    if let Some(a) = admin {
        o.env
            .push(("PORTCULLIS_ADMIN_LISTEN".into(), format!("127.0.0.1:{a}")));
    }
    o
}

/// `/metrics` of the admin listener on `port`.
async fn metrics(port: u16) -> String {
    let r = send(
        "GET",
        &format!("http://127.0.0.1:{port}/metrics"),
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    r.text()
}

/// The value of one sample line (`name{labels}`) of a metrics page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Revokes a token at the provider's revocation endpoint. Revoking an (opaque) access
/// token makes oidc-provider revoke every token of its grant, the refresh token included.
/// Asserts how many refreshes the gateway counted with each outcome.
async fn assert_refreshes(admin: u16, want: &[(&str, f64)]) {
    let m = metrics(admin).await;
    for (outcome, n) in want {
        let series = format!("portcullis_refreshes_total{{outcome=\"{outcome}\"}}");
        assert_eq!(sample(&m, &series), Some(*n), "{series}\n{m}");
    }
}

async fn revoke_at_provider(idp: &Idp, token: &str) {
    use base64::Engine;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    let r = send(
        "POST",
        &idp.url("/token/revocation"),
        &[
            ("authorization", &format!("Basic {basic}")),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        format!("token={}&token_type_hint=access_token", enc(token)),
    )
    .await;
    assert_eq!(r.status, 200, "revocation: {}", r.dump());
    // The token is dead at the provider now.
    let me = idp.userinfo(token).await;
    assert_eq!(me.status, 401, "revoked token still works: {}", me.dump());
}

/// RP-initiated logout at the provider with the browser's provider cookies: the
/// provider's confirmation page, then "Yes, sign me out" (`logout=yes`).
async fn end_provider_session(b: &Browser, idp: &Idp) {
    let page = b
        .get(&idp.url(&format!("/session/end?client_id={CLIENT_ID}")))
        .await;
    assert_eq!(page.status, 200, "provider logout page: {}", page.dump());
    let r = confirm_provider_logout(b, &page).await;
    assert!(
        r.status.is_redirection() || r.status == 200,
        "provider logout confirmation: {}",
        r.dump()
    );
    assert!(!r.text().contains("IdP error"), "{}", r.dump());
}

/// Fires `n` API requests per gateway at once, all with the same cookie.
async fn burst(targets: &[(&Gateway, usize)], cookie: &str) -> Vec<Resp> {
    let mut tasks = Vec::new();
    for (gw, n) in targets {
        for i in 0..*n {
            let url = gw.url(&format!("/burst/{i}"));
            let cookie = cookie.to_string();
            tasks.push(tokio::spawn(async move {
                send(
                    "GET",
                    &url,
                    &[("accept", "application/json"), ("cookie", &cookie)],
                    Vec::new(),
                )
                .await
            }));
        }
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

/// A `Cookie` header value from a response's session cookie.
fn cookie_of(sc: &SetCookie) -> String {
    format!("{}={}", sc.name, sc.value)
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn expiring_token_is_refreshed_with_a_new_bearer_and_cookie() {
    let gw_port = free_port();
    let admin = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[AT_TTL_ENV]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::CookieOnly, None, 1);
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, Some(admin))).await;

    let b = Browser::new();
    let r = login(&b, &gw, "/", "alice").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let first = upstream.last().bearer();
    let grants = idp.token_requests();
    assert_eq!(grants, 1, "the login's code exchange");
    let first_cookie = b.cookie(&gw.url("/"), "_portcullis").expect("session");

    // Requests keep the first token until it is due, then one of them refreshes it.
    let deadline = Instant::now() + EVENTUALLY;
    let refreshed = loop {
        let r = b.api_get(&gw.url("/poll")).await;
        assert_eq!(r.status, 200, "{}", r.dump());
        if bearer_in(&r) != first {
            break r;
        }
        assert!(
            new_session_cookie(&r).is_none(),
            "cookie churn before the refresh: {}",
            r.dump()
        );
        assert_eq!(idp.token_requests(), grants, "refreshed too early");
        assert!(
            Instant::now() < deadline,
            "no refresh within {EVENTUALLY:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let second = bearer_in(&refreshed);
    assert_eq!(
        idp.token_requests(),
        grants + 1,
        "exactly one refresh grant"
    );
    let sc = new_session_cookie(&refreshed)
        .unwrap_or_else(|| panic!("no new session cookie: {}", refreshed.dump()));
    assert_ne!(sc.value, first_cookie, "the cookie must change");
    assert_eq!(sc.path(), Some("/"), "{}", sc.raw);
    assert!(sc.flag("httponly"), "{}", sc.raw);
    assert!(
        !refreshed.text().contains(&first_cookie),
        "old cookie leaked to the upstream"
    );

    // The new bearer is a live token for the same user.
    let me = idp.userinfo(&second).await;
    assert_eq!(me.status, 200, "{}", me.dump());
    assert_eq!(me.json()["sub"], "alice");

    // The new cookie carries the new token: no more refreshes, no more cookies.
    let again = b.api_get(&gw.url("/again")).await;
    assert_eq!(bearer_in(&again), second);
    assert!(new_session_cookie(&again).is_none(), "{}", again.dump());
    assert_eq!(upstream.last().header("x-forwarded-user"), Some("alice"));
    assert_eq!(idp.token_requests(), grants + 1);

    assert_refreshes(admin, &[("success", 1.0), ("invalid_grant", 0.0)]).await;
}

#[tokio::test]
async fn fifty_concurrent_requests_across_expiry_refresh_once() {
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[AT_TTL_ENV, ROTATE_ENV]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::CookieOnly, None, 1);
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;

    let cookie = login_cookie(&gw, "alice").await;
    let logged_in = Instant::now();
    let first = upstream.last().bearer();
    until_due(logged_in, 1).await;

    let grants = idp.token_requests();
    let rs = burst(&[(&gw, 50)], &cookie).await;
    let statuses: Vec<u16> = rs.iter().map(|r| r.status.as_u16()).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        idp.token_requests(),
        grants + 1,
        "one refresh grant for 50 concurrent requests: {:?}",
        idp.requests()
    );
    let bearers: std::collections::BTreeSet<String> = rs.iter().map(bearer_in).collect();
    assert_eq!(bearers.len(), 1, "all forwarded with the same token");
    let second = bearers.into_iter().next().unwrap();
    assert_ne!(second, first);
    // Every response refreshes the cookie its request carried.
    let new_cookie = new_session_cookie(&rs[0])
        .unwrap_or_else(|| panic!("no new session cookie: {}", rs[0].dump()));
    for r in &rs {
        assert!(new_session_cookie(r).is_some(), "{}", r.dump());
    }

    // A straggler with the old cookie reuses that result instead of spending the
    // (rotated, now invalid) refresh token again.
    let late = api(&gw, "/late", &cookie).await;
    assert_eq!(bearer_in(&late), second);
    assert_eq!(idp.token_requests(), grants + 1);

    // The refreshed cookie holds the rotated refresh token: the next refresh works.
    let refreshed_at = Instant::now();
    let cookie2 = cookie_of(&new_cookie);
    until_due(refreshed_at, 1).await;
    let r = api(&gw, "/next", &cookie2).await;
    let third = bearer_in(&r);
    assert!(third != second && third != first, "no second refresh");
    assert_eq!(idp.token_requests(), grants + 2);
    assert!(new_session_cookie(&r).is_some(), "{}", r.dump());
}

/// Two gateway processes (same cookie keys and client) sharing a Redis; login on A.
struct Replicas {
    a: Gateway,
    b: Gateway,
    upstream: Upstream,
    idp: Idp,
    redis: RedisServer,
    /// The login browser (it also holds the provider's cookies).
    browser: Browser,
    /// The `Cookie` header of the session.
    cookie: String,
    /// When the login had finished.
    logged_in: Instant,
    admin_a: u16,
    admin_b: u16,
}

impl Replicas {
    async fn start(store: Store, idp_env: &[(&str, &str)], backchannel: Option<u16>) -> Self {
        let redis = RedisServer::start().await;
        let (pa, pb, admin_a, admin_b) = (free_port(), free_port(), free_port(), free_port());
        let uris = redirect_uris(&[pa, pb]);
        let bcl = backchannel.map(|p| format!("http://127.0.0.1:{p}/oauth2/backchannel_logout"));
        let mut env: Vec<(&str, &str)> = vec![("IDP_REDIRECT_URIS", &uris)];
        if let Some(u) = &bcl {
            env.push(("IDP_BACKCHANNEL_LOGOUT_URI", u));
        }
        env.extend_from_slice(idp_env);
        let idp = Idp::start(&env).await;
        let upstream = Upstream::start();
        let yaml = session_yaml(store, Some(&redis), 1);
        let a = Gateway::start(gw_opts(pa, &idp, &upstream, &yaml, Some(admin_a))).await;
        let b = Gateway::start(gw_opts(pb, &idp, &upstream, &yaml, Some(admin_b))).await;
        let browser = Browser::new();
        let r = login(&browser, &a, "/", "alice").await;
        assert_eq!(r.status, 200, "{}", r.dump());
        let logged_in = Instant::now();
        let cookie = browser.cookie_header(&a.url("/"));
        assert!(cookie.starts_with("_portcullis="), "{cookie}");
        Replicas {
            a,
            b,
            upstream,
            idp,
            redis,
            browser,
            cookie,
            logged_in,
            admin_a,
            admin_b,
        }
    }
}

/// Polls both gateways until the session's cookie gets 401 on each.
async fn await_refused_on_both(s: &Replicas, what: &str) {
    for (name, gw) in [("A", &s.a), ("B", &s.b)] {
        refused_eventually(&format!("{what} on {name}"), gw, "/after", &s.cookie).await;
    }
}

async fn two_replicas_refresh_once(store: Store) {
    let s = Replicas::start(store, &[AT_TTL_ENV, ROTATE_ENV], None).await;
    let first = s.upstream.last().bearer();
    // The session works on B as well (same keys; same Redis for the Redis store).
    let on_b = api(&s.b, "/on-b", &s.cookie).await;
    assert_eq!(bearer_in(&on_b), first);
    until_due(s.logged_in, 1).await;

    let grants = s.idp.token_requests();
    let rs = burst(&[(&s.a, 25), (&s.b, 25)], &s.cookie).await;
    let statuses: Vec<u16> = rs.iter().map(|r| r.status.as_u16()).collect();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{store:?}: {statuses:?}"
    );
    assert_eq!(
        s.idp.token_requests(),
        grants + 1,
        "{store:?}: one refresh grant across both gateways: {:?}",
        s.idp.requests()
    );
    let bearers: std::collections::BTreeSet<String> = rs.iter().map(bearer_in).collect();
    assert_eq!(bearers.len(), 1, "{store:?}: all forwarded with one token");
    // One refresh, counted as such by the replica that made it; the other reused it.
    let mut successes = 0.0;
    for admin in [s.admin_a, s.admin_b] {
        let m = metrics(admin).await;
        successes += sample(&m, "portcullis_refreshes_total{outcome=\"success\"}").unwrap_or(0.0);
    }
    assert_eq!(
        successes, 1.0,
        "{store:?}: refreshes counted across both gateways"
    );
    let second = bearers.into_iter().next().unwrap();
    assert_ne!(second, first);
    match store {
        Store::Redis => {
            // The session in Redis was updated: the unchanged cookie now carries the new
            // token on both gateways, without another refresh.
            for gw in [&s.a, &s.b] {
                let r = api(gw, "/after", &s.cookie).await;
                assert_eq!(bearer_in(&r), second, "{store:?}");
            }
            assert_eq!(s.idp.token_requests(), grants + 1);
            assert_eq!(s.redis.keys("portcullis:session:*").len(), 1);
        }
        _ => {
            for r in &rs {
                assert!(new_session_cookie(r).is_some(), "{store:?}: {}", r.dump());
            }
        }
    }
}

#[tokio::test]
async fn two_gateways_with_a_coordination_redis_refresh_once() {
    two_replicas_refresh_once(Store::Coordinated).await;
}

#[tokio::test]
async fn two_gateways_with_the_redis_store_refresh_once() {
    two_replicas_refresh_once(Store::Redis).await;
}

/// A copy of a signed-out session's cookie planted beside the live one (its reference,
/// with the Redis store) does not hide the live session; alone, it is no session.
#[tokio::test]
async fn a_signed_out_sessions_reference_beside_the_live_one_does_not_hide_it() {
    let redis = RedisServer::start().await;
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::Redis, Some(&redis), 60);
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    let planted = signed_out_copy(&gw, "mallory").await;
    let live = login_cookie(&gw, "alice").await;
    for cookie in [format!("{planted}; {live}"), format!("{live}; {planted}")] {
        let r = api(&gw, "/api/x", &cookie).await;
        assert_eq!(r.status, 200, "{cookie}: {}", r.dump());
        assert_eq!(upstream.last().header("x-forwarded-user"), Some("alice"));
        assert!(r.set_cookies().is_empty(), "{}", r.dump());
    }
    let alone = api(&gw, "/api/x", &planted).await;
    assert_eq!(alone.status, 401, "{}", alone.dump());
}

#[tokio::test]
async fn revoked_grant_ends_the_session() {
    revoked_grant_ends(Store::CookieOnly).await;
}

#[tokio::test]
async fn revoked_grant_ends_the_session_and_deletes_it_from_the_redis_store() {
    revoked_grant_ends(Store::Redis).await;
}

async fn revoked_grant_ends(store: Store) {
    let redis = RedisServer::start().await;
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[AT_TTL_ENV]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(store, Some(&redis), 1);
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    let cookie = login_cookie(&gw, "alice").await;
    let logged_in = Instant::now();
    revoke_at_provider(&idp, &upstream.last().bearer()).await;

    until_due(logged_in, 1).await;
    let before = upstream.count();
    let nav = navigate(&gw, "/page?x=1", &cookie).await;
    assert_eq!(nav.status, 302, "browser: {}", nav.dump());
    let loc = nav.location().unwrap_or_default();
    assert!(loc.starts_with(&idp.url("/auth?")), "not a login: {loc}");
    assert_session_cleared(&nav, "browser");
    let call = api(&gw, "/api/x", &cookie).await;
    assert_eq!(call.status, 401, "api: {}", call.dump());
    assert_eq!(call.json()["error"], "unauthorized");
    assert_session_cleared(&call, "api");
    assert_eq!(upstream.count(), before, "nothing reached the upstream");
    // Nothing is left that could spend the refresh token again.
    assert_eq!(
        redis.keys("portcullis:session:*"),
        Vec::<String>::new(),
        "{store:?}: the ended session is still stored"
    );
}

/// Tokens that live no longer than `session.refresh_before` (here the default 60 s against
/// 4 s): each generation is refreshed once, after half its life, and no bearer is forwarded
/// long after it was replaced (the reuse of a refresh must not outlive its token).
#[tokio::test]
async fn short_lived_tokens_are_refreshed_once_per_generation() {
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[AT_TTL_ENV]).await;
    let upstream = Upstream::start();
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, "", None)).await;
    let b = Browser::new();
    let r = login(&b, &gw, "/", "alice").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let mut bearers = vec![upstream.last().bearer()];
    let mut requests = 0;
    let until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < until {
        let r = b.api_get(&gw.url("/poll")).await;
        requests += 1;
        let bearer = bearer_in(&r);
        if bearers.last() != Some(&bearer) {
            assert!(!bearers.contains(&bearer), "an old bearer came back");
            bearers.push(bearer);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // 9 s of 4 s tokens renewed at half-life: at least three generations seen.
    assert!(
        bearers.len() >= 3,
        "{} bearers over {requests} requests\n{}",
        bearers.len(),
        gw.tails()
    );
    // One grant per generation (plus the login's code exchange): no refresh per request.
    assert_eq!(idp.token_requests(), bearers.len(), "{}", gw.tails());
}

/// The first answer (polled until it comes) forwarded with a bearer other than `old`.
async fn renewed_session(gw: &Gateway, cookie: &str, old: &str) -> Resp {
    eventually("the session renewed", || async {
        let r = api(gw, "/back", cookie).await;
        if r.status == 200 && bearer_in(&r) != old {
            Ok(r)
        } else {
            Err(r.dump())
        }
    })
    .await
}

/// A provider that hangs mid-refresh, then answers: with rotating refresh tokens, asking
/// again with the spent token would end the grant. The refresh started is waited for in
/// the background; requests meanwhile get the old token while it is valid, then 503, and
/// once the provider answers, its new tokens serve the session on.
#[tokio::test]
async fn a_hung_provider_does_not_end_a_session_with_rotating_refresh_tokens() {
    let gw_port = free_port();
    // 8 s tokens: due at half-life (4 s), and still valid (to the second) once the request
    // has waited the provider timeout (1 s) on the hung refresh.
    const TTL: u64 = 8;
    let idp = Idp::start_for_gateway(gw_port, &[("IDP_ACCESS_TOKEN_TTL", "8"), ROTATE_ENV]).await;
    let upstream = Upstream::start();
    let opts = gw_opts(gw_port, &idp, &upstream, "timeouts: { provider: 1s }", None);
    let gw = Gateway::start(opts).await;
    let cookie = login_cookie(&gw, "alice").await;
    let issued = Instant::now();
    let first = upstream.last().bearer();
    idp.signal("STOP");
    // Due, still valid: the refresh hangs, the request goes on with the old token.
    tokio::time::sleep_until((issued + Duration::from_millis(TTL * 1000 / 2 + 300)).into()).await;
    let r = api(&gw, "/due", &cookie).await;
    assert_eq!(bearer_in(&r), first, "{}", gw.tails());
    // Expired, the refresh still hanging: 503, the session kept.
    tokio::time::sleep_until((issued + Duration::from_millis(TTL * 1000 + 1200)).into()).await;
    let r = api(&gw, "/expired", &cookie).await;
    assert_eq!(r.status, 503, "{}\n{}", r.dump(), gw.tails());
    assert!(r.set_cookie("_portcullis").is_none(), "{}", r.dump());
    // Forward-auth's answer, which the proxy passes on: JSON for a program, a page for a
    // browser navigation.
    let r = api(&gw, "/oauth2/auth", &cookie).await;
    assert_eq!(r.status, 503, "{}", r.dump());
    assert_eq!(r.json()["error"], "provider_unavailable", "{}", r.dump());
    assert!(r.header("retry-after").is_some(), "{}", r.dump());
    // A program that says nothing of what it takes (curl's `*/*`, or no Accept at all) is
    // no browser navigation either, as on the proxied path.
    for accept in [
        &[("accept", "*/*"), ("cookie", &cookie)][..],
        &[("cookie", &cookie)],
    ] {
        let r = send("GET", &gw.url("/oauth2/auth"), accept, Vec::new()).await;
        assert_eq!(r.status, 503, "{}", r.dump());
        assert_eq!(r.json()["error"], "provider_unavailable", "{}", r.dump());
    }
    let r = navigate(&gw, "/oauth2/auth", &cookie).await;
    assert_eq!(r.status, 503, "{}", r.dump());
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "{}",
        r.dump()
    );
    // The provider answers what it was sent: one refresh, whose tokens carry the session on.
    idp.signal("CONT");
    let renewed = renewed_session(&gw, &cookie, &first).await;
    let next = new_session_cookie(&renewed)
        .unwrap_or_else(|| panic!("no new session cookie: {}", renewed.dump()));
    let r = api(&gw, "/after", &format!("_portcullis={}", next.value)).await;
    assert_eq!(bearer_in(&r), bearer_in(&renewed));
    assert_eq!(
        idp.token_requests(),
        2,
        "the login and one refresh\n{}",
        idp.tails()
    );
}

/// A request that comes while its token is due and still valid, and waits on a hung provider
/// until the token has expired, is not forwarded with the expired token: validity is judged
/// when the wait is over.
#[tokio::test]
async fn a_token_that_expires_while_the_provider_hangs_is_not_forwarded() {
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[AT_TTL_ENV, ROTATE_ENV]).await;
    let upstream = Upstream::start();
    let opts = gw_opts(gw_port, &idp, &upstream, "timeouts: { provider: 3s }", None);
    let gw = Gateway::start(opts).await;
    let cookie = login_cookie(&gw, "alice").await;
    let issued = Instant::now();
    let seen = upstream.count();
    idp.signal("STOP");
    // Due (half of 4 s) and valid at 2.1 s; the wait ends at 5.1 s, after the expiry.
    tokio::time::sleep_until((issued + Duration::from_millis(2100)).into()).await;
    let r = api(&gw, "/due", &cookie).await;
    idp.signal("CONT");
    assert_eq!(r.status, 503, "{}\n{}", r.dump(), gw.tails());
    assert_eq!(upstream.count(), seen, "forwarded with an expired bearer");
}

/// A hung provider stalls a session once per refresh attempt, not on every request: a request
/// that joins a refresh already under way waits only for what is left of `timeouts.provider`
/// (counted from when the provider was asked), then goes on with the still-valid token.
#[tokio::test]
async fn a_request_joining_a_hung_refresh_does_not_wait_the_provider_timeout_again() {
    let gw_port = free_port();
    // 14 s tokens, due after 7 s (half their life): valid throughout the test.
    let idp = Idp::start_for_gateway(gw_port, &[("IDP_ACCESS_TOKEN_TTL", "14"), ROTATE_ENV]).await;
    let upstream = Upstream::start();
    let yaml = "session: { refresh_before: 7s }\ntimeouts: { provider: 4s }\n";
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, yaml, None)).await;
    let cookie = login_cookie(&gw, "alice").await;
    let issued = Instant::now();
    let first = upstream.last().bearer();
    idp.signal("STOP");
    tokio::time::sleep_until((issued + Duration::from_millis(7300)).into()).await;
    // The first request starts the refresh and waits the provider timeout on it.
    let r = api(&gw, "/starts", &cookie).await;
    assert_eq!(
        (r.status.as_u16(), bearer_in(&r)),
        (200, first.clone()),
        "{}",
        gw.tails()
    );
    // The refresh still hangs: the next request joins it and, the timeout spent, goes on at
    // once (it would otherwise wait another 4 s).
    let joined = tokio::time::timeout(Duration::from_secs(2), api(&gw, "/joins", &cookie)).await;
    idp.signal("CONT");
    let r = joined.unwrap_or_else(|_| panic!("waited on the hung refresh again\n{}", gw.tails()));
    assert_eq!(
        (r.status.as_u16(), bearer_in(&r)),
        (200, first.clone()),
        "{}",
        gw.tails()
    );
    // Once the provider answers, the one refresh carries the session on.
    renewed_session(&gw, &cookie, &first).await;
    assert_eq!(
        idp.token_requests(),
        2,
        "the login and one refresh\n{}",
        idp.tails()
    );
}

/// A refresh whose claims grow: a session that fits without its ID token (only a logout
/// hint) goes on in the cookie; one that fits in no cookie ends, visibly (the old cookie
/// would spend the rotated refresh token again and lose the grant a minute later).
#[tokio::test]
async fn a_refreshed_session_too_large_for_the_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let groups_file = dir.path().join("groups.json");
    let groups_env = groups_file.display().to_string();
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(
        gw_port,
        &[
            AT_TTL_ENV,
            ROTATE_ENV,
            ("IDP_EXTRA_GROUPS_FILE", &groups_env),
        ],
    )
    .await;
    let upstream = Upstream::start();
    let admin = free_port();
    let yaml = format!(
        "{}limits: {{ max_cookie_chunks: 1 }}\n",
        session_yaml(Store::CookieOnly, None, 1)
    );
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, Some(admin))).await;
    let cookie = login_cookie(&gw, "alice").await;
    let issued = Instant::now();
    let groups = |n: usize, len: usize| {
        let list: Vec<String> = (0..n)
            .map(|i| format!("g{i:03}-{}", "x".repeat(len)))
            .collect();
        serde_json::to_string(&list).unwrap()
    };

    // ~1.9 KB of groups: in the identity and again in the ID token, one chunk holds them
    // only without the ID token.
    std::fs::write(&groups_file, groups(60, 27)).unwrap();
    until_due(issued, 1).await;
    let r = api(&gw, "/grown", &cookie).await;
    assert_eq!(r.status, 200, "{}\n{}", r.dump(), gw.tails());
    let next = new_session_cookie(&r)
        .unwrap_or_else(|| panic!("no refreshed cookie: {}\n{}", r.dump(), gw.tails()));
    let cookie = cookie_of(&next);
    let refreshed = Instant::now();
    assert_all_60_groups_reach_the_app(&gw, &upstream, "/with-it", &cookie).await;

    // Far more than one chunk holds: the session ends at once, said and counted.
    std::fs::write(&groups_file, groups(200, 27)).unwrap();
    until_due(refreshed, 1).await;
    let r = api(&gw, "/too-large", &cookie).await;
    assert_eq!(r.status, 401, "{}\n{}", r.dump(), gw.tails());
    assert_session_cleared(&r, "too large");
    assert!(gw.stderr().contains("too large"), "{}", gw.tails());
    assert_refreshes(admin, &[("too_large", 1.0)]).await;

    // A login follows the same rule: one chunk holds it without the ID token...
    std::fs::write(&groups_file, groups(60, 27)).unwrap();
    let again = login_cookie(&gw, "alice").await;
    assert_all_60_groups_reach_the_app(&gw, &upstream, "/logged-in-again", &again).await;
    // ...and one too large even so fails, said and counted.
    std::fs::write(&groups_file, groups(200, 27)).unwrap();
    let b = Browser::new();
    let (auth, _) = auth_redirect(&b.get(&gw.url("/")).await);
    let r = b.get(&idp_walk(&b, &auth, "alice").await).await;
    assert_eq!(r.status, 502, "{}", r.dump());
    assert!(r.text().contains("too large"), "{}", r.dump());
    assert!(
        gw.stderr()
            .lines()
            .any(|l| l.contains("login refused") && l.contains("max_cookie_chunks")),
        "the log says why: {}",
        gw.tails()
    );
    let m = metrics(admin).await;
    assert_eq!(
        sample(
            &m,
            "portcullis_login_flows_total{event=\"failed\",reason=\"cookie_too_large\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

async fn assert_all_60_groups_reach_the_app(
    gw: &Gateway,
    upstream: &Upstream,
    path: &str,
    cookie: &str,
) {
    let r = api(gw, path, cookie).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert!(upstream
        .last()
        .header("x-forwarded-groups")
        .is_some_and(|g| g.contains("g059-")));
}

/// `/oauth2/userinfo` takes the same refresh decision as a proxied request: a due token is
/// refreshed (and the new cookie sent back), a refused refresh ends the session (401, cookie
/// cleared) instead of reporting the user as logged in.
#[tokio::test]
async fn userinfo_refreshes_and_reports_a_revoked_grant_as_logged_out() {
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[AT_TTL_ENV]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::CookieOnly, None, 1);
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    let cookie = login_cookie(&gw, "alice").await;
    let logged_in = Instant::now();
    let first = upstream.last().bearer();

    // Due: userinfo refreshes the token and passes the new cookie back.
    until_due(logged_in, 1).await;
    let grants = idp.token_requests();
    let r = api(&gw, "/oauth2/userinfo", &cookie).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(r.json()["sub"], "alice");
    assert_eq!(idp.token_requests(), grants + 1, "one refresh grant");
    let refreshed =
        new_session_cookie(&r).unwrap_or_else(|| panic!("no refreshed cookie: {}", r.dump()));
    let cookie = cookie_of(&refreshed);
    let refreshed_at = Instant::now();
    // The new cookie carries the new token: the upstream gets it, no second refresh.
    let call = api(&gw, "/after-userinfo", &cookie).await;
    let second = bearer_in(&call);
    assert_ne!(second, first, "the refreshed token");
    assert_eq!(idp.token_requests(), grants + 1, "no second refresh");

    // The grant is revoked at the provider: once the token is due, the refresh is refused
    // and userinfo says so, as a proxied request would.
    revoke_at_provider(&idp, &second).await;
    until_due(refreshed_at, 1).await;
    let r = api(&gw, "/oauth2/userinfo", &cookie).await;
    assert_eq!(
        r.status,
        401,
        "ended session reported as logged in: {}",
        r.dump()
    );
    assert_eq!(r.json()["error"], "unauthorized");
    assert_session_cleared(&r, "userinfo");
    let call = api(&gw, "/api/x", &cookie).await;
    assert_eq!(call.status, 401, "{}", call.dump());
}

/// A logged-in cookie-store session whose token is due 1 s after issue and expires after
/// 4 s, behind a gateway with its admin port, in front of an IdP that `restart` can replace
/// on the same port (with `env` and whatever else).
struct Restartable {
    idp: Idp,
    upstream: Upstream,
    gw: Gateway,
    admin: u16,
    cookie: String,
    redirect: String,
}

impl Restartable {
    async fn start() -> Restartable {
        let gw_port = free_port();
        let redirect = format!("http://127.0.0.1:{gw_port}/oauth2/callback");
        let idp = Idp::start(&[("IDP_REDIRECT_URIS", redirect.as_str()), AT_TTL_ENV]).await;
        let upstream = Upstream::start();
        let yaml = session_yaml(Store::CookieOnly, None, 3);
        let admin = free_port();
        let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, Some(admin))).await;
        let cookie = login_cookie(&gw, "alice").await;
        Restartable {
            idp,
            upstream,
            gw,
            admin,
            cookie,
            redirect,
        }
    }
}

#[tokio::test]
async fn provider_down_during_refresh() {
    let Restartable {
        mut idp,
        upstream,
        gw,
        admin,
        cookie,
        redirect,
    } = Restartable::start().await;
    let env = [("IDP_REDIRECT_URIS", redirect.as_str()), AT_TTL_ENV];
    let first = upstream.last().bearer();
    idp.kill();

    // Still valid: served with the old token, whether or not a refresh was attempted.
    let mut served_after_failed_refresh = false;
    let deadline = Instant::now() + EVENTUALLY;
    let expired = loop {
        let r = api(&gw, "/while-down", &cookie).await;
        if r.status != 200 {
            break r;
        }
        assert_eq!(bearer_in(&r), first);
        assert!(new_session_cookie(&r).is_none(), "{}", r.dump());
        let m = metrics(admin).await;
        served_after_failed_refresh |=
            sample(&m, "portcullis_refreshes_total{outcome=\"unavailable\"}").unwrap_or(0.0) > 0.0;
        assert!(
            Instant::now() < deadline,
            "token never expired\n{}",
            gw.tails()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        served_after_failed_refresh,
        "no request was served while the refresh failed\n{}",
        gw.tails()
    );
    // Expired and not renewable right now: 503 with Retry-After (JSON for the API client, as
    // its 401 would be), the session kept.
    assert_503(&expired, Some("provider_unavailable"), "api");
    assert!(
        expired.set_cookie("_portcullis").is_none(),
        "{}",
        expired.dump()
    );
    let nav = navigate(&gw, "/page", &cookie).await;
    assert_503(&nav, None, "browser");
    assert!(nav.set_cookie("_portcullis").is_none(), "{}", nav.dump());
    // Not stuck: the page offers to sign in again, and to come back to the page.
    assert!(
        nav.text().contains("href=\"/oauth2/start?rd=%2Fpage\""),
        "{}",
        nav.dump()
    );
    // XHR and POST are API calls too.
    let xhr = send(
        "GET",
        &gw.url("/xhr"),
        &[
            ("accept", "text/html"),
            ("x-requested-with", "XMLHttpRequest"),
            ("cookie", &cookie),
        ],
        Vec::new(),
    )
    .await;
    assert_503(&xhr, Some("provider_unavailable"), "xhr");
    let post = send("POST", &gw.url("/form"), &[("cookie", &cookie)], Vec::new()).await;
    assert_503(&post, Some("provider_unavailable"), "post");
    // A form a browser submits is shown to a person: the page, as its 401 would be.
    let form = send(
        "POST",
        &gw.url("/form"),
        &[
            ("cookie", &cookie),
            ("accept", "text/html,application/xhtml+xml"),
            ("sec-fetch-mode", "navigate"),
            ("sec-fetch-dest", "document"),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        b"a=1".to_vec(),
    )
    .await;
    assert_503(&form, None, "form");
    // userinfo takes the same decision: the provider is unavailable, not the session over.
    let me = api(&gw, "/oauth2/userinfo", &cookie).await;
    assert_503(&me, Some("provider_unavailable"), "userinfo");
    assert!(me.set_cookie("_portcullis").is_none(), "{}", me.dump());

    // The provider comes back — as a fresh process that knows no grant: the refresh
    // token is refused, so the session is over (login / 401) instead of 503.
    idp.restart(&env).await;
    let api_after = refused_eventually(
        "gateway answers 401 once the provider is back",
        &gw,
        "/back",
        &cookie,
    )
    .await;
    assert_session_cleared(&api_after, "api after recovery");
    let nav = navigate(&gw, "/page", &cookie).await;
    assert_eq!(nav.status, 302, "{}", nav.dump());
    assert!(nav
        .location()
        .is_some_and(|l| l.starts_with(&idp.url("/auth?"))));
    assert_session_cleared(&nav, "browser after recovery");
}

/// A token endpoint that gives no OAuth answer to a refresh (a maintenance or WAF page in front
/// of the provider, a 404, an empty 200) has not refused it: the provider blinked. The old
/// token is used while it is valid, then 503, the session kept; once the provider answers
/// again, the refresh goes through.
#[tokio::test]
async fn a_refresh_answered_by_no_oauth_answer_keeps_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let override_file = dir.path().join("token-answer");
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(
        gw_port,
        &[
            AT_TTL_ENV,
            ("IDP_TOKEN_OVERRIDE_FILE", override_file.to_str().unwrap()),
        ],
    )
    .await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::CookieOnly, None, 3);
    let admin = free_port();
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, Some(admin))).await;
    let cookie = login_cookie(&gw, "alice").await;
    let logged_in = Instant::now();
    let first = upstream.last().bearer();

    std::fs::write(
        &override_file,
        "200 text/html <html><p>Down for maintenance</p></html>",
    )
    .unwrap();
    until_due(logged_in, 3).await;
    let r = api(&gw, "/while-valid", &cookie).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(bearer_in(&r), first);
    assert!(new_session_cookie(&r).is_none(), "{}", r.dump());
    tokio::time::sleep_until((logged_in + Duration::from_secs(AT_TTL + 1)).into()).await;
    for answer in [
        "200 text/html <html><p>Down for maintenance</p></html>",
        "404 text/html <h1>Not Found</h1>",
        "403 text/html <h1>Request blocked</h1>",
        "200 - ",
        "200 application/json {\"status\": \"ok\"}",
    ] {
        std::fs::write(&override_file, answer).unwrap();
        let before = idp.token_requests();
        let r = api(&gw, "/expired", &cookie).await;
        assert_503(&r, Some("provider_unavailable"), answer);
        assert!(
            r.set_cookie("_portcullis").is_none(),
            "{answer}: {}",
            r.dump()
        );
        assert!(idp.token_requests() > before, "{answer}: not asked");
    }
    let m = metrics(admin).await;
    assert_eq!(
        sample(&m, "portcullis_refreshes_total{outcome=\"rejected\"}").unwrap_or(0.0),
        0.0,
        "{m}"
    );
    assert!(sample(&m, "portcullis_refreshes_total{outcome=\"unavailable\"}").unwrap_or(0.0) > 0.0);

    std::fs::remove_file(&override_file).unwrap();
    let r = api(&gw, "/back", &cookie).await;
    let refreshed = Instant::now();
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_ne!(bearer_in(&r), first, "not refreshed");
    let cookie = cookie_of(&new_session_cookie(&r).expect("a refreshed cookie"));

    // An RFC 6749 refusal is one whatever its status: here `invalid_grant` with a 200.
    until_due(refreshed, 3).await;
    std::fs::write(
        &override_file,
        "200 application/json {\"error\": \"invalid_grant\"}",
    )
    .unwrap();
    let r = api(&gw, "/refused", &cookie).await;
    assert_eq!(r.status, 401, "{}", r.dump());
    assert_session_cleared(&r, "invalid_grant with a 200");
}

/// A provider that answers a refresh with a refusal other than `invalid_grant` (here
/// `invalid_client`: the client secret it knows changed) has answered: the session ends
/// (401, login), counted as `rejected`, and the provider is not asked again per request.
#[tokio::test]
async fn a_refresh_the_provider_refuses_otherwise_ends_the_session() {
    let Restartable {
        mut idp,
        gw,
        admin,
        cookie,
        redirect,
        ..
    } = Restartable::start().await;
    let changed = [
        ("IDP_REDIRECT_URIS", redirect.as_str()),
        AT_TTL_ENV,
        ("IDP_CLIENT_SECRET", "a-secret-the-gateway-does-not-have"),
    ];
    idp.restart(&changed).await;
    let r = refused_eventually("the refused refresh ends the session", &gw, "/x", &cookie).await;
    assert_session_cleared(&r, "api");
    let refusals = idp
        .requests()
        .iter()
        .filter(|l| l.contains(" POST /token 401 "))
        .count();
    assert_eq!(refusals, 1, "{}", idp.tails());
    assert_refreshes(admin, &[("rejected", 1.0), ("unavailable", 0.0)]).await;
    let nav = navigate(&gw, "/page", &cookie).await;
    assert_eq!(nav.status, 302, "{}", nav.dump());
    assert_session_cleared(&nav, "browser");
    assert!(gw
        .stderr()
        .contains("provider refused the refresh; session ended"));
}

/// A Redis that refuses the gateway's password is asked again: once the password is right on
/// the Redis side (a rotation finished there), the gateway is ready and keeps sessions there
/// by itself, without a restart or a reload.
#[tokio::test]
async fn a_redis_password_put_right_on_the_redis_side_is_picked_up() {
    let redis = RedisServer::start().await;
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let upstream = Upstream::start();
    // This Redis has no password yet: it refuses the gateway's AUTH.
    let yaml = format!(
        "session: {{ store: redis, redis: {{ url: \"{}\", password: rotated-in, timeout: 1s }} }}\n",
        redis.url()
    );
    let opts = GatewayOpts {
        extra: yaml,
        ..GatewayOpts::new(gw_port, &idp, &upstream.url())
    };
    let gw = Gateway::start_unready(opts).await;
    readyz_until(&gw, "/readyz 503 while Redis refuses the password", |r| {
        r.status == 503
    })
    .await;
    // Long enough for several refused attempts on the same connection.
    tokio::time::sleep(Duration::from_secs(3)).await;

    support::redis::command(redis.port, &["CONFIG", "SET", "requirepass", "rotated-in"])
        .expect("set the password");
    readyz_until(&gw, "/readyz 200 once the password is right", |r| {
        r.status == 200
    })
    .await;
    let cookie = login_cookie(&gw, "alice").await;
    let r = api(&gw, "/stored", &cookie).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert!(
        cookie.len() < 300,
        "a Redis-store cookie holds only an id: {cookie}"
    );
}

#[tokio::test]
async fn redis_store_outage_gives_503_and_recovers() {
    let mut redis = RedisServer::start_persistent().await;
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::Redis, Some(&redis), 60);
    let mut gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    let cookie = login_cookie(&gw, "alice").await;
    let first = upstream.last().bearer();
    assert_eq!(redis.keys("portcullis:session:*").len(), 1);

    redis.kill();
    let down = eventually("503 while Redis is down", || async {
        let r = api(&gw, "/x", &cookie).await;
        if r.status == 503 {
            Ok(r)
        } else {
            Err(r.dump())
        }
    })
    .await;
    assert_503(&down, Some("session_store_unavailable"), "api");
    assert!(down.set_cookie("_portcullis").is_none(), "{}", down.dump());
    let nav = navigate(&gw, "/page", &cookie).await;
    assert_503(&nav, None, "browser");
    let me = api(&gw, "/oauth2/userinfo", &cookie).await;
    assert_503(&me, Some("session_store_unavailable"), "userinfo");
    // Signing out cannot end the stored session now: it says so instead of pretending.
    for method in ["GET", "POST"] {
        let r = send(
            method,
            &gw.url("/oauth2/sign_out"),
            &[
                ("cookie", &cookie),
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", &gw.origin()),
            ],
            "csrf=x",
        )
        .await;
        assert_eq!(r.status, 503, "{method} sign-out: {}", r.dump());
        assert!(r.set_cookie("_portcullis").is_none(), "{}", r.dump());
    }
    readyz_until(&gw, "/readyz 503 while Redis is down", |r| r.status == 503).await;
    gw.assert_healthy().await;
    // The outage is said at warn once, not once per request (the access log has those).
    for _ in 0..5 {
        assert_eq!(api(&gw, "/x", &cookie).await.status, 503);
    }
    let log = gw.stderr();
    let warned = |what: &str| {
        log.lines()
            .filter(|l| l.contains("WARN") && l.contains(what))
            .count()
    };
    assert_eq!(warned("session store unavailable"), 0, "{log}");
    assert_eq!(warned("redis command failed"), 1, "{log}");
    // Requests without a session need no Redis.
    let anon = send(
        "GET",
        &gw.url("/x"),
        &[("accept", "application/json")],
        Vec::new(),
    )
    .await;
    assert_eq!(anon.status, 401, "{}", anon.dump());

    redis.restart().await;
    let back = eventually("200 once Redis is back", || async {
        let r = api(&gw, "/x", &cookie).await;
        if r.status == 200 {
            Ok(r)
        } else {
            Err(r.dump())
        }
    })
    .await;
    assert_eq!(bearer_in(&back), first, "the same session survived");
    readyz_until(&gw, "/readyz 200 once Redis is back", |r| r.status == 200).await;
    gw.assert_healthy().await;
}

/// Relays the provider's back-channel logout requests to a gateway, keeping their
/// bodies (so a test can replay a logout token).
struct Relay {
    bodies: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// The first body the provider delivered, once it has.
    async fn first_body(&self) -> String {
        eventually("the provider delivers the back-channel logout", || async {
            self.bodies()
                .first()
                .cloned()
                .ok_or_else(|| "nothing yet".to_string())
        })
        .await
    }

    fn serve(listener: tokio::net::TcpListener, target: String) -> Relay {
        let bodies: Arc<Mutex<Vec<String>>> = Arc::default();
        let kept = bodies.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let kept = kept.clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let kept = kept.clone();
                            let target = target.clone();
                            async move {
                                let ct = req
                                    .headers()
                                    .get("content-type")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|c| c.to_bytes())
                                    .unwrap_or_default();
                                kept.lock()
                                    .unwrap()
                                    .push(String::from_utf8_lossy(&body).into_owned());
                                let status =
                                    try_send("POST", &target, &[("content-type", &ct)], body)
                                        .await
                                        .map_or(http::StatusCode::BAD_GATEWAY, |r| r.status);
                                let mut resp = http::Response::new(Full::new(Bytes::new()));
                                *resp.status_mut() = status;
                                Ok::<_, Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Relay { bodies, task }
    }

    fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backchannel_logout_ends_the_session_on_both(store: Store) {
    // The provider's back-channel logout URI is a relay in front of gateway A.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = listener.local_addr().unwrap().port();
    let s = Replicas::start(store, &[], Some(relay_port)).await;
    let relay = Relay::serve(listener, s.a.url("/oauth2/backchannel_logout"));

    // Another user, signed in too, must not be affected.
    let bob = login_cookie(&s.a, "bob").await;
    for gw in [&s.a, &s.b] {
        assert_eq!(api(gw, "/before", &s.cookie).await.status, 200);
        assert_eq!(api(gw, "/before", &bob).await.status, 200);
    }
    if store == Store::Redis {
        assert_eq!(s.redis.keys("portcullis:session:*").len(), 2);
    }

    end_provider_session(&s.browser, &s.idp).await;
    eventually("the provider delivers the back-channel logout", || async {
        let out = s.idp.stdout();
        if out.lines().any(|l| l.starts_with("BCL ok")) {
            Ok(())
        } else {
            Err(out.lines().filter(|l| l.starts_with("BCL")).collect())
        }
    })
    .await;
    let tokens = relay.bodies();
    assert_eq!(tokens.len(), 1, "{tokens:?}");

    for (name, gw) in [("A", &s.a), ("B", &s.b)] {
        let r =
            refused_eventually(&format!("session ended on {name}"), gw, "/after", &s.cookie).await;
        assert_session_cleared(&r, name);
        let nav = navigate(gw, "/after", &s.cookie).await;
        assert_eq!(nav.status, 302, "{name}: {}", nav.dump());
        // Bob is still signed in.
        let r = api(gw, "/bob", &bob).await;
        assert_eq!(r.status, 200, "{name}: bob: {}", r.dump());
    }
    if store == Store::Redis {
        assert_eq!(
            s.redis.keys("portcullis:session:*").len(),
            1,
            "alice's session was deleted from Redis"
        );
    }

    // The same logout token again, to either gateway: refused (one use, across replicas).
    for gw in [&s.a, &s.b] {
        let r = post_logout(gw, tokens[0].clone()).await;
        assert_eq!(r.status, 400, "replay: {}", r.dump());
        assert_eq!(r.json()["error"], "invalid_request");
    }
    // A token sent twice is ambiguous (RFC 6749 §3.1), whatever the copies hold.
    let twice = format!("{}&{}", tokens[0], tokens[0]);
    let r = post_logout(&s.a, twice).await;
    assert_eq!(r.status, 400, "{}", r.dump());
    assert_eq!(
        r.json()["error_description"],
        "logout_token sent more than once",
        "{}",
        r.dump()
    );
    // Garbage and a missing token.
    for body in ["logout_token=garbage", "logout_token=a.b.c", "other=1", ""] {
        let r = post_logout(&s.a, body).await;
        assert_eq!(r.status, 400, "{body:?}: {}", r.dump());
    }
    // Only the spec's form post (a charset parameter is fine: the token is then refused as
    // a replay, having been read).
    for (ct, status) in [
        ("text/plain", 415),
        ("application/json", 415),
        ("application/x-www-form-urlencoded; charset=UTF-8", 400),
    ] {
        let r = send(
            "POST",
            &s.a.url("/oauth2/backchannel_logout"),
            &[("content-type", ct)],
            tokens[0].clone(),
        )
        .await;
        assert_eq!(r.status, status, "{ct}: {}", r.dump());
    }

    let m = metrics(s.admin_a).await;
    assert_eq!(
        sample(&m, "portcullis_logouts_total{kind=\"backchannel\"}"),
        Some(1.0),
        "{m}"
    );
}

/// A logout the provider delivers while Redis stalls is answered 503 ("try again"). The
/// stalled write of its jti runs once Redis resumes: it must not turn the provider's retry
/// into a refused "replay", which would leave the session alive.
#[tokio::test]
async fn backchannel_logout_retried_after_a_redis_stall_ends_the_session() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = listener.local_addr().unwrap().port();
    let s = Replicas::start(Store::Coordinated, &[], Some(relay_port)).await;
    let relay = Relay::serve(listener, s.a.url("/oauth2/backchannel_logout"));
    s.redis.signal("STOP");
    end_provider_session(&s.browser, &s.idp).await;
    let token = relay.first_body().await;
    // The gateway gave up on Redis (its timeout is 1 s) before Redis resumes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.redis.signal("CONT");
    eventually("the provider's retry is applied", || async {
        let r = post_logout(&s.a, token.clone()).await;
        if r.status == 200 {
            Ok(())
        } else {
            Err(r.dump())
        }
    })
    .await;
    await_refused_on_both(&s, "session ended").await;
}

/// A TCP relay to Redis on `redis_port` that cuts the connection it carries once, right after
/// passing on the answer to the first command that names a logout token's record (`jti`),
/// and then lets no connection through for 3 s: Redis lost between two steps of a
/// back-channel logout (as a Redis that persisted the first write and then crashed).
fn cut_after_the_jti_command(redis_port: u16) -> u16 {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let cut_done = Arc::new(AtomicBool::new(false));
    let cut_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    std::thread::spawn(move || {
        for client in l.incoming().flatten() {
            if cut_at
                .lock()
                .unwrap()
                .is_some_and(|t| t.elapsed() < Duration::from_secs(3))
            {
                continue; // dropped: Redis is "down"
            }
            let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", redis_port)) else {
                continue;
            };
            let armed = Arc::new(AtomicBool::new(false));
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let arm = armed.clone();
            let done = cut_done.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n @ 1..) = c_in.read(&mut buf) {
                    // The logout token's key (`…jti:<digest>`): a colon appears in no sealed
                    // value, where a bare "jti" could, by chance (a flaky cut at login).
                    if !done.load(Ordering::SeqCst) && buf[..n].windows(4).any(|w| w == b"jti:") {
                        arm.store(true, Ordering::SeqCst);
                    }
                    if s_out.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
            let (mut s_in, mut c_out) = (server, client);
            let done = cut_done.clone();
            let cut_at = cut_at.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n @ 1..) = s_in.read(&mut buf) {
                    if c_out.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    if armed.load(Ordering::SeqCst) && !done.swap(true, Ordering::SeqCst) {
                        *cut_at.lock().unwrap() = Some(Instant::now());
                        let _ = c_out.shutdown(std::net::Shutdown::Both);
                        let _ = s_in.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                }
            });
        }
    });
    port
}

/// The connection to Redis is lost in the middle of a back-channel logout (also what a Redis
/// that persisted a first write and then crashed looks like): the answer is 503, and the
/// provider's retry must end the session, not be refused as a replay of a token never acted on.
#[tokio::test]
async fn backchannel_logout_cut_off_from_redis_midway_ends_the_session_on_retry() {
    let redis = RedisServer::start().await;
    let cutting = cut_after_the_jti_command(redis.port);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = listener.local_addr().unwrap().port();
    let port = free_port();
    let uris = redirect_uris(&[port]);
    let bcl = format!("http://127.0.0.1:{relay_port}/oauth2/backchannel_logout");
    let idp = Idp::start(&[
        ("IDP_REDIRECT_URIS", &uris),
        ("IDP_BACKCHANNEL_LOGOUT_URI", &bcl),
    ])
    .await;
    let upstream = Upstream::start();
    let yaml = format!(
        "session: {{ store: redis, redis: {{ url: \"redis://127.0.0.1:{cutting}/0\", timeout: 1s }} }}\n"
    );
    let gw = Gateway::start(gw_opts(port, &idp, &upstream, &yaml, None)).await;
    // The relay keeps the token and passes nothing on (a closed port): the test delivers it.
    let relay = Relay::serve(listener, "http://127.0.0.1:1/".into());
    let b = Browser::new();
    let r = login(&b, &gw, "/", "alice").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let cookie = b.cookie_header(&gw.url("/"));
    end_provider_session(&b, &idp).await;
    let token = relay.first_body().await;
    let logout_url = gw.url("/oauth2/backchannel_logout");
    let deliver = || {
        send(
            "POST",
            &logout_url,
            &[("content-type", "application/x-www-form-urlencoded")],
            token.clone(),
        )
    };
    let r = deliver().await;
    assert_eq!(r.status, 503, "the cut was not met: {}", r.dump());
    eventually("the provider's retry is applied", || async {
        let r = deliver().await;
        if r.status == 200 {
            Ok(())
        } else {
            Err(r.dump())
        }
    })
    .await;
    refused_eventually("the session ended", &gw, "/after", &cookie).await;
}

/// A provider whose ID tokens name no sid, while its logout tokens name the sid and the user:
/// the session cannot be matched by sid, so the user's sessions without one end (and other
/// users' stay).
async fn a_logout_naming_a_sid_ends_the_users_sessions_without_one(store: Store) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = listener.local_addr().unwrap().port();
    let s = Replicas::start(store, &[("IDP_NO_SID", "1")], Some(relay_port)).await;
    let relay = Relay::serve(listener, s.a.url("/oauth2/backchannel_logout"));
    let bob = login_cookie(&s.a, "bob").await;
    end_provider_session(&s.browser, &s.idp).await;
    let token = relay.first_body().await;
    // The scenario: the logout token names a sid (the ID token did not).
    let jwt = token.trim_start_matches("logout_token=");
    let payload = jwt.split('.').nth(1).unwrap();
    use base64::Engine;
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&claims).unwrap();
    assert!(
        claims["sid"].is_string() && claims["sub"] == "alice",
        "{claims}"
    );
    await_refused_on_both(&s, "alice's session without a sid ended").await;
    for gw in [&s.a, &s.b] {
        assert_eq!(api(gw, "/after", &bob).await.status, 200, "bob's session");
    }
}

#[tokio::test]
async fn a_logout_naming_a_sid_ends_sessions_without_one_with_a_coordination_redis() {
    a_logout_naming_a_sid_ends_the_users_sessions_without_one(Store::Coordinated).await;
}

#[tokio::test]
async fn a_logout_naming_a_sid_ends_sessions_without_one_with_the_redis_store() {
    a_logout_naming_a_sid_ends_the_users_sessions_without_one(Store::Redis).await;
}

#[tokio::test]
async fn backchannel_logout_with_a_coordination_redis_ends_the_session_on_both_gateways() {
    backchannel_logout_ends_the_session_on_both(Store::Coordinated).await;
}

#[tokio::test]
async fn backchannel_logout_with_the_redis_store_ends_the_session_on_both_gateways() {
    backchannel_logout_ends_the_session_on_both(Store::Redis).await;
}

#[tokio::test]
async fn backchannel_logout_without_redis_is_not_implemented() {
    let s = Stack::start().await;
    let r = send(
        "POST",
        &s.gw.url("/oauth2/backchannel_logout"),
        &[("content-type", "application/x-www-form-urlencoded")],
        "logout_token=garbage",
    )
    .await;
    assert_eq!(r.status, 501, "{}", r.dump());
    assert_eq!(r.json()["error"], "invalid_request");
}

/// A gateway with the Redis store, and its Redis, provider and upstream.
async fn redis_store_gateway() -> (RedisServer, Idp, Upstream, Gateway) {
    let redis = RedisServer::start().await;
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::Redis, Some(&redis), 60);
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    (redis, idp, upstream, gw)
}

#[tokio::test]
async fn sign_out_with_the_redis_store_deletes_the_session() {
    let (redis, idp, upstream, gw) = redis_store_gateway().await;
    let b = Browser::new();
    let r = login(&b, &gw, "/", "alice").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let cookie = b.cookie_header(&gw.url("/"));
    let token = upstream.last().bearer();

    let keys = redis.keys("portcullis:session:*");
    assert_eq!(keys.len(), 1, "{keys:?}");
    // The cookie names the session; Redis holds it sealed (no token in clear).
    let stored = redis.get(&keys[0]).expect("session value");
    assert!(
        !String::from_utf8_lossy(&stored).contains(&token),
        "access token in clear in Redis"
    );
    assert!(!cookie.contains(&token));

    let csrf = sign_out_csrf(&b, &gw).await;
    let out = post_sign_out(&b, &gw, &csrf).await;
    assert_eq!(out.status, 302, "{}", out.dump());
    assert_session_cleared(&out, "sign-out");
    assert_eq!(
        redis.keys("portcullis:session:*"),
        Vec::<String>::new(),
        "the session is gone from Redis"
    );
    // And from the back-channel indexes (by provider session and by user), which would
    // otherwise name it for the session lifetime.
    for index in ["portcullis:sid:*", "portcullis:nosid:*", "portcullis:sub:*"] {
        assert_eq!(redis.keys(index), Vec::<String>::new(), "{index}");
    }
    let after = api(&gw, "/x", &cookie).await;
    assert_eq!(after.status, 401, "old cookie: {}", after.dump());
    assert_session_cleared(&after, "old cookie");
    // The session's refresh token is revoked at the provider (in the background), and with
    // it the grant: its access token is dead there too.
    await_revocation(&idp).await;
    assert_eq!(idp.userinfo(&token).await.status, 401, "the grant lives on");
    assert_eq!(revocations_at(&idp).len(), 1, "{:?}", idp.requests());

    // The user's index (for back-channel logout by subject) holds the sessions still there:
    // logging in again drops the one signed out of instead of piling up ids.
    let again = login_cookie(&gw, "alice").await;
    assert_eq!(api(&gw, "/x", &again).await.status, 200);
    let Reply::Array(Some(ids)) = redis.cmd(&["SMEMBERS", "portcullis:sub:alice"]) else {
        panic!("no index of alice's sessions");
    };
    let live: Vec<String> = redis
        .keys("portcullis:session:*")
        .iter()
        .map(|k| k.trim_start_matches("portcullis:session:").to_string())
        .collect();
    let ids: Vec<String> = ids.iter().filter_map(Reply::text).collect();
    assert_eq!(ids, live, "index {ids:?}, sessions {live:?}");

    // A login checks 16 of the index's members, not all: a user with thousands of sessions
    // does not make each login of theirs scan them (Redis runs nothing else meanwhile).
    let mut sadd = vec!["SADD".to_string(), "portcullis:sub:alice".to_string()];
    sadd.extend((0..200).map(|i| format!("ended{i}")));
    let sadd: Vec<&str> = sadd.iter().map(String::as_str).collect();
    redis.cmd(&sadd);
    let third = login_cookie(&gw, "alice").await;
    assert_eq!(api(&gw, "/x", &third).await.status, 200);
    let Reply::Int(n) = redis.cmd(&["SCARD", "portcullis:sub:alice"]) else {
        panic!("no index of alice's sessions");
    };
    // 200 ended and 1 live, less the ended among the 16 checked, plus the new one.
    assert!((186..=187).contains(&n), "{n} members");
}

/// The revocations (RFC 7009) the provider has served, with their status.
fn revocations_at(idp: &Idp) -> Vec<String> {
    idp.requests()
        .into_iter()
        .filter(|l| l.contains(" POST /token/revocation "))
        .collect()
}

/// Waits (up to `EVENTUALLY`) for the sign-out's revocation, which runs in the background,
/// to reach the provider; does not fail without it (the caller's assertions say what is
/// wrong then).
async fn await_revocation(idp: &Idp) {
    let deadline = Instant::now() + EVENTUALLY;
    while revocations_at(idp).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The cookie store without a coordination Redis remembers a sign-out in memory only. A copy
/// of the signed-out cookie, presented to a new gateway process (same cookie keys: a
/// restart, a rolling update) once its access token is due, is not refreshed: the sign-out
/// revoked the refresh token at the provider. A session not signed out is refreshed there.
#[tokio::test]
async fn a_signed_out_cookie_is_not_refreshed_after_a_restart() {
    let (gw_port, next_port, admin) = (free_port(), free_port(), free_port());
    let uris = redirect_uris(&[gw_port, next_port]);
    let idp = Idp::start(&[("IDP_REDIRECT_URIS", &uris), AT_TTL_ENV]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::CookieOnly, None, 1);
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, Some(admin))).await;
    let alice = Browser::new();
    let r = login(&alice, &gw, "/", "alice").await;
    let alice_token = bearer_in(&r);
    let copied = alice.cookie_header(&gw.url("/"));
    let kept = login_cookie(&gw, "bob").await;
    let issued_by = Instant::now();

    let csrf = sign_out_csrf(&alice, &gw).await;
    let out = post_sign_out(&alice, &gw, &csrf).await;
    assert_eq!(out.status, 302, "{}", out.dump());
    assert_session_cleared(&out, "sign-out");
    // This process remembers the sign-out.
    assert_eq!(api(&gw, "/x", &copied).await.status, 401);
    await_revocation(&idp).await;
    // A new process with the same keys: a restart, or a rolling update's new replica (the old
    // one may still run meanwhile; it is asked nothing more).
    let next = Gateway::start(gw_opts(next_port, &idp, &upstream, &yaml, None)).await;
    until_due(issued_by, 1).await;

    // Not signed out: refreshed by the new process.
    let r = api(&next, "/after-restart", &kept).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert!(new_session_cookie(&r).is_some(), "{}", r.dump());
    // Signed out: the provider refuses the refresh, the session is over.
    let r = api(&next, "/after-restart", &copied).await;
    assert_eq!(
        r.status,
        401,
        "a signed-out cookie was refreshed after a restart: {}",
        r.dump()
    );
    assert_session_cleared(&r, "signed-out copy");

    // One revocation, a success; the whole grant is gone (oidc-provider revokes a refresh
    // token's grant), its access token with it.
    let revoked = revocations_at(&idp);
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert!(revoked[0].contains(" 200 "), "{revoked:?}");
    let counted = eventually("the revocation counted", || async {
        let m = metrics(admin).await;
        match sample(
            &m,
            r#"portcullis_token_revocations_total{outcome="revoked"}"#,
        ) {
            Some(n) if n > 0.0 => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    for (outcome, n) in [("revoked", 1.0), ("refused", 0.0), ("unavailable", 0.0)] {
        let series = format!("portcullis_token_revocations_total{{outcome=\"{outcome}\"}}");
        assert_eq!(sample(&counted, &series), Some(n), "{series}\n{counted}");
    }
    assert_eq!(idp.userinfo(&alice_token).await.status, 401);
}

/// `provider.revoke_on_sign_out: false`: a sign-out asks nothing of the provider (the grant
/// lives on, as with providers where revoking a token ends the user's other sessions too).
/// A provider that cannot be reached does not hold up the sign-out, which counts the failure.
#[tokio::test]
async fn sign_out_revocation_can_be_turned_off_and_never_holds_up_the_sign_out() {
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let upstream = Upstream::start();
    let mut opts = gw_opts(gw_port, &idp, &upstream, "", None);
    opts.provider_extra.push("revoke_on_sign_out: false".into());
    let gw = Gateway::start(opts).await;
    let b = Browser::new();
    let token = bearer_in(&login(&b, &gw, "/", "alice").await);
    let csrf = sign_out_csrf(&b, &gw).await;
    let out = post_sign_out(&b, &gw, &csrf).await;
    assert_eq!(out.status, 302, "{}", out.dump());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(revocations_at(&idp), Vec::<String>::new());
    assert_eq!(idp.userinfo(&token).await.status, 200, "the grant lives on");
    drop(gw);

    // Revoking, with the provider frozen: the sign-out answers at once all the same.
    let admin = free_port();
    let yaml = session_yaml(Store::CookieOnly, None, 60);
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, Some(admin))).await;
    let b = Browser::new();
    assert_eq!(login(&b, &gw, "/", "alice").await.status, 200);
    let csrf = sign_out_csrf(&b, &gw).await;
    idp.signal("STOP");
    let t0 = Instant::now();
    let out = post_sign_out(&b, &gw, &csrf).await;
    let took = t0.elapsed();
    assert_eq!(out.status, 302, "{}", out.dump());
    assert!(
        took < Duration::from_secs(1),
        "the sign-out waited {took:?}"
    );
    let series = r#"portcullis_token_revocations_total{outcome="unavailable"}"#;
    eventually("the failed revocation counted", || async {
        let m = metrics(admin).await;
        match sample(&m, series) {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    idp.signal("CONT");
    let warned = gw.stderr();
    assert!(
        warned.contains("cannot revoke the signed-out session's token at the provider"),
        "{warned}"
    );
}

/// Redis store: a whole session sealed into the cookie (by a cookie-store deployment with the
/// same key and cookie name, or by this one before it moved to Redis) is no session. Accepted,
/// it could never be ended here: a sign-out deletes nothing in Redis, and the copy lived on.
#[tokio::test]
async fn the_redis_store_refuses_a_cookie_holding_a_whole_session() {
    let redis = RedisServer::start().await;
    let cookie_port = free_port();
    let idp = Idp::start_for_gateway(cookie_port, &[]).await;
    let upstream = Upstream::start();
    let cookie_gw = Gateway::start(gw_opts(
        cookie_port,
        &idp,
        &upstream,
        &session_yaml(Store::CookieOnly, None, 60),
        None,
    ))
    .await;
    let redis_gw = Gateway::start(gw_opts(
        free_port(),
        &idp,
        &upstream,
        &session_yaml(Store::Redis, Some(&redis), 60),
        None,
    ))
    .await;
    let cookie = login_cookie(&cookie_gw, "alice").await;
    assert_eq!(api(&cookie_gw, "/x", &cookie).await.status, 200);

    let r = api(&redis_gw, "/x", &cookie).await;
    assert_eq!(
        r.status,
        401,
        "whole session at the Redis store: {}",
        r.dump()
    );
    assert_session_cleared(&r, "whole session at the Redis store");
    let r = navigate(&redis_gw, "/x", &cookie).await;
    assert_eq!(r.status, 302, "{}", r.dump());
    assert_session_cleared(&r, "whole session at the Redis store, browser");
    let r = api(&redis_gw, "/oauth2/userinfo", &cookie).await;
    assert_eq!(r.status, 401, "userinfo: {}", r.dump());
}

/// Redis store: a session value the gateway could not have written (here 64 MiB, put there by
/// whoever else can write to Redis) is no session, and is not read whole: each request would
/// otherwise read it into memory.
#[tokio::test]
async fn the_redis_store_reads_a_bounded_part_of_an_oversized_value() {
    let (redis, _idp, upstream, gw) = redis_store_gateway().await;
    let cookie = login_cookie(&gw, "alice").await;
    assert_eq!(api(&gw, "/x", &cookie).await.status, 200);
    let keys = redis.keys("portcullis:session:*");
    assert_eq!(keys.len(), 1, "{keys:?}");
    const BIG: usize = 64 << 20;
    redis.cmd(&["SETRANGE", &keys[0], &(BIG - 1).to_string(), "x"]);

    let sent_by_redis = || {
        let info = redis.cmd(&["INFO", "stats"]).text().expect("INFO stats");
        info.lines()
            .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .expect("total_net_output_bytes")
    };
    let (before, reached) = (sent_by_redis(), upstream.count());
    let r = api(&gw, "/x", &cookie).await;
    let read = sent_by_redis() - before;
    assert_eq!(r.status, 401, "{}", r.dump());
    assert_session_cleared(&r, "oversized value");
    assert!(
        read < 8 << 20,
        "the gateway read {read} bytes of a {BIG}-byte value"
    );
    assert_eq!(upstream.count(), reached, "the request reached the app");
}

/// Redis store: a sign-out while the session is being refreshed stays a sign-out — the
/// refresh that ends afterwards does not write the session back.
#[tokio::test]
async fn sign_out_during_a_refresh_stays_signed_out_with_the_redis_store() {
    let redis = RedisServer::start().await;
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[AT_TTL_ENV, ROTATE_ENV]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::Redis, Some(&redis), 1);
    let admin = free_port();
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, Some(admin))).await;
    let b = Browser::new();
    let r = login(&b, &gw, "/", "alice").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let logged_in = Instant::now();
    let cookie = b.cookie_header(&gw.url("/"));
    let csrf = sign_out_csrf(&b, &gw).await;

    // Due: the refresh starts, and the provider hangs (the request waits up to 2 s).
    until_due(logged_in, 1).await;
    idp.signal("STOP");
    let due = spawn_api(&gw, "/due", &cookie);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = post_sign_out(&b, &gw, &csrf).await;
    assert_eq!(out.status, 302, "{}", out.dump());
    // The provider answers while the request still waits: the refresh ends, signed out.
    idp.signal("CONT");
    let r = due.await.expect("request task");
    assert_eq!(r.status, 401, "refreshed after the sign-out: {}", r.dump());
    assert_eq!(
        redis.keys("portcullis:session:*"),
        Vec::<String>::new(),
        "the session was written back"
    );
    let after = api(&gw, "/after", &cookie).await;
    assert_eq!(after.status, 401, "copied cookie: {}", after.dump());
    // The provider renewed the tokens: no refusal to count (an alert on invalid_grant would
    // fire for every sign-out during a refresh).
    assert_refreshes(admin, &[("success", 1.0), ("invalid_grant", 0.0)]).await;
}

/// A sign-in's state is used once across replicas: its callback (URL and flow cookie, as an
/// attacker who captured them would send it) replayed on the other replica is refused there
/// before its code reaches the provider again, with either store.
async fn a_callback_replayed_on_another_replica_is_refused(store: Store) {
    let s = Replicas::start(store, &[], None).await;
    let b = Browser::new();
    let (callback, flow_cookie) = captured_callback(&b, &s.a, "bob").await;
    let ok = b.get(&callback).await;
    assert_eq!(ok.status, 302, "{}", ok.dump());
    let exchanges = s.idp.token_requests();

    let on_b = callback.replace(&s.a.url("/"), &s.b.url("/"));
    assert_ne!(on_b, callback);
    let replay = navigate_url(&on_b, &flow_cookie).await;
    assert_eq!(replay.status, 400, "{store:?}: {}", replay.dump());
    assert!(replay.text().contains("already used"), "{}", replay.dump());
    assert!(new_session_cookie(&replay).is_none(), "{}", replay.dump());
    assert_eq!(
        s.idp.token_requests(),
        exchanges,
        "{store:?}: the replayed code reached the provider"
    );
}

#[tokio::test]
async fn a_callback_replayed_on_another_replica_is_refused_with_a_coordination_redis() {
    a_callback_replayed_on_another_replica_is_refused(Store::Coordinated).await;
}

#[tokio::test]
async fn a_callback_replayed_on_another_replica_is_refused_with_the_redis_store() {
    a_callback_replayed_on_another_replica_is_refused(Store::Redis).await;
}

/// Cookie store with a coordination Redis: a back-channel logout (here delivered to the other
/// replica) while a request waits on the session's refresh ends the session — that request is
/// not forwarded with the tokens the refresh brings, nor is its cookie sent.
#[tokio::test]
async fn a_backchannel_logout_during_a_refresh_ends_the_session_with_the_cookie_store() {
    // The provider's back-channel logout goes to a relay that only records it (its target
    // is closed), so that it can be delivered while the refresh is under way.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = listener.local_addr().unwrap().port();
    // The grant outlives the provider session: the refresh would succeed.
    let env = [AT_TTL_ENV, ROTATE_ENV, ("IDP_GRANTS_OUTLIVE_LOGOUT", "1")];
    let s = Replicas::start(Store::Coordinated, &env, Some(relay_port)).await;
    let relay = Relay::serve(
        listener,
        format!("http://127.0.0.1:{}/oauth2/backchannel_logout", free_port()),
    );
    end_provider_session(&s.browser, &s.idp).await;
    let token = relay.first_body().await;
    assert_eq!(api(&s.a, "/before", &s.cookie).await.status, 200);

    until_due(s.logged_in, 1).await;
    let reached = s.upstream.count();
    // Due: the refresh starts, and the provider hangs while the logout arrives.
    s.idp.signal("STOP");
    let due = spawn_api(&s.a, "/due", &s.cookie);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = post_logout(&s.b, token).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    // Replica A learns of it from Redis (within half a second).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    s.idp.signal("CONT");
    let r = due.await.expect("request task");
    assert_eq!(
        r.status,
        401,
        "forwarded after the logout: {}\n{}",
        r.dump(),
        s.a.tails()
    );
    assert_eq!(s.upstream.count(), reached, "the request reached the app");
    assert!(
        new_session_cookie(&r).is_none(),
        "a refreshed cookie was sent: {}",
        r.dump()
    );
    await_refused_on_both(&s, "the session ended").await;
}

/// Redis store: Redis goes away while the provider answers a refresh (rotating refresh
/// tokens). The new tokens are not thrown away: they serve the request, and once Redis is back
/// they are stored — by the next request, or by the replica itself if none comes — instead of
/// another replica spending the old refresh token again (which would end the grant).
#[tokio::test]
async fn a_refresh_that_redis_misses_is_stored_once_redis_is_back() {
    let mut redis = RedisServer::start_persistent().await;
    let (gw_port, other_port) = (free_port(), free_port());
    let uris = redirect_uris(&[gw_port, other_port]);
    let idp = Idp::start(&[("IDP_REDIRECT_URIS", &uris), AT_TTL_ENV, ROTATE_ENV]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::Redis, Some(&redis), 1);
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    let other = Gateway::start(gw_opts(other_port, &idp, &upstream, &yaml, None)).await;
    let cookie = login_cookie(&gw, "alice").await;
    let logged_in = Instant::now();
    let first = upstream.last().bearer();

    until_due(logged_in, 1).await;
    idp.signal("STOP");
    let due = spawn_api(&gw, "/due", &cookie);
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    idp.signal("CONT");
    let r = due.await.expect("request task");
    let second = bearer_in(&r);
    assert_ne!(second, first, "not refreshed");

    redis.restart().await;
    // The other replica, which never saw the new tokens, serves the session with them.
    let r = eventually("served by the other replica once Redis is back", || async {
        let r = api(&other, "/back", &cookie).await;
        if r.status == 200 {
            Ok(r)
        } else {
            Err(r.dump())
        }
    })
    .await;
    // With the new tokens (or newer ones, renewed with the new refresh token when due by
    // then): the grant was never refused, as it would be for a spent refresh token.
    assert_ne!(bearer_in(&r), first, "{}\n{}", gw.tails(), other.tails());
    assert!(
        !idp.requests()
            .iter()
            .any(|l| l.contains(" POST /token 400 ")),
        "a refresh token was spent twice:\n{}",
        idp.tails()
    );
}

/// A Redis user that may PING but not touch the gateway's keys: not ready, and the log says
/// why (not only "reachable").
#[tokio::test]
async fn a_redis_user_without_access_to_the_keys_is_named_in_the_log() {
    let redis = RedisServer::start().await;
    redis.cmd(&[
        "ACL", "SETUSER", "limited", "on", ">limpw", "~other:*", "+@all",
    ]);
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let upstream = Upstream::start();
    let url = redis.url().replace("redis://", "redis://limited:limpw@");
    let yaml = format!("session: {{ store: redis, redis: {{ url: \"{url}\", timeout: 1s }} }}\n");
    let gw = Gateway::start_unready(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    // A login needs the store: refused, and the reason logged.
    let b = Browser::new();
    let first = b.get(&gw.url("/")).await;
    assert_ne!(first.status, 200, "{}", first.dump());
    eventually("the failed command is logged", || async {
        let log = gw.stderr();
        if log.contains("redis command failed") && log.contains("NoPerm") {
            Ok(())
        } else {
            Err(log)
        }
    })
    .await;
    // And it stays so: the probes between requests fail too (a PING would pass, and turn it
    // ready until the next failing request).
    for _ in 0..10 {
        let r = send("GET", &gw.url("/readyz"), &[], Vec::new()).await;
        assert_eq!(r.status, 503, "{}", r.dump());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The health probe reads its key back as sessions are read (`GETRANGE`): a Redis user allowed
/// to write its keys but not to read them that way is named in the log from the start, before
/// any session request fails.
#[tokio::test]
async fn a_redis_user_that_cannot_read_sessions_back_is_named_in_the_log() {
    let redis = RedisServer::start().await;
    redis.cmd(&[
        "ACL",
        "SETUSER",
        "writer",
        "on",
        ">wpw",
        "~portcullis:*",
        "+@all",
        "-getrange",
    ]);
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let upstream = Upstream::start();
    let url = redis.url().replace("redis://", "redis://writer:wpw@");
    let yaml = format!("session: {{ store: redis, redis: {{ url: \"{url}\", timeout: 1s }} }}\n");
    let gw = Gateway::start_unready(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    eventually("the refused read is logged", || async {
        let log = gw.stderr();
        if log.contains("NoPerm") && log.to_ascii_lowercase().contains("getrange") {
            Ok(())
        } else {
            Err(log)
        }
    })
    .await;
}

/// Cookie store with a coordination Redis: a replica takes no traffic before it has read the
/// sign-outs the others recorded there (else a copy of a signed-out cookie would pass on it).
/// Here Redis answers nothing (stopped) at start-up, and its timeout is long: the provider is
/// ready, the replica is not, for that reason; once Redis answers, it is.
#[tokio::test]
async fn a_replica_is_ready_only_once_it_has_read_the_sign_outs() {
    let redis = RedisServer::start().await;
    redis.signal("STOP");
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let upstream = Upstream::start();
    let yaml = format!(
        "session: {{ store: cookie, coordination: {{ redis_url: \"{}\" }}, redis: {{ timeout: 60s }} }}\n",
        redis.url()
    );
    let gw = Gateway::start_unready(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    readyz_until(&gw, "not ready for want of the sign-outs", |r| {
        r.status == 503 && r.text().contains("sign-outs not read")
    })
    .await;
    redis.signal("CONT");
    readyz_until(&gw, "ready once Redis answers", |r| r.status == 200).await;
}

/// Cookie store with a coordination Redis: signing out on one replica ends the session on
/// the other too, even for a copy of the cookie taken before.
#[tokio::test]
async fn sign_out_with_a_coordination_redis_ends_the_session_on_both_gateways() {
    let s = Replicas::start(Store::Coordinated, &[], None).await;
    for gw in [&s.a, &s.b] {
        assert_eq!(api(gw, "/before", &s.cookie).await.status, 200);
    }
    // A sign-out older than any session's lifetime (7 days by default), left by someone.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let stale_at = now - 30 * 86_400;
    let stale = format!("ms:{}:id:{}", stale_at * 1000, "ab".repeat(16));
    let key = "portcullis:revoked";
    redis_command(&s.redis, &["ZADD", key, &stale_at.to_string(), &stale]);

    let csrf = sign_out_csrf(&s.browser, &s.a).await;
    let out = post_sign_out(&s.browser, &s.a, &csrf).await;
    assert_eq!(out.status, 302, "{}", out.dump());
    await_refused_on_both(&s, "the copied cookie refused").await;

    // The record holds this sign-out, scored in seconds, and no longer the stale one: every
    // replica re-reads the record from a horizon, so it must not grow without end.
    let Reply::Array(Some(items)) =
        redis_command(&s.redis, &["ZRANGE", key, "0", "-1", "WITHSCORES"])
    else {
        panic!("ZRANGE answered no array");
    };
    let items: Vec<String> = items.iter().filter_map(Reply::text).collect();
    assert_eq!(
        items.len(),
        2,
        "one sign-out, the stale one trimmed: {items:?}"
    );
    assert!(
        items[0].starts_with("ms:") && items[0].contains(":id:"),
        "{items:?}"
    );
    let score: u64 = items[1].parse().unwrap_or_default();
    let after = now + 120;
    assert!(
        (now..after).contains(&score),
        "score {score} is not the sign-out's time in seconds ({now})"
    );
}

/// Cookie store with a coordination Redis: a logout recorded by a replica whose clock is a
/// few seconds behind this one's (well within `provider.clock_skew`) still reaches it. The
/// record is scored by the recording replica's clock; a replica that read only its own last
/// second never saw it.
#[tokio::test]
async fn a_logout_recorded_by_a_replica_with_a_slow_clock_is_heard() {
    let redis = RedisServer::start().await;
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::Coordinated, Some(&redis), 60);
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    let cookie = login_cookie(&gw, "alice").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(api(&gw, "/before", &cookie).await.status, 200);
    // The other replica's clock says 3 s ago: after the login, before this replica's "now".
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
        - 3_000;
    let entry = format!("ms:{at_ms}:sub:alice");
    redis_command(
        &redis,
        &[
            "ZADD",
            "portcullis:revoked",
            &(at_ms / 1000).to_string(),
            &entry,
        ],
    );
    refused_eventually("the slow replica's logout", &gw, "/after", &cookie).await;
}

fn redis_command(redis: &RedisServer, args: &[&str]) -> Reply {
    match support::redis::command(redis.port, args) {
        Ok(r @ (Reply::Int(_) | Reply::Array(_))) => r,
        other => panic!("{args:?}: {other:?}"),
    }
}

/// A coordination Redis that is down does not make each replica refresh on its own: with
/// rotating refresh tokens, two replicas spending the same token end the grant. As with a
/// provider that is down: the token is used while it is valid, then 503; once Redis is back,
/// one refresh.
#[tokio::test]
async fn coordination_redis_down_uses_the_token_while_valid_then_503() {
    let mut redis = RedisServer::start().await;
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[AT_TTL_ENV, ROTATE_ENV]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::Coordinated, Some(&redis), 1);
    let mut gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    let cookie = login_cookie(&gw, "alice").await;
    let logged_in = Instant::now();
    let first = upstream.last().bearer();

    redis.kill();
    // The cookie store needs no Redis to serve a session.
    let r = api(&gw, "/x", &cookie).await;
    assert_eq!(bearer_in(&r), first);

    // Due, and Redis down: no refresh anywhere; the old token while it lasts, then 503.
    until_due(logged_in, 1).await;
    let grants = idp.token_requests();
    for r in burst(&[(&gw, 10)], &cookie).await {
        assert!(
            r.status == 503 || bearer_in(&r) == first,
            "neither the old token nor 503: {}",
            r.dump()
        );
    }
    tokio::time::sleep_until((logged_in + Duration::from_secs(AT_TTL + 1)).into()).await;
    let r = api(&gw, "/x", &cookie).await;
    assert_eq!(r.status, 503, "{}", r.dump());
    assert_eq!(
        idp.token_requests(),
        grants,
        "refreshed while Redis was down"
    );

    // Redis is back: one refresh, and the session goes on.
    redis.restart().await;
    let r = eventually("a refresh once Redis is back", || async {
        let r = api(&gw, "/x", &cookie).await;
        if r.status == 200 {
            Ok(r)
        } else {
            Err(r.dump())
        }
    })
    .await;
    assert_ne!(bearer_in(&r), first, "not refreshed");
    assert_eq!(idp.token_requests(), grants + 1, "one refresh");
    gw.assert_healthy().await;
}

#[tokio::test]
async fn backchannel_logout_with_a_sid_spares_the_users_other_sessions() {
    let redis = RedisServer::start().await;
    let gw_port = free_port();
    let bcl = format!("http://127.0.0.1:{gw_port}/oauth2/backchannel_logout");
    let idp = Idp::start_for_gateway(gw_port, &[("IDP_BACKCHANNEL_LOGOUT_URI", &bcl)]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::Coordinated, Some(&redis), 60);
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    // Alice on two devices: two provider sessions (two sids), two gateway sessions.
    let laptop = Browser::new();
    let phone = Browser::new();
    for b in [&laptop, &phone] {
        let r = login(b, &gw, "/", "alice").await;
        assert_eq!(r.status, 200, "{}", r.dump());
    }
    let laptop_cookie = laptop.cookie_header(&gw.url("/"));
    let phone_cookie = phone.cookie_header(&gw.url("/"));

    // She signs out of the provider on the laptop: its logout token names that sid.
    end_provider_session(&laptop, &idp).await;
    assert!(
        idp.stdout().lines().any(|l| l.starts_with("BCL ok")),
        "{}",
        idp.tails()
    );
    refused_eventually("the laptop session ended", &gw, "/x", &laptop_cookie).await;
    // OpenID Connect Back-Channel Logout 1.0 §2.4: only without a sid are all of the
    // subject's sessions logged out. The phone's provider session is still alive.
    let r = api(&gw, "/x", &phone_cookie).await;
    assert_eq!(r.status, 200, "the phone was signed out too: {}", r.dump());
}

/// Sleeps until a wall-clock second has just begun, so that what follows happens within it.
async fn at_the_start_of_a_second() {
    let into = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_millis()
    };
    while into() > 50 {
        tokio::time::sleep(Duration::from_millis(u64::from(1000 - into()).min(200))).await;
    }
}

/// A logout token that names only the user (`backchannel_logout_session_required: false`,
/// oidc-provider's default) ends the sessions they had, and not the one they open right after
/// it, in the same second.
async fn logging_in_again_right_after_a_back_channel_logout(store: Store) {
    let redis = RedisServer::start().await;
    let gw_port = free_port();
    let bcl = format!("http://127.0.0.1:{gw_port}/oauth2/backchannel_logout");
    let idp = Idp::start_for_gateway(
        gw_port,
        &[
            ("IDP_BACKCHANNEL_LOGOUT_URI", &bcl),
            ("IDP_BACKCHANNEL_LOGOUT_SUB_ONLY", "1"),
        ],
    )
    .await;
    let upstream = Upstream::start();
    let yaml = session_yaml(store, Some(&redis), 60);
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    let b = Browser::new();
    let r = login(&b, &gw, "/", "alice").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let old = b.cookie_header(&gw.url("/"));

    at_the_start_of_a_second().await;
    end_provider_session(&b, &idp).await;
    assert!(
        idp.stdout().lines().any(|l| l.starts_with("BCL ok")),
        "{}",
        idp.tails()
    );
    let r = login(&b, &gw, "/", "alice").await;
    assert_eq!(
        r.status,
        200,
        "the new login was ended by the logout before it: {}",
        r.dump()
    );
    let new = b.cookie_header(&gw.url("/"));
    assert_ne!(new, old);
    assert_eq!(api(&gw, "/x", &new).await.status, 200);
    assert_eq!(
        api(&gw, "/x", &old).await.status,
        401,
        "the old session lives"
    );
}

#[tokio::test]
async fn logging_in_again_right_after_a_back_channel_logout_with_the_cookie_store() {
    logging_in_again_right_after_a_back_channel_logout(Store::Coordinated).await;
}

#[tokio::test]
async fn logging_in_again_right_after_a_back_channel_logout_with_the_redis_store() {
    logging_in_again_right_after_a_back_channel_logout(Store::Redis).await;
}

/// `session.idle_timeout`: activity keeps a session alive (recorded by a re-issued cookie, or
/// in Redis), and a session left unused longer than the timeout is over.
async fn idle_timeout_ends_unused_sessions(store: Store) {
    let redis = match store {
        Store::CookieOnly => None,
        _ => Some(RedisServer::start().await),
    };
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let upstream = Upstream::start();
    let mut yaml = session_yaml(store, redis.as_ref(), 1);
    yaml = yaml.replace("session: {", "session: { idle_timeout: 4s,");
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    let mut cookie = login_cookie(&gw, "alice").await;
    // Used every second for longer than the idle timeout: still alive.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        let r = api(&gw, "/api/x", &cookie).await;
        assert_eq!(r.status, 200, "active session ended: {}", r.dump());
        if let Some(sc) = new_session_cookie(&r) {
            cookie = cookie_of(&sc);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Left alone for longer than the timeout: over.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let r = api(&gw, "/api/x", &cookie).await;
    assert_eq!(r.status, 401, "idle session still accepted: {}", r.dump());
    let nav = navigate(&gw, "/page", &cookie).await;
    assert_eq!(nav.status, 302, "browser: {}", nav.dump());
}

/// A request that records activity (idle timeout) while another request of the session
/// refreshes it must not send back its older cookie after the refreshed one: with rotating
/// refresh tokens that cookie holds a spent token, and the session would end at the next
/// refresh.
#[tokio::test]
async fn an_activity_cookie_never_undoes_a_refresh() {
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[AT_TTL_ENV, ROTATE_ENV]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::CookieOnly, None, 1)
        .replace("session: {", "session: { idle_timeout: 10s,");
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    let cookie = login_cookie(&gw, "alice").await;
    let logged_in = Instant::now();

    // Activity is due after a second; the refresh after three. The slow request records
    // the activity, then waits on the upstream while another request refreshes.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let slow = spawn_api(&gw, "/slow", &cookie);
    until_due(logged_in, 1).await;
    let r = api(&gw, "/api/refreshing", &cookie).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let refreshed =
        new_session_cookie(&r).unwrap_or_else(|| panic!("no refreshed cookie: {}", r.dump()));
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 200, "{}", slow.dump());
    assert!(
        new_session_cookie(&slow).is_none(),
        "the slow answer sets an older cookie after the refreshed one: {}",
        slow.dump()
    );
    // The refreshed cookie goes on working across the next refresh.
    let cookie = cookie_of(&refreshed);
    tokio::time::sleep(Duration::from_secs(AT_TTL)).await;
    let r = api(&gw, "/api/later", &cookie).await;
    assert_eq!(r.status, 200, "{}\n{}", r.dump(), gw.tails());
}

#[tokio::test]
async fn idle_timeout_with_the_cookie_store() {
    idle_timeout_ends_unused_sessions(Store::CookieOnly).await;
}

#[tokio::test]
async fn idle_timeout_with_the_redis_store() {
    idle_timeout_ends_unused_sessions(Store::Redis).await;
}

/// `cookie.secrets` rotated replica by replica (a new key first, the old one still listed):
/// what a replica made with its first key still counts on one that rotated — the sign-out
/// form's CSRF token, and the record that a logout token was used.
#[tokio::test]
async fn sign_out_and_logout_tokens_hold_across_a_cookie_key_rotation() {
    let redis = RedisServer::start().await;
    let (pa, pb) = (free_port(), free_port());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bcl = format!(
        "http://127.0.0.1:{}/oauth2/backchannel_logout",
        listener.local_addr().unwrap().port()
    );
    let uris = redirect_uris(&[pa, pb]);
    let idp = Idp::start(&[
        ("IDP_REDIRECT_URIS", &uris),
        ("IDP_BACKCHANNEL_LOGOUT_URI", &bcl),
    ])
    .await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::Coordinated, Some(&redis), 60);
    let a = Gateway::start(gw_opts(pa, &idp, &upstream, &yaml, None)).await;
    let mut rotated = gw_opts(pb, &idp, &upstream, &yaml, None);
    rotated.secrets = vec![key(2), key(1)];
    let b = Gateway::start(rotated).await;
    let relay = Relay::serve(listener, a.url("/oauth2/backchannel_logout"));

    // The sign-out form shown by A, posted to B.
    let alice = Browser::new();
    let r = login(&alice, &a, "/", "alice").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let cookie = alice.cookie_header(&a.url("/"));
    let csrf = sign_out_csrf(&alice, &a).await;
    let out = send(
        "POST",
        &b.url("/oauth2/sign_out"),
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", &b.origin()),
            ("cookie", &cookie),
        ],
        format!("csrf={}", enc(&csrf)),
    )
    .await;
    assert_eq!(out.status, 302, "sign-out refused: {}", out.dump());
    assert_session_cleared(&out, "sign-out on B");
    refused_eventually("the session ended on A too", &a, "/x", &cookie).await;

    // A logout token delivered to A, replayed to B.
    let bob = Browser::new();
    let r = login(&bob, &a, "/", "bob").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    end_provider_session(&bob, &idp).await;
    let tokens = eventually("the provider delivers the back-channel logout", || async {
        let t = relay.bodies();
        if t.is_empty() {
            Err(idp.tails())
        } else {
            Ok(t)
        }
    })
    .await;
    let r = send(
        "POST",
        &b.url("/oauth2/backchannel_logout"),
        &[("content-type", "application/x-www-form-urlencoded")],
        tokens[0].clone(),
    )
    .await;
    assert_eq!(r.status, 400, "replay accepted: {}", r.dump());
}

/// `session.lifetime` shortened (a restart or a reload with a smaller value): sessions older
/// than it are over. The record of sign-outs and back-channel logouts is kept for the current
/// lifetime only, so a signed-out session that outlived it must not come back to life.
#[tokio::test]
async fn a_shortened_lifetime_ends_older_sessions_and_signed_out_ones_stay_ended() {
    let redis = RedisServer::start().await;
    let (pa, pb) = (free_port(), free_port());
    let uris = redirect_uris(&[pa, pb]);
    let idp = Idp::start(&[("IDP_REDIRECT_URIS", &uris)]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::Coordinated, Some(&redis), 60);
    let a = Gateway::start(gw_opts(pa, &idp, &upstream, &yaml, None)).await;
    let b = Browser::new();
    let r = login(&b, &a, "/", "alice").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let copy = b.cookie_header(&a.url("/"));
    let csrf = sign_out_csrf(&b, &a).await;
    let out = post_sign_out(&b, &a, &csrf).await;
    assert_eq!(out.status, 302, "{}", out.dump());
    assert_eq!(api(&a, "/x", &copy).await.status, 401);

    // The same deployment with `session.lifetime: 2s`, once the session is older than that.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let short = yaml.replacen("session: {", "session: { lifetime: 2s,", 1);
    let shortened = Gateway::start(gw_opts(pb, &idp, &upstream, &short, None)).await;
    let r = api(&shortened, "/x", &copy).await;
    assert_eq!(r.status, 401, "a signed-out session is back: {}", r.dump());
}

/// A request with a cookie from before the last refresh reuses that refresh's result (its
/// refresh token is spent) — but once the result's own token has expired too, it is renewed
/// in turn: the upstream never gets an expired bearer.
#[tokio::test]
async fn an_older_cookie_never_forwards_the_expired_token_of_a_reused_refresh() {
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[AT_TTL_ENV, ROTATE_ENV]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::CookieOnly, None, 1);
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    let old = login_cookie(&gw, "alice").await;
    let logged_in = Instant::now();

    until_due(logged_in, 1).await;
    let r = api(&gw, "/first", &old).await;
    let refreshed = bearer_in(&r);
    let refreshed_at = Instant::now();
    assert!(new_session_cookie(&r).is_some(), "{}", r.dump());

    // The refreshed token expires; the old cookie comes again (within the reuse window).
    tokio::time::sleep_until((refreshed_at + Duration::from_secs(AT_TTL + 1)).into()).await;
    let r = api(&gw, "/again", &old).await;
    let bearer = bearer_in(&r);
    assert_ne!(
        bearer, refreshed,
        "the reused result's expired token was forwarded"
    );
    let me = idp.userinfo(&bearer).await;
    assert_eq!(me.status, 200, "a dead token was forwarded: {}", me.dump());
    assert!(new_session_cookie(&r).is_some(), "{}", r.dump());
}

/// The refreshed session cookie rides on the upstream's answer: one the app marked for shared
/// caches (an asset behind the login, `public, max-age=600`) is made private, or a CDN would
/// hand the cookie — the session — to whoever asks for that asset next.
#[tokio::test]
async fn a_refreshed_cookie_never_rides_on_an_answer_shared_caches_may_store() {
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[AT_TTL_ENV]).await;
    let upstream = Upstream::start();
    let yaml = session_yaml(Store::CookieOnly, None, 1);
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &yaml, None)).await;
    let cookie = login_cookie(&gw, "alice").await;
    let logged_in = Instant::now();

    let r = api(&gw, "/cacheable/app.css", &cookie).await;
    assert_eq!(r.header("cache-control"), Some("public, max-age=600"));
    until_due(logged_in, 1).await;
    let r = api(&gw, "/cacheable/app.css", &cookie).await;
    assert!(new_session_cookie(&r).is_some(), "{}", r.dump());
    assert_eq!(
        r.header("cache-control"),
        Some("private, max-age=600"),
        "{}",
        r.dump()
    );
}

/// `/readyz` names every condition not met, not only the first: here both the provider and
/// the Redis store are unreachable.
#[tokio::test]
async fn readyz_names_every_unmet_condition() {
    let dead = |p: u16| format!("127.0.0.1:{p}");
    let upstream = Upstream::start();
    let port = free_port();
    let opts = GatewayOpts {
        port,
        issuer: format!("http://{}", dead(free_port())),
        upstream: upstream.url(),
        client_secret: support::CLIENT_SECRET.to_string(),
        secrets: vec![support::key(1)],
        provider_extra: Vec::new(),
        cookie_extra: Vec::new(),
        extra: format!(
            "session: {{ store: redis, redis: {{ url: \"redis://{}/0\", timeout: 1s }} }}\n",
            dead(free_port())
        ),
        env: Vec::new(),
    };
    let gw = Gateway::start_unready(opts).await;
    readyz_until(&gw, "both reasons named", |r| {
        let t = r.text();
        r.status == 503
            && t.contains("provider not discovered yet")
            && t.contains("redis unreachable")
    })
    .await;
}

/// `rediss://`: the session store over TLS, trusting the private CA named in `tls.ca_file`
/// (besides the system's roots). Without it the server's certificate is refused: no session
/// can be stored, and the log says why.
#[tokio::test]
async fn the_redis_store_over_tls_trusts_the_tls_ca_file() {
    let pki = support::pki::Pki::new();
    let (cert, key) = pki.issue("redis", "redis");
    let redis = RedisServer::start_tls(&cert, &key).await;
    let store = format!(
        "session: {{ store: redis, redis: {{ url: \"{}\", timeout: 1s }} }}\n",
        redis.tls_url()
    );
    let upstream = Upstream::start();

    // Without the CA.
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let untrusting = Gateway::start_unready(gw_opts(gw_port, &idp, &upstream, &store, None)).await;
    let b = Browser::new();
    let first = support::ops::eventually(EVENTUALLY, "a login redirect", || async {
        let r = b.get(&untrusting.url("/")).await;
        if r.status == 302 {
            Ok(r)
        } else {
            Err(r.dump())
        }
    })
    .await;
    let (auth, _) = auth_redirect(&first);
    let callback = idp_walk(&b, &auth, "alice").await;
    let cb = b.get(&callback).await;
    assert_eq!(cb.status, 503, "{}", cb.dump());
    assert_eq!(
        redis.keys("portcullis:session:*"),
        Vec::<String>::new(),
        "stored"
    );
    let log = untrusting.stderr();
    assert!(log.contains("certificate"), "{log}");
    drop(untrusting);

    // With it.
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let trusting = format!("{store}tls: {{ ca_file: \"{}\" }}\n", pki.ca().display());
    let gw = Gateway::start(gw_opts(gw_port, &idp, &upstream, &trusting, None)).await;
    let b = Browser::new();
    let r = login(&b, &gw, "/", "alice").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(redis.keys("portcullis:session:*").len(), 1);
    let cookie = b.cookie_header(&gw.url("/"));
    let again = api(&gw, "/x", &cookie).await;
    assert_eq!(again.status, 200, "read back over TLS: {}", again.dump());
}
