//! The reverse proxy: what reaches the upstream (identity, stripped spoofing,
//! cookies, request ids, bodies) and how upstream failures are answered.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use bytes::Bytes;
use support::browser::{chunked, full, try_send_body};
use support::upstream::Fnv;
use support::*;

fn bearer(rec: &Recorded) -> String {
    rec.header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .unwrap_or_else(|| panic!("no bearer at the upstream: {rec:?}"))
        .to_string()
}

/// An authenticated API request with extra headers; returns the gateway's answer.
async fn api(s: &Stack, cookie: &str, method: &str, path: &str, extra: &[(&str, &str)]) -> Resp {
    let mut h: Vec<(&str, &str)> = vec![("accept", "application/json"), ("cookie", cookie)];
    h.extend_from_slice(extra);
    send(method, &s.gw.url(path), &h, Vec::new()).await
}

#[tokio::test]
async fn spoofed_identity_and_forwarding_headers_are_replaced() {
    let s = Stack::start().await;
    let b = s.login("alice").await;
    let cookie = b.cookie_header(&s.gw.url("/"));
    let real_token = bearer(&s.upstream.last());
    let spoof: Vec<(&str, &str)> = vec![
        ("X-Forwarded-User", "mallory"),
        ("X-Forwarded-Email", "mallory@evil.test"),
        ("X-Forwarded-Groups", "admins"),
        ("X-Forwarded-Preferred-Username", "mallory"),
        ("x_forwarded_user", "mallory"),
        ("X_Forwarded_Email", "mallory@evil.test"),
        ("x-forwarded_groups", "admins"),
        ("X_FORWARDED_PREFERRED_USERNAME", "mallory"),
        ("X.Forwarded.Groups", "admins"),
        ("Authorization", "Bearer evil"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.test"),
        ("X-Real-IP", "6.6.6.6"),
        ("Forwarded", "for=6.6.6.6;host=evil.test"),
        ("X-Auth-Request-User", "mallory"),
        ("X-Forwarded-Access-Token", "evil"),
        ("X-Kept", "yes"),
    ];
    let r = api(&s, &cookie, "GET", "/who", &spoof).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let rec = s.upstream.last();
    assert_eq!(rec.path, "/who");
    let host = format!("127.0.0.1:{}", s.gw.port);
    let real_auth = format!("Bearer {real_token}");
    for (name, want) in [
        ("x-forwarded-user", "alice"),
        ("x-forwarded-email", "alice@example.test"),
        ("x-forwarded-groups", "users,user-alice"),
        ("x-forwarded-preferred-username", "alice"),
        ("authorization", real_auth.as_str()),
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", host.as_str()),
        ("host", host.as_str()),
        ("x-kept", "yes"),
    ] {
        assert_eq!(rec.header_all(name), vec![want], "{name}: {rec:#?}");
    }
    for gone in [
        "x_forwarded_user",
        "x_forwarded_email",
        "x-forwarded_groups",
        "x_forwarded_preferred_username",
        "x.forwarded.groups",
        "x-real-ip",
        "forwarded",
        "x-auth-request-user",
        "x-forwarded-access-token",
    ] {
        assert!(
            rec.header(gone).is_none(),
            "{gone} reached the upstream: {rec:#?}"
        );
    }
    for (k, v) in &rec.headers {
        assert!(
            !v.contains("mallory") && !v.contains("evil") && !v.contains("6.6.6.6"),
            "spoofed value reached the upstream in {k}: {v}"
        );
    }

    // Without a session, spoofed identity headers get nobody in.
    let before = s.upstream.count();
    let r = send(
        "GET",
        &s.gw.url("/who"),
        &[
            ("accept", "application/json"),
            ("x-forwarded-user", "alice"),
            ("authorization", &real_auth),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.dump());
    assert_eq!(s.upstream.count(), before);
}

#[tokio::test]
async fn gateway_cookies_are_stripped_and_other_cookies_kept() {
    let s = Stack::start().await;
    let b = s.login("alice").await;
    let session = b.cookie(&s.gw.url("/"), "_portcullis").unwrap();
    let cookie = format!(
        "a=1; _portcullis={session}; b=two; _portcullis_flow_0123456789abcdef=x; \
         _portcullis_7=zz; theme=dark; _portcullis_x=kept; _portcullisy=kept2"
    );
    let r = api(&s, &cookie, "GET", "/c", &[]).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let rec = s.upstream.last();
    assert_eq!(rec.header("x-forwarded-user"), Some("alice"));
    assert_eq!(
        rec.header_all("cookie"),
        vec!["a=1; b=two; theme=dark; _portcullis_x=kept; _portcullisy=kept2"],
        "{rec:#?}"
    );
    // Only gateway cookies: no Cookie header at all upstream.
    let r = api(&s, &format!("_portcullis={session}"), "GET", "/c2", &[]).await;
    assert_eq!(r.status, 200);
    assert!(s.upstream.last().header("cookie").is_none());
    // Two Cookie header lines (as HTTP/2 clients may send): the app's survive.
    let r = send(
        "GET",
        &s.gw.url("/c3"),
        &[
            ("accept", "application/json"),
            ("cookie", "app=1; other=2"),
            ("cookie", &format!("_portcullis={session}")),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let rec = s.upstream.last();
    assert_eq!(rec.header_all("cookie"), vec!["app=1; other=2"], "{rec:#?}");
}

#[tokio::test]
async fn session_survives_a_non_ascii_app_cookie() {
    let s = Stack::start().await;
    let b = s.login("alice").await;
    let session = b.cookie(&s.gw.url("/"), "_portcullis").unwrap();
    // Browsers send every cookie of the host in one header, including app cookies
    // with raw UTF-8 values.
    let cookie = format!("lang=Fran\u{e7}ais; _portcullis={session}");
    let r = api(&s, &cookie, "GET", "/utf8", &[]).await;
    assert_eq!(
        r.status,
        200,
        "session ignored next to a UTF-8 cookie: {}",
        r.dump()
    );
    let rec = s.upstream.last();
    assert_eq!(rec.header("x-forwarded-user"), Some("alice"));
    assert_eq!(
        rec.header_all("cookie"),
        vec!["lang=Fran\u{e7}ais"],
        "{rec:#?}"
    );
}

#[tokio::test]
async fn request_ids_are_kept_when_plain_and_generated_otherwise() {
    let s = Stack::start().await;
    let b = s.login("alice").await;
    let cookie = b.cookie_header(&s.gw.url("/"));

    let r = api(
        &s,
        &cookie,
        "GET",
        "/id",
        &[("x-request-id", "abc-123.X:y_z")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("abc-123.X:y_z"));
    assert_eq!(
        s.upstream.last().header_all("x-request-id"),
        vec!["abc-123.X:y_z"]
    );

    let max = "a".repeat(128);
    let r = api(&s, &cookie, "GET", "/id", &[("x-request-id", &max)]).await;
    assert_eq!(r.header("x-request-id"), Some(max.as_str()));

    let valid = |id: &str| {
        !id.is_empty()
            && id.len() <= 128
            && id
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(&c))
    };
    let mut generated = Vec::new();
    let too_long = "x".repeat(129);
    for bad in [
        Some("bad id!"),
        Some(too_long.as_str()),
        Some("a<script>"),
        Some(""),
        None,
    ] {
        let extra: Vec<(&str, &str)> = bad.map(|v| ("x-request-id", v)).into_iter().collect();
        let r = api(&s, &cookie, "GET", "/id", &extra).await;
        assert_eq!(r.status, 200, "{}", r.dump());
        let id = r.header("x-request-id").expect("id echoed").to_string();
        assert!(valid(&id), "generated id {id:?} for {bad:?}");
        assert_ne!(Some(id.as_str()), bad, "invalid id kept");
        assert_eq!(
            s.upstream.last().header_all("x-request-id"),
            vec![id.as_str()],
            "upstream and client see the same id"
        );
        generated.push(id);
    }
    let mut dedup = generated.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(
        dedup.len(),
        generated.len(),
        "ids are unique: {generated:?}"
    );

    // Answers the gateway gives itself carry the id too.
    let r = send(
        "GET",
        &s.gw.url("/id"),
        &[("accept", "application/json"), ("x-request-id", "unauth-1")],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-request-id"), Some("unauth-1"));
    let r = send(
        "GET",
        &s.gw.url("/healthz"),
        &[("x-request-id", "hz-1")],
        Vec::new(),
    )
    .await;
    assert_eq!(r.header("x-request-id"), Some("hz-1"));
}

/// `Connection` names hop-by-hop headers to drop, but never the ones the gateway sets: the
/// request id (set before the strip), the identity headers, the bearer and X-Forwarded-*.
#[tokio::test]
async fn connection_cannot_strip_the_headers_the_gateway_sets() {
    let s = Stack::start().await;
    let b = s.login("alice").await;
    let cookie = b.cookie_header(&s.gw.url("/"));
    let listed = "X-Request-Id, Authorization, X-Forwarded-User, X-Forwarded-Email, \
                  X-Forwarded-Groups, X-Forwarded-Preferred-Username, X-Forwarded-For, \
                  X-Forwarded-Proto, X-Forwarded-Host, x-secret-hop";
    // The client's own (plain) id, and none: the gateway makes one.
    for sent in [Some("client-id-1"), None] {
        let mut extra = vec![("connection", listed), ("x-secret-hop", "1")];
        extra.extend(sent.map(|id| ("x-request-id", id)));
        let r = api(&s, &cookie, "GET", "/conn", &extra).await;
        assert_eq!(r.status, 200, "{}", r.dump());
        let id = r.header("x-request-id").expect("id echoed").to_string();
        if let Some(sent) = sent {
            assert_eq!(id, sent);
        }
        let rec = s.upstream.last();
        assert_eq!(
            rec.header_all("x-request-id"),
            vec![id.as_str()],
            "sent {sent:?}: {rec:#?}"
        );
        assert!(rec.header("x-secret-hop").is_none(), "{rec:#?}");
        assert_eq!(rec.header("x-forwarded-user"), Some("alice"));
        assert_eq!(rec.header("x-forwarded-email"), Some("alice@example.test"));
        assert_eq!(rec.header("x-forwarded-groups"), Some("users,user-alice"));
        assert_eq!(rec.header("x-forwarded-preferred-username"), Some("alice"));
        assert!(!bearer(&rec).is_empty());
        assert_eq!(rec.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(rec.header("x-forwarded-proto"), Some("http"));
        assert_eq!(
            rec.header("x-forwarded-host"),
            Some(s.gw.url("").trim_start_matches("http://"))
        );
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let s = Stack::start().await;
    let b = s.login("alice").await;
    let cookie = b.cookie_header(&s.gw.url("/"));
    let r = api(
        &s,
        &cookie,
        "GET",
        "/hop",
        &[
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic YTpi"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "h2c"),
            ("x-end-to-end", "1"),
            // Framing in another spelling, which servers that read `_` as `-` would believe.
            ("content_length", "40"),
            ("Transfer_Encoding", "chunked"),
            ("x_app_flag", "kept"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let rec = s.upstream.last();
    for gone in [
        "x-secret-hop",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
        "te",
        "transfer-encoding",
        "content_length",
        "transfer_encoding",
    ] {
        assert!(rec.header(gone).is_none(), "{gone} forwarded: {rec:#?}");
    }
    assert!(
        rec.header_all("connection")
            .iter()
            .all(|v| !v.contains("x-secret-hop")),
        "{rec:#?}"
    );
    assert_eq!(rec.header("x-end-to-end"), Some("1"));
    assert_eq!(rec.header("x_app_flag"), Some("kept"));
}

#[tokio::test]
async fn path_and_query_are_forwarded_verbatim() {
    let s = Stack::start().await;
    let b = s.login("alice").await;
    let cookie = b.cookie_header(&s.gw.url("/"));
    let r = api(&s, &cookie, "GET", "/a%20b/c%3Fd/?x=%2F&y=1&y=2&z", &[]).await;
    assert_eq!(r.status, 200);
    let rec = s.upstream.last();
    assert_eq!(rec.path, "/a%20b/c%3Fd/");
    assert_eq!(rec.query.as_deref(), Some("x=%2F&y=1&y=2&z"));
    // The echo the upstream answered is what the client gets, byte for byte.
    assert_eq!(r.json(), rec.to_json());
    // An encoded slash is ambiguous (one path to us, another to some servers): refused.
    let r = api(&s, &cookie, "GET", "/a/c%2Fd", &[]).await;
    assert_eq!(r.status, 400);
    let r = api(&s, &cookie, "DELETE", "/items/7", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(s.upstream.last().method, "DELETE");
}

#[tokio::test]
async fn request_bodies_are_streamed_through() {
    let s = Stack::start().await;
    let b = s.login("alice").await;
    let cookie = b.cookie_header(&s.gw.url("/"));
    let data: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(7) % 251) as u8)
        .collect();
    let mut fnv = Fnv::default();
    fnv.update(&data);
    let headers = [
        ("accept", "application/json"),
        ("cookie", cookie.as_str()),
        ("content-type", "application/octet-stream"),
    ];

    // With a Content-Length.
    let r = try_send_body(
        "POST",
        &s.gw.url("/upload"),
        &headers,
        full(data.clone()),
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.dump());
    let rec = s.upstream.last();
    assert_eq!(rec.method, "POST");
    assert_eq!(rec.body_len, data.len() as u64);
    assert_eq!(rec.body_fnv, fnv.hex());
    assert_eq!(rec.header("x-forwarded-user"), Some("alice"));
    assert_eq!(r.json()["body_len"], data.len() as u64);

    // Chunked, 64 KiB at a time, no Content-Length.
    let chunks: Vec<Bytes> = data.chunks(64 * 1024).map(Bytes::copy_from_slice).collect();
    let r = try_send_body(
        "PUT",
        &s.gw.url("/upload2"),
        &headers,
        chunked(chunks),
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.dump());
    let rec = s.upstream.last();
    assert_eq!(rec.method, "PUT");
    assert_eq!(rec.body_len, data.len() as u64);
    assert_eq!(rec.body_fnv, fnv.hex());

    // A GET's chunked body too (a search API's query): not dropped on the way. (Raw: a
    // hyper client would not send it either.)
    let req = format!(
        "GET /search HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nCookie: {cookie}\r\nAccept: application/json\r\n\
Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n6\r\n{{\"q\":1\r\n1\r\n}}\r\n0\r\n\r\n",
        s.gw.port
    );
    let r = support::corpus::raw_exchange(
        s.gw.port,
        req.as_bytes(),
        std::time::Duration::from_secs(10),
    )
    .await;
    assert_eq!(r.status, Some(200), "{}", r.text);
    let rec = s.upstream.last();
    assert_eq!((rec.method.as_str(), rec.path.as_str()), ("GET", "/search"));
    assert_eq!(rec.body_len, 7, "{rec:#?}");

    // Without a session, a POST body never reaches the upstream.
    let before = s.upstream.count();
    let r = try_send_body(
        "POST",
        &s.gw.url("/upload"),
        &[("accept", "text/html")],
        full(Bytes::from_static(b"x=1")),
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(s.upstream.count(), before);
}

#[tokio::test]
async fn upstream_down_gives_502_and_the_gateway_keeps_serving() {
    let port = free_port();
    let idp = Idp::start_for_gateway(port, &[]).await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut gw = Gateway::start(GatewayOpts::new(port, &idp, &dead)).await;
    let b = Browser::new();
    let r = login(&b, &gw, "/app", "alice").await;
    assert_eq!(r.status, 502, "{}", r.dump());
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let body = r.text();
    assert!(body.contains("Bad gateway"), "{body}");
    assert!(
        !body.contains("refused") && !body.contains(&dead[7..]),
        "internal details leaked: {body}"
    );
    gw.assert_healthy().await;
    // A program gets it in JSON, as it gets its 401 and 503.
    for _ in 0..3 {
        let r = b.api_get(&gw.url("/again")).await;
        assert_eq!(r.status, 502, "{}", r.dump());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.json()["error"], "upstream_unavailable");
    }
    // No `Accept` at all: no browser's navigation either.
    let r = b.request("GET", &gw.url("/again"), &[], Vec::new()).await;
    assert_eq!(r.status, 502, "{}", r.dump());
    assert_eq!(r.json()["error"], "upstream_unavailable");
    // The session and the gateway's own endpoints are unaffected.
    let me = b.api_get(&gw.url("/oauth2/userinfo")).await;
    assert_eq!(me.status, 200, "{}", me.dump());
    assert_eq!(me.json()["sub"], "alice");
    gw.assert_healthy().await;
}

#[tokio::test]
async fn slow_upstream_gives_504_and_the_gateway_keeps_serving() {
    let mut s = Stack::with(&[], "timeouts: { upstream_response: 1s }").await;
    let b = s.login("alice").await;
    // A pooled connection keeps one deadline timer for its life: moved on per request, and
    // here also gone off once while the connection sat idle (longer than the timeout).
    let r = b.get(&s.gw.url("/fast")).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    for round in 0..2 {
        let r = b.get(&s.gw.url("/slow")).await;
        assert_eq!(r.status, 504, "round {round}: {}", r.dump());
        assert!(r.text().contains("Gateway timeout"), "{}", r.dump());
        assert_eq!(
            s.upstream.last().path,
            "/slow",
            "the request did reach the upstream"
        );
        s.gw.assert_healthy().await;
        let r = b.get(&s.gw.url("/fast")).await;
        assert_eq!(r.status, 200, "{}", r.dump());
    }
    let r = b.api_get(&s.gw.url("/slow")).await;
    assert_eq!(r.status, 504, "{}", r.dump());
    assert_eq!(r.json()["error"], "upstream_timeout", "{}", r.dump());
}

/// A body of `chunks` parts of 4 KiB, one every 250 ms.
fn trickle(chunks: usize) -> support::browser::ReqBody {
    use http_body_util::BodyExt;
    let parts = futures_util::stream::unfold(0, move |i| async move {
        if i == chunks {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let part = hyper::body::Frame::data(Bytes::from(vec![b'u'; 4096]));
        Some((Ok::<_, std::convert::Infallible>(part), i + 1))
    });
    http_body_util::StreamBody::new(parts).boxed()
}

/// `timeouts.upstream_response` is the upstream's time to answer, not the client's time to
/// upload: a body sent over 2.5 s with 1 s allowed reaches an upstream that answers at once
/// (HTTP/1.1 chunked or with a length, HTTP/2). An upstream that takes longer than that
/// after the whole body still gets 504; an upload that stops moving for that long gets 408,
/// the client's fault (HTTP/2 has no idle rule of its own for it).
#[tokio::test]
async fn a_slow_upload_is_not_an_upstream_timeout() {
    const CHUNKS: usize = 10;
    let mut s = Stack::with(
        &[],
        "timeouts: { upstream_response: 1s }\n\
         routes: [ { prefix: \"/\", auth: skip } ]",
    )
    .await;
    let len = (CHUNKS * 4096).to_string();
    let upload = |path: &str, sized: bool, h2: bool| {
        let url = s.gw.url(path);
        let len = len.clone();
        async move {
            let mut headers = vec![("accept", "application/json")];
            if sized {
                headers.push(("content-length", len.as_str()));
            }
            try_send_body("POST", &url, &headers, trickle(CHUNKS), h2)
                .await
                .unwrap_or_else(|e| panic!("POST {url}: {e}"))
        }
    };
    let stalled = async {
        use http_body_util::BodyExt;
        let part = hyper::body::Frame::data(Bytes::from_static(b"the rest never comes"));
        let parts = futures_util::StreamExt::chain(
            futures_util::stream::iter([Ok::<_, std::convert::Infallible>(part)]),
            futures_util::stream::pending(),
        );
        let body = http_body_util::StreamBody::new(parts).boxed();
        let url = s.gw.url("/upload/stalled");
        let sent = try_send_body("POST", &url, &[], body, true);
        // Bounded only so that a hang fails instead of blocking the suite.
        match tokio::time::timeout(std::time::Duration::from_secs(30), sent).await {
            Ok(r) => r.unwrap_or_else(|e| panic!("POST {url}: {e}")),
            Err(_) => panic!("a stalled upload was never answered"),
        }
    };
    let (chunked, sized, h2, slow, stalled) = tokio::join!(
        upload("/upload/chunked", false, false),
        upload("/upload/sized", true, false),
        upload("/upload/h2", false, true),
        upload("/slow", false, false),
        stalled,
    );
    for (r, version) in [
        (chunked, http::Version::HTTP_11),
        (sized, http::Version::HTTP_11),
        (h2, http::Version::HTTP_2),
    ] {
        assert_eq!(r.status, 200, "{}", r.dump());
        assert_eq!(r.version, version);
        assert_eq!(r.json()["body_len"], CHUNKS * 4096, "{}", r.dump());
    }
    assert_eq!(slow.status, 504, "{}", slow.dump());
    assert_eq!(slow.json()["error"], "upstream_timeout", "{}", slow.dump());
    // The stalled upload is the client's fault, not the upstream's.
    assert_eq!(stalled.status, 408, "{}", stalled.dump());
    let rec = s.upstream.records();
    let at_slow = rec.iter().find(|r| r.path == "/slow");
    assert_eq!(
        at_slow.map(|r| r.body_len),
        Some((CHUNKS * 4096) as u64),
        "the whole body reached the upstream: {rec:?}"
    );
    s.gw.assert_healthy().await;
}

/// A loopback address where a TCP connect hangs: the listener's accept queue (backlog 0) is
/// full with the returned stream, so the kernel drops further SYNs. Keep both alive.
fn unanswered_upstream() -> (String, tokio::net::TcpListener, std::net::TcpStream) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let filler = std::net::TcpStream::connect(addr).unwrap();
    (format!("http://{addr}"), listener, filler)
}

/// A route's `timeouts.upstream_connect` bounds connecting for its requests (502 once it
/// passes); other routes keep `timeouts.upstream_connect` (here 30 s, so the response
/// deadline, 2 s, gives 504 first).
#[tokio::test]
async fn a_routes_connect_timeout_applies_to_its_requests() {
    let (hang, _listener, _filler) = unanswered_upstream();
    let mut s = Stack::with(
        &[],
        &format!(
            "timeouts: {{ upstream_connect: 30s, upstream_response: 2s }}\n\
             routes:\n\
             - {{ prefix: /own/, auth: skip, upstream: \"{hang}\", timeouts: {{ upstream_connect: 300ms }} }}\n\
             - {{ prefix: /main/, auth: skip, timeouts: {{ upstream_connect: 300ms }} }}\n\
             - {{ prefix: /global/, auth: skip, upstream: \"{hang}\" }}\n"
        ),
    )
    .await;
    let get = |path: &str| {
        let url = s.gw.url(path);
        async move {
            let start = std::time::Instant::now();
            let r = send("GET", &url, &[("accept", "application/json")], Vec::new()).await;
            (r, start.elapsed())
        }
    };
    let (r, took) = get("/own/x").await;
    assert_eq!(r.status, 502, "{}", r.dump());
    assert!(took < std::time::Duration::from_millis(1500), "{took:?}");
    let (r, took) = get("/global/x").await;
    assert_eq!(r.status, 504, "{}", r.dump());
    assert!(took >= std::time::Duration::from_secs(2), "{took:?}");
    // The main upstream answers: a route's connect timeout is no obstacle there.
    let (r, _) = get("/main/x").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(s.upstream.last().path, "/main/x");
    s.gw.assert_healthy().await;
}

#[tokio::test]
async fn http2_prior_knowledge_requests_work() {
    let s = Stack::start().await;
    let r = send_h2("GET", &s.gw.url("/healthz"), &[], Vec::new())
        .await
        .expect("h2c /healthz");
    assert_eq!(r.status, 200);
    assert_eq!(r.version, http::Version::HTTP_2);

    let r = send_h2(
        "GET",
        &s.gw.url("/h2"),
        &[("accept", "application/json")],
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401, "{}", r.dump());

    let b = s.login("alice").await;
    let cookie = b.cookie_header(&s.gw.url("/"));
    let r = send_h2(
        "GET",
        &s.gw.url("/h2/page?q=2"),
        &[("accept", "application/json"), ("cookie", &cookie)],
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(r.version, http::Version::HTTP_2);
    let rec = s.upstream.last();
    assert_eq!(rec.path, "/h2/page");
    assert_eq!(rec.query.as_deref(), Some("q=2"));
    assert_eq!(rec.version, "HTTP/1.1");
    assert_eq!(rec.header("x-forwarded-user"), Some("alice"));
    let host = format!("127.0.0.1:{}", s.gw.port);
    assert_eq!(rec.header("host"), Some(host.as_str()));
    assert_eq!(rec.header("x-forwarded-proto"), Some("http"));
    assert_eq!(rec.header("x-forwarded-for"), Some("127.0.0.1"));
    assert!(rec.header("cookie").is_none());

    // A body over h2.
    let r = try_send_body(
        "POST",
        &s.gw.url("/h2/post"),
        &[("accept", "application/json"), ("cookie", &cookie)],
        full(vec![b'z'; 100_000]),
        true,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(s.upstream.last().body_len, 100_000);
}

#[tokio::test]
async fn http2_requests_get_x_forwarded_host() {
    let s = Stack::start().await;
    let b = s.login("alice").await;
    let cookie = b.cookie_header(&s.gw.url("/"));
    // Control: HTTP/1.1 carries it.
    let r = api(&s, &cookie, "GET", "/h1", &[]).await;
    assert_eq!(r.status, 200);
    let host = format!("127.0.0.1:{}", s.gw.port);
    assert_eq!(
        s.upstream.last().header("x-forwarded-host"),
        Some(host.as_str())
    );
    let r = send_h2(
        "GET",
        &s.gw.url("/h2"),
        &[("accept", "application/json"), ("cookie", &cookie)],
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.dump());
    let rec = s.upstream.last();
    assert_eq!(rec.path, "/h2");
    assert_eq!(
        rec.header("x-forwarded-host"),
        Some(host.as_str()),
        "{rec:#?}"
    );
}

/// A raw upstream's read of one request head, byte by byte (`None`: the connection ended).
fn read_head(s: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).unwrap_or(0) == 0 {
            return None;
        }
        head.push(b[0]);
    }
    Some(head)
}

/// The `Sec-WebSocket-Accept` line a websocket server answers to the key in the request
/// `head` (RFC 6455 §4.2.2); none without a key.
fn websocket_accept(head: &str) -> String {
    use base64::Engine;
    use sha1::Digest;
    let key = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim())
    });
    key.map_or(String::new(), |key| {
        let mut sha = sha1::Sha1::new();
        sha.update(key.as_bytes());
        sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
        format!("Sec-WebSocket-Accept: {accept}\r\n")
    })
}

/// An upstream with a common bug: it answers HEAD with the head and, a moment later, a body
/// anyway. Everything else gets `ok`.
fn head_with_a_body_upstream() -> u16 {
    use std::io::Write;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                while let Some(head) = read_head(&mut s) {
                    let stray_after = |s: &mut std::net::TcpStream, answer: &[u8]| {
                        let _ = s.write_all(answer);
                        std::thread::sleep(std::time::Duration::from_millis(300));
                        let _ = s.write_all(b"STRAY");
                    };
                    if head.starts_with(b"HEAD ") {
                        stray_after(&mut s, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
                    } else if head.starts_with(b"GET /204 ") {
                        stray_after(
                            &mut s,
                            b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
                        );
                    } else if head.starts_with(b"GET /304 ") {
                        stray_after(
                            &mut s,
                            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                        );
                    } else if head.starts_with(b"GET /echo/") {
                        // The request line it read.
                        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                            line.len()
                        );
                        let _ = s.write_all(line);
                    } else {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                    }
                }
            });
        }
    });
    port
}

/// A gateway, all public, before [`head_with_a_body_upstream`], with one upstream pool: the
/// next request takes the connection the one before freed, if it was kept.
async fn gateway_before_a_buggy_upstream() -> (Idp, Gateway) {
    let up_port = head_with_a_body_upstream();
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let gw = Gateway::start(GatewayOpts {
        extra: "routes: [{ prefix: \"/\", auth: skip }]".into(),
        env: vec![("PORTCULLIS_WORKER_THREADS".into(), "1".into())],
        ..GatewayOpts::new(gw_port, &idp, &format!("http://127.0.0.1:{up_port}"))
    })
    .await;
    (idp, gw)
}

/// A connection that answered a HEAD is not reused: the body a buggy app sends after the head
/// anyway would be read as the next request's answer (another user's request, perhaps). Nor
/// one whose 204 or 304 announced a body.
#[tokio::test]
async fn a_connection_that_answered_a_head_is_not_reused() {
    let (_idp, gw) = gateway_before_a_buggy_upstream().await;
    for (i, (method, path, status)) in [
        ("HEAD", "/page", 200),
        ("GET", "/204", 204),
        ("GET", "/304", 304),
    ]
    .into_iter()
    .cycle()
    .take(6)
    .enumerate()
    {
        let head = send(method, &gw.url(path), &[], Vec::new()).await;
        assert_eq!(head.status, status, "{i}: {}", head.dump());
        // Sent before the stray body arrives.
        let next = send("GET", &gw.url("/other"), &[], Vec::new()).await;
        assert_eq!(
            (next.status.as_u16(), next.text()),
            (200, "ok".to_string()),
            "{i}: {}\n{}",
            next.dump(),
            gw.tails()
        );
    }
}

/// A raw upstream that answers an upgrade with 101 (and the head lines `extra`) and then echoes
/// every byte back, closing when the client's side ends.
fn echo_upgrade_upstream(
    extra: &'static str,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    upgrade_upstream(extra, AtEof::Close)
}

/// What the echoing upgrade upstream does when the client's side of the tunnel ends.
#[derive(Clone, Copy)]
enum AtEof {
    Close,
    /// Notes "eof" among the heads and keeps its own side open.
    Linger,
}

fn upgrade_upstream(
    extra: &'static str,
    at_eof: AtEof,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let Some(head) = read_head(&mut s) else {
                    return;
                };
                let head = String::from_utf8_lossy(&head);
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{}{extra}\r\n",
                    websocket_accept(&head)
                );
                seen.lock().unwrap().push(head.to_lowercase());
                let _ = s.write_all(answer.as_bytes());
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => {
                            if let AtEof::Linger = at_eof {
                                seen.lock().unwrap().push("eof".into());
                                std::thread::sleep(std::time::Duration::from_secs(120));
                            }
                            return;
                        }
                        Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (port, heads)
}

