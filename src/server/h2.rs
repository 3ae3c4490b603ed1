//! HTTP/2 connections (hyper's server), with the limits hyper's server does not keep itself:
//! a connection that opens no stream within the header-read timeout, or none for the idle
//! timeout, is closed (GOAWAY first); so is every connection when the listener drains, and
//! one with an answer its client has taken nothing of for the idle timeout (its flow-control
//! window kept shut: a slow reader), whatever it does with its other streams. After
//! `MAX_STREAMS` streams a connection is asked to close (GOAWAY; open streams finish), as
//! nginx does after 1000 requests: streams reset one by one once accepted (past h2's own
//! rapid-reset guard) each leave work running upstream, so a connection may not open them
//! without end; a client that opens more than a few after the GOAWAY is cut off.

use super::h1::Drain;
use crate::body::{Body, BodyError};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

pub type Builder = hyper::server::conn::http2::Builder<TokioExecutor>;

/// The timeouts an HTTP/2 connection keeps.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For the first stream.
    pub first_stream: Duration,
    /// Between streams.
    pub idle: Duration,
}

/// Streams a connection may open before it is asked to close.
const MAX_STREAMS: usize = 1000;

/// Streams a client may still open once asked to close: those it sent before the GOAWAY
/// reached it (a client must open none after, RFC 9113 §6.8). One that goes on, ignoring
/// the GOAWAY (and not answering the PING that would let h2 refuse them), is cut off.
const LATE_STREAMS: usize = 100;

/// The streams of one connection: how many are open (request received, response body not yet
/// ended) and when the last one ended.
struct Activity {
    opened: AtomicBool,
    open: AtomicUsize,
    /// Streams opened so far; at `MAX_STREAMS`, `spent` is notified, and `overrun` at
    /// `LATE_STREAMS` more.
    total: AtomicUsize,
    spent: tokio::sync::Notify,
    overrun: tokio::sync::Notify,
    /// Milliseconds after `start` at which the last stream ended.
    quiet_since_ms: AtomicU64,
    owed: Mutex<Owed>,
    start: Instant,
    /// Where a response body that failed upstream is counted.
    metrics: Arc<crate::metrics::Metrics>,
}

impl Activity {
    fn new(metrics: Arc<crate::metrics::Metrics>) -> Arc<Self> {
        Arc::new(Self {
            opened: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
            spent: tokio::sync::Notify::new(),
            overrun: tokio::sync::Notify::new(),
            quiet_since_ms: AtomicU64::new(0),
            owed: Mutex::new(Owed::default()),
            start: Instant::now(),
            metrics,
        })
    }

    fn begin(self: &Arc<Self>) -> StreamGuard {
        self.opened.store(true, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        // Kept for the loop if it is not waiting right now.
        match self.total.fetch_add(1, Ordering::Relaxed) + 1 {
            MAX_STREAMS => self.spent.notify_one(),
            n if n == MAX_STREAMS + LATE_STREAMS => self.overrun.notify_one(),
            _ => {}
        }
        StreamGuard(self.clone())
    }

    fn quiet_since(&self) -> Instant {
        self.start + Duration::from_millis(self.quiet_since_ms.load(Ordering::Relaxed))
    }

    fn is_quiet(&self) -> bool {
        self.open.load(Ordering::Relaxed) == 0
    }

    fn ever_opened(&self) -> bool {
        self.opened.load(Ordering::Relaxed)
    }

    /// A response body now waits for its client: returns the round it began waiting in.
    fn owe(&self) -> u64 {
        let mut owed = self.owed.lock().unwrap_or_else(|p| p.into_inner());
        owed.new += 1;
        owed.round
    }

    /// The body that began waiting in `round` was taken up again.
    fn settle(&self, round: u64) {
        let mut owed = self.owed.lock().unwrap_or_else(|p| p.into_inner());
        if round < owed.round {
            owed.old -= 1;
        } else {
            owed.new -= 1;
        }
    }

    /// The connection's periodic look: has a body waited since the previous look (for a whole
    /// period) without its client taking anything of it? Then begins the next period.
    fn stalled_since_last_look(&self) -> bool {
        let mut owed = self.owed.lock().unwrap_or_else(|p| p.into_inner());
        if owed.old > 0 {
            return true;
        }
        owed.old = std::mem::take(&mut owed.new);
        owed.round += 1;
        false
    }
}

/// Response bodies waiting for their clients: a body waits from when its head goes to hyper
/// until hyper asks it for a part, and again from each part it hands over until hyper asks
/// for the next or, after the last, drops it. hyper sends a part, and comes back for more,
/// only once the client's flow-control window has room, so a client that keeps the window
/// shut leaves its answers waiting. Counted by the period of the connection's looks they
/// began waiting in.
#[derive(Default)]
struct Owed {
    round: u64,
    /// Bodies waiting since before the last look.
    old: usize,
    /// Bodies that began waiting after it.
    new: usize,
}

/// One open stream; dropped with the response body (or the request, if it never got one).
struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let ms = self.0.start.elapsed().as_millis() as u64;
        self.0.quiet_since_ms.store(ms, Ordering::Relaxed);
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its stream counted as open until hyper is done with it, and
/// counted as waiting for its client (see `Owed`) until hyper asks it for a part.
struct Tracked {
    body: Body,
    open: StreamGuard,
    /// The round it began waiting in, while it waits.
    owing: Option<u64>,
}

impl Tracked {
    fn new(body: Body, open: StreamGuard) -> Self {
        let owing = (!http_body::Body::is_end_stream(&body)).then(|| open.0.owe());
        Self { body, open, owing }
    }

