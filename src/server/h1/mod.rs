//! The HTTP/1.1 side of the listener: one task per client connection reads request heads,
//! hands requests to the service, and writes responses, with the body framing of RFC 9112.
//!
//! Why not hyper's server here (hyper still serves HTTP/2 and makes every upstream and provider
//! call): hyper keeps 16 KiB of buffers for the whole life of a keep-alive connection, idle or
//! not, which is most of what 10,000 idle clients cost. This connection reads into a buffer
//! only when data is there, gives it back when it goes idle, and writes each response head and
//! its first body bytes in one system call.
//!
//! The header-read deadline is lazy: one timer per connection, re-armed when it fires if a
//! response was completed since the last time, so a client gets between one and two times
//! `timeouts.header_read` to send each request head (bytes alone do not count: a slowloris
//! sends bytes). A `timeouts.idle` shorter than that bounds the wait of an idle keep-alive
//! connection: the deadline is then set afresh after each response.

pub mod codec;
pub mod io;

use crate::body::Body;
use bytes::{Buf, Bytes, BytesMut};
use codec::{encode_head, BodyKind, ChunkedDecoder, Decoded, Framing, Head};
use http::{Request, Response, StatusCode, Version};
use http_body::Body as _;
use io::{
    body_channel, give_back, take_buffer, BodySender, ClientBodyError, Demand, Rewound, Transport,
    READ_BUF,
};
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Reads of a request body take up to this much at a time.
const BODY_READ: usize = 64 * 1024;
/// After answering a request whose body was not read to the end, the rest is read and
/// dropped for a while before closing, so the client sees the answer rather than a reset.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 * 1024 * 1024;

/// Connection-level settings, from the config at start-up.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_headers: usize,
    pub max_head_bytes: usize,
    pub header_read: Duration,
    /// How long a keep-alive connection waits for its next request: `header_read`, or
    /// `timeouts.idle` when that is shorter.
    pub keep_alive: Duration,
    /// How long a client may stall mid-exchange: send no byte of a body the gateway is
    /// reading, or take no byte of the answer.
    pub idle: Duration,
    /// Where requests refused before reaching the service are counted and logged.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The request id header (echoed on every response): names a request whose upstream
    /// response body failed.
    pub request_id: http::HeaderName,
}

/// Tells idle connections to close, and counts the open ones, when the server drains.
pub struct Drain {
    draining: AtomicBool,
    /// Sharded so that connections waiting for their next request do not share one lock.
    wake: Vec<Arc<Notify>>,
    open: AtomicUsize,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            draining: AtomicBool::new(false),
            wake: (0..16).map(|_| Arc::new(Notify::new())).collect(),
            open: AtomicUsize::new(0),
        }
    }
}

impl Drain {
    pub fn start(&self) {
        self.draining.store(true, Ordering::SeqCst);
        for n in &self.wake {
            n.notify_waiters();
        }
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Counts a connection as open until the guard drops.
    pub fn hold(self: &Arc<Self>) -> impl Drop {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.clone())
    }

    /// Resolves when draining starts (from the moment it is created, polled or not).
    pub fn notified(&self, id: usize) -> tokio::sync::futures::OwnedNotified {
        self.wake[id % self.wake.len()].clone().notified_owned()
    }
}

/// How a connection ended.
pub enum Outcome<T> {
    Closed,
    /// The client spoke HTTP/2 with prior knowledge: for the HTTP/2 server, preface included.
    Http2(Rewound<T>),
    /// Upgraded: the connection lives on in a tunnel, until this resolves.
    Tunnel(tokio::sync::oneshot::Receiver<()>),
}

struct OpenGuard(Arc<Drain>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why the connection stops.
enum Stop {
    /// Quietly: closed by the client, timed out, drained, or a write failed.
    Now,
    /// After answering with this status.
    Refuse(StatusCode),
    /// After the response: close, reading what the client still sends for a while.
    Linger,
}

struct Conn<T> {
    io: T,
    rbuf: BytesMut,
    wbuf: BytesMut,
    settings: Arc<Settings>,
    /// The header-read deadline between requests; during an exchange, the stall deadline.
    deadline: Pin<Box<Sleep>>,
    stall: Stall,
    /// Responses completed, and their number when the deadline last fired.
    completed: u64,
    completed_at_check: u64,
    drain: Arc<Drain>,
    drained: Pin<Box<tokio::sync::futures::OwnedNotified>>,
    /// The client's address, for the log line of a request the parser refuses.
    peer: std::net::IpAddr,
}

/// Whether the deadline currently measures a stalled client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stall {
    /// No: it is the header-read deadline.
    Off,
    /// Yes, since the client's last progress.
    Armed,
    /// It was, but the client made progress since: re-armed at the next wait.
    Progressed,
}