#[tokio::test]
async fn websocket_upgrades_pass_through_with_the_identity() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The app's 101 also tries what any other answer of its loses: planting the session
    // cookie, clearing it, and hop-by-hop fields for the client's connection.
    let (up_port, heads) = echo_upgrade_upstream(
        "Set-Cookie: _portcullis=planted; Path=/\r\nSet-Cookie: app=1\r\n\
Clear-Site-Data: \"cookies\", \"cache\"\r\nKeep-Alive: timeout=5\r\nConnection: X-Hop\r\nX-Hop: 1\r\n",
    );
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let gw = Gateway::start(GatewayOpts {
        // Tunnels are not request heads: an idle one must outlive this.
        extra: "timeouts: { header_read: 1s }".into(),
        ..GatewayOpts::new(gw_port, &idp, &format!("http://127.0.0.1:{up_port}"))
    })
    .await;
    // Log in against the normal upstream path: the echo upstream answers 101 to everything,
    // so take the session cookie from the callback instead of the final page.
    let b = Browser::new();
    let _ = login(&b, &gw, "/", "alice").await;
    let cookie = b.cookie_header(&gw.url("/"));
    assert!(cookie.contains("_portcullis="), "{cookie}");

    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw_port))
        .await
        .unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{gw_port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Forwarded-User: mallory\r\n\
Cookie: {cookie}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "closed before the 101");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("connection: upgrade\r\n"), "{head}");
    assert!(head.contains("set-cookie: app=1"), "{head}");
    assert!(head.contains("clear-site-data: \"cache\"\r\n"), "{head}");
    for gone in ["planted", "\"cookies\"", "keep-alive", "x-hop"] {
        assert!(!head.contains(gone), "{gone}: {head}");
    }
    // The tunnel carries bytes both ways, also after being idle for thrice header_read.
    for (i, msg) in [&b"hello"[..], b"second frame", &[0u8, 1, 2, 255]]
        .into_iter()
        .enumerate()
    {
        if i == 2 {
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        }
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
    }
    // The upstream saw the upgrade with the real identity and bearer, not the spoofed one.
    let h = heads.lock().unwrap().last().cloned().unwrap();
    assert!(h.starts_with("get /ws http/1.1"), "{h}");
    assert!(
        h.contains("upgrade: websocket") && h.contains("connection: upgrade"),
        "{h}"
    );
    assert!(
        h.contains("x-forwarded-user: alice") && !h.contains("mallory"),
        "{h}"
    );
    assert!(h.contains("authorization: bearer "), "{h}");
    assert!(!h.contains("_portcullis"), "{h}");
}

