//! The header-read deadline of a client connection, kept without a timer per request.
//!
//! A client must send each request head within `timeouts.header_read` of the gateway starting
//! to wait for it (from the connection's start, or from the gateway's last write): silent,
//! stalled and trickling (slowloris) clients lose their connection slot. hyper can do this
//! itself, but arms and cancels a timer for every request. Here one timer per connection
//! fires every `header_read` and looks at what happened since the last time: a request
//! started or finished, a response byte written, or a request still in progress all mean
//! progress, and the timer is re-armed. Bytes read never count (a slowloris sends bytes).
//! The check is lazy: a client gets between one and two times `header_read`.
//!
//! HTTP/2 connections (recognised by their preface) are left to the HTTP/2 keep-alive once
//! their preface is in, upgraded connections (websockets) to the tunnel.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What the service tells the connection's deadline: requests started and finished.
#[derive(Debug, Default)]
pub struct Activity {
    /// Requests started plus requests finished.
    events: AtomicU64,
    in_flight: AtomicU64,
    /// Switched protocols (a websocket): no more request heads to wait for.
    upgraded: AtomicBool,
}

impl Activity {
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    pub fn upgraded(&self) {
        self.upgraded.store(true, Ordering::Relaxed);
    }

    fn request_finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.events.fetch_add(1, Ordering::Relaxed);
    }
}

/// A response body that tells the connection's [`Activity`] when it is done (sent or
/// dropped): a response being streamed, however slowly, is a request in progress.
pub struct Tracked<B> {
    body: B,
    activity: Arc<Activity>,
}

impl<B> Tracked<B> {
    pub fn new(body: B, activity: Arc<Activity>) -> Self {
        Self { body, activity }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.activity.request_finished();
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub struct HeadDeadline<S> {
    inner: S,
    within: Duration,
    activity: Arc<Activity>,
    /// Successful writes (response bytes going out are progress).
    writes: u64,
    /// `events + writes` when the timer was last armed.
    seen: u64,
    /// Still reading the first bytes, to recognise HTTP/2.
    sniffing: bool,
    first: Vec<u8>,
    /// None once the connection turned out to be HTTP/2.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> HeadDeadline<S> {
    pub fn new(inner: S, within: Duration, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            within,
            activity,
            writes: 0,
            seen: 0,
            sniffing: true,
            first: Vec::new(),
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }

    fn progress(&self) -> u64 {
        self.activity
            .events
            .load(Ordering::Relaxed)
            .wrapping_add(self.writes)
    }

    /// The timer fired: re-arm it if anything happened since, else the client is too slow.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let progress = self.progress();
        let busy = self.activity.in_flight.load(Ordering::Relaxed) > 0;
        let Some(deadline) = self.deadline.as_mut() else {
            return false;
        };
        if deadline.as_mut().poll(cx).is_pending() {
            return false;
        }
        if self.activity.upgraded.load(Ordering::Relaxed) {
            self.deadline = None;
            return false;
        }
        if progress == self.seen && !busy {
            return true;
        }
        self.seen = progress;
        deadline.as_mut().reset(Instant::now() + self.within);
        // Register the re-armed timer with this task.
        let _ = deadline.as_mut().poll(cx);
        false
    }

    fn note_first_bytes(&mut self, bytes: &[u8]) {
        let want = H2_PREFACE.len() - self.first.len();
        self.first
            .extend_from_slice(&bytes[..bytes.len().min(want)]);
        if !H2_PREFACE.starts_with(&self.first) {
            // HTTP/1: keep the deadline.
            self.sniffing = false;
            self.first = Vec::new();
        } else if self.first.len() == H2_PREFACE.len() {
            self.sniffing = false;
            self.deadline = None;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if this.sniffing {
                    this.note_first_bytes(&buf.filled()[before..]);
                }
                Poll::Ready(r)
            }
            Poll::Pending if this.expired(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client too slow to send a request",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.writes += (n > 0) as u64;
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.writes += (n > 0) as u64;
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
