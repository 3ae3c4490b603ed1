//! TLS: the server side (rustls, TLS 1.2+, h2 and http/1.1 via ALPN, certificates reloaded
//! when their files change) and the client side (system roots plus an optional CA bundle,
//! an optional client certificate for upstream mTLS).

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::DigitallySignedStruct;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A PEM error in words (rustls prints a missing end marker as a list of byte values).
fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match e {
        Error::MissingSectionEnd { end_marker } => format!(
            "a PEM section has no `-----END {}-----` line (is the file cut short?)",
            text(end_marker)
        ),
        Error::IllegalSectionStart { line } => {
            format!("a malformed PEM `-----BEGIN` line: `{}`", text(line).trim())
        }
        e => e.to_string(),
    }
}

/// A PEM file's bytes (bounded: see [`MAX_FILE_BYTES`](crate::config::MAX_FILE_BYTES)).
fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    crate::config::read_bounded(path, crate::config::MAX_FILE_BYTES)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    let certs = certs.map_err(|e| format!("{}: {}", path.display(), pem_error(&e)))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read_pem(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        // A passphrase-protected key parses as "no key": say what it is instead.
        let text = String::from_utf8_lossy(&pem);
        if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
            format!(
                "{}: the private key is encrypted (passphrase-protected), which is not \
                 supported; decrypt it, e.g. `openssl pkey -in key.pem -out plain.pem`",
                path.display()
            )
        } else {
            format!(
                "{}: no usable private key: {}",
                path.display(),
                pem_error(&e)
            )
        }
    })
}

/// Loads a certificate chain and its key, checking that they belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let ck = CertifiedKey::from_der(read_chain(cert)?, read_key(key)?, &provider)
        .map_err(|e| format!("certificate and key do not match: {e}"))?;
    Ok(ck)
}

