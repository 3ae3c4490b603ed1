//! Upstream HTTP/1.1 connections, kept per worker thread and handed straight to the next
//! request: no lock shared by all cores (each thread's list has its own, see `Home`), and
//! no task spawned per request to wait for a connection to come back (a connection returns
//! to the pool when its response body is done).
//!
//! A connection has no task of its own: the request that borrows it polls it, in the client
//! connection's task, while waiting for the answer and while reading the answer's body. A
//! proxied request then costs one task wake-up per network event, as in an event loop,
//! instead of hand-offs between a request task and a connection task at every step.
//!
//! The response deadline does not count the time a request body takes to be sent (a slow
//! upload is no slow upstream): while the body goes out, the deadline only checks that it
//! keeps moving, and once it has all gone the deadline moves on by the time it took. A
//! request without a body (most) has nothing to watch and pays nothing for it.

use crate::body::Body;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tower::Service;

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("no response before the deadline")]
    Timeout,
    /// The request body did not move for the response timeout, waiting on the client.
    #[error("the client sent no more of its request body")]
    ClientStalled,
}

/// Which upstream a connection goes to (one pool per client generation and origin).
#[derive(Debug)]
struct Origin {
    pool: u64,
    https: bool,
    authority: Authority,
}

impl Origin {
    fn is(&self, pool: u64, https: bool, authority: &Authority) -> bool {
        // The same bytes first (the same upstream, configured once): `Authority`'s own
        // equality ignores case, a byte at a time.
        self.pool == pool
            && self.https == https
            && (self.authority.as_str() == authority.as_str() || self.authority == *authority)
    }
}

type Connection = hyper::client::conn::http1::Connection<
    super::batch::Batched<MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>>,
    Body,
>;

/// One upstream connection: the handle requests are sent through, and the connection that
/// reads and writes them, polled by whichever request holds it. It lives in one box for its
/// whole life (it is kilobytes): checkouts, give-backs and the response body that holds it
/// move a pointer, which keeps every request and response small.
struct Upstream {
    tx: SendRequest<Body>,
    /// `None` once it has ended (closed, failed, or handed to a task of its own).
    conn: Option<Connection>,
    /// The thread's idle list it goes back to.
    home: Arc<Home>,
    /// When the request that borrowed it started (no clock reading of its own): it counts as
    /// idle from then once given back.
    since: Instant,
    relay: Arc<Relay>,
    /// `relay` as a waker, made once.
    waker: Waker,
    /// The deadline for the response head of the request in flight. One timer for the
    /// connection's life: moved later for each request, it stays in tokio's timer wheel
    /// (a later deadline is only noted) instead of being added and removed per request.
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// While the request in flight is still sending its body (see `watch`).
    upload: Option<Uploading>,
    /// The response timeout, and the check that the response body keeps coming (kept here,
    /// not in `UpstreamBody`, which every response moves around).
    window: Duration,
    body_watch: BodyWatch,
}

/// The response timer of a request whose body is being sent, stopped until the body's end.
#[derive(Clone, Copy)]
struct Uploading {
    /// What was left of the response time when the request was handed over.
    left: Duration,
    /// The response timeout: the body may go this long without moving.
    window: Duration,
}

/// The waker the connection is polled with. Most wake-ups of a connection come from the very
/// task that drives it (sending it a request, taking a body chunk from it) at a moment when
/// that task is about to poll it anyway; passed on, each would make tokio poll the task once
/// more for nothing. The relay absorbs those and passes the others on to the task.
///
/// It also carries the news of the request body (`MOVED`, `SENT`), which hyper polls from
/// within the connection: set by `Upload`, read by `Upstream::until_deadline`.
#[derive(Default)]
struct Relay {
    task: futures_util::task::AtomicWaker,
    state: AtomicU8,
    upload: AtomicU8,
}

/// The holder polls the connection before it next waits: wake-ups are noted, not passed on.
const LOCAL: u8 = 1;
/// A wake-up was noted while `LOCAL`.
const WOKEN: u8 = 2;
/// In the pool: nobody waits on the connection.
const PARKED: u8 = 4;

