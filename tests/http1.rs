//! The gateway's own HTTP/1.1 connection loop (src/server/h1), over real loopback sockets:
//! request framing and smuggling, pipelining, keep-alive, `100 Continue`, HTTP/1.0, HEAD,
//! responses of unknown length, bodies the gateway never reads, and malformed heads.
//!
//! Requests are written byte for byte by a small client here; behind the gateway is a raw
//! upstream (a `std::net::TcpListener` thread) that records exactly what reaches it.
//! Timeouts in this file are hang guards only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything public (no login), except `/api/` which answers 401 without a session
/// (an answer given without reading the request body).
const ROUTES: &str = r#"routes: [ { prefix: "/api/", auth: api }, { prefix: "/", auth: skip } ]"#;

/// Hang guard: how long the client waits for the gateway to send or close anything.
const DEADLINE: Duration = Duration::from_secs(10);

/// Size of the upstream's `/until-close` and `/chunked` answers.
const BIG: usize = 300_000;

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Deterministic bytes (every value, CR and LF included).
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i.wrapping_mul(7) % 251) as u8).collect()
}

// ---------------------------------------------------------------------------------------
// The raw upstream.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyState {
    /// The head arrived, the body is still being read.
    Reading,
    /// Complete by its Content-Length, or up to the last chunk and the trailer section.
    Complete,
    /// The connection ended (or the chunked framing broke) before the end of the body.
    Cut,
}

/// One request as the raw upstream read it off the wire.
#[derive(Clone, Debug)]
struct UpReq {
    method: String,
    target: String,
    /// Names lower-case, in arrival order.
    headers: Vec<(String, String)>,
    /// The body with any chunked framing removed.
    body: Vec<u8>,
    state: BodyState,
}

impl UpReq {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 upstream written by hand. Answers, by path:
/// - `/until-close`: `HTTP/1.0 200` without Content-Length, [`BIG`] bytes of [`pattern`], then
///   closes the connection (the body ends with the connection);
/// - `/chunked`: the same bytes with `Transfer-Encoding: chunked`, in uneven chunks;
/// - anything else: `"<method> <target> <body length>"` with a Content-Length.
///
/// HEAD requests get the same head and no body.
struct RawUpstream {
    port: u16,
    reqs: Arc<Mutex<Vec<UpReq>>>,
    /// Every byte received, per connection.
    wire: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl RawUpstream {
    fn start() -> RawUpstream {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let reqs: Arc<Mutex<Vec<UpReq>>> = Arc::default();
        let wire: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let (r, w) = (reqs.clone(), wire.clone());
        std::thread::spawn(move || {
            for (conn, s) in l.incoming().flatten().enumerate() {
                w.lock().unwrap().push(Vec::new());
                let (r, w) = (r.clone(), w.clone());
                std::thread::spawn(move || serve_upstream(conn, s, r, w));
            }
        });
        RawUpstream { port, reqs, wire }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<UpReq> {
        self.reqs.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.reqs.lock().unwrap().len()
    }

    fn targets(&self) -> Vec<String> {
        self.requests().into_iter().map(|r| r.target).collect()
    }

    /// Everything the upstream received, all connections, for failure messages.
    fn wire(&self) -> String {
        self.wire
            .lock()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, w)| format!("--- upstream connection {i} ---\n{}\n", lossy(w)))
            .collect()
    }

    /// Waits (hang guard: [`DEADLINE`]) until no request is still having its body read:
    /// every request the upstream saw has ended complete or cut.
    async fn settled(&self) -> Vec<UpReq> {
        ops::eventually(DEADLINE, "an upstream request left half-sent", || async {
            let reqs = self.requests();
            if reqs.iter().all(|r| r.state != BodyState::Reading) {
                Ok(reqs)
            } else {
                Err(format!("{reqs:#?}\n{}", self.wire()))
            }
        })
        .await
    }
}

/// The upstream's reading side of one connection.
struct Wire {
    s: std::net::TcpStream,
    buf: Vec<u8>,
    conn: usize,
    log: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Wire {
    fn fill(&mut self) -> bool {
        let mut chunk = vec![0u8; 64 * 1024];
        match self.s.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.log.lock().unwrap()[self.conn].extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The bytes up to and including `pat`; `None` if the connection ends first.
    fn until(&mut self, pat: &[u8]) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = find(&self.buf, pat) {
                return Some(self.buf.drain(..i + pat.len()).collect());
            }
            if !self.fill() {
                return None;
            }
        }
    }

