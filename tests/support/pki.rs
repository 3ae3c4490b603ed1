//! A throw-away PKI made with the openssl CLI: a test CA and the certificates it issues.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `openssl req` arguments for a fresh unencrypted P-256 key, written to the path that follows.
const NEW_KEY: [&str; 6] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
    "-keyout",
];

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run the `openssl` CLI ({e}): install it (apt-get install openssl)")
        });
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test CA and the leaf certificates it issues (P-256, SAN IP:127.0.0.1). Leaves are
/// CA:FALSE: webpki refuses a CA certificate used as an end entity, so a bare `req -x509`
/// self-signed certificate cannot be served to a rustls client.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("portcullis-pki-")
            .tempdir()
            .expect("tempdir");
        let pki = Pki { dir };
        pki.self_signed("ca", "/CN=portcullis test CA", &[]);
        pki
    }

    /// A self-signed certificate `<name>.pem` / `<name>.key` (`openssl req -x509`: a CA
    /// certificate) with subject `subj` and `extra` arguments such as `-addext`.
    pub fn self_signed(&self, name: &str, subj: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
        let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
        let mut args = vec!["req", "-x509"];
        args.extend_from_slice(&NEW_KEY);
        args.extend_from_slice(&[&key, "-out", &pem, "-days", "2", "-subj", subj]);
        args.extend_from_slice(extra);
        openssl(self.dir.path(), &args);
        (self.path(&pem), self.path(&key))
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues `<name>.pem` / `<name>.key` for `cn` (server and client auth), valid two days.
    pub fn issue(&self, name: &str, cn: &str) -> (PathBuf, PathBuf) {
        self.issue_for_days(name, cn, 2)
    }

    /// [`Pki::issue`] with a validity of `days`.
    pub fn issue_for_days(&self, name: &str, cn: &str, days: u32) -> (PathBuf, PathBuf) {
        let d = self.dir.path();
        std::fs::write(
            d.join(format!("{name}.ext")),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .unwrap();
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        let subj = format!("/CN={cn}");
        let mut args = vec!["req", "-new"];
        args.extend_from_slice(&NEW_KEY);
        args.extend_from_slice(&[&key, "-out", &csr, "-subj", &subj]);
        openssl(d, &args);
        let serial = format!(
            "0x{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &serial,
                "-days",
                &days.to_string(),
                "-out",
                &pem,
                "-extfile",
                &ext,
            ],
        );
        (d.join(pem), d.join(key))
    }
}

/// When the certificate in `pem` expires, in Unix seconds, as `openssl x509` and GNU `date`
/// read it.
pub fn not_after(pem: &Path) -> i64 {
    let out = openssl(
        Path::new("."),
        &[
            "x509",
            "-noout",
            "-enddate",
            "-in",
            &pem.display().to_string(),
        ],
    );
    let date = out.trim().trim_start_matches("notAfter=");
    let unix = Command::new("date")
        .args(["-u", "-d", date, "+%s"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&unix.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("date -d {date:?}: {e}"))
}