/// How soon an expiry is warned about at load: renewals (cert-manager's default, ACME
/// clients') happen weeks before it, so one this close has failed.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// When the leaf becomes valid and when the chain's first certificate expires; `None` when a
/// certificate is not RFC 5280 DER (rustls took it anyway: its dates go unchecked).
pub fn chain_validity(chain: &[CertificateDer<'_>]) -> Option<(SystemTime, SystemTime)> {
    use x509_cert::der::Decode;
    let mut dates = chain
        .iter()
        .map(|der| x509_cert::Certificate::from_der(der).map(|c| *c.tbs_certificate().validity()));
    let leaf = dates.next()?.ok()?;
    let first_expiry = dates.try_fold(leaf.not_after.to_system_time(), |end, v| {
        v.map(|v| end.min(v.not_after.to_system_time()))
    });
    Some((leaf.not_before.to_system_time(), first_expiry.ok()?))
}

/// Publishes when the chain loaded for config key `file` expires, and logs it if it has, will
/// within [`EXPIRY_WARNING`], or is not valid yet. Such a chain is still served, as nginx
/// does: clients may not check dates, and refusing to start would take them down too.
pub fn note_expiry(
    file: &str,
    chain: &[CertificateDer<'_>],
    metrics: &crate::metrics::Metrics,
    now: SystemTime,
) {
    let Some((not_before, expires)) = chain_validity(chain) else {
        tracing::debug!(file, "certificate dates unreadable; not checked");
        let _ = metrics.tls_cert_expiry.remove_label_values(&[file]);
        return;
    };
    let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    metrics
        .tls_cert_expiry
        .with_label_values(&[file])
        .set(i64::try_from(unix(expires).as_secs()).unwrap_or(i64::MAX));
    match dates_problem(not_before, expires, now) {
        Some((true, why)) => tracing::error!(file, "{why}"),
        Some((false, why)) => tracing::warn!(file, "{why}"),
        None => tracing::debug!(
            file,
            expires = httpdate::fmt_http_date(expires).as_str(),
            "certificate dates checked"
        ),
    }
}

/// What `portcullis check` says of the dates of the certificates `cfg` names (read as the
/// gateway reads them at start-up), each line naming its key.
pub fn certificate_warnings(cfg: &crate::config::Config, now: SystemTime) -> Vec<String> {
    let server = cfg.tls_server.as_ref().map(|(c, _)| ("tls.cert_file", c));
    let client = (cfg.tls_client.client_cert.as_ref()).map(|(c, _)| ("tls.client_cert_file", c));
    server
        .into_iter()
        .chain(client)
        .filter_map(|(file, path)| {
            let (not_before, expires) = chain_validity(&read_chain(path).ok()?)?;
            let (_, why) = dates_problem(not_before, expires, now)?;
            Some(format!("{file}: {why}"))
        })
        .collect()
}

/// What is wrong with a certificate's dates at `now`, if anything, and whether it has expired.
fn dates_problem(
    not_before: SystemTime,
    expires: SystemTime,
    now: SystemTime,
) -> Option<(bool, String)> {
    let date = httpdate::fmt_http_date;
    match expires.duration_since(now) {
        Err(_) => Some((
            true,
            format!(
                "the certificate expired on {}; clients checking dates refuse it",
                date(expires)
            ),
        )),
        Ok(left) if left < EXPIRY_WARNING => Some((
            false,
            format!(
                "the certificate expires on {} (days left: {}); has its renewal failed?",
                date(expires),
                left.as_secs() / 86_400
            ),
        )),
        Ok(_) if not_before > now => Some((
            false,
            format!(
                "the certificate is not valid until {}; is this clock behind?",
                date(not_before)
            ),
        )),
        Ok(_) => None,
    }
}

/// The serving certificate, swapped in place when its files change.
#[derive(Debug)]
pub struct ReloadingCert {
    current: ArcSwap<CertifiedKey>,
    cert: PathBuf,
    key: PathBuf,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ReloadingCert {
    pub fn new(cert: &Path, key: &Path) -> Result<Arc<Self>, String> {
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(load_certified_key(cert, key)?),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }))
    }

    /// Re-reads the files every couple of seconds; a bad pair is logged and counted (a
    /// failed renewal must reach the reload alert before the old certificate expires), and
    /// the old one kept.
    pub async fn watch(self: Arc<Self>, metrics: Arc<crate::metrics::Metrics>) {
        let reloads = &metrics.config_reloads;
        note_expiry(
            "tls.cert_file",
            &self.current.load().cert,
            &metrics,
            SystemTime::now(),
        );
        let stamp = |p: &Path| crate::config::read_bounded(p, crate::config::MAX_FILE_BYTES).ok();
        let mut last = (stamp(&self.cert), stamp(&self.key));
        // A pair that failed once is tried again on the next tick before the failure counts:
        // a renewal that writes the certificate and the key one at a time is no failure.
        let mut retrying = false;
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let now = (stamp(&self.cert), stamp(&self.key));
            if now == last && !retrying {
                continue;
            }
            last = now;
            match load_certified_key(&self.cert, &self.key) {
                Ok(ck) => {
                    retrying = false;
                    tracing::info!("TLS certificate reloaded");
                    note_expiry("tls.cert_file", &ck.cert, &metrics, SystemTime::now());
                    self.current.store(Arc::new(ck));
                    reloads.with_label_values(&["success"]).inc();
                }
                Err(e) if !retrying => {
                    retrying = true;
                    tracing::debug!(
                        error = e.to_string().as_str(),
                        "TLS files do not load (yet); trying again"
                    );
                }
                Err(e) => {
                    retrying = false;
                    tracing::error!(
                        error = e.to_string().as_str(),
                        "TLS certificate reload failed; keeping the previous one"
                    );
                    reloads.with_label_values(&["failure"]).inc();
                }
            }
        }
    }
}

