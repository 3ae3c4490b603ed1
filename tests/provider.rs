//! The gateway and its OpenID provider, against the real test provider: the token
//! endpoint's client authentication method (and the one-time fallback to
//! `client_secret_post`), which a sign-out's token revocation uses too, a JWKS re-fetch
//! when the provider's signing key changes, discovery retried until the provider exists, a
//! provider that issues no refresh token (a sign-out revokes the access token), and a
//! discovery document whose issuer does not match the configuration.
//!
//! Waits are polls with deadlines. The one deliberate wait is the gateway's JWKS
//! re-fetch rate limit (at most once per 10 s): the test waits it out instead of
//! asserting how long anything took.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};
use support::*;

/// How long eventual effects (discovery after the provider appears, expiry) may take.
const EVENTUALLY: Duration = Duration::from_secs(40);
/// An unknown `kid` forces a JWKS re-fetch at most this often (the start-up fetch does not
/// count).
const JWKS_MIN_INTERVAL: Duration = Duration::from_secs(10);

/// The statuses of the IdP's answers to `POST <path>`, in order (its log lines read
/// `REQ <n> <time> POST <path> <status> <ms>ms`).
fn statuses(idp: &Idp, path: &str) -> Vec<u16> {
    let needle = format!(" POST {path} ");
    idp.requests()
        .iter()
        .filter(|l| l.contains(&needle))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(5)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("unparsable REQ line: {l}"))
        })
        .collect()
}

/// The token endpoint's answers.
fn token_statuses(idp: &Idp) -> Vec<u16> {
    statuses(idp, "/token")
}

/// The revocation endpoint's answers (RFC 7009).
fn revocation_statuses(idp: &Idp) -> Vec<u16> {
    statuses(idp, "/token/revocation")
}

