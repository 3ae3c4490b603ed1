#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Micro-benchmarks of the per-request path: cookie open (1, 4, 8 KB sessions), header
//! hygiene, path normalisation, single-flight under contention, and the whole stack
//! in-process (a real loopback upstream, a real hyper client), and the tower stack alone, called
//! in-process with an in-process upstream.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, HeaderValue, Request};
use portcullis::config::{self, Config};
use portcullis::proxy::headers::{inject_identity, sanitize_request, set_forwarded, Spoofable};
use portcullis::session::{
    ActiveSession, CookieJar, Identity, Session, SessionCache, SessionCookies,
};
use std::sync::Arc;
use std::time::Duration;

const SECRET: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

fn config(upstream_port: u16, listen_port: u16) -> Config {
    let yaml = format!(
        r#"
listen: "127.0.0.1:{listen_port}"
upstream: "http://127.0.0.1:{upstream_port}"
provider: {{ issuer_url: "http://127.0.0.1:9", client_id: "c", client_secret: "s" }}
redirect_url: "http://127.0.0.1:{listen_port}/oauth2/callback"
cookie: {{ secrets: ["{SECRET}"], secure: false }}
admin: {{ listen: "" }}
log: {{ level: error }}
"#
    );
    match config::load_str(&yaml, Vec::new()) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

fn session(token_bytes: usize) -> Session {
    Session {
        id: [3; 16],
        // Now: the configured session.lifetime bounds a session's age.
        created_at_ms: portcullis::session::now_millis(),
        expires_at: u64::MAX / 2,
        access_token: "t".repeat(token_bytes),
        access_expires_at: 0,
        access_issued_at: 0,
        refresh_token: Some("r".repeat(43)),
        id_token: Some("i".repeat(600)),
        identity: Identity {
            sub: "benchuser".into(),
            email: Some("benchuser@example.test".into()),
            email_verified: true,
            name: Some("Bench User".into()),
            preferred_username: Some("benchuser".into()),
            groups: vec!["users".into(), "user-benchuser".into()],
            sid: Some("sid".into()),
        },
        last_seen: 0,
    }
}

/// The Cookie header a browser would send back for `s`.
fn cookie_header(cookies: &SessionCookies, s: &Session) -> HeaderValue {
    let lines = cookies
        .set_session(s, &CookieJar::default(), 2)
        .unwrap_or_default();
    let pairs: Vec<String> = lines
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|l| l.split(';').next().map(str::to_string))
        .collect();
    HeaderValue::from_str(&format!("theme=dark; {}; lang=en", pairs.join("; ")))
        .unwrap_or(HeaderValue::from_static(""))
}

/// The cookie-store session cookies of `cfg`, up to 8 chunks.
fn session_cookies(cfg: &Config) -> SessionCookies {
    SessionCookies::new(
        &cfg.cookie,
        (&cfg.provider.issuer_url, &cfg.provider.client_id),
        cfg.session.lifetime,
        8,
        "/",
        false,
    )
}

