//! Who gets through, over real sockets: `routes` (skip / api / login, methods, hosts,
//! per-route upstreams and `allow` rules), the `authorization` lists, path confusion
//! next to a public route, and the open-redirect corpus for `rd`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::corpus::{
    raw_exchange, raw_get, OPEN_REDIRECTS, PATH_CONFUSION, PATH_ENCODED_UTF8, PATH_LOOK_ALIKES,
    PATH_NOT_UTF8, PATH_STAYS_PUBLIC, SAME_ORIGIN,
};
use support::*;

use std::time::{Duration, Instant};

/// Identity and forwarding headers a client must never be able to hand the upstream.
const SPOOFED: &[(&str, &str)] = &[
    ("authorization", "Bearer forged-token"),
    ("x-forwarded-user", "mallory"),
    ("x-forwarded-email", "mallory@evil.test"),
    ("x-forwarded-groups", "admins"),
    ("x-forwarded-preferred-username", "mallory"),
    ("x_forwarded_user", "mallory"),
    ("x-auth-request-user", "mallory"),
];

const IDENTITY_HEADERS: &[&str] = &[
    "authorization",
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x_forwarded_user",
    "x-auth-request-user",
];

fn routes_yaml(other_upstream: u16) -> String {
    format!(
        r#"routes:
  - {{ path: "^/public/", methods: [GET, HEAD], auth: skip }}
  - {{ prefix: "/api/", auth: api }}
  - {{ prefix: "/admin/", allow: {{ groups: ["user-alice"] }} }}
  - {{ prefix: "/other/", upstream: "http://127.0.0.1:{other_upstream}", auth: skip }}
  - {{ prefix: "/hosted/", host: "app.example.com", auth: skip }}
  - {{ prefix: "/items/", methods: [DELETE], allow: {{ groups: ["user-alice"] }} }}
"#
    )
}

fn headers_with<'a>(
    base: &[(&'a str, &'a str)],
    more: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut v = base.to_vec();
    v.extend_from_slice(more);
    v
}

fn assert_no_identity(rec: &Recorded, what: &str) {
    for n in IDENTITY_HEADERS {
        assert!(
            rec.header(n).is_none(),
            "{what}: the upstream received {n}: {rec:?}"
        );
    }
}

/// Asserts the security headers every gateway-rendered page carries.
fn assert_page_headers(r: &Resp) {
    let csp = r.header("content-security-policy").unwrap_or("");
    assert!(csp.contains("default-src 'none'"), "CSP: {}", r.dump());
    assert!(csp.contains("frame-ancestors 'none'"), "CSP: {}", r.dump());
    assert_eq!(
        r.header("x-content-type-options"),
        Some("nosniff"),
        "{}",
        r.dump()
    );
    assert!(r.header("referrer-policy").is_some(), "{}", r.dump());
    assert_eq!(r.header("cache-control"), Some("no-store"), "{}", r.dump());
}

fn assert_401_json(r: &Resp, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.dump());
    assert_eq!(r.header("content-type"), Some("application/json"), "{what}");
    assert!(
        r.location().is_none(),
        "{what}: never a redirect: {}",
        r.dump()
    );
    assert!(
        r.set_cookies().iter().all(|c| !c.name.contains("_flow_")),
        "{what}: no login started: {}",
        r.dump()
    );
    assert_eq!(r.json()["error"], "unauthorized", "{what}");
}

