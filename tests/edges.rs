//! The edges of the gateway, over real sockets: forwarding headers and `trusted_proxies`,
//! TLS (serving, ALPN, protocol floor, certificate reload, https and mTLS upstreams,
//! `__Host-` cookies), request limits and hostile clients (oversized heads, slow-loris,
//! connection cap, huge bodies, piles of flow cookies), and the gateway's own pages.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::browser::{full, try_send_body, ReqBody};
use support::corpus::{raw_exchange, raw_get};
use support::pki::Pki;
use support::procs::{gateway_command, Proc};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every route public: these tests are about the connection, not the login.
const ALL_PUBLIC: &str = r#"routes: [ { prefix: "/", auth: skip } ]"#;

/// How long a hostile client may wait for the gateway to act (it should act within seconds).
const DEADLINE: Duration = Duration::from_secs(10);

fn aws_lc() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn first_cert(pem: &Path) -> CertificateDer<'static> {
    CertificateDer::pem_file_iter(pem)
        .unwrap()
        .next()
        .expect("a certificate")
        .unwrap()
}

/// Replaces `to` with the content of `from` by rename, so a reader never sees half a file.
fn replace_file(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

// ---------------------------------------------------------------------------------------
// An HTTPS client trusting the test CA.
// ---------------------------------------------------------------------------------------

fn client_config(
    ca: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(aws_lc())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// One request over HTTPS (ALPN offers h2 and http/1.1, or http/1.1 only).
async fn https_send(
    ca: &Path,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: ReqBody,
    offer_h2: bool,
) -> Result<Resp, String> {
    let cfg = client_config(ca, rustls::DEFAULT_VERSIONS);
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(cfg)
        .https_only()
        .enable_http1();
    let connector = if offer_h2 {
        b.enable_http2().build()
    } else {
        b.build()
    };
    let client: Client<_, ReqBody> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector);
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(body).map_err(|e| e.to_string())?;
    let work = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| portcullis::error::source_chain(&e))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>(Resp {
            method: method.to_string(),
            url: url.to_string(),
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
            trailers: Default::default(),
        })
    };
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .map_err(|_| format!("{method} {url}: no answer within {REQUEST_TIMEOUT:?}"))?
}

