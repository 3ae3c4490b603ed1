//! A websocket tunnel: bytes both ways until either side closes, or until neither side has
//! sent anything for `timeouts.tunnel_idle`. A peer gone without closing (a laptop put to
//! sleep, a NAT that forgot the flow) would otherwise hold its client connection slot and its
//! upstream connection for ever.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Relays between `client` and `upstream`; returns when either side closes or fails, or when
/// the tunnel has been idle for `idle` (zero: never). The caller then drops both.
pub async fn relay<C, U>(client: &mut C, upstream: &mut U, idle: Duration) -> Idle
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    if idle.is_zero() {
        let _ = tokio::io::copy_bidirectional(client, upstream).await;
        return Idle::No;
    }
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let mut client = Watched {
        io: client,
        activity: &activity,
    };
    let mut upstream = Watched {
        io: upstream,
        activity: &activity,
    };
    // The timer is set for the idle limit counted from the last byte seen when it was set;
    // when it fires it is set again if bytes came meanwhile (one wake-up per `idle` at most).
    let watch = async {
        loop {
            let deadline = activity.last() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => Idle::No,
        () = watch => Idle::Yes,
    }
}

/// Whether the tunnel ended for being idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    Yes,
    No,
}

/// When a byte last came in from either side.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn seen(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }
}

/// A side of the tunnel whose reads count as activity.
struct Watched<'a, T> {
    io: &'a mut T,
    activity: &'a Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut *self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.seen();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn an_idle_tunnel_ends_and_a_busy_one_does_not() {
        let (mut client, mut client_end) = tokio::io::duplex(64);
        let (mut upstream, mut upstream_end) = tokio::io::duplex(64);
        let idle = Duration::from_secs(60);
        let tunnel =
            tokio::spawn(async move { relay(&mut client_end, &mut upstream_end, idle).await });
        // Busy for three idle periods: a byte every half period, each way in turn.
        for i in 0..6u8 {
            tokio::time::sleep(idle / 2).await;
            let (from, to) = if i % 2 == 0 {
                (&mut client, &mut upstream)
            } else {
                (&mut upstream, &mut client)
            };
            from.write_all(&[i]).await.unwrap();
            let mut got = [0u8];
            to.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [i]);
        }
        assert!(!tunnel.is_finished());
        // Then silent: it ends within one idle period of the last byte.
        let ended = tokio::time::timeout(idle + Duration::from_secs(1), tunnel).await;
        assert_eq!(ended.expect("still open").unwrap(), Idle::Yes);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_limit_never_ends_a_tunnel() {
        let (_client, mut client_end) = tokio::io::duplex(64);
        let (_upstream, mut upstream_end) = tokio::io::duplex(64);
        let tunnel =
            tokio::spawn(
                async move { relay(&mut client_end, &mut upstream_end, Duration::ZERO).await },
            );
        tokio::time::sleep(Duration::from_secs(86_400)).await;
        assert!(!tunnel.is_finished());
    }
}
