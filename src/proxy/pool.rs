//! Upstream HTTP/1.1 connections, kept per worker thread and handed straight to the next
//! request: no lock shared between cores, and no task spawned per request to wait for a
//! connection to come back (a connection returns to the pool when its response body is done).

use crate::body::Body;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tower::Service;

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// Which upstream a connection goes to (one pool per client generation and origin).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    pool: u64,
    https: bool,
    authority: Authority,
}

impl Origin {
    fn is(&self, pool: u64, https: bool, authority: &Authority) -> bool {
        self.pool == pool && self.https == https && self.authority == *authority
    }
}

struct Idle {
    tx: SendRequest<Body>,
    since: Instant,
}

impl Idle {
    fn usable(&self, now: Instant, idle_timeout: Duration) -> bool {
        !self.tx.is_closed() && now.duration_since(self.since) < idle_timeout
    }
}

/// Where a lent connection goes back to: one per thread, pool and origin, shared by the
/// connections lent out, so that each response body carries a pointer to it.
struct Home {
    origin: Origin,
    /// Dead once the pool is dropped (a reload with other client options): then the entry goes.
    pool_alive: Weak<()>,
    max_idle: usize,
    idle_timeout: Duration,
}

/// A thread's idle connections to one origin, oldest first.
struct PerOrigin {
    home: Arc<Home>,
    conns: VecDeque<Idle>,
}

thread_local! {
    static IDLE: RefCell<Vec<PerOrigin>> = const { RefCell::new(Vec::new()) };
}

/// This thread's entry for the origin `is` picks, made with `home()` when there is none
/// (the entries of pools replaced by a reload go then).
fn entry(
    idle: &mut Vec<PerOrigin>,
    is: impl Fn(&Origin) -> bool,
    home: impl FnOnce() -> Arc<Home>,
) -> &mut PerOrigin {
    let at = match idle.iter().position(|p| is(&p.home.origin)) {
        Some(at) => at,
        None => {
            idle.retain(|p| p.home.pool_alive.strong_count() > 0);
            idle.push(PerOrigin {
                home: home(),
                conns: VecDeque::new(),
            });
            idle.len() - 1
        }
    };
    &mut idle[at]
}

pub struct Pool {
    id: u64,
    alive: Arc<()>,
    connector: HttpsConnector<HttpConnector>,
    idle_timeout: Duration,
    /// Idle connections kept per origin and thread.
    max_idle: usize,
}

impl Pool {
    pub fn new(
        id: u64,
        connector: HttpsConnector<HttpConnector>,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Self {
        Self {
            id,
            alive: Arc::new(()),
            connector,
            idle_timeout,
            max_idle,
        }
    }

    /// Sends `req` (origin-form URI) to `scheme://authority`. A request that never left on a
    /// reused connection (the upstream closed it meanwhile) is retried once on a new one.
    /// `now`: the caller's clock reading (connections idle since before it are stale; a
    /// connection given back counts as idle from it).
    ///
    /// An async block, not an async fn: its state holds the request once, where an async fn
    /// keeps a second slot for the argument (320 bytes more in every request's future).
    pub fn send<'a>(
        &'a self,
        scheme: &'a Scheme,
        authority: &'a Authority,
        mut req: Request<Body>,
        now: Instant,
    ) -> impl std::future::Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + 'a
    {
        let https = *scheme == Scheme::HTTPS;
        async move {
            loop {
                let (home, idle) = self.checkout(https, authority, now);
                let (mut tx, reused) = match idle {
                    Some(tx) => (tx, true),
                    // Boxed: the handshake holds a whole connection (3 KB), which would otherwise
                    // make every request's future that large, to be allocated and copied.
                    None => (Box::pin(self.connect(&home.origin)).await?, false),
                };
                if let Err(e) = tx.ready().await {
                    if reused {
                        continue;
                    }
                    return Err(e.into());
                }
                match tx.try_send_request(req).await {
                    Ok(resp) => {
                        let conn = Some(Returning {
                            home,
                            tx,
                            since: now,
                        });
                        return Ok(resp.map(|body| UpstreamBody {
                            body,
                            ended: false,
                            conn,
                        }));
                    }
                    Err(mut e) => match e.take_message() {
                        Some(unsent) if reused => req = unsent,
                        _ => return Err(e.into_error().into()),
                    },
                }
            }
        }
    }