    /// `n` bytes; `Err(what arrived)` if the connection ends first.
    fn exact(&mut self, n: usize) -> Result<Vec<u8>, Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill() {
                return Err(std::mem::take(&mut self.buf));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// A request body: (bytes, complete).
    fn body(&mut self, chunked: bool, length: Option<usize>) -> (Vec<u8>, bool) {
        if !chunked {
            return match length {
                None | Some(0) => (Vec::new(), true),
                Some(n) => match self.exact(n) {
                    Ok(b) => (b, true),
                    Err(partial) => (partial, false),
                },
            };
        }
        let mut body = Vec::new();
        loop {
            let Some(line) = self.until(b"\r\n") else {
                return (body, false);
            };
            let size = std::str::from_utf8(&line).ok().and_then(|l| {
                let digits = l.trim_end().split(';').next()?.trim();
                usize::from_str_radix(digits, 16).ok()
            });
            let Some(size) = size else {
                return (body, false);
            };
            if size == 0 {
                loop {
                    match self.until(b"\r\n") {
                        None => return (body, false),
                        Some(t) if t == b"\r\n" => return (body, true),
                        Some(_) => {}
                    }
                }
            }
            match self.exact(size + 2) {
                Ok(d) if d.ends_with(b"\r\n") => body.extend_from_slice(&d[..size]),
                Ok(d) | Err(d) => {
                    body.extend_from_slice(&d[..d.len().min(size)]);
                    return (body, false);
                }
            }
        }
    }
}

fn serve_upstream(
    conn: usize,
    s: std::net::TcpStream,
    reqs: Arc<Mutex<Vec<UpReq>>>,
    log: Arc<Mutex<Vec<Vec<u8>>>>,
) {
    let mut out = s.try_clone().unwrap();
    let mut w = Wire {
        s,
        buf: Vec::new(),
        conn,
        log,
    };
    loop {
        let Some(head) = w.until(b"\r\n\r\n") else {
            return;
        };
        let head = lossy(&head);
        let mut lines = head.trim_end().split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let method = first.next().unwrap_or("").to_string();
        let target = first.next().unwrap_or("").to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.to_ascii_lowercase())
        };
        let chunked = get("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let length = get("content-length").and_then(|v| v.parse().ok());
        let close = get("connection").is_some_and(|v| v.contains("close"));
        let idx = {
            let mut r = reqs.lock().unwrap();
            r.push(UpReq {
                method,
                target,
                headers,
                body: Vec::new(),
                state: BodyState::Reading,
            });
            r.len() - 1
        };
        let (body, complete) = w.body(chunked, length);
        let req = {
            let mut r = reqs.lock().unwrap();
            r[idx].body = body;
            r[idx].state = if complete {
                BodyState::Complete
            } else {
                BodyState::Cut
            };
            r[idx].clone()
        };
        if !complete || !respond(&mut out, &req) || close {
            return;
        }
    }
}

/// Writes the answer to `req`; whether the connection stays open.
fn respond(out: &mut std::net::TcpStream, req: &UpReq) -> bool {
    let head_only = req.method == "HEAD";
    let path = req.target.split('?').next().unwrap_or("");
    match path {
        "/until-close" => {
            let mut r =
                out.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n");
            if !head_only {
                for piece in pattern(BIG).chunks(BIG / 6 + 1) {
                    r = r.and_then(|_| out.write_all(piece));
                }
            }
            let _ = r;
            false
        }
        "/chunked" => {
            let mut wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            if !head_only {
                let data = pattern(BIG);
                let mut at = 0;
                for size in [1usize, 4096, 65_536, 100_000].iter().cycle() {
                    if at == data.len() {
                        break;
                    }
                    let n = (*size).min(data.len() - at);
                    wire.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                    wire.extend_from_slice(&data[at..at + n]);
                    wire.extend_from_slice(b"\r\n");
                    at += n;
                }
                wire.extend_from_slice(b"0\r\n\r\n");
            }
            out.write_all(&wire).is_ok()
        }
        _ => {
            let body = format!("{} {} {}", req.method, req.target, req.body.len());
            let mut wire = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            if !head_only {
                wire.push_str(&body);
            }
            out.write_all(wire.as_bytes()).is_ok()
        }
    }
}

// ---------------------------------------------------------------------------------------
// The byte-exact client.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    Length,
    Chunked,
    /// Neither: the body ended with the connection.
    UntilClose,
}

/// One response as the client parsed it.
#[derive(Debug)]
struct Got {
    status: u16,
    head: String,
    /// Names lower-case.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    framing: Framing,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        lossy(&self.body)
    }
}

