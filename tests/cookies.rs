//! The sealed session cookie: anything that does not open is "no session" (never
//! a 500), large sessions are chunked, and key rotation keeps old cookies valid.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::*;

/// The gateway cookies of a logged-in browser, as a `Cookie` header value.
fn session_header(b: &Browser, s: &Stack) -> String {
    b.cookie_header(&s.gw.url("/"))
}

/// A cookie that must not count as a session: a browser navigation is sent to the
/// provider and an API call gets 401, both clearing the session cookie (and the
/// listed chunk cookies); nothing reaches the upstream.
/// Returns the API call's response.
async fn assert_rejected(s: &mut Stack, what: &str, cookie: &str, cleared: &[&str]) -> Resp {
    let before = s.upstream.count();
    let nav = navigate(&s.gw, "/private?x=1", cookie).await;
    assert_eq!(nav.status, 302, "{what}: browser: {}", nav.dump());
    assert!(
        nav.location()
            .is_some_and(|l| l.starts_with(&s.idp.url("/auth?"))),
        "{what}: {}",
        nav.dump()
    );
    let api = send(
        "GET",
        &s.gw.url("/private?x=1"),
        &[("accept", "application/json"), ("cookie", cookie)],
        Vec::new(),
    )
    .await;
    assert_eq!(api.status, 401, "{what}: api: {}", api.dump());
    assert_eq!(api.json()["error"], "unauthorized", "{what}");
    // The whole cookie is expired when the request carried it (only what a request carries
    // is cleared: a cross-site request cannot make the browser drop the session).
    let sent_whole = cookie
        .split(';')
        .any(|pair| pair.trim().split('=').next() == Some("_portcullis"));
    let whole = sent_whole.then_some("_portcullis");
    for r in [&nav, &api] {
        for name in whole.iter().chain(cleared) {
            let c = r
                .set_cookie(name)
                .unwrap_or_else(|| panic!("{what}: {name} not cleared: {}", r.dump()));
            assert!(c.is_removal(), "{what}: {}", c.raw);
            assert_eq!(c.path(), Some("/"), "{what}: {}", c.raw);
        }
    }
    assert_eq!(s.upstream.count(), before, "{what}: reached the upstream");
    s.gw.assert_healthy().await;
    api
}