fn cookie_open(c: &mut Criterion) {
    let cfg = config(1, 2);
    let cookies = session_cookies(&cfg);
    let mut g = c.benchmark_group("cookie_open");
    // Access-token sizes giving ~1, ~4 and ~8 KB of cookie (tokens of base64url characters,
    // as JWTs are, sealed as their bytes).
    for (label, token) in [("1KB", 100), ("4KB", 3160), ("8KB", 7160)] {
        let s = session(token);
        let mut h = HeaderMap::new();
        h.insert(http::header::COOKIE, cookie_header(&cookies, &s));
        g.throughput(Throughput::Bytes(h[http::header::COOKIE].len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(label), &h, |b, h| {
            b.iter(|| {
                let jar = CookieJar::parse(h);
                cookies.open(&jar, 10, |_| None)
            })
        });
        g.bench_with_input(BenchmarkId::new("seal", label), &s, |b, s| {
            b.iter(|| cookies.set_session(s, &CookieJar::default(), 10))
        });
    }
    // Cost must not depend on how many distinct sessions are in use: 10,000 rotating
    // cookies against one repeated cookie.
    let headers: Vec<HeaderMap> = (0..10_000u32)
        .map(|i| {
            let mut s = session(43);
            s.id[..4].copy_from_slice(&i.to_le_bytes());
            s.identity.sub = format!("user{i}");
            let mut h = HeaderMap::new();
            h.insert(http::header::COOKIE, cookie_header(&cookies, &s));
            h
        })
        .collect();
    let mut i = 0usize;
    g.bench_function("rotating_10k_sessions", |b| {
        b.iter(|| {
            i = (i + 1) % headers.len();
            let jar = CookieJar::parse(&headers[i]);
            cookies.open(&jar, 10, |_| None)
        })
    });
    g.bench_function("one_session", |b| {
        b.iter(|| {
            let jar = CookieJar::parse(&headers[0]);
            cookies.open(&jar, 10, |_| None)
        })
    });
    // The request path: the session cache in front of the decryption (default size).
    let cache = SessionCache::new(cfg.limits.session_cache_bytes);
    g.bench_function("cached/one_session", |b| {
        b.iter(|| {
            let jar = CookieJar::parse(&headers[0]);
            cookies
                .open_active(&jar, 10, &cache, |_| None)
                .map(|o| o.is_some())
        })
    });
    g.bench_function("cached/rotating_10k_sessions", |b| {
        b.iter(|| {
            i = (i + 1) % headers.len();
            let jar = CookieJar::parse(&headers[i]);
            cookies
                .open_active(&jar, 10, &cache, |_| None)
                .map(|o| o.is_some())
        })
    });
    g.finish();
}

fn header_hygiene(c: &mut Criterion) {
    let cfg = config(1, 2);
    let cookies = session_cookies(&cfg);
    let spoofable = Spoofable::new(&cfg.headers);
    let s = session(43);
    let active = ActiveSession::new(s.clone());
    let mut base = HeaderMap::new();
    for (k, v) in [
        ("host", "app.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120 Safari/537.36",
        ),
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        ),
        ("accept-language", "en-US,en;q=0.9"),
        ("accept-encoding", "gzip, deflate, br"),
        ("connection", "keep-alive"),
        ("x-forwarded-user", "mallory"),
        ("x-request-id", "abc-123"),
    ] {
        base.insert(k, HeaderValue::from_static(v));
    }
    base.insert(http::header::COOKIE, cookie_header(&cookies, &s));
    let ip = portcullis::proxy::headers::ip_header([127, 0, 0, 1].into());
    c.bench_function("header_hygiene", |b| {
        b.iter(|| {
            let mut h = base.clone();
            let clean =
                sanitize_request(&mut h, || true, false, &spoofable, |n| cookies.is_ours(n));
            set_forwarded(&mut h, &ip, "http", clean.prior, clean.host);
            inject_identity(&mut h, active.upstream_headers(&cfg.headers));
            h
        })
    });
}

fn path_normalize(c: &mut Criterion) {
    let mut g = c.benchmark_group("path_normalize");
    for p in ["/app/items/42", "/app/./x/../items/%34%32"] {
        g.bench_with_input(BenchmarkId::from_parameter(p), p, |b, p| {
            b.iter(|| portcullis::proxy::path::normalize(p).map(|c| c.len()))
        });
    }
    g.finish();
}