/// `Relay::upload`: a part of the request body went out since the deadline last passed.
const MOVED: u8 = 1;
/// `Relay::upload`: the request body has all gone out (or was given up).
const SENT: u8 = 2;
/// `Relay::upload`: the body last waited for the client, not for the upstream to take more.
const WAITING: u8 = 4;

impl std::task::Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.state.fetch_or(WOKEN, Ordering::AcqRel) & (LOCAL | PARKED) == 0 {
            self.task.wake();
        }
    }
}

impl Upstream {
    fn new(
        tx: SendRequest<Body>,
        conn: Connection,
        home: Arc<Home>,
        since: Instant,
        deadline: tokio::time::Instant,
    ) -> Box<Self> {
        let relay = Arc::new(Relay::default());
        Box::new(Self {
            tx,
            conn: Some(conn),
            home,
            since,
            waker: Waker::from(relay.clone()),
            relay,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            upload: None,
            window: Duration::ZERO,
            body_watch: BodyWatch::Off,
        })
    }

    /// Wake-ups from now on are the holder's own: it polls the connection next.
    fn local(&self) {
        self.relay.state.store(LOCAL, Ordering::Release);
    }

    /// Lets the connection do what it can, then polls `f` for the outcome, until `f` is ready
    /// or nothing woke the connection meanwhile. `f` gets a no-op waker: only the connection
    /// completes what `f` waits for, and it is polled (with the relay) before each call.
    ///
    /// A wake-up noted in the round where `f` is ready is dropped: what the connection would
    /// do next (read on, take more of the request body) is only of use to this request, which
    /// comes back here when it wants more.
    fn drive<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut f: impl FnMut(&mut SendRequest<Body>, &mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.relay.task.register(cx.waker());
        loop {
            self.local();
            let Some(conn) = self.conn.as_mut() else {
                // Ended (before or in the last round): what `f` waits for is settled.
                return f(&mut self.tx, cx);
            };
            let relay = &mut Context::from_waker(&self.waker);
            if let Poll::Ready(r) = Pin::new(conn).poll(relay) {
                if let Err(e) = r {
                    tracing::debug!(error = e.to_string().as_str(), "upstream connection ended");
                }
                self.conn = None;
                continue;
            }
            let r = f(&mut self.tx, &mut Context::from_waker(Waker::noop()));
            // Wake-ups reach the task again; any noted meanwhile mean another round.
            if self.relay.state.swap(0, Ordering::AcqRel) & WOKEN == 0 || r.is_ready() {
                return r;
            }
        }
    }

    /// Like `drive`, but tries `f` first: what the connection did last time may be all that
    /// `f` waits for (a response body read along with its head).
    fn take<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut f: impl FnMut(&mut SendRequest<Body>, &mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        if self.conn.is_some() {
            self.local();
            let r = f(&mut self.tx, &mut Context::from_waker(Waker::noop()));
            self.relay.state.store(0, Ordering::Release);
            if r.is_ready() {
                return r;
            }
        }
        self.drive(cx, f)
    }

    /// `drive`, until the deadline. While the request body is being sent, the deadline
    /// passing only ends the exchange if the body did not move since it was last set.
    fn until_deadline<T>(
        &mut self,
        cx: &mut Context<'_>,
        f: impl FnMut(&mut SendRequest<Body>, &mut Context<'_>) -> Poll<T>,
    ) -> Poll<Result<T, SendError>> {
        if let Poll::Ready(r) = self.drive(cx, f) {
            return Poll::Ready(Ok(r));
        }
        loop {
            if let Some(up) = self.upload {
                if self.relay.upload.load(Ordering::Acquire) & SENT != 0 {
                    // The response timer starts again with what it had left.
                    self.upload = None;
                    let at = tokio::time::Instant::now() + up.left;
                    self.deadline.as_mut().reset(at);
                }
            }
            if self.deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let Some(up) = self.upload else {
                return Poll::Ready(Err(SendError::Timeout));
            };
            let news = self.relay.upload.fetch_and(!MOVED, Ordering::AcqRel);
            if news & (MOVED | SENT) == 0 {
                // Stuck for a whole timeout: a stalled client is the client's fault, an
                // upstream that does not read its request one with no answer in time.
                return Poll::Ready(Err(if news & WAITING != 0 {
                    SendError::ClientStalled
                } else {
                    SendError::Timeout
                }));
            }
            if news & SENT == 0 {
                self.deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + up.window);
            }
        }
    }

