//! HTTP/2 connections (hyper's server), with the limits hyper's server does not keep itself:
//! a connection that opens no stream within the header-read timeout, or none for the idle
//! timeout, is closed (GOAWAY first); so is every connection when the listener drains, and
//! one whose client takes no byte of the answers waiting for it for the idle timeout (its
//! flow-control window kept shut: a slow reader).

use super::h1::Drain;
use crate::body::{Body, BodyError};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
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

/// The streams of one connection: how many are open (request received, response body not yet
/// ended) and when the last one ended.
struct Activity {
    opened: AtomicBool,
    open: AtomicUsize,
    /// Milliseconds after `start` at which the last stream ended.
    quiet_since_ms: AtomicU64,
    /// Response bodies that handed hyper a part it has not yet sent on (hyper asks for the
    /// next part once the client's flow-control window takes this one).
    owed: AtomicUsize,
    /// How many times hyper came back for more after a part: progress of those bodies.
    taken: AtomicU64,
    start: Instant,
    /// Where a response body that failed upstream is counted.
    metrics: Arc<crate::metrics::Metrics>,
}

impl Activity {
    fn new(metrics: Arc<crate::metrics::Metrics>) -> Arc<Self> {
        Arc::new(Self {
            opened: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            quiet_since_ms: AtomicU64::new(0),
            owed: AtomicUsize::new(0),
            taken: AtomicU64::new(0),
            start: Instant::now(),
            metrics,
        })
    }

    fn begin(self: &Arc<Self>) -> StreamGuard {
        self.opened.store(true, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
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
/// counted as owed to the client between handing hyper a part and hyper asking for the next.
struct Tracked {
    body: Body,
    open: StreamGuard,
    owing: bool,
}

impl Tracked {
    fn settle(&mut self) {
        if self.owing {
            self.owing = false;
            let activity = &self.open.0;
            activity.owed.fetch_sub(1, Ordering::Relaxed);
            activity.taken.fetch_add(1, Ordering::Relaxed);
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
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match &frame {
            // The last part: hyper sends it and drops the body (the stream then counts as
            // ended, and the connection as quiet).
            Poll::Ready(Some(Ok(_))) if !this.body.is_end_stream() => {
                this.owing = true;
                this.open.0.owed.fetch_add(1, Ordering::Relaxed);
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
            Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked {
                body,
                open,
                owing: false,
            }))
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
    // What `Activity::taken` was at the last look while a stream was open.
    let mut taken_before = 0;
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
                    tracing::debug!(error = %e, "HTTP/2 connection closed with error");
                }
                return;
            }
            _ = &mut drained, if closing_since.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing_since = Some(Instant::now());
            }
            _ = tokio::time::sleep_until(check_at) => {
                let quiet_for = activity.quiet_since().elapsed();
                if !activity.is_quiet() {
                    // Answers wait for the client, and it took none of them since the last
                    // look, a whole limit ago: a slow reader holding the streams open.
                    let taken = activity.taken.load(Ordering::Relaxed);
                    if activity.owed.load(Ordering::Relaxed) > 0 && taken == taken_before {
                        tracing::debug!("HTTP/2 client takes no response data: closing");
                        return;
                    }
                    taken_before = taken;
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