/// Only websocket upgrades are forwarded. An upstream that takes `Upgrade: h2c` (the
/// "h2c smuggling" of hypercorn-style servers) would give the client a raw HTTP/2 connection
/// to it, where any path and any identity header can be sent past the gateway: the
/// upstream never sees the upgrade, and an upstream that switches anyway gets no tunnel.
#[tokio::test]
async fn only_websocket_upgrades_reach_the_upstream() {
    let (up_port, heads) = echo_upgrade_upstream("");
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let gw = Gateway::start(GatewayOpts {
        extra: "routes: [{ prefix: \"/public/\", auth: skip }]".into(),
        ..GatewayOpts::new(gw_port, &idp, &format!("http://127.0.0.1:{up_port}"))
    })
    .await;
    for (upgrade, connection) in [
        ("h2c", "Upgrade, HTTP2-Settings"),
        ("h2c", "Upgrade"),
        ("websocket, h2c", "Upgrade"),
    ] {
        let req = format!(
            "GET /public/x HTTP/1.1\r\nHost: 127.0.0.1:{gw_port}\r\nUpgrade: {upgrade}\r\n\
Connection: {connection}\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        );
        let h = head_without_tunnel(gw.port, &heads, &req, upgrade).await;
        assert!(h.starts_with("get /public/x http/1.1"), "{h}");
        for forbidden in ["upgrade:", "http2-settings", "connection: upgrade"] {
            assert!(
                !h.contains(forbidden),
                "{upgrade}: upstream saw {forbidden}: {h}"
            );
        }
    }
    // Nor one whose request has a body (the switch comes once the request is complete, RFC
    // 9110 §7.8): it goes on as a plain request, none of its body in a tunnel.
    for framing in ["Transfer-Encoding: chunked", "Content-Length: 7"] {
        let body = if framing.starts_with("Transfer") {
            "7\r\nREQBODY\r\n0\r\n\r\n"
        } else {
            "REQBODY"
        };
        let req = format!(
            "GET /public/body HTTP/1.1\r\nHost: 127.0.0.1:{gw_port}\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{framing}\r\n\r\n{body}"
        );
        let h = head_without_tunnel(gw.port, &heads, &req, framing).await;
        assert!(h.starts_with("get /public/body http/1.1"), "{h}");
        assert!(
            !h.contains("upgrade"),
            "{framing}: upstream saw the upgrade: {h}"
        );
        let framed = if framing.starts_with("Content-Length") {
            "content-length: 7"
        } else {
            "transfer-encoding: chunked"
        };
        assert!(h.contains(framed), "{h}");
    }
    // Nor one on a method other than GET (a websocket handshake is a GET, RFC 6455 §4.1):
    // it goes on as a plain request.
    let req = format!(
        "POST /public/post HTTP/1.1\r\nHost: 127.0.0.1:{gw_port}\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let h = head_without_tunnel(gw.port, &heads, &req, "POST").await;
    assert!(h.starts_with("post /public/post http/1.1"), "{h}");
    assert!(
        !h.contains("upgrade"),
        "POST: upstream saw the upgrade: {h}"
    );
    // A websocket upgrade still opens its tunnel.
    drop(open_tunnel(gw.port, "/public/ws").await);
}

/// A raw upstream whose every answer is `101 Switching Protocols` that completes no websocket
/// handshake (`head` after the status line), as an app endpoint relaying a status code an
/// attacker picks would. Records every byte it receives after the first head.
fn switching_upstream(head: &'static str) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let after = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = after.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                if read_head(&mut s).is_none() {
                    return;
                }
                let _ = s.write_all(
                    format!("HTTP/1.1 101 Switching Protocols\r\n{head}\r\n").as_bytes(),
                );
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (port, after)
}

/// Websocket smuggling: a `101` that is no handshake for the client's key (RFC 6455 §4.1) must
/// not turn the client's connection into a raw one to the upstream, where its next request
/// would reach a protected path with a forged identity, past the gate and the hygiene.
#[tokio::test]
async fn a_101_that_completes_no_websocket_handshake_opens_no_tunnel() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for head in [
        "",
        "Upgrade: websocket\r\nConnection: Upgrade\r\n",
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOA=\r\n",
    ] {
        let (up_port, after) = switching_upstream(head);
        let gw_port = free_port();
        let idp = Idp::start_for_gateway(gw_port, &[]).await;
        let _gw = Gateway::start(GatewayOpts {
            extra: "routes: [{prefix: \"/public/\", auth: skip}]".into(),
            ..GatewayOpts::new(gw_port, &idp, &format!("http://127.0.0.1:{up_port}"))
        })
        .await;
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw_port))
            .await
            .unwrap();
        let req = format!(
            "GET /public/status HTTP/1.1\r\nHost: 127.0.0.1:{gw_port}\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]).to_lowercase();
        assert!(answer.starts_with("http/1.1 502"), "{head:?}: {answer}");
        // What the client sends next is a new request to the gateway, not raw bytes to the
        // upstream: it is answered (401: no session) and never reaches the upstream.
        s.write_all(
            b"GET /admin/secret HTTP/1.1\r\nHost: app\r\nX-Forwarded-User: admin\r\nAccept: application/json\r\n\r\n",
        )
        .await
        .unwrap();
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("no answer to the next request")
            .unwrap_or(0);
        let next = String::from_utf8_lossy(&buf[..n]).to_lowercase();
        assert!(
            n == 0 || next.starts_with("http/1.1 401"),
            "{head:?}: {next}"
        );
        let got = String::from_utf8_lossy(&after.lock().unwrap()).to_string();
        assert!(!got.contains("/admin/secret"), "{head:?}: tunnelled: {got:?}");
    }
}

