//! The OpenID Connect login flow end to end, against the real test provider:
//! login round trip, state/code replay defences, provider errors, redirects
//! after login, parallel logins, sign-out and userinfo.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use sha2::{Digest, Sha256};
use support::*;

/// The JSON payload of a JWT (no signature check: the IdP checks it).
fn jwt_payload(jwt: &str) -> serde_json::Value {
    use base64::Engine;
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "not a JWS compact token: {jwt}");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts[1])
        .expect("JWT payload base64");
    serde_json::from_slice(&bytes).expect("JWT payload JSON")
}

#[tokio::test]
async fn login_round_trip_delivers_the_bearer_to_the_upstream() {
    let s = Stack::start().await;
    let b = Browser::new();

    // 1. Unauthenticated navigation: 302 to the provider with a flow cookie.
    let first = b.get(&s.gw.url("/app/page?q=1&r=%2F")).await;
    let (auth, flow) = auth_redirect(&first);
    assert!(
        auth.starts_with(&s.idp.url("/auth?")),
        "not the provider's authorization endpoint: {auth}"
    );
    let q = |n: &str| query_param(&auth, n);
    assert_eq!(q("response_type").as_deref(), Some("code"));
    assert_eq!(q("client_id").as_deref(), Some(CLIENT_ID));
    assert_eq!(
        q("redirect_uri"),
        Some(s.gw.url("/oauth2/callback")),
        "redirect_uri"
    );
    assert_eq!(
        q("scope").as_deref(),
        Some("openid email profile offline_access")
    );
    assert_eq!(q("code_challenge_method").as_deref(), Some("S256"));
    let challenge = q("code_challenge").expect("code_challenge");
    assert_eq!(challenge.len(), 43, "S256 challenge is 43 base64url chars");
    let state = q("state").expect("state");
    let nonce = q("nonce").expect("nonce");
    assert!(state.len() >= 32 && nonce.len() >= 32 && state != nonce);
    // The flow cookie is named after the state and scoped to the callback.
    let digest = Sha256::digest(state.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(flow.name, format!("_portcullis_flow_{hex}"), "{}", flow.raw);
    assert_eq!(flow.path(), Some("/"), "{}", flow.raw);
    assert!(flow.flag("httponly"), "{}", flow.raw);
    assert_eq!(flow.attr("samesite"), Some("Lax"), "{}", flow.raw);
    assert!(!flow.value.contains(&state), "flow cookie must be sealed");

    // 2. The provider's login and consent, back to the callback.
    let callback = idp_walk(&b, &auth, "alice").await;
    assert!(
        callback.starts_with(&s.gw.url("/oauth2/callback?")),
        "{callback}"
    );
    assert_eq!(query_param(&callback, "state"), Some(state.clone()));
    let before_tokens = s.idp.token_requests();
    assert_eq!(before_tokens, 0);

    // 3. The callback: session cookie, flow cookie cleared, back to the original URL.
    let cb = b.get(&callback).await;
    assert_eq!(cb.status, 302, "{}", cb.dump());
    assert_eq!(cb.location(), Some("/app/page?q=1&r=%2F"));
    let session = cb.set_cookie("_portcullis").expect("session cookie");
    assert!(
        !session.is_removal() && session.value.len() > 40,
        "{}",
        session.raw
    );
    assert_eq!(session.path(), Some("/"));
    assert!(session.flag("httponly"), "{}", session.raw);
    assert!(
        !session.flag("secure"),
        "cookie.secure is false: {}",
        session.raw
    );
    let max_age: i64 = session.attr("max-age").expect("max-age").parse().unwrap();
    assert!(
        (7 * 24 * 3600 - 60..=7 * 24 * 3600).contains(&max_age),
        "{max_age}"
    );
    let cleared = cb.set_cookie(&flow.name).expect("flow cookie cleared");
    assert!(cleared.is_removal(), "{}", cleared.raw);
    assert_eq!(cleared.path(), Some("/"));
    assert_eq!(s.idp.token_requests(), 1, "one code exchange");
    assert_eq!(
        b.cookie_names(&s.gw.url("/")),
        vec!["_portcullis".to_string()]
    );

    // 4. The original URL, now authenticated: the upstream gets the bearer and identity.
    let page = b.get(&s.gw.url("/app/page?q=1&r=%2F")).await;
    assert_eq!(page.status, 200, "{}", page.dump());
    assert_eq!(page.header("x-upstream"), Some("echo"));
    let rec = s.upstream.last();
    assert_eq!(rec.method, "GET");
    assert_eq!(rec.path, "/app/page");
    assert_eq!(rec.query.as_deref(), Some("q=1&r=%2F"));
    assert_eq!(rec.header("x-forwarded-user"), Some("alice"));
    assert_eq!(rec.header("x-forwarded-email"), Some("alice@example.test"));
    assert_eq!(rec.header("x-forwarded-groups"), Some("users,user-alice"));
    assert_eq!(rec.header("x-forwarded-preferred-username"), Some("alice"));
    assert!(
        rec.header("cookie").is_none(),
        "gateway cookie leaked: {rec:?}"
    );
    let token = rec.bearer();
    assert!(token.len() >= 43, "{token}");
    assert_eq!(
        s.upstream.count(),
        1,
        "only the authenticated request reached the upstream"
    );

    // The bearer is a live access token of the provider, for alice.
    let me = s.idp.userinfo(&token).await;
    assert_eq!(me.status, 200, "{}", me.dump());
    assert_eq!(me.json()["sub"], "alice");

    // 5. The token never shows in what the gateway itself sent to the browser.
    for r in b.history() {
        if origin(&r.url) != origin(&s.gw.url("/")) || r.header("x-upstream").is_some() {
            continue;
        }
        let mut all = r.text();
        for (k, v) in &r.headers {
            all.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        assert!(
            !all.contains(&token),
            "access token visible in {}",
            r.dump()
        );
    }
    // ... nor in the gateway's headers on the proxied page.
    for (k, v) in &page.headers {
        assert!(
            !String::from_utf8_lossy(v.as_bytes()).contains(&token),
            "access token in response header {k}"
        );
    }
}

#[tokio::test]
async fn reload_with_the_session_cookie_does_not_contact_the_provider() {
    let s = Stack::start().await;
    let b = s.login("alice").await;
    let idp_before = s.idp.request_count();
    let up_before = s.upstream.count();
    let first_token = s.upstream.last().bearer();
    for path in ["/", "/a", "/b/c?d=e", "/"] {
        let r = b.get(&s.gw.url(path)).await;
        assert_eq!(r.status, 200, "{}", r.dump());
        assert!(r.set_cookies().is_empty(), "no cookie churn: {}", r.dump());
        let rec = s.upstream.last();
        assert_eq!(rec.bearer(), first_token);
        assert_eq!(rec.header("x-forwarded-user"), Some("alice"));
    }
    assert_eq!(s.upstream.count(), up_before + 4);
    assert_eq!(
        s.idp.request_count(),
        idp_before,
        "the provider was contacted: {:?}",
        s.idp.requests()
    );
}

#[tokio::test]
async fn requests_without_a_session_that_are_not_navigations_get_401_json() {
    let s = Stack::start().await;
    let url = s.gw.url("/api/items");
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("GET", vec![("accept", "application/json")]),
        ("GET", vec![]),
        (
            "GET",
            vec![
                ("accept", "text/html"),
                ("x-requested-with", "XMLHttpRequest"),
            ],
        ),
        (
            "GET",
            vec![("accept", "text/html"), ("sec-fetch-mode", "cors")],
        ),
        ("POST", vec![("accept", "text/html")]),
        ("DELETE", vec![("accept", "text/html")]),
        // HTML acceptable, but JSON preferred (q-values).
        ("GET", vec![("accept", "application/json, text/html;q=0.1")]),
        ("GET", vec![("accept", "text/html;q=0")]),
        ("GET", vec![("accept", "*/*")]),
    ];
    for (method, headers) in &cases {
        let r = send(method, &url, headers, Vec::new()).await;
        let what = format!("{method} {headers:?}");
        assert_eq!(r.status, 401, "{what}: {}", r.dump());
        assert_eq!(r.header("content-type"), Some("application/json"), "{what}");
        assert!(r.location().is_none(), "{what}: no redirect for APIs");
        assert!(
            r.set_cookies().is_empty(),
            "{what}: no flow cookie for APIs"
        );
        let j = r.json();
        assert_eq!(j["error"], "unauthorized", "{what}");
        assert_eq!(j["login_url"], "/oauth2/start", "{what}");
    }
    // The control: a browser navigation is redirected to the provider, also when it lists
    // JSON below HTML.
    for accept in [BROWSER_ACCEPT, "text/html, application/json;q=0.9"] {
        let nav = send("GET", &url, &[("accept", accept)], Vec::new()).await;
        assert_eq!(nav.status, 302, "{accept}: {}", nav.dump());
    }
    assert_eq!(s.upstream.count(), 0, "nothing reached the upstream");
    assert_eq!(s.idp.token_requests(), 0);
}

#[tokio::test]
async fn start_rd_cannot_redirect_off_site() {
    let s = Stack::start().await;
    let b = Browser::new();
    async fn land(s: &Stack, b: &Browser, rd: &str) -> String {
        let start = b
            .get(&s.gw.url(&format!("/oauth2/start?rd={}", enc(rd))))
            .await;
        let (auth, _) = auth_redirect(&start);
        let callback = idp_walk(b, &auth, "alice").await;
        let cb = b.get(&callback).await;
        assert_eq!(cb.status, 302, "rd={rd:?}: {}", cb.dump());
        assert!(
            cb.set_cookie("_portcullis")
                .is_some_and(|c| !c.is_removal()),
            "rd={rd:?}: {}",
            cb.dump()
        );
        cb.location().expect("Location").to_string()
    }
    // Control: a same-site path is honoured, query included.
    assert_eq!(land(&s, &b, "/deep/link?a=b").await, "/deep/link?a=b");
    for rd in [
        "//evil.com",
        "/\\evil.com",
        "https://evil.com",
        "/%2F%2Fevil.com",
        "/%5Cevil.com",
        "\\\\evil.com",
        "javascript:alert(1)",
        "///evil.com/x",
        "/\t/evil.com",
    ] {
        assert_eq!(land(&s, &b, rd).await, "/", "rd={rd:?}");
    }
    // The gateway's own host, but another port or scheme: another origin.
    let own = s.gw.url("/back?x=1");
    assert_eq!(land(&s, &b, &own).await, own, "the own origin is honoured");
    for rd in [
        "http://127.0.0.1:9999/x".to_string(),
        "http://127.0.0.1/x".to_string(),
        "https://127.0.0.1/x".to_string(),
        format!("https://127.0.0.1:{}/x", s.gw.port),
        s.idp.url("/"),
    ] {
        assert_eq!(land(&s, &b, &rd).await, "/", "rd={rd:?}");
    }
    // Missing rd: the root.
    let start = b.get(&s.gw.url("/oauth2/start")).await;
    let (auth, _) = auth_redirect(&start);
    let cb = b.get(&idp_walk(&b, &auth, "alice").await).await;
    assert_eq!(cb.location(), Some("/"));
}

/// A link into the app whose query carries an encoded `\\`, newline or tab (a Windows path, a
/// multi-line search): the login round trip ends on that very URL, not on `/`. Only the path
/// can move a redirect to another host; the query is the app's data.
#[tokio::test]
async fn navigation_with_encoded_backslash_or_newline_in_the_query_returns_there() {
    let s = Stack::start().await;
    for target in [
        "/files?path=C:%5CUsers%5Cbob",
        "/search?q=line1%0Aline2&t=a%09b",
        "/a/b?next=%2F%2Fnot-a-host",
    ] {
        let b = Browser::new();
        let first = b.get(&s.gw.url(target)).await;
        let (auth, _) = auth_redirect(&first);
        let cb = b.get(&idp_walk(&b, &auth, "alice").await).await;
        assert_eq!(cb.status, 302, "{target}: {}", cb.dump());
        assert_eq!(cb.location(), Some(target), "{target}: {}", cb.dump());
    }
    // The path is still checked: the same encodings there are refused (router) or land on `/`.
    let b = Browser::new();
    let start = b
        .get(&s.gw.url("/oauth2/start?rd=%2F%250A%2Fx%3Fq%3D1"))
        .await;
    let (auth, _) = auth_redirect(&start);
    let cb = b.get(&idp_walk(&b, &auth, "alice").await).await;
    assert_eq!(cb.location(), Some("/"), "{}", cb.dump());
}

#[tokio::test]
async fn callback_with_a_state_that_has_no_flow_cookie_is_rejected() {
    let s = Stack::start().await;
    let b = Browser::new();
    let start = b.get(&s.gw.url("/oauth2/start?rd=%2Fx")).await;
    let (auth, _flow) = auth_redirect(&start);
    let state = query_param(&auth, "state").unwrap();
    // A real code for the real state, to be sure only the state/cookie check fails.
    let callback = idp_walk(&b, &auth, "alice").await;
    let code = query_param(&callback, "code").unwrap();

    // (a) another state, while the browser holds the flow cookie of the real one
    let r = b
        .get(&s.gw.url(&format!(
            "/oauth2/callback?code={}&state={}",
            enc(&code),
            enc("forged-state-value-0123456789abcdef")
        )))
        .await;
    assert_eq!(r.status, 400, "{}", r.dump());
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r.text().contains("unknown or has expired"), "{}", r.dump());
    assert_no_session_set(&r);

    // (b) the right state but no flow cookie at all (another browser, or a login started
    // at another host name): the log says which of the two cases it was
    let r = send("GET", &callback, &[("accept", BROWSER_ACCEPT)], Vec::new()).await;
    assert_eq!(r.status, 400, "{}", r.dump());
    assert_no_session_set(&r);
    let hint = "no flow cookie came with it";
    support::ops::eventually(std::time::Duration::from_secs(10), hint, || async {
        let log = s.gw.stderr();
        match log.matches(hint).count() {
            1 => Ok(()),
            _ => Err(log),
        }
    })
    .await;

    // (c) no state at all
    let r = b
        .get(&s.gw.url(&format!("/oauth2/callback?code={}", enc(&code))))
        .await;
    assert_eq!(r.status, 400, "{}", r.dump());
    assert_no_session_set(&r);

    assert_eq!(
        s.idp.token_requests(),
        0,
        "no code exchange for a bad state"
    );
    // The flow is still usable by its owner afterwards.
    let ok = b.get(&callback).await;
    assert_eq!(ok.status, 302, "{}", ok.dump());
    assert_eq!(ok.location(), Some("/x"));
    assert_eq!(query_param(&callback, "state").unwrap(), state);
}