/// One client connection, read strictly by RFC 9112's framing rules.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(port: u16) -> Client {
        Client {
            s: TcpStream::connect(("127.0.0.1", port)).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// Writes `bytes` in one call (errors ignored: the gateway may have closed already;
    /// what it answered is still read).
    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        let _ = self.s.write_all(bytes.as_ref()).await;
    }

    /// Reads more; `false` when the gateway closed the connection.
    async fn fill(&mut self) -> bool {
        let mut chunk = vec![0u8; 64 * 1024];
        match tokio::time::timeout(DEADLINE, self.s.read(&mut chunk)).await {
            Err(_) => panic!(
                "the gateway neither sent anything nor closed the connection for {DEADLINE:?}; \
                 unparsed so far: {:?}",
                lossy(&self.buf)
            ),
            Ok(Ok(0) | Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn until(&mut self, pat: &[u8]) -> Vec<u8> {
        loop {
            if let Some(i) = find(&self.buf, pat) {
                return self.buf.drain(..i + pat.len()).collect();
            }
            assert!(
                self.fill().await,
                "closed before {:?}; unparsed: {:?}",
                lossy(pat),
                lossy(&self.buf)
            );
        }
    }

    async fn exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill().await,
                "closed after {} of {n} body bytes",
                self.buf.len()
            );
        }
        self.buf.drain(..n).collect()
    }

    /// The next response (an interim 1xx included). `head_request`: it answers a HEAD.
    async fn response(&mut self, head_request: bool) -> Got {
        let head = lossy(&self.until(b"\r\n\r\n").await);
        let mut lines = head.trim_end().split("\r\n");
        let status_line = lines.next().unwrap_or("");
        assert!(
            status_line.starts_with("HTTP/1.1 "),
            "not a status line: {head:?}"
        );
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {head:?}"));
        let headers = lines
            .map(|l| {
                let (k, v) = l
                    .split_once(':')
                    .unwrap_or_else(|| panic!("bad header line {l:?} in {head:?}"));
                (k.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        let mut got = Got {
            status,
            head,
            headers,
            body: Vec::new(),
            framing: Framing::Empty,
        };
        if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
            return got;
        }
        if let Some(te) = got.header("transfer-encoding") {
            assert!(te.eq_ignore_ascii_case("chunked"), "{}", got.head);
            assert!(
                got.header("content-length").is_none(),
                "both framings: {}",
                got.head
            );
            got.framing = Framing::Chunked;
            loop {
                let line = lossy(&self.until(b"\r\n").await);
                let digits = line.trim_end().split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(digits, 16)
                    .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
                if size == 0 {
                    while self.until(b"\r\n").await != b"\r\n" {}
                    break;
                }
                let data = self.exact(size).await;
                got.body.extend_from_slice(&data);
                assert_eq!(self.exact(2).await, b"\r\n", "chunk not ended by CRLF");
            }
        } else if let Some(n) = got.header("content-length") {
            let n = n
                .parse()
                .unwrap_or_else(|_| panic!("bad Content-Length: {}", got.head));
            got.framing = Framing::Length;
            got.body = self.exact(n).await;
        } else {
            got.framing = Framing::UntilClose;
            while self.fill().await {}
            got.body = std::mem::take(&mut self.buf);
        }
        got
    }

    /// Reads until the gateway closes the connection (hang guard: panics if it does not);
    /// returns what arrived that no response took.
    async fn rest(&mut self) -> String {
        while self.fill().await {}
        lossy(&std::mem::take(&mut self.buf))
    }
}

// ---------------------------------------------------------------------------------------
// The stack.
// ---------------------------------------------------------------------------------------

struct Env {
    gw: Gateway,
    up: RawUpstream,
    _idp: Idp,
}

impl Env {
    async fn start() -> Env {
        let idp = Idp::start(&[]).await;
        let up = RawUpstream::start();
        let gw = Gateway::start(GatewayOpts {
            extra: ROUTES.to_string(),
            ..GatewayOpts::new(free_port(), &idp, &up.url())
        })
        .await;
        Env { gw, up, _idp: idp }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.gw.port)
    }

    async fn client(&self) -> Client {
        Client::connect(self.gw.port).await
    }

    /// Sends `request` on a new connection: exactly one 400 comes back, then the close,
    /// and nothing reached the upstream.
    async fn assert_refused(&self, what: &str, request: &[u8]) {
        let before = self.up.count();
        let mut c = self.client().await;
        c.send(request).await;
        let r = c.response(false).await;
        assert_eq!(
            r.status,
            400,
            "{what}: {:?} answered {}{}",
            lossy(request),
            r.head,
            r.text()
        );
        let rest = c.rest().await;
        assert!(rest.is_empty(), "{what}: more after the 400: {rest:?}");
        assert_eq!(
            self.up.count(),
            before,
            "{what}: reached the upstream:\n{}",
            self.up.wire()
        );
    }

    /// `assert_refused` for each case, on the request `request` makes of it.
    async fn assert_each_refused(&self, cases: &[&str], request: impl Fn(&str) -> String) {
        for case in cases {
            self.assert_refused(&format!("{case:?}"), request(case).as_bytes())
                .await;
        }
    }
}