/// Sends `req` to the gateway on `port`: no tunnel is opened (no `101`), and the head the echo
/// upstream received (lower-cased) comes back.
async fn head_without_tunnel(
    port: u16,
    heads: &std::sync::Mutex<Vec<String>>,
    req: &str,
    what: &str,
) -> String {
    let r = support::corpus::raw_exchange(port, req.as_bytes(), std::time::Duration::from_secs(3))
        .await;
    assert_ne!(r.status, Some(101), "{what}: tunnel opened: {}", r.text);
    heads.lock().unwrap().last().cloned().unwrap()
}

/// Opens a websocket tunnel to `path` through the gateway on `port` and checks that it echoes.
async fn open_tunnel(port: u16, path: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "closed before the 101");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    s
}

/// A gateway in front of the echoing upgrade upstream, every route public, with `extra`
/// config; the provider comes back too, to be kept alive as long as the gateway.
async fn tunnel_gateway(extra: &str) -> (support::ops::OpsGateway, Idp) {
    tunnel_gateway_to(echo_upgrade_upstream("").0, extra).await
}

async fn tunnel_gateway_to(up_port: u16, extra: &str) -> (support::ops::OpsGateway, Idp) {
    use support::ops::{OpsConfig, OpsGateway};
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let gw = OpsGateway::start(&OpsConfig::new(GatewayOpts {
        extra: format!("routes: [ {{ prefix: \"/\", auth: skip }} ]\n{extra}"),
        ..GatewayOpts::new(gw_port, &idp, &format!("http://127.0.0.1:{up_port}"))
    }))
    .await;
    (gw, idp)
}

