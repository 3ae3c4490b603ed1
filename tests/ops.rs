//! Operating the gateway: the Prometheus exposition (checked by `promtool`, scraped by a
//! real Prometheus), graceful SIGTERM under load, hot reload (secret files, SIGHUP,
//! invalid configs, Kubernetes ConfigMap symlink swaps), logs without secrets, and
//! forward auth behind a real nginx `auth_request`.
//!
//! Needs `promtool`, `prometheus` and `nginx` (`make deps`): a missing tool fails the
//! test, it is never skipped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::ops::*;
use support::*;

/// Replaces the character at `i` with another base64url character.
fn flip(v: &str, i: usize) -> String {
    let mut b = v.as_bytes().to_vec();
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

/// An IdP, the echo upstream and the options of a gateway on a fresh port in front of it.
async fn parts(idp_env: &[(&str, &str)]) -> (Idp, Upstream, GatewayOpts) {
    let port = free_port();
    let idp = Idp::start_for_gateway(port, idp_env).await;
    let upstream = Upstream::start();
    let opts = GatewayOpts::new(port, &idp, &upstream.url());
    (idp, upstream, opts)
}

// ---------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------

/// An HTTP/2 (prior knowledge) connection to the gateway on `port`, its driver task, and a
/// request for the upstream's `/slow` (answered after 3 s) to send on it.
async fn h2_slow_request(
    port: u16,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
    http::Request<Empty<Bytes>>,
) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let req = http::Request::get(format!("http://127.0.0.1:{port}/slow"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    (sender, tokio::spawn(conn), req)
}

/// A request whose client goes away before the answer (an HTTP/2 stream reset: hyper drops
/// the request's future) leaves the in-flight gauge and is counted and logged as 499.
#[tokio::test]
async fn abandoned_requests_leave_the_in_flight_gauge() {
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    opts.extra = r#"routes: [ { prefix: "/", auth: skip } ]"#.to_string();
    let gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    let port = gw.port;
    let (mut sender, conn, req) = h2_slow_request(port).await;
    // The upstream answers /slow after 3 s: give up long before (dropping the response
    // future resets the stream).
    let pending = tokio::spawn(async move { sender.send_request(req).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let m = gw.metrics().await;
    assert_eq!(
        m.value("portcullis_requests_in_flight"),
        1.0,
        "{}",
        gw.tails()
    );
    pending.abort();
    let _ = pending.await;
    conn.abort();
    assert_abandoned_once(&gw).await;
}

/// The one request in flight was abandoned: the gauge back to 0, counted and logged as 499,
/// and not finished for nobody (the upstream answers /slow with a 200 after 3 s).
async fn assert_abandoned_once(gw: &OpsGateway) {
    gw.await_metric("portcullis_requests_in_flight", 0.0, "in-flight back to 0")
        .await;
    let m = gw.metrics().await;
    assert_eq!(
        m.value(r#"portcullis_requests_total{method="GET",route="skip_auth",status="4xx"}"#),
        1.0,
        "counted under its own route kind: {}",
        m.text
    );
    // The wait on the upstream is the upstream's: not the gateway's own time.
    assert_eq!(
        m.value(r#"portcullis_request_duration_seconds_bucket{route="skip_auth",le="0.1"}"#),
        1.0,
        "{}",
        m.text
    );
    let log = gw.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("status=499"))
        .unwrap_or_else(|| panic!("no 499 access line:\n{}", gw.tails()));
    assert!(line.contains("route=\"skip_auth\""), "{line}");
    assert!(line.contains("upstream_ms="), "{line}");
    assert!(
        !log.contains("route=\"skip_auth\" status=200"),
        "finished for nobody: {}",
        gw.tails()
    );
}

/// An HTTP/1.1 client that closes its connection while the upstream is still working: the
/// request is dropped at once (the upstream's with it), counted and logged as 499, instead of
/// being finished for nobody.
#[tokio::test]
async fn abandoned_http1_requests_are_dropped_and_logged_499() {
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    opts.extra = r#"routes: [ { prefix: "/", auth: skip } ]"#.to_string();
    let gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    let req = format!("GET /slow HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n", gw.port);
    send_and_leave(&gw, req.as_bytes()).await;
    assert_abandoned_once(&gw).await;
}

/// Sends `bytes` to the gateway on a new connection and, once its request is in flight,
/// closes the connection.
async fn send_and_leave(gw: &OpsGateway, bytes: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    tcp.write_all(bytes).await.unwrap();
    gw.await_metric(
        "portcullis_requests_in_flight",
        1.0,
        "the request in flight",
    )
    .await;
    drop(tcp);
}

/// An HTTP/1.1 client that closes its connection halfway through its request body, while the
/// upstream reads it: logged and counted as an abandoned request (499), not as a bad one.
#[tokio::test]
async fn a_client_leaving_mid_upload_is_logged_499() {
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    opts.extra = r#"routes: [ { prefix: "/", auth: skip } ]"#.to_string();
    let gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    let req = format!(
        "POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 100000\r\n\r\n{}",
        gw.port,
        "x".repeat(20_000)
    );
    send_and_leave(&gw, req.as_bytes()).await;
    gw.await_metric("portcullis_requests_in_flight", 0.0, "in-flight back to 0")
        .await;
    let log = gw.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("method=POST") && l.contains("status=499")),
        "no 499 access line:\n{}",
        gw.tails()
    );
    assert!(!log.contains("status=400"), "{}", gw.tails());
}

/// A client that stops sending its body is answered 408 (after `timeouts.idle`, or the
/// shorter `timeouts.upstream_response`), one whose chunked body is malformed 400: the
/// client's faults, not counted as upstream errors. A client that reads none of a large
/// answer is disconnected after `timeouts.idle`.
#[tokio::test]
async fn stalled_and_broken_clients_are_cut_off_and_not_blamed_on_the_upstream() {
    use support::corpus::raw_exchange;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_idp, upstream, mut opts) = parts(&[]).await;
    opts.extra = "routes: [ { prefix: \"/\", auth: skip } ]\n\
                  timeouts: { header_read: 2s, idle: 3s, upstream_response: 1s }"
        .to_string();
    let gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    let host = format!("127.0.0.1:{}", gw.port);

    // Part of the body, then none of it.
    for sent in ["0123456789abcdef", ""] {
        let stalled =
            format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 20\r\n\r\n{sent}");
        let r = raw_exchange(gw.port, stalled.as_bytes(), Duration::from_secs(60)).await;
        assert_eq!(r.status, Some(408), "{sent:?}: {}\n{}", r.text, gw.tails());
        assert!(r.closed, "{}", r.text);
    }

    let malformed = format!(
        "POST /upload HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n\
         zz\r\nhello\r\n0\r\n\r\n"
    );
    let r = raw_exchange(gw.port, malformed.as_bytes(), Duration::from_secs(60)).await;
    assert_eq!(r.status, Some(400), "{}\n{}", r.text, gw.tails());

    // A stalled body on a gateway endpoint that reads it itself.
    let sign_out = format!(
        "POST /oauth2/backchannel_logout HTTP/1.1\r\nHost: {host}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 20\r\n\r\nlogout_token=ab"
    );
    let r = raw_exchange(gw.port, sign_out.as_bytes(), Duration::from_secs(60)).await;
    assert!(r.closed, "{}", r.text);

    let m = gw.metrics().await;
    for kind in ["connect", "timeout", "reset", "other"] {
        let series = format!("portcullis_upstream_errors_total{{kind=\"{kind}\"}}");
        assert_eq!(m.value(&series), 0.0, "{series}\n{}", gw.tails());
    }

    // Reads nothing of a 32 MB answer, through small socket buffers. (The connections above
    // are gone first: one the gateway had yet to count out would pass for this one below.)
    gw.await_metric(
        "portcullis_connections_open",
        0.0,
        "the earlier connections closed",
    )
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket
        .connect(format!("127.0.0.1:{}", gw.port).parse().unwrap())
        .await
        .unwrap();
    let req = format!("GET /big HTTP/1.1\r\nHost: {host}\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    gw.await_metric("portcullis_connections_open", 1.0, "the connection open")
        .await;
    gw.await_metric(
        "portcullis_connections_open",
        0.0,
        "the unread connection closed",
    )
    .await;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got += n,
            Err(_) => panic!("the connection was left open after {got} bytes"),
        }
    }
    assert!(got < support::upstream::BIG_BODY, "read {got} bytes");
    assert!(upstream.records().iter().any(|r| r.path == "/big"));
}

/// Requests the HTTP/1 parser refuses (malformed, oversized, ambiguous framing) are counted
/// and logged like any other: attack traffic shows in the metrics and the access log.
#[tokio::test]
async fn requests_refused_by_the_parser_are_counted_and_logged() {
    use support::corpus::raw_exchange;
    let (_idp, _upstream, opts) = parts(&[]).await;
    let gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    let host = format!("127.0.0.1:{}", gw.port);
    let series = r#"portcullis_requests_total{method="other",route="proxied",status="4xx"}"#;
    let before = gw.metrics().await.get(series).unwrap_or(0.0);
    let huge = "a".repeat(100_000);
    let refused = [
        "GARBAGE\r\n\r\n".to_string(),
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nHost: other\r\n\r\n"),
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-Big: {huge}\r\n\r\n"),
    ];
    for req in &refused {
        let r = raw_exchange(gw.port, req.as_bytes(), Duration::from_secs(10)).await;
        let status = r.status.unwrap_or(0);
        assert!((400..500).contains(&status), "{req:.60}: {}", r.text);
    }
    let m = gw.metrics().await;
    assert_eq!(m.get(series).unwrap_or(0.0) - before, 3.0, "{}", m.text);
    let lines = gw
        .stderr()
        .lines()
        .filter(|l| l.contains("request refused by the parser") && l.contains("client=127.0.0.1"))
        .count();
    assert_eq!(lines, 3, "each names the client: {}", gw.tails());
}

/// An upstream on a free port that reads one request per connection, then misbehaves.
#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Closes without answering.
    Close,
    /// Resets the connection.
    Reset,
    /// Answers something that is not HTTP.
    Garbage,
    /// Sends a 200 head and `CUT_BODY` of a longer announced body, then resets.
    CutBody,
    /// Never answers (keeps the connection open).
    Hang,
    /// Sends a 200 head and `CUT_BODY` of a longer announced body, then nothing (keeps the
    /// connection open).
    StallBody,
}

/// What `Misbehaviour::CutBody` sends of its 100-byte body.
const CUT_BODY: &str = "partial body!";

async fn misbehaving_upstream(how: Misbehaviour) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                match how {
                    Misbehaviour::Close => {}
                    Misbehaviour::Reset => {
                        let _ = tcp.set_zero_linger();
                    }
                    Misbehaviour::Garbage => {
                        let _ = tcp.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
                    }
                    Misbehaviour::CutBody => {
                        let head = "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n";
                        let _ = tcp.write_all(format!("{head}{CUT_BODY}").as_bytes()).await;
                        // Read by the gateway before the reset (which would discard it).
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let _ = tcp.set_zero_linger();
                    }
                    Misbehaviour::Hang => std::future::pending::<()>().await,
                    Misbehaviour::StallBody => {
                        let head = "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n";
                        let _ = tcp.write_all(format!("{head}{CUT_BODY}").as_bytes()).await;
                        std::future::pending::<()>().await
                    }
                }
            });
        }
    });
    port
}