/// A keep-alive GET.
fn get(target: &str, host: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

// ---------------------------------------------------------------------------------------
// 1. Request smuggling.
// ---------------------------------------------------------------------------------------

/// Content-Length together with `Transfer-Encoding: chunked` (either order, a Content-Length
/// shorter or longer than the chunked body): the body is the chunked one, the client's
/// Content-Length never reaches the upstream, what follows the last chunk is never read as a
/// request, and the connection is closed after the one response.
#[tokio::test]
async fn content_length_with_chunked_is_read_as_chunked_then_closed() {
    let env = Env::start().await;
    let host = env.host();
    let hidden = format!("GET /hidden HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let body = format!("5\r\nhello\r\n0\r\n\r\n{hidden}");
    let mut case = 0;
    for te_first in [false, true] {
        for cl in [body.len(), 3, 5] {
            let target = format!("/smuggle/{case}");
            case += 1;
            let (first, second) = (
                "Transfer-Encoding: chunked".to_string(),
                format!("Content-Length: {cl}"),
            );
            let (a, b) = if te_first {
                (first, second)
            } else {
                (second, first)
            };
            let req = format!("POST {target} HTTP/1.1\r\nHost: {host}\r\n{a}\r\n{b}\r\n\r\n{body}");
            let before = env.up.count();
            let mut c = env.client().await;
            c.send(&req).await;
            let r = c.response(false).await;
            assert_eq!(r.status, 200, "{req:?}: {}", r.head);
            assert_eq!(r.text(), format!("POST {target} 5"), "{req:?}");
            let rest = c.rest().await;
            assert!(
                rest.is_empty(),
                "{req:?}: a second response on the connection: {rest:?}"
            );
            let reqs = env.up.settled().await;
            assert_eq!(
                reqs.len(),
                before + 1,
                "{req:?}: the upstream saw {:?}\n{}",
                env.up.targets(),
                env.up.wire()
            );
            let up = &reqs[before];
            assert_eq!(up.target, target);
            assert_eq!(up.state, BodyState::Complete);
            assert_eq!(up.body, b"hello", "{req:?}");
            let cl_up = up.header("content-length");
            assert!(
                cl_up.is_none() || cl_up == Some("5"),
                "{req:?}: the client's Content-Length reached the upstream: {up:?}"
            );
        }
    }
    assert!(
        !env.up.targets().iter().any(|t| t == "/hidden"),
        "{}",
        env.up.wire()
    );
}

/// Two Content-Length values that differ (two lines, either order, or one list) are refused
/// with 400 and nothing reaches the upstream.
#[tokio::test]
async fn differing_content_lengths_are_refused() {
    let env = Env::start().await;
    let host = env.host();
    env.assert_each_refused(
        &[
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: 6\r\nContent-Length: 5\r\n",
            "Content-Length: 5, 6\r\n",
            "Content-Length: 0\r\nContent-Length: 5\r\n",
        ],
        |lengths| format!("POST /cl2 HTTP/1.1\r\nHost: {host}\r\n{lengths}\r\nhello!"),
    )
    .await;
}

/// A Transfer-Encoding whose last coding is not `chunked` (the length of the body cannot be
/// known), or that names `chunked` twice, is refused with 400; nothing reaches the upstream.
#[tokio::test]
async fn transfer_encoding_not_ending_in_chunked_is_refused() {
    let env = Env::start().await;
    let host = env.host();
    env.assert_each_refused(
        &[
            "Transfer-Encoding: chunked, identity\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            "Transfer-Encoding: identity\r\n",
            "Transfer-Encoding: chunked, gzip\r\n",
            "Transfer-Encoding: gzip\r\nContent-Length: 16\r\n",
            "Transfer-Encoding: xchunked\r\n",
            "Transfer-Encoding: chunked, chunked\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ],
        |te| format!("POST /te HTTP/1.1\r\nHost: {host}\r\n{te}\r\n5\r\nhello\r\n0\r\n\r\n"),
    )
    .await;
    // `chunked` last, after a coding the gateway cannot undo: 501 (RFC 9112 §6.1).
    for te in ["identity, chunked", "gzip, chunked"] {
        let mut c = env.client().await;
        c.send(format!(
            "POST /te HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: {te}\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n"
        ))
        .await;
        let r = c.response(false).await;
        assert_eq!(r.status, 501, "{te}: {}{}", r.head, r.text());
        assert!(c.rest().await.is_empty());
    }
    assert_eq!(env.up.count(), 0, "{}", env.up.wire());
}

/// Transfer-Encoding in an HTTP/1.0 request (which has no chunked framing) is refused with
/// 400, with or without a Content-Length; nothing reaches the upstream.
#[tokio::test]
async fn transfer_encoding_in_http10_is_refused() {
    let env = Env::start().await;
    let host = env.host();
    env.assert_each_refused(&["", "Content-Length: 16\r\n"], |extra| {
        format!(
            "POST /ten HTTP/1.0\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n{extra}\r\n\
             5\r\nhello\r\n0\r\n\r\n"
        )
    })
    .await;
}

/// Content-Length is digits only: a sign, inner spaces, a list, hex or letters get 400;
/// nothing reaches the upstream.
#[tokio::test]
async fn malformed_content_length_is_refused() {
    let env = Env::start().await;
    let host = env.host();
    env.assert_each_refused(
        &[
            "+5",
            "-5",
            "5 5",
            "5, 5",
            "0x5",
            "5a",
            "",
            "99999999999999999999999",
        ],
        |value| {
            format!("POST /cl HTTP/1.1\r\nHost: {host}\r\nContent-Length: {value}\r\n\r\nhello")
        },
    )
    .await;
}

/// A chunked body whose framing breaks (bad size line, bare LF, more data than the size,
/// an overflowing size) never reaches the upstream as a complete request: the upstream's
/// copy is cut, the client gets no success, the connection is closed, and the request
/// written after it is never served.
#[tokio::test]
async fn invalid_chunk_framing_never_completes_upstream() {
    let env = Env::start().await;
    let host = env.host();
    let after = get("/after-bad-chunk", &host);
    for (i, chunks) in [
        "zz\r\nhello\r\n0\r\n\r\n",
        "5\r\nhello\r\nzz\r\nhello\r\n0\r\n\r\n",
        "0x5\r\nhello\r\n0\r\n\r\n",
        "-5\r\nhello\r\n0\r\n\r\n",
        "5\nhello\r\n0\r\n\r\n",
        "5\r\nhello\n0\r\n\r\n",
        "3\r\nhello\r\n0\r\n\r\n",
        "\r\nhello\r\n0\r\n\r\n",
        "fffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        "5\r\nhello\r\n0\r\n\n",
    ]
    .iter()
    .enumerate()
    {
        let target = format!("/bad-chunk/{i}");
        let req = format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n\
             {chunks}{after}"
        );
        let mut c = env.client().await;
        c.send(&req).await;
        let got = c.rest().await;
        let responses = got.matches("HTTP/1.1 ").count();
        assert!(
            responses <= 1,
            "{chunks:?}: more than one response: {got:?}"
        );
        if responses == 1 {
            assert!(
                !got.starts_with("HTTP/1.1 2"),
                "{chunks:?}: a broken body was answered with success: {got:?}"
            );
        }
        let reqs = env.up.settled().await;
        for r in reqs.iter().filter(|r| r.target == target) {
            assert_ne!(
                r.state,
                BodyState::Complete,
                "{chunks:?}: the upstream got a complete request: {r:?}\n{}",
                env.up.wire()
            );
        }
    }
    assert!(
        !env.up.targets().iter().any(|t| t == "/after-bad-chunk"),
        "{}",
        env.up.wire()
    );
    let mut gw = env.gw;
    gw.assert_healthy().await;
}

// ---------------------------------------------------------------------------------------
// 2-6. Keep-alive, pipelining, bodies, 100 Continue, HTTP/1.0, HEAD.
// ---------------------------------------------------------------------------------------

/// Requests pipelined in one write (with a body in the middle, and one the gateway answers
/// itself) are each served, and answered in order on the same connection.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let env = Env::start().await;
    let host = env.host();
    let mut c = env.client().await;
    let batch = format!(
        "{}POST /pipe/2 HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\nhello{}{}{}",
        get("/pipe/1", &host),
        get("/healthz", &host),
        get("/pipe/3", &host),
        get("/pipe/4?q=1", &host),
    );
    c.send(&batch).await;
    let want = [
        "GET /pipe/1 0",
        "POST /pipe/2 5",
        "ok\n",
        "GET /pipe/3 0",
        "GET /pipe/4?q=1 0",
    ];
    for w in want {
        let r = c.response(false).await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(r.text(), w);
    }
    // Still open: one more.
    c.send(get("/pipe/5", &host)).await;
    assert_eq!(c.response(false).await.text(), "GET /pipe/5 0");
    let reqs = env.up.settled().await;
    let targets: Vec<&str> = reqs.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(
        targets,
        ["/pipe/1", "/pipe/2", "/pipe/3", "/pipe/4?q=1", "/pipe/5"]
    );
    assert_eq!(reqs[1].body, b"hello");
}

/// A client that pipelines without end (and reads no answer) is not read ahead of: the
/// gateway takes the next request when it has answered the last, so the client's writes stop
/// once the sockets' buffers are full, and the gateway's memory stays bounded. (It read on
/// while a request was with the upstream, a buffer's worth each time: gigabytes a minute.)
#[tokio::test]
async fn an_endless_pipeline_is_not_read_ahead() {
    const OFFERED: usize = 128 << 20;
    let env = Env::start().await;
    let batch = get("/pipe/x", &env.host()).repeat(2000).into_bytes();
    let c = env.client().await;
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = written.clone();
    let writer = tokio::spawn(async move {
        let mut c = c;
        while counter.load(std::sync::atomic::Ordering::Relaxed) < OFFERED {
            if c.s.write_all(&batch).await.is_err() {
                break;
            }
            counter.fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
        }
        c
    });
    // Until the writes stop moving (or all of it went: the failure).
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = written.load(std::sync::atomic::Ordering::Relaxed);
        if now == last || now >= OFFERED {
            break;
        }
        last = now;
    }
    let taken = written.load(std::sync::atomic::Ordering::Relaxed);
    let rss = rss_kib(env.gw.pid());
    writer.abort();
    assert!(
        taken < 32 << 20,
        "the gateway took {} MiB of pipelined requests it had not answered",
        taken >> 20
    );
    assert!(rss < 200 << 10, "the gateway holds {} MiB", rss >> 10);
    // Other clients are served meanwhile.
    let mut other = env.client().await;
    other.send(get("/after", &env.host())).await;
    assert_eq!(other.response(false).await.text(), "GET /after 0");
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A Content-Length body and a chunked body (extensions, trailers, sent in pieces) reach
/// the upstream byte for byte, and the keep-alive connection then serves the next request.
#[tokio::test]
async fn request_bodies_reach_the_upstream_whole_and_keep_alive_continues() {
    let env = Env::start().await;
    let host = env.host();
    let data = pattern(200_000);
    let mut c = env.client().await;

    // Content-Length, the body in three writes.
    c.send(format!(
        "POST /body/cl HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\n\r\n",
        data.len()
    ))
    .await;
    for piece in data.chunks(70_000) {
        c.send(piece).await;
    }
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), format!("POST /body/cl {}", data.len()));

    // Chunked: uneven chunks, an extension, a trailer section; framing split across writes.
    let mut wire = Vec::new();
    let mut at = 0;
    for (i, size) in [1usize, 0x10, 4095, 65_536, 130_352].iter().enumerate() {
        let ext = if i == 1 { ";name=value" } else { "" };
        wire.extend_from_slice(format!("{size:X}{ext}\r\n").as_bytes());
        wire.extend_from_slice(&data[at..at + size]);
        wire.extend_from_slice(b"\r\n");
        at += size;
    }
    assert_eq!(at, data.len());
    wire.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
    c.send(format!(
        "PUT /body/chunked HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ))
    .await;
    for piece in wire.chunks(33_333) {
        c.send(piece).await;
    }
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), format!("PUT /body/chunked {}", data.len()));

    // The same connection serves the next request.
    c.send(get("/body/next", &host)).await;
    let r = c.response(false).await;
    assert_eq!(r.text(), "GET /body/next 0");

    let reqs = env.up.settled().await;
    assert_eq!(reqs.len(), 3, "{:?}", env.up.targets());
    assert_eq!(reqs[0].target, "/body/cl");
    assert_eq!(reqs[0].state, BodyState::Complete);
    assert!(reqs[0].body == data, "Content-Length body differs upstream");
    assert_eq!(reqs[1].target, "/body/chunked");
    assert_eq!(reqs[1].state, BodyState::Complete);
    assert!(reqs[1].body == data, "chunked body differs upstream");
    assert!(reqs[2].body.is_empty());
}