#[tokio::test]
async fn websocket_tunnels_hold_a_connection_slot_and_stay_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (gw, _idp) = tunnel_gateway("limits: { max_connections: 3 }").await;
    let gw_port = gw.port;
    let gauge = "portcullis_connections_open";
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        tunnels.push(open_tunnel(gw_port, "/ws").await);
    }
    assert_eq!(
        gw.metrics().await.value(gauge),
        3.0,
        "three open tunnels are three open connections\n{}",
        gw.tails()
    );
    // A fourth connection waits: the tunnels hold all of `limits.max_connections`...
    let mut fourth = tokio::net::TcpStream::connect(("127.0.0.1", gw_port))
        .await
        .unwrap();
    fourth
        .write_all(
            format!(
                "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{gw_port}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let early = tokio::time::timeout(
        std::time::Duration::from_millis(1500),
        fourth.read(&mut buf),
    )
    .await;
    assert!(
        early.is_err(),
        "a fourth connection was served while three tunnels were open (max_connections: 3): {early:?}"
    );
    // ... until one tunnel closes.
    drop(tunnels.pop());
    let mut got = Vec::new();
    tokio::time::timeout(REQUEST_TIMEOUT, fourth.read_to_end(&mut got))
        .await
        .expect("the fourth connection was not served after a tunnel closed")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    gw.await_metric("portcullis_connections_open", 2.0, "two open connections")
        .await;
    // The remaining tunnels still carry bytes.
    for t in &mut tunnels {
        t.write_all(b"more").await.unwrap();
        let mut got = [0u8; 4];
        t.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"more");
    }
}