    fn settle(&mut self) {
        if let Some(round) = self.owing.take() {
            self.open.0.settle(round);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.settle();
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        this.settle();
        let mut frame = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(&frame, Poll::Ready(Some(Ok(f))) if f.is_trailers()) {
            // An upstream's trailers are not passed on (an HTTP/1.1 client gets none either):
            // a `Set-Cookie` or a framing field in them would pass the header hygiene. What
            // follows them is the body's end.
            frame = Pin::new(&mut this.body).poll_frame(cx);
        }
        match &frame {
            // hyper holds the part until the client's window has room for it, and only then
            // asks for the next one (or, after the last, drops the body).
            Poll::Ready(Some(Ok(_))) => {
                this.owing = Some(this.open.0.owe());
            }
            Poll::Ready(Some(Err(e))) if matches!(this.body, Body::Upstream(_)) => {
                // The response head is gone (to hyper): no request id to name.
                crate::proxy::forward::upstream_body_failed(&this.open.0.metrics, e, None);
            }
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves one HTTP/2 connection until it ends, goes quiet for too long, or the listener drains.
pub async fn serve<I, S, F>(
    io: I,
    builder: &Builder,
    service: S,
    timeouts: Timeouts,
    drain: Arc<Drain>,
    id: usize,
    metrics: Arc<crate::metrics::Metrics>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Fn(http::Request<Body>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<http::Response<Body>, std::convert::Infallible>> + Send + 'static,
{
    let activity = Activity::new(metrics);
    let streams = activity.clone();
    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let open = streams.begin();
        let response = service(req.map(Body::from));
        async move {
            let resp = response.await?;
            Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked::new(body, open)))
        }
    });
    let _open = drain.hold();
    // Created before the flag is read: a drain that starts in between still wakes it.
    let drained = drain.notified(id);
    tokio::pin!(drained);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    if drain.is_draining() {
        conn.as_mut().graceful_shutdown();
    }
    // Set once the connection was asked to close: GOAWAY sent, open streams may finish.
    let mut closing_since: Option<Instant> = None;
    loop {
        let limit = if activity.ever_opened() {
            timeouts.idle
        } else {
            timeouts.first_stream
        };
        // While a stream is open, look again a whole limit later (no timer churn).
        let check_at = if activity.is_quiet() {
            let at =
                closing_since.map_or(activity.quiet_since(), |t| t.max(activity.quiet_since()));
            // A stream opening does not wake this loop: look again within the idle timeout
            // all the same (a header-read timeout longer than it would delay the streams'
            // check below).
            (at + limit).min(Instant::now() + timeouts.idle)
        } else {
            Instant::now() + limit
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = e.to_string().as_str(), "HTTP/2 connection closed with error");
                }
                return;
            }
            _ = &mut drained, if closing_since.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing_since = Some(Instant::now());
            }
            _ = activity.spent.notified(), if closing_since.is_none() => {
                tracing::debug!("HTTP/2 connection opened {MAX_STREAMS} streams: closing");
                conn.as_mut().graceful_shutdown();
                closing_since = Some(Instant::now());
            }
            _ = activity.overrun.notified() => {
                tracing::debug!("HTTP/2 client opens streams after GOAWAY: closing");
                return;
            }
            _ = tokio::time::sleep_until(check_at) => {
                let quiet_for = activity.quiet_since().elapsed();
                if !activity.is_quiet() {
                    // An answer has waited for the client since the last look, a whole limit
                    // ago, and it took nothing of it: a slow reader holding streams open
                    // (and, through them, upstream connections).
                    if activity.stalled_since_last_look() {
                        tracing::debug!("HTTP/2 client takes no response data: closing");
                        return;
                    }
                    continue;
                }
                if quiet_for < limit {
                    continue;
                }
                match closing_since {
                    None => {
                        tracing::debug!("HTTP/2 connection without streams for too long: closing");
                        conn.as_mut().graceful_shutdown();
                        closing_since = Some(Instant::now());
                    }
                    // GOAWAY went out a limit ago and the client has not closed: nothing is
                    // open, so the connection goes.
                    Some(t) if t.elapsed() >= limit => return,
                    Some(_) => {}
                }
            }
        }
    }
}