/// A keep-alive upstream that closes its connection when a request for `/again` arrives on it
/// after another one, as a server closing an idle keep-alive connection just as a request
/// goes out on it; it answers every other request. Counts the `/again` requests it read.
async fn closing_on_reuse_upstream() -> (u16, Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(AtomicU64::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                for first in std::iter::once(true).chain(std::iter::repeat(false)) {
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let again = head.split(|&b| b == b' ').nth(1) == Some(b"/again");
                    if again {
                        count.fetch_add(1, Ordering::SeqCst);
                        if !first {
                            return;
                        }
                    }
                    let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if tcp.write_all(ok.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

/// A pooled connection the upstream closes as a request goes out on it (its keep-alive
/// timeout running out at that moment): an idempotent request without a body is sent again on
/// a new connection, as nginx does (RFC 9112 §9.3.1), instead of failing with 502; a POST is
/// not (it may have been acted on).
#[tokio::test]
async fn idempotent_requests_survive_an_upstream_closing_a_pooled_connection() {
    let (port, seen) = closing_on_reuse_upstream().await;
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    opts.extra = format!(
        r#"routes: [ {{ prefix: "/", auth: skip, upstream: "http://127.0.0.1:{port}" }} ]"#
    );
    // One worker thread: one pool of upstream connections (they are kept per thread).
    opts.env = vec![("PORTCULLIS_WORKER_THREADS".into(), "1".into())];
    let gw = Gateway::start(opts).await;
    // Each round: a first request opens the connection; after a pause (the connection idle as
    // an app server's keep-alive runs out) the next goes out on it and meets the close.
    for (method, status) in [("GET", 200), ("HEAD", 200), ("DELETE", 200), ("POST", 502)] {
        let first = send("GET", &gw.url("/open"), &[], Vec::new()).await;
        assert_eq!(first.status, 200, "{}", first.dump());
        tokio::time::sleep(Duration::from_millis(400)).await;
        let before = seen.load(Ordering::SeqCst);
        let r = send(method, &gw.url("/again"), &[], Vec::new()).await;
        assert_eq!(r.status, status, "{method}: {}\n{}", r.dump(), gw.tails());
        // The request reached the closing connection (and, sent again, a new one).
        let reads = seen.load(Ordering::SeqCst) - before;
        assert_eq!(reads, if status == 200 { 2 } else { 1 }, "{method}");
    }
}

/// `upstream_errors_total{kind}` says what went wrong: no connection, a connection that
/// broke off, an answer that is not HTTP.
#[tokio::test]
async fn upstream_errors_are_counted_by_what_went_wrong() {
    let close = misbehaving_upstream(Misbehaviour::Close).await;
    let reset = misbehaving_upstream(Misbehaviour::Reset).await;
    let garbage = misbehaving_upstream(Misbehaviour::Garbage).await;
    let refused = free_port();
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    opts.extra = format!(
        r#"routes:
  - {{ prefix: "/close/", auth: skip, upstream: "http://127.0.0.1:{close}" }}
  - {{ prefix: "/reset/", auth: skip, upstream: "http://127.0.0.1:{reset}" }}
  - {{ prefix: "/garbage/", auth: skip, upstream: "http://127.0.0.1:{garbage}" }}
  - {{ prefix: "/refused/", auth: skip, upstream: "http://127.0.0.1:{refused}" }}
"#
    );
    let gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    for (path, kind) in [
        ("/close/x", "reset"),
        ("/reset/x", "reset"),
        ("/garbage/x", "other"),
        ("/refused/x", "connect"),
    ] {
        let before = gw.metrics().await;
        let id = format!("failing-{kind}-{}", path.len());
        let r = send("GET", &gw.url(path), &[("x-request-id", &id)], Vec::new()).await;
        assert_eq!(r.status, 502, "{path}: {}", r.dump());
        let after = gw.metrics().await;
        for k in ["connect", "timeout", "reset", "other"] {
            let series = format!("portcullis_upstream_errors_total{{kind=\"{k}\"}}");
            let counted = after.value(&series) - before.value(&series);
            let expected = if k == kind { 1.0 } else { 0.0 };
            assert_eq!(counted, expected, "{path}: {series}\n{}", gw.tails());
        }
        // The warning names the request, as its access-log line does.
        let log = gw.stderr();
        assert!(
            log.lines().any(|l| l.contains("upstream request failed")
                && l.contains(&id)
                && l.contains(&format!("kind=\"{kind}\""))),
            "{path}: {log}"
        );
    }
}

/// GETs `path` (request id `id`) over HTTP/1.1 through a gateway in front of a misbehaving
/// upstream: a 200 with `CUT_BODY` of its body arrives, and the gateway then closes (or
/// resets) the connection within `within`, instead of leaving it waiting for the rest.
async fn get_cut_short(gw: &OpsGateway, path: &str, id: &str, within: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nX-Request-Id: {id}\r\n\r\n",
        gw.port
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, tcp.read_to_end(&mut got)).await;
    assert!(
        read.is_ok(),
        "the client connection stays open:\n{}",
        gw.tails()
    );
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with(CUT_BODY), "{text}");
}

/// The gateway's warning about an upstream response body that failed.
fn body_failure_line(gw: &OpsGateway) -> String {
    gw.stderr()
        .lines()
        .find(|l| l.contains("upstream response body failed"))
        .unwrap_or_else(|| panic!("the failed body is not logged:\n{}", gw.tails()))
        .to_string()
}

/// An upstream that sends a 200 head and part of the body it announced, then resets the
/// connection: the client's answer is cut short and its connection closed, and the gateway
/// says so (the access line, written at the head, says 200).
#[tokio::test]
async fn an_upstream_body_cut_short_is_counted_and_logged() {
    let cut = misbehaving_upstream(Misbehaviour::CutBody).await;
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    opts.extra =
        format!(r#"routes: [ {{ prefix: "/", auth: skip, upstream: "http://127.0.0.1:{cut}" }} ]"#);
    let gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    let before = gw.metrics().await;
    get_cut_short(&gw, "/cut", "cut-1", Duration::from_secs(10)).await;
    gw.await_metric(
        r#"portcullis_upstream_errors_total{kind="reset"}"#,
        before.value(r#"portcullis_upstream_errors_total{kind="reset"}"#) + 1.0,
        "the cut body counted as an upstream reset",
    )
    .await;
    let line = body_failure_line(&gw);
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("cut-1"), "no request id: {line}");
    assert!(
        !line.contains(CUT_BODY),
        "the body's content is logged: {line}"
    );

    // Over HTTP/2, the stream is reset, and counted too.
    let (mut sender, conn, _) = h2_slow_request(gw.port).await;
    let req = http::Request::get(format!("http://127.0.0.1:{}/cut", gw.port))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.into_body().collect().await.is_err(),
        "the HTTP/2 client sees the cut"
    );
    conn.abort();
    gw.await_metric(
        r#"portcullis_upstream_errors_total{kind="reset"}"#,
        before.value(r#"portcullis_upstream_errors_total{kind="reset"}"#) + 2.0,
        "the cut HTTP/2 body counted as an upstream reset",
    )
    .await;
}

/// An upstream that sends a 200 head and part of its body, then nothing: given up after the
/// (route's) response timeout without a byte, as nginx's `proxy_read_timeout`; the client's
/// connection is closed, and the upstream's timeout counted and logged.
#[tokio::test]
async fn an_upstream_body_that_stops_coming_is_given_up() {
    let stall = misbehaving_upstream(Misbehaviour::StallBody).await;
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    opts.extra = format!(
        r#"routes: [ {{ prefix: "/", auth: skip, upstream: "http://127.0.0.1:{stall}", timeouts: {{ upstream_response: 1s }} }} ]"#
    );
    let gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    get_cut_short(&gw, "/stall", "stall-1", Duration::from_secs(20)).await;
    gw.await_metric(
        r#"portcullis_upstream_errors_total{kind="timeout"}"#,
        1.0,
        "the stalled body counted as an upstream timeout",
    )
    .await;
    let line = body_failure_line(&gw);
    assert!(
        line.contains("stall-1") && line.contains("timeout"),
        "{line}"
    );

    // Over HTTP/2, the stream is reset after the same silence, and counted too.
    let (mut sender, conn, _) = h2_slow_request(gw.port).await;
    let req = http::Request::get(format!("http://127.0.0.1:{}/stall", gw.port))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect()).await;
    assert!(
        matches!(body, Ok(Err(_))),
        "the HTTP/2 stream is not reset: {:?}\n{}",
        body.map(|b| b.map(|b| b.to_bytes())),
        gw.tails()
    );
    conn.abort();
    gw.await_metric(
        r#"portcullis_upstream_errors_total{kind="timeout"}"#,
        2.0,
        "the stalled HTTP/2 body counted as an upstream timeout",
    )
    .await;
}

/// The admin port keeps no connection that sends nothing, or only an HTTP/2 preface (it
/// speaks HTTP/1.1, as probes and Prometheus do), and still answers meanwhile.
#[tokio::test]
async fn silent_admin_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_idp, _upstream, opts) = parts(&[]).await;
    let gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    let admin = ("127.0.0.1", gw.admin_port.unwrap());
    let mut silent = tokio::net::TcpStream::connect(admin).await.unwrap();
    let mut h2 = tokio::net::TcpStream::connect(admin).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    assert_eq!(
        gw.metrics().await.value("portcullis_requests_in_flight"),
        0.0
    );
    for (what, conn) in [("silent", &mut silent), ("h2c preface", &mut h2)] {
        let mut buf = [0u8; 256];
        let closed = async {
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        assert!(
            tokio::time::timeout(Duration::from_secs(20), closed)
                .await
                .is_ok(),
            "{what}: the admin connection stays open"
        );
    }
}

#[tokio::test]
async fn metrics_pass_promtool_and_count_without_identifying_labels() {
    let (idp, upstream, opts) = parts(&[]).await;
    let gw = OpsGateway::start(&OpsConfig::new(opts)).await;

    let m = gw.metrics().await;
    assert_eq!(
        m.value(r#"portcullis_login_flows_total{event="completed",reason=""}"#),
        0.0
    );
    // Families of rare events are there from start-up, at 0 (a dashboard's rate() and an
    // alert on `increase(...) > 0` need a series before the first event).
    for series in [
        r#"portcullis_config_reloads_total{result="success"}"#,
        r#"portcullis_config_reloads_total{result="failure"}"#,
        r#"portcullis_logouts_total{kind="user"}"#,
        r#"portcullis_logouts_total{kind="backchannel"}"#,
        r#"portcullis_token_revocations_total{outcome="revoked"}"#,
        r#"portcullis_token_revocations_total{outcome="refused"}"#,
        r#"portcullis_token_revocations_total{outcome="unavailable"}"#,
        r#"portcullis_provider_request_duration_seconds_count{endpoint="revocation"}"#,
    ] {
        assert_eq!(m.value(series), 0.0, "{series}\n{}", m.text);
    }

    // One login, then a tampered cookie, then proxied requests.
    let b = Browser::new();
    let t = login_at(&b, &gw.origin(), "/ops-login-page", "alice").await;
    assert_eq!(t.last.status, 200, "{}", t.last.dump());
    let value = b
        .cookie(&gw.url("/"), "_portcullis")
        .expect("session cookie");
    let cookie = format!("_portcullis={value}");

    let tampered = format!("_portcullis={}", flip(&value, value.len() / 2));
    let r = api_get(&gw.url("/ops-tampered-path"), &tampered).await;
    assert_eq!(r.status, 401, "{}", r.dump());

    for i in 0..5 {
        let r = api_get(
            &gw.url(&format!("/ops-proxied-path/{i}?q=ops-query")),
            &cookie,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.dump());
    }
    assert_eq!(upstream.count(), 6, "the login's last page and 5 API calls");

    // A second gateway (same cookie keys) in front of a closed port.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let gw2 = OpsGateway::start(&OpsConfig::new(GatewayOpts::new(free_port(), &idp, &dead))).await;
    let r = api_get(&gw2.url("/ops-dead-upstream"), &cookie).await;
    assert_eq!(r.status, 502, "{}", r.dump());

    // Probes of the main listener are counted as `health`, not as login traffic.
    let health = r#"portcullis_requests_total{method="GET",route="health",status="2xx"}"#;
    let flow = r#"portcullis_requests_total{method="GET",route="flow",status="2xx"}"#;
    let before = gw.metrics().await;
    for path in ["/healthz", "/readyz"] {
        let r = send("GET", &gw.url(path), &[], Vec::new()).await;
        assert_eq!(r.status, 200, "{path}: {}", r.dump());
    }

    let m = gw.metrics().await;
    assert_eq!(m.value(health), before.value(health) + 2.0, "{}", m.text);
    assert_eq!(m.value(flow), before.value(flow), "{}", m.text);
    let (status, printed) = promtool_check_metrics(&m.text);
    assert!(
        status.success() && printed.trim().is_empty(),
        "promtool check metrics: {status}\n{printed}\n---- exposition ----\n{}",
        m.text
    );
    assert_eq!(
        m.value(r#"portcullis_requests_total{method="GET",route="proxied",status="2xx"}"#),
        6.0
    );
    assert_eq!(
        m.value(r#"portcullis_requests_total{method="GET",route="proxied",status="4xx"}"#),
        1.0,
        "the tampered cookie's 401"
    );
    assert_eq!(
        m.value(r#"portcullis_login_flows_total{event="started",reason=""}"#),
        1.0
    );
    assert_eq!(
        m.value(r#"portcullis_login_flows_total{event="completed",reason=""}"#),
        1.0
    );
    let build: Vec<_> = m
        .samples
        .iter()
        .filter(|(k, _)| k.starts_with("portcullis_build_info{version=\""))
        .collect();
    assert!(
        build.len() == 1 && *build[0].1 == 1.0,
        "build_info: {build:?}\n{}",
        m.text
    );
    assert!(
        m.samples
            .keys()
            .any(|k| k.starts_with("portcullis_request_duration_seconds_bucket{")),
        "{}",
        m.text
    );
    assert!(
        m.value(r#"portcullis_request_duration_seconds_count{route="proxied"}"#) >= 7.0,
        "{}",
        m.text
    );
    assert_eq!(m.value("portcullis_upstream_duration_seconds_count"), 6.0);
    assert!(m.value("portcullis_upstream_duration_seconds_sum") > 0.0);
    assert!(m.value("portcullis_connections_open") >= 0.0);
    assert_eq!(m.value("portcullis_requests_in_flight"), 0.0);
    assert_eq!(
        m.value(r#"portcullis_session_cookies_rejected_total{reason="tampered"}"#),
        1.0
    );
    assert!(
        m.value(r#"portcullis_provider_request_duration_seconds_count{endpoint="token"}"#) >= 1.0
    );
    assert_eq!(
        m.value(r#"portcullis_upstream_errors_total{kind="connect"}"#),
        0.0
    );

    let m2 = gw2.metrics().await;
    assert_eq!(
        m2.value(r#"portcullis_upstream_errors_total{kind="connect"}"#),
        1.0,
        "{}",
        gw2.tails()
    );
    assert_eq!(
        m2.value(r#"portcullis_requests_total{method="GET",route="proxied",status="5xx"}"#),
        1.0
    );
    let (status, printed) = promtool_check_metrics(&m2.text);
    assert!(status.success() && printed.trim().is_empty(), "{printed}");

    // Bounded labels only: no path, user, IP or query ever becomes a label value.
    for text in [&m.text, &m2.text] {
        for needle in [
            "/ops-login-page",
            "/ops-tampered-path",
            "/ops-proxied-path",
            "/ops-dead-upstream",
            "ops-query",
            "alice",
            "127.0.0.1",
        ] {
            assert!(
                !text.contains(needle),
                "/metrics contains {needle:?}:\n{text}"
            );
        }
    }
    for v in m.label_values().iter().chain(m2.label_values().iter()) {
        assert!(
            !v.contains('/') && v.parse::<std::net::IpAddr>().is_err() && v.len() <= 16,
            "label value {v:?} looks unbounded"
        );
    }
    drop(idp);
}

#[tokio::test]
async fn prometheus_scrapes_the_admin_listener() {
    let (_idp, _upstream, opts) = parts(&[]).await;
    let gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    let target = format!("127.0.0.1:{}", gw.admin_port.unwrap());
    let prom = Prometheus::start("portcullis", &target).await;
    for path in ["/metrics", "/healthz", "/readyz"] {
        let r = send("DELETE", &gw.admin_url(path), &[], Vec::new()).await;
        assert_eq!(r.status, 405, "DELETE {path}: {}", r.dump());
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
        let r = send("HEAD", &gw.admin_url(path), &[], Vec::new()).await;
        assert_eq!(r.status, 200, "HEAD {path}: {}", r.dump());
    }

    let within = Duration::from_secs(30);
    eventually(
        within,
        "prometheus has portcullis_build_info == 1",
        || async {
            let r = prom.query("portcullis_build_info").await?;
            match r.as_slice() {
                [one] if one["value"][1] == "1" && one["metric"]["job"] == "portcullis" => Ok(()),
                _ => Err(format!("{r:?}\n{}", prom.tails())),
            }
        },
    )
    .await;
    eventually(within, "up{job=\"portcullis\"} == 1", || async {
        let r = prom.query("up{job=\"portcullis\"}").await?;
        match r.as_slice() {
            [one] if one["value"][1] == "1" => Ok(()),
            _ => Err(format!("{r:?}")),
        }
    })
    .await;
    // The histograms arrive as real series too.
    let r = prom
        .query("portcullis_request_duration_seconds_bucket")
        .await
        .unwrap();
    assert!(!r.is_empty(), "no request duration buckets scraped");
    drop(prom);
}

// ---------------------------------------------------------------------------------------
// SIGTERM
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct ClientReport {
    id: usize,
    keep_alive: bool,
    ok: u64,
    ok_after_signal: u64,
    reconnects: u64,
    refused_after_signal: bool,
    failures: Vec<String>,
}

/// Sends proxied requests back to back: on a fresh connection each (`keep_alive: false`)
/// or on one connection for as long as the server keeps it open. Stops at the first
/// refused connection after the signal. Every request written to an accepted
/// connection must come back 200; anything else is a failure.
async fn load_client(
    id: usize,
    keep_alive: bool,
    port: u16,
    cookie: Arc<str>,
    signalled: Arc<AtomicBool>,
    total_ok: Arc<AtomicU64>,
) -> ClientReport {
    use hyper::client::conn::http1;
    let mut rep = ClientReport {
        id,
        keep_alive,
        ..ClientReport::default()
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut conn: Option<http1::SendRequest<Empty<Bytes>>> = None;
    let mut n = 0u64;
    loop {
        if Instant::now() > deadline {
            rep.failures
                .push("still running at the deadline: the listener never closed".into());
            break;
        }
        let after = signalled.load(Ordering::SeqCst);
        let mut sender = match conn.take() {
            Some(mut s) => {
                if s.ready().await.is_err() {
                    // The server closed the idle connection: nothing was sent.
                    rep.reconnects += 1;
                    continue;
                }
                s
            }
            None => {
                let stream = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    Ok(s) => s,
                    // Refused (or reset while connecting, when the listener closed with the
                    // connection still in its backlog): the gateway never took it.
                    Err(e)
                        if after
                            && matches!(
                                e.kind(),
                                std::io::ErrorKind::ConnectionRefused
                                    | std::io::ErrorKind::ConnectionReset
                            ) =>
                    {
                        rep.refused_after_signal = true;
                        break;
                    }
                    Err(e) => {
                        rep.failures
                            .push(format!("connect (after signal: {after}): {e}"));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                match http1::handshake(TokioIo::new(stream)).await {
                    Ok((s, c)) => {
                        tokio::spawn(async move {
                            let _ = c.await;
                        });
                        s
                    }
                    Err(e) => {
                        rep.failures.push(format!("handshake: {e}"));
                        continue;
                    }
                }
            }
        };
        n += 1;
        let req = http::Request::get(format!("/load/{id}/{n}"))
            .header("host", format!("127.0.0.1:{port}"))
            .header("accept", "application/json")
            .header("cookie", &*cookie)
            .body(Empty::<Bytes>::new())
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(20), sender.send_request(req)).await {
            Err(_) => rep.failures.push(format!(
                "request {n} (after signal: {after}): no answer in 20 s"
            )),
            // Never written: the connection was closing before the request went out.
            Ok(Err(e)) if e.is_canceled() => rep.reconnects += 1,
            Ok(Err(e)) => rep
                .failures
                .push(format!("request {n} (after signal: {after}): {e:?}")),
            Ok(Ok(resp)) => {
                let status = resp.status();
                let close = resp
                    .headers()
                    .get("connection")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                match resp.into_body().collect().await {
                    Err(e) => rep
                        .failures
                        .push(format!("request {n} (after signal: {after}): body: {e}")),
                    Ok(_) if status != 200 => rep
                        .failures
                        .push(format!("request {n} (after signal: {after}): {status}")),
                    Ok(_) => {
                        rep.ok += 1;
                        total_ok.fetch_add(1, Ordering::SeqCst);
                        if after {
                            rep.ok_after_signal += 1;
                        }
                        if keep_alive && !close {
                            conn = Some(sender);
                        }
                    }
                }
            }
        }
    }
    rep
}

/// SIGTERM with a slow request in flight: readiness fails at once, the listener keeps
/// serving (new and keep-alive connections) during `shutdown_delay`, then refuses; the
/// slow request completes and the process exits 0.
#[tokio::test]
async fn sigterm_fails_readiness_keeps_serving_then_drains_and_exits_0() {
    let (_idp, upstream, mut opts) = parts(&[]).await;
    opts.extra = "lifecycle: { shutdown_delay: 2s }\ntimeouts: { shutdown: 10s }".into();
    let mut gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    let cookie = login_cookie_at(&gw.origin(), "alice").await;
    let headers = [("accept", "application/json"), ("cookie", cookie.as_str())];

    // A keep-alive connection, used before and during the delay.
    let mut keep = keep_alive_client(gw.port).await;
    let keep_req = |path: &str| api_request(gw.port, &cookie, path);
    let r = keep.send_request(keep_req("/keep/1")).await.unwrap();
    assert_eq!(r.status(), 200);
    r.into_body().collect().await.unwrap();

    let slow = {
        let url = gw.url("/slow");
        let cookie = cookie.clone();
        tokio::spawn(async move {
            try_send(
                "GET",
                &url,
                &[("accept", "application/json"), ("cookie", &cookie)],
                Vec::new(),
            )
            .await
        })
    };
    eventually(
        Duration::from_secs(10),
        "the upstream got /slow",
        || async {
            if upstream.records().iter().any(|r| r.path == "/slow") {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    )
    .await;

    gw.signal("TERM");
    loop {
        match try_send("GET", &gw.url("/readyz"), &[], Vec::new()).await {
            Ok(r) if r.status == 503 => {
                assert!(r.text().contains("shutting down"), "{}", r.dump());
                break;
            }
            Ok(r) => assert_eq!(r.status, 200, "{}", r.dump()),
            Err(e) => panic!(
                "the listener closed before /readyz turned 503: {e}\n{}",
                gw.tails()
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let admin = send("GET", &gw.admin_url("/readyz"), &[], Vec::new()).await;
    assert_eq!(admin.status, 503, "admin /readyz: {}", admin.dump());
    let live = send("GET", &gw.admin_url("/healthz"), &[], Vec::new()).await;
    assert_eq!(live.status, 200, "liveness stays up while draining");

    // Still serving during the delay, on new and on kept-alive connections.
    for i in 0..3 {
        let r = send(
            "GET",
            &gw.url(&format!("/during/{i}")),
            &headers,
            Vec::new(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.dump());
    }
    let r = keep.send_request(keep_req("/keep/2")).await.unwrap();
    assert_eq!(r.status(), 200);
    r.into_body().collect().await.unwrap();

    let slow = slow
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the in-flight slow request failed: {e}\n{}", gw.tails()));
    assert_eq!(slow.status, 200, "{}", slow.dump());
    assert_eq!(slow.json()["path"], "/slow");
    let status = gw.wait_exit(Duration::from_secs(2 + 10 + 5)).await;
    assert!(status.success(), "exit status {status}\n{}", gw.tails());
    let refused = tokio::net::TcpStream::connect(("127.0.0.1", gw.port)).await;
    assert!(refused.is_err(), "the listener is closed after exit");
    let log = gw.stderr();
    for line in [
        "shutdown signal received",
        "draining connections",
        "all connections closed",
    ] {
        assert!(log.contains(line), "{line:?} not logged\n{}", gw.tails());
    }
}

/// A request still waiting on the upstream when `timeouts.shutdown` runs out is cut by the
/// gateway: logged (and counted) as 503, not as a client that went away (499).
#[tokio::test]
async fn requests_cut_at_the_shutdown_timeout_are_logged_503_not_499() {
    use tokio::io::AsyncWriteExt;
    let hang = misbehaving_upstream(Misbehaviour::Hang).await;
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    opts.extra = format!(
        "routes: [ {{ prefix: \"/\", auth: skip, upstream: \"http://127.0.0.1:{hang}\" }} ]\n\
         lifecycle: {{ shutdown_delay: 0s }}\ntimeouts: {{ shutdown: 1s }}"
    );
    let mut gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    let req = format!(
        "GET /hang HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nX-Request-Id: cut-at-shutdown\r\n\r\n",
        gw.port
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    gw.await_metric(
        "portcullis_requests_in_flight",
        1.0,
        "the request in flight",
    )
    .await;
    gw.signal("TERM");
    let status = gw.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}\n{}", gw.tails());
    let log = gw.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("cut-at-shutdown"))
        .unwrap_or_else(|| panic!("no access line for the cut request:\n{}", gw.tails()));
    assert!(line.contains("status=503"), "{line}");
    assert!(!log.contains("status=499"), "{}", gw.tails());
    drop(tcp);
}

/// A sign-out right before a shutdown: the gateway waits (within `timeouts.shutdown`) for the
/// revocation it started at the provider, however slow the provider is to answer, so that a
/// restart does not cut it short.
#[tokio::test]
async fn shutdown_waits_for_a_sign_outs_revocation_at_the_provider() {
    let (idp, upstream, mut opts) = parts(&[]).await;
    opts.extra =
        "lifecycle: { shutdown_delay: 0s }\ntimeouts: { shutdown: 20s, provider: 8s }".into();
    let mut gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    let b = Browser::new();
    let t = login_at(&b, &gw.origin(), "/", "alice").await;
    assert_eq!(t.last.status, 200, "{}", t.last.dump());
    let token = upstream.last().bearer();
    let page = b.get(&gw.url("/oauth2/sign_out")).await;
    let csrf = html::hidden_value(&page.text(), "csrf").expect("csrf");
    let revocations = || {
        idp.requests()
            .into_iter()
            .filter(|l| l.contains(" POST /token/revocation "))
            .collect::<Vec<_>>()
    };

    idp.signal("STOP");
    let out = b
        .request(
            "POST",
            &gw.url("/oauth2/sign_out"),
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", &gw.origin()),
            ],
            format!("csrf={}", enc(&csrf)),
        )
        .await;
    assert_eq!(out.status, 302, "{}", out.dump());
    gw.signal("TERM");
    // Past the drain's start (at most a second after the signal): still there, waiting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waited = gw.exited();
    idp.signal("CONT");
    assert!(
        waited.is_none(),
        "exited ({waited:?}) with the revocation under way\n{}",
        gw.tails()
    );
    let status = gw.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}\n{}", gw.tails());
    let served = revocations();
    assert_eq!(served.len(), 1, "{served:?}");
    assert!(served[0].contains(" 200 "), "{served:?}");
    assert_eq!(idp.userinfo(&token).await.status, 401, "the grant lives on");
}

/// A second shutdown signal (Ctrl-C twice) does not wait for the delay and the drain.
#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    opts.extra = "lifecycle: { shutdown_delay: 60s }".into();
    let mut gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    gw.signal("INT");
    eventually(Duration::from_secs(10), "readiness fails", || async {
        match try_send("GET", &gw.url("/readyz"), &[], Vec::new()).await {
            Ok(r) if r.status == 503 => Ok(()),
            other => Err(format!("{:?}", other.map(|r| r.status))),
        }
    })
    .await;
    assert!(gw.exited().is_none(), "gone before the delay ended");
    gw.signal("INT");
    let status = gw.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(130), "{}", gw.tails());
    assert!(
        gw.stderr().contains("second shutdown signal"),
        "{}",
        gw.tails()
    );

    // Back to back (Ctrl-C in `make demo`: the terminal's SIGINT, then the launcher's
    // SIGTERM): the second is not lost while the first is handled.
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    opts.extra = "lifecycle: { shutdown_delay: 60s }".into();
    let mut gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    let both = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("kill -INT {0}; kill -TERM {0}", gw.pid()))
        .status()
        .unwrap();
    assert!(both.success());
    let status = gw.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(130), "{}", gw.tails());
}

/// SIGTERM with an HTTP/2 request in flight: HTTP/2 connections drain through the listener's
/// drain too. The slow stream completes, the connection gets GOAWAY, the process exits 0.
#[tokio::test]
async fn sigterm_drains_http2_connections() {
    let (_idp, upstream, mut opts) = parts(&[]).await;
    opts.extra = "routes: [ { prefix: \"/\", auth: skip } ]\nlifecycle: { shutdown_delay: 1s }\ntimeouts: { shutdown: 10s }".into();
    let mut gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    let port = gw.port;
    let (mut sender, conn, req) = h2_slow_request(port).await;
    let slow = tokio::spawn(async move {
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        resp.into_body().collect().await?;
        Ok::<_, hyper::Error>(status)
    });
    eventually(
        Duration::from_secs(10),
        "the upstream got /slow",
        || async {
            if upstream.records().iter().any(|r| r.path == "/slow") {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    )
    .await;
    gw.signal("TERM");
    let status = slow
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the in-flight HTTP/2 request failed: {e}\n{}", gw.tails()));
    assert_eq!(status, 200);
    // The connection ends: the server closed it after the stream.
    let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(
        closed.is_ok(),
        "the HTTP/2 connection stayed open\n{}",
        gw.tails()
    );
    let exit = gw.wait_exit(Duration::from_secs(1 + 10 + 5)).await;
    assert!(exit.success(), "exit status {exit}\n{}", gw.tails());
    assert!(
        gw.stderr().contains("all connections closed"),
        "{}",
        gw.tails()
    );
}

/// The issue's acceptance test: 8 clients (fresh connections and keep-alive) sending
/// back to back through a SIGTERM. A refused connect after the listener closed ends a
/// client; every request written to an accepted connection must get its 200.
///
/// Fails today: 1-5 of ~1,400 requests per run, in every run so far. Reproduce with
/// `cargo test --test ops sigterm_under_continuous_load -- --ignored`:
/// - keep-alive: `hyper::Error(IncompleteMessage)`. Responses during `shutdown_delay`
///   carry no `Connection: close`, so clients keep reusing their connections; when the
///   delay ends the gateway closes every idle keep-alive connection, including ones
///   whose next request is already on the wire.
/// - fresh connections: `Connection reset by peer` after connecting and writing the
///   request. A connection accepted just before the listener closes has not had its
///   request read yet; the graceful shutdown cancels it (debug log `connection closed
///   with error error=Cancelled`) and the unread request makes the kernel send a RST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_continuous_load_fails_no_accepted_request() {
    let (_idp, upstream, mut opts) = parts(&[]).await;
    opts.extra = "lifecycle: { shutdown_delay: 1s }\ntimeouts: { shutdown: 10s }".into();
    let mut gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    let cookie: Arc<str> = login_cookie_at(&gw.origin(), "alice").await.into();

    let signalled = Arc::new(AtomicBool::new(false));
    let total_ok = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|id| {
            tokio::spawn(load_client(
                id,
                id % 2 == 1,
                gw.port,
                cookie.clone(),
                signalled.clone(),
                total_ok.clone(),
            ))
        })
        .collect();
    eventually(Duration::from_secs(20), "load is flowing", || async {
        let n = total_ok.load(Ordering::SeqCst);
        if n >= 200 {
            Ok(())
        } else {
            Err(format!("{n} requests so far"))
        }
    })
    .await;

    // A slow request in flight when the signal arrives.
    let slow = {
        let url = gw.url("/slow");
        let cookie = cookie.clone();
        tokio::spawn(async move {
            try_send(
                "GET",
                &url,
                &[("accept", "application/json"), ("cookie", &cookie)],
                Vec::new(),
            )
            .await
        })
    };
    eventually(
        Duration::from_secs(10),
        "the upstream got /slow",
        || async {
            if upstream.records().iter().any(|r| r.path == "/slow") {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    )
    .await;

    signalled.store(true, Ordering::SeqCst);
    gw.signal("TERM");

    // Readiness fails at once, while the listener still accepts.
    let t0 = Instant::now();
    loop {
        match try_send("GET", &gw.url("/readyz"), &[], Vec::new()).await {
            Ok(r) if r.status == 503 => {
                assert!(r.text().contains("shutting down"), "{}", r.dump());
                break;
            }
            Ok(r) => assert_eq!(r.status, 200, "{}", r.dump()),
            Err(e) => panic!(
                "the listener closed before /readyz turned 503: {e}\n{}",
                gw.tails()
            ),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "/readyz still 200 after SIGTERM\n{}",
            gw.tails()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let admin = send("GET", &gw.admin_url("/readyz"), &[], Vec::new()).await;
    assert_eq!(admin.status, 503, "admin /readyz: {}", admin.dump());

    let mut reports = Vec::new();
    for c in clients {
        reports.push(c.await.unwrap());
    }
    let slow = slow.await.unwrap();
    let status = gw.wait_exit(Duration::from_secs(1 + 10 + 5)).await;

    let failures: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            r.failures.iter().map(move |f| {
                format!(
                    "client {} ({}): {f}",
                    r.id,
                    if r.keep_alive { "keep-alive" } else { "fresh" }
                )
            })
        })
        .collect();
    let summary: Vec<String> = reports
        .iter()
        .map(|r| {
            format!(
                "client {} keep_alive={} ok={} ok_after_signal={} reconnects={} refused={}",
                r.id, r.keep_alive, r.ok, r.ok_after_signal, r.reconnects, r.refused_after_signal
            )
        })
        .collect();
    let summary = summary.join("\n");
    assert!(
        failures.is_empty(),
        "{} failed request(s):\n{}\n{summary}\n{}",
        failures.len(),
        failures.join("\n"),
        gw.tails()
    );
    for r in &reports {
        assert!(r.refused_after_signal, "{summary}");
    }
    assert!(
        reports.iter().map(|r| r.ok_after_signal).sum::<u64>() > 0,
        "nothing was served during shutdown_delay:\n{summary}"
    );
    let slow = slow.unwrap_or_else(|e| panic!("the in-flight slow request failed: {e}"));
    assert_eq!(slow.status, 200, "{}", slow.dump());
    assert_eq!(slow.json()["path"], "/slow");
    assert!(status.success(), "exit status {status}\n{}", gw.tails());
}

// ---------------------------------------------------------------------------------------
// Hot reload
// ---------------------------------------------------------------------------------------

const RELOAD: Duration = Duration::from_secs(15);

#[tokio::test]
async fn reload_rotates_cookie_keys_from_the_secrets_file() {
    let (_idp, upstream, mut opts) = parts(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("cookie_secrets");
    let (k1, k2) = (key(1), key(2));
    write_atomic(&secrets, &format!("{k1}\n"));
    opts.secrets = Vec::new();
    opts.cookie_extra = vec![format!("secrets_file: \"{}\"", secrets.display())];
    let gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    let old = login_cookie_at(&gw.origin(), "alice").await;

    // Prepend k2: the k1 cookie still opens, new logins are sealed with k2.
    write_atomic(&secrets, &format!("{k2}\n{k1}\n"));
    gw.await_reloads("success", 1.0, RELOAD).await;
    let r = api_get(&gw.url("/data"), &old).await;
    assert_eq!(r.status, 200, "k1 cookie with [k2, k1]: {}", r.dump());
    assert_eq!(upstream.last().header("x-forwarded-user"), Some("alice"));
    let new = login_cookie_at(&gw.origin(), "bob").await;

    // Retire k1: the old cookie stops working, the new one (sealed with k2) keeps working.
    write_atomic(&secrets, &format!("{k2}\n"));
    eventually(RELOAD, "the k1 cookie is refused", || async {
        let r = api_get(&gw.url("/data"), &old).await;
        match r.status.as_u16() {
            401 => Ok(()),
            200 => Err("still 200".into()),
            _ => panic!("unexpected answer: {}", r.dump()),
        }
    })
    .await;
    let r = api_get(&gw.url("/data"), &new).await;
    assert_eq!(r.status, 200, "k2 cookie with [k2]: {}", r.dump());
    assert_eq!(upstream.last().header("x-forwarded-user"), Some("bob"));
    assert_eq!(gw.reloads("success").await, 2.0);
    assert_eq!(gw.reloads("failure").await, 0.0);
}

#[tokio::test]
async fn reload_picks_up_a_rotated_client_secret_file() {
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("client_secret");
    write_atomic(&file, "wrong-secret\n");
    opts.client_secret = String::new();
    opts.provider_extra = vec![format!("client_secret_file: \"{}\"", file.display())];
    let mut gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    let pid = gw.pid();

    // The wrong secret: the code exchange fails.
    let b = Browser::new();
    let first = b.get(&gw.url("/")).await;
    let (auth, _) = auth_redirect(&first);
    let callback = idp_walk(&b, &auth, "alice").await;
    let r = b.get(&callback).await;
    assert_eq!(r.status, 502, "wrong client secret: {}", r.dump());
    assert!(b.cookie(&gw.url("/"), "_portcullis").is_none());

    // The right one, without a restart.
    write_atomic(&file, &format!("{CLIENT_SECRET}\n"));
    let origin = gw.origin();
    eventually(RELOAD, "a fresh login succeeds", || async {
        let b = Browser::new();
        let first = b.get(&format!("{origin}/after")).await;
        let (auth, _) = auth_redirect(&first);
        let callback = idp_walk(&b, &auth, "alice").await;
        let cb = b.get(&callback).await;
        if cb.status == 302 && b.cookie(&format!("{origin}/"), "_portcullis").is_some() {
            Ok(())
        } else {
            Err(cb.dump())
        }
    })
    .await;
    assert!(gw.alive(), "{}", gw.tails());
    assert_eq!(gw.pid(), pid, "the same process");
    assert!(gw.reloads("success").await >= 1.0);
}

/// A config naming a secret file that is not there yet (a Secret volume updated after the
/// ConfigMap's) is refused; once the file appears, it applies without a SIGHUP.
#[tokio::test]
async fn a_secret_file_that_appears_after_its_config_is_reloaded() {
    let (_idp, upstream, mut opts) = parts(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let (old_file, new_file) = (dir.path().join("keys-v1"), dir.path().join("keys-v2"));
    let (k1, k2) = (key(1), key(2));
    write_atomic(&old_file, &format!("{k1}\n"));
    opts.secrets = Vec::new();
    opts.cookie_extra = vec![format!("secrets_file: \"{}\"", old_file.display())];
    let cfg = OpsConfig::new(opts);
    let gw = OpsGateway::start(&cfg).await;
    let cookie = login_cookie_at(&gw.origin(), "alice").await;

    let mut next = cfg.clone();
    next.gw.cookie_extra = vec![format!("secrets_file: \"{}\"", new_file.display())];
    write_atomic(&gw.config, &next.yaml());
    gw.await_reloads("failure", 1.0, RELOAD).await;
    assert!(
        gw.stderr().contains("cookie.secrets_file"),
        "{}",
        gw.tails()
    );

    write_atomic(&new_file, &format!("{k2}\n{k1}\n"));
    gw.await_reloads("success", 1.0, RELOAD).await;
    assert_eq!(gw.reloads("failure").await, 1.0);
    let r = api_get(&gw.url("/data"), &cookie).await;
    assert_eq!(r.status, 200, "k1 cookie with [k2, k1]: {}", r.dump());
    assert_eq!(upstream.last().header("x-forwarded-user"), Some("alice"));
}

/// A config that loads but cannot be swapped in (its provider cannot be discovered) and that
/// names a secret file the running one does not: refused and counted once, not tried again
/// at every file check because the running config's files and its differ.
#[tokio::test]
async fn a_refused_reload_naming_other_secret_files_is_not_retried() {
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let (old_file, new_file) = (dir.path().join("secret-v1"), dir.path().join("secret-v2"));
    write_atomic(&old_file, &format!("{CLIENT_SECRET}\n"));
    write_atomic(&new_file, &format!("{CLIENT_SECRET}\n"));
    opts.client_secret = String::new();
    opts.provider_extra = vec![format!("client_secret_file: \"{}\"", old_file.display())];
    let cfg = OpsConfig::new(opts);
    let mut gw = OpsGateway::start(&cfg).await;

    let mut typo = cfg.clone();
    typo.gw.issuer = format!("http://127.0.0.1:{}", free_port());
    typo.gw.provider_extra = vec![format!("client_secret_file: \"{}\"", new_file.display())];
    write_atomic(&gw.config, &typo.yaml());
    gw.await_reloads("failure", 1.0, RELOAD).await;
    // A few of the once-a-second file checks, with nothing changed on disk.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(gw.reloads("failure").await, 1.0, "{}", gw.tails());

    write_atomic(&gw.config, &cfg.yaml());
    gw.await_reloads("success", 1.0, RELOAD).await;
    assert_eq!(gw.reloads("failure").await, 1.0, "{}", gw.tails());
    gw.assert_healthy().await;
}

#[tokio::test]
async fn invalid_config_reload_is_rejected_and_the_old_one_keeps_serving() {
    let (_idp, upstream, opts) = parts(&[]).await;
    let cfg = OpsConfig::new(opts);
    let mut gw = OpsGateway::start(&cfg).await;
    let cookie = login_cookie_at(&gw.origin(), "alice").await;

    let mut bad = cfg.yaml();
    bad.push_str("no_such_key: true\nheaders: { user: X-Should-Not-Apply }\n");
    write_atomic(&gw.config, &bad);
    gw.await_reloads("failure", 1.0, RELOAD).await;
    assert!(
        gw.stderr().contains("config reload rejected"),
        "{}",
        gw.tails()
    );
    assert!(gw.stderr().contains("no_such_key"), "{}", gw.tails());
    gw.assert_healthy().await;
    let r = api_get(&gw.url("/still"), &cookie).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let rec = upstream.last();
    assert_eq!(rec.header("x-forwarded-user"), Some("alice"));
    assert!(rec.header("x-should-not-apply").is_none(), "{rec:?}");
    let ready = send("GET", &gw.url("/readyz"), &[], Vec::new()).await;
    assert_eq!(ready.status, 200, "{}", ready.dump());

    // A well-formed config whose provider cannot be discovered (a typo in the issuer):
    // swapped in, it would make every replica unready at once. Rejected, naming the key.
    let typo = cfg.yaml().replace(
        &format!("issuer_url: \"{}\"", cfg.gw.issuer),
        &format!("issuer_url: \"http://127.0.0.1:{}\"", free_port()),
    );
    assert_ne!(typo, cfg.yaml());
    write_atomic(&gw.config, &typo);
    gw.await_reloads("failure", 2.0, RELOAD).await;
    assert!(
        gw.stderr().contains("provider.issuer_url"),
        "{}",
        gw.tails()
    );
    let ready = send("GET", &gw.url("/readyz"), &[], Vec::new()).await;
    assert_eq!(ready.status, 200, "{}", ready.dump());
    let r = send("GET", &gw.url("/oauth2/start"), &[], Vec::new()).await;
    assert_eq!(r.status, 302, "logins still work: {}", r.dump());

    // A valid config again: it applies, and each failure was counted once (not retried).
    let mut good = cfg.clone();
    good.gw.extra = "headers: { user: X-Remote-User }".into();
    write_atomic(&gw.config, &good.yaml());
    gw.await_reloads("success", 1.0, RELOAD).await;
    let r = api_get(&gw.url("/fixed"), &cookie).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(upstream.last().header("x-remote-user"), Some("alice"));
    assert_eq!(gw.reloads("failure").await, 2.0);
}

/// A reload that points the gateway at a Redis that does not answer (store, coordination,
/// or a password it refuses) is rejected and counted, and the old config keeps the pod ready;
/// one whose Redis answers applies.
#[tokio::test]
async fn reload_to_an_unreachable_redis_is_rejected_and_the_pod_stays_ready() {
    use support::redis::RedisServer;
    let (_idp, _upstream, opts) = parts(&[]).await;
    let cfg = OpsConfig::new(opts);
    let mut gw = OpsGateway::start(&cfg).await;
    let dead = format!("redis://127.0.0.1:{}/0", free_port());
    let redis = RedisServer::start().await;
    let attempts = [
        (
            format!("session: {{ store: redis, redis: {{ url: \"{dead}\", timeout: 1s }} }}"),
            "session.redis.url",
        ),
        (
            format!("session: {{ coordination: {{ redis_url: \"{dead}\" }}, redis: {{ timeout: 1s }} }}"),
            "session.coordination.redis_url",
        ),
        // This Redis has no password: it refuses AUTH.
        (
            format!(
                "session: {{ store: redis, redis: {{ url: \"{}\", password: wrong, timeout: 1s }} }}",
                redis.url()
            ),
            "session.redis.url",
        ),
    ];
    for (i, (session, key)) in attempts.iter().enumerate() {
        let mut next = cfg.clone();
        next.gw.extra = session.clone();
        write_atomic(&gw.config, &next.yaml());
        gw.await_reloads("failure", i as f64 + 1.0, RELOAD).await;
        let log = gw.stderr();
        let line = log
            .lines()
            .filter(|l| l.contains("config reload failed"))
            .nth(i)
            .unwrap_or_else(|| panic!("no reload failure logged for {key}\n{}", gw.tails()));
        assert!(
            line.contains(key) && line.contains("redis unreachable"),
            "{line}"
        );
        for url in [gw.url("/readyz"), gw.admin_url("/readyz")] {
            let ready = send("GET", &url, &[], Vec::new()).await;
            assert_eq!(ready.status, 200, "{session}: {}", ready.dump());
        }
    }
    assert_eq!(gw.reloads("success").await, 0.0);
    // A Redis that answers: applied, and the pod is ready with it.
    let mut next = cfg.clone();
    next.gw.extra = format!(
        "session: {{ store: redis, redis: {{ url: \"{}\" }} }}",
        redis.url()
    );
    write_atomic(&gw.config, &next.yaml());
    gw.await_reloads("success", 1.0, RELOAD).await;
    let ready = send("GET", &gw.admin_url("/readyz"), &[], Vec::new()).await;
    assert_eq!(ready.status, 200, "{}", ready.dump());
    let cookie = login_cookie_at(&gw.origin(), "alice").await;
    assert!(
        !redis.keys("*").is_empty(),
        "the session went to the reloaded Redis store\n{}",
        gw.tails()
    );
    let r = api_get(&gw.url("/stored"), &cookie).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(gw.reloads("failure").await, 3.0);
    gw.assert_healthy().await;
}

/// A Redis password rotated in the secret file first and on the Redis side next: the reload
/// is refused while Redis still wants the old one, and the running config then fails too; the
/// refused config is tried again by itself, and the gateway is back with the new password.
#[tokio::test]
async fn a_redis_password_rotated_file_first_is_picked_up_without_a_signal() {
    use support::redis::{command, command_as, RedisServer};
    let redis = RedisServer::start().await;
    command(redis.port, &["CONFIG", "SET", "requirepass", "old-pass"]).expect("requirepass");
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("redis-password");
    std::fs::write(&pw, "old-pass\n").unwrap();
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    opts.extra = format!(
        "session: {{ store: redis, redis: {{ url: \"{}\", password_file: \"{}\", timeout: 1s }} }}",
        redis.url(),
        pw.display()
    );
    let cfg = OpsConfig::new(opts);
    let gw = OpsGateway::start(&cfg).await;
    let cookie = login_cookie_at(&gw.origin(), "alice").await;
    assert_eq!(api_get(&gw.url("/before"), &cookie).await.status, 200);

    write_atomic(&pw, "new-pass\n");
    gw.await_reloads("failure", 1.0, RELOAD).await;
    command_as(
        redis.port,
        "old-pass",
        &["CONFIG", "SET", "requirepass", "new-pass"],
    )
    .expect("rotate the password");
    // Connections logged in with the old password are closed (a restart of Redis, a failover).
    command_as(
        redis.port,
        "new-pass",
        &["CLIENT", "KILL", "TYPE", "normal"],
    )
    .expect("kill");
    // The old password no longer works: the sessions are unreachable until the new one is in.
    gw.await_reloads("success", 1.0, RELOAD).await;
    eventually(
        RELOAD,
        "the session is served with the new password",
        || async {
            let r = api_get(&gw.url("/after"), &cookie).await;
            (r.status == 200).then_some(()).ok_or(r.dump())
        },
    )
    .await;
    let ready = send("GET", &gw.admin_url("/readyz"), &[], Vec::new()).await;
    assert_eq!(ready.status, 200, "{}", ready.dump());
}

/// Each reload that changes the Redis settings makes a new client; the old one's background
/// work (health pings, the logout mirror) ends with it, and its connection closes.
#[tokio::test]
async fn reloads_that_change_redis_leave_no_client_behind() {
    use support::redis::{RedisServer, Reply};
    let redis = RedisServer::start().await;
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    let session = |t: u32| {
        format!(
            "session: {{ store: redis, redis: {{ url: \"{}\", timeout: {t}s }} }}",
            redis.url()
        )
    };
    opts.extra = session(1);
    let cfg = OpsConfig::new(opts);
    let gw = OpsGateway::start(&cfg).await;
    let reloads = 6;
    for i in 1..=reloads {
        let mut next = cfg.clone();
        next.gw.extra = session(1 + i);
        write_atomic(&gw.config, &next.yaml());
        gw.await_reloads("success", f64::from(i), RELOAD).await;
    }
    // Other than the one asking.
    let clients = || match redis.cmd(&["CLIENT", "LIST"]) {
        Reply::Bulk(Some(b)) => String::from_utf8_lossy(&b).lines().count() - 1,
        other => panic!("CLIENT LIST: {other:?}"),
    };
    eventually(Duration::from_secs(10), "one Redis client left", || async {
        match clients() {
            n if n <= 1 => Ok(()),
            n => Err(format!("{n} connections to Redis after {reloads} reloads")),
        }
    })
    .await;
    let ready = send("GET", &gw.admin_url("/readyz"), &[], Vec::new()).await;
    assert_eq!(ready.status, 200, "{}", ready.dump());
    assert_eq!(gw.reloads("failure").await, 0.0);
}

/// Redis over TLS when its CA is rotated: the renewed `tls.ca_file` (the same path, new
/// contents, as a mounted Secret is renewed) is reloaded, and the new Redis client trusts the
/// new CA alone.
#[tokio::test]
async fn a_renewed_ca_file_is_trusted_by_the_reloaded_redis_client() {
    use support::pki::Pki;
    use support::redis::RedisServer;
    let (old_ca, new_ca) = (Pki::new(), Pki::new());
    let (cert, key) = old_ca.issue("redis", "redis");
    let mut redis = RedisServer::start_tls(&cert, &key).await;
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    let pem = |pki: &Pki| std::fs::read_to_string(pki.ca()).unwrap();
    write_atomic(&ca_file, &pem(&old_ca));
    opts.extra = format!(
        "session: {{ store: redis, redis: {{ url: \"{}\", timeout: 1s }} }}\n\
         tls: {{ ca_file: \"{}\" }}",
        redis.tls_url(),
        ca_file.display()
    );
    let gw = OpsGateway::start(&OpsConfig::new(opts)).await;
    login_cookie_at(&gw.origin(), "alice").await;
    assert_eq!(redis.keys("portcullis:session:*").len(), 1);

    // Redis now serves a certificate from the new CA, which the running client does not trust.
    let (new_cert, new_key) = new_ca.issue("redis", "redis");
    std::fs::copy(new_cert, &cert).unwrap();
    std::fs::copy(new_key, &key).unwrap();
    redis.restart().await;
    let b = Browser::new();
    let (auth, _) = auth_redirect(&b.get(&gw.url("/")).await);
    let callback = b.get(&idp_walk(&b, &auth, "bob").await).await;
    assert_eq!(callback.status, 503, "{}", callback.dump());
    assert!(redis.keys("portcullis:session:*").is_empty());

    write_atomic(&ca_file, &pem(&new_ca));
    gw.await_reloads("success", 1.0, RELOAD).await;
    let cookie = login_cookie_at(&gw.origin(), "bob").await;
    assert_eq!(redis.keys("portcullis:session:*").len(), 1);
    let r = api_get(&gw.url("/x"), &cookie).await;
    assert_eq!(r.status, 200, "read back over TLS: {}", r.dump());
}

/// Settings read only at start-up: a reload that changes them says so, one warning per key,
/// and applies the rest.
#[tokio::test]
async fn reload_warns_about_each_setting_that_needs_a_restart() {
    let (_idp, upstream, opts) = parts(&[]).await;
    let cfg = OpsConfig::new(opts);
    let gw = OpsGateway::start(&cfg).await;
    let cookie = login_cookie_at(&gw.origin(), "alice").await;
    let mut next = cfg.clone();
    next.log = "{ level: debug, format: json }".into();
    next.gw.extra = "limits: { max_connections: 7 }\nheaders: { user: X-Remote-User }".into();
    write_atomic(&gw.config, &next.yaml());
    gw.await_reloads("success", 1.0, RELOAD).await;
    let log = gw.stderr();
    let warned = |key: &str| {
        log.lines().any(|l| {
            l.contains("WARN")
                && l.contains(&format!("{key} changed"))
                && l.contains("needs a restart")
        })
    };
    for key in ["log.level", "log.format", "limits.max_connections"] {
        assert!(warned(key), "no warning for {key}\n{}", gw.tails());
    }
    for key in ["listen", "admin.listen"] {
        assert!(!warned(key), "{key} did not change\n{}", gw.tails());
    }
    // The rest applied.
    let r = api_get(&gw.url("/applied"), &cookie).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(upstream.last().header("x-remote-user"), Some("alice"));
}

/// Timeouts follow a reload: the drain after SIGTERM is the reloaded config's
/// `timeouts.shutdown`, and new connections get the reloaded `timeouts.header_read`.
#[tokio::test]
async fn reloaded_timeouts_take_effect() {
    use support::corpus::raw_exchange;
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    opts.extra = "routes: [ { prefix: \"/\", auth: skip } ]\n\
                  lifecycle: { shutdown_delay: 0s }\n\
                  timeouts: { shutdown: 60s, header_read: 60s }"
        .into();
    let cfg = OpsConfig::new(opts);
    let mut gw = OpsGateway::start(&cfg).await;
    let mut next = cfg.clone();
    next.gw.extra = next.gw.extra.replace(
        "shutdown: 60s, header_read: 60s",
        "shutdown: 1s, header_read: 1s",
    );
    write_atomic(&gw.config, &next.yaml());
    gw.signal("HUP");
    gw.await_reloads("success", 1.0, RELOAD).await;

    // A client that never finishes its head is closed after the new header_read.
    let partial = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n", gw.port);
    let r = raw_exchange(gw.port, partial.as_bytes(), Duration::from_secs(30)).await;
    assert!(r.closed, "{}", gw.tails());

    // The upstream answers /slow after 3 s; the drain gives it 1 s.
    let url = gw.url("/slow");
    let slow = tokio::spawn(async move { try_send("GET", &url, &[], Vec::new()).await });
    gw.await_metric(
        "portcullis_requests_in_flight",
        1.0,
        "the slow request in flight",
    )
    .await;
    gw.signal("TERM");
    let status = gw.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
    let answered = slow.await.unwrap();
    assert!(
        answered.is_err(),
        "the slow request outlived the drain: {:?}",
        answered.map(|r| r.status)
    );
}

/// A reload reads and parses the file off the threads that serve requests: a file that takes
/// long to parse (deeply nested YAML, refused in the end) holds up no request meanwhile, even
/// with a single worker thread.
#[tokio::test]
async fn a_slow_reload_holds_up_no_request() {
    let (_idp, _upstream, mut opts) = parts(&[]).await;
    opts.env = vec![("PORTCULLIS_WORKER_THREADS".into(), "1".into())];
    let cfg = OpsConfig::new(opts);
    let gw = OpsGateway::start(&cfg).await;
    let depth = 20_000;
    let mut nested = cfg.yaml();
    nested.push_str(&format!(
        "nested: {}{}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    ));
    write_atomic(&gw.config, &nested);
    let deadline = Instant::now() + RELOAD;
    while !gw.stderr().contains("reloading") {
        assert!(Instant::now() < deadline, "{}", gw.tails());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = send("GET", &gw.url("/healthz"), &[], Vec::new()).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert!(
        !gw.stderr().contains("config reload rejected"),
        "the request waited for the reload: {}",
        gw.tails()
    );
    gw.await_reloads("failure", 1.0, RELOAD).await;
    assert!(gw.stderr().contains("recursion limit"), "{}", gw.tails());
}

#[tokio::test]
async fn sighup_reloads_the_config() {
    let (_idp, upstream, opts) = parts(&[]).await;
    let cfg = OpsConfig::new(opts);
    let gw = OpsGateway::start(&cfg).await;
    let cookie = login_cookie_at(&gw.origin(), "alice").await;

    // The start-up line names the admin address plainly (not `Some(...)`).
    let admin = format!("admin=127.0.0.1:{}", gw.admin_port.unwrap());
    assert!(
        gw.stderr()
            .lines()
            .any(|l| l.contains("portcullis listening") && l.contains(&admin)),
        "{}",
        gw.tails()
    );
    // An unchanged file: only the signal can cause this reload.
    gw.signal("HUP");
    gw.await_reloads("success", 1.0, RELOAD).await;
    assert!(gw.stderr().contains("config reloaded"), "{}", gw.tails());
    let r = api_get(&gw.url("/after-hup"), &cookie).await;
    assert_eq!(r.status, 200, "{}", r.dump());

    // A changed file and the signal. A keep-alive connection opened before the reload gets
    // the new config on its next request too.
    let mut kept = keep_alive_client(gw.port).await;
    let mut get_on_kept = |path: &'static str| {
        let sent = kept.send_request(api_request(gw.port, &cookie, path));
        async move {
            let resp = sent.await.expect("the kept connection answers");
            let status = resp.status();
            resp.into_body().collect().await.unwrap();
            status
        }
    };
    assert_eq!(get_on_kept("/kept-before").await, 200);
    assert_eq!(upstream.last().header("x-forwarded-user"), Some("alice"));
    let mut next = cfg.clone();
    next.gw.extra = "headers: { user: X-Remote-User }".into();
    write_atomic(&gw.config, &next.yaml());
    gw.signal("HUP");
    gw.await_reloads("success", 2.0, RELOAD).await;
    assert_eq!(get_on_kept("/kept-after").await, 200);
    let rec = upstream.last();
    assert_eq!(rec.header("x-remote-user"), Some("alice"), "{rec:?}");
    assert!(rec.header("x-forwarded-user").is_none(), "{rec:?}");
    let r = api_get(&gw.url("/changed"), &cookie).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(upstream.last().header("x-remote-user"), Some("alice"));
    assert!(gw.reloads("success").await >= 2.0);
    assert_eq!(gw.reloads("failure").await, 0.0);
}

/// An API `GET` of `path` with the session `cookie`, for a [`keep_alive_client`].
fn api_request(port: u16, cookie: &str, path: &str) -> http::Request<Empty<Bytes>> {
    http::Request::get(path)
        .header("host", format!("127.0.0.1:{port}"))
        .header("accept", "application/json")
        .header("cookie", cookie)
        .body(Empty::<Bytes>::new())
        .unwrap()
}

/// A log reader that stops reading (stderr a pipe nobody reads: a stalled container-runtime
/// pipe) costs log lines, counted, never requests: each request is answered and `/healthz`
/// still is, where written directly every request stopped at its access line once the pipe
/// was full. What was queued is written once the reader reads again, whole lines.
#[tokio::test]
async fn a_stalled_log_reader_holds_up_no_request() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let config = dir.path().join("portcullis.yaml");
    std::fs::write(
        &config,
        format!(
            r#"listen: "127.0.0.1:{port}"
upstream: "http://127.0.0.1:{dead}"
provider: {{ issuer_url: "http://127.0.0.1:{dead}", client_id: "c", client_secret: "s" }}
redirect_url: "http://127.0.0.1:{port}/oauth2/callback"
cookie: {{ secrets: ["{key}"], secure: false }}
admin: {{ listen: "127.0.0.1:{admin}" }}
log: {{ level: info }}
"#,
            dead = free_port(),
            key = key(1)
        ),
    )
    .unwrap();
    /// Killed and reaped however the test ends (its stderr is a pipe, not Proc's file).
    struct Reaped(std::process::Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reaped(
        support::procs::gateway_command()
            .arg("--config")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stalled = child.0.stderr.take().unwrap();
    let url = format!("http://127.0.0.1:{port}/healthz");
    eventually(Duration::from_secs(30), "the gateway listens", || async {
        try_send("GET", &url, &[], Vec::new()).await.map(|_| ())
    })
    .await;
    // Far more access lines than the pipe (64 KiB) and the queue (8,192 lines) hold.
    let mut client = keep_alive_client(port).await;
    for i in 0..10_000 {
        let req = http::Request::get("/healthz")
            .header("host", format!("127.0.0.1:{port}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let sent = tokio::time::timeout(Duration::from_secs(10), client.send_request(req)).await;
        let resp = sent
            .unwrap_or_else(|_| panic!("request {i} hung on the log"))
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    let m = tokio::time::timeout(Duration::from_secs(10), admin_metrics(admin))
        .await
        .expect("/metrics hung on the log")
        .unwrap();
    assert!(
        m.value("portcullis_log_lines_dropped_total") > 0.0,
        "{}",
        m.text
    );
    // The reader reads again: what waited comes out as whole lines.
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stalled.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(child);
    let text = reader.join().unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 1000, "{} lines", lines.len());
    assert!(
        lines
            .iter()
            .all(|l| l.contains(" INFO ") || l.contains(" WARN ")),
        "{:?}",
        lines
            .iter()
            .find(|l| !l.contains(" INFO ") && !l.contains(" WARN "))
    );
}

/// An HTTP/1.1 client on one connection to the gateway, kept open.
async fn keep_alive_client(port: u16) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

#[tokio::test]
async fn configmap_symlink_swap_is_picked_up() {
    let (_idp, upstream, opts) = parts(&[]).await;
    let cfg = OpsConfig::new(opts);
    // The layout of a mounted ConfigMap: timestamped dirs, `..data` pointing at the
    // current one, and the file a symlink through `..data`.
    let dir = tempfile::Builder::new()
        .prefix("portcullis-ops-cm-")
        .tempdir()
        .unwrap();
    let d = dir.path().to_path_buf();
    std::fs::create_dir(d.join("..2026_01_01_00_00_00.1")).unwrap();
    std::fs::write(
        d.join("..2026_01_01_00_00_00.1/portcullis.yaml"),
        cfg.yaml(),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_01_01_00_00_00.1", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/portcullis.yaml", d.join("portcullis.yaml")).unwrap();
    let gw = OpsGateway::spawn(dir, d.join("portcullis.yaml"), cfg.gw.port, cfg.admin_port).await;
    let cookie = login_cookie_at(&gw.origin(), "alice").await;
    assert_eq!(upstream.last().header("x-forwarded-user"), Some("alice"));

    // The kubelet's atomic update: a new dir, a new symlink, renamed over `..data`.
    let mut next = cfg.clone();
    next.gw.extra = "headers: { user_claim: email }".into();
    std::fs::create_dir(d.join("..2026_01_02_00_00_00.2")).unwrap();
    std::fs::write(
        d.join("..2026_01_02_00_00_00.2/portcullis.yaml"),
        next.yaml(),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_01_02_00_00_00.2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(d.join("..2026_01_01_00_00_00.1")).unwrap();

    eventually(
        RELOAD,
        "the upstream sees the email as the user",
        || async {
            let r = api_get(&gw.url("/cm"), &cookie).await;
            assert_eq!(r.status, 200, "{}", r.dump());
            match upstream.last().header("x-forwarded-user") {
                Some("alice@example.test") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(gw.reloads("failure").await, 0.0, "{}", gw.tails());
}

// ---------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------

/// Runs a login, proxied requests, a tampered cookie and a sign-out at debug level with
/// `log` as the log mapping; returns the gateway (for its stderr) and every secret value
/// the run exposed, by name.
async fn logged_run(log: &str) -> (OpsGateway, Vec<(&'static str, String)>) {
    let (idp, upstream, mut opts) = parts(&[]).await;
    // A route alice may not use: a 403 for a signed-in user.
    // Forward-auth from here names the original request (and so its route's rules).
    opts.extra = r#"routes: [ { prefix: "/logs/admin/", allow: { groups: ["nobody"] } } ]
trusted_proxies: ["127.0.0.1/32"]"#
        .into();
    let mut cfg = OpsConfig::new(opts);
    cfg.log = log.to_string();
    let gw = OpsGateway::start(&cfg).await;

    let b = Browser::new();
    let t = login_at(&b, &gw.origin(), "/logs/page?x=1", "alice").await;
    assert_eq!(t.last.status, 200, "{}", t.last.dump());
    let session = b
        .cookie(&gw.url("/"), "_portcullis")
        .expect("session cookie");
    let cookie = format!("_portcullis={session}");
    let access_token = upstream.last().bearer();
    for i in 0..3 {
        let r = api_get(&gw.url(&format!("/logs/api/{i}")), &cookie).await;
        assert_eq!(r.status, 200, "{}", r.dump());
    }
    let r = send(
        "POST",
        &gw.url("/logs/form"),
        &[("content-type", "application/json"), ("cookie", &cookie)],
        "{\"a\":1}",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let tampered = format!("_portcullis={}", flip(&session, session.len() / 2));
    let r = api_get(&gw.url("/logs/tampered"), &tampered).await;
    assert_eq!(r.status, 401, "{}", r.dump());
    // Answered by the gateway itself, each under a request id of ours (see the JSON test).
    for (path, id, status) in [
        ("/oauth2/auth", "logs-auth", 202),
        ("/oauth2/auth/some/path", "logs-envoy", 200),
        ("/oauth2/userinfo", "logs-userinfo", 200),
        ("/logs/admin/x", "logs-denied", 403),
    ] {
        let headers = [
            ("accept", "application/json"),
            ("cookie", cookie.as_str()),
            ("x-request-id", id),
        ];
        let r = send("GET", &gw.url(path), &headers, Vec::new()).await;
        assert_eq!(r.status, status, "{path}: {}", r.dump());
    }
    let headers = [
        ("accept", "application/json"),
        ("cookie", cookie.as_str()),
        ("x-request-id", "logs-auth-denied"),
        ("x-original-url", "/logs/admin/y"),
    ];
    let r = send("GET", &gw.url("/oauth2/auth"), &headers, Vec::new()).await;
    assert_eq!(r.status, 403, "forward-auth denial: {}", r.dump());

    // Sign-out: the confirmation page, then the POST with its CSRF token.
    let page = b.get(&gw.url("/oauth2/sign_out")).await;
    assert_eq!(page.status, 200, "{}", page.dump());
    let csrf = support::html::hidden_value(&page.text(), "csrf").expect("csrf field");
    let out = b
        .request(
            "POST",
            &gw.url("/oauth2/sign_out"),
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", &gw.origin()),
                ("x-request-id", "logs-sign-out"),
            ],
            format!("csrf={}", enc(&csrf)),
        )
        .await;
    assert_eq!(out.status, 302, "{}", out.dump());
    let id_token = query_param(out.location().unwrap(), "id_token_hint").expect("id_token_hint");
    let signature = id_token.rsplit('.').next().unwrap().to_string();
    let after = api_get(&gw.url("/logs/after"), "").await;
    assert_eq!(after.status, 401);

    let secrets = vec![
        ("access token", access_token),
        ("session cookie (head)", session[..40].to_string()),
        (
            "session cookie (tail)",
            session[session.len() - 40..].to_string(),
        ),
        ("flow cookie (head)", t.flow_cookie[..40].to_string()),
        ("authorization code", t.code.clone()),
        ("state", t.state.clone()),
        ("client secret", CLIENT_SECRET.to_string()),
        ("cookie secret", key(1)),
        ("ID token", id_token),
        ("ID token signature", signature),
        ("sign-out CSRF token", csrf),
    ];
    for (name, v) in &secrets {
        assert!(v.len() >= 16, "{name} is too short to search for: {v:?}");
    }
    drop(idp);
    (gw, secrets)
}

fn assert_no_secrets(log: &str, secrets: &[(&str, String)]) {
    for (name, v) in secrets {
        if let Some(line) = log.lines().find(|l| l.contains(v.as_str())) {
            panic!("the log shows the {name}: {line}");
        }
    }
}

#[tokio::test]
async fn debug_logs_never_contain_secrets() {
    let (gw, secrets) = logged_run("{ level: debug }").await;
    let log = gw.stderr();
    assert_no_secrets(&log, &secrets);
    assert!(
        log.lines().any(|l| l.contains("DEBUG")),
        "debug level is on:\n{log}"
    );
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" access:") && l.contains("route=") && l.contains("status="))
        .collect();
    assert!(
        access
            .iter()
            .any(|l| l.contains("proxied") && l.contains("status=200")),
        "no access-log line for a proxied 200:\n{log}"
    );
    assert!(
        access.iter().any(|l| l.contains("status=401")),
        "no access-log line for the 401:\n{log}"
    );
}

/// A provider's error text is logged as it was sent, escaped: whatever Unicode line breaks,
/// C1 controls or bidirectional marks it holds, the event stays one line (in JSON, one JSON
/// document that gives the text back), and none of them reaches the log raw.
#[tokio::test]
async fn a_providers_error_text_cannot_split_or_disguise_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let answer = dir.path().join("token-answer");
    let answer_env = answer.to_str().unwrap().to_string();
    let text = "A\u{2066}B\u{200f}C\u{61c}D\u{2029}E\u{2028}F\u{85}G\u{9b}H\u{7f}I\u{b}J";
    for format in ["text", "json"] {
        let (_idp, _upstream, opts) = parts(&[("IDP_TOKEN_OVERRIDE_FILE", &answer_env)]).await;
        let mut cfg = OpsConfig::new(opts);
        cfg.log = format!("{{ level: info, format: {format} }}");
        let gw = OpsGateway::start(&cfg).await;
        let b = Browser::new();
        let (auth, _) = auth_redirect(&b.get(&gw.url("/oauth2/start?rd=%2F")).await);
        let callback = idp_walk(&b, &auth, "alice").await;
        let refusal = serde_json::json!({"error": "invalid_grant", "error_description": text});
        std::fs::write(&answer, format!("400 application/json {refusal}")).unwrap();
        let r = b.get(&callback).await;
        std::fs::remove_file(&answer).unwrap();
        assert!(r.status.is_client_error(), "{format}: {}", r.dump());
        let log = gw.stderr();
        for c in text.chars().filter(|c| !c.is_ascii_alphabetic()) {
            assert!(!log.contains(c), "{format}: {c:?} raw in the log: {log:?}");
        }
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("A\\u")).collect();
        assert_eq!(
            lines.len(),
            1,
            "{format}: the provider's text not logged once: {log}"
        );
        if format == "json" {
            for line in log.lines() {
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
            }
            assert!(
                log.lines().any(|l| {
                    serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                        v.as_object().is_some_and(|o| {
                            o.values()
                                .any(|f| f.as_str().is_some_and(|f| f.contains(text)))
                        })
                    })
                }),
                "the text does not read back from the JSON: {log}"
            );
        } else {
            // One quoted value, escaped as Rust quotes a string.
            assert!(
                lines[0].contains(
                    r#"A\u{2066}B\u{200f}C\u{61c}D\u{2029}E\u{2028}F\u{85}G\u{9b}H\u{7f}I\u{b}J""#
                ),
                "{:?}",
                lines[0]
            );
        }
    }
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_without_secrets() {
    let (gw, secrets) = logged_run("{ level: debug, format: json }").await;
    let log = gw.stderr();
    assert_no_secrets(&log, &secrets);
    let mut access = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}"));
        assert!(v.is_object(), "{line}");
        if v["target"] == "access" {
            access.push(v);
        }
    }
    let proxied = access
        .iter()
        .find(|v| v["route"] == "proxied" && v["status"] == 200 && v["method"] == "GET")
        .unwrap_or_else(|| panic!("no proxied GET 200 access line:\n{log}"));
    assert!(proxied["request_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert!(proxied["gateway_ms"].is_number(), "{proxied}");
    assert!(proxied["upstream_ms"].is_number(), "{proxied}");
    assert_eq!(proxied["user"], "alice", "{proxied}");
    assert_eq!(proxied["client"], "127.0.0.1", "{proxied}");
    assert!(
        proxied["path"].as_str().is_some_and(|p| p.starts_with('/')),
        "{proxied}"
    );
    // The callback's line names its path, never its query (the code, the state).
    let callback = access
        .iter()
        .find(|v| v["path"] == "/oauth2/callback")
        .unwrap_or_else(|| panic!("no access line for the callback:\n{log}"));
    assert_eq!(callback["route"], "flow", "{callback}");
    assert!(
        access
            .iter()
            .any(|v| v["route"] == "forward_auth" && v["status"] == 202),
        "{log}"
    );
    assert!(
        access
            .iter()
            .any(|v| v["route"] == "proxied" && v["status"] == 401),
        "{log}"
    );
    // What the gateway answers itself for a signed-in user names them as the proxied path
    // does: forward-auth (ingress and Envoy forms), userinfo, a denial, the sign-out.
    for (id, route, status) in [
        ("logs-auth", "forward_auth", 202),
        ("logs-envoy", "forward_auth", 200),
        ("logs-userinfo", "flow", 200),
        ("logs-denied", "proxied", 403),
        ("logs-auth-denied", "forward_auth", 403),
        ("logs-sign-out", "flow", 302),
    ] {
        let line = access
            .iter()
            .find(|v| v["request_id"] == id)
            .unwrap_or_else(|| panic!("no access line for {id}:\n{log}"));
        assert_eq!(line["route"], route, "{line}");
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["user"], "alice", "{line}");
    }
    // A denial's own line says who and which request.
    for id in ["logs-denied", "logs-auth-denied"] {
        let denied = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "authenticated user denied" && v["request_id"] == id)
            .unwrap_or_else(|| panic!("no denial line for {id}:\n{log}"));
        assert_eq!(denied["user"], "alice", "{denied}");
    }
}

// ---------------------------------------------------------------------------------------
// Forward auth behind nginx, trusted proxies
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn nginx_auth_request_forward_auth_end_to_end() {
    let gw_port = free_port();
    let upstream = Upstream::start();
    let nginx = Nginx::start_forward_auth(gw_port, upstream.port).await;
    let callback_url = nginx.url("/oauth2/callback");
    // Access tokens live 4 s: due for refresh after half of it (the default refresh_before is
    // longer), and the refreshed cookie must reach the browser through nginx.
    let idp = Idp::start(&[
        ("IDP_REDIRECT_URIS", &callback_url),
        ("IDP_ACCESS_TOKEN_TTL", "4"),
        ("IDP_ROTATE_REFRESH_TOKEN", "1"),
    ])
    .await;
    let mut cfg = OpsConfig::new(GatewayOpts {
        extra: "trusted_proxies: [\"127.0.0.1/32\"]\nroutes:\n  \
                - { prefix: \"/writes/\", methods: [\"POST\"], allow: { groups: [\"admins\"] } }\n  \
                - { prefix: \"/api/\", auth: api }\n  \
                - { prefix: \"/\", host: \"admin.test\", allow: { groups: [\"admins\"] } }"
            .into(),
        ..GatewayOpts::new(gw_port, &idp, &upstream.url())
    });
    cfg.admin_port = None;
    cfg.redirect_url = Some(callback_url.clone());
    let gw = OpsGateway::start(&cfg).await;

    // Not signed in: nginx turns the gateway's 401 into the login redirect.
    let b = Browser::new();
    let r = b.get(&nginx.url("/some/page?a=1&b=2")).await;
    assert_eq!(r.status, 302, "{}\n{}", r.dump(), nginx.tails());
    assert_eq!(
        r.location(),
        Some("/oauth2/start?rd=%2Fsome%2Fpage%3Fa%3D1%26b%3D2"),
        "{}",
        r.dump()
    );
    assert_eq!(upstream.count(), 0);

    // The login, all through nginx.
    let start = b.get(&r.location_abs().unwrap()).await;
    let (auth, _) = auth_redirect(&start);
    assert_eq!(
        query_param(&auth, "redirect_uri").as_deref(),
        Some(callback_url.as_str())
    );
    let callback = idp_walk(&b, &auth, "alice").await;
    assert!(
        callback.starts_with(&format!("{callback_url}?")),
        "{callback}"
    );
    let cb = b.get(&callback).await;
    assert_eq!(cb.status, 302, "{}\n{}", cb.dump(), gw.tails());
    assert_eq!(cb.location(), Some("/some/page?a=1&b=2"), "{}", cb.dump());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let page = b.get(&nginx.url("/some/page?a=1&b=2")).await;
    assert_eq!(page.status, 200, "{}\n{}", page.dump(), nginx.tails());
    let rec = upstream.last();
    assert_eq!(rec.path, "/some/page");
    assert_eq!(rec.query.as_deref(), Some("a=1&b=2"));
    let refreshed = page.set_cookie("_portcullis");
    assert!(
        refreshed.is_some_and(|c| !c.is_removal()),
        "the refreshed session cookie comes back through nginx: {}",
        page.dump()
    );
    assert_eq!(rec.header("x-user"), Some("alice"), "{rec:?}");
    assert_eq!(rec.header("x-email"), Some("alice@example.test"), "{rec:?}");
    // The client's own say under forward-auth's answer names stays out of the app's request.
    let spoofed = send(
        "GET",
        &nginx.url("/some/page"),
        &[
            ("cookie", b.cookie_header(&nginx.url("/")).as_str()),
            ("x-auth-request-user", "mallory"),
            ("x-auth-request-preferred-username", "mallory"),
            ("x-auth-request-access-token", "forged"),
            ("x-forwarded-user", "mallory"),
            ("x-forwarded-email", "mallory@example.test"),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(spoofed.status, 200, "{}", spoofed.dump());
    let rec = upstream.last();
    assert_eq!(rec.header("x-auth-request-user"), None, "{rec:?}");
    // Nor under the proxied mode's names, which an app moved from it may trust.
    assert_eq!(rec.header("x-forwarded-user"), None, "{rec:?}");
    assert_eq!(rec.header("x-forwarded-email"), None, "{rec:?}");
    assert_eq!(
        rec.header("x-auth-request-preferred-username"),
        None,
        "{rec:?}"
    );
    assert_eq!(rec.header("x-auth-request-access-token"), None, "{rec:?}");

    // nginx asks with GET whatever the method: the rules of a route for POST apply to the
    // POST only because the snippet passes the method on.
    let cookie = b.cookie_header(&nginx.url("/"));
    let before = upstream.count();
    let post = send(
        "POST",
        &nginx.url("/writes/x"),
        &[("cookie", cookie.as_str())],
        b"x".to_vec(),
    )
    .await;
    assert_eq!(post.status, 403, "{}\n{}", post.dump(), gw.tails());
    assert_eq!(upstream.count(), before, "the POST reached the upstream");
    let get = api_get(&nginx.url("/writes/x"), &cookie).await;
    assert_eq!(get.status, 200, "{}", get.dump());
    // What a client says of the original request itself is not passed to the gateway by
    // the snippet: no 400 from the gateway, which nginx would turn into a 500.
    for spoof in [
        ("x-forwarded-uri", "/public/x"),
        ("x-original-method", "GET"),
        ("x-forwarded-host", "a.test, b.test"),
    ] {
        let r = send(
            "GET",
            &nginx.url("/some/page"),
            &[("accept", "application/json"), spoof],
            Vec::new(),
        )
        .await;
        assert_eq!(r.status, 401, "{spoof:?}: {}\n{}", r.dump(), nginx.tails());
    }
    // nginx builds X-Original-URL from the client's Host and accepts one ending in `?` or `#`:
    // the path must not slide into the query, where the gateway would judge `/` instead.
    let before = upstream.count();
    for host in ["?", "#"].map(|end| format!("127.0.0.1:{}{end}", nginx.port)) {
        let post = format!(
            "POST /writes/x HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\
             Content-Length: 1\r\nConnection: close\r\n\r\nx"
        );
        let r = support::corpus::raw_exchange(nginx.port, post.as_bytes(), Duration::from_secs(10))
            .await;
        assert!(
            !matches!(r.status, Some(200..=299)),
            "Host {host}: {}",
            r.text
        );
        assert_eq!(
            upstream.count(),
            before,
            "Host {host}: the POST reached the upstream"
        );
    }

    // nginx serves the site a request line names (`GET http://admin.test/…`) whatever the
    // Host header says: the snippet names that site to the gateway (`$host`, not the client's
    // `$http_host`), so admin.test's rules apply.
    let before = upstream.count();
    let absolute = format!(
        "GET http://admin.test/some/page HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nCookie: {cookie}\r\n\
         Accept: application/json\r\nConnection: close\r\n\r\n",
        nginx.port
    );
    let r = support::corpus::raw_exchange(nginx.port, absolute.as_bytes(), Duration::from_secs(10))
        .await;
    assert_eq!(r.status, Some(403), "{}\n{}", r.text, nginx.tails());
    assert_eq!(upstream.count(), before, "admin.test's page reached alice");

    // Without a session, through nginx, only a browser navigation on a login route is sent
    // to log in: an `auth: api` route (even for a browser) and an API caller anywhere get
    // the 401, never a redirect.
    let anonymous = Browser::new();
    for (path, accept) in [
        ("/api/things", BROWSER_ACCEPT),
        ("/api/things", "application/json"),
        ("/some/page", "application/json"),
    ] {
        let r = send("GET", &nginx.url(path), &[("accept", accept)], Vec::new()).await;
        assert_eq!(r.status, 401, "{path} {accept}: {}", r.dump());
        assert!(r.location().is_none(), "{path} {accept}: {}", r.dump());
    }
    let r = anonymous.get(&nginx.url("/some/page")).await;
    assert_eq!(r.status, 302, "{}", r.dump());
    assert_eq!(r.location(), Some("/oauth2/start?rd=%2Fsome%2Fpage"));
    // Signed in, the API route is reached.
    let r = api_get(&nginx.url("/api/things"), &cookie).await;
    assert_eq!(r.status, 200, "{}", r.dump());

    // The forward-auth endpoint itself.
    let cookie = b.cookie_header(&nginx.url("/"));
    assert!(cookie.starts_with("_portcullis="), "{cookie}");
    let fa = api_get(&gw.url("/oauth2/auth"), &cookie).await;
    assert_eq!(fa.status, 202, "{}", fa.dump());
    assert_eq!(fa.header("x-auth-request-user"), Some("alice"));
    assert_eq!(
        fa.header("x-auth-request-email"),
        Some("alice@example.test")
    );
    assert_eq!(fa.header("x-auth-request-groups"), Some("users,user-alice"));
    assert_eq!(
        fa.header("x-auth-request-preferred-username"),
        Some("alice")
    );
    assert!(
        fa.header("x-auth-request-access-token")
            .is_some_and(|t| t.len() >= 32),
        "{}",
        fa.dump()
    );
    // Not through nginx, in either form: a script on the page would read the token.
    for path in ["/oauth2/auth", "/oauth2/auth/some/page"] {
        let r = api_get(&nginx.url(path), &cookie).await;
        assert_eq!(r.status, 404, "{path}: {}", r.dump());
        assert!(r.header("x-auth-request-access-token").is_none());
    }
    let no = api_get(&gw.url("/oauth2/auth"), "").await;
    assert_eq!(no.status, 401, "{}", no.dump());
    assert!(no.header("x-auth-request-user").is_none());
}

#[tokio::test]
async fn forwarded_for_is_extended_only_for_trusted_proxies() {
    let (_idp, upstream, opts) = parts(&[]).await;
    let untrusted = Gateway::start(GatewayOpts {
        extra: "trusted_proxies: []".into(),
        ..opts.clone()
    })
    .await;
    let trusted = Gateway::start(GatewayOpts {
        port: free_port(),
        extra: "trusted_proxies: [\"127.0.0.1/32\"]".into(),
        ..opts
    })
    .await;
    let cookie = login_cookie(&untrusted, "alice").await;
    let spoofed = |gw: &Gateway| {
        let url = gw.url("/xff");
        let cookie = cookie.clone();
        async move {
            let r = send(
                "GET",
                &url,
                &[
                    ("accept", "application/json"),
                    ("cookie", &cookie),
                    ("x-forwarded-for", "6.6.6.6"),
                ],
                Vec::new(),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.dump());
        }
    };

    spoofed(&untrusted).await;
    assert_eq!(
        upstream.last().header_all("x-forwarded-for"),
        vec!["127.0.0.1"],
        "an untrusted peer's X-Forwarded-For is replaced"
    );
    spoofed(&trusted).await;
    assert_eq!(
        upstream.last().header_all("x-forwarded-for"),
        vec!["6.6.6.6, 127.0.0.1"],
        "a trusted proxy's X-Forwarded-For is extended"
    );
}

/// The demo launcher, stopped as Ctrl-C would (it then stops its children) — also when the
/// test fails: a SIGKILL would leave the IdP, the app and the gateway running.
struct Demo(support::procs::Proc);

impl Demo {
    /// The launcher's own output and the logs it keeps of its children (their temporary
    /// directory lives in this test's directory: the demo runs with TMPDIR set to it).
    fn tails(&self) -> String {
        let mut out = self.0.tails();
        let logs = std::fs::read_dir(self.0.dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("portcullis-demo-")
            })
            .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
            .filter(|f| f.path().extension().is_some_and(|x| x == "log"));
        for log in logs {
            let text = std::fs::read_to_string(log.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("---- demo's {} ----\n", log.path().display()));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    fn interrupt(&mut self) {
        if self.0.exited().is_some() {
            return;
        }
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.0.pid().to_string()])
            .status();
        let t0 = Instant::now();
        while self.0.exited().is_none() && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.interrupt();
    }
}

/// `make demo`'s launcher (tests/js/demo.mjs): the gateway gets no stray `PORTCULLIS_BIN`
/// (which names no key and made it warn at every start), and its admin listener moves to a
/// free port, printed, when the demo's default one (4181) is taken.
#[tokio::test]
async fn demo_launcher_passes_no_stray_variable_and_finds_a_free_admin_port() {
    use support::procs::{bin, Proc};
    // Taken for this test, or by someone else: busy either way.
    let _taken = std::net::TcpListener::bind("127.0.0.1:4181");
    let (gw, idp, app) = (free_port(), free_port(), free_port());
    let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    let mut cmd = std::process::Command::new(std::env::var("NODE").unwrap_or("node".into()));
    cmd.arg(js.join("demo.mjs"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PORTCULLIS_") || k.starts_with("DEMO_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.env("PORTCULLIS_BIN", bin())
        .env("NO_COLOR", "1")
        .env("DEMO_GW_PORT", gw.to_string())
        .env("DEMO_IDP_PORT", idp.to_string())
        .env("DEMO_APP_PORT", app.to_string());
    let dir = tempfile::Builder::new()
        .prefix("portcullis-demo-test-")
        .tempdir()
        .unwrap();
    cmd.env("TMPDIR", dir.path());
    let mut d = Demo(Proc::spawn("demo", cmd, dir));
    let t0 = Instant::now();
    // Longer than the launcher's own waits for its children (60 s each), so that a slow
    // start ends with the launcher's account of it rather than this one.
    while !d.0.stdout().contains("Gateway log follows") {
        assert!(d.0.exited().is_none(), "the demo stopped\n{}", d.tails());
        assert!(
            t0.elapsed() < 3 * START_TIMEOUT,
            "the demo did not start\n{}",
            d.tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let demo = &mut d.0;
    let out = demo.stdout();
    let admin: u16 = out
        .lines()
        .find_map(|l| {
            let rest = l.split("metrics   http://127.0.0.1:").nth(1)?;
            rest.split('/').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no admin port printed:\n{out}"));
    assert_ne!(admin, 4181, "4181 is taken:\n{out}");
    assert!(
        out.contains(&format!("the admin listener takes 127.0.0.1:{admin}")),
        "{out}"
    );
    if let Err(e) = support::ops::admin_metrics(admin).await {
        panic!("{e}");
    }
    let r = send(
        "GET",
        &format!("http://127.0.0.1:{gw}/healthz"),
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.dump());
    // Let the gateway's start-up warnings (echoed by the demo) arrive, then look for them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = demo.stdout();
    assert!(
        !out.contains("PORTCULLIS_BIN") && !out.contains("names no configuration key"),
        "a stray variable reached the gateway:\n{out}"
    );
    // Ctrl-C stops all three.
    d.interrupt();
    assert!(
        d.0.exited().is_some(),
        "the demo did not stop\n{}",
        d.0.tails()
    );
    assert!(
        try_send(
            "GET",
            &format!("http://127.0.0.1:{gw}/healthz"),
            &[],
            Vec::new()
        )
        .await
        .is_err(),
        "the gateway outlived the demo"
    );
}

/// `admin.listen`'s default, 127.0.0.1:9090, is also Prometheus's port: a config that does not
/// name the admin listener still starts when it is taken, on a free port it logs. An admin
/// address the config names is the operator's: taken, the gateway does not start, and says
/// which key.
#[tokio::test]
async fn a_taken_default_admin_port_moves_and_a_taken_configured_one_stops_the_start() {
    use support::procs::{gateway_command, Proc, ADMIN_YAML};
    // Taken for this test, or by someone else: busy either way.
    let _default = std::net::TcpListener::bind("127.0.0.1:9090");
    let configured = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let configured = configured.local_addr().unwrap();
    let (idp, upstream, opts) = parts(&[]).await;
    let spawn = |admin: &str| {
        let dir = tempfile::Builder::new()
            .prefix("portcullis-admin-")
            .tempdir()
            .unwrap();
        let cfg = dir.path().join("portcullis.yaml");
        std::fs::write(&cfg, opts.yaml().replace(ADMIN_YAML, admin)).unwrap();
        let mut cmd = gateway_command();
        cmd.arg("--config").arg(&cfg);
        Proc::spawn("gateway", cmd, dir)
    };

    let mut gw = spawn("");
    let t0 = Instant::now();
    let instead = loop {
        assert!(gw.exited().is_none(), "it did not start\n{}", gw.tails());
        assert!(t0.elapsed() < START_TIMEOUT, "{}", gw.tails());
        let moved = gw.stderr().lines().find_map(|l| {
            let rest = l
                .split("admin.listen: its default 127.0.0.1:9090 is taken")
                .nth(1)?;
            let port = rest.split("served on 127.0.0.1:").nth(1)?;
            port.split(' ').next()?.parse::<u16>().ok()
        });
        if let Some(port) = moved {
            break port;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(instead, 9090);
    let healthz = format!("http://127.0.0.1:{}/healthz", opts.port);
    while !try_send("GET", &healthz, &[], Vec::new())
        .await
        .is_ok_and(|r| r.status == 200)
    {
        assert!(t0.elapsed() < START_TIMEOUT, "not serving\n{}", gw.tails());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Err(e) = admin_metrics(instead).await {
        panic!("{e}\n{}", gw.tails());
    }
    // The start-up line names where it listens.
    let listening = format!("admin=127.0.0.1:{instead}");
    assert!(
        gw.stderr()
            .lines()
            .any(|l| l.contains("portcullis listening") && l.contains(&listening)),
        "{}",
        gw.tails()
    );
    drop(gw);

    let mut gw = spawn(&format!("admin: {{ listen: \"{configured}\" }}"));
    let status = gw.wait_exit(START_TIMEOUT).await;
    assert!(!status.success(), "{}", gw.tails());
    assert!(
        gw.stderr()
            .contains(&format!("admin.listen: cannot listen on {configured}")),
        "{}",
        gw.tails()
    );
    drop((idp, upstream));
}