async fn https_get(ca: &Path, url: &str, headers: &[(&str, &str)]) -> Resp {
    https_send(ca, "GET", url, headers, full(Bytes::new()), true)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// What a bare TLS handshake with the gateway negotiated.
struct Handshake {
    alpn: Option<Vec<u8>>,
    version: rustls::ProtocolVersion,
    peer: CertificateDer<'static>,
}

async fn handshake(
    port: u16,
    ca: &Path,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Handshake, String> {
    let mut cfg = client_config(ca, versions);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let tls = tokio::time::timeout(DEADLINE, connector.connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let conn = tls.get_ref().1;
    Ok(Handshake {
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        version: conn.protocol_version().expect("version"),
        peer: conn.peer_certificates().expect("peer certificates")[0]
            .clone()
            .into_owned(),
    })
}

// ---------------------------------------------------------------------------------------
// A gateway that serves HTTPS (the harness' Gateway polls readiness over plain HTTP).
// ---------------------------------------------------------------------------------------

struct TlsGateway {
    port: u16,
    ca: PathBuf,
    proc: Proc,
}

impl TlsGateway {
    /// Starts the gateway on `yaml` and waits until `https://…/readyz` answers 200. Its
    /// `redirect_url` becomes https (a plain-http one at the TLS listener is refused).
    async fn start(port: u16, yaml: String, ca: &Path) -> TlsGateway {
        let yaml = yaml.replace(
            &format!("redirect_url: \"http://127.0.0.1:{port}/"),
            &format!("redirect_url: \"https://127.0.0.1:{port}/"),
        );
        let dir = tempfile::Builder::new()
            .prefix("portcullis-tls-gw-")
            .tempdir()
            .expect("tempdir");
        let cfg = dir.path().join("portcullis.yaml");
        std::fs::write(&cfg, &yaml).unwrap();
        let mut cmd = gateway_command();
        cmd.arg("--config").arg(&cfg);
        let mut gw = TlsGateway {
            port,
            ca: ca.to_path_buf(),
            proc: Proc::spawn("tls-gateway", cmd, dir),
        };
        let t0 = Instant::now();
        loop {
            if let Some(st) = gw.proc.exited() {
                panic!(
                    "gateway exited with {st}\nconfig:\n{yaml}\n{}",
                    gw.proc.tails()
                );
            }
            let ready = https_send(
                &gw.ca,
                "GET",
                &gw.url("/readyz"),
                &[],
                full(Bytes::new()),
                false,
            )
            .await;
            if ready.is_ok_and(|r| r.status == 200) {
                return gw;
            }
            assert!(
                t0.elapsed() < START_TIMEOUT,
                "TLS gateway not ready\nconfig:\n{yaml}\n{}",
                gw.proc.tails()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }
}

/// A gateway serving TLS with `cert` and `key`, every route public, and its admin listener on
/// a port of its own (returned with it).
async fn public_tls_gateway(
    idp: &Idp,
    upstream: &Upstream,
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> (TlsGateway, u16) {
    let port = free_port();
    let opts = GatewayOpts {
        extra: format!("{ALL_PUBLIC}\n{}", tls_yaml(cert, key)),
        ..GatewayOpts::new(port, idp, &upstream.url())
    };
    let admin = free_port();
    let yaml = opts.yaml().replace(
        support::procs::ADMIN_YAML,
        &format!("admin: {{ listen: \"127.0.0.1:{admin}\" }}"),
    );
    (TlsGateway::start(port, yaml, ca).await, admin)
}

fn tls_yaml(cert: &Path, key: &Path) -> String {
    format!(
        "tls: {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
        cert.display(),
        key.display()
    )
}

// ---------------------------------------------------------------------------------------
// An HTTPS upstream (optionally requiring a client certificate), in process.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct TlsHit {
    path: String,
    client_cert: bool,
    forwarded_proto: Option<String>,
}

struct TlsUpstream {
    port: u16,
    hits: Arc<Mutex<Vec<TlsHit>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tls_upstream(cert: &Path, key: &Path, client_ca: Option<&Path>) -> TlsUpstream {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(aws_lc())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(first_cert(ca)).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                aws_lc(),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_single_cert(chain, key).unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits: Arc<Mutex<Vec<TlsHit>>> = Arc::default();
    let recorded = hits.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let client_cert = tls.get_ref().1.peer_certificates().is_some();
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let hit = TlsHit {
                            path: req.uri().path().to_string(),
                            client_cert,
                            forwarded_proto: req
                                .headers()
                                .get("x-forwarded-proto")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string),
                        };
                        recorded.lock().unwrap().push(hit.clone());
                        let body =
                            serde_json::json!({"path": hit.path, "client_cert": client_cert})
                                .to_string();
                        async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(Bytes::from(body)),
                            ))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    TlsUpstream { port, hits, task }
}

// ---------------------------------------------------------------------------------------
// Forwarding headers and trusted_proxies.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn forwarding_headers_are_replaced_unless_the_peer_is_a_trusted_proxy() {
    let idp = Idp::start(&[]).await;
    let upstream = Upstream::start();
    let untrusted = Gateway::start(GatewayOpts {
        extra: format!("{ALL_PUBLIC}\ntrusted_proxies: []"),
        ..GatewayOpts::new(free_port(), &idp, &upstream.url())
    })
    .await;
    let trusted = Gateway::start(GatewayOpts {
        extra: format!("{ALL_PUBLIC}\ntrusted_proxies: [\"10.0.0.0/8\", \"127.0.0.0/8\"]"),
        ..GatewayOpts::new(free_port(), &idp, &upstream.url())
    })
    .await;
    let spoof: &[(&str, &str)] = &[
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil.com"),
        ("x-forwarded-port", "443"),
        ("x-real-ip", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6;proto=https;host=evil.com"),
        ("x_forwarded_for", "7.7.7.7"),
        ("x-forwarded-prefix", "/evil"),
        ("x-forwarded-server", "evil.com"),
        ("x-rewrite-url", "/admin"),
        ("x-original-url", "/admin"),
        ("x-original-uri", "/admin"),
        ("x_forwarded_prefix", "/evil"),
        ("x-forwarded-scheme", "https"),
        ("x-forwarded-ssl", "on"),
        ("front-end-https", "on"),
        ("x-original-host", "evil.com"),
        ("x-host", "evil.com"),
        ("true-client-ip", "6.6.6.6"),
        ("x-client-ip", "6.6.6.6"),
    ];
    // Never passed on, whoever sent them: frameworks build URLs or route from them.
    let never = [
        "x-forwarded-port",
        "x-real-ip",
        "forwarded",
        "x_forwarded_for",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-rewrite-url",
        "x-original-url",
        "x-original-uri",
        "x_forwarded_prefix",
        "x-forwarded-scheme",
        "x-forwarded-ssl",
        "front-end-https",
        "x-original-host",
        "x-host",
        "true-client-ip",
        "x-client-ip",
    ];

    let r = send("GET", &untrusted.url("/x"), spoof, Vec::new()).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let rec = upstream.last();
    assert_eq!(
        rec.header_all("x-forwarded-for"),
        vec!["127.0.0.1"],
        "{rec:?}"
    );
    assert_eq!(rec.header("x-forwarded-proto"), Some("http"), "{rec:?}");
    let own_host = format!("127.0.0.1:{}", untrusted.port);
    assert_eq!(
        rec.header("x-forwarded-host"),
        Some(own_host.as_str()),
        "{rec:?}"
    );
    for n in never {
        assert!(rec.header(n).is_none(), "{n} passed: {rec:?}");
    }

    let r = send("GET", &trusted.url("/x"), spoof, Vec::new()).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let rec = upstream.last();
    assert_eq!(
        rec.header_all("x-forwarded-for"),
        vec!["6.6.6.6, 127.0.0.1"],
        "{rec:?}"
    );
    assert_eq!(rec.header("x-forwarded-proto"), Some("https"), "{rec:?}");
    assert_eq!(rec.header("x-forwarded-host"), Some("evil.com"), "{rec:?}");
    for n in never {
        assert!(
            rec.header(n).is_none(),
            "{n} passed from a trusted proxy: {rec:?}"
        );
    }

    // A trusted proxy's chain is extended; a bogus proto is not believed; nothing sent: ours.
    let r = send(
        "GET",
        &trusted.url("/x"),
        &[
            ("x-forwarded-for", "1.1.1.1, 10.1.1.1"),
            ("x-forwarded-proto", "gopher"),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    let rec = upstream.last();
    assert_eq!(
        rec.header("x-forwarded-for"),
        Some("1.1.1.1, 10.1.1.1, 127.0.0.1")
    );
    assert_eq!(rec.header("x-forwarded-proto"), Some("http"));
    let r = send("GET", &trusted.url("/y"), &[], Vec::new()).await;
    assert_eq!(r.status, 200);
    let rec = upstream.last();
    assert_eq!(rec.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(rec.header("x-forwarded-proto"), Some("http"));
    let own_host = format!("127.0.0.1:{}", trusted.port);
    assert_eq!(rec.header("x-forwarded-host"), Some(own_host.as_str()));
    // A trusted proxy's X-Forwarded-Host is held to a Host's rules: one the upstream could
    // read as another site, or as a list, is not believed.
    for bogus in [
        "a.example, b.example",
        "user@a.example",
        "a.example/x",
        "a%2eexample",
        "",
    ] {
        let r = send(
            "GET",
            &trusted.url("/z"),
            &[("x-forwarded-host", bogus)],
            Vec::new(),
        )
        .await;
        assert_eq!(r.status, 200, "{bogus:?}: {}", r.dump());
        let rec = upstream.last();
        assert_eq!(
            rec.header("x-forwarded-host"),
            Some(own_host.as_str()),
            "{bogus:?}: {rec:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// TLS.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_alpn_protocol_floor_and_certificate_reload() {
    let pki = Pki::new();
    // The first expires in two days (warned about), its renewal in 90.
    let (cert1, key1) = pki.issue("one", "gateway-one");
    let (cert2, key2) = pki.issue_for_days("two", "gateway-two", 90);
    // The gateway serves from its own copies, replaced later.
    let (cert, key) = (pki.path("serving.pem"), pki.path("serving.key"));
    std::fs::copy(&cert1, &cert).unwrap();
    std::fs::copy(&key1, &key).unwrap();

    let idp = Idp::start(&[]).await;
    let upstream = Upstream::start();
    let (gw, admin) = public_tls_gateway(&idp, &upstream, &cert, &key, &pki.ca()).await;
    let port = gw.port;
    let reloads = |result: &'static str| async move {
        support::ops::admin_metrics(admin)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .get(&format!(
                "portcullis_config_reloads_total{{result=\"{result}\"}}"
            ))
            .unwrap_or(-1.0)
    };
    assert_eq!(reloads("success").await, 0.0);
    let expiry = || async move {
        support::ops::admin_metrics(admin)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .value("portcullis_tls_certificate_expiry_timestamp_seconds{file=\"tls.cert_file\"}")
    };
    assert_eq!(expiry().await, support::pki::not_after(&cert1) as f64);
    let soon = |log: &str| {
        log.lines()
            .filter(|l| l.contains("the certificate expires on") && l.contains("tls.cert_file"))
            .count()
    };
    assert_eq!(soon(&gw.proc.stderr()), 1, "{}", gw.proc.tails());

    // HTTP/2 when offered, HTTP/1.1 otherwise; the upstream learns it was https.
    let r = https_get(&gw.ca, &gw.url("/x?y=1"), &[("x-forwarded-proto", "http")]).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(r.version, http::Version::HTTP_2, "{}", r.dump());
    let rec = upstream.last();
    assert_eq!(rec.path, "/x");
    assert_eq!(rec.header("x-forwarded-proto"), Some("https"), "{rec:?}");
    assert_eq!(rec.header("x-forwarded-for"), Some("127.0.0.1"), "{rec:?}");
    let own_host = format!("127.0.0.1:{port}");
    assert_eq!(
        rec.header("x-forwarded-host"),
        Some(own_host.as_str()),
        "{rec:?}"
    );
    let r = https_send(
        &gw.ca,
        "GET",
        &gw.url("/h1"),
        &[],
        full(Bytes::new()),
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(r.version, http::Version::HTTP_11);
    assert_eq!(upstream.last().header("x-forwarded-proto"), Some("https"));

    let h = handshake(
        port,
        &gw.ca,
        &[b"h2", b"http/1.1"],
        rustls::DEFAULT_VERSIONS,
    )
    .await
    .unwrap();
    assert_eq!(h.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(h.version, rustls::ProtocolVersion::TLSv1_3);
    assert_eq!(h.peer, first_cert(&cert1));
    let h = handshake(port, &gw.ca, &[b"http/1.1"], rustls::DEFAULT_VERSIONS)
        .await
        .unwrap();
    assert_eq!(h.alpn.as_deref(), Some(&b"http/1.1"[..]));
    let h = handshake(port, &gw.ca, &[], &[&rustls::version::TLS12])
        .await
        .unwrap();
    assert_eq!(h.alpn, None);
    assert_eq!(h.version, rustls::ProtocolVersion::TLSv1_2);

    // TLS 1.1 (and 1.0) are refused; 1.2 works with the same tool.
    let s_client = |flag: &str| {
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                flag,
                "-cipher",
                "DEFAULT@SECLEVEL=0",
                "-servername",
                "localhost",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run `openssl s_client` ({e}): install openssl"));
        (
            out.status.success(),
            format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, out) = s_client("-tls1_2");
    assert!(
        ok && out.contains("TLSv1.2"),
        "control: TLS 1.2 must work:\n{out}"
    );
    for flag in ["-tls1_1", "-tls1"] {
        let (ok, out) = s_client(flag);
        assert!(!ok, "{flag} handshake succeeded:\n{out}");
        assert!(
            out.contains("Cipher is (NONE)") && out.contains("no peer certificate available"),
            "{flag}: the handshake got further than the ClientHello:\n{out}"
        );
    }
    // Plain HTTP on the TLS port is not served: a 400 that names https, then the close.
    let before = upstream.count();
    let r = raw_exchange(port, &raw_get("/x", "127.0.0.1", &[]), DEADLINE).await;
    assert!(r.status == Some(400) && r.closed, "{r:?}");
    assert_eq!(upstream.count(), before, "plain HTTP was served");

    // New certificate files: new connections get the new certificate within seconds.
    let before = upstream.count();
    replace_file(&key2, &key);
    replace_file(&cert2, &cert);
    let want = first_cert(&cert2);
    let t0 = Instant::now();
    loop {
        let h = handshake(port, &gw.ca, &[b"http/1.1"], rustls::DEFAULT_VERSIONS)
            .await
            .unwrap();
        if h.peer == want {
            break;
        }
        assert_eq!(
            h.peer,
            first_cert(&cert1),
            "neither the old nor the new certificate"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "certificate not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = https_get(&gw.ca, &gw.url("/after"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    assert_eq!(upstream.count(), before + 1);
    assert!(reloads("success").await >= 1.0);
    // The renewal's expiry is published, and it is not warned about.
    assert_eq!(expiry().await, support::pki::not_after(&cert2) as f64);
    assert_eq!(soon(&gw.proc.stderr()), 1, "{}", gw.proc.tails());
    // A broken pair is not loaded: the current certificate stays, and the failure is
    // counted (a failed renewal must reach the reload alert).
    assert_eq!(reloads("failure").await, 0.0);
    std::fs::write(&cert, "not a certificate").unwrap();
    support::ops::eventually(
        Duration::from_secs(20),
        "the failed reload counted",
        || async {
            match reloads("failure").await {
                n if n >= 1.0 => Ok(()),
                n => Err(format!("config_reloads_total{{result=\"failure\"}} {n}")),
            }
        },
    )
    .await;
    let h = handshake(port, &gw.ca, &[], rustls::DEFAULT_VERSIONS)
        .await
        .unwrap();
    assert_eq!(
        h.peer, want,
        "a broken certificate file replaced the working one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_need_the_ca_file_and_mtls_needs_the_client_certificate() {
    let pki = Pki::new();
    let (up_cert, up_key) = pki.issue("upstream", "upstream");
    let (client_cert, client_key) = pki.issue("client", "portcullis-client");
    let plain = tls_upstream(&up_cert, &up_key, None).await;
    let mtls = tls_upstream(&up_cert, &up_key, Some(&pki.ca())).await;
    let idp = Idp::start(&[]).await;
    let ca = pki.ca().display().to_string();
    let client = format!(
        "client_cert_file: \"{}\", client_key_file: \"{}\"",
        client_cert.display(),
        client_key.display()
    );
    // (upstream port, tls block, expected status, client certificate seen upstream)
    let cases = [
        (
            plain.port,
            format!("tls: {{ ca_file: \"{ca}\" }}"),
            200,
            Some(false),
        ),
        (plain.port, String::new(), 502, None),
        (
            mtls.port,
            format!("tls: {{ ca_file: \"{ca}\", {client} }}"),
            200,
            Some(true),
        ),
        (
            mtls.port,
            format!("tls: {{ ca_file: \"{ca}\" }}"),
            502,
            None,
        ),
    ];
    for (i, (up_port, tls, status, cert_seen)) in cases.iter().enumerate() {
        let gw = Gateway::start(GatewayOpts {
            extra: format!("{ALL_PUBLIC}\n{tls}"),
            ..GatewayOpts::new(free_port(), &idp, &format!("https://127.0.0.1:{up_port}"))
        })
        .await;
        let hits = if *up_port == plain.port {
            &plain.hits
        } else {
            &mtls.hits
        };
        let before = hits.lock().unwrap().len();
        let r = send("GET", &gw.url(&format!("/case/{i}")), &[], Vec::new()).await;
        assert_eq!(r.status, *status, "case {i} ({tls}): {}", r.dump());
        let seen = hits.lock().unwrap().clone();
        match cert_seen {
            Some(c) => {
                assert_eq!(seen.len(), before + 1, "case {i}");
                let hit = seen.last().unwrap();
                assert_eq!(hit.path, format!("/case/{i}"));
                assert_eq!(hit.client_cert, *c, "case {i}");
                assert_eq!(hit.forwarded_proto.as_deref(), Some("http"), "case {i}");
                assert_eq!(r.json()["path"], format!("/case/{i}"));
            }
            None => assert_eq!(seen.len(), before, "case {i}: the request got through"),
        }
    }
}

/// An https upstream that answers and then closes TCP without TLS `close_notify`, as many
/// legacy stacks do (Python's `ssl`, embedded servers): `/close` with a body delimited by the
/// close, `/short` with a `Content-Length` it falls short of.
async fn upstream_closing_without_close_notify(cert: &Path, key: &Path) -> u16 {
    let chain: Vec<CertificateDer> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(aws_lc())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = if head.starts_with(b"GET /close ") {
                    let mut a = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
                    a.resize(a.len() + 100_000, b'x');
                    a
                } else {
                    let mut a = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
                    a.resize(a.len() + 50_000, b'x');
                    a
                };
                let _ = tls.write_all(&answer).await;
                let _ = tls.flush().await;
                // Dropped without `shutdown`: a TCP FIN and no close_notify alert.
            });
        }
    });
    port
}

/// An https upstream that ends its answer by closing the connection without `close_notify`
/// gets its whole answer through (as through nginx); a length-framed answer cut short is
/// still not passed on as complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_closing_without_close_notify_ends_its_body() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("upstream", "upstream");
    let up = upstream_closing_without_close_notify(&cert, &key).await;
    let idp = Idp::start(&[]).await;
    let gw = Gateway::start(GatewayOpts {
        extra: format!(
            "{ALL_PUBLIC}\ntls: {{ ca_file: \"{}\" }}",
            pki.ca().display()
        ),
        ..GatewayOpts::new(free_port(), &idp, &format!("https://127.0.0.1:{up}"))
    })
    .await;
    for version in [false, true] {
        let r = try_send_body("GET", &gw.url("/close"), &[], full(Bytes::new()), version)
            .await
            .unwrap_or_else(|e| panic!("h2 {version}: {e}\n{}", gw.stderr()));
        assert_eq!(r.status, 200, "{}", r.dump());
        assert_eq!(r.body.len(), 100_000, "h2 {version}");
    }
    let short = try_send("GET", &gw.url("/short"), &[], Vec::new()).await;
    assert!(
        short.as_ref().map_or(true, |r| r.body.len() < 100_000),
        "a body cut short passed as whole: {:?}",
        short.map(|r| r.body.len())
    );
}

/// An https upstream that takes the connection and never answers the TLS handshake gets
/// `timeouts.upstream_connect`, as a TCP connect does (502), not `upstream_response` (504).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_the_upstream_never_answers_is_a_connect_failure() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut taken = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            taken.push(tcp);
        }
    });
    let idp = Idp::start(&[]).await;
    let gw = Gateway::start(GatewayOpts {
        extra: format!(
            "{ALL_PUBLIC}\ntimeouts: {{ upstream_connect: 1s, upstream_response: 600s }}"
        ),
        ..GatewayOpts::new(free_port(), &idp, &format!("https://127.0.0.1:{port}"))
    })
    .await;
    let r = send("GET", &gw.url("/x"), &[], Vec::new()).await;
    assert_eq!(r.status, 502, "{}", r.dump());
    let log = gw.stderr();
    assert!(log.contains("TLS handshake not done within"), "{log}");
    held.abort();
}

/// The usual self-signed certificate (`openssl req -x509`: a CA certificate, which webpki
/// refuses as a server's own) works as an upstream's certificate when `tls.ca_file` names
/// it, as it does with curl or nginx; its name must still match, and an unrelated CA does
/// not vouch for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_signed_upstream_certificate_named_in_ca_file_is_trusted() {
    let pki = Pki::new();
    let self_signed = |name: &str, san: &str| {
        let san = format!("subjectAltName={san}");
        pki.self_signed(name, "/CN=upstream", &["-addext", &san])
    };
    let (cert, key) = self_signed("self", "IP:127.0.0.1");
    let (other_cert, other_key) = self_signed("other", "DNS:other.example");
    let up = tls_upstream(&cert, &key, None).await;
    let other = tls_upstream(&other_cert, &other_key, None).await;
    let idp = Idp::start(&[]).await;
    // (upstream port, tls.ca_file, expected status)
    let cases = [
        (up.port, cert.clone(), 200),
        (other.port, other_cert.clone(), 502),
        (up.port, pki.ca(), 502),
    ];
    for (i, (port, ca, status)) in cases.iter().enumerate() {
        let gw = Gateway::start(GatewayOpts {
            extra: format!("{ALL_PUBLIC}\ntls: {{ ca_file: \"{}\" }}", ca.display()),
            ..GatewayOpts::new(free_port(), &idp, &format!("https://127.0.0.1:{port}"))
        })
        .await;
        let r = send("GET", &gw.url(&format!("/case/{i}")), &[], Vec::new()).await;
        assert_eq!(
            r.status,
            *status,
            "case {i} ({}): {}",
            ca.display(),
            r.dump()
        );
    }
    assert_eq!(up.hits.lock().unwrap().len(), 1);
    assert!(other.hits.lock().unwrap().is_empty());
}

/// The outbound TLS files are secrets mounted from files too: a renewed CA bundle and upstream
/// client certificate (cert-manager rotates them in place) apply without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_upstream_ca_and_client_certificate_apply_without_a_restart() {
    let pki = Pki::new();
    let (up_cert, up_key) = pki.issue("upstream", "upstream");
    let (client_cert, client_key) = pki.issue_for_days("client", "portcullis-client", 90);
    // What the files held before: another CA's bundle and client certificate, which
    // expires in two days.
    let before = Pki::new();
    let (old_cert, old_key) = before.issue("client", "portcullis-client");
    let mtls = tls_upstream(&up_cert, &up_key, Some(&pki.ca())).await;
    let idp = Idp::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = (
        dir.path().join("ca.pem"),
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
    );
    replace_file(&before.ca(), &ca);
    replace_file(&old_cert, &cert);
    replace_file(&old_key, &key);
    let tls = format!(
        "tls: {{ ca_file: \"{}\", client_cert_file: \"{}\", client_key_file: \"{}\" }}",
        ca.display(),
        cert.display(),
        key.display()
    );
    let gw = Gateway::start(GatewayOpts {
        extra: format!("{ALL_PUBLIC}\n{tls}"),
        ..GatewayOpts::new(
            free_port(),
            &idp,
            &format!("https://127.0.0.1:{}", mtls.port),
        )
    })
    .await;
    let r = send("GET", &gw.url("/before"), &[], Vec::new()).await;
    assert_eq!(
        r.status,
        502,
        "the upstream is not trusted yet: {}",
        r.dump()
    );

    replace_file(&pki.ca(), &ca);
    replace_file(&client_key, &key);
    replace_file(&client_cert, &cert);
    let url = gw.url("/after");
    support::ops::eventually(Duration::from_secs(20), "the renewed files apply", || {
        let url = url.clone();
        async move {
            let r = send("GET", &url, &[], Vec::new()).await;
            match r.status.as_u16() {
                200 => Ok(()),
                _ => Err(r.dump()),
            }
        }
    })
    .await;
    let hit = mtls.hits.lock().unwrap().last().cloned().unwrap();
    assert_eq!(hit.path, "/after");
    assert!(
        hit.client_cert,
        "no client certificate reached the upstream"
    );
    // The client certificate's dates were checked at each load (a reload may have come
    // between the files' replacements): the old one's warned about, the renewal's noted.
    let log = gw.stderr();
    let lines = |what: &str| {
        log.lines()
            .filter(|l| l.contains(what) && l.contains("tls.client_cert_file"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert!(!lines("the certificate expires on").is_empty(), "{log}");
    let renewed =
        std::time::UNIX_EPOCH + Duration::from_secs(support::pki::not_after(&client_cert) as u64);
    let checked = lines("certificate dates checked");
    assert!(
        checked
            .last()
            .is_some_and(|l| l.contains(&httpdate::fmt_http_date(renewed))),
        "{log}"
    );
}

/// A TLS 1.2 ClientHello naming `sni` in its server_name extension, as a client may send any.
fn client_hello(sni: &[u8]) -> Vec<u8> {
    let n = sni.len() as u16;
    let mut ext = vec![0, 0]; // server_name
    ext.extend_from_slice(&(n + 5).to_be_bytes());
    ext.extend_from_slice(&(n + 3).to_be_bytes());
    ext.push(0); // host_name
    ext.extend_from_slice(&n.to_be_bytes());
    ext.extend_from_slice(sni);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0, 2, 0xc0, 0x2f]); // ECDHE-RSA-AES128-GCM-SHA256
    body.extend_from_slice(&[1, 0]); // no compression
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1, 0];
    hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 3, 1];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

/// HTTP/1.1 over TLS: an idle keep-alive connection waits on its socket without a read buffer,
/// as a plain one does. Requests still come through whichever way their bytes are cut into
/// records (a head over two records, two heads in one), and a client that closes its
/// connection while the upstream works has its request dropped at once (logged as 499), not
/// finished for nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_over_tls_between_and_during_requests() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("gw", "gateway");
    let idp = Idp::start(&[]).await;
    let upstream = Upstream::start();
    let (gw, admin) = public_tls_gateway(&idp, &upstream, &cert, &key, &pki.ca()).await;
    let port = gw.port;
    let connect = || async {
        let mut cfg = client_config(&gw.ca, rustls::DEFAULT_VERSIONS);
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap()
    };
    let head = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    // Reads one answer (the upstream's bodies are short, with a Content-Length).
    async fn answer(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        let ends = |g: &[u8]| {
            let text = String::from_utf8_lossy(g).to_lowercase();
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                return false;
            };
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            body.len() >= len
        };
        while !ends(&got) {
            let n = tokio::time::timeout(DEADLINE, tls.read(&mut byte))
                .await
                .expect("no answer in time")
                .unwrap();
            assert_eq!(n, 1, "closed mid-answer: {}", String::from_utf8_lossy(&got));
            got.push(byte[0]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    let mut tls = connect().await;
    tls.write_all(head("/one").as_bytes()).await.unwrap();
    assert!(answer(&mut tls).await.starts_with("HTTP/1.1 200"));
    // Idle (the connection gives its buffer back), then a head cut over two records.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let two = head("/two");
    tls.write_all(&two.as_bytes()[..10]).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    tls.write_all(&two.as_bytes()[10..]).await.unwrap();
    assert!(answer(&mut tls).await.starts_with("HTTP/1.1 200"));
    // Two heads in one record: both answered, in order.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tls.write_all(format!("{}{}", head("/three"), head("/four")).as_bytes())
        .await
        .unwrap();
    assert!(answer(&mut tls).await.starts_with("HTTP/1.1 200"));
    assert!(answer(&mut tls).await.starts_with("HTTP/1.1 200"));
    let paths: Vec<String> = upstream.records().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/one", "/two", "/three", "/four"]);

    // A client that leaves while the upstream works (it answers /slow after 3 s).
    let in_flight = || async move {
        support::ops::admin_metrics(admin)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .value("portcullis_requests_in_flight")
    };
    let mut tls = connect().await;
    tls.write_all(head("/slow").as_bytes()).await.unwrap();
    let t0 = Instant::now();
    while in_flight().await != 1.0 {
        assert!(t0.elapsed() < DEADLINE, "the request never went out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(tls);
    let t0 = Instant::now();
    while in_flight().await != 0.0 {
        assert!(t0.elapsed() < DEADLINE, "{}", gw.proc.tails());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = gw.proc.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("path=\"/slow\"") && l.contains("status=499")),
        "{}",
        gw.proc.tails()
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("path=\"/slow\"") && l.contains("status=200")),
        "finished for nobody: {}",
        gw.proc.tails()
    );
}

/// The open-file limit is raised to the hard limit at start-up (a soft limit of 1024, many
/// hosts' default, would stop accepting connections long before `limits.max_connections`),
/// and a hard limit below twice that setting is warned of, naming it.
#[tokio::test]
async fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let idp = Idp::start(&[]).await;
    let upstream = Upstream::start();
    let limits = |pid: u32| -> (u64, u64) {
        let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let n: Vec<u64> = line
            .split_whitespace()
            .skip(3)
            .map(|w| w.parse().unwrap_or(u64::MAX))
            .collect();
        (n[0], n[1])
    };
    let (_, ours) = limits(std::process::id());
    let low = ours.min(512);
    for (ulimit, hard) in [
        ("ulimit -S -n 256".to_string(), ours),
        (format!("ulimit -n {low}"), low),
    ] {
        let port = free_port();
        let yaml = GatewayOpts::new(port, &idp, &upstream.url()).yaml();
        let dir = tempfile::Builder::new()
            .prefix("portcullis-nofile-")
            .tempdir()
            .unwrap();
        let cfg = dir.path().join("portcullis.yaml");
        std::fs::write(&cfg, &yaml).unwrap();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("{ulimit} && exec \"$0\" --config \"$1\""))
            .arg(support::procs::bin())
            .arg(&cfg)
            .env("NO_COLOR", "1");
        let mut gw = Proc::spawn("gateway", cmd, dir);
        let t0 = Instant::now();
        let ready = format!("http://127.0.0.1:{port}/readyz");
        while !try_send_body("GET", &ready, &[], full(Bytes::new()), false)
            .await
            .is_ok_and(|r| r.status == 200)
        {
            assert!(gw.exited().is_none(), "{}", gw.tails());
            assert!(t0.elapsed() < DEADLINE, "not ready: {}", gw.tails());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // An unlimited hard limit: raised as far as the kernel allows.
        let (soft, hard_seen) = limits(gw.pid());
        assert_eq!(hard_seen, hard, "{ulimit}");
        assert!(
            soft == hard || (hard == u64::MAX && soft >= 1 << 20),
            "{ulimit}: soft limit {soft}"
        );
        let warned = gw
            .stderr()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("limits.max_connections"));
        assert_eq!(warned, soft < 2 * 10_000 + 64, "{ulimit}: {}", gw.stderr());
    }
}