fn single_flight(c: &mut Criterion) {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("{e}"),
    };
    let sf = Arc::new(portcullis::singleflight::SingleFlight::<u64, u64>::new(
        Duration::from_secs(60),
    ));
    // 64 concurrent callers per key, a fresh key per iteration: one runs, 63 wait and share.
    let mut key = 0u64;
    c.bench_function("single_flight_64_callers", |b| {
        b.to_async(&rt).iter(|| {
            key += 1;
            let sf = sf.clone();
            let k = key;
            async move {
                let mut tasks = Vec::with_capacity(64);
                for _ in 0..64 {
                    let sf = sf.clone();
                    tasks.push(tokio::spawn(async move {
                        let (flight, _, _) = sf.run(
                            k,
                            || async move {
                                tokio::task::yield_now().await;
                                k
                            },
                            |_| true,
                            0,
                        );
                        flight.await
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            }
        })
    });
}

/// The single-threaded runtime the in-process benchmarks run on, as a one-core gateway's.
fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// An upstream in this process that answers 200 "ok" only with a bearer, like the load
/// harness's; returns its port.
async fn spawn_upstream() -> u16 {
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_port = up.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = up.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let ok = req.headers().contains_key(http::header::AUTHORIZATION);
                        let mut r = http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"ok\n"),
                        ));
                        if !ok {
                            *r.status_mut() = http::StatusCode::UNAUTHORIZED;
                        }
                        Ok::<_, std::convert::Infallible>(r)
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    up_port
}

/// The whole request path: hyper client → portcullis (in-process, real sockets) → upstream.
fn whole_stack(c: &mut Criterion) {
    let rt = current_thread();
    let (gateway_url, cookie) = rt.block_on(async {
        let up_port = spawn_upstream().await;
        let gw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw_port = gw.local_addr().unwrap().port();
        let cfg = Arc::new(config(up_port, gw_port));
        let shared =
            portcullis::app::Shared::new(Arc::new(portcullis::metrics::Metrics::new().unwrap()));
        let generation = portcullis::live::build(cfg, &shared, None).await.unwrap();
        let cookie = cookie_header(&generation.app.cookies, &session(43));
        let live = Arc::new(arc_swap::ArcSwap::from_pointee(generation));
        tokio::spawn(portcullis::server::serve(live, gw, std::future::pending()));
        (format!("http://127.0.0.1:{gw_port}/bench"), cookie)
    });
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    c.bench_function("whole_stack_authenticated_request", |b| {
        b.to_async(&rt).iter(|| async {
            let req = Request::get(gateway_url.as_str())
                .header(http::header::COOKIE, cookie.clone())
                .body(http_body_util::Empty::new())
                .unwrap();
            let resp = client.request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
        })
    });
}

/// The tower stack alone, called in-process as the server calls it for each request: no
/// client socket and no HTTP/1 parsing, only the layers (route, session, refresh, policy,
/// header hygiene, metrics) and the pooled client's exchange with an in-process upstream.
fn stack_in_process(c: &mut Criterion) {
    use tower::Service;
    let rt = current_thread();
    let (stack, cookie) = rt.block_on(async {
        let up_port = spawn_upstream().await;
        let cfg = Arc::new(config(up_port, 4180));
        let shared =
            portcullis::app::Shared::new(Arc::new(portcullis::metrics::Metrics::new().unwrap()));
        let generation = portcullis::live::build(cfg, &shared, None).await.unwrap();
        let cookie = cookie_header(&generation.app.cookies, &session(43));
        (generation.stack.clone(), cookie)
    });
    let peer: std::net::SocketAddr = ([127, 0, 0, 1], 40000).into();
    let conn = portcullis::proxy::forward::ConnInfo {
        remote: peer,
        tls: false,
        ip: portcullis::proxy::headers::ip_header(peer.ip()),
    };
    c.bench_function("stack_in_process_authenticated_request", |b| {
        b.to_async(&rt).iter(|| {
            // A clone per request, as cheap as the server's per connection (Arcs only).
            let mut stack = stack.clone();
            let mut req = Request::get("/bench")
                .header(http::header::HOST, "127.0.0.1:4180")
                .header(http::header::COOKIE, cookie.clone())
                .body(portcullis::body::Body::full(bytes::Bytes::new()))
                .unwrap();
            req.extensions_mut().insert(conn.clone());
            async move {
                let resp = stack.call(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .unwrap()
            }
        })
    });
}

criterion_group!(
    benches,
    cookie_open,
    header_hygiene,
    path_normalize,
    single_flight,
    whole_stack,
    stack_in_process
);
criterion_main!(benches);