/// The server config: TLS 1.2 and 1.3 only, ALPN h2 then http/1.1.
pub fn server_config(resolver: Arc<ReloadingCert>) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Checks servers against the roots, and also accepts a server presenting one of
/// `tls.ca_file`'s certificates itself: a self-signed certificate (`openssl req -x509`, a
/// CA certificate to webpki), which webpki refuses as an end entity (`CaUsedAsEndEntity`)
/// even when it is a configured root. The name must still match, and the validity period
/// has been checked by then (webpki checks it before the CA flag).
#[derive(Debug)]
struct ConfiguredRoots {
    webpki: Arc<WebPkiServerVerifier>,
    /// The certificates of `tls.ca_file`.
    pinned: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for ConfiguredRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        match verdict {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(ref e)))
                if matches!(
                    e.0.downcast_ref::<webpki::Error>(),
                    Some(webpki::Error::CaUsedAsEndEntity)
                ) && self
                    .pinned
                    .iter()
                    .any(|c| c.as_ref() == end_entity.as_ref()) =>
            {
                let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&cert, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The client config for upstream and provider calls.
pub fn client_config(
    ca_file: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = roots.add(c);
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = match ca_file {
        None => builder.with_root_certificates(roots),
        Some(ca) => {
            let pinned = read_chain(ca)?;
            for c in &pinned {
                roots
                    .add(c.clone())
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ConfiguredRoots { webpki, pinned }))
        }
    };
    // ALPN is left to the connector.
    match client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_chain(cert)?, read_key(key)?)
            .map_err(|e| format!("client certificate: {e}")),
        None => Ok(builder.with_no_client_auth()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encrypted_key_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let pkcs8 = dir.path().join("pkcs8.pem");
        std::fs::write(
            &pkcs8,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0w\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let legacy = dir.path().join("legacy.pem");
        std::fs::write(
            &legacy,
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        )
        .unwrap();
        for p in [&pkcs8, &legacy] {
            let e = read_key(p).unwrap_err();
            assert!(e.contains("encrypted"), "{e}");
        }
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = read_key(&empty).unwrap_err();
        assert!(e.contains("no usable private key"), "{e}");
    }

    #[test]
    fn a_truncated_certificate_is_said_to_be_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let cut = dir.path().join("cut.pem");
        std::fs::write(
            &cut,
            "-----BEGIN CERTIFICATE-----\nMIIBvTBXBgkqhkiG9w0BBQ0w\n",
        )
        .unwrap();
        let e = read_chain(&cut).unwrap_err();
        assert!(
            e.contains("no `-----END CERTIFICATE-----` line") && !e.contains("[67,"),
            "{e}"
        );
    }

    /// Self-signed, valid from 2020-01-01 to 2020-03-01 (UTCTime).
    const EXPIRED: &str = "-----BEGIN CERTIFICATE-----
MIIBCzCBsgIBATAKBggqhkjOPQQDAjASMRAwDgYDVQQDDAdleHBpcmVkMB4XDTIw
MDEwMTAwMDAwMFoXDTIwMDMwMTAwMDAwMFowEjEQMA4GA1UEAwwHZXhwaXJlZDBZ
MBMGByqGSM49AgEGCCqGSM49AwEHA0IABPsmtGg6qtTVPUAqIldnijARj9U782w9
yNLye3hJFbuNuW3Al+tE4y3DydaqBbkXy+BWiNX1G5pfHPF0LxocjokwCgYIKoZI
zj0EAwIDSAAwRQIhAO9U/ve3wRd5DHNiiQ5lHVKsXGr6ca+Vut9WR5aCu86iAiAP
eW+wSX+3/OE8cCsdB8hCeFD7Yx3lORlj+QCaG1cfhg==
-----END CERTIFICATE-----
";
    /// Self-signed, valid from 2099-01-01 to 2100-01-01 (GeneralizedTime).
    const FUTURE: &str = "-----BEGIN CERTIFICATE-----