#[tokio::test]
async fn replayed_callback_is_rejected() {
    let s = Stack::start().await;
    let b = Browser::new();
    let (callback, flow_cookie) = captured_callback(&b, &s.gw, "alice").await;

    let ok = b.get(&callback).await;
    assert_eq!(ok.status, 302, "{}", ok.dump());
    assert_eq!(s.idp.token_requests(), 1);

    // Same URL, same flow cookie, a second time (an attacker who captured both).
    let replay = navigate_url(&callback, &flow_cookie).await;
    assert_eq!(replay.status, 400, "{}", replay.dump());
    assert!(replay.text().contains("already used"), "{}", replay.dump());
    assert_no_session_set(&replay);
    assert_eq!(
        s.idp.token_requests(),
        1,
        "the replay must not reach the token endpoint"
    );
    // The signed-in browser opening the callback again (a reload, the Back button; its flow
    // cookie is gone): refused too, but shown the way on to the app.
    let again = b.get(&callback).await;
    assert_eq!(again.status, 400, "{}", again.dump());
    assert!(
        again.text().contains("Continue to the app"),
        "{}",
        again.dump()
    );
    assert_no_session_set(&again);
    assert_eq!(s.idp.token_requests(), 1);
    assert_eq!(b.get(&s.gw.url("/x")).await.status, 200);
}