    /// Before `req` is handed over: a body to send is watched (see `Upload`), and the response
    /// timer stops until it has all gone. `now` and `deadline`: as given to `Pool::send`.
    /// A request without a body is left as it is (no clock reading, no allocation), its
    /// deadline running as set.
    fn watch(&mut self, req: &mut Request<Body>, now: Instant, deadline: tokio::time::Instant) {
        let body = req.body_mut();
        if http_body::Body::is_end_stream(body) {
            return;
        }
        self.relay.upload.store(0, Ordering::Release);
        match body {
            // Back from a connection that never sent it: now this one's.
            Body::Upload(u) => u.relay = self.relay.clone(),
            _ => {
                *body = Body::Upload(Box::new(Upload {
                    body: std::mem::take(body),
                    relay: self.relay.clone(),
                }))
            }
        }
        // The deadline stays as set, now the first check that the body moves: from here it is
        // mostly moved later, which tokio's timer merely notes.
        self.upload = Some(Uploading {
            left: deadline.saturating_duration_since(tokio::time::Instant::now()),
            window: deadline.saturating_duration_since(tokio::time::Instant::from_std(now)),
        });
    }

    /// Hands the connection to a task of its own, which can also complete an upgrade
    /// (`hyper::upgrade::on`); the request no longer drives it.
    fn detach(&mut self) {
        if let Some(conn) = self.conn.take() {
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = e.to_string().as_str(), "upstream connection ended");
                }
            });
        }
    }

    /// A parked connection, polled once: false if it has ended (the upstream closed it, or
    /// sent something unasked). The relay takes the poll's wake-ups, as for any parked one.
    fn still_open(&mut self) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        let relay = &mut Context::from_waker(&self.waker);
        if Pin::new(conn).poll(relay).is_ready() {
            self.conn = None;
        }
        self.conn.is_some()
    }

    /// Alive and waiting for a next request (not, say, still sending an earlier body).
    fn idle(&self) -> bool {
        self.conn.is_some() && self.tx.is_ready()
    }
}

impl Upstream {
    /// In the pool: not closed by the upstream, and idle for less than `idle_timeout`.
    fn usable(&self, now: Instant, idle_timeout: Duration) -> bool {
        !self.tx.is_closed() && now.duration_since(self.since) < idle_timeout
    }
}

/// A thread's idle connections to one origin (of one pool), oldest first. A lent connection
/// comes back here even when its request ends on another worker thread (tokio moves tasks):
/// given back where it ends instead, connections pile up on the threads where responses
/// finish while the threads where requests start keep opening new ones. The lock is this
/// thread's own; another thread takes it only to give a connection back.
struct Home {
    origin: Origin,
    /// Dead once the pool is dropped (a reload with other client options): then the entry goes.
    pool_alive: Weak<()>,
    max_idle: usize,
    idle_timeout: Duration,
    conns: Mutex<VecDeque<Box<Upstream>>>,
}

thread_local! {
    static HOMES: RefCell<Vec<Arc<Home>>> = const { RefCell::new(Vec::new()) };
}

pub struct Pool {
    id: u64,
    alive: Arc<()>,
    /// TCP (with the configured connect timeout) and TLS, put together per new connection
    /// so that a route can bring its own connect timeout.
    http: HttpConnector,
    /// The configured `timeouts.upstream_connect`, which also bounds the TLS handshake.
    connect_timeout: Duration,
    tls: Arc<rustls::ClientConfig>,
    server_names: Arc<hyper_rustls::DefaultServerNameResolver>,
    idle_timeout: Duration,
    /// Idle connections kept per origin and thread.
    max_idle: usize,
}

