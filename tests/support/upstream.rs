//! The application behind the gateway: an in-process hyper server on its own thread
//! and runtime. It echoes every request as JSON (method, path, query, version,
//! headers, body length and hash) and records it; `/slow` answers after 3 s,
//! `/cacheable...` with `Cache-Control: public, max-age=600`.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The length of `/big`'s answer.
pub const BIG_BODY: usize = 32 << 20;

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub version: String,
    /// Names lower-case, in arrival order, duplicates kept.
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
    /// FNV-1a 64 of the body, hex.
    pub body_fnv: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The bearer token this request carried.
    pub fn bearer(&self) -> String {
        let auth = self
            .header("authorization")
            .unwrap_or_else(|| panic!("no Authorization at the upstream: {self:?}"));
        auth.strip_prefix("Bearer ")
            .unwrap_or_else(|| panic!("not a bearer: {auth}"))
            .to_string()
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "version": self.version,
            "headers": self.headers,
            "body_len": self.body_len,
            "body_fnv": self.body_fnv,
        })
    }
}

/// FNV-1a 64-bit, streaming.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

pub struct Upstream {
    pub port: u16,
    records: Arc<Mutex<Vec<Recorded>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

async fn handle(
    req: Request<Incoming>,
    records: Arc<Mutex<Vec<Recorded>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, mut body) = req.into_parts();
    let mut len = 0u64;
    let mut fnv = Fnv::default();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    len += d.len() as u64;
                    fnv.update(d);
                }
            }
            Err(_) => break,
        }
    }
    let rec = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        version: format!("{:?}", parts.version),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body_len: len,
        body_fnv: fnv.hex(),
    };
    records.lock().unwrap().push(rec.clone());
    if rec.path == "/slow" {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    if rec.path == "/mib" {
        // 1 MiB, shared: many at once cost this process nothing.
        static MIB: [u8; 1 << 20] = [b'x'; 1 << 20];
        return Ok(Response::new(Full::new(Bytes::from_static(&MIB))));
    }
    if rec.path == "/big" {
        // More than any socket buffers hold: a client that reads none of it stalls the writer.
        return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; BIG_BODY]))));
    }
    let mut resp = Response::new(Full::new(Bytes::from(rec.to_json().to_string())));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert("x-upstream", http::HeaderValue::from_static("echo"));
    if rec.path == "/set-cookie" {
        // An app setting cookies: one `Set-Cookie` line per `line` query parameter.
        let query = rec.query.as_deref().unwrap_or_default();
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            if let (true, Ok(v)) = (k == "line", http::HeaderValue::from_str(&v)) {
                resp.headers_mut().append(http::header::SET_COOKIE, v);
            }
        }
    }
    if rec.path.starts_with("/cacheable") {
        // What an app answers for its static assets.
        resp.headers_mut().insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("public, max-age=600"),
        );
    }
    Ok(resp)
}

impl Upstream {
    /// Binds a free port and serves (HTTP/1.1 and h2c) on a background thread.
    pub fn start() -> Upstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let records: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let recs = records.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("upstream runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let (stream, _) = tokio::select! {
                        _ = &mut stopped => break,
                        r = listener.accept() => match r {
                            Ok(x) => x,
                            Err(_) => continue,
                        },
                    };
                    let recs = recs.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| handle(req, recs.clone()));
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
            rt.shutdown_background();
        });
        Upstream {
            port,
            records,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request received so far.
    pub fn records(&self) -> Vec<Recorded> {
        self.records.lock().unwrap().clone()
    }

    /// The last request received (panics if none).
    pub fn last(&self) -> Recorded {
        self.records()
            .pop()
            .expect("the upstream received no request")
    }

    pub fn count(&self) -> usize {
        self.records.lock().unwrap().len()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