/// A sign-in attempt lasts `cookie.flow_lifetime`, whatever a client does with the flow
/// cookie's Max-Age: a callback after that is refused before the code is spent. A state or a
/// code longer than any provider's is refused as malformed, before anything is looked up.
#[tokio::test]
async fn a_callback_after_the_flow_lifetime_is_refused() {
    let Stack {
        gw,
        idp,
        upstream: _upstream,
    } = Stack::with_cookie("flow_lifetime: 1s").await;
    let b = Browser::new();
    let (auth, _) = auth_redirect(&b.get(&gw.url("/reports?year=2026")).await);
    let callback = idp_walk(&b, &auth, "alice").await;
    let flow_cookie = b.cookie_header(&callback);
    assert!(
        flow_cookie.starts_with("_portcullis_flow_"),
        "{flow_cookie}"
    );
    let call = |url: String| {
        let cookie = flow_cookie.clone();
        async move {
            let headers = [("accept", BROWSER_ACCEPT), ("cookie", cookie.as_str())];
            send("GET", &url, &headers, Vec::new()).await
        }
    };

    let state = query_param(&callback, "state").unwrap_or_default();
    let code = query_param(&callback, "code").unwrap_or_default();
    for (what, url, says) in [
        (
            "a state over 512 bytes",
            callback.replace(&state, &"a".repeat(513)),
            "no state",
        ),
        (
            "a code over 4096 bytes",
            callback.replace(&code, &"c".repeat(4097)),
            "no code",
        ),
    ] {
        let r = call(url).await;
        assert_eq!(r.status, 400, "{what}: {}", r.dump());
        assert!(r.text().contains(says), "{what}: {}", r.dump());
    }

    // Past the lifetime: seconds are whole, so more than one has gone by after two.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let late = call(callback.clone()).await;
    assert_eq!(late.status, 400, "{}", late.dump());
    assert!(late.text().contains("has expired"), "{}", late.dump());
    // Trying again goes back to where that attempt was going, not to `/`.
    assert!(
        late.text()
            .contains("href=\"/oauth2/start?rd=%2Freports%3Fyear%3D2026\""),
        "{}",
        late.dump()
    );
    assert_no_session_set(&late);
    assert_eq!(idp.token_requests(), 0, "the code was spent");
}

/// RFC 9207: the provider names itself in the authorization response (`iss`); a response
/// naming another issuer, or none although the provider always sends it, is refused before
/// the code is spent (a mix-up attack would hand the code to the wrong token endpoint).
#[tokio::test]
async fn a_callback_from_another_issuer_is_refused() {
    let s = Stack::start().await;
    for (what, iss) in [
        ("another issuer", Some("https://evil.example")),
        ("no issuer", None),
    ] {
        let b = Browser::new();
        let (auth, _) = auth_redirect(&b.get(&s.gw.url("/")).await);
        let callback = idp_walk(&b, &auth, "alice").await;
        assert_eq!(
            query_param(&callback, "iss").as_deref(),
            Some(s.idp.issuer().as_str()),
            "the test provider sends iss: {callback}"
        );
        let code = query_param(&callback, "code").unwrap();
        let state = query_param(&callback, "state").unwrap();
        let mut forged = format!("/oauth2/callback?code={}&state={}", enc(&code), enc(&state));
        if let Some(iss) = iss {
            forged.push_str(&format!("&iss={}", enc(iss)));
        }
        let before = s.idp.token_requests();
        let r = b.get(&s.gw.url(&forged)).await;
        assert_eq!(r.status, 400, "{what}: {}", r.dump());
        assert_no_session_set(&r);
        assert_eq!(
            s.idp.token_requests(),
            before,
            "{what}: the code was not spent"
        );
    }
    // A parameter given twice (RFC 6749 §3.1: never), the genuine value first: refused, not
    // read as the first one, and the flow is left for the genuine response.
    let b = Browser::new();
    let (auth, _) = auth_redirect(&b.get(&s.gw.url("/")).await);
    let callback = idp_walk(&b, &auth, "alice").await;
    let [code, state, iss] =
        ["code", "state", "iss"].map(|p| enc(&query_param(&callback, p).unwrap()));
    let evil = enc("https://evil.example");
    for forged in [
        format!("code={code}&state={state}&iss={iss}&iss={evil}"),
        format!("code={code}&code=bogus&state={state}&iss={iss}"),
        format!("code={code}&state={state}&state=other&iss={iss}"),
        format!("code={code}&state={state}&iss={iss}&error=access_denied&error=x"),
    ] {
        let r = b
            .get(&s.gw.url(&format!("/oauth2/callback?{forged}")))
            .await;
        assert_eq!(r.status, 400, "{forged}: {}", r.dump());
        assert!(
            r.text().contains("repeats a parameter"),
            "{forged}: {}",
            r.dump()
        );
        assert_no_session_set(&r);
    }
    let before = s.idp.token_requests();
    let r = b.get(&callback).await;
    assert_eq!(r.status, 302, "{}", r.dump());
    assert_eq!(s.idp.token_requests(), before + 1);
}

#[tokio::test]
async fn reused_code_with_a_fresh_flow_is_rejected() {
    let s = Stack::start().await;
    let b = Browser::new();
    let (auth, _) = auth_redirect(&b.get(&s.gw.url("/")).await);
    let callback = idp_walk(&b, &auth, "alice").await;
    let code = query_param(&callback, "code").unwrap();
    assert_eq!(b.get(&callback).await.status, 302);
    assert_eq!(s.idp.token_requests(), 1);

    // A new browser starts its own (valid) flow and presents the spent code with it.
    let b2 = Browser::new();
    let (auth2, _) = auth_redirect(&b2.get(&s.gw.url("/oauth2/start?rd=%2F")).await);
    let state2 = query_param(&auth2, "state").unwrap();
    let r = b2
        .get(&s.gw.url(&format!(
            "/oauth2/callback?code={}&state={}&iss={}",
            enc(&code),
            enc(&state2),
            enc(&s.idp.issuer())
        )))
        .await;
    assert_eq!(r.status, 400, "{}", r.dump());
    assert!(
        r.text().contains("invalid, expired or was already used"),
        "{}",
        r.dump()
    );
    assert_no_session_set(&r);
    assert_eq!(s.idp.token_requests(), 2, "the exchange was attempted once");
    assert!(b2.cookie(&s.gw.url("/"), "_portcullis").is_none());
}