/// `Expect: 100-continue`: the client gets `100 Continue` before it sends the body, then
/// the final response; the upstream gets the body; the connection goes on.
#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body() {
    let env = Env::start().await;
    let host = env.host();
    let mut c = env.client().await;
    for (target, framing, body) in [
        ("/continue/cl", "Content-Length: 11", &b"hello world"[..]),
        (
            "/continue/chunked",
            "Transfer-Encoding: chunked",
            &b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"[..],
        ),
    ] {
        c.send(format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\n{framing}\r\nExpect: 100-continue\r\n\r\n"
        ))
        .await;
        let r = c.response(false).await;
        assert_eq!(r.status, 100, "{target}: {}{}", r.head, r.text());
        assert!(
            r.head.starts_with("HTTP/1.1 100 Continue\r\n"),
            "{}",
            r.head
        );
        c.send(body).await;
        let r = c.response(false).await;
        assert_eq!(r.status, 200, "{target}: {}", r.head);
        assert_eq!(r.text(), format!("POST {target} 11"));
    }
    c.send(get("/continue/next", &host)).await;
    assert_eq!(c.response(false).await.text(), "GET /continue/next 0");
    // HTTP/1.0 knows no 1xx (RFC 9110 §10.1.1, §15.2): the expectation is ignored, the
    // answer is the final one, and the upstream is not asked to meet it either.
    let mut ten = env.client().await;
    ten.send(format!(
        "POST /continue/ten HTTP/1.0\r\nHost: {host}\r\nContent-Length: 5\r\n\
         Expect: 100-continue\r\n\r\nhello"
    ))
    .await;
    let r = ten.response(false).await;
    assert_eq!(r.status, 200, "{}{}", r.head, r.text());
    assert_eq!(r.text(), "POST /continue/ten 5");
    let reqs = env.up.settled().await;
    assert_eq!(reqs.len(), 4, "{:?}", env.up.targets());
    assert_eq!(reqs[0].body, b"hello world");
    assert_eq!(reqs[1].body, b"hello world");
    assert_eq!(reqs[0].header("expect"), Some("100-continue"));
    assert_eq!(reqs[3].header("expect"), None, "{:?}", reqs[3]);
}