/// Replaces the character at `i` with another base64url character.
fn flip(v: &str, i: usize) -> String {
    let mut b = v.as_bytes().to_vec();
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

#[tokio::test]
async fn unusable_session_cookies_mean_no_session_never_500() {
    let mut s = Stack::start().await;
    let b = s.login("alice").await;
    let good = b.cookie(&s.gw.url("/"), "_portcullis").expect("session");
    // Control: the untouched cookie works.
    let ok = send(
        "GET",
        &s.gw.url("/private"),
        &[
            ("accept", "application/json"),
            ("cookie", &format!("_portcullis={good}")),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.dump());

    let n = good.len();
    let cases: Vec<(&str, String)> = vec![
        (
            "flipped in the middle",
            format!("_portcullis={}", flip(&good, n / 2)),
        ),
        (
            "flipped first char",
            format!("_portcullis={}", flip(&good, 0)),
        ),
        (
            "flipped last char",
            format!("_portcullis={}", flip(&good, n - 1)),
        ),
        ("flipped key id", format!("_portcullis={}", flip(&good, 3))),
        (
            "truncated to half",
            format!("_portcullis={}", &good[..n / 2]),
        ),
        (
            "truncated by one",
            format!("_portcullis={}", &good[..n - 1]),
        ),
        ("truncated to 10", format!("_portcullis={}", &good[..10])),
        ("garbage", "_portcullis=not-a-session!!%$".to_string()),
        (
            "garbage base64",
            format!("_portcullis={}", "QUJD".repeat(40)),
        ),
        ("empty value", "_portcullis=".to_string()),
        ("quoted empty", "_portcullis=\"\"".to_string()),
        ("doubled", format!("_portcullis={good}{good}")),
        ("huge value", format!("_portcullis={}", "A".repeat(40_000))),
    ];
    for (what, cookie) in &cases {
        assert_rejected(&mut s, what, cookie, &[]).await;
    }
}

#[tokio::test]
async fn cookie_values_cannot_be_moved_between_cookies() {
    let mut s = Stack::start().await;
    // A flow cookie's value (sealed with the same key) presented as the session.
    let start = send(
        "GET",
        &s.gw.url("/oauth2/start"),
        &[("accept", BROWSER_ACCEPT)],
        Vec::new(),
    )
    .await;
    let (_, flow) = auth_redirect(&start);
    assert_rejected(
        &mut s,
        "flow cookie value as the session",
        &format!("_portcullis={}", flow.value),
        &[],
    )
    .await;
    // And the other way: a session value presented as a flow cookie at the callback.
    let b = s.login("alice").await;
    let session = b.cookie(&s.gw.url("/"), "_portcullis").unwrap();
    let (auth, flow) = auth_redirect(
        &send(
            "GET",
            &s.gw.url("/oauth2/start"),
            &[("accept", BROWSER_ACCEPT)],
            Vec::new(),
        )
        .await,
    );
    let state = query_param(&auth, "state").unwrap();
    let r = send(
        "GET",
        &s.gw
            .url(&format!("/oauth2/callback?code=x&state={}", enc(&state))),
        &[
            ("accept", BROWSER_ACCEPT),
            ("cookie", &format!("{}={session}", flow.name)),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.dump());
    assert_eq!(
        s.idp.token_requests(),
        1,
        "only the real login exchanged a code"
    );
}

/// A session sealed by another deployment that shares the key and the cookie name (a staging
/// copy of the config, another app on the domain) but not the provider is no session here:
/// its tokens were issued to someone else.
#[tokio::test]
async fn sessions_of_a_deployment_with_another_provider_do_not_open() {
    let a = Stack::start().await;
    let mut b = Stack::start().await;
    let browser = a.login("alice").await;
    let cookie = session_header(&browser, &a);
    let r = support::ops::api_get(&a.gw.url("/data"), &cookie).await;
    assert_eq!(r.status, 200, "at home: {}", r.dump());
    assert_rejected(&mut b, "a session of another provider", &cookie, &[]).await;
}

/// A cookie of the session's name that is not the session — planted by a script on the app's
/// origin under a longer path (browsers send it first, and the gateway's `Path=/` clearing
/// cannot remove it) — does not end the session on the requests it rides on, which sent the
/// browser round the login for good.
#[tokio::test]
async fn a_stray_cookie_of_the_sessions_name_does_not_hide_the_session() {
    let mut s = Stack::start().await;
    let b = s.login("alice").await;
    let real = session_header(&b, &s);
    let before = s.upstream.count();
    for cookie in [
        format!("_portcullis=QUFBQUFB; {real}"),
        format!("{real}; _portcullis=QUFBQUFB"),
    ] {
        let r = navigate(&s.gw, "/c/after", &cookie).await;
        assert_eq!(r.status, 200, "{cookie}: {}", r.dump());
        assert!(r.set_cookies().is_empty(), "{}", r.dump());
    }
    assert_eq!(s.upstream.count(), before + 2);
    assert!(!s.upstream.last().bearer().is_empty());
    // Only strays: no session, as before.
    assert_rejected(
        &mut s,
        "two strays",
        "_portcullis=QUFBQUFB; _portcullis=QkJCQkJC",
        &[],
    )
    .await;
}

/// A cookie of a session that still decrypts but is over (a copy kept after signing out)
/// is passed over like a stray: planted beside a live session, it does not hide it.
#[tokio::test]
async fn a_signed_out_sessions_cookie_beside_the_live_one_does_not_hide_it() {
    let mut s = Stack::start().await;
    let planted = signed_out_copy(&s.gw, "mallory").await;
    let b = s.login("alice").await;
    let real = session_header(&b, &s);
    let before = s.upstream.count();
    for cookie in [format!("{planted}; {real}"), format!("{real}; {planted}")] {
        let r = navigate(&s.gw, "/c/after", &cookie).await;
        assert_eq!(r.status, 200, "{cookie}: {}", r.dump());
        assert!(r.set_cookies().is_empty(), "{}", r.dump());
        assert_eq!(s.upstream.last().header("x-forwarded-user"), Some("alice"));
    }
    assert_eq!(s.upstream.count(), before + 2);
    // Alone, it is no session.
    assert_rejected(&mut s, "a signed-out session", &planted, &[]).await;
}

#[tokio::test]
async fn single_cookie_value_sent_as_a_lone_chunk_is_rejected() {
    let mut s = Stack::start().await;
    let b = s.login("alice").await;
    let good = b.cookie(&s.gw.url("/"), "_portcullis").unwrap();
    assert_rejected(
        &mut s,
        "session value as _portcullis_0",
        &format!("_portcullis_0={good}"),
        &["_portcullis_0"],
    )
    .await;
}

#[tokio::test]
async fn too_many_or_broken_chunks_are_rejected() {
    let mut s = Stack::start().await;
    let hundred: Vec<String> = (0..100)
        .map(|i| format!("_portcullis_{i}=AAAA{i}"))
        .collect();
    let r = assert_rejected(
        &mut s,
        "100 chunk cookies",
        &hundred.join("; "),
        &["_portcullis_0", "_portcullis_31"],
    )
    .await;
    // Deletions are bounded: only names some configuration could have set (at most 32).
    assert!(r.set_cookie("_portcullis_57").is_none(), "{}", r.dump());
    assert!(r.set_cookies().len() <= 33, "{}", r.dump());
    assert_rejected(
        &mut s,
        "gap in the chunks",
        "_portcullis_0=AAAA; _portcullis_2=BBBB",
        &["_portcullis_0", "_portcullis_2"],
    )
    .await;
    assert_rejected(
        &mut s,
        "oversized chunk",
        &format!("_portcullis_0={}; _portcullis_1=AAAA", "A".repeat(5000)),
        &["_portcullis_0", "_portcullis_1"],
    )
    .await;
    // Unrelated cookies that only look similar are left alone (not ours, not cleared).
    let r = send(
        "GET",
        &s.gw.url("/x"),
        &[
            ("accept", "application/json"),
            ("cookie", "_portcullis_x=1; _portcullisy=2"),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.dump());
    assert!(r.set_cookies().is_empty(), "{}", r.dump());
}

#[tokio::test]
async fn oversized_cookie_header_is_refused_without_500() {
    let mut s = Stack::start().await;
    // Over limits.max_header_bytes (64 KiB): refused by the HTTP layer.
    let big = format!("_portcullis={}", "A".repeat(70 * 1024));
    match try_send(
        "GET",
        &s.gw.url("/private"),
        &[("accept", BROWSER_ACCEPT), ("cookie", &big)],
        Vec::new(),
    )
    .await
    {
        Ok(r) => {
            assert_eq!(r.status, 431, "{}", r.dump());
        }
        Err(e) => panic!("the gateway dropped the connection instead of answering: {e}"),
    }
    s.gw.assert_healthy().await;
    // Many cookies adding up to just under the limit: a normal rejection.
    let many: Vec<String> = (0..40)
        .map(|i| format!("app{i}={}", "v".repeat(1000)))
        .collect();
    let cookie = format!("{}; _portcullis=garbage", many.join("; "));
    assert_rejected(&mut s, "many cookies", &cookie, &[]).await;
}

#[tokio::test]
async fn expired_session_is_rejected() {
    let mut s = Stack::with(&[], "session: { lifetime: 2s }").await;
    let b = s.login("alice").await;
    let set = b
        .history()
        .iter()
        .find_map(|r| r.set_cookie("_portcullis"))
        .expect("session set");
    // The session's expiry, counted from when the cookie was written: 2 s, or 1 s when a
    // second boundary passed between creating the session and sealing it.
    assert!(
        matches!(set.attr("max-age"), Some("2" | "1")),
        "{}",
        set.raw
    );
    let cookie = session_header(&b, &s);
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    assert_rejected(&mut s, "expired session", &cookie, &[]).await;
}

/// An app's answer cannot set, replace or clear the gateway's cookies (the session, its
/// chunks, a login flow's); the app's own cookies pass.
#[tokio::test]
async fn the_upstream_cannot_set_the_gateways_cookies() {
    let s = Stack::start().await;
    let b = s.login("alice").await;
    let before = b.cookie(&s.gw.url("/"), "_portcullis").expect("session");
    let lines = [
        "app=1; Path=/",
        "_portcullis=planted; Path=/",
        "_portcullis=; Path=/; Max-Age=0",
        "_portcullis_0=x; Path=/",
        "_portcullis_flow_x=y; Path=/",
    ];
    let query: Vec<String> = lines.iter().map(|l| format!("line={}", enc(l))).collect();
    let r = b
        .get(&s.gw.url(&format!("/set-cookie?{}", query.join("&"))))
        .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(
        r.header_all("set-cookie"),
        ["app=1; Path=/"],
        "{}",
        r.dump()
    );
    assert_eq!(b.cookie(&s.gw.url("/"), "_portcullis"), Some(before));
    let again = b.get(&s.gw.url("/private")).await;
    assert_eq!(again.status, 200, "{}", again.dump());
    assert_eq!(s.upstream.last().header("x-forwarded-user"), Some("alice"));
}

#[tokio::test]
async fn large_tokens_are_chunked_and_reassembled() {
    let mut s = Stack::with(&[("IDP_ACCESS_TOKEN_CHARS", "6000")], "").await;
    let b = Browser::new();
    let page = login(&b, &s.gw, "/big", "alice").await;
    assert_eq!(page.status, 200, "{}", page.dump());

    let cb = b
        .history()
        .into_iter()
        .find(|r| r.url.contains("/oauth2/callback?"))
        .expect("callback response");
    let sets = cb.set_cookies();
    assert!(cb.set_cookie("_portcullis").is_none(), "{}", cb.dump());
    let chunks: Vec<&SetCookie> = sets
        .iter()
        .filter(|c| c.name.starts_with("_portcullis_") && !c.name.starts_with("_portcullis_flow_"))
        .collect();
    assert!(chunks.len() >= 2, "{}", cb.dump());
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.name, format!("_portcullis_{i}"), "chunks in order");
        assert!(!c.is_removal() && !c.value.is_empty(), "{}", c.raw);
        assert!(
            c.value.len() <= 3800,
            "chunk {i} is {} bytes",
            c.value.len()
        );
        assert!(c.raw.len() < 4096, "Set-Cookie line over 4096 bytes");
        assert_eq!(c.path(), Some("/"));
    }
    let names = b.cookie_names(&s.gw.url("/"));
    assert!(names.contains(&"_portcullis_0".to_string()), "{names:?}");
    assert!(names.contains(&"_portcullis_1".to_string()), "{names:?}");
    assert!(!names.contains(&"_portcullis".to_string()), "{names:?}");

    // The upstream gets the whole 6000-character token, and it is the real one.
    let rec = s.upstream.last();
    let token = rec
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .expect("bearer")
        .to_string();
    assert_eq!(token.len(), 6000);
    assert!(
        rec.header("cookie").is_none(),
        "chunks leaked upstream: {rec:?}"
    );
    let me = s.idp.userinfo(&token).await;
    assert_eq!(me.status, 200, "{}", me.dump());

    // Reloads keep working without the provider.
    let idp_before = s.idp.request_count();
    let again = b.get(&s.gw.url("/big?again")).await;
    assert_eq!(again.status, 200, "{}", again.dump());
    assert_eq!(s.idp.request_count(), idp_before);
    assert_eq!(
        s.upstream.last().header("authorization").unwrap().len(),
        7 + 6000
    );

    // A stray chunk cookie (planted under a longer path, which browsers send first, or past
    // the last chunk) does not hide the session.
    let real = session_header(&b, &s);
    let n = chunks.len();
    for stray in [
        "_portcullis_0=QUFBQUFB".to_string(),
        format!("_portcullis_{n}=QUFBQUFB"),
    ] {
        let r = send(
            "GET",
            &s.gw.url("/big?stray"),
            &[
                ("accept", "application/json"),
                ("cookie", &format!("{stray}; {real}")),
            ],
            Vec::new(),
        )
        .await;
        assert_eq!(r.status, 200, "{stray}: {}", r.dump());
        assert!(r.set_cookies().is_empty(), "{stray}: {}", r.dump());
    }

    // A missing or reordered chunk is no session.
    let all: Vec<(String, String)> = chunks
        .iter()
        .map(|c| (c.name.clone(), c.value.clone()))
        .collect();
    let without_last: Vec<String> = all[..all.len() - 1]
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    assert_rejected(
        &mut s,
        "last chunk missing",
        &without_last.join("; "),
        &["_portcullis_0"],
    )
    .await;
    let swapped = format!(
        "_portcullis_0={}; _portcullis_1={}{}",
        all[1].1,
        all[0].1,
        all[2..]
            .iter()
            .map(|(n, v)| format!("; {n}={v}"))
            .collect::<String>()
    );
    assert_rejected(
        &mut s,
        "chunks swapped",
        &swapped,
        &["_portcullis_0", "_portcullis_1"],
    )
    .await;
}

#[tokio::test]
async fn key_rotation_old_cookies_open_with_a_second_key() {
    let port = free_port();
    let idp = Idp::start_for_gateway(port, &[]).await;
    let upstream = Upstream::start();
    let (k1, k2) = (key(1), key(2));
    let opts = |secrets: Vec<String>| GatewayOpts {
        secrets,
        ..GatewayOpts::new(port, &idp, &upstream.url())
    };
    let api = |cookie: String, gw: String| async move {
        send(
            "GET",
            &format!("{gw}/data"),
            &[("accept", "application/json"), ("cookie", &cookie)],
            Vec::new(),
        )
        .await
    };

    // Gateway A seals with k1.
    let gw_a = Gateway::start(opts(vec![k1.clone()])).await;
    let old_cookie = login_cookie(&gw_a, "alice").await;
    assert!(old_cookie.starts_with("_portcullis="), "{old_cookie}");
    let origin = gw_a.origin();
    drop(gw_a);

    // Gateway B: [k2, k1]. The old cookie still opens; new logins are sealed with k2.
    let gw_b = Gateway::start(opts(vec![k2.clone(), k1.clone()])).await;
    let r = api(old_cookie.clone(), origin.clone()).await;
    assert_eq!(r.status, 200, "old cookie after rotation: {}", r.dump());
    assert!(r.set_cookies().is_empty(), "{}", r.dump());
    assert_eq!(upstream.last().header("x-forwarded-user"), Some("alice"));
    let new_cookie = login_cookie(&gw_b, "bob").await;
    drop(gw_b);

    // Gateway C: [k2] only. The k1 cookie is gone, the k2 one works.
    let gw_c = Gateway::start(opts(vec![k2.clone()])).await;
    let r = api(new_cookie.clone(), origin.clone()).await;
    assert_eq!(r.status, 200, "k2 cookie: {}", r.dump());
    assert_eq!(upstream.last().header("x-forwarded-user"), Some("bob"));
    let r = api(old_cookie.clone(), origin.clone()).await;
    assert_eq!(
        r.status,
        401,
        "k1 cookie after k1 was retired: {}",
        r.dump()
    );
    assert!(r.set_cookie("_portcullis").is_some_and(|c| c.is_removal()));
    let nav = navigate(&gw_c, "/data", &old_cookie).await;
    assert_eq!(nav.status, 302, "{}", nav.dump());
    assert!(nav
        .set_cookie("_portcullis")
        .is_some_and(|c| c.is_removal()));
    drop(gw_c);

    // And a gateway with only k1 does not accept what k2 sealed: the first key seals.
    let gw_d = Gateway::start(opts(vec![k1])).await;
    let r = api(new_cookie, origin).await;
    assert_eq!(
        r.status,
        401,
        "k2 cookie on a k1-only gateway: {}",
        r.dump()
    );
    drop(gw_d);
}
