//! The listener: accept loop, HTTP/1.1 (our own, see [`h1`]) and HTTP/2 (hyper) connections,
//! graceful shutdown.

pub mod h1;
pub mod h2;
pub mod tls;

use crate::body::Body;
use crate::live::{Generation, Live};
use crate::proxy::forward::ConnInfo;
use crate::stack::Gateway;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::Service;

/// Takes a connection already waiting in the accept queue, if any, without waiting (a plain
/// non-blocking accept: tokio's cached readiness may not know of it yet).
fn accept_now(listener: &TcpListener) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    let (socket, addr) = socket2::SockRef::from(listener).accept().ok()?;
    let addr = addr.as_socket()?;
    let stream = std::net::TcpStream::from(socket);
    stream.set_nonblocking(true).ok()?;
    tokio::net::TcpStream::from_std(stream)
        .ok()
        .map(|s| (s, addr))
}

/// What every connection of the listener shares.
struct Listener {
    live: Live,
    h1: Arc<h1::Settings>,
    drain: Arc<h1::Drain>,
    h2: h2::Builder,
    h2_timeouts: h2::Timeouts,
}

/// Serves one client connection, HTTP/1.1 or HTTP/2.
async fn serve_connection<T: h1::io::Transport>(
    io: T,
    h2_only: bool,
    listener: Arc<Listener>,
    info: ConnInfo,
    id: usize,
) {
    let h2_service = {
        let (live, info) = (listener.live.clone(), info.clone());
        move |mut req: http::Request<Body>| {
            req.extensions_mut().insert(info.clone());
            // The current generation: a config reload applies to the very next request.
            let mut svc = live.load().stack.clone();
            svc.call(req)
        }
    };
    if h2_only {
        return serve_h2(io, &listener, h2_service, id).await;
    }
    // HTTP/1.1 requests on a connection come one at a time: the stack is cloned once for the
    // connection and again only after a reload.
    let mut stack = ConnectionStack::new(&listener.live);
    let peer = info.remote.ip();
    let h1_service = move |mut req: http::Request<Body>| {
        req.extensions_mut().insert(info.clone());
        stack.current().call(req)
    };
    let (settings, drain) = (listener.h1.clone(), listener.drain.clone());
    match h1::serve(io, h1_service, settings, drain, id, peer).await {
        h1::Outcome::Http2(io) => serve_h2(io, &listener, h2_service, id).await,
        // The connection is a websocket tunnel now: its slot and gauge stay taken until the
        // tunnel ends (HTTP/2 has no upgrades: extended CONNECT is not enabled).
        h1::Outcome::Tunnel(released) => {
            let _ = released.await;
        }
        h1::Outcome::Closed => {}
    }
}

/// The current generation's request path, for one connection. Cloning the stack takes a
/// dozen reference counts; arc-swap's cache sees a reload with one atomic load.
struct ConnectionStack {
    live: arc_swap::Cache<Live, Arc<Generation>>,
    generation: Arc<Generation>,
    stack: Gateway,
}

impl ConnectionStack {
    fn new(live: &Live) -> Self {
        let mut live = arc_swap::Cache::new(live.clone());
        let generation = live.load().clone();
        Self {
            stack: generation.stack.clone(),
            generation,
            live,
        }
    }

    /// A config reload applies to the very next request.
    fn current(&mut self) -> &mut Gateway {
        let now = self.live.load();
        if !Arc::ptr_eq(now, &self.generation) {
            self.generation = now.clone();
            self.stack = self.generation.stack.clone();
        }
        &mut self.stack
    }
}

