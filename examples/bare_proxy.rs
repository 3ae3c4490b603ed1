//! A baseline for the load comparisons, not part of the gateway: the cheapest proxy that can be
//! built from the parts portcullis uses (hyper's HTTP/1 server and client on a single-threaded
//! tokio runtime), with no authentication at all. Each client connection gets one upstream
//! connection of its own; every request is sent on with a fixed bearer.
//!
//! ```text
//! cargo build --release --example bare_proxy
//! taskset -c 0 target/release/examples/bare_proxy 127.0.0.1:4190 127.0.0.1:18081 'Bearer x'
//! ```
//!
//! What portcullis costs per request above this is its own work (README, "Performance").

use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::rc::Rc;
use tokio::net::{TcpListener, TcpStream};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        return Err("usage: bare_proxy LISTEN UPSTREAM [AUTHORIZATION]".into());
    };
    let bearer = HeaderValue::from_str(&args.next().unwrap_or_else(|| "Bearer x".into()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::bind(&listen).await?;
        loop {
            let (client_io, _) = listener.accept().await?;
            let (upstream, bearer) = (upstream.clone(), bearer.clone());
            tokio::task::spawn_local(async move {
                if let Err(e) = serve(client_io, &upstream, bearer).await {
                    eprintln!("bare_proxy: {e}");
                }
            });
        }
    })
}

async fn serve(
    client_io: TcpStream,
    upstream: &str,
    bearer: HeaderValue,
) -> Result<(), Box<dyn std::error::Error>> {
    client_io.set_nodelay(true)?;
    let upstream_io = TcpStream::connect(upstream).await?;
    upstream_io.set_nodelay(true)?;
    let (sender, connection) = client::handshake::<_, Incoming>(TokioIo::new(upstream_io)).await?;
    tokio::task::spawn_local(connection);
    // HTTP/1: one request at a time per client connection, so one upstream sender serves it.
    let sender = Rc::new(RefCell::new(sender));
    let service = service_fn(move |mut req: Request<Incoming>| {
        req.headers_mut().insert(AUTHORIZATION, bearer.clone());
        let sender = sender.clone();
        async move {
            std::future::poll_fn(|cx| sender.borrow_mut().poll_ready(cx)).await?;
            let sent = sender.borrow_mut().send_request(req);
            sent.await
        }
    });
    // A client that leaves mid-request (as wrk does at the end of a run) is not an error here.
    let _ = server::Builder::new()
        .serve_connection(TokioIo::new(client_io), service)
        .await;
    Ok(())
}
