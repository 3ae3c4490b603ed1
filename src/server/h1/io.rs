//! What the HTTP/1 connection hands on: request bodies to the service, the raw connection to
//! a websocket tunnel or to the HTTP/2 server, and the buffers it does not keep idle.

use bytes::{Bytes, BytesMut};
use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A client connection: plain TCP or TLS.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// It can wait for data without a buffer, so an idle connection holds none.
    const WAITS_WITHOUT_BUFFER: bool = false;

    fn poll_read_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Transport for tokio::net::TcpStream {
    const WAITS_WITHOUT_BUFFER: bool = true;

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

impl Transport for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    const WAITS_WITHOUT_BUFFER: bool = true;

    /// Ready when rustls holds what a read returns without the socket (plaintext it has
    /// decrypted, or the client's close_notify): `wants_read` is false then. Otherwise when
    /// the socket has data, which may turn out to be part of a record only: the read then
    /// returns `Pending`, and an idle connection gives its buffer back again.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, tls) = self.get_ref();
        if !tls.wants_read() {
            return Poll::Ready(Ok(()));
        }
        tcp.poll_read_ready(cx)
    }
}

impl<T: Transport> Transport for Box<T> {
    const WAITS_WITHOUT_BUFFER: bool = T::WAITS_WITHOUT_BUFFER;

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_read_ready(cx)
    }
}

pub const READ_BUF: usize = 8192;
/// Read and write buffers of connections that went idle, kept per thread for the next busy one.
const SPARE_BUFFERS: usize = 64;

thread_local! {
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

pub fn take_buffer() -> BytesMut {
    spare(&SPARE).unwrap_or_else(|| BytesMut::with_capacity(READ_BUF))
}

thread_local! {
    static SPARE_MAPS: RefCell<Vec<http::HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty header map with room for `n` headers. A request's map usually comes back as its
/// response's (hyper's client parses the answer into the map it wrote the request from):
/// reused, a request costs no map allocation (a 24-header map is 2.5 KB, past the allocator's
/// per-thread cache).
pub fn take_map(n: usize) -> http::HeaderMap {
    spare(&SPARE_MAPS)
        .filter(|m| m.capacity() >= n)
        .unwrap_or_else(|| http::HeaderMap::with_capacity(n))
}

/// Keeps a response's header map, emptied, for a next request (a few per thread).
pub fn give_back_map(mut map: http::HeaderMap) {
    if map.capacity() < 16 {
        return;
    }
    map.clear();
    keep(&SPARE_MAPS, map);
}

thread_local! {
    static SPARE_EXTENSIONS: RefCell<Vec<http::Extensions>> = const { RefCell::new(Vec::new()) };
}

/// An empty extension map, with room for what a request collects when it was used before.
/// A request's map comes back as its response's (see `Forward`): reused, a request costs no
/// map allocation and no growth of it (four entries outgrow a new map once).
pub fn take_extensions() -> http::Extensions {
    spare(&SPARE_EXTENSIONS).unwrap_or_default()
}

/// Keeps a response's extension map, emptied, for a next request (a few per thread).
pub fn give_back_extensions(mut ext: http::Extensions) {
    if ext.is_empty() {
        // Never used, or a map of nothing: nothing worth keeping.
        return;
    }
    ext.clear();
    keep(&SPARE_EXTENSIONS, ext);
}

/// Keeps an empty buffer for reuse if nothing else still points into it.
pub fn give_back(mut buf: BytesMut) {
    if buf.is_empty() && buf.try_reclaim(READ_BUF) {
        keep(&SPARE, buf);
    }
}

/// The last spare put on this thread's list, if any.
fn spare<T: 'static>(spares: &'static std::thread::LocalKey<RefCell<Vec<T>>>) -> Option<T> {
    spares.with(|s| s.borrow_mut().pop())
}

/// Puts `value` on this thread's list of spares, unless it holds `SPARE_BUFFERS` already.
fn keep<T: 'static>(spares: &'static std::thread::LocalKey<RefCell<Vec<T>>>, value: T) {
    spares.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARE_BUFFERS {
            s.push(value);
        }
    });
}

/// A connection with bytes already read from it put back in front.
pub struct Rewound<T> {
    first: Bytes,
    io: T,
    /// Dropped with the connection: its connection task, waiting on the other end, then
    /// knows that a tunnel is done with it (see `handed_on`).
    _released: Option<tokio::sync::oneshot::Sender<()>>,
}

impl<T> Rewound<T> {
    pub fn new(first: Bytes, io: T) -> Self {
        Self {
            first,
            io,
            _released: None,
        }
    }