MIIBDjCBtAIBAjAKBggqhkjOPQQDAjARMQ8wDQYDVQQDDAZmdXR1cmUwIhgPMjA5
OTAxMDEwMDAwMDBaGA8yMTAwMDEwMTAwMDAwMFowETEPMA0GA1UEAwwGZnV0dXJl
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEGZDcgLrLIC4cC5iS7zLjonoHBB0p
Z59amCVSWsURvjGJYI40ohfH8jh+yMMusJFZyZtfj2FGVCjN802J/VbZGjAKBggq
hkjOPQQDAgNJADBGAiEAvcsT2Q9iTzUACLjCYjA0dV73hU8AjenvSRLdQtd2UJEC
IQDtO680kUtSJrLWIHtR+Oc+9fQPZp/YVTiuJlkwtXAtug==
-----END CERTIFICATE-----
";

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn unix(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_chain_expires_with_its_first_certificate_to_expire() {
        let (expired, future) = (der(EXPIRED), der(FUTURE));
        // `date -u -d '<notBefore/notAfter as openssl prints them>' +%s`
        assert_eq!(
            chain_validity(std::slice::from_ref(&expired)),
            Some((unix(1_577_836_800), unix(1_583_020_800)))
        );
        assert_eq!(
            chain_validity(std::slice::from_ref(&future)),
            Some((unix(4_070_908_800), unix(4_102_444_800)))
        );
        // The leaf's start, the earliest end, whichever certificate it is.
        let chain = [future.clone(), expired.clone()];
        assert_eq!(
            chain_validity(&chain),
            Some((unix(4_070_908_800), unix(1_583_020_800)))
        );
        assert_eq!(chain_validity(&[]), None);
        let junk = CertificateDer::from(b"\x30\x03\x02\x01\x01".to_vec());
        assert_eq!(chain_validity(std::slice::from_ref(&junk)), None);
        assert_eq!(chain_validity(&[future, junk]), None);
    }

    #[test]
    fn expiry_is_judged_against_the_clock() {
        let day = 86_400;
        let (from, until) = (100 * day, 200 * day);
        let judge = |now: u64| dates_problem(unix(from), unix(until), unix(now));
        assert_eq!(judge(150 * day), None);
        assert_eq!(judge(186 * day - 1), None);
        let soon = "the certificate expires on Mon, 20 Jul 1970 00:00:00 GMT";
        let (expired, why) = judge(186 * day + 1).unwrap();
        assert!(
            !expired && why.starts_with(soon) && why.contains("(days left: 13)"),
            "{why}"
        );
        let (expired, why) = judge(200 * day - 1).unwrap();
        assert!(!expired && why.contains("(days left: 0)"), "{why}");
        let (expired, why) = judge(200 * day + 1).unwrap();
        assert!(
            expired && why.starts_with("the certificate expired on Mon, 20 Jul 1970"),
            "{why}"
        );
        let (expired, why) = judge(99 * day).unwrap();
        assert!(
            !expired && why.starts_with("the certificate is not valid until Sat, 11 Apr 1970"),
            "{why}"
        );
    }

    #[test]
    fn the_expiry_gauge_follows_the_chain_loaded() {
        let m = crate::metrics::Metrics::new().unwrap();
        let get = |m: &crate::metrics::Metrics| {
            m.tls_cert_expiry
                .get_metric_with_label_values(&["tls.cert_file"])
                .map(|g| g.get())
                .ok()
        };
        note_expiry("tls.cert_file", &[der(EXPIRED)], &m, SystemTime::now());
        assert_eq!(get(&m), Some(1_583_020_800));
        note_expiry("tls.cert_file", &[der(FUTURE)], &m, SystemTime::now());
        assert_eq!(get(&m), Some(4_102_444_800));
        // Unreadable dates: no figure rather than a wrong one.
        let junk = CertificateDer::from(vec![0x30, 0x00]);
        note_expiry("tls.cert_file", &[junk], &m, SystemTime::now());
        let text = String::from_utf8(m.render()).unwrap();
        assert!(!text.contains("tls.cert_file"), "{text}");
    }
}