/// A tunnel that carries no byte for `timeouts.tunnel_idle` is closed (its connection slot
/// comes back); one that keeps carrying bytes stays open past it.
#[tokio::test]
async fn idle_websocket_tunnels_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (gw, _idp) = tunnel_gateway("timeouts: { tunnel_idle: 2s }").await;
    let mut s = open_tunnel(gw.port, "/ws").await;
    // Busy for longer than the limit: still open.
    for i in 0..12u8 {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        s.write_all(&[i]).await.unwrap();
        let mut got = [0u8];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [i]);
    }
    // Then silent: the gateway closes it.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(REQUEST_TIMEOUT, s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "an idle tunnel stayed open\n{}", gw.tails());
    assert!(rest.is_empty(), "{rest:?}");
    gw.await_metric(
        "portcullis_connections_open",
        0.0,
        "the tunnel's connection released",
    )
    .await;
}

/// A client that closes its half of a tunnel has left: the app is told (the half-close is
/// passed on), and an app that keeps its own side open does not keep the tunnel and its
/// connection slot until `timeouts.tunnel_idle` (the app's side gets a few seconds' grace).
#[tokio::test]
async fn a_tunnel_the_client_half_closes_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up_port, seen) = upgrade_upstream("", AtEof::Linger);
    let (gw, _idp) = tunnel_gateway_to(up_port, "").await;
    let mut s = open_tunnel(gw.port, "/ws").await;
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(REQUEST_TIMEOUT, s.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "a half-closed tunnel stayed open: {closed:?}\n{}",
        gw.tails()
    );
    assert_eq!(
        seen.lock().unwrap().last().map(String::as_str),
        Some("eof"),
        "the app was not told of the half-close"
    );
    gw.await_metric(
        "portcullis_connections_open",
        0.0,
        "the tunnel's connection released",
    )
    .await;
}

/// SIGTERM with a websocket tunnel open: the gateway stays up and the tunnel keeps carrying
/// bytes until the client closes it, then the process exits 0; a tunnel still open at
/// `timeouts.shutdown` is cut and the process exits all the same.
#[tokio::test]
async fn shutdown_waits_for_open_websocket_tunnels_up_to_the_shutdown_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let quick = "lifecycle: { shutdown_delay: 0s }\ntimeouts: { shutdown: 30s }";
    let (mut gw, _idp) = tunnel_gateway(quick).await;
    let mut s = open_tunnel(gw.port, "/ws").await;
    gw.signal("TERM");
    // Well past the drain of ordinary connections: the tunnel holds the shutdown.
    for i in 0..8u8 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        s.write_all(&[i]).await.unwrap();
        let mut got = [0u8];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(
            got,
            [i],
            "the tunnel stopped carrying bytes during shutdown"
        );
    }
    assert!(
        gw.exited().is_none(),
        "exited with a tunnel open\n{}",
        gw.tails()
    );
    drop(s);
    let status = gw.wait_exit(REQUEST_TIMEOUT).await;
    assert!(status.success(), "{status:?}\n{}", gw.tails());

    let cut = "lifecycle: { shutdown_delay: 0s }\ntimeouts: { shutdown: 2s }";
    let (mut gw, _idp) = tunnel_gateway(cut).await;
    let mut s = open_tunnel(gw.port, "/ws").await;
    gw.signal("TERM");
    let status = gw.wait_exit(REQUEST_TIMEOUT).await;
    assert!(status.success(), "{status:?}\n{}", gw.tails());
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(REQUEST_TIMEOUT, s.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the tunnel outlived the process: {closed:?}"
    );
}

/// A raw upstream that answers at once with a chunked response, then echoes each piece of
/// the request body as it arrives (a full-duplex exchange, like a streaming RPC).
fn duplex_echo_upstream() -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let Some(head) = read_head(&mut s) else {
                    return;
                };
                let head = String::from_utf8_lossy(&head).to_lowercase();
                let mut left: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                // One answer per connection, and it says so: a connection the gateway pooled
                // and this thread then closed could meet the next request (a POST, not sent
                // again) and fail it with 502.
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
                );
                let mut buf = [0u8; 1024];
                while left > 0 {
                    let n = match s.read(&mut buf[..left.min(1024)]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    left -= n;
                    let mut chunk = format!("{n:x}\r\n").into_bytes();
                    chunk.extend_from_slice(&buf[..n]);
                    chunk.extend_from_slice(b"\r\n");
                    if s.write_all(&chunk).is_err() {
                        return;
                    }
                }
                let _ = s.write_all(b"0\r\n\r\n");
            });
        }
    });
    port
}

/// The upstream connection is driven by the client's request: while the answer streams back,
/// what the client sends next still reaches the upstream (no piece waits for another).
#[tokio::test]
async fn request_and_response_bodies_stream_both_ways_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = duplex_echo_upstream();
    let port = free_port();
    let idp = Idp::start_for_gateway(port, &[]).await;
    let gw = Gateway::start(GatewayOpts::new(
        port,
        &idp,
        &format!("http://127.0.0.1:{up}"),
    ))
    .await;
    let cookie = login_cookie(&gw, "alice").await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let pieces: [&[u8]; 3] = [b"first piece;", b"second;", b"third and last"];
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    let head = format!(
        "POST /duplex HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\nContent-Length: {total}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    for piece in pieces {
        s.write_all(piece).await.unwrap();
        // The echo of this piece comes back before the next one is sent.
        let echoed = async {
            while !got.windows(piece.len()).any(|w| w == piece) {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), echoed)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{:?} never came back; got {:?}",
                    String::from_utf8_lossy(piece),
                    String::from_utf8_lossy(&got)
                )
            });
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

const HUGE_BODY_BYTES: usize = 64 << 20;

/// A raw keep-alive upstream that numbers its connections. Paths: `/chunked` (a chunked
/// answer), `/big` (1 MiB), `/huge` (64 MiB), `/close` (answers, then closes the connection without saying so,
/// like an upstream whose keep-alive timeout just expired), `/bighead/<n>` (a header of `n`
/// bytes; the connection kept open when `n` ends in 0, else closed); anything else: "hello".
/// Records (connection number, path) per request.
type RequestLog = std::sync::Arc<std::sync::Mutex<Vec<(usize, String)>>>;

fn counting_upstream() -> (u16, RequestLog) {
    use std::io::Write;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = log.clone();
    std::thread::spawn(move || {
        for (conn, mut s) in l.incoming().flatten().enumerate() {
            let seen = seen.clone();
            std::thread::spawn(move || loop {
                let Some(head) = read_head(&mut s) else {
                    return;
                };
                let line = String::from_utf8_lossy(&head).to_string();
                let path = line.split(' ').nth(1).unwrap_or("").to_string();
                seen.lock().unwrap().push((conn, path.clone()));
                let ok = match path.as_str() {
                    "/chunked" => s.write_all(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nchu\r\n5\r\nnked!\r\n0\r\n\r\n",
                    ),
                    "/big" => {
                        let mut r = b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n".to_vec();
                        r.resize(r.len() + 1048576, b'x');
                        s.write_all(&r)
                    }
                    "/huge" => {
                        let len = HUGE_BODY_BYTES;
                        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                        let chunk = vec![b'x'; 1 << 20];
                        let mut r = s.write_all(head.as_bytes());
                        for _ in 0..len / chunk.len() {
                            r = r.and_then(|_| s.write_all(&chunk));
                        }
                        r
                    }
                    // Framed two ways at once: chunked wins (RFC 9112 §6.3).
                    "/tecl" => s.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                    ),
                    "/tegzip" => s.write_all(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                    ),
                    "/dupcl" => s.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
                    ),
                    "/csd" => s.write_all(
                        b"HTTP/1.1 200 OK\r\nClear-Site-Data: \"cache\", \"cookies\"\r\nContent-Length: 5\r\n\r\nhello",
                    ),
                    "/204cl" => s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
                    "/trailers" => s.write_all(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nSet-Cookie: _portcullis=planted\r\nContent-Length: 5\r\nX-Trailer: t\r\n\r\n",
                    ),
                    p if p.starts_with("/bighead/") => {
                        let n: usize = p["/bighead/".len()..].parse().unwrap_or(0);
                        let close = if p.ends_with('0') { "" } else { "Connection: close\r\n" };
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nX-Big: {}\r\n{close}Content-Length: 5\r\n\r\nhello",
                            "b".repeat(n)
                        );
                        s.write_all(head.as_bytes()).map(|_| {
                            if !close.is_empty() {
                                let _ = s.shutdown(std::net::Shutdown::Both);
                            }
                        })
                    }
                    _ => s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
                };
                if ok.is_err() || path == "/close" {
                    return;
                }
            });
        }
    });
    (port, log)
}