/// A subject is the provider's (often the user's own choice): in a text log line it is one
/// quoted value, so `eve" status=200 forged="1` adds no fields for a logfmt reader.
#[tokio::test]
async fn a_subject_with_quotes_adds_no_fields_to_a_log_line() {
    let s = Stack::start().await;
    let user = r#"eve" status=200 forged="1"#;
    let b = s.login(user).await;
    let r = b.get(&s.gw.url("/oauth2/userinfo")).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let log = s.gw.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("login completed"))
        .unwrap_or_else(|| panic!("no login line: {log}"));
    assert!(
        line.contains(r#"sub="eve\" status=200 forged=\"1""#),
        "{line}"
    );
}

/// `server_error` and `temporarily_unavailable` are the provider failing, not refusing
/// (RFC 6749 §4.1.2.1): 503 with `Retry-After` and a page that says to try again, not 403.
#[tokio::test]
async fn a_provider_failing_at_the_callback_is_a_503_to_try_again() {
    let s = Stack::start().await;
    let b = Browser::new();
    for error in ["temporarily_unavailable", "server_error"] {
        let (auth, _) = auth_redirect(&b.get(&s.gw.url("/oauth2/start?rd=%2Fdocs")).await);
        let state = query_param(&auth, "state").unwrap();
        let r = b
            .get(&s.gw.url(&format!(
                "/oauth2/callback?error={error}&state={}&iss={}",
                enc(&state),
                enc(&s.idp.issuer())
            )))
            .await;
        assert_eq!(r.status, 503, "{}", r.dump());
        assert_eq!(r.header("retry-after"), Some("5"), "{}", r.dump());
        assert!(r.text().contains("try again shortly"), "{}", r.dump());
        assert!(r.text().contains(error), "{}", r.dump());
        assert!(
            r.text().contains("/oauth2/start?rd=%2Fdocs"),
            "{}",
            r.dump()
        );
        assert_no_session_set(&r);
    }
    assert_eq!(s.idp.token_requests(), 0);
}

#[tokio::test]
async fn provider_error_renders_an_escaped_403_page() {
    let s = Stack::start().await;
    let b = Browser::new();
    let (auth, flow) = auth_redirect(&b.get(&s.gw.url("/oauth2/start?rd=%2F")).await);
    let state = query_param(&auth, "state").unwrap();
    let r = b
        .get(&s.gw.url(&format!(
            "/oauth2/callback?error=access_denied&error_description={}&state={}",
            enc("<script>x</script>"),
            enc(&state)
        )))
        .await;
    assert_eq!(r.status, 403, "{}", r.dump());
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let body = r.text();
    assert!(body.contains("access_denied"), "{body}");
    assert!(body.contains("&lt;script&gt;x&lt;/script&gt;"), "{body}");
    assert!(!body.contains("<script>"), "unescaped: {body}");
    assert!(
        r.header("content-security-policy")
            .is_some_and(|c| c.contains("default-src 'none'")),
        "{}",
        r.dump()
    );
    let cleared = r.set_cookie(&flow.name).expect("flow cookie cleared");
    assert!(cleared.is_removal(), "{}", cleared.raw);
    // A line break in what the provider (or whoever calls the callback) sent cannot forge
    // a log line.
    let (auth, _) = auth_redirect(&b.get(&s.gw.url("/oauth2/start?rd=%2F")).await);
    let state = query_param(&auth, "state").unwrap();
    let forged = "2026-01-01T00:00:00Z  INFO access: forged";
    let r = b
        .get(&s.gw.url(&format!(
            "/oauth2/callback?error={}&state={}",
            enc(&format!("access_denied\n{forged}\r\n{forged}")),
            enc(&state)
        )))
        .await;
    assert_eq!(r.status, 403, "{}", r.dump());
    let log = s.gw.stderr();
    assert!(log.contains("forged"), "not logged at all: {log}");
    assert!(
        !log.lines().any(|l| l.starts_with(forged)),
        "a forged log line: {log}"
    );
    // Nor can terminal escapes or a made-up field: the value is quoted, its controls escaped.
    let (auth, _) = auth_redirect(&b.get(&s.gw.url("/oauth2/start?rd=%2F")).await);
    let state = query_param(&auth, "state").unwrap();
    let r = b
        .get(&s.gw.url(&format!(
            "/oauth2/callback?error={}&state={}",
            enc("denied\u{1b}[2J\u{1b}[1;31m user=admin \u{202e}status=200"),
            enc(&state)
        )))
        .await;
    assert_eq!(r.status, 403, "{}", r.dump());
    let log = s.gw.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("denied\\u{1b}[2J"))
        .unwrap_or_else(|| panic!("escaped value not logged: {log:?}"));
    assert!(
        line.contains(r#"error="denied\u{1b}[2J\u{1b}[1;31m user=admin \u{202e}status=200""#),
        "{line:?}"
    );
    assert!(
        !log.contains('\u{1b}') && !log.contains('\u{202e}'),
        "raw controls in the log: {log:?}"
    );
    assert_no_session_set(&r);
    assert_eq!(s.idp.token_requests(), 0);
}

/// A provider error whose state does not check out (the flow cookie expired, another browser)
/// still says what the provider said, with the error code only: the text is anybody's. A
/// provider that failed (rather than refused) is a 503 to try again, as with a valid state.
#[tokio::test]
async fn provider_error_without_a_valid_state_names_only_the_code() {
    let s = Stack::start().await;
    let b = Browser::new();
    for (query, code, status) in [
        (
            "error=access_denied&error_description=Injected+text&state=bogus",
            "access_denied",
            403,
        ),
        ("error=access_denied", "access_denied", 403),
        (
            "error=%3Cb%3Ebold%3C%2Fb%3E&state=bogus",
            "unknown_error",
            403,
        ),
        (
            "error=temporarily_unavailable&error_description=Injected+text&state=bogus",
            "temporarily_unavailable",
            503,
        ),
        ("error=server_error", "server_error", 503),
    ] {
        let r = b.get(&s.gw.url(&format!("/oauth2/callback?{query}"))).await;
        assert_eq!(r.status, status, "{query}: {}", r.dump());
        let body = r.text();
        if status == 503 {
            assert!(body.contains("could not complete"), "{query}: {body}");
            assert_eq!(r.header("retry-after"), Some("5"), "{query}: {}", r.dump());
        } else {
            assert!(body.contains("refused the sign-in"), "{query}: {body}");
            assert!(r.header("retry-after").is_none(), "{query}: {}", r.dump());
        }
        assert!(body.contains(code), "{query}: {body}");
        assert!(
            !body.contains("Injected") && !body.contains("bold"),
            "{query}: {body}"
        );
        assert_no_session_set(&r);
    }
    // Without an error it is still the unknown state it was.
    let r = b
        .get(&s.gw.url("/oauth2/callback?code=x&state=bogus"))
        .await;
    assert_eq!(r.status, 400, "{}", r.dump());
    assert!(r.text().contains("unknown or has expired"), "{}", r.dump());
    assert_eq!(s.idp.token_requests(), 0);
}