#[tokio::test]
async fn skip_routes_forward_without_login_and_never_pass_identity() {
    let other = Upstream::start();
    let s = Stack::with(&[], &routes_yaml(other.port)).await;
    let alice = s.login("alice").await;
    let session = alice.cookie_header(&s.gw.url("/"));
    assert!(session.starts_with("_portcullis="), "{session}");
    let with_theme = format!("theme=dark; {session}");

    // Anonymous and with a valid session: the upstream sees neither the spoofed identity
    // nor the real one, and never the gateway's cookie.
    for cookie in [None, Some(with_theme.as_str())] {
        for method in ["GET", "HEAD"] {
            let what = format!("{method} /public/x (session: {})", cookie.is_some());
            let mut h = headers_with(SPOOFED, &[("accept", BROWSER_ACCEPT)]);
            if let Some(c) = cookie {
                h.push(("cookie", c));
            }
            let before = s.upstream.count();
            let r = send(method, &s.gw.url("/public/x?q=1"), &h, Vec::new()).await;
            assert_eq!(r.status, 200, "{what}: {}", r.dump());
            assert_eq!(r.header("x-upstream"), Some("echo"), "{what}");
            assert!(r.set_cookies().is_empty(), "{what}: {}", r.dump());
            assert_eq!(s.upstream.count(), before + 1, "{what}");
            let rec = s.upstream.last();
            assert_eq!(
                (rec.method.as_str(), rec.path.as_str()),
                (method, "/public/x")
            );
            assert_eq!(rec.query.as_deref(), Some("q=1"));
            assert_no_identity(&rec, &what);
            match cookie {
                Some(_) => assert_eq!(rec.header("cookie"), Some("theme=dark"), "{what}"),
                None => assert!(rec.header("cookie").is_none(), "{what}"),
            }
        }
    }

    // A method the route does not list is not public: a login route like any other. (Only
    // GET/HEAD are browser navigations, so without a session these are all 401, never 302.)
    let before = s.upstream.count();
    for (method, accept) in [
        ("POST", "application/json"),
        ("POST", BROWSER_ACCEPT),
        ("PUT", BROWSER_ACCEPT),
        ("DELETE", "*/*"),
    ] {
        let r = send(
            method,
            &s.gw.url("/public/x"),
            &headers_with(SPOOFED, &[("accept", accept)]),
            "a=b",
        )
        .await;
        assert_401_json(&r, &format!("anonymous {method} /public/x ({accept})"));
    }
    assert_eq!(
        s.upstream.count(),
        before,
        "unlisted methods reached the upstream"
    );
    // ... and with a session it is forwarded with the real identity.
    let r = alice
        .request(
            "POST",
            &s.gw.url("/public/x"),
            &headers_with(SPOOFED, &[("content-type", "text/plain")]),
            "hello",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let rec = s.upstream.last();
    assert_eq!(rec.method, "POST");
    assert_eq!(rec.header("x-forwarded-user"), Some("alice"));
    assert!(rec
        .header("authorization")
        .is_some_and(|a| a.starts_with("Bearer ") && a != "Bearer forged-token"));
    assert!(rec.header("x_forwarded_user").is_none(), "{rec:?}");
    assert_eq!(other.count(), 0);
}

#[tokio::test]
async fn api_routes_answer_401_and_allow_rules_answer_403() {
    let other = Upstream::start();
    let s = Stack::with(&[], &routes_yaml(other.port)).await;

    // /api/: 401 JSON even for a browser navigation; never a redirect.
    for headers in [
        vec![("accept", BROWSER_ACCEPT)],
        vec![("accept", "text/html"), ("sec-fetch-mode", "navigate")],
        vec![("accept", "application/json")],
        vec![],
    ] {
        let r = send("GET", &s.gw.url("/api/x"), &headers, Vec::new()).await;
        assert_401_json(&r, &format!("GET /api/x {headers:?}"));
    }
    // A form a browser sends without a session: 401 too, never a redirect (the body would
    // be lost); on a login route as a page offering to sign in and return to the form's page,
    // on an API route as JSON.
    let form = |referer: String| {
        vec![
            ("accept", BROWSER_ACCEPT.to_string()),
            ("sec-fetch-mode", "navigate".to_string()),
            ("sec-fetch-dest", "document".to_string()),
            (
                "content-type",
                "application/x-www-form-urlencoded".to_string(),
            ),
            ("referer", referer),
        ]
    };
    let headers = form(s.gw.url("/orders/new?draft=1"));
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = send("POST", &s.gw.url("/orders"), &headers, b"qty=1".to_vec()).await;
    assert_eq!(r.status, 401, "{}", r.dump());
    assert!(r.location().is_none(), "{}", r.dump());
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(
        r.text()
            .contains("href=\"/oauth2/start?rd=%2Forders%2Fnew%3Fdraft%3D1\""),
        "{}",
        r.dump()
    );
    // The same form sent from another site (which the browser sends no session with): the
    // page says so, rather than that the session ended.
    let mut cross = headers.clone();
    cross.push(("sec-fetch-site", "cross-site"));
    let r = send("POST", &s.gw.url("/orders"), &cross, b"qty=1".to_vec()).await;
    assert_eq!(r.status, 401, "{}", r.dump());
    assert!(r.text().contains("came from another site"), "{}", r.dump());
    assert!(!r.text().contains("session has ended"), "{}", r.dump());
    let r = send("POST", &s.gw.url("/api/x"), &headers, b"qty=1".to_vec()).await;
    assert_401_json(&r, "a form sent to an API route");
    // A cookie that does not open is no session (and is cleared), still 401.
    let r = send(
        "GET",
        &s.gw.url("/api/x"),
        &[
            ("accept", BROWSER_ACCEPT),
            ("cookie", "_portcullis=forged.value"),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.dump());
    assert!(r.location().is_none());
    assert!(
        r.set_cookie("_portcullis").is_some_and(|c| c.is_removal()),
        "the bad cookie is cleared: {}",
        r.dump()
    );
    // /admin/ anonymous: a login route (browser 302, API 401).
    let r = send(
        "GET",
        &s.gw.url("/admin/"),
        &[("accept", BROWSER_ACCEPT)],
        Vec::new(),
    )
    .await;
    let (auth, _) = auth_redirect(&r);
    assert!(auth.starts_with(&s.idp.url("/auth?")), "{auth}");
    let r = send(
        "GET",
        &s.gw.url("/admin/"),
        &[("accept", "application/json")],
        Vec::new(),
    )
    .await;
    assert_401_json(&r, "anonymous API GET /admin/");
    assert_eq!(s.upstream.count(), 0);

    let alice = s.login("alice").await;
    let bob = s.login("bob").await;
    assert_eq!(s.upstream.count(), 2, "the two logins landed on /");

    // /api/ with a session: forwarded with the identity.
    let r = alice.api_get(&s.gw.url("/api/x")).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(s.upstream.last().path, "/api/x");
    assert_eq!(s.upstream.last().header("x-forwarded-user"), Some("alice"));

    // /admin/ allows the group user-alice: alice passes, bob gets a 403 page.
    let r = alice.get(&s.gw.url("/admin/")).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let rec = s.upstream.last();
    assert_eq!(rec.path, "/admin/");
    assert_eq!(rec.header("x-forwarded-groups"), Some("users,user-alice"));
    let before = s.upstream.count();
    // The same target however it is spelt (normalised before the rules apply).
    for path in [
        "/admin/",
        "/admin/users?id=1",
        "/x/../admin/",
        "//admin/",
        "/admin/./",
        "/%61dmin/",
        "/public/../admin/",
    ] {
        for accept in [BROWSER_ACCEPT, "application/json"] {
            let r = bob
                .request("GET", &s.gw.url(path), &[("accept", accept)], Vec::new())
                .await;
            let what = format!("bob GET {path} ({accept})");
            assert_eq!(r.status, 403, "{what}: {}", r.dump());
            // A page for a person, the same in JSON for a program.
            let page = accept == BROWSER_ACCEPT;
            assert_eq!(
                r.header("content-type"),
                Some(if page {
                    "text/html; charset=utf-8"
                } else {
                    "application/json"
                }),
                "{what}"
            );
            let body = r.text();
            if !page {
                assert_eq!(r.json()["error"], "forbidden", "{what}: {body}");
            }
            assert!(body.contains("Access denied"), "{what}: {body}");
            assert!(
                body.contains("not on the list of users allowed here"),
                "{what}: {body}"
            );
            assert!(body.contains("/oauth2/sign_out"), "{what}: {body}");
            assert_page_headers(&r);
            assert!(r.location().is_none(), "{what}");
            assert!(
                r.set_cookies().is_empty(),
                "{what}: the session is kept: {}",
                r.dump()
            );
        }
    }
    assert_eq!(
        s.upstream.count(),
        before,
        "a denied request reached the upstream"
    );
    // Bob may use the rest of the app.
    let r = bob.get(&s.gw.url("/elsewhere")).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(s.upstream.last().header("x-forwarded-user"), Some("bob"));
    assert_eq!(other.count(), 0);

    // A method rule is not sidestepped by a method override (a DELETE to Rails, Laravel,
    // Symfony, Express, ASP.NET): a POST whose override falls under another route is refused.
    let json = [("accept", "application/json")];
    let r = bob
        .request("DELETE", &s.gw.url("/items/1"), &json, Vec::new())
        .await;
    assert_eq!(r.status, 403, "{}", r.dump());
    let before = s.upstream.count();
    // Nor by the method's spelling (Django, Flask and Symfony upper-case it; legacy apps may
    // take any non-GET as a write): refused, also on a public route.
    for method in ["delete", "Delete"] {
        let r = bob
            .request(method, &s.gw.url("/items/1"), &json, Vec::new())
            .await;
        assert_eq!(r.status, 400, "bob {method}: {}", r.dump());
    }
    for method in ["get", "Get", "post"] {
        let r = send(method, &s.gw.url("/public/x"), &json, Vec::new()).await;
        assert_eq!(r.status, 400, "anonymous {method} /public/x: {}", r.dump());
    }
    for name in [
        "x-http-method-override",
        "X-HTTP-Method",
        "x-method-override",
        "X_HTTP_Method_Override",
    ] {
        for method in ["DELETE", "delete"] {
            let h = [("accept", "application/json"), (name, method)];
            for post in ["POST", "post"] {
                let r = bob
                    .request(post, &s.gw.url("/items/1"), &h, Vec::new())
                    .await;
                assert_eq!(r.status, 400, "bob {post} + {name}: {method}: {}", r.dump());
            }
        }
    }
    // Also as PHP reads it: leading spaces dropped (`+` or `%20`), the name cut at a NUL or
    // a `[`, a `.` for the `_`.
    for query in [
        "_method",
        ".method",
        "+method",
        "%20method",
        "[method",
        "%20_method",
        "+_method",
        "_method%00",
        "_method%00junk",
        "_method%5B%5D",
    ] {
        let r = bob
            .request(
                "POST",
                &s.gw.url(&format!("/items/1?{query}=DELETE")),
                &json,
                Vec::new(),
            )
            .await;
        assert_eq!(r.status, 400, "bob POST ?{query}=DELETE: {}", r.dump());
    }
    // Nor a skip route's: an anonymous POST taken as a GET of /public/.
    let h = [
        ("accept", "application/json"),
        ("x-http-method-override", "GET"),
    ];
    let r = send("POST", &s.gw.url("/public/x"), &h, Vec::new()).await;
    assert_eq!(r.status, 400, "{}", r.dump());
    // Nor a GET or HEAD of the public route taken as a DELETE (Flask's documented override
    // middleware honours the header on any method).
    for method in ["GET", "HEAD"] {
        let h = [
            ("accept", "application/json"),
            ("x-http-method-override", "DELETE"),
        ];
        let r = send(method, &s.gw.url("/public/x"), &h, Vec::new()).await;
        assert_eq!(r.status, 400, "anonymous {method} + override: {}", r.dump());
        let r = send(
            method,
            &s.gw.url("/public/x?_method=DELETE"),
            &json,
            Vec::new(),
        )
        .await;
        assert_eq!(r.status, 400, "anonymous {method} ?_method: {}", r.dump());
    }
    assert_eq!(
        s.upstream.count(),
        before,
        "an override reached the upstream"
    );
    // An override to the request's own method changes nothing.
    let h = [
        ("accept", "application/json"),
        ("x-http-method-override", "GET"),
    ];
    let r = send("GET", &s.gw.url("/public/x"), &h, Vec::new()).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    // An override under the same route passes; what a forward-auth proxy says of a method
    // is for the gateway only.
    let h = [
        ("accept", "application/json"),
        ("x-http-method-override", "PATCH"),
        ("x-forwarded-method", "GET"),
        ("x-original-method", "GET"),
    ];
    let r = bob
        .request("POST", &s.gw.url("/elsewhere"), &h, Vec::new())
        .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let rec = s.upstream.last();
    assert_eq!(rec.header("x-http-method-override"), Some("PATCH"));
    assert_eq!(rec.header("x-forwarded-method"), None);
    assert_eq!(rec.header("x-original-method"), None);
}

#[tokio::test]
async fn route_upstreams_and_hosts() {
    let other = Upstream::start();
    let s = Stack::with(&[], &routes_yaml(other.port)).await;

    // /other/: its own upstream, no login.
    let r = send(
        "GET",
        &s.gw.url("/other/x?y=1"),
        &headers_with(SPOOFED, &[("accept", BROWSER_ACCEPT)]),
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(other.count(), 1);
    let rec = other.last();
    assert_eq!(rec.path, "/other/x");
    assert_eq!(rec.query.as_deref(), Some("y=1"));
    assert_no_identity(&rec, "/other/x");
    assert_eq!(s.upstream.count(), 0, "/other/ went to the main upstream");

    // /hosted/: public only under Host app.example.com (any case, any port).
    for host in [
        "app.example.com",
        "APP.Example.COM:8443",
        "app.example.com:80",
    ] {
        let r = send(
            "GET",
            &s.gw.url("/hosted/x"),
            &headers_with(SPOOFED, &[("accept", BROWSER_ACCEPT), ("host", host)]),
            Vec::new(),
        )
        .await;
        assert_eq!(r.status, 200, "Host {host}: {}", r.dump());
        let rec = s.upstream.last();
        assert_eq!(rec.path, "/hosted/x");
        assert_no_identity(&rec, host);
    }
    assert_eq!(s.upstream.count(), 3);
    for host in [
        None,
        Some("evil.example.com"),
        Some("app.example.com.evil.test"),
    ] {
        let mut h = vec![("accept", BROWSER_ACCEPT)];
        if let Some(host) = host {
            h.push(("host", host));
        }
        let r = send("GET", &s.gw.url("/hosted/x"), &h, Vec::new()).await;
        assert_eq!(r.status, 302, "Host {host:?}: {}", r.dump());
        let mut h = vec![("accept", "application/json")];
        if let Some(host) = host {
            h.push(("host", host));
        }
        let r = send("GET", &s.gw.url("/hosted/x"), &h, Vec::new()).await;
        assert_401_json(&r, &format!("/hosted/x with Host {host:?}"));
    }
    assert_eq!(s.upstream.count(), 3, "a wrong Host reached the upstream");

    // A fully qualified name's trailing dot names the same site (nginx and Apache drop it).
    let r = send(
        "GET",
        &s.gw.url("/hosted/x"),
        &[
            ("accept", "application/json"),
            ("host", "app.example.com.:80"),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 200, "trailing dot: {}", r.dump());
    assert_eq!(s.upstream.count(), 4);

    // Host values that a name-based upstream reads differently than the route matcher
    // would (brackets around a name, userinfo, lists, paths): refused, never matched.
    for host in [
        "[app.example.com]",
        "[app.example.com]:80",
        "[app.example.com]evil",
        "app.example.com, evil.test",
        "x@app.example.com",
        "app.example.com/x",
        "a b",
    ] {
        let h = [("accept", "application/json"), ("host", host)];
        let r = send("GET", &s.gw.url("/hosted/x"), &h, Vec::new()).await;
        assert_eq!(r.status, 400, "Host {host:?}: {}", r.dump());
        let r = send_h2("GET", &s.gw.url("/hosted/x"), &h, Vec::new()).await;
        let status = r.as_ref().map(|r| r.status.as_u16());
        assert!(
            matches!(status, Ok(400) | Err(_)),
            "h2c Host {host:?}: {status:?}"
        );
    }
    assert_eq!(
        s.upstream.count(),
        4,
        "an invalid Host reached the upstream"
    );

    // `Connection` cannot name Host away: the public route was chosen by Host, and a
    // name-based upstream must see that host, not the upstream's own authority (its
    // default site, which may be the protected one).
    let r = raw_exchange(
        s.gw.port,
        &raw_get(
            "/hosted/x",
            "app.example.com",
            &["Connection: Host, X-Other", "X-Other: 1"],
        ),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(r.status, Some(200), "{}", r.text);
    assert_eq!(s.upstream.count(), 5);
    let rec = s.upstream.last();
    assert_eq!(rec.header_all("host"), ["app.example.com"], "{rec:?}");
    assert_eq!(rec.header("x-forwarded-host"), Some("app.example.com"));
    assert!(rec.header("x-other").is_none(), "{rec:?}");
}

/// One provider, several gateways that differ only in their `authorization` block.
/// A route's rules hold for every spelling of its paths that apps read as one: escaped
/// sub-delimiters, spaces and non-ASCII characters, in the request or in the config, and
/// whether the app routes on the path decoded (most) or as sent (Express, Rails). A public
/// route takes only a request both readings put there.
#[tokio::test]
async fn every_spelling_of_a_routes_path_meets_its_rules() {
    let routes = r#"routes:
  - { prefix: "/wiki/Special:", allow: { groups: ["admins"] } }
  - { prefix: "/reports/q&a/", allow: { groups: ["admins"] } }
  - { prefix: "/my docs/", allow: { groups: ["admins"] } }
  - { prefix: "/caf%c3%a9/", allow: { groups: ["admins"] } }
  - { path: "^/tr[eè]s/", allow: { groups: ["admins"] } }
  - { path: "^/d%C3%A9j%C3%A0/", allow: { groups: ["admins"] } }
  - { path: "^/api/[^ /]+/secret", allow: { groups: ["admins"] } }
  - { path: "^/search\\?public", auth: skip }
  - { prefix: "/@scope/", auth: skip }
"#;
    let s = Stack::with(&[], routes).await;
    let b = s.login("alice").await;
    let cookie = b.cookie_header(&s.gw.url("/"));
    let get = |target: &str| {
        let url = s.gw.url(target);
        let cookie = cookie.clone();
        async move { send("GET", &url, &[("cookie", &cookie)], Vec::new()).await }
    };
    let r = get("/wiki/Main_Page").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let reached = s.upstream.count();
    for target in [
        "/wiki/Special:Userrights",
        "/wiki/Special%3AUserrights",
        "/wiki/Special%3aUserrights",
        "/reports/q&a/1",
        "/reports/q%26a/1",
        "/my%20docs/x",
        "/caf%C3%A9/x",
        "/caf%c3%a9/x",
        "/tr%C3%A8s/x",
        "/tr%65s/x",
        "/d%C3%A9j%C3%A0/x",
        "/api/a%20b/secret",
    ] {
        let r = get(target).await;
        assert_eq!(r.status, 403, "{target}: {}", r.dump());
    }
    assert_eq!(
        s.upstream.count(),
        reached,
        "a denied request reached the app"
    );
    // Public routes: the spelling they were written for, not another.
    let anonymous = |target: &str| {
        let url = s.gw.url(target);
        async move { send("GET", &url, &[("accept", "application/json")], Vec::new()).await }
    };
    assert_eq!(anonymous("/@scope/x").await.status, 200);
    for target in ["/search%3Fpublic=1", "/%40scope/x"] {
        let r = anonymous(target).await;
        assert_eq!(r.status, 401, "{target}: {}", r.dump());
    }
}

#[tokio::test]
async fn authorization_lists_decide_after_login() {
    let configs: Vec<(&str, &str)> = vec![
        (
            "domain example.test",
            r#"authorization: { allowed_email_domains: ["example.test"] }"#,
        ),
        (
            "domain corp.com",
            r#"authorization: { allowed_email_domains: ["corp.com", "sub.example.test"] }"#,
        ),
        (
            "emails + groups",
            r#"authorization: { allowed_emails: ["BOB@Example.Test"], allowed_groups: ["user-carol"] }"#,
        ),
        (
            "group users",
            r#"authorization: { allowed_groups: ["users"] }"#,
        ),
        (
            "missing groups claim",
            r#"authorization: { allowed_groups: ["users"], groups_claim: "roles" }"#,
        ),
    ];
    let ports: Vec<u16> = configs.iter().map(|_| free_port()).collect();
    let uris: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}/oauth2/callback"))
        .collect();
    let idp = Idp::start(&[("IDP_REDIRECT_URIS", &uris.join(","))]).await;
    let upstream = Upstream::start();
    let mut gws = Vec::new();
    for ((_, yaml), port) in configs.iter().zip(&ports) {
        gws.push(
            Gateway::start(GatewayOpts {
                extra: yaml.to_string(),
                ..GatewayOpts::new(*port, &idp, &upstream.url())
            })
            .await,
        );
    }
    // (gateway, user, allowed?)
    let cases: &[(usize, &str, bool)] = &[
        (0, "alice", true),
        (1, "alice", false),
        (2, "alice", false),
        (2, "bob", true),
        (2, "carol", true),
        (3, "alice", true),
        (4, "alice", false),
    ];
    for &(i, user, allowed) in cases {
        let what = format!("{user} at gateway `{}`", configs[i].0);
        let b = Browser::new();
        let before = upstream.count();
        let r = login(&b, &gws[i], "/", user).await;
        if allowed {
            assert_eq!(r.status, 200, "{what}: {}", r.dump());
            assert_eq!(upstream.count(), before + 1, "{what}");
            assert_eq!(
                upstream.last().header("x-forwarded-user"),
                Some(user),
                "{what}"
            );
        } else {
            assert_eq!(r.status, 403, "{what}: {}", r.dump());
            assert!(
                r.text().contains("not on the list of users allowed here"),
                "{what}: {}",
                r.dump()
            );
            assert_page_headers(&r);
            // API callers get the same 403 (they are logged in), not a 401.
            let api = b.api_get(&gws[i].url("/data")).await;
            assert_eq!(api.status, 403, "{what}: {}", api.dump());
            assert_eq!(upstream.count(), before, "{what}: reached the upstream");
        }
    }
    // Under a groups claim the provider does not send, nobody has any group.
    let b = Browser::new();
    login(&b, &gws[4], "/", "alice").await;
    let me = b.api_get(&gws[4].url("/oauth2/userinfo")).await;
    assert_eq!(me.status, 200, "{}", me.dump());
    assert_eq!(me.json()["groups"], serde_json::json!([]), "{}", me.dump());
}

/// How a request target fared.
fn row(target: &str, accept: &str, status: Option<u16>, reached: usize) -> String {
    format!("{target:?} (accept {accept}): status {status:?}, upstream requests {reached}")
}

#[tokio::test]
async fn path_confusion_never_reaches_a_protected_path_unauthenticated() {
    let s = Stack::with(&[], r#"routes: [ { path: "^/public/", auth: skip } ]"#).await;
    let port = s.gw.port;
    let host = format!("127.0.0.1:{port}");
    let deadline = Duration::from_secs(10);
    let mut bad = Vec::new();
    let mut table = Vec::new();
    for target in PATH_CONFUSION {
        for (accept, allowed) in [
            ("text/html", &[400u16, 302][..]),
            ("application/json", &[400u16, 401][..]),
        ] {
            let before = s.upstream.count();
            let r = raw_exchange(
                port,
                &raw_get(target, &host, &[&format!("Accept: {accept}")]),
                deadline,
            )
            .await;
            let reached = s.upstream.count() - before;
            let line = row(target, accept, r.status, reached);
            if reached != 0 || !r.status.is_some_and(|st| allowed.contains(&st)) {
                bad.push(format!("{line}\n{}", r.text));
            }
            if r.status == Some(302) {
                let loc = r.header("location").unwrap_or_default();
                if !loc.starts_with(&s.idp.url("/auth?")) {
                    bad.push(format!("{line}: redirect to {loc}"));
                }
            }
            table.push(line);
        }
    }
    // Targets that decode (once) to a path under /public/ may be forwarded, but only there.
    for target in PATH_STAYS_PUBLIC {
        let before = s.upstream.count();
        let r = raw_exchange(port, &raw_get(target, &host, &[]), deadline).await;
        let reached = s.upstream.count() - before;
        let line = row(target, "-", r.status, reached);
        if reached > 0 {
            let rec = s.upstream.last();
            if r.status != Some(200)
                || !rec.path.starts_with("/public/")
                || rec.path.split('/').any(|seg| seg == ".." || seg == ".")
            {
                bad.push(format!("{line}: upstream got {:?}", rec.path));
            }
        } else if !r.status.is_some_and(|st| [400, 401].contains(&st)) {
            bad.push(format!("{line}\n{}", r.text));
        }
        table.push(format!(
            "{line} -> {:?}",
            s.upstream.records().last().map(|r| r.path.clone())
        ));
    }
    // Escapes that do not decode to UTF-8, and look-alikes of separators and dot segments:
    // 400, although the route needs no login.
    for target in PATH_NOT_UTF8.iter().chain(PATH_LOOK_ALIKES) {
        let before = s.upstream.count();
        let r = raw_exchange(port, &raw_get(target, &host, &[]), deadline).await;
        let reached = s.upstream.count() - before;
        let line = row(target, "-", r.status, reached);
        if reached != 0 || r.status != Some(400) {
            bad.push(format!("{line}\n{}", r.text));
        }
        table.push(line);
    }
    // The same over HTTP/2 (h2c), where the path is a pseudo-header.
    for target in [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/..%2fadmin",
        "//public/../admin",
    ] {
        let before = s.upstream.count();
        let r = send_h2(
            "GET",
            &s.gw.url(target),
            &[("accept", "application/json")],
            Vec::new(),
        )
        .await;
        let reached = s.upstream.count() - before;
        let status = r.as_ref().ok().map(|r| r.status.as_u16());
        let line = row(target, "h2", status, reached);
        if reached != 0 || !status.is_some_and(|st| [400, 401].contains(&st)) {
            bad.push(line.clone());
        }
        table.push(line);
    }
    // Absolute-form targets and the asterisk form.
    for raw in [
        format!("GET http://{host}/public/../admin HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        format!("GET http://{host}/public/%2e%2e/admin HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        format!("OPTIONS * HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    ] {
        let before = s.upstream.count();
        let r = raw_exchange(port, raw.as_bytes(), deadline).await;
        let reached = s.upstream.count() - before;
        let line = row(raw.lines().next().unwrap_or(""), "-", r.status, reached);
        if reached != 0 || !r.status.is_some_and(|st| [400, 401].contains(&st)) {
            bad.push(format!("{line}\n{}", r.text));
        }
        table.push(line);
    }
    assert!(
        bad.is_empty(),
        "path confusion:\n{}\n\nall results:\n{}",
        bad.join("\n"),
        table.join("\n")
    );
    // Only the PATH_STAYS_PUBLIC requests, if any, reached the upstream, and all under /public/.
    for rec in s.upstream.records() {
        assert!(rec.path.starts_with("/public/"), "{rec:?}");
        assert_no_identity(&rec, &rec.path);
    }

    // What the upstream gets is the normalised path (query untouched).
    for &(target, want) in PATH_ENCODED_UTF8.iter().chain(&[
        ("/public/./x", "/public/x"),
        ("/public//x", "/public/x"),
        ("/public/a/../x", "/public/x"),
        ("/public/%78", "/public/x"),
        ("/public/%7e%41", "/public/~A"),
        ("/public/a%3fb", "/public/a%3Fb"),
        ("/./public/x", "/public/x"),
        ("//public/x", "/public/x"),
    ]) {
        let r = raw_exchange(
            port,
            &raw_get(&format!("{target}?a=../..&b=%2F"), &host, &[]),
            deadline,
        )
        .await;
        assert_eq!(r.status, Some(200), "{target}: {}", r.text);
        let rec = s.upstream.last();
        assert_eq!(rec.path, want, "{target}");
        assert_eq!(rec.query.as_deref(), Some("a=../..&b=%2F"), "{target}");
    }
}

/// Does `location` (from a callback on `base`) keep the browser on the gateway's origin or
/// an allowed domain? Resolved the way browsers do (the WHATWG URL standard).
fn lands_safely(
    location: &str,
    base: &url::Url,
    allowed_suffix: Option<&str>,
) -> Result<(), String> {
    if location
        .bytes()
        .any(|b| b == b'\\' || b <= 0x20 || b >= 0x7f)
    {
        return Err("backslash, whitespace, control or non-ASCII in Location".into());
    }
    // A client that resolves dot segments as text (`/x/..//evil.com` to `//evil.com`) would
    // leave the origin where a browser stays.
    let path = location.split(['?', '#']).next().unwrap_or_default();
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    if decoded.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("dot segments in Location".into());
    }
    let target = base
        .join(location)
        .map_err(|e| format!("a browser cannot resolve it: {e}"))?;
    if !matches!(target.scheme(), "http" | "https") {
        return Err(format!("scheme {}", target.scheme()));
    }
    if !target.username().is_empty() || target.password().is_some() {
        return Err("userinfo".into());
    }
    let host = target.host_str().unwrap_or("");
    if target.origin() == base.origin() {
        return Ok(());
    }
    if let Some(suffix) = allowed_suffix {
        let bare = suffix.trim_start_matches('.');
        if host == bare || host.ends_with(suffix) {
            return Ok(());
        }
    }
    Err(format!("lands on {target}"))
}

/// A gateway whose public origin is `http://localhost:<port>` (so that IP literals are
/// foreign hosts), reached by the tests on 127.0.0.1.
struct RedirectGw {
    gw: Gateway,
    public: String,
}

impl RedirectGw {
    fn base(&self) -> url::Url {
        url::Url::parse(&format!("{}/oauth2/callback", self.public)).unwrap()
    }

    /// `/oauth2/start?rd=<rd>`, the provider (an already signed-in session there), the
    /// callback: returns the callback's Location.
    async fn land(&self, b: &Browser, idp: &Idp, rd: &str) -> String {
        let start = b
            .get(&self.gw.url(&format!("/oauth2/start?rd={}", enc(rd))))
            .await;
        let (auth, _) = auth_redirect(&start);
        assert!(auth.starts_with(&idp.url("/auth?")), "rd={rd:?}: {auth}");
        let callback = idp_walk(b, &auth, "alice").await;
        assert!(
            callback.starts_with(&format!("{}/oauth2/callback?", self.public)),
            "rd={rd:?}: {callback}"
        );
        let callback = callback.replacen(&self.public, &self.gw.origin(), 1);
        let cb = b.get(&callback).await;
        assert_eq!(cb.status, 302, "rd={rd:?}: {}", cb.dump());
        assert!(
            cb.set_cookie("_portcullis")
                .is_some_and(|c| !c.is_removal()),
            "rd={rd:?}: no session: {}",
            cb.dump()
        );
        cb.location()
            .unwrap_or_else(|| panic!("rd={rd:?}: callback without Location: {}", cb.dump()))
            .to_string()
    }
}

#[tokio::test]
async fn open_redirect_corpus_never_leaves_the_site() {
    let t0 = Instant::now();
    let ports = [free_port(), free_port()];
    let publics: Vec<String> = ports
        .iter()
        .map(|p| format!("http://localhost:{p}"))
        .collect();
    let uris: Vec<String> = publics
        .iter()
        .map(|p| format!("{p}/oauth2/callback"))
        .collect();
    let idp = Idp::start(&[("IDP_REDIRECT_URIS", &uris.join(","))]).await;
    let upstream = Upstream::start();
    let mut gws = Vec::new();
    for (i, (port, public)) in ports.iter().zip(&publics).enumerate() {
        let mut opts = GatewayOpts::new(*port, &idp, &upstream.url());
        if i == 0 {
            opts.extra = r#"allowed_redirect_domains: [".example.com"]"#.to_string();
        }
        opts.env.push((
            "PORTCULLIS_REDIRECT_URL".to_string(),
            format!("{public}/oauth2/callback"),
        ));
        gws.push(RedirectGw {
            gw: Gateway::start(opts).await,
            public: public.clone(),
        });
    }
    let (with_domains, plain) = (&gws[0], &gws[1]);
    assert!(OPEN_REDIRECTS.len() >= 60);

    // Controls on the gateway with `allowed_redirect_domains: [".example.com"]`.
    let b = Browser::new();
    for (rd, want) in [
        ("/deep/link?a=b", "/deep/link?a=b".to_string()),
        (
            "https://app.example.com/x",
            "https://app.example.com/x".to_string(),
        ),
        ("https://example.com/", "https://example.com/".to_string()),
        (
            "http://a.b.example.com/p?q=1#f",
            "http://a.b.example.com/p?q=1#f".to_string(),
        ),
        ("https://example.com.evil.com", "/".to_string()),
        ("https://app.example.com@evil.com", "/".to_string()),
        (
            &format!("{}/own", with_domains.public),
            format!("{}/own", with_domains.public),
        ),
        // A path the gateway refuses (400) is no place to land.
        ("/x;url=http://evil.example/", "/".to_string()),
        (&format!("{}/own;a=b", with_domains.public), "/".to_string()),
        ("", "/".to_string()),
    ] {
        assert_eq!(with_domains.land(&b, &idp, rd).await, want, "rd={rd:?}");
    }
    // Without allowed domains, another host is never honoured.
    let b2 = Browser::new();
    assert_eq!(
        plain.land(&b2, &idp, "https://app.example.com/x").await,
        "/"
    );
    assert_eq!(
        plain.land(&b2, &idp, "/deep/link?a=b").await,
        "/deep/link?a=b"
    );

    let mut bad = Vec::new();
    let mut table = Vec::new();
    for (g, suffix, browser) in [(with_domains, Some(".example.com"), &b), (plain, None, &b2)] {
        // The gateway's own host and port under another scheme, the provider on the same host,
        // the other gateway: each another origin.
        let own = url::Url::parse(&g.public).unwrap();
        let port = own.port().unwrap();
        let same_host: Vec<String> = vec![
            format!("https://localhost:{port}/x"),
            format!("https://localhost:{port}"),
            format!("ws://localhost:{port}/x"),
            format!("http://localhost:{}/", idp.port),
            format!("http://localhost:{}/x", upstream.port),
        ]
        .into_iter()
        .chain(
            gws.iter()
                .filter(|o| o.public != g.public)
                .map(|o| format!("{}/x", o.public)),
        )
        .collect();
        let payloads = OPEN_REDIRECTS
            .iter()
            .map(|rd| rd.to_string())
            .chain(same_host);
        for rd in payloads {
            let rd = rd.as_str();
            let loc = g.land(browser, &idp, rd).await;
            let verdict = lands_safely(&loc, &g.base(), suffix);
            table.push(format!("{:<28} rd={rd:?} -> {loc:?}", g.public));
            if let Err(why) = verdict {
                bad.push(format!("{} rd={rd:?} -> Location {loc:?}: {why}", g.public));
            }
        }
        for rd in SAME_ORIGIN {
            let loc = g.land(browser, &idp, rd).await;
            table.push(format!("{:<28} rd={rd:?} -> {loc:?}", g.public));
            if let Err(why) = lands_safely(&loc, &g.base(), None) {
                bad.push(format!("{} rd={rd:?} -> Location {loc:?}: {why}", g.public));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "open redirects:\n{}\n\nall:\n{}",
        bad.join("\n"),
        table.join("\n")
    );
    eprintln!(
        "{}\n{} redirect targets checked in {:?}",
        table.join("\n"),
        table.len(),
        t0.elapsed()
    );
    assert_eq!(upstream.count(), 0);
}

/// Forward auth decides by the original request a trusted proxy names, and refuses to
/// guess when that request is ambiguous: a guess could pick a laxer route than the one the
/// upstream serves.
/// Forward-auth holds method rules under method overrides too: a request the client asked to
/// be taken as another method (the proxy passes the client's headers on) must fall under the same
/// route either way, as for proxied requests.
#[tokio::test]
async fn forward_auth_holds_method_rules_under_method_overrides() {
    let routes = r#"routes:
  - { prefix: "/admin/", allow: { groups: ["admins"] } }
  - { prefix: "/open/", methods: ["GET", "HEAD"], auth: skip }
trusted_proxies: ["127.0.0.1/32"]
"#;
    let s = Stack::with(&[], routes).await;
    let cookie = login_cookie(&s.gw, "alice").await;
    let (port, host) = (s.gw.port, format!("127.0.0.1:{}", s.gw.port));
    let status = |target: &str, extra: &[&str]| {
        let mut headers = vec![
            format!("X-Original-URL: http://app.test{target}"),
            "X-Forwarded-Method: POST".to_string(),
            format!("Cookie: {cookie}"),
        ];
        headers.extend(extra.iter().map(|h| h.to_string()));
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let req = raw_get("/oauth2/auth", &host, &headers);
        async move {
            raw_exchange(port, &req, Duration::from_secs(10))
                .await
                .status
        }
    };
    for over in [
        "X-HTTP-Method-Override: GET",
        "X_HTTP_Method_Override: GET",
        "X-Method-Override: get",
    ] {
        assert_eq!(status("/open/x", &[over]).await, Some(400), "{over}");
    }
    assert_eq!(status("/open/x?_method=GET", &[]).await, Some(400));
    // A GET of the public route the client asked to be taken as a DELETE.
    let get_as_delete = |extra: &'static str| {
        let headers = [
            "X-Original-URL: http://app.test/open/x",
            "X-Forwarded-Method: GET",
            extra,
        ];
        let req = raw_get("/oauth2/auth", &host, &headers);
        async move {
            raw_exchange(port, &req, Duration::from_secs(10))
                .await
                .status
        }
    };
    assert_eq!(
        get_as_delete("X-HTTP-Method-Override: DELETE").await,
        Some(400)
    );
    assert_eq!(get_as_delete("X-Nothing: 1").await, Some(202));
    // The same route either way: its rules decide.
    let over = "X-HTTP-Method-Override: DELETE";
    assert_eq!(status("/admin/x", &[over]).await, Some(403));
    assert_eq!(status("/other", &[over]).await, Some(202));
}

#[tokio::test]
async fn forward_auth_decides_by_the_original_request_and_refuses_ambiguous_ones() {
    let routes = r#"routes:
  - { prefix: "/public/", auth: skip }
  - { prefix: "/admin/", allow: { groups: ["admins"] } }
  - { prefix: "/hosted/", host: "old.example.com", auth: skip }
  - { prefix: "/open/", methods: ["GET", "HEAD"], auth: skip }
  - { prefix: "/writes/", methods: ["POST"], allow: { groups: ["admins"] } }
"#;
    let s = Stack::with(
        &[],
        &format!("{routes}trusted_proxies: [\"127.0.0.1/32\"]\n"),
    )
    .await;
    let cookie = login_cookie(&s.gw, "alice").await;
    let port = s.gw.port;
    let host = format!("127.0.0.1:{port}");
    let ask = |target: &str, extra: &[&str]| {
        let mut headers = vec![format!("Cookie: {cookie}")];
        headers.extend(extra.iter().map(|h| h.to_string()));
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        raw_get(target, &host, &headers)
    };
    // Boxed: this test awaits it at some thirty places, each of which would hold it inline in
    // the test's future (too big for a test thread's stack in a debug build).
    let status = |req: Vec<u8>| {
        Box::pin(async move {
            raw_exchange(port, &req, Duration::from_secs(10))
                .await
                .status
        })
    };
    let url = |p: &str| format!("X-Original-URL: http://app.test{p}");

    // Named plainly: the original route decides.
    assert_eq!(
        status(ask("/oauth2/auth", &[&url("/other")])).await,
        Some(202)
    );
    assert_eq!(
        status(ask("/oauth2/auth", &[&url("/admin/x")])).await,
        Some(403)
    );
    assert_eq!(
        status(ask("/oauth2/auth", &["X-Forwarded-Uri: /admin//x"])).await,
        Some(403)
    );
    assert_eq!(
        status(ask("/oauth2/auth", &[&url("/public/../admin/x")])).await,
        Some(403)
    );
    // Ambiguous: refused, never taken for "no route".
    for bad in [
        url("/admin%2fx"),
        url("/admin%2Fx"),
        url("/public/..%2fadmin/x"),
        url("/admin;x/y"),
        url("/admin%00/x"),
        url("/admin\\x"),
        "X-Forwarded-Uri: /admin/<x>".to_string(),
        "X-Forwarded-Uri: /admin/x`".to_string(),
        "X-Forwarded-Uri: /admin/x y".to_string(),
        "X-Forwarded-Uri: /admin/\u{e9}".to_string(),
        // nginx builds the URL from the client's Host, and accepts one ending in `?` or `#`:
        // the real path must not slide into the query or a fragment.
        format!("X-Original-URL: http://{host}?/admin/x"),
        format!("X-Original-URL: http://{host}#/admin/x"),
        format!("X-Original-URL: http://{host}"),
        url("/admin/x#/public/"),
        // nginx serves the site named before the first `:`; a port that is not one, or
        // userinfo, would have the gateway judge the request as another (no) site's.
        "X-Original-URL: http://app.test:abc/admin/x".to_string(),
        "X-Original-URL: http://app.test:80@other.test/admin/x".to_string(),
        "X-Original-URL: http://app.test:+80/admin/x".to_string(),
    ] {
        let r = raw_exchange(port, &ask("/oauth2/auth", &[&bad]), Duration::from_secs(10)).await;
        assert_eq!(r.status, Some(400), "{bad}: {}", r.text);
    }
    // Two versions of the original request: which one the upstream serves is unknown.
    for two in [
        [url("/public/x"), url("/admin/x")],
        [url("/public/x"), "X-Forwarded-Uri: /admin/x".into()],
        [
            "X-Forwarded-Uri: /public/x".into(),
            "X-Forwarded-Uri: /admin/x".into(),
        ],
        [
            "X-Forwarded-Uri: /admin/x".into(),
            "X-Forwarded-Host: a.test\r\nX-Forwarded-Host: b.test".into(),
        ],
        // Not a host (a list, userinfo, a path): which site is meant is unknown too.
        [
            "X-Forwarded-Uri: /admin/x".into(),
            "X-Forwarded-Host: a.test, b.test".into(),
        ],
        [url("/admin/x"), "X-Forwarded-Host: user@a.test".into()],
        [url("/admin/x"), "X-Forwarded-Host: a.test/x".into()],
        // The URL's site and X-Forwarded-Host's differ (Traefik sends its own X-Forwarded-Host
        // and passes a client's X-Original-URL on).
        [url("/admin/x"), "X-Forwarded-Host: other.test".into()],
        [
            "X-Original-URL: http://other.test/admin/x".into(),
            "X-Forwarded-Uri: /admin/x\r\nX-Forwarded-Host: app.test".into(),
        ],
    ] {
        let two: Vec<&str> = two.iter().map(String::as_str).collect();
        assert_eq!(
            status(ask("/oauth2/auth", &two)).await,
            Some(400),
            "{two:?}"
        );
    }
    // The method decides on routes that name methods: said by the proxy, it is believed;
    // unsaid (nginx's auth_request asks with GET), the route is unknown and refused rather
    // than judged as a GET.
    let method = |m: &str| format!("X-Forwarded-Method: {m}");
    let anonymous = |p: &str, extra: &[&str]| {
        let mut headers = vec![url(p)];
        headers.extend(extra.iter().map(|h| h.to_string()));
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        raw_get("/oauth2/auth", &host, &headers)
    };
    assert_eq!(
        status(anonymous("/open/x", &[&method("GET")])).await,
        Some(202)
    );
    assert_eq!(
        status(anonymous("/open/x", &[&method("POST")])).await,
        Some(401)
    );
    assert_eq!(
        status(anonymous("/open/x", &["X-Original-Method: PUT"])).await,
        Some(401)
    );
    assert_eq!(status(anonymous("/open/x", &[])).await, Some(400));
    // In lower case it is another method to some apps (a write to one that takes every
    // non-`GET` as one): refused, as the proxied path refuses it (Traefik passes it on).
    for m in ["get", "Get", "gEt", "head"] {
        assert_eq!(
            status(anonymous("/open/x", &[&method(m)])).await,
            Some(400),
            "{m}"
        );
    }
    assert_eq!(
        status(anonymous("/open/x", &["X-Original-Method: get"])).await,
        Some(400)
    );
    assert_eq!(
        status(ask("/oauth2/auth", &[&url("/writes/x"), &method("POST")])).await,
        Some(403)
    );
    assert_eq!(
        status(ask("/oauth2/auth", &[&url("/writes/x"), &method("GET")])).await,
        Some(202)
    );
    assert_eq!(
        status(ask("/oauth2/auth", &[&url("/writes/x")])).await,
        Some(400)
    );
    // A route that fits every method decides without one.
    assert_eq!(
        status(ask("/oauth2/auth", &[&url("/admin/x")])).await,
        Some(403)
    );
    assert_eq!(status(anonymous("/public/x", &[])).await, Some(202));

    // Both headers naming the same request (ingress-nginx style): fine.
    assert_eq!(
        status(ask(
            "/oauth2/auth",
            &[&url("/public/x?q=1"), "X-Forwarded-Uri: /public/x?q=1"]
        ))
        .await,
        Some(202)
    );

    // Envoy ext_authz: the original path after /oauth2/auth, the original method, 200.
    assert_eq!(status(ask("/oauth2/auth/other?x=1", &[])).await, Some(200));
    assert_eq!(status(ask("/oauth2/auth/admin/x", &[])).await, Some(403));
    let post = format!(
        "POST /oauth2/auth/other HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let r = raw_exchange(port, post.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(r.status, Some(200), "{}", r.text);
    assert_eq!(r.header("x-auth-request-user").as_deref(), Some("alice"));
    assert_eq!(status(ask("/oauth2/auth/admin%2fx", &[])).await, Some(400));
    let anonymous = raw_get("/oauth2/auth/public/x", &host, &[]);
    assert_eq!(
        status(anonymous).await,
        Some(200),
        "a skip route needs no session"
    );
    let anonymous = raw_get("/oauth2/auth/other", &host, &[]);
    assert_eq!(status(anonymous).await, Some(401));
    // The Envoy form with the original request in headers as well: a proxy pointed at
    // `/oauth2/auth/` by mistake; which request is meant is unknown.
    assert_eq!(
        status(ask("/oauth2/auth/", &[&url("/admin/x")])).await,
        Some(400)
    );
    // Envoy names the original host in Host; an X-Forwarded-Host is the client's.
    let spoofed = raw_get(
        "/oauth2/auth/hosted/x",
        &host,
        &["X-Forwarded-Host: old.example.com"],
    );
    assert_eq!(status(spoofed).await, Some(401));
    let hosted = raw_get("/oauth2/auth/hosted/x", "old.example.com", &[]);
    assert_eq!(status(hosted).await, Some(200));
    // Dot segments cannot climb out of the gateway's endpoints to the upstream.
    let before = s.upstream.count();
    let climb = raw_get(
        "/oauth2/auth/../../x",
        &host,
        &[&format!("Cookie: {cookie}")],
    );
    assert_eq!(status(climb).await, Some(400));
    assert_eq!(s.upstream.count(), before, "reached the upstream");
}

/// From a peer not in `trusted_proxies` (the default), whatever names the original request is
/// ignored: the global rules decide, so a client cannot pick a laxer route (a skip route
/// without a session). The operator is told, in case the peer is the proxy itself.
#[tokio::test]
async fn forward_auth_ignores_the_original_request_from_untrusted_peers() {
    let routes = r#"routes:
  - { prefix: "/public/", auth: skip }
  - { prefix: "/admin/", allow: { groups: ["admins"] } }
  - { prefix: "/writes/", methods: ["POST"], allow: { groups: ["admins"] } }
"#;
    let s = Stack::with(&[], &format!("{routes}trusted_proxies: []\n")).await;
    let cookie = login_cookie(&s.gw, "alice").await;
    let host = format!("127.0.0.1:{}", s.gw.port);
    let exchange =
        |req: Vec<u8>| async move { raw_exchange(s.gw.port, &req, Duration::from_secs(10)).await };
    for (target, extra) in [
        ("/oauth2/auth", "X-Original-URL: http://app.test/admin/x"),
        ("/oauth2/auth", "X-Original-URL: http://app.test/admin%2fx"),
        ("/oauth2/auth", "X-Forwarded-Uri: /admin/x"),
        ("/oauth2/auth", "X-Forwarded-Method: POST"),
        ("/oauth2/auth", "X-Original-Method: POST"),
    ] {
        // With a session: the global rules (alice passes them).
        let req = raw_get(target, &host, &[&format!("Cookie: {cookie}"), extra]);
        let r = exchange(req).await;
        assert_eq!(r.status, Some(202), "{target} {extra}: {}", r.text);
        assert_eq!(r.header("x-auth-request-user").as_deref(), Some("alice"));
        // The bearer goes to a trusted proxy only, never to a client: a script on the
        // app's origin would read it from this answer.
        assert_eq!(r.header("x-auth-request-access-token"), None, "{}", r.text);
        // Without one, a "public" original request is no way in.
        let public = extra.replace("admin", "public");
        let req = raw_get(
            target,
            &host,
            &[public.as_str(), "Accept: application/json"],
        );
        let r = exchange(req).await;
        assert_eq!(r.status, Some(401), "{target} {public}: {}", r.text);
    }
    // The Envoy form, with and without a session.
    let r = exchange(raw_get(
        "/oauth2/auth/public/x",
        &host,
        &["Accept: application/json"],
    ))
    .await;
    assert_eq!(r.status, Some(401), "{}", r.text);
    let post = format!(
        "POST /oauth2/auth/writes/x HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    // Not an Envoy answer either (Envoy allows on 200 only): an Envoy left out of
    // `trusted_proxies` lets nothing through, rather than everything by the global rules.
    assert_eq!(exchange(post.into_bytes()).await.status, Some(202));
    // The operator learns of it (once a minute: a client can send these at will), without
    // the cookie in the log.
    let log = s.gw.stderr();
    for what in ["original request named", "access token not passed"] {
        let warned = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("trusted_proxies") && l.contains(what))
            .count();
        assert_eq!(
            warned, 1,
            "warn lines naming trusted_proxies ({what}):\n{log}"
        );
    }
    let session = cookie.split_once('=').unwrap().1;
    assert!(
        !log.contains(&session[..32]),
        "the session cookie was logged"
    );

    // Naming no original request: the session alone, by the global rules, as before.
    let plain = |extra: &[&str]| {
        let extra: Vec<&str> = extra.to_vec();
        raw_get("/oauth2/auth", &host, &extra)
    };
    let r = exchange(plain(&[&format!("Cookie: {cookie}")])).await;
    assert_eq!(r.status, Some(202), "{}", r.text);
    assert_eq!(r.header("x-auth-request-user").as_deref(), Some("alice"));
    let r = exchange(plain(&[&format!("Accept: {BROWSER_ACCEPT}")])).await;
    assert_eq!(r.status, Some(401), "{}", r.text);
    assert_eq!(
        r.header("x-auth-request-login").as_deref(),
        Some("/oauth2/start"),
        "{}",
        r.text
    );
    let r = exchange(plain(&["Accept: application/json"])).await;
    assert_eq!(r.status, Some(401), "{}", r.text);
    assert!(r.header("x-auth-request-login").is_none(), "{}", r.text);
}

/// Without a session, forward auth tells only a browser navigation on a login route where
/// to log in — the decision proxied requests get — so that a proxy which redirects on the
/// login header (nginx) never redirects an API caller. Always a 401, whatever the proxy.
#[tokio::test]
async fn forward_auth_sends_only_browser_navigations_to_log_in() {
    let routes = r#"routes:
  - { prefix: "/api/", auth: api }
  - { prefix: "/admin/", allow: { groups: ["admins"] } }
"#;
    let s = Stack::with(
        &[],
        &format!("{routes}trusted_proxies: [\"127.0.0.1/32\"]\n"),
    )
    .await;
    let port = s.gw.port;
    let host = format!("127.0.0.1:{port}");
    let ask = |target: &str, extra: &[&str]| {
        let req = raw_get(target, &host, extra);
        async move { raw_exchange(port, &req, Duration::from_secs(10)).await }
    };
    let browser = format!("Accept: {BROWSER_ACCEPT}");
    let browser = browser.as_str();
    let json = "Accept: application/json";
    let xhr = "X-Requested-With: XMLHttpRequest";
    let url = |p: &str| format!("X-Original-URL: http://app.test{p}");
    let fwd = |p: &str| format!("X-Forwarded-Uri: {p}");
    let login_for = |target: &str| format!("/oauth2/start?rd={}", enc(target));

    // nginx (X-Original-URL): a 401 either way; the login header for a navigation only.
    for (p, extra, login) in [
        ("/page?a=1", vec![browser], true),
        ("/admin/x", vec![browser, "X-Forwarded-Method: GET"], true),
        ("/page", vec![browser, "X-Forwarded-Method: POST"], false),
        ("/page", vec![browser, "X-Original-Method: DELETE"], false),
        ("/page", vec![browser, xhr], false),
        ("/page", vec![browser, "Sec-Fetch-Mode: cors"], false),
        ("/page", vec![json], false),
        ("/page", vec![], false),
        ("/api/x", vec![browser], false),
        ("/api/x", vec![json], false),
    ] {
        let named = url(p);
        let mut headers = vec![named.as_str()];
        headers.extend(extra.iter().copied());
        let r = ask("/oauth2/auth", &headers).await;
        assert_eq!(r.status, Some(401), "{p} {extra:?}: {}", r.text);
        assert!(r.header("location").is_none(), "{p} {extra:?}: {}", r.text);
        let expected = login.then(|| login_for(p));
        assert_eq!(
            r.header("x-auth-request-login"),
            expected,
            "{p} {extra:?}: {}",
            r.text
        );
    }

    // Traefik (X-Forwarded-Uri alone): 401 all the same, the login header for a navigation.
    for (p, extra) in [
        ("/page?a=1", vec![browser, "X-Forwarded-Method: GET"]),
        ("/admin/x", vec![browser]),
    ] {
        let named = fwd(p);
        let mut headers = vec![named.as_str()];
        headers.extend(extra.iter().copied());
        let r = ask("/oauth2/auth", &headers).await;
        assert_eq!(r.status, Some(401), "{p} {extra:?}: {}", r.text);
        assert_eq!(
            r.header("x-auth-request-login"),
            Some(login_for(p)),
            "{}",
            r.text
        );
    }
    for (p, extra) in [
        ("/page", vec![browser, "X-Forwarded-Method: POST"]),
        ("/page", vec![browser, xhr]),
        ("/page", vec![json]),
        ("/api/x", vec![browser]),
    ] {
        let named = fwd(p);
        let mut headers = vec![named.as_str()];
        headers.extend(extra.iter().copied());
        let r = ask("/oauth2/auth", &headers).await;
        assert_eq!(r.status, Some(401), "{p} {extra:?}: {}", r.text);
        assert!(r.header("location").is_none(), "{}", r.text);
        assert!(r.header("x-auth-request-login").is_none(), "{}", r.text);
    }
    // A cookie that opens no session is cleared.
    let r = ask(
        "/oauth2/auth",
        &[&fwd("/page"), browser, "Cookie: _portcullis=bogus"],
    )
    .await;
    assert_eq!(r.status, Some(401), "{}", r.text);
    assert!(
        r.text
            .to_ascii_lowercase()
            .contains("set-cookie: _portcullis="),
        "{}",
        r.text
    );
    // Both URI headers (ingress-nginx passes the client's X-Forwarded-Uri on): nginx's form.
    let r = ask("/oauth2/auth", &[&url("/page"), &fwd("/page"), browser]).await;
    assert_eq!(r.status, Some(401), "{}", r.text);
    assert_eq!(r.header("x-auth-request-login"), Some(login_for("/page")));
    // A target too long for the header once encoded (nginx holds the answer's headers in 4 KB,
    // or answers 500): the login goes without it, and returns to `/`.
    let long = format!("/page?q={}", "/&".repeat(700));
    let r = ask("/oauth2/auth", &[&url(&long), browser]).await;
    assert_eq!(r.status, Some(401), "{}", r.text);
    assert_eq!(
        r.header("x-auth-request-login").as_deref(),
        Some("/oauth2/start"),
        "{}",
        r.text
    );

    // Envoy: its answers as before, the login header by the same rule.
    let r = ask("/oauth2/auth/page?a=1", &[browser]).await;
    assert_eq!(r.status, Some(401), "{}", r.text);
    assert_eq!(
        r.header("x-auth-request-login"),
        Some(login_for("/page?a=1"))
    );
    for (p, extra) in [("/api/x", browser), ("/page", json)] {
        let r = ask(&format!("/oauth2/auth{p}"), &[extra]).await;
        assert_eq!(r.status, Some(401), "{p}: {}", r.text);
        assert!(r.header("x-auth-request-login").is_none(), "{}", r.text);
    }
    let post = format!(
        "POST /oauth2/auth/page HTTP/1.1\r\nHost: {host}\r\n{browser}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let r = raw_exchange(port, post.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(r.status, Some(401), "{}", r.text);
    assert!(r.header("x-auth-request-login").is_none(), "{}", r.text);
}

/// Group names an app's list parser would read as other groups reach it encoded: a comma
/// inside, blanks at either end (the gateway's `allow` rule and the app then agree that
/// ` admins` is not `admins`). Blanks inside a name stay as they are.
#[tokio::test]
async fn claims_reach_the_app_as_the_gateway_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let groups = dir.path().join("groups.json");
    std::fs::write(&groups, r#"[" admins", "cn=a,ou=b", "Domain Admins"]"#).unwrap();
    let port = free_port();
    let idp =
        Idp::start_for_gateway(port, &[("IDP_EXTRA_GROUPS_FILE", groups.to_str().unwrap())]).await;
    let upstream = Upstream::start();
    let gw = Gateway::start(GatewayOpts {
        extra: r#"routes: [ { prefix: "/admin/", allow: { groups: ["admins"] } } ]"#.into(),
        ..GatewayOpts::new(port, &idp, &upstream.url())
    })
    .await;
    let b = Browser::new();
    let r = login(&b, &gw, "/", "alice").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let rec = upstream.last();
    assert_eq!(
        rec.header("x-forwarded-groups"),
        Some("users,user-alice,%20admins,cn=a%2Cou=b,Domain Admins")
    );
    assert_eq!(rec.header("x-forwarded-user"), Some("alice"));
    let r = b.get(&gw.url("/admin/x")).await;
    assert_eq!(r.status, 403, "{}", r.dump());
}