impl Pool {
    /// `tls` without ALPN protocols: connections speak HTTP/1.1 only.
    pub fn new(
        id: u64,
        http: HttpConnector,
        connect_timeout: Duration,
        tls: rustls::ClientConfig,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Self {
        Self {
            id,
            alive: Arc::new(()),
            http,
            connect_timeout,
            tls: Arc::new(tls),
            server_names: Arc::new(hyper_rustls::DefaultServerNameResolver::default()),
            idle_timeout,
            max_idle,
        }
    }

    /// Sends `req` (origin-form URI) to `scheme://authority`. A request that never left on a
    /// reused connection (the upstream closed it meanwhile) is retried once on a new one.
    /// `now`: the caller's clock reading (connections idle since before it are stale; a
    /// connection given back counts as idle from it). `deadline`: when to give up waiting
    /// for the response head, connecting included but not the time the request body takes
    /// to be sent (see `Upstream::watch`); `deadline - now` is also how long that body may
    /// go without moving. `connect_timeout`: instead of the configured one, should this
    /// request open a connection (a route's own; connections are pooled per origin whatever
    /// route opened them). `upgrade`: the request asks for a protocol switch, so its
    /// connection gets a task of its own (see `Upstream::detach`).
    ///
    /// An async block, not an async fn: its state holds the request once, where an async fn
    /// keeps a second slot for the argument (320 bytes more in every request's future).
    #[allow(clippy::too_many_arguments)]
    pub fn send<'a>(
        &'a self,
        scheme: &'a Scheme,
        authority: &'a Authority,
        mut req: Request<Body>,
        now: Instant,
        deadline: tokio::time::Instant,
        connect_timeout: Option<Duration>,
        upgrade: bool,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + 'a {
        let https = *scheme == Scheme::HTTPS;
        async move {
            // Where to open a new connection for a request sent again (see `resend_copy`).
            let mut fresh: Option<Arc<Home>> = None;
            loop {
                let checked = match fresh.take() {
                    Some(home) => Err(home),
                    None => self.checkout(https, authority, now),
                };
                let (mut up, reused, idle) = match checked {
                    Ok(mut up) => {
                        let idle = now.saturating_duration_since(up.since);
                        up.since = now;
                        up.deadline.as_mut().reset(deadline);
                        (up, true, idle)
                    }
                    // Boxed: the handshake holds a whole connection (3 KB), which would otherwise
                    // make every request's future that large, to be allocated and copied.
                    Err(home) => {
                        let connect = Box::pin(self.connect(home, now, deadline, connect_timeout));
                        match tokio::time::timeout_at(deadline, connect).await {
                            Ok(up) => (up?, false, Duration::ZERO),
                            Err(_) => return Err(SendError::Timeout),
                        }
                    }
                };
                if upgrade {
                    up.detach();
                }
                // A connection from the pool is ready (see `give_back`); a new one after its
                // first poll.
                if !up.tx.is_ready() {
                    let ready = poll_fn(|cx| up.until_deadline(cx, |tx, cx| tx.poll_ready(cx)));
                    if let Err(e) = ready.await? {
                        if reused {
                            continue;
                        }
                        return Err(e.into());
                    }
                }
                up.local();
                let copy = if reused && idle >= RACY_IDLE && !upgrade {
                    resend_copy(&req)
                } else {
                    None
                };
                up.watch(&mut req, now, deadline);
                let head = req.method() == http::Method::HEAD;
                // Content in a GET or HEAD has no meaning (RFC 9110 §9.3.1): an app that does
                // not read it would take it for the next request on this connection, another
                // user's perhaps ("CL.0" smuggling). Passed on (search APIs send it), on a
                // connection closed after it.
                let bodied = (head || req.method() == http::Method::GET)
                    && !http_body::Body::is_end_stream(req.body());
                if bodied {
                    req.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                let mut sent = std::pin::pin!(up.tx.try_send_request(req));
                match poll_fn(|cx| up.until_deadline(cx, |_, cx| sent.as_mut().poll(cx))).await? {
                    Ok(resp) => {
                        up.window =
                            deadline.saturating_duration_since(tokio::time::Instant::from_std(now));
                        up.body_watch = BodyWatch::Off;
                        // Not reused after a HEAD: an app that answers it with a body
                        // anyway (a common bug) would have those bytes read as the next
                        // request's answer, another user's perhaps. Its answer has no body
                        // to read through the connection. Nor after a 204 or 304 whose head
                        // announces a body, which their status says they have not.
                        let reusable = !head && !bodied && !announces_a_body_it_cannot_have(&resp);
                        return Ok(resp.map(|body| UpstreamBody {
                            body,
                            ended: false,
                            conn: reusable.then_some(up),
                        }));
                    }
                    Err(mut e) => match e.take_message() {
                        Some(unsent) if reused => req = unsent,
                        _ => {
                            let e = e.into_error();
                            match copy {
                                // The upstream closed the connection as the request went out:
                                // once more, on a new one.
                                Some(copy) if broke_off(&e) => {
                                    req = *copy;
                                    fresh = Some(up.home.clone());
                                }
                                _ => return Err(e.into()),
                            }
                        }
                    },
                }
            }
        }
    }

    /// This thread's most recently used live connection to the origin, dropping dead and
    /// stale ones; or, when there is none, the thread's home for the origin (made on first
    /// use) for a new connection to return to.
    fn checkout(
        &self,
        https: bool,
        authority: &Authority,
        now: Instant,
    ) -> Result<Box<Upstream>, Arc<Home>> {
        HOMES.with(|homes| {
            let mut homes = homes.borrow_mut();
            if let Some(h) = homes
                .iter()
                .find(|h| h.origin.is(self.id, https, authority))
            {
                if let Ok(mut conns) = h.conns.lock() {
                    while let Some(c) = conns.pop_back() {
                        if c.usable(now, self.idle_timeout) {
                            return Ok(c);
                        }
                    }
                }
                return Err(h.clone());
            }
            // The homes of pools replaced by a reload go now.
            homes.retain(|h| h.pool_alive.strong_count() > 0);
            let home = Arc::new(Home {
                origin: Origin {
                    pool: self.id,
                    https,
                    authority: authority.clone(),
                },
                pool_alive: Arc::downgrade(&self.alive),
                max_idle: self.max_idle,
                idle_timeout: self.idle_timeout,
                conns: Mutex::new(VecDeque::new()),
            });
            homes.push(home.clone());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(sweep(Arc::downgrade(&home)));
            }
            Err(home)
        })
    }