#[tokio::test]
async fn user_cancelling_at_the_provider_gets_403() {
    let s = Stack::start().await;
    let b = Browser::new();
    let (auth, _) = auth_redirect(&b.get(&s.gw.url("/")).await);
    // Walk to the login form, then press the IdP's "Cancel" link.
    let first = b.get(&auth).await;
    assert!(first.status.is_redirection(), "{}", first.dump());
    let interaction = first.location_abs().unwrap();
    let page = b.get(&interaction).await;
    assert_eq!(page.status, 200, "{}", page.dump());
    let abort = b.get(&format!("{interaction}/abort")).await;
    assert!(abort.status.is_redirection(), "{}", abort.dump());
    let mut next = abort.location_abs().unwrap();
    // oidc-provider resumes at /auth/<uid>, which redirects to the callback.
    while origin(&next) == origin(&s.idp.issuer()) {
        let r = b.get(&next).await;
        assert!(r.status.is_redirection(), "{}", r.dump());
        next = r.location_abs().unwrap();
    }
    assert_eq!(
        query_param(&next, "error").as_deref(),
        Some("access_denied")
    );
    let r = b.get(&next).await;
    assert_eq!(r.status, 403, "{}", r.dump());
    assert!(r.text().contains("access_denied"), "{}", r.dump());
    assert_no_session_set(&r);
}

#[tokio::test]
async fn two_parallel_logins_both_succeed() {
    let s = Stack::start().await;
    let b = Browser::new();
    let (auth_one, flow_one) = auth_redirect(&b.get(&s.gw.url("/one")).await);
    let (auth_two, flow_two) = auth_redirect(&b.get(&s.gw.url("/two?x=2")).await);
    assert_ne!(flow_one.name, flow_two.name);
    // Both flows pending at once, and both provider walks done before either callback.
    let cb_one = idp_walk(&b, &auth_one, "alice").await;
    let cb_two = idp_walk(&b, &auth_two, "alice").await;
    let names = b.cookie_names(&s.gw.url("/"));
    assert!(
        names.contains(&flow_one.name) && names.contains(&flow_two.name),
        "{names:?}"
    );

    // Finish them in reverse order.
    let r2 = b.get(&cb_two).await;
    assert_eq!(r2.status, 302, "{}", r2.dump());
    assert_eq!(r2.location(), Some("/two?x=2"));
    assert!(r2
        .set_cookie("_portcullis")
        .is_some_and(|c| !c.is_removal()));
    let r1 = b.get(&cb_one).await;
    assert_eq!(r1.status, 302, "{}", r1.dump());
    assert_eq!(r1.location(), Some("/one"));
    assert!(r1
        .set_cookie("_portcullis")
        .is_some_and(|c| !c.is_removal()));
    assert_eq!(s.idp.token_requests(), 2);
    assert_eq!(
        b.cookie_names(&s.gw.url("/")),
        vec!["_portcullis".to_string()]
    );

    for path in ["/one", "/two?x=2"] {
        let r = b.get(&s.gw.url(path)).await;
        assert_eq!(r.status, 200, "{}", r.dump());
        assert_eq!(s.upstream.last().header("x-forwarded-user"), Some("alice"));
    }
}

/// A browser may have 8 logins pending; a 9th expires only the oldest (by the start time
/// sealed in the flow cookies, not by cookie order), and the other tabs' logins still finish.
/// Thousands of flow-like cookies from a client get a bounded answer: at most a few dozen
/// expired, looked at once each (no quadratic work), and the login still starts.
#[tokio::test]
async fn a_flood_of_flow_cookies_is_bounded() {
    let s = Stack::start().await;
    let cookies: Vec<String> = (0..2000)
        .map(|i| format!("_portcullis_flow_{i}=x"))
        .collect();
    let r = send(
        "GET",
        &s.gw.url("/oauth2/start?rd=%2F"),
        &[("cookie", &cookies.join("; "))],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 302, "{}", r.dump());
    let expired = r.set_cookies().iter().filter(|c| c.is_removal()).count();
    assert!(
        (1..=32).contains(&expired),
        "{expired} flow cookies expired"
    );
}

#[tokio::test]
async fn a_ninth_pending_login_expires_only_the_oldest() {
    let s = Stack::start().await;
    let b = Browser::new();
    let mut tabs = Vec::new();
    for i in 0..8 {
        let path = format!("/tab/{i}");
        let (auth, flow) = auth_redirect(&b.get(&s.gw.url(&path)).await);
        tabs.push((path, auth, flow));
        if i == 0 {
            // Start times are whole seconds: make the first surely the oldest.
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        }
    }
    let pending = |b: &Browser| {
        b.cookie_names(&s.gw.url("/"))
            .into_iter()
            .filter(|n| n.starts_with("_portcullis_flow_"))
            .collect::<Vec<_>>()
    };
    assert_eq!(pending(&b).len(), 8);
    let removals = |r: &Resp| {
        r.set_cookies()
            .into_iter()
            .filter(|c| c.is_removal())
            .map(|c| c.name)
            .collect::<Vec<_>>()
    };

    // The cookies newest first: still the oldest login is the one that goes.
    let reversed = tabs
        .iter()
        .rev()
        .map(|(_, _, f)| format!("{}={}", f.name, f.value))
        .collect::<Vec<_>>()
        .join("; ");
    let r = send(
        "GET",
        &s.gw.url("/oauth2/start?rd=%2Fother"),
        &[("accept", BROWSER_ACCEPT), ("cookie", &reversed)],
        Vec::new(),
    )
    .await;
    auth_redirect(&r);
    assert_eq!(removals(&r), vec![tabs[0].2.name.clone()], "{}", r.dump());

    // The browser's 9th login: one flow expired, eight pending.
    let r = b.get(&s.gw.url("/tab/8")).await;
    let (auth8, _) = auth_redirect(&r);
    assert_eq!(removals(&r), vec![tabs[0].2.name.clone()], "{}", r.dump());
    let left = pending(&b);
    assert_eq!(left.len(), 8, "{left:?}");
    assert!(!left.contains(&tabs[0].2.name), "{left:?}");

    // Another tab's login and the new one finish; the expired one does not.
    let cb = b.get(&idp_walk(&b, &tabs[1].1, "alice").await).await;
    assert_eq!(cb.status, 302, "{}", cb.dump());
    assert_eq!(cb.location(), Some("/tab/1"));
    let cb = b.get(&idp_walk(&b, &auth8, "alice").await).await;
    assert_eq!(cb.status, 302, "{}", cb.dump());
    assert_eq!(cb.location(), Some("/tab/8"));
    let cb = b.get(&idp_walk(&b, &tabs[0].1, "alice").await).await;
    assert_eq!(cb.status, 400, "the expired login: {}", cb.dump());
}

/// Where a sign-out answer sends the browser: the provider's logout endpoint, naming this
/// client and the gateway's landing page.
fn end_session_location(s: &Stack, r: &Resp) -> String {
    assert_eq!(r.status, 302, "{}", r.dump());
    let loc = r.location().unwrap().to_string();
    assert!(loc.starts_with(&s.idp.url("/session/end?")), "{loc}");
    assert_eq!(query_param(&loc, "client_id").as_deref(), Some(CLIENT_ID));
    assert_eq!(
        query_param(&loc, "post_logout_redirect_uri"),
        Some(s.gw.url("/oauth2/signed_out"))
    );
    loc
}