/// HTTP/1.0: without `Connection: keep-alive` the connection closes after the response;
/// with it, the response says keep-alive and the connection serves another request.
#[tokio::test]
async fn http10_closes_unless_keep_alive_is_asked() {
    let env = Env::start().await;
    let host = env.host();

    let mut c = env.client().await;
    c.send(format!("GET /ten/close HTTP/1.0\r\nHost: {host}\r\n\r\n"))
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.text(), "GET /ten/close 0");
    assert_ne!(
        r.header("connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("keep-alive"),
        "{}",
        r.head
    );
    let rest = c.rest().await;
    assert!(rest.is_empty(), "{rest:?}");

    let mut c = env.client().await;
    for i in 1..=2 {
        c.send(format!(
            "GET /ten/ka/{i} HTTP/1.0\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n"
        ))
        .await;
        let r = c.response(false).await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(r.text(), format!("GET /ten/ka/{i} 0"));
        assert_eq!(
            r.header("connection")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("keep-alive"),
            "{}",
            r.head
        );
    }
    // A last one without keep-alive: served, then closed.
    c.send(format!("GET /ten/last HTTP/1.0\r\nHost: {host}\r\n\r\n"))
        .await;
    assert_eq!(c.response(false).await.text(), "GET /ten/last 0");
    let rest = c.rest().await;
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(
        env.up.targets(),
        ["/ten/close", "/ten/ka/1", "/ten/ka/2", "/ten/last"]
    );
}