/// Handshakes with an odd server name (an IP address, a name with a line break in it) are
/// any client's to send: they do not each put a warning in the log (rustls' own), which
/// would be a client's way to flood it. Plain HTTP sent to the TLS port gets a 400 it can
/// read.
#[tokio::test]
async fn odd_clients_of_the_tls_listener() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let (cert, key) = pki.issue("gw", "gateway");
    let idp = Idp::start(&[]).await;
    let upstream = Upstream::start();
    let port = free_port();
    let opts = GatewayOpts {
        extra: format!("{ALL_PUBLIC}\n{}", tls_yaml(&cert, &key)),
        ..GatewayOpts::new(port, &idp, &upstream.url())
    };
    let gw = TlsGateway::start(port, opts.yaml(), &pki.ca()).await;
    for sni in [&b"127.0.0.1"[..], b"evil\nINFO forged line"] {
        for _ in 0..5 {
            let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            tcp.write_all(&client_hello(sni)).await.unwrap();
            let mut sink = Vec::new();
            let read = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut sink)).await;
            assert!(read.is_ok(), "the handshake was not ended");
        }
    }
    // Plain HTTP to the TLS port gets an answer it can read, as from nginx, not TLS bytes.
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "a plain HTTP request to the TLS port was not answered"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("https://"), "{answer}");
    // The gateway still serves.
    let r = https_get(&gw.ca, &gw.url("/x"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let log = gw.proc.stderr();
    assert!(
        !log.lines()
            .any(|l| l.contains("WARN") && l.contains("rustls")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_cookies_over_tls_with_the_host_prefix() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("gw", "gateway");
    let port = free_port();
    let origin = format!("https://127.0.0.1:{port}");
    let idp = Idp::start(&[("IDP_REDIRECT_URIS", &format!("{origin}/oauth2/callback"))]).await;
    let upstream = Upstream::start();
    let opts = GatewayOpts {
        extra: tls_yaml(&cert, &key),
        ..GatewayOpts::new(port, &idp, &upstream.url())
    };
    let yaml = opts
        .yaml()
        .replace(
            &format!("redirect_url: \"http://127.0.0.1:{port}/"),
            &format!("redirect_url: \"{origin}/"),
        )
        // A secure cookie takes the `__Host-` prefix: no subdomain can overwrite it.
        .replace("  secure: false\n", "  secure: true\n");
    assert!(
        yaml.contains("secure: true") && yaml.contains(&origin),
        "{yaml}"
    );
    let gw = TlsGateway::start(port, yaml, &pki.ca()).await;

    let start = https_get(&gw.ca, &gw.url("/app?x=1"), &[("accept", BROWSER_ACCEPT)]).await;
    assert_eq!(start.status, 302, "{}", start.dump());
    let auth = start.location().unwrap().to_string();
    let flow = start
        .set_cookies()
        .into_iter()
        .find(|c| c.name.starts_with("__Host-_portcullis_flow_"))
        .unwrap_or_else(|| panic!("no __Host- flow cookie: {}", start.dump()));
    assert_eq!(flow.path(), Some("/"), "{}", flow.raw);
    assert!(flow.flag("secure"), "{}", flow.raw);
    let browser = Browser::new();
    let callback = idp_walk(&browser, &auth, "alice").await;
    assert!(
        callback.starts_with(&format!("{origin}/oauth2/callback?")),
        "{callback}"
    );
    let flow_cookie = format!("{}={}", flow.name, flow.value);
    let cb = https_get(
        &gw.ca,
        &callback,
        &[("accept", BROWSER_ACCEPT), ("cookie", &flow_cookie)],
    )
    .await;
    assert_eq!(cb.status, 302, "{}", cb.dump());
    assert_eq!(cb.location(), Some("/app?x=1"));
    let session = cb
        .set_cookie("__Host-_portcullis")
        .unwrap_or_else(|| panic!("no __Host- session cookie: {}", cb.dump()));
    assert!(!session.is_removal(), "{}", session.raw);
    assert!(session.flag("secure"), "{}", session.raw);
    assert!(session.flag("httponly"), "{}", session.raw);
    assert_eq!(session.path(), Some("/"), "{}", session.raw);
    assert!(
        session.attr("domain").is_none() && !session.flag("domain"),
        "{}",
        session.raw
    );
    assert!(cb.set_cookie("_portcullis").is_none(), "{}", cb.dump());

    let cookie = format!("__Host-_portcullis={}", session.value);
    let r = https_get(&gw.ca, &gw.url("/app?x=1"), &[("cookie", &cookie)]).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let rec = upstream.last();
    assert_eq!(rec.header("x-forwarded-user"), Some("alice"));
    assert_eq!(rec.header("x-forwarded-proto"), Some("https"));
    assert!(rec.header("cookie").is_none(), "{rec:?}");
    // The same sealed value under the plain name is no session.
    let r = https_get(
        &gw.ca,
        &gw.url("/app"),
        &[
            ("cookie", &format!("_portcullis={}", session.value)),
            ("accept", "application/json"),
        ],
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.dump());
}

// ---------------------------------------------------------------------------------------
// Limits and hostile clients.
// ---------------------------------------------------------------------------------------

fn request_with_headers(host: &str, headers: &[String]) -> Vec<u8> {
    let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    raw_get("/limits", host, &refs)
}

#[tokio::test]
async fn oversized_heads_are_refused_without_hanging() {
    let s = Stack::with(
        &[],
        &format!("{ALL_PUBLIC}\nlimits: {{ max_header_bytes: 8192, max_headers: 20 }}"),
    )
    .await;
    let port = s.gw.port;
    let host = format!("127.0.0.1:{port}");

    // Controls: just under both limits.
    let ten: Vec<String> = (0..10)
        .map(|i| format!("X-Filler-{i}: {}", "a".repeat(100)))
        .collect();
    let r = raw_exchange(port, &request_with_headers(&host, &ten), DEADLINE).await;
    assert_eq!(r.status, Some(200), "{}", r.text);
    let big = vec![format!("X-Big: {}", "b".repeat(6000))];
    let r = raw_exchange(port, &request_with_headers(&host, &big), DEADLINE).await;
    assert_eq!(r.status, Some(200), "{}", r.text);
    let before = s.upstream.count();

    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "one 16 KB header",
            vec![format!("X-Big: {}", "b".repeat(16 * 1024))],
        ),
        (
            "a 64 KB cookie",
            vec![format!("Cookie: a={}", "c".repeat(64 * 1024))],
        ),
        (
            "a 1 MB header",
            vec![format!("X-Huge: {}", "h".repeat(1024 * 1024))],
        ),
        (
            "30 headers",
            (0..30).map(|i| format!("X-Many-{i}: v")).collect(),
        ),
        (
            "500 headers",
            (0..500).map(|i| format!("X-Many-{i}: v")).collect(),
        ),
    ];
    for (what, headers) in &cases {
        let r = raw_exchange(port, &request_with_headers(&host, headers), DEADLINE).await;
        eprintln!("{what}: status {:?}, closed {}", r.status, r.closed);
        assert!(r.closed, "{what}: the connection was left hanging: {r:?}");
        assert!(
            matches!(r.status, None | Some(431) | Some(400)),
            "{what}: {:?}\n{}",
            r.status,
            r.text.chars().take(500).collect::<String>()
        );
        if r.status.is_some() {
            assert_eq!(
                r.header("x-content-type-options").as_deref(),
                Some("nosniff"),
                "{what}"
            );
        }
    }
    // Same over HTTP/2 (h2c): refused, not served.
    let huge = "b".repeat(16 * 1024);
    match send_h2("GET", &s.gw.url("/h2"), &[("x-big", &huge)], Vec::new()).await {
        Ok(r) => assert_eq!(r.status, 431, "{}", r.dump()),
        Err(e) => eprintln!("h2 request with a 16 KB header refused at the protocol level: {e}"),
    }
    assert_eq!(
        s.upstream.count(),
        before,
        "an oversized request reached the upstream"
    );
    let mut gw = s.gw;
    gw.assert_healthy().await;
}

/// `limits.max_headers` bounds HTTP/2 requests too (hyper bounds only their size): over it,
/// `431`, as over HTTP/1.1; a browser's cookie crumbs count as the one `Cookie` line.
#[tokio::test]
async fn too_many_header_fields_over_http2_get_431() {
    let s = Stack::with(&[], &format!("{ALL_PUBLIC}\nlimits: {{ max_headers: 20 }}")).await;
    let many: Vec<(String, String)> = (0..30)
        .map(|i| (format!("x-many-{i}"), "v".into()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let before = s.upstream.count();
    let r = send_h2("GET", &s.gw.url("/many"), &many, Vec::new())
        .await
        .unwrap();
    assert_eq!(r.status, 431, "{}", r.dump());
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(
        s.upstream.count(),
        before,
        "the request reached the upstream"
    );
    // Controls: under the limit; and 30 cookie crumbs, one Cookie line over HTTP/1.1.
    let r = send_h2("GET", &s.gw.url("/few"), &many[..10], Vec::new())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.dump());
    let crumbs: Vec<String> = (0..30).map(|i| format!("c{i}=v")).collect();
    let crumbs: Vec<(&str, &str)> = crumbs.iter().map(|c| ("cookie", c.as_str())).collect();
    let r = send_h2("GET", &s.gw.url("/crumbs"), &crumbs, Vec::new())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.dump());
}

/// An HTTP/2 client's cookie crumbs (one field per cookie, as browsers send them) reach the
/// HTTP/1.1 upstream as one `Cookie` field (RFC 9113 §8.2.3), with or without the gateway's
/// own cookies among them: HTTP/1.1 servers read one.
#[tokio::test]
async fn http2_cookie_crumbs_reach_the_upstream_as_one_field() {
    let s = Stack::with(&[], ALL_PUBLIC).await;
    for (path, crumbs) in [
        ("/plain", &["a=1", "b=2", "c=3"][..]),
        ("/ours", &["a=1", "_portcullis=forged", "b=2", "c=3"]),
    ] {
        let headers: Vec<(&str, &str)> = crumbs.iter().map(|c| ("cookie", *c)).collect();
        let r = send_h2("GET", &s.gw.url(path), &headers, Vec::new())
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.dump());
        let rec = s.upstream.last();
        assert_eq!(rec.path, path);
        assert_eq!(
            rec.header_all("cookie"),
            ["a=1; b=2; c=3"],
            "{path}: {rec:?}"
        );
    }
}