/// Reads a request body from the connection for its [`io::RequestBody`].
struct Feed {
    sender: BodySender,
    decoder: BodyDecoder,
    /// `100 Continue` still to be written (bytes already written).
    continue_at: Option<usize>,
}

enum BodyDecoder {
    Length(u64),
    Chunked(ChunkedDecoder),
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl Feed {
    /// The request's body and the connection's end of it.
    fn start(decoder: BodyDecoder, expect_continue: bool) -> (Body, Option<Feed>) {
        let length = match decoder {
            BodyDecoder::Length(n) => Some(n),
            BodyDecoder::Chunked(_) => None,
        };
        let (sender, body) = body_channel(length);
        let feed = Feed {
            sender,
            decoder,
            continue_at: expect_continue.then_some(0),
        };
        (Body::Client(body), Some(feed))
    }
}

/// Serves HTTP/1.1 on `io` until the client leaves, a limit is hit, or the server drains.
pub async fn serve<T, S, F>(
    io: T,
    mut service: S,
    settings: Arc<Settings>,
    drain: Arc<Drain>,
    id: usize,
    peer: std::net::IpAddr,
) -> Outcome<T>
where
    T: Transport,
    S: FnMut(Request<Body>) -> F,
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    let _open = drain.hold();
    let shard = drain.wake[id % drain.wake.len()].clone();
    let mut conn = Conn {
        io,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        deadline: Box::pin(tokio::time::sleep(settings.header_read)),
        stall: Stall::Off,
        settings,
        completed: 0,
        completed_at_check: 0,
        drained: Box::pin(shard.notified_owned()),
        drain,
        peer,
    };
    let mut first = true;
    loop {
        let head = match conn.read_head(first).await {
            Ok(Some(h)) => h,
            Ok(None) => {
                let Conn { io, rbuf, .. } = conn;
                return Outcome::Http2(Rewound::new(rbuf.freeze(), io));
            }
            Err(stop) => {
                conn.stop(stop).await;
                return Outcome::Closed;
            }
        };
        first = false;
        match conn.exchange(head, &mut service).await {
            Ok(Next::KeepAlive) => {}
            Ok(Next::Upgrade(tx)) => {
                let Conn { io, rbuf, .. } = conn;
                let (io, released) = Rewound::handed_on(rbuf.freeze(), Box::new(io) as _);
                // Not taken (the request is gone): dropped here, which releases at once.
                let _ = tx.send(io);
                return Outcome::Tunnel(released);
            }
            Err(stop) => {
                conn.stop(stop).await;
                return Outcome::Closed;
            }
        }
    }
}

enum Next {
    KeepAlive,
    Upgrade(tokio::sync::oneshot::Sender<io::Upgraded>),
}