#[tokio::test]
async fn sign_out_end_to_end() {
    let s = Stack::start().await;
    let b = s.login("alice").await;
    // A copy of the session cookie, taken before signing out (another device, a thief).
    let copied = b.cookie_header(&s.gw.url("/"));
    assert!(copied.starts_with("_portcullis="), "{copied}");
    let page = b.get(&s.gw.url("/oauth2/sign_out")).await;
    assert_eq!(page.status, 200, "{}", page.dump());
    let html = page.text();
    assert!(html.contains("alice@example.test"), "{html}");
    assert!(
        html.contains("<form method=\"post\" action=\"/oauth2/sign_out\">"),
        "{html}"
    );
    let csrf = support::html::hidden_value(&html, "csrf").expect("csrf field");
    assert!(csrf.len() >= 32, "{csrf}");
    // The page allows its form to go to the provider's logout page.
    let csp = page.header("content-security-policy").unwrap_or("");
    assert!(csp.contains(&s.idp.issuer()), "{csp}");

    let r = post_sign_out(&b, &s.gw, &csrf).await;
    let loc = end_session_location(&s, &r);
    let hint = query_param(&loc, "id_token_hint").expect("id_token_hint");
    let claims = jwt_payload(&hint);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], CLIENT_ID);
    assert_eq!(claims["iss"], s.idp.issuer());
    let cleared = r.set_cookie("_portcullis").expect("session cookie cleared");
    assert!(cleared.is_removal(), "{}", cleared.raw);
    assert_eq!(cleared.attr("max-age"), Some("0"));
    assert_eq!(cleared.path(), Some("/"));
    assert!(b.cookie(&s.gw.url("/"), "_portcullis").is_none());
    // Pages the browser cached while signed in are dropped (the back button).
    assert_eq!(
        r.header("clear-site-data"),
        Some("\"cache\""),
        "{}",
        r.dump()
    );

    // The provider accepts the logout request (valid hint, registered redirect URI).
    let end = b.get(&loc).await;
    assert_eq!(end.status, 200, "{}", end.dump());
    assert!(!end.text().contains("IdP error"), "{}", end.dump());

    // The landing page, and the browser is logged out of the gateway.
    let landed = b.get(&s.gw.url("/oauth2/signed_out")).await;
    assert_eq!(landed.status, 200);
    assert!(landed.text().contains("signed out"), "{}", landed.dump());
    assert_eq!(landed.header("clear-site-data"), Some("\"cache\""));
    let after = b.get(&s.gw.url("/")).await;
    assert_eq!(after.status, 302, "{}", after.dump());
    // The copied cookie is over too (cookie store: its id is revoked).
    let r = send(
        "GET",
        &s.gw.url("/api"),
        &[("accept", "application/json"), ("cookie", &copied)],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.dump());
}

/// GETs `url` and follows redirects as long as they stay on the provider: the provider's page,
/// or its redirect elsewhere.
async fn on_idp(b: &Browser, s: &Stack, url: &str) -> Resp {
    let mut url = url.to_string();
    for _ in 0..10 {
        let r = b.get(&url).await;
        match r.location_abs() {
            Some(next) if r.status.is_redirection() && next.starts_with(&s.idp.url("/")) => {
                url = next
            }
            _ => return r,
        }
    }
    panic!("the provider kept redirecting: {url}");
}

/// The provider sends users to `/oauth2/signed_out` after its own logout too (its logout
/// page, another app's sign-out): with a session still valid here, the page does not claim
/// they are signed out.
#[tokio::test]
async fn the_signed_out_page_does_not_claim_a_live_session_is_over() {
    let s = Stack::start().await;
    let b = s.login("alice").await;
    let page = b.get(&s.gw.url("/oauth2/signed_out")).await;
    assert_eq!(page.status, 200, "{}", page.dump());
    assert!(
        !page.text().contains("You have been signed out"),
        "{}",
        page.dump()
    );
    assert!(page.text().contains("still active"), "{}", page.dump());
    assert!(
        page.text().contains("href=\"/oauth2/sign_out\""),
        "{}",
        page.dump()
    );
    // Still signed in, as it says.
    assert_eq!(b.get(&s.gw.url("/")).await.status, 200);
}

#[tokio::test]
async fn sign_out_without_a_session_still_ends_the_provider_session() {
    let s = Stack::start().await;
    let b = s.login("alice").await;
    // The gateway's session is gone (expired, cleared); the provider's is not.
    b.put_cookie(&s.gw.url("/"), "_portcullis", "expired", "/");
    let page = b.get(&s.gw.url("/oauth2/sign_out")).await;
    assert!(page.text().contains("not signed in"), "{}", page.dump());

    let r = post_sign_out(&b, &s.gw, "").await;
    let loc = end_session_location(&s, &r);
    assert_eq!(query_param(&loc, "id_token_hint"), None, "{loc}");
    assert!(r.set_cookie("_portcullis").is_some_and(|c| c.is_removal()));

    // Having no ID token to go by, the provider asks; the user confirms.
    let confirm = on_idp(&b, &s, &loc).await;
    assert_eq!(confirm.status, 200, "{}", confirm.dump());
    let done = confirm_provider_logout(&b, &confirm).await;
    let landing = match done.location_abs() {
        Some(next) if next.starts_with(&s.idp.url("/")) => on_idp(&b, &s, &next).await,
        _ => done,
    };
    assert_eq!(
        landing.location_abs(),
        Some(s.gw.url("/oauth2/signed_out")),
        "{}",
        landing.dump()
    );

    // The provider's session is over: the next visit meets its login form, not a silent
    // sign-in straight back to the gateway.
    let again = b.get(&s.gw.url("/")).await;
    let (auth, _) = auth_redirect(&again);
    let idp = on_idp(&b, &s, &auth).await;
    assert_eq!(idp.status, 200, "signed straight back in: {}", idp.dump());
    let login = support::html::first_form(&idp.text()).expect("login form");
    assert!(
        login.inputs.iter().any(|i| i.kind == "password"),
        "{}",
        idp.dump()
    );
}

#[tokio::test]
async fn sign_out_post_needs_the_csrf_token() {
    let s = Stack::start().await;
    let b = s.login("alice").await;
    let csrf =
        support::html::hidden_value(&b.get(&s.gw.url("/oauth2/sign_out")).await.text(), "csrf")
            .expect("csrf");
    let form_ct = ("content-type", "application/x-www-form-urlencoded");
    let attempts: Vec<(String, Vec<(&str, &str)>)> = vec![
        (String::new(), vec![form_ct]),
        ("csrf=".to_string(), vec![form_ct]),
        ("csrf=wrong-token".to_string(), vec![form_ct]),
        (format!("other={}", enc(&csrf)), vec![form_ct]),
        // the right token from a foreign origin
        (
            format!("csrf={}", enc(&csrf)),
            vec![form_ct, ("origin", "http://evil.example")],
        ),
        // A page elsewhere posting from a sandboxed frame, or with no-referrer, sends
        // `Origin: null`; the browser says the request is cross-site.
        (
            format!("csrf={}", enc(&csrf)),
            vec![
                form_ct,
                ("origin", "null"),
                ("sec-fetch-site", "cross-site"),
            ],
        ),
    ];
    for (body, headers) in attempts {
        let r = b
            .request(
                "POST",
                &s.gw.url("/oauth2/sign_out"),
                &headers,
                body.clone(),
            )
            .await;
        assert_eq!(r.status, 403, "body {body:?} {headers:?}: {}", r.dump());
        assert!(r.set_cookies().is_empty(), "session kept: {}", r.dump());
        assert!(r.location().is_none());
    }
    // A cross-site post arrives without the session cookie (SameSite): whatever it says, it
    // cannot make the browser drop cookies the request did not carry.
    let r = send(
        "POST",
        &s.gw.url("/oauth2/sign_out"),
        &[form_ct, ("origin", "null")],
        b"csrf=".to_vec(),
    )
    .await;
    assert!(
        r.set_cookie("_portcullis").is_none(),
        "a cookie-less sign-out cleared the session: {}",
        r.dump()
    );
    // Still signed in.
    let r = b.get(&s.gw.url("/")).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    // And the real token works, also from the sign-out page itself, whose no-referrer
    // policy makes its form post with `Origin: null`.
    let r = b
        .request(
            "POST",
            &s.gw.url("/oauth2/sign_out"),
            &[
                form_ct,
                ("origin", "null"),
                ("sec-fetch-site", "same-origin"),
            ],
            format!("csrf={}", enc(&csrf)),
        )
        .await;
    assert_eq!(r.status, 302, "{}", r.dump());
    assert!(r.set_cookie("_portcullis").is_some_and(|c| c.is_removal()));
}