    async fn connect(
        &self,
        home: Arc<Home>,
        now: Instant,
        deadline: tokio::time::Instant,
        connect_timeout: Option<Duration>,
    ) -> Result<Box<Upstream>, SendError> {
        let origin = &home.origin;
        let uri = Uri::builder()
            .scheme(if origin.https {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            })
            .authority(origin.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| SendError::Connect(e.to_string()))?;
        let mut http = self.http.clone();
        if connect_timeout.is_some() {
            http.set_connect_timeout(connect_timeout);
        }
        // What HttpsConnectorBuilder's https_or_http().enable_http1() builds.
        let mut connector =
            HttpsConnector::new(http, self.tls.clone(), false, self.server_names.clone());
        let connecting = connector.call(uri);
        let io = if origin.https {
            // The handshake too, as nginx's proxy_connect_timeout: an upstream that accepts
            // and never answers the ClientHello would otherwise hold the request until
            // `timeouts.upstream_response`.
            let limit = connect_timeout.unwrap_or(self.connect_timeout);
            match tokio::time::timeout(limit, connecting).await {
                Ok(io) => io,
                Err(_) => {
                    return Err(SendError::Connect(format!(
                        "TCP connect and TLS handshake not done within timeouts.upstream_connect ({limit:?})"
                    )));
                }
            }
        } else {
            connecting.await
        }
        .map_err(|e| SendError::Connect(crate::error::source_chain(&*e)))?;
        // Flat writes: hyper puts a request's head, and any body it buffers, in one buffer and
        // writes that. Vectored, it gathers 16 slices for every write (~280 instructions per
        // request) for `Batched`, which copies them into its own buffer all the same; only a
        // write past `Batched`'s hold (16 KiB of upload) pays a copy it would not have.
        let (tx, conn) = hyper::client::conn::http1::Builder::new()
            .writev(false)
            // What one read of the answer may take (hyper's default grows to ~400 KB): held
            // until the client takes it, so a client that stops reading holds no more.
            .max_buf_size(UPSTREAM_READ_BUFFER)
            .handshake(super::batch::Batched::new(io))
            .await?;
        Ok(Upstream::new(tx, conn, home, now, deadline))
    }
}