/// A gateway in front of `counting_upstream`, every path public (and the provider it needs).
async fn public_gateway_to_counting_upstream() -> (Gateway, Idp) {
    let port = free_port();
    let idp = Idp::start_for_gateway(port, &[]).await;
    let (up, _) = counting_upstream();
    let mut opts = GatewayOpts::new(port, &idp, &format!("http://127.0.0.1:{up}"));
    opts.extra = "routes: [ { prefix: \"/\", auth: skip } ]".into();
    (Gateway::start(opts).await, idp)
}

/// What reaches the client says the body's length as the gateway framed it, whatever the
/// upstream wrote: `Transfer-Encoding` beside `Content-Length` (the length goes), repeated
/// lengths (one stays, which HTTP/2 clients need; none on a 204); a transfer coding the
/// gateway cannot undo is a 502, `Clear-Site-Data` cannot clear the session cookie, and
/// trailers are not passed on.
#[tokio::test]
async fn upstream_framing_is_restated_for_the_client() {
    let (mut gw, _idp) = public_gateway_to_counting_upstream().await;
    for h2 in [false, true] {
        let get = |path: &str| {
            let url = gw.url(path);
            async move {
                try_send_body("GET", &url, &[], full(Vec::new()), h2)
                    .await
                    .unwrap_or_else(|e| panic!("GET {url} (h2: {h2}): {e}"))
            }
        };
        for path in ["/tecl", "/dupcl", "/csd"] {
            let r = get(path).await;
            assert_eq!(r.status, 200, "{path} (h2: {h2}): {}", r.dump());
            assert_eq!(r.text(), "hello", "{path} (h2: {h2})");
            assert!(
                r.header_all("content-length").len() <= 1,
                "{path} (h2: {h2}): {}",
                r.dump()
            );
            if let Some(len) = r.header("content-length") {
                assert_eq!(len, "5", "{path} (h2: {h2})");
            }
        }
        let r = get("/csd").await;
        assert_eq!(
            r.header_all("clear-site-data"),
            ["\"cache\""],
            "{}",
            r.dump()
        );
        let r = get("/tegzip").await;
        assert_eq!(r.status, 502, "h2: {h2}: {}", r.dump());
        // No length on a 204, and no trailers (a Set-Cookie or a framing field among them
        // would pass the hygiene; an HTTP/2 client resets a stream with such trailers).
        let r = get("/204cl").await;
        assert_eq!(r.status, 204, "h2: {h2}: {}", r.dump());
        assert!(
            r.header("content-length").is_none(),
            "h2: {h2}: {}",
            r.dump()
        );
        let r = get("/trailers").await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (200, "hello"),
            "h2: {h2}"
        );
        assert!(r.trailers.is_empty(), "h2: {h2}: {:?}", r.trailers);
    }
    gw.assert_healthy().await;
}

/// An upstream's response head is bounded at 64 KiB, whatever the reads that brought it in
/// (hyper's own bound, its read buffer, let a 100 KB head through when it came in one read).
#[tokio::test]
async fn an_upstream_response_head_over_64_kib_is_a_502() {
    let (mut gw, _idp) = public_gateway_to_counting_upstream().await;
    for h2 in [false, true] {
        for round in 0..4 {
            // Kept open (ends in 0) or closed after the answer.
            for n in [
                60_000usize,
                60_001,
                66_000,
                66_001,
                100_000,
                100_001,
                300_000,
            ] {
                // The test's HTTP/2 client takes no head that large.
                if h2 && n < 64 * 1024 {
                    continue;
                }
                let url = gw.url(&format!("/bighead/{n}"));
                let r = try_send_body("GET", &url, &[], full(Vec::new()), h2)
                    .await
                    .unwrap_or_else(|e| panic!("GET {url} (h2: {h2}): {e}"));
                let what = format!("{n}-byte header, h2: {h2}, round {round}");
                // (No dump of the answer: its head is the size of the header.)
                if n < 64 * 1024 {
                    assert_eq!(r.status, 200, "{what}");
                    assert_eq!(r.header("x-big").map(|v| v.len()), Some(n), "{what}");
                    assert_eq!(r.text(), "hello", "{what}");
                } else {
                    assert_eq!(r.status, 502, "{what}");
                    assert!(r.header("x-big").is_none(), "{what}");
                }
            }
        }
    }
    gw.assert_healthy().await;
}

#[tokio::test]
async fn upstream_connections_are_reused_but_never_dirty() {
    let port = free_port();
    let idp = Idp::start_for_gateway(port, &[]).await;
    let (up, log) = counting_upstream();
    let mut opts = GatewayOpts::new(port, &idp, &format!("http://127.0.0.1:{up}"));
    // Idle upstream connections are kept per worker thread: with one, reuse is observable.
    opts.env
        .push(("PORTCULLIS_WORKER_THREADS".into(), "1".into()));
    let gw = Gateway::start(opts).await;
    let cookie = login_cookie(&gw, "alice").await;
    let get = |path: &str| {
        let url = gw.url(path);
        let cookie = cookie.clone();
        async move { send("GET", &url, &[("cookie", &cookie)], Vec::new()).await }
    };
    let conns = |from: usize| -> Vec<usize> {
        let mut c: Vec<usize> = log.lock().unwrap()[from..]
            .iter()
            .map(|(c, _)| *c)
            .collect();
        c.dedup();
        c
    };

    // Sequential requests, fixed-length and chunked answers: one upstream connection.
    let start = log.lock().unwrap().len();
    for path in ["/a", "/chunked", "/b", "/chunked", "/c"] {
        let r = get(path).await;
        assert_eq!(r.status, 200, "{}", r.dump());
        let want = if path == "/chunked" {
            "chunked!"
        } else {
            "hello"
        };
        assert_eq!(r.text(), want);
    }
    assert_eq!(conns(start).len(), 1, "{:?}", log.lock().unwrap());

    // The upstream drops each connection after answering: every request still succeeds.
    for _ in 0..5 {
        let r = get("/close").await;
        assert_eq!(r.status, 200, "{}", r.dump());
        assert_eq!(r.text(), "hello");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // A client that leaves in the middle of a big answer: unless the rest of that body is
    // read off first, its connection must not serve the next request (which would then get
    // the leftover bytes as its answer).
    let before_abort = log.lock().unwrap().len();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let req = format!("GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 16 * 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    for _ in 0..3 {
        let r = get("/after").await;
        assert_eq!(r.status, 200, "{}", r.dump());
        assert_eq!(r.text(), "hello");
    }
    // (Whether it was closed or read to the end first, the answers above are the proof.)
    assert_eq!(log.lock().unwrap().len(), before_abort + 4);
}

/// With several worker threads, a connection goes back to the thread that took it, wherever
/// tokio moved the request meanwhile: under steady concurrent traffic the gateway keeps
/// reusing its connections instead of opening new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_connections_stay_few_with_several_worker_threads() {
    const WORKERS: usize = 2;
    const CLIENTS: usize = 8;
    const EACH: usize = 250;
    let port = free_port();
    let idp = Idp::start_for_gateway(port, &[]).await;
    let (up, log) = counting_upstream();
    let mut opts = GatewayOpts::new(port, &idp, &format!("http://127.0.0.1:{up}"));
    opts.env
        .push(("PORTCULLIS_WORKER_THREADS".into(), WORKERS.to_string()));
    let gw = Gateway::start(opts).await;
    let cookie = login_cookie(&gw, "alice").await;
    let start = log.lock().unwrap().len();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (url, cookie) = (gw.url(&format!("/c{i}")), cookie.clone());
            tokio::spawn(async move {
                for _ in 0..EACH {
                    let r = send("GET", &url, &[("cookie", &cookie)], Vec::new()).await;
                    assert_eq!(r.status, 200, "{}", r.dump());
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let log = log.lock().unwrap();
    assert_eq!(log.len() - start, CLIENTS * EACH);
    let used: std::collections::HashSet<usize> = log[start..].iter().map(|(c, _)| *c).collect();
    // A thread opens one only when all of its own are in use.
    assert!(
        used.len() <= WORKERS * CLIENTS,
        "{} upstream connections for {} requests",
        used.len(),
        CLIENTS * EACH
    );
}

/// A raw upstream that answers every request with "hello" on a kept-alive connection, except
/// `/bye`, after which it closes the connection without a word. Counts its open connections
/// (the others were closed by the gateway, or after `/bye`).
fn keep_alive_upstream() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let open = std::sync::Arc::new(AtomicUsize::new(0));
    let count = open.clone();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let count = count.clone();
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                while let Some(head) = read_head(&mut s) {
                    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                        .is_err()
                        || head.starts_with(b"GET /bye ")
                    {
                        break;
                    }
                }
                count.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (port, open)
}

/// This process's TCP sockets to 127.0.0.1:`port` in CLOSE-WAIT (the peer has closed, this
/// end not yet), from /proc/net/tcp.
fn close_wait_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let remote = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(2) == Some(&remote.as_str()) && f.get(3) == Some(&"08")
        })
        .count()
}