    /// This thread's entry for the origin (made on first use), and its most recently used
    /// live connection, dropping dead and stale ones.
    fn checkout(
        &self,
        https: bool,
        authority: &Authority,
        now: Instant,
    ) -> (Arc<Home>, Option<SendRequest<Body>>) {
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let entry = entry(
                &mut idle,
                |o| o.is(self.id, https, authority),
                || {
                    Arc::new(Home {
                        origin: Origin {
                            pool: self.id,
                            https,
                            authority: authority.clone(),
                        },
                        pool_alive: Arc::downgrade(&self.alive),
                        max_idle: self.max_idle,
                        idle_timeout: self.idle_timeout,
                    })
                },
            );
            let mut tx = None;
            while let Some(c) = entry.conns.pop_back() {
                if c.usable(now, self.idle_timeout) {
                    tx = Some(c.tx);
                    break;
                }
            }
            (entry.home.clone(), tx)
        })
    }

    async fn connect(&self, origin: &Origin) -> Result<SendRequest<Body>, SendError> {
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
        let mut connector = self.connector.clone();
        let io = connector
            .call(uri)
            .await
            .map_err(|e| SendError::Connect(crate::error::source_chain(&*e)))?;
        let (tx, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(tx)
    }
}

/// A connection lent to one request, given back when its response body is complete.
struct Returning {
    home: Arc<Home>,
    tx: SendRequest<Body>,
    /// When the request that borrowed it started (no clock reading of its own).
    since: Instant,
}

impl Returning {
    fn give_back(self) {
        if self.tx.is_closed() || self.home.pool_alive.strong_count() == 0 {
            return;
        }
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            // Usually the entry it came from (same `Home`: no authority comparison); on another
            // worker thread (the task moved), that thread's entry for the origin.
            let home = &self.home;
            let same = |o: &Origin| std::ptr::eq(o, &home.origin) || *o == home.origin;
            let conns = &mut entry(&mut idle, same, || home.clone()).conns;
            let now = self.since;
            // Connections unused for the idle timeout are closed as traffic goes on.
            if conns
                .front()
                .is_some_and(|c| !c.usable(now, self.home.idle_timeout))
            {
                conns.pop_front();
            }
            if conns.len() < self.home.max_idle {
                conns.push_back(Idle {
                    tx: self.tx,
                    since: now,
                });
            }
        });
    }
}

/// An upstream response body; its connection goes back to the pool once the body has been
/// read to the end. Dropped early (the client went away), the connection is closed instead:
/// the rest of that response is still on the wire.
pub struct UpstreamBody {
    body: Incoming,
    /// Seen the end (a chunked body only says so by ending).
    ended: bool,
    conn: Option<Returning>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    /// Keeps the connection out of the pool (it was upgraded to a tunnel).
    pub fn detach(&mut self) {
        self.conn = None;
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
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>> {
        let frame = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if let std::task::Poll::Ready(None) = frame {
            self.ended = true;
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

    fn pool() -> Pool {
        let tls = crate::server::tls::client_config(None, None).unwrap();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Pool::new(1, connector, Duration::from_secs(60), 8)
    }

    #[test]
    fn a_body_finished_on_another_thread_leaves_its_connection_there() {
        let authority = upstream();
        let pool = Arc::new(pool());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let get = || Request::get("/").body(Body::Empty).unwrap();
        let resp = rt
            .block_on(pool.send(&Scheme::HTTP, &authority, get(), Instant::now()))
            .unwrap();
        let mut body = resp.into_body();
        rt.block_on(async {
            while let Some(frame) = body.frame().await {
                frame.unwrap();
            }
        });
        // The task that read it moved to another worker thread, where the body is dropped.
        let elsewhere = {
            let (pool, authority) = (pool.clone(), authority.clone());
            std::thread::spawn(move || {
                drop(body);
                pool.checkout(false, &authority, Instant::now()).1.is_some()
            })
            .join()
            .unwrap()
        };
        assert!(
            elsewhere,
            "the connection is idle on the thread that finished with it"
        );
        let here = pool.checkout(false, &authority, Instant::now()).1;
        assert!(here.is_none(), "and only there");
    }
}