/// HTTP/2. Boxed: its state is large, and a task is as large as the largest thing it may do,
/// which would make every idle HTTP/1 connection that large.
async fn serve_h2<I, S, F>(io: I, listener: &Listener, service: S, id: usize)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Fn(http::Request<Body>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<http::Response<Body>, std::convert::Infallible>>
        + Send
        + 'static,
{
    let drain = listener.drain.clone();
    Box::pin(h2::serve(
        io,
        &listener.h2,
        service,
        listener.h2_timeouts,
        drain,
        id,
        listener.h1.metrics.clone(),
    ))
    .await
}

/// An HTTP/2 stream's send buffer: a few frames, as nginx's `http2_chunk_size` buffers.
const STREAM_SEND_BUFFER: usize = 64 * 1024;

/// Whether a client on the TLS listener started with a plain HTTP request: its first byte
/// is a letter (a method), where a TLS record starts with 0x16.
async fn plain_http_to_tls(stream: &tokio::net::TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first).await, Ok(1) if first[0].is_ascii_uppercase())
}

/// nginx's answer to plain HTTP on an https port: a 400 the client can read, then close.
async fn refuse_plain_http(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BODY: &str = "This port speaks HTTPS: use an https:// URL.\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
    // Read what the client sent before closing: closed with unread bytes, the socket would
    // reset the connection, and the client might lose the answer. Bounded by the caller's
    // handshake timeout, and in size.
    // On the heap: inline, it would make every TLS connection's future 4 KiB larger.
    let mut sink = vec![0u8; 4096];
    let mut left: usize = 64 * 1024;
    while left > 0 {
        match stream.read(&mut sink).await {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// A connection's place in `limits.max_connections` and in the open-connections gauge, given
/// back when the connection ends, whichever way.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    open: prometheus::IntGauge,
}

impl Slot {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, open: &prometheus::IntGauge) -> Self {
        open.inc();
        Slot {
            _permit: permit,
            open: open.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A connection to the TLS listener: the handshake (or a readable refusal of plain HTTP)
/// within `handshake_timeout`, then HTTP/2 or HTTP/1.1 as ALPN chose.
async fn serve_tls(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    handshake_timeout: Duration,
    shared: Arc<Listener>,
    info: ConnInfo,
    id: usize,
) {
    let handshake = async {
        if plain_http_to_tls(&stream).await {
            refuse_plain_http(stream).await;
            return None;
        }
        Some(acceptor.accept(stream).await)
    };
    match tokio::time::timeout(handshake_timeout, handshake).await {
        Ok(None) => tracing::debug!("plain HTTP sent to the TLS listener"),
        Ok(Some(Ok(tls_stream))) => {
            let h2_only = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
            // Boxed: rustls' state (1.2 KB) would otherwise be copied into each state of the
            // connection's future, which an idle connection holds all the same.
            serve_connection(Box::new(tls_stream), h2_only, shared, info, id).await
        }
        Ok(Some(Err(e))) => tracing::debug!(error = e.to_string().as_str(), "TLS handshake failed"),
        Err(_) => tracing::debug!("TLS handshake timed out"),
    }
}

impl Listener {
    /// Connection settings from `cfg`: a reload applies them to connections opened after it.
    fn new(live: &Live, cfg: &crate::config::Config, drain: Arc<h1::Drain>) -> Self {
        let metrics = live.load().app.metrics.clone();
        let mut h2 = h2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(cfg.limits.max_header_bytes as u32)
            // Each open stream may hold an upstream connection (a slow upload): one client
            // connection gets no more than nginx's order of them (128; hyper's default: 200).
            .max_concurrent_streams(100)
            // Answer bytes held per stream for a client that does not read them (hyper's
            // default, ~400 KB, let one connection that opens its flow-control window and
            // stops reading hold 100 × that of upstream answers).
            .max_send_buf_size(STREAM_SEND_BUFFER)
            .keep_alive_interval(Some(Duration::from_secs(30)));
        Listener {
            live: live.clone(),
            h1: Arc::new(h1::Settings {
                max_headers: cfg.limits.max_headers,
                max_head_bytes: cfg.limits.max_header_bytes.max(1024),
                header_read: cfg.timeouts.header_read,
                keep_alive: cfg.timeouts.header_read.min(cfg.timeouts.idle),
                idle: cfg.timeouts.idle,
                metrics,
                request_id: cfg.headers.request_id.clone(),
            }),
            drain,
            h2,
            h2_timeouts: h2::Timeouts {
                first_stream: cfg.timeouts.header_read,
                idle: cfg.timeouts.idle,
            },
        }
    }
}

/// Serves until `shutdown` resolves, then drains connections for up to `timeouts.shutdown`.
/// Connection settings (header limits, timeouts) follow reloads for new connections; the
/// listen address, `limits.max_connections` and the TLS files' paths are the start-up ones.
pub async fn serve(
    live: Live,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut cfg = live.load().app.cfg.clone();
    let metrics = live.load().app.metrics.clone();
    let drain = Arc::new(h1::Drain::default());
    let mut shared = Arc::new(Listener::new(&live, &cfg, drain.clone()));
    let tls = match &cfg.tls_server {
        Some((cert, key)) => match tls::ReloadingCert::new(cert, key).and_then(|certs| {
            tokio::spawn(certs.clone().watch(metrics.clone()));
            tls::server_config(certs)
        }) {
            Ok(server_config) => Some(tokio_rustls::TlsAcceptor::from(server_config)),
            Err(e) => {
                // Validated at start-up; only a file changed in between can get here.
                tracing::error!(error = e.to_string().as_str(), "cannot serve TLS");
                return;
            }
        },
        None => None,
    };
    let permits = Arc::new(Semaphore::new(cfg.limits.max_connections));
    tokio::pin!(shutdown);
    // After the shutdown signal, connections already waiting in the kernel's accept queue are
    // still taken (and served with Connection: close) rather than reset by closing the socket.
    let mut closing = false;
    let mut next_id = 0usize;
    loop {
        let permit = if closing {
            match permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                _ = &mut shutdown => { closing = true; continue }
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            }
        };
        let accepted = if closing {
            match accept_now(&listener) {
                Some(x) => Ok(x),
                None => break,
            }
        } else {
            tokio::select! {
                _ = &mut shutdown => { closing = true; continue }
                r = listener.accept() => r,
            }
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: log, breathe, go on.
                tracing::warn!(error = e.to_string().as_str(), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let current = live.load().app.cfg.clone();
        if !Arc::ptr_eq(&current, &cfg) {
            shared = Arc::new(Listener::new(&live, &current, drain.clone()));
            cfg = current;
        }
        let info = ConnInfo {
            remote,
            tls: tls.is_some(),
            ip: crate::proxy::headers::ip_header(remote.ip()),
        };
        let shared = shared.clone();
        let slot = Slot::new(permit, &metrics.connections);
        next_id = next_id.wrapping_add(1);
        let id = next_id;
        // Separate tasks: a plain connection's does not carry the TLS one's state.
        match &tls {
            None => tokio::spawn(async move {
                serve_connection(stream, false, shared, info, id).await;
                drop(slot);
            }),
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let handshake_timeout = cfg.timeouts.header_read;
                tokio::spawn(async move {
                    serve_tls(acceptor, stream, handshake_timeout, shared, info, id).await;
                    drop(slot);
                })
            }
        };
    }
    drop(listener);
    // Connections accepted just before the listener closed may not have sent their request
    // yet: give them a moment to be served (with Connection: close) before closing idle ones.
    tokio::time::sleep(cfg.timeouts.header_read.min(Duration::from_secs(1))).await;
    tracing::info!("draining connections");
    let tunnels = live.load().app.tunnels.clone();
    let background = live.load().app.background.clone();
    drain.start();
    let drained = async {
        while drain.open_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Websocket tunnels live outside hyper's connections: wait for them too, and for
        // what answered requests left running (a sign-out's revocation at the provider).
        while tunnels.count() > 0 || background.count() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        _ = drained => tracing::info!("all connections closed"),
        // The current config's: a reload may have changed it.
        _ = tokio::time::sleep(live.load().app.cfg.timeouts.shutdown) => {
            // What is still in flight is dropped with the runtime, by us: logged 503, not 499.
            metrics.cut_off_in_flight();
            tracing::warn!(
                requests = metrics.in_flight.get(),
                "shutdown timeout: closing remaining connections"
            );
        }
    }
}