#[tokio::test]
async fn userinfo_returns_the_identity_as_json() {
    let s = Stack::start().await;
    let none = send(
        "GET",
        &s.gw.url("/oauth2/userinfo"),
        &[("accept", "application/json")],
        Vec::new(),
    )
    .await;
    assert_eq!(none.status, 401, "{}", none.dump());
    assert_eq!(none.json()["error"], "unauthorized");

    let b = s.login("alice").await;
    let token = s.upstream.last().bearer();
    let r = b.api_get(&s.gw.url("/oauth2/userinfo")).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let j = r.json();
    assert_eq!(j["sub"], "alice");
    assert_eq!(j["email"], "alice@example.test");
    assert_eq!(j["email_verified"], true);
    assert_eq!(j["preferred_username"], "alice");
    assert_eq!(j["groups"], serde_json::json!(["users", "user-alice"]));
    assert!(j["session_expires_at"].as_u64().unwrap() > 1_700_000_000);
    assert!(
        !r.text().contains(&token),
        "userinfo leaks the access token"
    );
    assert_eq!(s.upstream.count(), 1, "userinfo is answered by the gateway");
}

#[tokio::test]
async fn gateway_endpoints_answer_wrong_methods_and_unknown_paths() {
    let s = Stack::start().await;
    let r = send("POST", &s.gw.url("/oauth2/callback"), &[], Vec::new()).await;
    assert_eq!(r.status, 405, "{}", r.dump());
    assert_eq!(r.header("allow"), Some("GET"));
    let r = send("PUT", &s.gw.url("/oauth2/sign_out"), &[], Vec::new()).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD, POST"));
    for path in ["/healthz", "/readyz"] {
        for method in ["POST", "DELETE"] {
            let r = send(method, &s.gw.url(path), &[], Vec::new()).await;
            assert_eq!(r.status, 405, "{method} {path}: {}", r.dump());
            assert_eq!(r.header("allow"), Some("GET, HEAD"));
        }
        let r = send("HEAD", &s.gw.url(path), &[], Vec::new()).await;
        assert_eq!(r.status, 200, "HEAD {path}: {}", r.dump());
    }
    // HEAD is answered as GET, without the body (uptime and link checkers use it); not at
    // the callback, where it must not spend a one-time code.
    for (path, status) in [
        ("/oauth2/start", 302),
        ("/oauth2/sign_out", 200),
        ("/oauth2/signed_out", 200),
        ("/oauth2/userinfo", 401),
    ] {
        let r = send(
            "HEAD",
            &s.gw.url(path),
            &[("accept", BROWSER_ACCEPT)],
            Vec::new(),
        )
        .await;
        assert_eq!(r.status, status, "HEAD {path}: {}", r.dump());
        assert!(r.text().is_empty(), "HEAD {path} has a body");
    }
    let r = send(
        "HEAD",
        &s.gw.url("/oauth2/callback?code=x&state=y"),
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 405, "{}", r.dump());
    assert_eq!(r.header("allow"), Some("GET"));
    // The back-channel logout endpoint takes POST only (the provider's); forward-auth any
    // method (Envoy's ext_authz asks with the original one): no session, 401.
    let r = send(
        "GET",
        &s.gw.url("/oauth2/backchannel_logout"),
        &[("accept", BROWSER_ACCEPT)],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 405, "{}", r.dump());
    assert_eq!(r.header("allow"), Some("POST"));
    let r = send("PUT", &s.gw.url("/oauth2/auth"), &[], Vec::new()).await;
    assert_eq!(r.status, 401, "{}", r.dump());
    let r = send("GET", &s.gw.url("/oauth2/nope"), &[], Vec::new()).await;
    assert_eq!(r.status, 404, "{}", r.dump());
    assert_eq!(
        s.upstream.count(),
        0,
        "/oauth2/* never reaches the upstream"
    );
    let r = send("GET", &s.gw.url("/readyz"), &[], Vec::new()).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ready\n"));
}

/// oidc-provider's default: the code flow's ID token names only the subject, and email, name
/// and groups come from the userinfo endpoint (OIDC Core §5.4).
#[tokio::test]
async fn claims_the_id_token_leaves_out_come_from_userinfo() {
    let s = Stack::with(
        &[("IDP_CONFORM_ID_TOKEN_CLAIMS", "1")],
        r#"authorization: { allowed_email_domains: ["example.test"], allowed_groups: ["users"] }"#,
    )
    .await;
    let b = s.login("alice").await;
    let rec = s.upstream.last();
    assert_eq!(rec.header("x-forwarded-user"), Some("alice"));
    assert_eq!(rec.header("x-forwarded-email"), Some("alice@example.test"));
    assert_eq!(rec.header("x-forwarded-groups"), Some("users,user-alice"));
    assert_eq!(rec.header("x-forwarded-preferred-username"), Some("alice"));
    let userinfo_calls = || {
        s.idp
            .requests()
            .iter()
            .filter(|l| l.contains(" GET /me "))
            .count()
    };
    assert_eq!(userinfo_calls(), 1, "{:?}", s.idp.requests());
    let me = b.get(&s.gw.url("/oauth2/userinfo")).await;
    assert_eq!(me.status, 200, "{}", me.dump());
    assert_eq!(me.json()["email"], "alice@example.test");
    // Later requests use the session: no more provider calls.
    let r = b.get(&s.gw.url("/again")).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(userinfo_calls(), 1);
}

/// A provider registered to sign userinfo answers (`application/jwt`, OIDC Core §5.3.2, as
/// Keycloak's per-client setting does): its claims are read once the signature holds.
#[tokio::test]
async fn claims_from_a_signed_userinfo_answer_are_used() {
    let s = Stack::with(
        &[
            ("IDP_CONFORM_ID_TOKEN_CLAIMS", "1"),
            ("IDP_USERINFO_SIGNED", "1"),
        ],
        r#"authorization: { allowed_groups: ["users"] }"#,
    )
    .await;
    let b = s.login("alice").await;
    let rec = s.upstream.last();
    assert_eq!(rec.header("x-forwarded-email"), Some("alice@example.test"));
    assert_eq!(rec.header("x-forwarded-groups"), Some("users,user-alice"));
    let me = b.get(&s.gw.url("/oauth2/userinfo")).await;
    assert_eq!(me.json()["email"], "alice@example.test", "{}", me.dump());
}