impl<T: Transport> Conn<T> {
    /// The next request head; `None`: the HTTP/2 preface (first thing on a connection only).
    async fn read_head(&mut self, first: bool) -> Result<Option<Head>, Stop> {
        loop {
            if !self.rbuf.is_empty() {
                if first && self.rbuf.len() >= H2_PREFACE.len() && self.rbuf.starts_with(H2_PREFACE)
                {
                    return Ok(None);
                }
                let partial_preface = first
                    && self.rbuf.len() < H2_PREFACE.len()
                    && H2_PREFACE.starts_with(&self.rbuf);
                if !partial_preface {
                    match codec::parse_head(
                        &mut self.rbuf,
                        self.settings.max_headers,
                        self.settings.max_head_bytes,
                    ) {
                        Ok(Some(head)) => return Ok(Some(head)),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::debug!(error = ?e, "bad request head");
                            self.settings.metrics.refused(e.status(), self.peer);
                            return Err(Stop::Refuse(e.status()));
                        }
                    }
                }
            }
            poll_fn(|cx| self.poll_fill(cx)).await?;
        }
    }

    /// Reads more of a request head, within the header-read deadline.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Stop>> {
        if self.rbuf.is_empty() {
            // Between requests: where draining closes the connection.
            if self.drain.draining.load(Ordering::Relaxed) {
                return Poll::Ready(Err(Stop::Now));
            }
            if T::WAITS_WITHOUT_BUFFER && self.rbuf.capacity() == 0 {
                match self.io.poll_read_ready(cx) {
                    Poll::Pending => return self.poll_wait(cx),
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(error = e.to_string().as_str(), "client connection failed");
                        return Poll::Ready(Err(Stop::Now));
                    }
                    Poll::Ready(Ok(())) => self.rbuf = take_buffer(),
                }
            }
        }
        if self.rbuf.capacity() == self.rbuf.len() {
            self.rbuf.reserve(READ_BUF);
        }
        match poll_read_buf(&mut self.io, cx, &mut self.rbuf) {
            Poll::Ready(Ok(0)) => Poll::Ready(Err(Stop::Now)),
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = e.to_string().as_str(), "client connection failed");
                Poll::Ready(Err(Stop::Now))
            }
            Poll::Pending => {
                if T::WAITS_WITHOUT_BUFFER && self.rbuf.is_empty() {
                    // Idle: hold no buffer while waiting (the next read waits for readiness).
                    give_back(std::mem::take(&mut self.rbuf));
                    self.wbuf.clear();
                    give_back(std::mem::take(&mut self.wbuf));
                }
                self.poll_wait(cx)
            }
        }
    }

    /// Before waiting for the client: the header-read deadline and, between requests, the
    /// drain are watched. Only here: a head that is already there costs no timer or lock.
    fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Stop>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            if self.completed == self.completed_at_check {
                tracing::debug!("request head not received in time");
                return Poll::Ready(Err(Stop::Now));
            }
            self.completed_at_check = self.completed;
            let next = Instant::now() + self.settings.header_read;
            self.deadline.as_mut().reset(next);
            let _ = self.deadline.as_mut().poll(cx);
        }
        if self.rbuf.is_empty() && self.drained.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Stop::Now));
        }
        Poll::Pending
    }

    /// One request and its response.
    async fn exchange<S, F>(&mut self, head: Head, service: &mut S) -> Result<Next, Stop>
    where
        S: FnMut(Request<Body>) -> F,
        F: Future<Output = Result<Response<Body>, Infallible>>,
    {
        let Head {
            request,
            framing,
            mut keep_alive,
            expect_continue,
            upgrade,
        } = head;
        let http11 = request.version() == Version::HTTP_11;
        let head_request = request.method() == http::Method::HEAD;
        let (body, mut feed) = match framing {
            Framing::None | Framing::Length(0) => (Body::Empty, None),
            Framing::Length(n) => Feed::start(BodyDecoder::Length(n), expect_continue),
            Framing::Chunked => Feed::start(
                BodyDecoder::Chunked(ChunkedDecoder::new(self.settings.max_head_bytes)),
                expect_continue,
            ),
        };
        let mut request = request.map(|()| body);
        *request.extensions_mut() = io::take_extensions();
        let mut upgrade_tx = None;
        if upgrade {
            let (tx, rx) = tokio::sync::oneshot::channel();
            request.extensions_mut().insert(io::ClientUpgrade::new(rx));
            upgrade_tx = Some(tx);
        }
        // Until the body has been read to its end, what follows it on the connection cannot
        // be read as a next request.
        let mut body_complete = feed.is_none();
        let mut watch = T::WAITS_WITHOUT_BUFFER;
        let mut response = std::pin::pin!(service(request));
        let response = poll_fn(|cx| {
            if let Poll::Ready(r) = response.as_mut().poll(cx) {
                return Poll::Ready(Ok(r));
            }
            if let Some(f) = feed.as_mut() {
                if let Poll::Ready(complete) = self.poll_feed(cx, f) {
                    body_complete = complete;
                    feed = None;
                }
            }
            if feed.is_none() && body_complete && watch {
                match self.poll_client_gone(cx) {
                    Poll::Ready(true) => return Poll::Ready(Err(Stop::Now)),
                    Poll::Ready(false) => watch = false,
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await;
        let response = match response {
            Ok(Ok(r)) => r,
            Ok(Err(never)) => match never {},
            // The client left: the request is dropped (the upstream's with it).
            Err(stop) => return Err(stop),
        };
        let (parts, mut body) = response.into_parts();
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            let Some(tx) = upgrade_tx else {
                return Err(Stop::Refuse(StatusCode::BAD_GATEWAY));
            };
            encode_head(
                self.head_buffer(),
                parts.status,
                &parts.headers,
                false,
                true,
                None,
                &mut true,
            );
            let mut out = Out::head();
            poll_fn(|cx| self.poll_out(cx, &mut out)).await?;
            self.io.flush().await.map_err(|_| Stop::Now)?;
            return Ok(Next::Upgrade(tx));
        }
        if let Some(f) = feed.as_mut() {
            // Too late for `100 Continue` once the answer is on its way.
            f.continue_at = None;
        }
        // And not if the response's `Connection` lists `close` (`encode_head` reads it).
        keep_alive &= body_complete && !self.drain.draining.load(Ordering::Relaxed);
        let length = if body.is_end_stream() {
            Some(0)
        } else {
            body.size_hint().exact()
        };
        let kind = encode_head(
            self.head_buffer(),
            parts.status,
            &parts.headers,
            head_request,
            http11,
            length,
            &mut keep_alive,
        );
        let mut out = Out::head();
        // Body bytes still to send when the length was announced.
        let mut remaining = match kind {
            BodyKind::Length(n) => Some(n),
            _ => None,
        };
        let mut finished = kind == BodyKind::Nothing;
        let mut failed = false;
        let written = poll_fn(|cx| loop {
            if let Some(f) = feed.as_mut() {
                if let Poll::Ready(complete) = self.poll_feed(cx, f) {
                    body_complete = complete;
                    feed = None;
                }
            }
            if !finished && out.body_empty() {
                let end = match Pin::new(&mut body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(mut data) = frame.into_data() {
                            if let Some(left) = remaining.as_mut() {
                                if data.len() as u64 > *left {
                                    // Longer than announced: cut, and close after.
                                    data.truncate(*left as usize);
                                    failed = true;
                                    finished = true;
                                }
                                *left -= data.len() as u64;
                            }
                            out.stage(data, kind == BodyKind::Chunked);
                        }
                        !finished && body.is_end_stream()
                    }
                    Poll::Ready(None) => true,
                    Poll::Ready(Some(Err(e))) => {
                        if let Body::Upstream(_) = body {
                            crate::proxy::forward::upstream_body_failed(
                                &self.settings.metrics,
                                &e,
                                parts.headers.get(&self.settings.request_id),
                            );
                        } else {
                            tracing::debug!(error = e.to_string().as_str(), "response body failed");
                        }
                        finished = true;
                        failed = true;
                        false
                    }
                    Poll::Pending if out.is_empty() => {
                        // Nothing to write until the body has more: what was written goes out.
                        ready!(self.poll_flush_bounded(cx))?;
                        return Poll::Pending;
                    }
                    Poll::Pending => false,
                };
                if end {
                    finished = true;
                    if kind == BodyKind::Chunked {
                        out.tail = b"0\r\n\r\n";
                    }
                    // Shorter than announced: the client must not wait for the rest.
                    failed |= remaining.is_some_and(|n| n != 0);
                    // Done with the body: an upstream connection goes back to its pool now, not
                    // once the last bytes have reached the client.
                    body = Body::Empty;
                }
            }
            if !out.is_empty() {
                ready!(self.poll_out(cx, &mut out))?;
                continue;
            }
            if finished {
                return self.poll_flush_bounded(cx);
            }
        })
        .await;
        self.completed += 1;
        drop(body);
        io::give_back_map(parts.headers);
        io::give_back_extensions(parts.extensions);
        // A shorter keep-alive than the header-read time is measured from each response
        // (the lazy deadline is only ever a header-read time away).
        if self.stall != Stall::Off || self.settings.keep_alive < self.settings.header_read {
            // A whole keep-alive time for the next request head.
            self.stall = Stall::Off;
            self.completed_at_check = self.completed;
            let next = Instant::now() + self.settings.keep_alive;
            self.deadline.as_mut().reset(next);
        }
        if written.is_err() || failed {
            return Err(Stop::Now);
        }
        if kind == BodyKind::UntilClose || !keep_alive {
            return Err(if body_complete {
                Stop::Now
            } else {
                Stop::Linger
            });
        }
        Ok(Next::KeepAlive)
    }

    /// Reads the request body as the service asks for it. Ready when there is no more to
    /// read: `true` at the end of the body, `false` on an error or when the service dropped
    /// the body.
    fn poll_feed(&mut self, cx: &mut Context<'_>, feed: &mut Feed) -> Poll<bool> {
        loop {
            match feed.sender.poll_demand(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Demand::ReceiverGone) => return Poll::Ready(false),
                Poll::Ready(Demand::Wanted) => {}
            }
            if let Some(at) = feed.continue_at {
                match Pin::new(&mut self.io).poll_write(cx, &CONTINUE[at..]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        feed.continue_at = (at + n < CONTINUE.len()).then_some(at + n);
                        continue;
                    }
                    Poll::Pending => return self.poll_body_stalled(cx, feed),
                    Poll::Ready(_) => {
                        feed.sender.finish(Err(ClientBodyError::Incomplete));
                        return Poll::Ready(false);
                    }
                }
            }
            let decoded = match &mut feed.decoder {
                BodyDecoder::Length(0) => Ok(Decoded::End),
                BodyDecoder::Length(_) if self.rbuf.is_empty() => Ok(Decoded::Need),
                BodyDecoder::Length(left) => {
                    let n = (*left).min(self.rbuf.len() as u64) as usize;
                    *left -= n as u64;
                    Ok(Decoded::Data(self.rbuf.split_to(n).freeze()))
                }
                BodyDecoder::Chunked(d) => d.decode(&mut self.rbuf).map_err(|e| {
                    tracing::debug!(error = ?e, "bad chunked request body");
                    ClientBodyError::Invalid
                }),
            };
            match decoded {
                Ok(Decoded::Data(data)) if data.is_empty() => {}
                Ok(Decoded::Data(data)) => {
                    feed.sender.send(data);
                    if matches!(feed.decoder, BodyDecoder::Length(0)) {
                        // The receiver knows the length and may not ask again.
                        feed.sender.finish(Ok(()));
                        return Poll::Ready(true);
                    }
                }
                Ok(Decoded::End) => {
                    feed.sender.finish(Ok(()));
                    return Poll::Ready(true);
                }
                Ok(Decoded::Need) => {
                    if self.rbuf.capacity() - self.rbuf.len() < READ_BUF {
                        self.rbuf.reserve(BODY_READ);
                    }
                    match poll_read_buf(&mut self.io, cx, &mut self.rbuf) {
                        Poll::Ready(Ok(n)) if n > 0 => self.progressed(),
                        Poll::Ready(_) => {
                            feed.sender.finish(Err(ClientBodyError::Incomplete));
                            return Poll::Ready(false);
                        }
                        Poll::Pending => return self.poll_body_stalled(cx, feed),
                    }
                }
                Err(e) => {
                    feed.sender.finish(Err(e));
                    return Poll::Ready(false);
                }
            }
        }
    }

    /// Waiting for the client's body: ends it as stalled once the client sent nothing for
    /// `timeouts.idle`.
    fn poll_body_stalled(&mut self, cx: &mut Context<'_>, feed: &mut Feed) -> Poll<bool> {
        ready!(self.poll_stalled(cx));
        tracing::debug!("request body stalled");
        feed.sender.finish(Err(ClientBodyError::Stalled));
        Poll::Ready(false)
    }

    /// Ready once the client has made no progress for `timeouts.idle` since it was first
    /// waited for, or since its last progress. A timer is touched only when the client
    /// makes the exchange wait, never on the fast path.
    fn poll_stalled(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.stall != Stall::Armed {
            self.stall = Stall::Armed;
            let at = Instant::now() + self.settings.idle;
            self.deadline.as_mut().reset(at);
        }
        self.deadline.as_mut().poll(cx)
    }

    fn progressed(&mut self) {
        if self.stall == Stall::Armed {
            self.stall = Stall::Progressed;
        }
    }

    /// While the answer is being prepared: has the client closed its side? (Then the
    /// request is abandoned, as nginx does, instead of finishing it for nobody.) Ready(false):
    /// stop watching (the client pipelined more, which waits in the buffer). Only where
    /// readiness is known without a read (`Transport::WAITS_WITHOUT_BUFFER`), so a quiet client
    /// costs no system call.
    fn poll_client_gone(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        // Already pipelined: reading on would buffer whatever the client sends, without bound.
        if !self.rbuf.is_empty() {
            return Poll::Ready(false);
        }
        if ready!(self.io.poll_read_ready(cx)).is_err() {
            return Poll::Ready(true);
        }
        if self.rbuf.capacity() - self.rbuf.len() < READ_BUF {
            self.rbuf.reserve(READ_BUF);
        }
        match poll_read_buf(&mut self.io, cx, &mut self.rbuf) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(true),
            Poll::Ready(Ok(_)) => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The write buffer, empty, for a response head.
    fn head_buffer(&mut self) -> &mut BytesMut {
        if self.wbuf.capacity() == 0 {
            self.wbuf = take_buffer();
        }
        self.wbuf.clear();
        &mut self.wbuf
    }

    fn poll_out(&mut self, cx: &mut Context<'_>, out: &mut Out) -> Poll<Result<(), Stop>> {
        while !out.is_empty() {
            let head = &self.wbuf[out.head_at.min(self.wbuf.len())..];
            let slices = [
                IoSlice::new(head),
                IoSlice::new(&out.size_line[out.size_at..]),
                IoSlice::new(&out.data),
                IoSlice::new(out.tail),
            ];
            let n = match Pin::new(&mut self.io).poll_write_vectored(cx, &slices) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Err(Stop::Now)),
                Poll::Ready(Ok(n)) => n,
                Poll::Pending => return self.poll_write_stalled(cx),
            };
            self.progressed();
            out.advance(n, self.wbuf.len());
        }
        Poll::Ready(Ok(()))
    }

    /// The client takes none of the answer: given up after `timeouts.idle`.
    fn poll_write_stalled(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Stop>> {
        ready!(self.poll_stalled(cx));
        tracing::debug!("client stopped reading the response");
        Poll::Ready(Err(Stop::Now))
    }

    fn poll_flush_bounded(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Stop>> {
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(r) => Poll::Ready(r.map_err(|_| Stop::Now)),
            Poll::Pending => self.poll_write_stalled(cx),
        }
    }

    async fn stop(mut self, stop: Stop) {
        let linger = match stop {
            Stop::Now => false,
            Stop::Linger => true,
            Stop::Refuse(status) => {
                let mut headers = http::HeaderMap::new();
                crate::pages::security_headers(&mut headers, None);
                encode_head(
                    self.head_buffer(),
                    status,
                    &headers,
                    false,
                    true,
                    Some(0),
                    &mut false,
                );
                let mut out = Out::head();
                if poll_fn(|cx| self.poll_out(cx, &mut out)).await.is_err() {
                    return;
                }
                true
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, async {
            if self.io.shutdown().await.is_err() || !linger {
                return;
            }
            // Into the read buffer (on the heap): a buffer here would make every
            // connection's task that much larger.
            let mut total = 0;
            while total < LINGER_BYTES {
                self.rbuf.clear();
                self.rbuf.reserve(READ_BUF);
                match self.io.read_buf(&mut self.rbuf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => total += n,
                }
            }
        })
        .await;
    }
}

fn poll_read_buf<T: AsyncRead + Unpin>(
    io: &mut T,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    let read = io.read_buf(buf);
    tokio::pin!(read);
    read.poll(cx)
}

/// What is left to write of a response: the head, then one body piece with its chunk framing.
struct Out {
    head_at: usize,
    head_done: bool,
    size_line: [u8; 18],
    size_at: usize,
    data: Bytes,
    tail: &'static [u8],
}

impl Out {
    fn head() -> Self {
        Self {
            head_at: 0,
            head_done: false,
            size_line: [0; 18],
            size_at: 18,
            data: Bytes::new(),
            tail: b"",
        }
    }

    fn is_empty(&self) -> bool {
        self.head_done && self.body_empty()
    }

    fn body_empty(&self) -> bool {
        self.size_at == 18 && self.data.is_empty() && self.tail.is_empty()
    }

    fn stage(&mut self, data: Bytes, chunked: bool) {
        if data.is_empty() {
            return;
        }
        if chunked {
            let mut line = [0; 18];
            let len = codec::chunk_size_line(data.len(), &mut line).len();
            self.size_line = line;
            self.size_at = 18 - len;
            self.tail = b"\r\n";
        }
        self.data = data;
    }

    fn advance(&mut self, mut n: usize, head_len: usize) {
        if !self.head_done {
            let left = head_len - self.head_at.min(head_len);
            let k = left.min(n);
            self.head_at += k;
            n -= k;
            if self.head_at >= head_len {
                self.head_done = true;
            }
        }
        let k = (18 - self.size_at).min(n);
        self.size_at += k;
        n -= k;
        let k = self.data.len().min(n);
        self.data.advance(k);
        n -= k;
        let k = self.tail.len().min(n);
        self.tail = &self.tail[k..];
    }
}