/// Writes `prefix` and then one byte of `drip` every `every` until the server closes the
/// connection; returns what was read and whether the server closed it within `deadline`.
async fn slow_client(port: u16, prefix: &[u8], drip: &[u8], every: Duration) -> (bool, String) {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    });
    let _ = wr.write_all(prefix).await;
    let t0 = Instant::now();
    let mut i = 0;
    while !reader.is_finished() && t0.elapsed() < DEADLINE {
        if !drip.is_empty() && wr.write_all(&drip[i % drip.len()..][..1]).await.is_err() {
            break;
        }
        i += 1;
        tokio::time::sleep(every).await;
    }
    let closed = tokio::time::timeout(Duration::from_secs(1), async {
        while !reader.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok();
    let got = if closed {
        String::from_utf8_lossy(&reader.await.unwrap()).into_owned()
    } else {
        reader.abort();
        String::new()
    };
    (closed, got)
}

#[tokio::test]
async fn slow_and_idle_clients_are_disconnected() {
    let s = Stack::with(
        &[],
        &format!("{ALL_PUBLIC}\ntimeouts: {{ header_read: 1s }}"),
    )
    .await;
    let port = s.gw.port;

    // Slow-loris: a request line and headers trickling in, one byte every 250 ms.
    let (closed, got) = slow_client(
        port,
        b"GET /slow-loris HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        b"X-Drip: aaaaaaaaaaaaaaaaaaaaaaaa\r\n",
        Duration::from_millis(250),
    )
    .await;
    assert!(
        closed,
        "a slow-loris client kept its connection for {DEADLINE:?}"
    );
    assert!(!got.contains(" 200 "), "{got}");
    // The same with a request line that never ends.
    let (closed, got) = slow_client(port, b"GET /", b"aaaaaaaa", Duration::from_millis(250)).await;
    assert!(
        closed,
        "an endless request line kept its connection for {DEADLINE:?}"
    );
    assert!(!got.contains(" 200 "), "{got}");

    // An idle keep-alive connection, after a complete request, is closed.
    let (closed, got) = idle_after_a_request(port).await;
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    assert!(
        closed,
        "an idle keep-alive connection stayed open for {DEADLINE:?}"
    );
    assert_eq!(
        s.upstream.count(),
        1,
        "only the complete request was served"
    );
    let mut gw = s.gw;
    gw.assert_healthy().await;
}

/// One complete request on a new connection, which then stays idle: whether the gateway
/// closed it (within `DEADLINE`), and what it answered.
async fn idle_after_a_request(port: u16) -> (bool, String) {
    let request = format!("GET /idle HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    slow_client(port, request.as_bytes(), b"", Duration::from_millis(100)).await
}

/// `timeouts.idle` bounds an idle HTTP/1.1 keep-alive connection too, when it is shorter than
/// `timeouts.header_read` (which bounds it otherwise): both are limits on the wait.
#[tokio::test]
async fn idle_keep_alive_connections_follow_timeouts_idle() {
    let s = Stack::with(
        &[],
        &format!("{ALL_PUBLIC}\ntimeouts: {{ header_read: 60s, idle: 1s }}"),
    )
    .await;
    let port = s.gw.port;
    let (closed, got) = idle_after_a_request(port).await;
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    assert!(
        closed,
        "an idle keep-alive connection stayed open for {DEADLINE:?} (timeouts.idle: 1s)"
    );
    // A connection in use is kept: requests closer together than the idle timeout.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    for _ in 0..4 {
        let r = keep_alive_request(&mut stream, port).await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn silent_connections_are_disconnected() {
    let s = Stack::with(
        &[],
        &format!("{ALL_PUBLIC}\ntimeouts: {{ header_read: 1s }}"),
    )
    .await;
    let (closed, _) = slow_client(s.gw.port, b"", b"", Duration::from_millis(100)).await;
    assert!(
        closed,
        "a connection that sent nothing stayed open for {DEADLINE:?}"
    );
}

#[tokio::test]
async fn partial_http2_preface_is_disconnected() {
    let s = Stack::with(
        &[],
        &format!("{ALL_PUBLIC}\ntimeouts: {{ header_read: 1s }}"),
    )
    .await;
    let (closed, _) = slow_client(
        s.gw.port,
        b"PRI * HTTP/2.0\r\n",
        b"",
        Duration::from_millis(100),
    )
    .await;
    assert!(
        closed,
        "a connection that sent half an HTTP/2 preface stayed open for {DEADLINE:?}"
    );
}

/// One HTTP/2 connection carries at most 100 requests at once (nginx's default is 128, hyper's
/// 200): each request held open (a slow upload) holds an upstream connection, and one client
/// connection must not multiply that without bound. Read from the server's SETTINGS frame.
#[tokio::test]
async fn http2_connections_announce_at_most_100_concurrent_streams() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Stack::with(&[], ALL_PUBLIC).await;
    let mut tcp = TcpStream::connect(("127.0.0.1", s.gw.port)).await.unwrap();
    // The client preface, then an empty SETTINGS frame.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let settings = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut head = [0u8; 9];
            tcp.read_exact(&mut head).await.unwrap();
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await.unwrap();
            // SETTINGS (type 4) that is not an ACK (flag 1).
            if head[3] == 4 && head[4] & 1 == 0 {
                break payload;
            }
        }
    })
    .await
    .expect("no SETTINGS frame from the server");
    let max_streams = settings
        .chunks_exact(6)
        .find(|e| e[..2] == [0, 3])
        .map(|e| u32::from_be_bytes([e[2], e[3], e[4], e[5]]));
    assert_eq!(max_streams, Some(100), "SETTINGS: {settings:?}");
}