/// A response to HEAD carries no body bytes: the response pipelined after it parses right
/// after its head (proxied HEADs, a chunked one, and one the gateway answers itself).
#[tokio::test]
async fn head_responses_have_no_body() {
    let env = Env::start().await;
    let host = env.host();
    let head = |t: &str| format!("HEAD {t} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut c = env.client().await;
    c.send(format!(
        "{}{}{}{}{}{}",
        head("/head/1"),
        get("/head/2", &host),
        head("/healthz"),
        get("/healthz", &host),
        head("/chunked"),
        get("/head/3", &host),
    ))
    .await;
    let r = c.response(true).await;
    assert_eq!(r.status, 200, "{}", r.head);
    // The length the upstream declared for the HEAD is passed on.
    let declared = "HEAD /head/1 0".len().to_string();
    assert_eq!(
        r.header("content-length"),
        Some(declared.as_str()),
        "{}",
        r.head
    );
    assert_eq!(c.response(false).await.text(), "GET /head/2 0");
    let r = c.response(true).await;
    assert_eq!(r.status, 200, "{}", r.head);
    let r = c.response(false).await;
    assert_eq!(r.text(), "ok\n");
    let r = c.response(true).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(c.response(false).await.text(), "GET /head/3 0");
    let reqs = env.up.settled().await;
    let seen: Vec<(&str, &str)> = reqs
        .iter()
        .map(|r| (r.method.as_str(), r.target.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("HEAD", "/head/1"),
            ("GET", "/head/2"),
            ("HEAD", "/chunked"),
            ("GET", "/head/3")
        ]
    );
}

/// RFC 9110 §8.6: a Content-Length on a HEAD response must be the length the GET would
/// have had. The upstream answers HEAD /chunked with `Transfer-Encoding: chunked` (length
/// unknown; the GET has [`BIG`] bytes): the gateway must not invent a length.
///
/// Regression: the first version of src/server/h1/codec.rs `encode_head` took the empty body
/// of the upstream's HEAD answer as the length and sent `content-length: 0` (hyper's server
/// never adds an implicit `content-length: 0` to a HEAD response).
#[tokio::test]
async fn head_of_a_chunked_resource_does_not_claim_a_length() {
    let env = Env::start().await;
    let host = env.host();
    let mut c = env.client().await;
    c.send(format!("HEAD /chunked HTTP/1.1\r\nHost: {host}\r\n\r\n"))
        .await;
    let r = c.response(true).await;
    assert_eq!(r.status, 200, "{}", r.head);
    let big = BIG.to_string();
    let cl = r.header("content-length");
    assert!(
        cl.is_none() || cl == Some(big.as_str()),
        "HEAD claims a length the GET does not have ({BIG} bytes): {}",
        r.head
    );
    c.send(get("/chunked", &host)).await;
    let r = c.response(false).await;
    assert_eq!(r.body.len(), BIG);
}

// ---------------------------------------------------------------------------------------
// 7. Responses of unknown length.
// ---------------------------------------------------------------------------------------

/// An upstream answer of unknown length (HTTP/1.0 style, ended by closing; or chunked)
/// reaches an HTTP/1.1 client chunked and complete, on a connection that goes on.
#[tokio::test]
async fn unknown_length_answers_reach_http11_clients_chunked() {
    let env = Env::start().await;
    let host = env.host();
    let want = pattern(BIG);
    let mut c = env.client().await;
    for target in ["/until-close", "/chunked", "/until-close"] {
        c.send(get(target, &host)).await;
        let r = c.response(false).await;
        assert_eq!(r.status, 200, "{target}: {}", r.head);
        assert_eq!(r.framing, Framing::Chunked, "{target}: {}", r.head);
        assert_eq!(r.body.len(), want.len(), "{target}");
        assert!(r.body == want, "{target}: the body differs");
    }
    c.send(get("/after", &host)).await;
    assert_eq!(c.response(false).await.text(), "GET /after 0");
}

/// The same answers reach an HTTP/1.0 client (which cannot read chunked) whole, delimited
/// by the gateway closing the connection, even if it asked for keep-alive.
#[tokio::test]
async fn unknown_length_answers_reach_http10_clients_until_close() {
    let env = Env::start().await;
    let host = env.host();
    let want = pattern(BIG);
    for target in ["/until-close", "/chunked"] {
        for keep_alive in ["", "Connection: keep-alive\r\n"] {
            let mut c = env.client().await;
            c.send(format!(
                "GET {target} HTTP/1.0\r\nHost: {host}\r\n{keep_alive}\r\n"
            ))
            .await;
            let r = c.response(false).await;
            assert_eq!(r.status, 200, "{target}: {}", r.head);
            assert_eq!(
                r.framing,
                Framing::UntilClose,
                "{target} {keep_alive:?}: {}",
                r.head
            );
            assert!(
                !r.head.to_ascii_lowercase().contains("keep-alive"),
                "{target}: {}",
                r.head
            );
            assert_eq!(r.body.len(), want.len(), "{target} {keep_alive:?}");
            assert!(r.body == want, "{target}: the body differs");
        }
    }
}

// ---------------------------------------------------------------------------------------
// 8. Bodies the gateway does not read.
// ---------------------------------------------------------------------------------------

/// A request answered without its body being read (a 401 on an `auth: api` route): the
/// answer arrives, and the bytes of the body (here: a complete request) are never parsed as
/// a request; the connection is closed. With `Expect: 100-continue`, no 100 is sent.
#[tokio::test]
async fn unread_bodies_are_never_parsed_as_requests() {
    let env = Env::start().await;
    let host = env.host();
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let requests = [
        format!(
            "POST /api/cl HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        ),
        format!(
            "POST /api/chunked HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{smuggled}\r\n0\r\n\r\n",
            smuggled.len()
        ),
        // A big body, most of it not yet sent when the answer comes.
        format!(
            "PUT /api/big HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len() + 1_000_000
        ),
    ];
    for req in &requests {
        let mut c = env.client().await;
        c.send(req).await;
        let r = c.response(false).await;
        assert_eq!(r.status, 401, "{req:?}: {}", r.head);
        if req.starts_with("PUT") {
            c.send(vec![b'x'; 1_000_000]).await;
        }
        let rest = c.rest().await;
        assert!(rest.is_empty(), "{req:?}: a second response: {rest:?}");
    }

    // Expect: 100-continue, answered at once: 401, not 100; the body sent anyway is dropped.
    let mut c = env.client().await;
    c.send(format!(
        "POST /api/expect HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\n\r\n",
        smuggled.len()
    ))
    .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 401, "{}", r.head);
    c.send(&smuggled).await;
    let rest = c.rest().await;
    assert!(rest.is_empty(), "a second response: {rest:?}");

    assert_eq!(env.up.count(), 0, "{}", env.up.wire());
}

// ---------------------------------------------------------------------------------------
// 9. Malformed heads.
// ---------------------------------------------------------------------------------------

/// Request lines and header lines that break RFC 9112's syntax (whitespace before the
/// colon, control characters, a missing version, obs-fold, a line without a colon...) get
/// 400 and the close; the valid request written after them is never served.
#[tokio::test]
async fn malformed_heads_are_refused() {
    let env = Env::start().await;
    let host = env.host();
    let after = get("/after-bad-head", &host);
    let cases: Vec<(&str, String)> = vec![
        (
            "space before colon",
            format!("GET /x HTTP/1.1\r\nHost : {host}\r\n\r\n"),
        ),
        (
            "tab before colon",
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\nX-A\t: b\r\n\r\n"),
        ),
        (
            "control character in a value",
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\nX-A: a\x01b\r\n\r\n"),
        ),
        (
            "DEL in a value",
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\nX-A: a\x7fb\r\n\r\n"),
        ),
        (
            "NUL in a value",
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\nX-A: a\x00b\r\n\r\n"),
        ),
        (
            "bare CR in a value",
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\nX-A: a\rb\r\n\r\n"),
        ),
        (
            "control character in a name",
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\nX\x01A: b\r\n\r\n"),
        ),
        ("missing version", format!("GET /x\r\nHost: {host}\r\n\r\n")),
        (
            "unknown version",
            format!("GET /x HTTP/2.0\r\nHost: {host}\r\n\r\n"),
        ),
        (
            "lower-case version",
            format!("GET /x http/1.1\r\nHost: {host}\r\n\r\n"),
        ),
        (
            "obs-fold",
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\nX-A: a\r\n b\r\n\r\n"),
        ),
        (
            "obs-fold with a tab",
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\nX-A: a\r\n\tb\r\n\r\n"),
        ),
        (
            "first header line indented",
            format!("GET /x HTTP/1.1\r\n Host: {host}\r\n\r\n"),
        ),
        (
            "header line without a colon",
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\nNoColon\r\n\r\n"),
        ),
        (
            "empty header name",
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\n: v\r\n\r\n"),
        ),
        (
            "two spaces in the request line",
            format!("GET  /x HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        ),
        (
            "space in the target",
            format!("GET /x y HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        ),
        (
            "control character in the target",
            format!("GET /x\x01y HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        ),
        (
            "bad method character",
            format!("G(T /x HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        ),
    ];
    for (what, req) in &cases {
        let bytes = [req.as_bytes(), after.as_bytes()].concat();
        env.assert_refused(what, &bytes).await;
    }
    let mut gw = env.gw;
    gw.assert_healthy().await;
}

/// RFC 9112 §3.2: an HTTP/1.1 request with more than one Host line gets 400.
///
/// Regression: the first version of src/server/h1/codec.rs served it, routed by the first
/// Host, and the upstream got both Host lines: an upstream that takes the last one sees
/// another site than the one the route (`host:`) was chosen for.
#[tokio::test]
async fn repeated_host_is_refused() {
    let env = Env::start().await;
    let host = env.host();
    env.assert_each_refused(&["evil.test", &host], |second| {
        format!("GET /twohosts HTTP/1.1\r\nHost: {host}\r\nHost: {second}\r\n\r\n")
    })
    .await;
    // Control: one Host is served.
    let mut c = env.client().await;
    c.send(get("/onehost", &host)).await;
    assert_eq!(c.response(false).await.text(), "GET /onehost 0");
}

/// RFC 9112 §3.2: an HTTP/1.1 request without a Host gets 400 (HTTP/1.0 may omit it).
///
/// Regression: the first version of src/server/h1/codec.rs served it.
#[tokio::test]
async fn missing_host_in_http11_is_refused() {
    let env = Env::start().await;
    env.assert_refused("no Host", b"GET /nohost HTTP/1.1\r\n\r\n")
        .await;
    // Control: HTTP/1.0 without Host is served, and the upstream gets its own authority as
    // Host (and no X-Forwarded-Host: the client named none).
    let mut c = env.client().await;
    c.send("GET /nohost10 HTTP/1.0\r\n\r\n").await;
    assert_eq!(c.response(false).await.text(), "GET /nohost10 0");
    let reqs = env.up.requests();
    let got = reqs.last().unwrap();
    let authority = format!("127.0.0.1:{}", env.up.port);
    assert_eq!(got.header("host"), Some(authority.as_str()), "{got:?}");
    assert_eq!(got.header("x-forwarded-host"), None, "{got:?}");
    assert_eq!(got.header("x-forwarded-for"), Some("127.0.0.1"), "{got:?}");
}

/// RFC 9110 §15.5.15: a request target longer than the gateway accepts gets `414 URI Too
/// Long` (not 431, which is about header fields), with the security headers every refusal
/// of the HTTP/1 parser carries, and the connection closes.
///
/// Regression: a 100 KB target got 431, the answer to a head whose header fields are too
/// large (`limits.max_header_bytes`, 64 KiB here, was reached inside the request line).
#[tokio::test]
async fn an_overlong_request_target_gets_414() {
    let env = Env::start().await;
    let host = env.host();
    let before = env.up.count();
    for target in [
        format!("/{}", "u".repeat(100_000)),
        format!("/search?q={}", "q".repeat(70_000)),
    ] {
        let mut c = env.client().await;
        c.send(get(&target, &host)).await;
        let r = c.response(false).await;
        assert_eq!(r.status, 414, "{} bytes: {}", target.len(), r.head);
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{}",
            r.head
        );
        assert_eq!(r.header("cache-control"), Some("no-store"), "{}", r.head);
        assert_eq!(r.header("connection"), Some("close"), "{}", r.head);
        assert!(c.rest().await.is_empty());
    }
    // Header fields over the limit after a short target are still 431.
    let mut c = env.client().await;
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: {host}\r\nX-Big: {}\r\n\r\n",
        "b".repeat(70_000)
    );
    c.send(big).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 431, "{}", r.head);
    assert_eq!(
        r.header("x-content-type-options"),
        Some("nosniff"),
        "{}",
        r.head
    );
    assert_eq!(env.up.count(), before, "{}", env.up.wire());
    // The gateway serves on.
    let mut c = env.client().await;
    c.send(get("/after-414", &host)).await;
    assert_eq!(c.response(false).await.text(), "GET /after-414 0");
}