/// Idle upstream connections are closed without waiting for traffic to their upstream: one
/// the upstream closed is let go (not held in CLOSE-WAIT, a descriptor each, until the next
/// request there), and one unused for `timeouts.idle` is closed by the gateway.
#[tokio::test]
async fn idle_upstream_connections_are_closed_without_traffic() {
    use std::sync::atomic::Ordering;
    let port = free_port();
    let idp = Idp::start_for_gateway(port, &[]).await;
    let (up, open) = keep_alive_upstream();
    let mut opts = GatewayOpts::new(port, &idp, &format!("http://127.0.0.1:{up}"));
    opts.extra = "timeouts: { idle: 2s }\n".into();
    let mut gw = Gateway::start(opts).await;
    let cookie = login_cookie(&gw, "alice").await;
    let get = |path: &str| {
        let url = gw.url(path);
        let cookie = cookie.clone();
        async move { send("GET", &url, &[("cookie", &cookie)], Vec::new()).await }
    };

    let r = get("/bye").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(r.text(), "hello");
    let within = std::time::Duration::from_secs(20);
    support::ops::eventually(
        within,
        "the connection the upstream closed let go",
        || async {
            match close_wait_to(up) {
                0 => Ok(()),
                n => Err(format!("{n} sockets in CLOSE-WAIT")),
            }
        },
    )
    .await;

    let r = get("/kept").await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(r.text(), "hello");
    support::ops::eventually(
        within,
        "the idle connections closed by the gateway",
        || async {
            match open.load(Ordering::SeqCst) {
                0 => Ok(()),
                n => Err(format!("{n} upstream connections still open")),
            }
        },
    )
    .await;
    gw.assert_healthy().await;
}

#[tokio::test]
async fn a_client_reading_slowly_gets_the_whole_response() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = free_port();
    let idp = Idp::start_for_gateway(port, &[]).await;
    let (up, _) = counting_upstream();
    let gw = Gateway::start(GatewayOpts {
        // Not a request head being waited for: a stalled download must outlive this.
        extra: "timeouts: { header_read: 1s }".into(),
        ..GatewayOpts::new(port, &idp, &format!("http://127.0.0.1:{up}"))
    })
    .await;
    let cookie = login_cookie(&gw, "alice").await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!("GET /huge HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..got]).starts_with("HTTP/1.1 200"));
    // Socket buffers fill up and the gateway's writes stall for three times header_read.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    loop {
        match s.read(&mut buf).await.unwrap() {
            0 => break,
            n => got += n,
        }
        if got >= HUGE_BODY_BYTES {
            break;
        }
    }
    assert!(
        got >= HUGE_BODY_BYTES,
        "the download was cut after {got} bytes"
    );
}

/// An email the provider says is unverified is no identity to hand the app (anyone who can
/// set their email at the provider would be that email): no email header, and the user
/// header falls back to the subject, unless `authorization.require_email_verified: false`.
#[tokio::test]
async fn unverified_emails_are_not_passed_as_identity() {
    for (extra, passed) in [
        ("headers: { user_claim: email }", false),
        (
            "headers: { user_claim: email }\nauthorization: { require_email_verified: false }",
            true,
        ),
    ] {
        let s = Stack::with(&[], extra).await;
        for (user, verified) in [("unverified-mallory", false), ("alice", true)] {
            let b = s.login(user).await;
            let cookie = b.cookie_header(&s.gw.url("/"));
            let r = api(&s, &cookie, "GET", "/who", &[]).await;
            assert_eq!(r.status, 200, "{}", r.dump());
            let rec = s.upstream.last();
            let email = format!("{user}@example.test");
            let (want_user, want_email) = if verified || passed {
                (email.as_str(), Some(email.as_str()))
            } else {
                (user, None)
            };
            assert_eq!(
                rec.header("x-forwarded-user"),
                Some(want_user),
                "{extra}: {rec:#?}"
            );
            assert_eq!(
                rec.header("x-forwarded-email"),
                want_email,
                "{extra}: {rec:#?}"
            );
        }
    }
}

/// A GET's content (a search API's query) is passed on, on an upstream connection that is
/// closed after it: an app that does not read it would take it for the next request on that
/// connection ("CL.0" smuggling), another user's perhaps.
#[tokio::test]
async fn a_connection_that_carried_a_gets_body_is_not_reused() {
    let (_idp, gw) = gateway_before_a_buggy_upstream().await;
    // The upstream reads heads only: this body would be its next request's head.
    let smuggled = b"GET /echo/smuggled HTTP/1.1\r\nX-Ignore: ".to_vec();
    for i in 0..3 {
        let r = send("GET", &gw.url("/early"), &[], smuggled.clone()).await;
        assert_eq!(
            (r.status.as_u16(), r.text()),
            (200, "ok".to_string()),
            "{i}"
        );
        let victim = send("GET", &gw.url("/echo/victim"), &[], Vec::new()).await;
        assert_eq!(
            (victim.status.as_u16(), victim.text()),
            (200, "GET /echo/victim HTTP/1.1".to_string()),
            "{i}: {}\n{}",
            victim.dump(),
            gw.tails()
        );
    }
}

/// `CONNECT` opens no tunnel and reaches no app, whatever its target's form: 405, as with nginx.
#[tokio::test]
async fn connect_is_not_allowed() {
    let upstream = Upstream::start();
    let gw_port = free_port();
    let idp = Idp::start_for_gateway(gw_port, &[]).await;
    let gw = Gateway::start(GatewayOpts {
        extra: "routes: [{ prefix: \"/\", auth: skip }]".into(),
        ..GatewayOpts::new(gw_port, &idp, &upstream.url())
    })
    .await;
    let before = upstream.count();
    let up = format!("127.0.0.1:{}", upstream.port);
    for (target, host) in [
        ("/public/x", format!("127.0.0.1:{gw_port}")),
        // The authority form a proxy client sends.
        (up.as_str(), up.clone()),
        ("evil.example:443", "evil.example:443".into()),
    ] {
        let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let r = support::corpus::raw_exchange(
            gw.port,
            req.as_bytes(),
            std::time::Duration::from_secs(10),
        )
        .await;
        assert_eq!(r.status, Some(405), "{target}: {}", r.text);
        assert!(
            r.text.to_ascii_lowercase().contains("\r\nallow: get"),
            "{target}: {}",
            r.text
        );
    }
    assert_eq!(upstream.count(), before, "CONNECT reached the upstream");
    // The gateway's answers to other methods are unchanged.
    let get = send("GET", &gw.url("/public/x"), &[], Vec::new()).await;
    assert_eq!(get.status, 200, "{}", get.dump());
}