/// An HTTP/2 client connection (prior knowledge): hyper's client answers SETTINGS and PINGs.
async fn h2_connection(
    port: u16,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    h2_with_window(port, None).await
}

/// Like `h2_connection`, with each stream's flow-control window opened to `window` bytes (kept
/// there unless the client reads); the task ends once the gateway closes the connection.
async fn h2_with_window(
    port: u16,
    window: Option<u32>,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    if let Some(window) = window {
        builder.initial_stream_window_size(window);
    }
    let (sender, conn) = builder.handshake(TokioIo::new(tcp)).await.unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, conn)
}

async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
    port: u16,
) -> u16 {
    let req = http::Request::get(format!("http://127.0.0.1:{port}/x"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    status
}

/// Slow loris over HTTP/2: a client that keeps the connection alive at the HTTP/2 level (it
/// answers PINGs) but opens no stream, or stops opening them, is closed all the same.
#[tokio::test]
async fn http2_connections_without_streams_are_closed() {
    let s = Stack::with(
        &[],
        &format!("{ALL_PUBLIC}\ntimeouts: {{ header_read: 1s, idle: 2s }}"),
    )
    .await;
    let port = s.gw.port;
    let (_silent, silent_conn) = h2_connection(port).await;
    let (mut once, once_conn) = h2_connection(port).await;
    assert_eq!(h2_get(&mut once, port).await, 200);
    // A connection in use is kept, well past both timeouts.
    let (mut busy, busy_conn) = h2_connection(port).await;
    for _ in 0..10 {
        assert_eq!(h2_get(&mut busy, port).await, 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!busy_conn.is_finished(), "a connection in use was closed");
    for (what, conn) in [("no stream", silent_conn), ("one stream", once_conn)] {
        assert!(
            tokio::time::timeout(DEADLINE, conn).await.is_ok(),
            "an HTTP/2 connection with {what} stayed open for {DEADLINE:?} more"
        );
    }
}

/// An HTTP/2 connection serves 1000 streams and is then asked to close (GOAWAY; what is open
/// finishes), as nginx does: streams reset one by one after they were accepted get past h2's
/// rapid-reset guard and each leave work running upstream, so one connection may not open
/// them without end. The client goes on over a new connection.
#[tokio::test]
async fn http2_connections_close_after_1000_streams() {
    let s = Stack::with(&[], ALL_PUBLIC).await;
    let port = s.gw.port;
    let (mut sender, conn) = h2_connection(port).await;
    for i in 0..1000 {
        assert_eq!(h2_get(&mut sender, port).await, 200, "stream {i}");
    }
    assert!(
        tokio::time::timeout(DEADLINE, conn).await.is_ok(),
        "the connection stayed open after 1000 streams"
    );
    let (mut next, _next_conn) = h2_connection(port).await;
    assert_eq!(h2_get(&mut next, port).await, 200);
}

/// A client that goes on opening streams after the GOAWAY of the 1000-stream limit (which a
/// client must not do), and never answers the PING after which h2 would refuse them, is cut
/// off a few streams later, not served without end.
#[tokio::test]
async fn http2_clients_that_ignore_goaway_are_cut_off() {
    const TRIED: u32 = 3000;
    const IN_FLIGHT: u32 = 50;
    let s = Stack::with(&[], ALL_PUBLIC).await;
    let mut tcp = TcpStream::connect(("127.0.0.1", s.gw.port)).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(h2_frame(4, 0, 0, &[]));
    // Flow control wide open: the answers never wait for the window.
    hello.extend(h2_frame(8, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes()));
    tcp.write_all(&hello).await.unwrap();
    // GET / with `:authority`, as HPACK: static-table indexes, one literal.
    let authority = format!("127.0.0.1:{}", s.gw.port);
    let mut block = vec![0x82, 0x86, 0x84, 0x01, authority.len() as u8];
    block.extend_from_slice(authority.as_bytes());
    let (mut sent, mut answered, mut goaway) = (0u32, 0u32, false);
    let mut frames = Vec::new();
    let closed = loop {
        while sent < TRIED && sent < answered + IN_FLIGHT {
            let stream = 2 * sent + 1;
            if tcp
                .write_all(&h2_frame(1, 0x05, stream, &block))
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(DEADLINE, tcp.read(&mut chunk)).await {
            Err(_) => break false,
            Ok(Ok(0) | Err(_)) => break true,
            Ok(Ok(n)) => frames.extend_from_slice(&chunk[..n]),
        }
        // Whole frames: count the answers' heads; SETTINGS are acknowledged, PINGs not.
        while frames.len() >= 9 {
            let len = u32::from_be_bytes([0, frames[0], frames[1], frames[2]]) as usize;
            if frames.len() < 9 + len {
                break;
            }
            let (kind, flags) = (frames[3], frames[4]);
            match kind {
                1 => answered += 1,
                4 if flags & 1 == 0 => tcp.write_all(&h2_frame(4, 1, 0, &[])).await.unwrap(),
                7 => goaway = true,
                _ => {}
            }
            frames.drain(..9 + len);
        }
    };
    assert!(goaway, "no GOAWAY after {answered} answers");
    assert!(
        closed,
        "the connection stayed open, {answered} streams answered"
    );
    assert!(
        (1000..1200).contains(&answered),
        "{answered} streams answered on one connection"
    );
    // Others are served.
    let (mut next, _next_conn) = h2_connection(s.gw.port).await;
    assert_eq!(h2_get(&mut next, s.gw.port).await, 200);
}

/// An access line holds at most 1 KiB of a path: over HTTP/2 a client repeats a 4 KB path
/// for a byte or two (HPACK), and the log must not grow by hundreds of times its traffic.
#[tokio::test]
async fn long_paths_are_cut_short_in_the_access_log() {
    let s = Stack::with(&[], ALL_PUBLIC).await;
    let long = format!("/{}", "a".repeat(4000));
    let r = send("GET", &s.gw.url(&long), &[], Vec::new()).await;
    assert_eq!(r.status, 200, "{}", r.dump());
    let t0 = Instant::now();
    let line = loop {
        let log = s.gw.stderr();
        if let Some(l) = log.lines().find(|l| l.contains("path=\"/aaaa")) {
            break l.to_string();
        }
        assert!(t0.elapsed() < DEADLINE, "no access line: {log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(line.len() < 1400, "{} bytes: {line}", line.len());
    assert!(line.contains("aaaa…"), "{line}");
}

/// Frames h2 warns of (a PING acknowledged that was never sent) are a client's to send by the
/// thousand: they do not each put a line in the log at the default level.
#[tokio::test]
async fn odd_http2_frames_do_not_flood_the_log() {
    let s = Stack::with(&[], ALL_PUBLIC).await;
    let mut tcp = TcpStream::connect(("127.0.0.1", s.gw.port)).await.unwrap();
    let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    wire.extend(h2_frame(4, 0, 0, &[]));
    for _ in 0..200 {
        wire.extend(h2_frame(6, 1, 0, b"unasked!"));
    }
    tcp.write_all(&wire).await.unwrap();
    // A PING of its own, answered once the 200 are read.
    tcp.write_all(&h2_frame(6, 0, 0, b"answerme"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while find_bytes(&seen, b"answerme").is_none() {
        match tokio::time::timeout(DEADLINE, tcp.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&chunk[..n]),
            other => panic!("no PING answer: {other:?}"),
        }
    }
    let (mut next, _next_conn) = h2_connection(s.gw.port).await;
    assert_eq!(h2_get(&mut next, s.gw.port).await, 200);
    let log = s.gw.stderr();
    let warned = log.lines().filter(|l| l.contains("PING")).count();
    assert_eq!(warned, 0, "{log}");
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Slow read over HTTP/2: a client that takes no byte of an answer (its flow-control window
/// kept shut) while keeping the connection alive (it answers PINGs) is disconnected after
/// `timeouts.idle`, as a slow HTTP/1.1 reader is; it does not hold the connection, the stream
/// and the upstream connection for good.
#[tokio::test]
async fn http2_clients_that_read_no_answer_are_disconnected() {
    let s = Stack::with(&[], &format!("{ALL_PUBLIC}\ntimeouts: {{ idle: 1s }}")).await;
    let port = s.gw.port;
    let get = |path: &str| {
        http::Request::get(format!("http://127.0.0.1:{port}{path}"))
            .body(http_body_util::Empty::new())
            .unwrap()
    };
    // The body is held, never read: its window stays shut, after its first 1 KB, or from the
    // start (SETTINGS_INITIAL_WINDOW_SIZE 0: hyper never asks the body for a byte, and the
    // answer still counts as waiting for the client).
    for (window, path) in [(1024, "/big"), (0, "/big"), (0, "/healthz")] {
        let (mut sender, conn) = h2_with_window(port, Some(window)).await;
        let resp = sender.send_request(get(path)).await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let _unread = resp.into_body();
        assert!(
            tokio::time::timeout(DEADLINE, conn).await.is_ok(),
            "an HTTP/2 client that read no answer ({path}, window {window}) stayed connected"
        );
    }
    // One answer left unread while the connection carries on with others: it makes progress,
    // but the unread answer's stream (and its upstream connection) would be held for good.
    let (mut sender, conn) = h2_with_window(port, Some(1024)).await;
    let _unread = sender.send_request(get("/big")).await.unwrap().into_body();
    let mut reading = sender.send_request(get("/big")).await.unwrap().into_body();
    let busy = tokio::spawn(async move {
        let mut got = 0;
        while let Some(Ok(frame)) = reading.frame().await {
            got += frame.data_ref().map_or(0, |d| d.len());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        got
    });
    assert!(
        tokio::time::timeout(DEADLINE, conn).await.is_ok(),
        "an HTTP/2 client that left one answer unread while reading another stayed connected"
    );
    let got = busy.await.unwrap();
    assert!(got > 0 && got < support::upstream::BIG_BODY, "{got}");
    // A client that reads slowly but keeps reading is served to the end.
    let (mut reader, _reader_conn) = h2_connection(port).await;
    let req = http::Request::get(format!("http://127.0.0.1:{port}/big"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let mut body = reader.send_request(req).await.unwrap().into_body();
    let mut got = 0;
    let mut paused = false;
    while let Some(frame) = body.frame().await {
        got += frame.unwrap().data_ref().map_or(0, |d| d.len());
        if !paused && got > support::upstream::BIG_BODY / 2 {
            // A pause shorter than the idle timeout.
            paused = true;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert_eq!(got, support::upstream::BIG_BODY);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// An HTTP/2 frame: length, type, flags, stream, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A client that opens HTTP/2 flow control as wide as it goes, asks for large answers on
/// every stream it may open and then reads nothing makes the gateway hold only a small buffer
/// per stream (hyper's defaults held ~800 KB each: 100 streams of 10 such connections took
/// 800 MB), not whatever the window allows.
#[tokio::test]
async fn http2_clients_that_open_their_window_and_read_nothing_hold_little_memory() {
    use tokio::io::AsyncWriteExt;
    const CONNECTIONS: usize = 4;
    const STREAMS: u32 = 100;
    let s = Stack::with(&[], ALL_PUBLIC).await;
    let pid = s.gw.pid();
    let before = rss_kib(pid);
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS_INITIAL_WINDOW_SIZE at its maximum, and the connection's window likewise.
        out.extend(h2_frame(4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
        out.extend(h2_frame(8, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes()));
        let authority = b"127.0.0.1";
        for i in 0..STREAMS {
            // HPACK: GET, http, then :path and :authority as literals without indexing.
            let mut block = vec![0x82, 0x86, 0x04, 4];
            block.extend_from_slice(b"/mib");
            block.extend_from_slice(&[0x01, authority.len() as u8]);
            block.extend_from_slice(authority);
            out.extend(h2_frame(1, 0x5, 2 * i + 1, &block));
        }
        let mut tcp = TcpStream::connect(("127.0.0.1", s.gw.port)).await.unwrap();
        tcp.write_all(&out).await.unwrap();
        held.push(tcp);
    }
    let asked = CONNECTIONS * STREAMS as usize;
    let per_stream = settled_growth(&s, pid, before, asked).await / asked as u64;
    assert!(
        per_stream < 400,
        "{per_stream} KiB held per unread stream ({before} KiB before, {asked} streams)"
    );
    drop(held);
}

/// The HTTP/1.1 form: each client asks for a large answer and reads none of it. The gateway
/// holds one read of the upstream's answer per connection (hyper's default let that read grow
/// to ~400 KB).
#[tokio::test]
async fn http1_clients_that_read_nothing_hold_little_memory() {
    use tokio::io::AsyncWriteExt;
    const CONNECTIONS: usize = 300;
    let s = Stack::with(&[], ALL_PUBLIC).await;
    let pid = s.gw.pid();
    let before = rss_kib(pid);
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut tcp = TcpStream::connect(("127.0.0.1", s.gw.port)).await.unwrap();
        tcp.write_all(b"GET /mib HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        held.push(tcp);
    }
    let per_connection = settled_growth(&s, pid, before, CONNECTIONS).await / CONNECTIONS as u64;
    assert!(
        per_connection < 150,
        "{per_connection} KiB held per unread answer ({before} KiB before)"
    );
    drop(held);
}

/// Waits until the upstream was asked for `asked` answers of `/mib` and the gateway's memory
/// stops growing (it reads the answers as far as it buffers them); the growth in KiB.
async fn settled_growth(s: &Stack, pid: u32, before: u64, asked: usize) -> u64 {
    let served = || {
        s.upstream
            .records()
            .iter()
            .filter(|r| r.path == "/mib")
            .count()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while served() < asked && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        served(),
        asked,
        "the upstream was not asked for every answer"
    );
    let mut peak = rss_kib(pid);
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_kib(pid);
        if now < peak + 1024 {
            peak = peak.max(now);
            break;
        }
        peak = now;
    }
    peak.saturating_sub(before)
}

#[tokio::test]
async fn silent_connections_cannot_exhaust_max_connections() {
    let s = Stack::with(
        &[],
        &format!("{ALL_PUBLIC}\nlimits: {{ max_connections: 5 }}\ntimeouts: {{ header_read: 1s }}"),
    )
    .await;
    let port = s.gw.port;
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    // Well past header_read, a normal client must be served: the silent ones are gone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = raw_exchange(port, &raw_get("/x", "127.0.0.1", &[]), DEADLINE).await;
    assert_eq!(
        r.status,
        Some(200),
        "5 idle sockets that never sent a byte lock everyone out for {DEADLINE:?}: {r:?}"
    );
    drop(silent);
}

/// Sends a complete keep-alive request on `stream` and reads its (Content-Length) response.
async fn keep_alive_request(stream: &mut TcpStream, port: u16) -> String {
    stream
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let work = async {
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    return text;
                }
            }
        }
    };
    tokio::time::timeout(DEADLINE, work)
        .await
        .expect("keep-alive response")
}

#[tokio::test]
async fn connections_over_max_connections_wait_for_a_free_slot() {
    let s = Stack::with(
        &[],
        &format!(
            "{ALL_PUBLIC}\nlimits: {{ max_connections: 5 }}\ntimeouts: {{ header_read: 60s }}"
        ),
    )
    .await;
    let port = s.gw.port;
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let r = keep_alive_request(&mut c, port).await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        held.push(c);
    }
    // The sixth: the kernel completes the handshake, the gateway does not serve it...
    let mut sixth = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    sixth
        .write_all(
            format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let early = tokio::time::timeout(Duration::from_millis(1500), sixth.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "the sixth connection was served (or closed) while five were open: {early:?}"
    );
    // ... until one of the five goes away.
    drop(held.pop());
    let mut got = Vec::new();
    tokio::time::timeout(DEADLINE, sixth.read_to_end(&mut got))
        .await
        .expect("the sixth connection was not served after a slot freed")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(text.ends_with("ok\n"), "{text}");
    // The held ones still work.
    let r = keep_alive_request(&mut held[0], port).await;
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    drop(held);
    let mut gw = s.gw;
    gw.assert_healthy().await;
}

#[tokio::test]
async fn sign_out_with_a_huge_body_is_refused_cleanly() {
    let s = Stack::start().await;
    let cookie = login_cookie(&s.gw, "alice").await;
    let port = s.gw.port;
    let host = format!("127.0.0.1:{port}");
    let body = vec![b'a'; 1024 * 1024];
    let post = |cookie: Option<&str>, chunked: bool| {
        let mut head = format!(
            "POST /oauth2/sign_out HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n"
        );
        if let Some(c) = cookie {
            head.push_str(&format!("Cookie: {c}\r\n"));
        }
        let mut req = Vec::new();
        if chunked {
            head.push_str("Transfer-Encoding: chunked\r\n\r\n");
            req.extend_from_slice(head.as_bytes());
            for chunk in body.chunks(64 * 1024) {
                req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                req.extend_from_slice(chunk);
                req.extend_from_slice(b"\r\n");
            }
            req.extend_from_slice(b"0\r\n\r\n");
        } else {
            head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
            req.extend_from_slice(head.as_bytes());
            req.extend_from_slice(&body);
        }
        req
    };
    for chunked in [false, true] {
        let r = raw_exchange(port, &post(Some(&cookie), chunked), DEADLINE).await;
        assert_eq!(r.status, Some(413), "chunked={chunked}: {}", r.text);
        assert!(r.closed, "chunked={chunked}");
        assert!(
            r.header("set-cookie").is_none(),
            "session cleared: {}",
            r.text
        );
    }
    // Only the length said, not the body sent: refused at once, not after waiting for it.
    let with_body = post(Some(&cookie), false);
    let head_end = with_body.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let r = raw_exchange(port, &with_body[..head_end], DEADLINE).await;
    assert_eq!(r.status, Some(413), "{}", r.text);
    // Without a session there is nothing to sign out of: no error either way.
    let r = raw_exchange(port, &post(None, false), DEADLINE).await;
    let st = r.status.unwrap_or_else(|| panic!("no answer: {r:?}"));
    assert!(st < 500, "{}", r.text);
    // Still signed in, still healthy.
    let me = send(
        "GET",
        &s.gw.url("/oauth2/userinfo"),
        &[("cookie", &cookie)],
        Vec::new(),
    )
    .await;
    assert_eq!(me.status, 200, "{}", me.dump());
    let mut gw = s.gw;
    gw.assert_healthy().await;
}

/// Slow loris on a body the gateway reads itself, over HTTP/2: a sign-out form that stops
/// arriving is given up after `timeouts.idle` (408), as over HTTP/1.1, instead of holding its
/// stream, and so its connection, open for good.
#[tokio::test]
async fn stalled_http2_request_bodies_to_the_gateway_get_408() {
    let s = Stack::with(&[], "timeouts: { idle: 1s }").await;
    let cookie = login_cookie(&s.gw, "alice").await;
    let port = s.gw.port;
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, ReqBody>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // A part of the form, then nothing: the stream stays open, the connection alive (PINGs
    // are answered).
    let frames = futures_util::stream::once(async {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from_static(b"csrf=")))
    });
    let frames = futures_util::StreamExt::chain(frames, futures_util::stream::pending());
    let body: ReqBody = http_body_util::StreamBody::new(frames).boxed();
    let origin = format!("http://127.0.0.1:{port}");
    let req = http::Request::post(format!("{origin}/oauth2/sign_out"))
        .header("origin", &origin)
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-length", "100")
        .body(body)
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, sender.send_request(req))
        .await
        .unwrap_or_else(|_| panic!("no answer to a stalled HTTP/2 body within {DEADLINE:?}"))
        .unwrap();
    assert_eq!(resp.status(), 408);
    assert!(
        resp.headers().get("set-cookie").is_none(),
        "the session was ended on half a form"
    );
    let mut gw = s.gw;
    gw.assert_healthy().await;
}

#[tokio::test]
async fn stale_flow_cookies_are_cleared_when_a_login_starts() {
    let s = Stack::start().await;
    let flows: Vec<String> = (0..20)
        .map(|i| format!("_portcullis_flow_{i:016x}"))
        .collect();
    let cookie = flows
        .iter()
        .map(|n| format!("{n}=stale-flow-value"))
        .collect::<Vec<_>>()
        .join("; ");
    let r = send(
        "GET",
        &s.gw.url("/oauth2/start?rd=%2F"),
        &[("accept", BROWSER_ACCEPT), ("cookie", &cookie)],
        Vec::new(),
    )
    .await;
    let (_, fresh) = auth_redirect(&r);
    assert!(!flows.contains(&fresh.name));
    let set = r.set_cookies();
    for n in &flows {
        let c = set
            .iter()
            .find(|c| &c.name == n)
            .unwrap_or_else(|| panic!("{n} not cleared: {}", r.dump()));
        assert!(c.is_removal(), "{}", c.raw);
        assert_eq!(c.path(), Some("/"), "{}", c.raw);
    }
    assert_eq!(set.len(), flows.len() + 1, "{}", r.dump());

    // Below the cap nothing is cleared.
    let r = send(
        "GET",
        &s.gw.url("/oauth2/start"),
        &[
            ("accept", BROWSER_ACCEPT),
            (
                "cookie",
                &flows[..3]
                    .iter()
                    .map(|n| format!("{n}=x"))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(r.set_cookies().len(), 1, "{}", r.dump());
}

#[tokio::test]
async fn pending_logins_are_capped_in_a_real_browser() {
    // Each started login leaves a flow cookie of a few hundred bytes for 10 minutes;
    // uncapped, a page that keeps starting logins grows the callback's Cookie header.
    let s = Stack::start().await;
    let b = Browser::new();
    let mut last = None;
    for i in 0..12 {
        let r = b.get(&s.gw.url(&format!("/tab/{i}"))).await;
        last = Some(auth_redirect(&r).0);
        let pending = b
            .cookie_names(&s.gw.url("/oauth2/callback"))
            .into_iter()
            .filter(|n| n.starts_with("_portcullis_flow_"))
            .count();
        assert!(
            (1..=8).contains(&pending),
            "{pending} pending flows after {i}"
        );
    }
    // The newest login still completes.
    let callback = idp_walk(&b, &last.unwrap(), "alice").await;
    let cb = b.get(&callback).await;
    assert_eq!(cb.status, 302, "{}", cb.dump());
    assert_eq!(cb.location(), Some("/tab/11"));
}

fn assert_page_headers(r: &Resp) {
    let what = format!("{} {}", r.method, r.url);
    let csp = r.header("content-security-policy").unwrap_or("");
    assert!(csp.contains("default-src 'none'"), "{what}: CSP {csp:?}");
    assert!(
        csp.contains("frame-ancestors 'none'"),
        "{what}: CSP {csp:?}"
    );
    assert_eq!(
        r.header("x-content-type-options"),
        Some("nosniff"),
        "{what}"
    );
    assert!(
        r.header("referrer-policy").is_some(),
        "{what}: {}",
        r.dump()
    );
    assert_eq!(r.header("cache-control"), Some("no-store"), "{what}");
}

#[tokio::test]
async fn gateway_pages_carry_security_headers_and_escape_what_they_echo() {
    let s = Stack::with(
        &[],
        r#"routes: [ { prefix: "/admin/", allow: { groups: ["nobody"] } } ]"#,
    )
    .await;
    let anon = Browser::new();
    let pages = [
        ("/oauth2/callback", 400),
        ("/oauth2/callback?code=x", 400),
        ("/oauth2/callback?state=unknown-state&code=x", 400),
        ("/oauth2/sign_out", 200),
        ("/oauth2/signed_out", 200),
        ("/oauth2/nope", 404),
        ("/a%2fb", 400),
        ("/a;b", 400),
    ];
    for (path, status) in pages {
        let r = anon.get(&s.gw.url(path)).await;
        assert_eq!(r.status, status, "{path}: {}", r.dump());
        assert_eq!(
            r.header("content-type"),
            Some("text/html; charset=utf-8"),
            "{path}"
        );
        assert_page_headers(&r);
    }
    let r = anon.api_get(&s.gw.url("/oauth2/userinfo")).await;
    assert_eq!(r.status, 401);
    assert_page_headers(&r);
    // Plain-text answers too (a wrong method on a gateway endpoint).
    let r = send("DELETE", &s.gw.url("/oauth2/sign_out"), &[], Vec::new()).await;
    assert_eq!(r.status, 405, "{}", r.dump());
    assert_page_headers(&r);

    // A provider error echoed on the callback page is escaped.
    let (auth, _) = auth_redirect(&anon.get(&s.gw.url("/oauth2/start?rd=%2F")).await);
    let state = query_param(&auth, "state").unwrap();
    let r = anon
        .get(&s.gw.url(&format!(
            "/oauth2/callback?state={}&error={}&error_description={}",
            enc(&state),
            enc("<img src=x onerror=alert(1)>"),
            enc("<script>alert(1)</script>\"'&")
        )))
        .await;
    assert_eq!(r.status, 403, "{}", r.dump());
    assert_page_headers(&r);
    let body = r.text();
    assert!(
        !body.contains("<script>") && !body.contains("<img"),
        "unescaped: {body}"
    );
    assert!(
        body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{body}"
    );
    assert!(
        body.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{body}"
    );
    assert!(body.contains("&quot;&#39;&amp;"), "{body}");

    // Signed in: the sign-out page and an authorization 403.
    let b = s.login("alice").await;
    let r = b.get(&s.gw.url("/oauth2/sign_out")).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("alice@example.test"), "{}", r.dump());
    assert_page_headers(&r);
    let r = b.get(&s.gw.url("/admin/")).await;
    assert_eq!(r.status, 403, "{}", r.dump());
    assert_page_headers(&r);
    assert!(r.text().contains("/oauth2/sign_out"), "{}", r.dump());
}