/// A userinfo endpoint that is unavailable at login fails the login (to be tried again): a
/// session made without the claims it would have told denies its user until it ends. One that
/// refuses (a `403`) leaves the identity as the ID token states it, as before.
#[tokio::test]
async fn an_unavailable_userinfo_endpoint_fails_the_login_instead_of_making_a_bare_session() {
    let dir = tempfile::tempdir().unwrap();
    let override_file = dir.path().join("userinfo");
    let s = Stack::with(
        &[
            ("IDP_CONFORM_ID_TOKEN_CLAIMS", "1"),
            (
                "IDP_USERINFO_OVERRIDE_FILE",
                override_file.to_str().unwrap(),
            ),
        ],
        r#"authorization: { allowed_groups: ["users"] }"#,
    )
    .await;
    let attempt = |user: &'static str| {
        let gw = &s.gw;
        async move {
            let b = Browser::new();
            let (auth, _) = auth_redirect(&b.get(&gw.url("/page")).await);
            let cb = b.get(&idp_walk(&b, &auth, user).await).await;
            (b, cb)
        }
    };
    for answer in ["503 text/html <p>maintenance</p>", "429 - "] {
        std::fs::write(&override_file, answer).unwrap();
        let (_, cb) = attempt("alice").await;
        assert_eq!(cb.status, 502, "{answer}: {}", cb.dump());
        let session = cb.set_cookie("_portcullis");
        assert!(
            session.is_none_or(|c| c.is_removal()),
            "{answer}: a session was made: {}",
            cb.dump()
        );
    }
    // A refusal: the login completes with the token's identity, which lacks the group.
    std::fs::write(&override_file, "403 - ").unwrap();
    let (b, cb) = attempt("bob").await;
    assert_eq!(cb.status, 302, "{}", cb.dump());
    assert_eq!(b.get(&s.gw.url("/page")).await.status, 403);
    // The endpoint back: the login completes with the groups.
    std::fs::remove_file(&override_file).unwrap();
    let (b, cb) = attempt("alice").await;
    assert_eq!(cb.status, 302, "{}", cb.dump());
    let r = b.get(&s.gw.url("/page")).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(
        s.upstream.last().header("x-forwarded-groups"),
        Some("users,user-alice")
    );
}

/// With `cookie.same_site: strict` the callback cannot redirect: the browser would not send a
/// Strict cookie on a redirect chain that began at the provider (another site), and the login
/// would loop. It answers a page that continues to the target (a same-site navigation) instead.
#[tokio::test]
async fn strict_same_site_callback_lands_on_a_page_that_continues_to_the_target() {
    let Stack {
        gw,
        upstream,
        idp: _idp,
    } = Stack::with_cookie("same_site: strict").await;
    // Characters an attribute must escape (raw, as `rd` can carry them): the target
    // validation lets them through.
    let target = "/app/page?q=1&x=\"a\"&y=<b>'c'";
    let b = Browser::new();
    let start = gw.url(&format!("/oauth2/start?rd={}", enc(target)));
    let (auth, flow) = auth_redirect(&b.get(&start).await);
    assert_eq!(flow.attr("samesite"), Some("Lax"), "{}", flow.raw);
    let cb = b.get(&idp_walk(&b, &auth, "alice").await).await;

    assert_eq!(cb.status, 200, "{}", cb.dump());
    assert!(cb.location().is_none(), "{}", cb.dump());
    assert_eq!(cb.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(cb.header("cache-control"), Some("no-store"));
    let csp = cb.header("content-security-policy").expect("CSP");
    assert!(
        csp.contains("default-src 'none'") && !csp.contains("script-src"),
        "{csp}"
    );
    let session = cb.set_cookie("_portcullis").expect("session cookie");
    assert!(!session.is_removal(), "{}", session.raw);
    assert_eq!(session.attr("samesite"), Some("Strict"), "{}", session.raw);
    assert!(cb.set_cookie(&flow.name).is_some_and(|c| c.is_removal()));

    let page = cb.text();
    let escaped = "/app/page?q=1&amp;x=&quot;a&quot;&amp;y=&lt;b&gt;&#39;c&#39;";
    assert!(
        page.contains(&format!(
            "<meta http-equiv=\"refresh\" content=\"0;url={escaped}\">"
        )),
        "{page}"
    );
    assert!(page.contains(&format!("<a href=\"{escaped}\">")), "{page}");
    assert!(!page.contains("\"a\""), "unescaped target: {page}");
    let content = page
        .split("content=\"0;url=")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("refresh url");
    assert_eq!(html::unescape(content), target);

    // What the refresh navigates to (URL-encoded as a browser does), with the new session: the
    // upstream.
    let next = url::Url::parse(&gw.url(&html::unescape(content))).unwrap();
    let r = b.get(next.as_str()).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(r.header("x-upstream"), Some("echo"));
    let rec = upstream.last();
    assert_eq!(rec.path, "/app/page");
    assert_eq!(rec.query.as_deref(), Some("q=1&x=%22a%22&y=%3Cb%3E%27c%27"));
    assert_eq!(rec.header("x-forwarded-user"), Some("alice"));
    assert_eq!(upstream.count(), 1);
}

/// With `cookie.same_site: strict`, the provider's redirect to `/oauth2/signed_out` (a
/// cross-site navigation) arrives without the session cookie: the page goes on to itself
/// from this site, where the cookie is sent, instead of telling a user who is still signed
/// in that they are signed out. With lax, the cookie comes along and no detour is made.
#[tokio::test]
async fn strict_same_site_signed_out_page_looks_again_from_this_site() {
    let Stack {
        gw,
        idp: _idp,
        upstream: _upstream,
    } = Stack::with_cookie("same_site: strict").await;
    let b = Browser::new();
    let (auth, _) = auth_redirect(&b.get(&gw.url("/oauth2/start?rd=%2F")).await);
    let cb = b.get(&idp_walk(&b, &auth, "alice").await).await;
    assert_eq!(cb.status, 200, "{}", cb.dump());
    let cookie = format!(
        "_portcullis={}",
        b.cookie(&gw.url("/"), "_portcullis").expect("session")
    );
    // From the provider: no cookie (Strict), a cross-site navigation.
    let from_provider = [
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-mode", "navigate"),
    ];
    let r = send(
        "GET",
        &gw.url("/oauth2/signed_out"),
        &from_provider,
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert!(
        !r.text().contains("You have been signed out"),
        "{}",
        r.dump()
    );
    assert!(
        r.text()
            .contains("<meta http-equiv=\"refresh\" content=\"0;url=/oauth2/signed_out\">"),
        "{}",
        r.dump()
    );
    // Again from this site, the cookie sent: the session is still active, and it says so.
    let again = send(
        "GET",
        &gw.url("/oauth2/signed_out"),
        &[("sec-fetch-site", "same-origin"), ("cookie", &cookie)],
        Vec::new(),
    )
    .await;
    assert!(again.text().contains("still active"), "{}", again.dump());
    // Without a session here either, it is signed out (and there is no loop).
    let gone = send(
        "GET",
        &gw.url("/oauth2/signed_out"),
        &[("sec-fetch-site", "same-origin")],
        Vec::new(),
    )
    .await;
    assert!(
        gone.text().contains("You have been signed out"),
        "{}",
        gone.dump()
    );

    // Lax: a cross-site navigation carries the cookie; no detour.
    let s = Stack::start().await;
    let r = send(
        "GET",
        &s.gw.url("/oauth2/signed_out"),
        &from_provider,
        Vec::new(),
    )
    .await;
    assert!(
        r.text().contains("You have been signed out"),
        "{}",
        r.dump()
    );
}

/// The default (lax) callback still redirects, to the same kind of target.
#[tokio::test]
async fn lax_same_site_callback_still_redirects() {
    let s = Stack::start().await;
    let target = "/app/page?q=1&x=\"a\"";
    let b = Browser::new();
    let start = s.gw.url(&format!("/oauth2/start?rd={}", enc(target)));
    let (auth, _) = auth_redirect(&b.get(&start).await);
    let cb = b.get(&idp_walk(&b, &auth, "alice").await).await;
    assert_eq!(cb.status, 302, "{}", cb.dump());
    assert_eq!(cb.location(), Some(target));
    assert!(cb.body.is_empty(), "{}", cb.dump());
    let session = cb.set_cookie("_portcullis").expect("session cookie");
    assert_eq!(session.attr("samesite"), Some("Lax"), "{}", session.raw);
}
