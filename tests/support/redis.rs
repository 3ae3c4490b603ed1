//! A real `redis-server` child process on a free 127.0.0.1 port (killed on drop, restartable
//! on the same port, optionally with an append-only file so data survives a restart), and a
//! tiny blocking RESP client for looking at what the gateway stored.

use super::procs::{free_port, Proc};
use super::START_TIMEOUT;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// One RESP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The reply as text (status or bulk string).
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Status(s) => Some(s.clone()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
}

fn read_reply(r: &mut impl BufRead) -> Result<Reply, String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at_checked(1).ok_or("connection closed")?;
    let num = || {
        rest.parse::<i64>()
            .map_err(|e| format!("bad RESP {line:?}: {e}"))
    };
    match kind {
        "+" => Ok(Reply::Status(rest.to_string())),
        "-" => Ok(Reply::Error(rest.to_string())),
        ":" => Ok(Reply::Int(num()?)),
        "$" => {
            let n = num()?;
            if n < 0 {
                return Ok(Reply::Bulk(None));
            }
            let mut buf = vec![0u8; n as usize + 2];
            r.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
            buf.truncate(n as usize);
            Ok(Reply::Bulk(Some(buf)))
        }
        "*" => {
            let n = num()?;
            if n < 0 {
                return Ok(Reply::Array(None));
            }
            let items = (0..n)
                .map(|_| read_reply(r))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Reply::Array(Some(items)))
        }
        _ => Err(format!("bad RESP line {line:?}")),
    }
}

/// Sends one command to the Redis on `port` over a fresh connection.
pub fn command(port: u16, args: &[&str]) -> Result<Reply, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    s.write_all(&req).map_err(|e| format!("write: {e}"))?;
    read_reply(&mut BufReader::new(s))
}

/// Sends one command after `AUTH password`, over a fresh connection: its reply.
pub fn command_as(port: u16, password: &str, args: &[&str]) -> Result<Reply, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut req = Vec::new();
    for cmd in [&["AUTH", password][..], args] {
        req.extend_from_slice(format!("*{}\r\n", cmd.len()).as_bytes());
        for a in cmd {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
    }
    s.write_all(&req).map_err(|e| format!("write: {e}"))?;
    let mut r = BufReader::new(s);
    read_reply(&mut r)?;
    read_reply(&mut r)
}

/// `redis-server`, started and stopped by the test.
pub struct RedisServer {
    pub port: u16,
    persistent: bool,
    /// Also serving TLS: on this port, with this certificate and key.
    tls: Option<(u16, PathBuf, PathBuf)>,
    /// The data directory (the append-only file lives here); kept across restarts.
    data: tempfile::TempDir,
    proc: Option<Proc>,
}

fn binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| {
        if std::path::Path::new("/usr/bin/redis-server").exists() {
            "/usr/bin/redis-server".to_string()
        } else {
            "redis-server".to_string()
        }
    })
}

impl RedisServer {
    /// A throw-away Redis: nothing written to disk.
    pub async fn start() -> RedisServer {
        Self::start_with(false).await
    }

    /// A Redis whose data survives `kill` + `restart` (append-only file, fsync on every write).
    pub async fn start_persistent() -> RedisServer {
        Self::start_with(true).await
    }

    /// A throw-away Redis that also serves TLS (`tls_url`) with `cert` and `key`; the plain
    /// port stays for the test's own look at the data.
    pub async fn start_tls(cert: &Path, key: &Path) -> RedisServer {
        Self::start_with_tls(false, Some((cert.to_path_buf(), key.to_path_buf()))).await
    }

    async fn start_with(persistent: bool) -> RedisServer {
        Self::start_with_tls(persistent, None).await
    }

    async fn start_with_tls(persistent: bool, tls: Option<(PathBuf, PathBuf)>) -> RedisServer {
        let data = tempfile::Builder::new()
            .prefix("portcullis-redis-data-")
            .tempdir()
            .expect("tempdir");
        let mut r = RedisServer {
            port: 0,
            persistent,
            tls: tls.map(|(cert, key)| (0, cert, key)),
            data,
            proc: None,
        };
        let mut last = String::new();
        for _attempt in 0..3 {
            r.port = free_port();
            if let Some(tls) = &mut r.tls {
                tls.0 = free_port();
            }
            match r.spawn().await {
                Ok(()) => return r,
                Err(e) => last = e,
            }
            // The port was taken between free_port() and redis' bind: try another.
            if !last.contains("Address already in use") {
                break;
            }
        }
        panic!("cannot start redis-server: {last}");
    }

    async fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(binary());
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--dir")
            .arg(self.data.path());
        if let Some((port, cert, key)) = &self.tls {
            cmd.arg("--tls-port")
                .arg(port.to_string())
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .args(["--tls-auth-clients", "no"]);
        }
        if self.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let logs = tempfile::Builder::new()
            .prefix("portcullis-redis-")
            .tempdir()
            .expect("tempdir");
        let mut proc = Proc::spawn("redis", cmd, logs);
        let t0 = Instant::now();
        loop {
            if let Some(st) = proc.exited() {
                return Err(format!("redis-server exited with {st}\n{}", proc.tails()));
            }
            if matches!(command(self.port, &["PING"]), Ok(Reply::Status(ref s)) if s == "PONG") {
                self.proc = Some(proc);
                return Ok(());
            }
            if t0.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "redis-server not answering PING after {START_TIMEOUT:?}\n{}",
                    proc.tails()
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `redis://127.0.0.1:<port>/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `rediss://127.0.0.1:<tls port>/0` (a server started with `start_tls`).
    pub fn tls_url(&self) -> String {
        let (port, _, _) = self.tls.as_ref().expect("started with start_tls");
        format!("rediss://127.0.0.1:{port}/0")
    }

    /// Kills the server (SIGKILL: no shutdown save; a persistent one keeps what it fsynced).
    pub fn kill(&mut self) {
        // Dropping the child process kills and reaps it.
        self.proc = None;
    }

    /// Freezes (`SIGSTOP`) or resumes (`SIGCONT`) the server: a Redis that stalls, then
    /// carries out everything it was sent meanwhile.
    pub fn signal(&self, signal: &str) {
        let pid = self.proc.as_ref().map(Proc::pid).expect("redis is running");
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} {pid}");
    }

    /// Starts the server again on the same port (and data directory).
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.spawn().await {
            panic!("cannot restart redis-server on port {}: {e}", self.port);
        }
    }

    /// One command; panics on connection errors.
    pub fn cmd(&self, args: &[&str]) -> Reply {
        command(self.port, args).unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// `KEYS pattern`, sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        match self.cmd(&["KEYS", pattern]) {
            Reply::Array(Some(items)) => {
                let mut v: Vec<String> = items.iter().filter_map(Reply::text).collect();
                v.sort();
                v
            }
            other => panic!("KEYS {pattern}: {other:?}"),
        }
    }

    /// `GET key` as bytes.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self.cmd(&["GET", key]) {
            Reply::Bulk(b) => b,
            other => panic!("GET {key}: {other:?}"),
        }
    }

    pub fn tails(&self) -> String {
        self.proc.as_ref().map(Proc::tails).unwrap_or_default()
    }
}