    /// A connection handed on to a tunnel, and what resolves once the tunnel drops it: its
    /// connection task waits for that, so that a tunnel keeps the connection's slot
    /// (`limits.max_connections`) and stays counted in `connections_open` while it is open.
    pub fn handed_on(first: Bytes, io: T) -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let r = Self {
            first,
            io,
            _released: Some(tx),
        };
        (r, rx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewound<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.remaining());
            let first = self.first.split_to(n);
            buf.put_slice(&first);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewound<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A client connection after `101 Switching Protocols`.
pub type Upgraded = Rewound<Box<dyn Io>>;

/// In the extensions of a request that asked to switch protocols: the connection, once the
/// gateway has answered 101.
#[derive(Clone)]
pub struct ClientUpgrade(Arc<Mutex<Option<tokio::sync::oneshot::Receiver<Upgraded>>>>);

impl ClientUpgrade {
    pub fn new(rx: tokio::sync::oneshot::Receiver<Upgraded>) -> Self {
        Self(Arc::new(Mutex::new(Some(rx))))
    }

    /// Waits for the connection (an error if the 101 was never written).
    pub async fn connection(self) -> Result<Upgraded, tokio::sync::oneshot::error::RecvError> {
        let rx = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        match rx {
            Some(rx) => rx.await,
            None => {
                // Already taken: a receiver whose sender is gone gives the same error.
                let (_, rx) = tokio::sync::oneshot::channel();
                rx.await
            }
        }
    }
}

/// Why a client's request body stopped short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientBodyError {
    #[error("the client closed the connection mid-body")]
    Incomplete,
    #[error("invalid chunked encoding")]
    Invalid,
    /// No byte of it for `timeouts.idle`.
    #[error("the client stopped sending it")]
    Stalled,
}

#[derive(Default)]
struct Slot {
    chunk: Option<Bytes>,
    end: Option<Result<(), ClientBodyError>>,
    /// The service asked for data: time to read it (and to send `100 Continue`).
    wanted: bool,
    receiver_gone: bool,
    receiver: Option<Waker>,
    sender: Option<Waker>,
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn wake(waker: &mut Option<Waker>) {
    if let Some(w) = waker.take() {
        w.wake();
    }
}

/// The request body as the service sees it: chunks handed over one at a time by the
/// connection, read from the client only when asked for (backpressure, `100 Continue`).
pub struct RequestBody {
    slot: Arc<Mutex<Slot>>,
    remaining: Option<u64>,
}

/// The connection's end of a [`RequestBody`].
pub struct BodySender {
    slot: Arc<Mutex<Slot>>,
}

pub enum Demand {
    Wanted,
    ReceiverGone,
}

pub fn body_channel(length: Option<u64>) -> (BodySender, RequestBody) {
    let slot = Arc::new(Mutex::new(Slot::default()));
    (
        BodySender { slot: slot.clone() },
        RequestBody {
            slot,
            remaining: length,
        },
    )
}

impl BodySender {
    pub fn poll_demand(&mut self, cx: &mut Context<'_>) -> Poll<Demand> {
        let mut s = lock(&self.slot);
        if s.receiver_gone {
            return Poll::Ready(Demand::ReceiverGone);
        }
        if s.wanted && s.chunk.is_none() {
            return Poll::Ready(Demand::Wanted);
        }
        if !s.sender.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.sender = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    pub fn send(&mut self, data: Bytes) {
        let mut s = lock(&self.slot);
        s.chunk = Some(data);
        s.wanted = false;
        wake(&mut s.receiver);
    }

    pub fn finish(&mut self, result: Result<(), ClientBodyError>) {
        let mut s = lock(&self.slot);
        s.end = Some(result);
        wake(&mut s.receiver);
    }
}

impl Drop for BodySender {
    fn drop(&mut self) {
        let mut s = lock(&self.slot);
        if s.end.is_none() {
            s.end = Some(Err(ClientBodyError::Incomplete));
        }
        wake(&mut s.receiver);
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let mut s = lock(&self.slot);
        s.receiver_gone = true;
        wake(&mut s.sender);
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("remaining", &self.remaining)
            .finish()
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, ClientBodyError>>> {
        let mut s = lock(&self.slot);
        if let Some(data) = s.chunk.take() {
            drop(s);
            if let Some(r) = self.remaining.as_mut() {
                *r = r.saturating_sub(data.len() as u64);
            }
            return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
        }
        match s.end {
            Some(Ok(())) => return Poll::Ready(None),
            Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            None => {}
        }
        s.wanted = true;
        if !s.receiver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.receiver = Some(cx.waker().clone());
        }
        wake(&mut s.sender);
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == Some(0)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.remaining {
            Some(n) => http_body::SizeHint::with_exact(n),
            None => http_body::SizeHint::default(),
        }
    }
}
