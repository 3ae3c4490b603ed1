//! A websocket tunnel: bytes both ways until either side closes, or until neither side has
//! sent anything for `timeouts.tunnel_idle`. A peer gone without closing (a laptop put to
//! sleep, a NAT that forgot the flow) would otherwise hold its client connection slot and its
//! upstream connection for ever. A side that closes its half is passed on as such, and the
//! other side then has `HALF_CLOSE_GRACE` to finish: a client that left would otherwise keep
//! the app's side open until the idle limit (nginx closes both at once).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

/// How long the other direction may go on once one side has closed its half: enough for the
/// app's answer to a websocket close frame, short enough that a departed client's tunnel goes.
pub const HALF_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Relays between `client` and `upstream`; returns when both directions have ended (the
/// second within `HALF_CLOSE_GRACE` of the first), when either fails, or when the tunnel has
/// been idle for `idle` (zero: never). The caller then drops both.
pub async fn relay<C, U>(client: &mut C, upstream: &mut U, idle: Duration) -> Idle
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let (mut client_in, mut client_out) = tokio::io::split(Watched {
        io: client,
        activity: &activity,
    });
    let (mut upstream_in, mut upstream_out) = tokio::io::split(Watched {
        io: upstream,
        activity: &activity,
    });
    let both_ways = both_ways(
        one_way(&mut client_in, &mut upstream_out),
        one_way(&mut upstream_in, &mut client_out),
    );
    // The timer is set for the idle limit counted from the last byte seen when it was set;
    // when it fires it is set again if bytes came meanwhile (one wake-up per `idle` at most).
    let watch = async {
        if idle.is_zero() {
            return std::future::pending().await;
        }
        loop {
            let deadline = activity.last() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        () = both_ways => Idle::No,
        () = watch => Idle::Yes,
    }
}

/// Copies one direction to its end, then closes the writing half (the half-close passed on).
async fn one_way<R, W>(from: &mut R, to: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::io::copy(from, to).await?;
    to.shutdown().await
}

/// Runs both directions; a failure ends both, and a clean end leaves the other direction
/// `HALF_CLOSE_GRACE` to finish.
async fn both_ways(
    to_upstream: impl std::future::Future<Output = io::Result<()>>,
    to_client: impl std::future::Future<Output = io::Result<()>>,
) {
    tokio::pin!(to_upstream, to_client);
    let rest = tokio::select! {
        done = &mut to_upstream => match done {
            Ok(()) => futures_util::future::Either::Left(to_client),
            Err(_) => return,
        },
        done = &mut to_client => match done {
            Ok(()) => futures_util::future::Either::Right(to_upstream),
            Err(_) => return,
        },
    };
    let _ = tokio::time::timeout(HALF_CLOSE_GRACE, rest).await;
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

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

    /// A tunnel with an hour's idle limit: its client's end, its app's end, and its task.
    fn hour_long_tunnel() -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<Idle>) {
        let (client, mut client_end) = tokio::io::duplex(64);
        let (upstream, mut upstream_end) = tokio::io::duplex(64);
        let idle = Duration::from_secs(3600);
        let tunnel =
            tokio::spawn(async move { relay(&mut client_end, &mut upstream_end, idle).await });
        (client, upstream, tunnel)
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_close_is_passed_on_and_the_other_side_gets_a_grace() {
        let (mut client, mut upstream, tunnel) = hour_long_tunnel();
        client.write_all(b"bye").await.unwrap();
        client.shutdown().await.unwrap();
        // The app sees the bytes, then the end of the client's half.
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        // Within the grace the app's answer still reaches the client...
        tokio::time::sleep(HALF_CLOSE_GRACE / 2).await;
        upstream.write_all(b"ok").await.unwrap();
        let mut answer = [0u8; 2];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"ok");
        // ...but an app that keeps its side open does not keep the tunnel.
        let ended = tokio::time::timeout(HALF_CLOSE_GRACE, tunnel).await;
        assert_eq!(ended.expect("still open").unwrap(), Idle::No);
        assert_eq!(
            client.read(&mut answer).await.unwrap(),
            0,
            "client not closed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_closed_by_both_ends_at_once() {
        let (mut client, mut upstream, tunnel) = hour_long_tunnel();
        upstream.write_all(b"close").await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"close");
        client.shutdown().await.unwrap();
        // No grace waited: both halves ended.
        let ended = tokio::time::timeout(Duration::from_millis(10), tunnel).await;
        assert_eq!(ended.expect("still open").unwrap(), Idle::No);
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