/// Polls until the IdP has served revocations with these statuses (a sign-out revokes in
/// the background).
async fn await_revocations(idp: &Idp, want: &[u16]) {
    let deadline = Instant::now() + EVENTUALLY;
    while revocation_statuses(idp) != want {
        assert!(
            Instant::now() < deadline,
            "revocations {:?}, want {want:?}\n{}",
            revocation_statuses(idp),
            idp.tails()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts that `resp` is a proper error page of the gateway: one of `statuses` (never a
/// 500), HTML, no session cookie.
fn assert_error_page(resp: &Resp, statuses: &[u16], what: &str) {
    assert!(
        statuses.contains(&resp.status.as_u16()),
        "{what}: expected one of {statuses:?}: {}",
        resp.dump()
    );
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("text/html")),
        "{what}: not an HTML page: {}",
        resp.dump()
    );
    assert_no_session_set(resp);
}

/// One login with a fresh browser as far as the gateway's callback: GET `/` (302 to the
/// provider), the provider's forms, then the callback. Returns the browser and the
/// callback's response, whatever it is.
async fn login_attempt(gw: &Gateway, user: &str) -> (Browser, Resp) {
    let b = Browser::new();
    let first = b.get(&gw.url("/")).await;
    let (auth, _) = auth_redirect(&first);
    let callback = idp_walk(&b, &auth, user).await;
    assert!(
        callback.starts_with(&gw.url("/oauth2/callback?")),
        "IdP did not return to the gateway callback: {callback}"
    );
    let cb = b.get(&callback).await;
    (b, cb)
}

/// Completes a login whose callback succeeded: the session cookie is set and `/` is
/// served by the upstream.
async fn assert_logged_in(gw: &Gateway, b: &Browser, cb: &Resp) {
    assert_eq!(cb.status, 302, "callback failed: {}", cb.dump());
    assert_eq!(cb.location(), Some("/"), "{}", cb.dump());
    assert!(
        cb.set_cookie("_portcullis")
            .is_some_and(|c| !c.is_removal()),
        "no session cookie: {}",
        cb.dump()
    );
    let page = b.get(&gw.url("/")).await;
    assert_eq!(page.status, 200, "{}", page.dump());
    assert_eq!(page.header("x-upstream"), Some("echo"), "{}", page.dump());
}

/// A gateway in front of a fresh IdP (`idp_env`) with extra `provider:` lines and extra
/// top-level YAML.
async fn stack(idp_env: &[(&str, &str)], provider_extra: &[&str], extra: &str) -> Stack {
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, idp_env).await;
    let upstream = Upstream::start();
    let gw = Gateway::start(GatewayOpts {
        provider_extra: provider_extra.iter().map(|s| s.to_string()).collect(),
        extra: extra.to_string(),
        ..GatewayOpts::new(gw_port, &idp, &upstream.url())
    })
    .await;
    Stack { gw, upstream, idp }
}

/// The IdP holds its client to the registered method (oidc-provider would otherwise
/// accept basic and post alike).
const IDP_STRICT: (&str, &str) = ("IDP_STRICT_CLIENT_AUTH", "1");
/// The IdP's client is registered for `client_secret_post`.
const IDP_POST: (&str, &str) = ("IDP_CLIENT_AUTH_METHOD", "client_secret_post");
const GW_POST: &str = "token_auth_method: client_secret_post";

// ---------------------------------------------------------------------------------------
// 1. Token endpoint client authentication
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn auto_auth_method_falls_back_to_post_once_on_invalid_client() {
    // Discovery lists client_secret_basic too, so `auto` tries basic first.
    let s = stack(&[IDP_POST, IDP_STRICT], &[], "").await;
    let (b, cb) = login_attempt(&s.gw, "alice").await;
    assert_logged_in(&s.gw, &b, &cb).await;
    assert_eq!(
        token_statuses(&s.idp),
        vec![401, 200],
        "basic refused (invalid_client), then the same code exchanged with post\n{}",
        s.idp.tails()
    );

    // Learned: the next login goes straight to post.
    let (b, cb) = login_attempt(&s.gw, "bob").await;
    assert_logged_in(&s.gw, &b, &cb).await;
    assert_eq!(
        token_statuses(&s.idp),
        vec![401, 200, 200],
        "the second login must use post at once\n{}",
        s.idp.tails()
    );
    let rec = s.upstream.last();
    assert_eq!(rec.header("x-forwarded-user"), Some("bob"));
}

#[tokio::test]
async fn configured_post_auth_method_logs_in() {
    let s = stack(&[IDP_POST, IDP_STRICT], &[GW_POST], "").await;
    let (b, cb) = login_attempt(&s.gw, "alice").await;
    assert_logged_in(&s.gw, &b, &cb).await;
    assert_eq!(
        token_statuses(&s.idp),
        vec![200],
        "one code exchange, with post\n{}",
        s.idp.tails()
    );
    assert_eq!(s.upstream.last().header("x-forwarded-user"), Some("alice"));
}

#[tokio::test]
async fn configured_post_against_a_basic_client_fails_cleanly() {
    // The IdP's client is registered for client_secret_basic (its default), strictly.
    let mut s = stack(&[IDP_STRICT], &[GW_POST], "").await;
    let (b, cb) = login_attempt(&s.gw, "alice").await;
    assert_error_page(&cb, &[400, 502], "callback with the wrong auth method");
    assert!(
        cb.text().contains("Sign-in failed"),
        "the page says what happened: {}",
        cb.dump()
    );
    // A configured method is not second-guessed: no fallback to basic.
    assert_eq!(
        token_statuses(&s.idp),
        vec![401],
        "one refused code exchange\n{}",
        s.idp.tails()
    );
    assert!(
        b.cookie(&s.gw.url("/"), "_portcullis").is_none(),
        "{:?}",
        b.cookie_names(&s.gw.url("/"))
    );
    // Still no session: the next navigation starts a new login.
    let again = b.get(&s.gw.url("/")).await;
    auth_redirect(&again);
    assert_eq!(s.upstream.count(), 0, "nothing reached the upstream");
    s.gw.assert_healthy().await;
}

/// A sign-out's revocation authenticates the client as the token endpoint does. A gateway
/// that has not learnt `client_secret_post` (a new process: the code was exchanged by
/// another) tries Basic, is refused with `invalid_client`, and revokes with post.
#[tokio::test]
async fn sign_out_revocation_authenticates_as_the_token_endpoint_does() {
    let s = stack(&[IDP_POST, IDP_STRICT], &[], "").await;
    let (b, cb) = login_attempt(&s.gw, "alice").await;
    assert_logged_in(&s.gw, &b, &cb).await;
    assert_eq!(token_statuses(&s.idp), vec![401, 200]);
    let token = s.upstream.last().bearer();
    assert_eq!(s.idp.userinfo(&token).await.status, 200);

    // The session signs out at a new gateway process with the same cookie keys.
    let other = Gateway::start(GatewayOpts::new(free_port(), &s.idp, &s.upstream.url())).await;
    let at_other = |b: &Browser| {
        let value = b.cookie(&s.gw.url("/"), "_portcullis").expect("session");
        let moved = Browser::new();
        moved.put_cookie(&other.url("/"), "_portcullis", &value, "/");
        moved
    };
    let b = at_other(&b);
    let csrf = sign_out_csrf(&b, &other).await;
    let out = post_sign_out(&b, &other, &csrf).await;
    assert_eq!(out.status, 302, "{}", out.dump());
    await_revocations(&s.idp, &[401, 200]).await;
    // Revoking the refresh token ended the grant, its access token with it.
    assert_eq!(s.idp.userinfo(&token).await.status, 401);

    // Learnt: the next sign-out there revokes with post at once.
    let (b, cb) = login_attempt(&s.gw, "bob").await;
    assert_logged_in(&s.gw, &b, &cb).await;
    let b = at_other(&b);
    let csrf = sign_out_csrf(&b, &other).await;
    assert_eq!(post_sign_out(&b, &other, &csrf).await.status, 302);
    await_revocations(&s.idp, &[401, 200, 200]).await;
    // Configured post: post from the start.
    let s = stack(&[IDP_POST, IDP_STRICT], &[GW_POST], "").await;
    let (b, cb) = login_attempt(&s.gw, "carol").await;
    assert_logged_in(&s.gw, &b, &cb).await;
    let csrf = sign_out_csrf(&b, &s.gw).await;
    assert_eq!(post_sign_out(&b, &s.gw, &csrf).await.status, 302);
    await_revocations(&s.idp, &[200]).await;
}

// ---------------------------------------------------------------------------------------
// 2. JWKS re-fetch on an unknown kid
// ---------------------------------------------------------------------------------------

fn jwks_fetches(idp: &Idp) -> usize {
    idp.requests()
        .iter()
        .filter(|l| l.contains(" GET /jwks "))
        .count()
}

/// A gateway (with extra `provider:` lines) in front of an IdP started with `idp_env`, alice
/// signed in through it.
struct KeyStack {
    idp_env: Vec<(String, String)>,
    idp: Idp,
    upstream: Upstream,
    gw: Gateway,
}

impl KeyStack {
    async fn start(idp_env: &[(&str, &str)], provider_extra: &[&str]) -> Self {
        let gw_port = free_port();
        let redirect = format!("http://127.0.0.1:{gw_port}/oauth2/callback");
        let idp_env: Vec<(String, String)> = [("IDP_REDIRECT_URIS", redirect.as_str())]
            .iter()
            .chain(idp_env)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let idp = Idp::start(&pairs(&idp_env)).await;
        let upstream = Upstream::start();
        let gw = Gateway::start(GatewayOpts {
            provider_extra: provider_extra.iter().map(|s| s.to_string()).collect(),
            ..GatewayOpts::new(gw_port, &idp, &upstream.url())
        })
        .await;
        let (b, cb) = login_attempt(&gw, "alice").await;
        assert_logged_in(&gw, &b, &cb).await;
        Self {
            idp_env,
            idp,
            upstream,
            gw,
        }
    }

    /// A fresh provider on the same port and settings: a new signing key.
    async fn restart_idp(&mut self) {
        self.idp.restart(&pairs(&self.idp_env)).await;
    }
}

fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[tokio::test]
async fn new_signing_key_is_fetched_at_once_then_rate_limited() {
    let mut s = KeyStack::start(&[], &[]).await;

    // A fresh provider on the same port (new signing key, new kid), a moment after the
    // gateway fetched the old keys at start-up. That fetch does not count against the rate
    // limit: the first unknown kid re-fetches the JWKS at once and the login succeeds.
    s.restart_idp().await;
    let before_refetch = Instant::now();
    let (b, cb) = login_attempt(&s.gw, "alice").await;
    let after_refetch = Instant::now();
    assert_logged_in(&s.gw, &b, &cb).await;
    assert_eq!(
        jwks_fetches(&s.idp),
        1,
        "one JWKS fetch for the new key\n{}",
        s.idp.tails()
    );

    // The key changes again right away. Within 10 s of that forced re-fetch no other is
    // allowed (a flood of unknown kids costs the provider one fetch per 10 s), so the
    // callback fails — but only a callback answered before `before_refetch + 10 s` is surely
    // inside that window.
    s.restart_idp().await;
    let (_, early) = login_attempt(&s.gw, "bob").await;
    if Instant::now() < before_refetch + JWKS_MIN_INTERVAL {
        assert_error_page(
            &early,
            &[400, 502],
            "login with an unknown kid, rate-limited",
        );
        assert!(
            early.text().contains("ID token"),
            "the page names the ID token: {}",
            early.dump()
        );
        assert_eq!(
            jwks_fetches(&s.idp),
            0,
            "no JWKS fetch within the rate limit\n{}",
            s.idp.tails()
        );
    } else {
        eprintln!(
            "note: the early login finished outside the rate-limit window; its outcome ({}) \
             is not checked",
            early.status
        );
    }

    // Once 10 s have passed since the forced re-fetch, an unknown kid re-fetches again.
    tokio::time::sleep_until((after_refetch + JWKS_MIN_INTERVAL).into()).await;
    let deadline = Instant::now() + EVENTUALLY;
    let (b, cb) = loop {
        let (b, cb) = login_attempt(&s.gw, "bob").await;
        if cb.status == 302 {
            break (b, cb);
        }
        assert_error_page(&cb, &[400, 502], "login with an unknown kid");
        assert!(
            Instant::now() < deadline,
            "no login succeeded with the new key: {}\n{}\n{}",
            cb.dump(),
            s.gw.tails(),
            s.idp.tails()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_logged_in(&s.gw, &b, &cb).await;
    assert_eq!(s.upstream.last().header("x-forwarded-user"), Some("bob"));
    assert!(
        jwks_fetches(&s.idp) >= 1,
        "the gateway fetched the new provider's JWKS\n{}",
        s.idp.tails()
    );
}

/// A provider that replaces its signing key under the same `kid`: the ID token's signature
/// does not verify with the key the gateway holds, so the JWKS is re-fetched at once, rather
/// than every login failing until a restart.
#[tokio::test]
async fn a_key_replaced_under_the_same_kid_is_fetched_at_once() {
    let mut s = KeyStack::start(&[("IDP_SIGNING_KID", "the-signing-key")], &[]).await;

    s.restart_idp().await;
    let (b, cb) = login_attempt(&s.gw, "bob").await;
    assert_logged_in(&s.gw, &b, &cb).await;
    assert_eq!(s.upstream.last().header("x-forwarded-user"), Some("bob"));
    assert_eq!(
        jwks_fetches(&s.idp),
        1,
        "one JWKS fetch for the replaced key\n{}",
        s.gw.tails()
    );
}

/// The keys are fetched again every `provider.jwks_refresh_interval` with no token asking
/// for it, so a key the provider removed stops being trusted without a restart.
#[tokio::test]
async fn the_keys_are_fetched_again_every_refresh_interval() {
    let mut s = KeyStack::start(&[], &["jwks_refresh_interval: 1s"]).await;

    // A new provider (a new key under a new kid), and no login to name it.
    s.restart_idp().await;
    let deadline = Instant::now() + EVENTUALLY;
    while jwks_fetches(&s.idp) < 2 {
        assert!(
            Instant::now() < deadline,
            "the JWKS was not fetched again on its own\n{}\n{}",
            s.gw.tails(),
            s.idp.tails()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (b, cb) = login_attempt(&s.gw, "bob").await;
    assert_logged_in(&s.gw, &b, &cb).await;
}

/// Anyone can post a logout token naming an unknown `kid`: that costs the provider a JWKS
/// fetch now and then, but not the re-fetch a login needs when the provider's signing key
/// changes (logins and logout tokens have budgets of their own).
#[tokio::test]
async fn logout_tokens_with_unknown_keys_do_not_hold_up_a_new_signing_key() {
    let redis = support::redis::RedisServer::start().await;
    let gw_port = free_port();
    let redirect = format!("http://127.0.0.1:{gw_port}/oauth2/callback");
    let env = [("IDP_REDIRECT_URIS", redirect.as_str())];
    let mut idp = Idp::start(&env).await;
    let upstream = Upstream::start();
    let mut opts = GatewayOpts::new(gw_port, &idp, &upstream.url());
    opts.extra = format!(
        "session: {{ coordination: {{ redis_url: \"{}\" }} }}\n",
        redis.url()
    );
    let gw = Gateway::start(opts).await;

    let b64 = |v: serde_json::Value| {
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            v.to_string(),
        )
    };
    let forged = format!(
        "{}.{}.{}",
        b64(serde_json::json!({"alg": "RS256", "kid": "nobody-has-this-key"})),
        b64(serde_json::json!({"iss": idp.issuer(), "aud": "x", "iat": 0})),
        "c2ln"
    );
    let r = send(
        "POST",
        &gw.url("/oauth2/backchannel_logout"),
        &[("content-type", "application/x-www-form-urlencoded")],
        format!("logout_token={forged}").into_bytes(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.dump());

    // The provider's key changes right after: the next login fetches it at once.
    idp.restart(&env).await;
    let (b, cb) = login_attempt(&gw, "alice").await;
    assert_logged_in(&gw, &b, &cb).await;
}

// ---------------------------------------------------------------------------------------
// 3. Discovery retried until the provider exists
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn discovery_is_retried_until_the_provider_appears() {
    let gw_port = free_port();
    let idp_port = free_port();
    let upstream = Upstream::start();
    let opts = GatewayOpts {
        port: gw_port,
        issuer: format!("http://127.0.0.1:{idp_port}"),
        upstream: upstream.url(),
        client_secret: CLIENT_SECRET.to_string(),
        secrets: vec![key(1)],
        provider_extra: Vec::new(),
        cookie_extra: Vec::new(),
        extra: String::new(),
        env: Vec::new(),
    };
    let mut gw = Gateway::start_unready(opts).await;

    // The gateway tried (and failed) at least once.
    let deadline = Instant::now() + EVENTUALLY;
    while !gw.stderr().contains("provider discovery failed") {
        assert!(
            Instant::now() < deadline,
            "no failed discovery logged\n{}",
            gw.tails()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = send("GET", &gw.url("/readyz"), &[], Vec::new()).await;
    assert_eq!(r.status, 503, "{}", r.dump());
    gw.assert_healthy().await;
    let b = Browser::new();
    let nav = b.get(&gw.url("/app")).await;
    assert_eq!(nav.status, 503, "no provider, no login: {}", nav.dump());
    assert!(
        nav.header("content-type")
            .is_some_and(|c| c.starts_with("text/html")),
        "{}",
        nav.dump()
    );
    assert!(
        nav.header("retry-after").is_some(),
        "503 says when to retry: {}",
        nav.dump()
    );
    assert_no_session_set(&nav);
    assert!(
        !nav.set_cookies()
            .iter()
            .any(|c| c.name.starts_with("_portcullis_flow_") && !c.is_removal()),
        "no login flow was started: {}",
        nav.dump()
    );
    assert_eq!(upstream.count(), 0);

    // The provider appears on the configured port: the gateway becomes ready on its own.
    let redirect = format!("http://127.0.0.1:{gw_port}/oauth2/callback");
    let idp = Idp::start_on(idp_port, &[("IDP_REDIRECT_URIS", redirect.as_str())]).await;
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let r = send("GET", &gw.url("/readyz"), &[], Vec::new()).await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.dump());
        assert!(
            Instant::now() < deadline,
            "gateway not ready after the provider appeared: {}\n{}\n{}",
            r.dump(),
            gw.tails(),
            idp.tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (b, cb) = login_attempt(&gw, "alice").await;
    assert_logged_in(&gw, &b, &cb).await;
    assert_eq!(upstream.last().header("x-forwarded-user"), Some("alice"));
}

// ---------------------------------------------------------------------------------------
// 4. A provider that issues no refresh token
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn without_a_refresh_token_the_session_ends_when_the_access_token_expires() {
    let s = stack(
        &[("IDP_ACCESS_TOKEN_TTL", "3"), ("IDP_NO_REFRESH_TOKEN", "1")],
        &[],
        "session: { refresh_before: 1s }",
    )
    .await;
    let cookie = login_cookie(&s.gw, "alice").await;
    assert_eq!(token_statuses(&s.idp), vec![200], "the code exchange");

    // While the token is valid (also once it is due, as nothing can renew it) requests
    // are served with it and the provider is not asked for anything.
    let api = |path: &'static str| {
        let cookie = cookie.clone();
        let url = s.gw.url(path);
        async move {
            send(
                "GET",
                &url,
                &[("accept", "application/json"), ("cookie", cookie.as_str())],
                Vec::new(),
            )
            .await
        }
    };
    let deadline = Instant::now() + EVENTUALLY;
    let mut served = 0;
    let expired = loop {
        let r = api("/api/data").await;
        if r.status != 200 {
            break r;
        }
        served += 1;
        assert!(
            r.set_cookie("_portcullis").is_none(),
            "no new session without a refresh: {}",
            r.dump()
        );
        assert_eq!(
            token_statuses(&s.idp),
            vec![200],
            "no refresh attempted\n{}",
            s.idp.tails()
        );
        assert!(
            Instant::now() < deadline,
            "the access token never expired\n{}",
            s.gw.tails()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("served {served} API requests before the token expired");

    // Expired: the session is over. API calls get 401 JSON, browsers go to the provider.
    assert_eq!(expired.status, 401, "{}", expired.dump());
    assert!(
        expired
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{}",
        expired.dump()
    );
    assert_eq!(
        expired.json()["error"],
        "unauthorized",
        "{}",
        expired.dump()
    );
    let cleared = expired
        .set_cookie("_portcullis")
        .unwrap_or_else(|| panic!("session cookie not cleared: {}", expired.dump()));
    assert!(cleared.is_removal(), "{}", cleared.raw);
    // userinfo agrees: the session is over, not logged in.
    let me = api("/oauth2/userinfo").await;
    assert_eq!(me.status, 401, "userinfo: {}", me.dump());
    assert_eq!(me.json()["error"], "unauthorized", "{}", me.dump());
    assert!(
        me.set_cookie("_portcullis").is_some_and(|c| c.is_removal()),
        "userinfo clears the session cookie: {}",
        me.dump()
    );
    let nav = send(
        "GET",
        &s.gw.url("/page"),
        &[("accept", BROWSER_ACCEPT), ("cookie", cookie.as_str())],
        Vec::new(),
    )
    .await;
    assert_eq!(nav.status, 302, "{}", nav.dump());
    assert!(
        nav.location()
            .is_some_and(|l| l.starts_with(&s.idp.url("/auth?"))),
        "{}",
        nav.dump()
    );
    assert_eq!(
        token_statuses(&s.idp),
        vec![200],
        "no refresh was ever attempted\n{}",
        s.idp.tails()
    );
}

/// Without a refresh token, a sign-out revokes the access token (`token_type_hint`
/// `access_token`): it stops working at the provider at once.
#[tokio::test]
async fn without_a_refresh_token_sign_out_revokes_the_access_token() {
    let s = stack(&[("IDP_NO_REFRESH_TOKEN", "1")], &[], "").await;
    let b = s.login("alice").await;
    let token = s.upstream.last().bearer();
    assert_eq!(s.idp.userinfo(&token).await.status, 200);
    let csrf = sign_out_csrf(&b, &s.gw).await;
    assert_eq!(post_sign_out(&b, &s.gw, &csrf).await.status, 302);
    await_revocations(&s.idp, &[200]).await;
    assert_eq!(s.idp.userinfo(&token).await.status, 401);
}

// ---------------------------------------------------------------------------------------
// 5. Discovery issuer mismatch
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn issuer_mismatch_keeps_the_gateway_unready_and_says_why() {
    let gw_port = free_port();
    // The IdP calls itself http://127.0.0.1:<p>; the gateway is configured with a slash.
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let upstream = Upstream::start();
    let configured = format!("{}/", idp.issuer());
    let mut gw = Gateway::start_unready(GatewayOpts {
        issuer: configured.clone(),
        ..GatewayOpts::new(gw_port, &idp, &upstream.url())
    })
    .await;

    // Several discovery attempts (with backoff), each refused for the mismatch.
    let deadline = Instant::now() + EVENTUALLY;
    let mismatches = |gw: &Gateway| {
        gw.stderr()
            .lines()
            .filter(|l| l.contains("differs from provider.issuer_url"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    while mismatches(&gw).len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the mismatch was not logged three times\n{}",
            gw.tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = mismatches(&gw)[0].clone();
    assert!(
        line.contains(&format!("`{}`", idp.issuer())) && line.contains(&format!("`{configured}`")),
        "the log names both issuers: {line}"
    );
    assert!(
        idp.requests()
            .iter()
            .any(|l| l.contains(" GET /.well-known/openid-configuration 200 ")),
        "the discovery document was served\n{}",
        idp.tails()
    );

    let r = send("GET", &gw.url("/readyz"), &[], Vec::new()).await;
    assert_eq!(r.status, 503, "{}", r.dump());
    assert!(r.text().contains("provider"), "{}", r.dump());
    gw.assert_healthy().await;
    let nav = Browser::new().get(&gw.url("/")).await;
    assert_eq!(nav.status, 503, "{}", nav.dump());
    assert_no_session_set(&nav);
    assert_eq!(upstream.count(), 0);
}