/// A 204 or 304 with a `Transfer-Encoding` or a non-zero `Content-Length`: the body the app
/// may send after it would be read as the next answer on the connection.
fn announces_a_body_it_cannot_have<B>(resp: &http::Response<B>) -> bool {
    let h = resp.headers();
    matches!(resp.status().as_u16(), 204 | 304)
        && (h.contains_key(http::header::TRANSFER_ENCODING)
            || h.get(http::header::CONTENT_LENGTH)
                .is_some_and(|v| v != "0"))
}

/// An upstream connection's read buffer at most (an answer's head is bounded exactly by
/// `headers::MAX_RESPONSE_HEAD`).
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

/// How often a thread's idle connections to an origin are looked at when no request comes
/// to take them (see `sweep`).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Closes idle connections without waiting for traffic: those the upstream closed (else each
/// would sit in CLOSE-WAIT, holding a descriptor, until a next request to that origin on that
/// thread), and those unused for `timeouts.idle`. Ends with the home (a reload's new pool
/// makes new homes), letting its connections go.
async fn sweep(home: Weak<Home>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(home) = home.upgrade() else {
            return;
        };
        let Ok(mut conns) = home.conns.lock() else {
            return;
        };
        if home.pool_alive.strong_count() == 0 {
            conns.clear();
            return;
        }
        let now = Instant::now();
        conns.retain_mut(|c| c.usable(now, home.idle_timeout) && c.still_open());
    }
}

/// How long a pooled connection must have been idle for its upstream to be closing it as a
/// request goes out on it (servers close idle keep-alive connections after a second or more:
/// Node 5 s, gunicorn 2 s). A connection in steady use is never this idle.
const RACY_IDLE: Duration = Duration::from_millis(250);

/// A copy of a request that may be sent again should its connection break off before any
/// answer (RFC 9112 §9.3.1, as nginx does with a cached connection): an idempotent method and
/// no body. Made only on a connection idle for `RACY_IDLE`, so requests on busy connections
/// pay nothing for it (boxed: the request's future holds it across the exchange).
fn resend_copy(req: &Request<Body>) -> Option<Box<Request<Body>>> {
    use http::Method;
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    if !idempotent || !http_body::Body::is_end_stream(req.body()) {
        return None;
    }
    let mut copy = Request::new(Body::Empty);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(Box::new(copy))
}

/// The connection broke off before a whole response: reset, or closed.
pub fn broke_off(e: &hyper::Error) -> bool {
    use std::io::ErrorKind::*;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            ) {
                return true;
            }
        }
        cause = c.source();
    }
    e.is_incomplete_message() || e.is_canceled() || e.is_closed()
}

impl Upstream {
    /// Back to its home's idle list, once its response body is complete.
    fn give_back(mut self: Box<Self>) {
        if !self.idle() {
            // The answer may have come before the connection saw the end of the request body:
            // one more look (nobody to wake: it is not waited on).
            if let Some(conn) = self.conn.as_mut() {
                let nobody = &mut Context::from_waker(Waker::noop());
                if Pin::new(conn).poll(nobody).is_ready() {
                    return;
                }
            }
        }
        if !self.idle() || self.home.pool_alive.strong_count() == 0 {
            return;
        }
        let home = self.home.clone();
        let Ok(mut conns) = home.conns.lock() else {
            return;
        };
        // Connections unused for the idle timeout are closed as traffic goes on.
        if conns
            .front()
            .is_some_and(|c| !c.usable(self.since, home.idle_timeout))
        {
            conns.pop_front();
        }
        if conns.len() < home.max_idle {
            // An answer may have come while the body was still going out.
            self.upload = None;
            self.relay.state.store(PARKED, Ordering::Release);
            conns.push_back(self);
        }
    }
}

/// A request body on its way to the upstream: tells its connection when a part of it has
/// gone out, and when all of it has (hyper drops a body it has taken the end of, or gives up
/// on).
pub struct Upload {
    body: Body,
    relay: Arc<Relay>,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("body", &self.body)
            .finish_non_exhaustive()
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.relay.upload.fetch_or(SENT, Ordering::AcqRel);
    }
}

impl http_body::Body for Upload {
    type Data = bytes::Bytes;
    type Error = crate::body::BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        let news = match &frame {
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => MOVED | SENT,
            Poll::Ready(Some(Ok(_))) => MOVED,
            Poll::Ready(None) => SENT,
            Poll::Ready(Some(Err(_))) => 0,
            Poll::Pending => {
                this.relay.upload.fetch_or(WAITING, Ordering::AcqRel);
                return frame;
            }
        };
        this.relay.upload.fetch_and(!WAITING, Ordering::AcqRel);
        if news != 0 {
            this.relay.upload.fetch_or(news, Ordering::AcqRel);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// An upstream response body; its connection goes back to the pool once the body has been
/// read to the end. Dropped early (the client went away), the connection is closed instead:
/// the rest of that response is still on the wire.
///
/// An upstream that sends none of the body for the response timeout is given up (nginx's
/// `proxy_read_timeout`): else a hung upstream would hold the client's connection for good.
/// Checked lazily, with the connection's response timer: armed the first time the body has
/// to wait, and moved on when it fires if the body moved meanwhile, so a silence ends the
/// answer between one and two timeouts in. A body read along with its head (most) never
/// arms it.
pub struct UpstreamBody {
    body: Incoming,
    /// Seen the end (a chunked body only says so by ending).
    ended: bool,
    /// The connection, lent to this response until its end.
    conn: Option<Box<Upstream>>,
}

/// The silence check of an [`UpstreamBody`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyWatch {
    /// The body has not had to wait yet: the timer is not armed.
    Off,
    /// Armed; nothing arrived since it was.
    Silent,
    /// Armed; something arrived since it was.
    Moved,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    /// Keeps the connection out of the pool (it was upgraded to a tunnel, which its own task,
    /// started when an upgrade was asked for, completes).
    pub fn detach(&mut self) {
        self.conn = None;
    }
}

impl Upstream {
    /// While the response body waits: `Pending`, or the error of an upstream silent for the
    /// response timeout.
    fn body_silence<T>(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<T, crate::body::BodyError>>> {
        if self.body_watch == BodyWatch::Off {
            self.rearm_body_watch();
        }
        loop {
            if self.deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if self.body_watch == BodyWatch::Silent {
                return Poll::Ready(Some(Err(crate::body::BodyError::UpstreamStalled)));
            }
            self.rearm_body_watch();
        }
    }

    fn rearm_body_watch(&mut self) {
        let at = tokio::time::Instant::now() + self.window;
        self.deadline.as_mut().reset(at);
        self.body_watch = BodyWatch::Silent;
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.ended || http_body::Body::is_end_stream(&self.body) {
                conn.give_back();
            }
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = crate::body::BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let body = &mut this.body;
        let frame = match this.conn.as_mut() {
            Some(c) => c.take(cx, |_, cx| Pin::new(&mut *body).poll_frame(cx)),
            None => Pin::new(body).poll_frame(cx),
        };
        match frame {
            Poll::Ready(frame) => {
                if frame.is_none() {
                    this.ended = true;
                }
                if let Some(c) = this.conn.as_mut() {
                    if c.body_watch == BodyWatch::Silent {
                        c.body_watch = BodyWatch::Moved;
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            // A tunnel (no connection lent) has no response timeout.
            Poll::Pending => match this.conn.as_mut() {
                Some(c) => c.body_silence(cx),
                None => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A keep-alive upstream on loopback answering every request with "ok".
    fn upstream() -> Authority {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    loop {
                        if s.read(&mut b).unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                        if head.ends_with(b"\r\n\r\n") {
                            head.clear();
                            let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                            if s.write_all(ok).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        format!("127.0.0.1:{port}").parse().unwrap()
    }

    /// A pool whose connector gives up connecting after `connect_timeout`.
    fn pool_with(connect_timeout: Duration) -> Pool {
        let tls = crate::server::tls::client_config(None, None).unwrap();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        Pool::new(1, http, connect_timeout, tls, Duration::from_secs(60), 8)
    }

    fn pool() -> Pool {
        pool_with(Duration::from_secs(5))
    }

    /// A loopback port where a TCP connect neither succeeds nor fails: the listener's accept
    /// queue (backlog 0) is full with `filler`, so the kernel drops further SYNs.
    async fn unanswered() -> (Authority, tokio::net::TcpListener, std::net::TcpStream) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let filler = std::net::TcpStream::connect(addr).unwrap();
        (addr.to_string().parse().unwrap(), listener, filler)
    }

    #[tokio::test]
    async fn a_requests_own_connect_timeout_bounds_a_new_connection() {
        let (authority, _listener, _filler) = unanswered().await;
        let pool = pool_with(Duration::from_secs(30));
        let get = || Request::get("/").body(Body::Empty).unwrap();
        let send = |connect_timeout| {
            pool.send(
                &Scheme::HTTP,
                &authority,
                get(),
                Instant::now(),
                tokio::time::Instant::now() + Duration::from_secs(1),
                connect_timeout,
                false,
            )
        };
        // Its own, shorter than the pool's: a connect error once it passes.
        let start = Instant::now();
        let r = send(Some(Duration::from_millis(200))).await;
        assert!(matches!(r, Err(SendError::Connect(_))), "{:?}", r.err());
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // None: the pool's (30 s), so the response deadline (1 s) ends the wait.
        let r = send(None).await;
        assert!(matches!(r, Err(SendError::Timeout)), "{:?}", r.err());
        // Longer than the pool's: it is the one that counts.
        let short = pool_with(Duration::from_millis(100));
        let r = short
            .send(
                &Scheme::HTTP,
                &authority,
                get(),
                Instant::now(),
                tokio::time::Instant::now() + Duration::from_millis(700),
                Some(Duration::from_secs(30)),
                false,
            )
            .await;
        assert!(matches!(r, Err(SendError::Timeout)), "{:?}", r.err());
    }

    #[test]
    fn a_body_finished_on_another_thread_brings_its_connection_home() {
        let authority = upstream();
        let pool = Arc::new(pool());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let get = || Request::get("/").body(Body::Empty).unwrap();
        let send = |pool: &Pool| {
            let resp = rt
                .block_on(pool.send(
                    &Scheme::HTTP,
                    &authority,
                    get(),
                    Instant::now(),
                    tokio::time::Instant::now() + Duration::from_secs(5),
                    None,
                    false,
                ))
                .unwrap();
            let mut body = resp.into_body();
            rt.block_on(async {
                while let Some(frame) = body.frame().await {
                    frame.unwrap();
                }
            });
            body
        };
        // The task that read it moved to another worker thread, where the body is dropped.
        let body = send(&pool);
        let elsewhere = {
            let (pool, authority) = (pool.clone(), authority.clone());
            std::thread::spawn(move || {
                drop(body);
                pool.checkout(false, &authority, Instant::now()).is_ok()
            })
            .join()
            .unwrap()
        };
        assert!(
            !elsewhere,
            "the connection did not stay where its body ended"
        );
        let home = pool.checkout(false, &authority, Instant::now());
        assert!(home.is_ok(), "it is idle where it was taken from");

        // A connection answered and read to the end is reused, not replaced.
        drop(home);
        let first = send(&pool);
        drop(first);
        let again = pool.checkout(false, &authority, Instant::now());
        assert!(again.is_ok());
    }
}
