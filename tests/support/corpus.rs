//! Hostile inputs for tests/policy.rs and tests/edges.rs: open-redirect payloads for `rd`,
//! path-confusion request targets, and a byte-exact HTTP/1.1 sender for the requests an
//! HTTP client library would refuse to send (or would "fix" first).

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Open-redirect payloads for `/oauth2/start?rd=`. Whatever the gateway does with them, the
/// browser must end up on the gateway's own origin or on an allowed redirect domain
/// (`.example.com` in the tests), never anywhere else. Sources: the usual open-redirect
/// cheat sheets (PayloadsAllTheThings, OWASP), plus the parser differentials between the
/// WHATWG URL standard (what browsers follow) and RFC 3986.
pub const OPEN_REDIRECTS: &[&str] = &[
    // Absolute URLs and scheme tricks.
    "https://evil.com",
    "http://evil.com",
    "HTTPS://EVIL.COM/",
    "http:evil.com",
    "https:evil.com",
    "http:/evil.com",
    "https:/\\evil.com",
    "https:\\\\evil.com",
    "https:///evil.com",
    "https:\\/evil.com",
    "ftp://evil.com",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "javascript://%0aalert(1)",
    "javascript://app.example.com/%0aalert(1)",
    " javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
    "vbscript:msgbox(1)",
    // Protocol-relative and slash/backslash mixes.
    "//evil.com",
    "///evil.com",
    "////evil.com",
    "//evil.com/%2F..",
    "//evil.com\\@app.example.com",
    "/\\evil.com",
    "\\/evil.com",
    "\\\\evil.com",
    "/\\/evil.com",
    "\\/\\/evil.com",
    "/\\\\evil.com",
    "//\\evil.com",
    // Encoded separators.
    "/%2F%2Fevil.com",
    "/%2fevil.com",
    "/%5Cevil.com",
    "/%5cevil.com",
    "/%5C%5Cevil.com",
    "%2F%2Fevil.com",
    "%2f%2fevil.com",
    "%5C%5Cevil.com",
    "/%2F/evil.com",
    // Dot segments that resolve to a network-path reference.
    "/x/..//evil.com",
    "/x/%2e%2e//evil.com",
    "/./\\evil.com",
    // Whitespace and controls that browsers strip or turn into separators.
    "/\t/evil.com",
    "/%09/evil.com",
    "/\n/evil.com",
    "/%0a/evil.com",
    "/\r\n/evil.com",
    "/%0d%0a/evil.com",
    "/%0d/evil.com",
    "\t//evil.com",
    "\n//evil.com",
    " //evil.com",
    " https://evil.com",
    "https://evil.com ",
    "/%00/evil.com",
    "/\u{0}/evil.com",
    "/%20/evil.com",
    // Userinfo and delimiter confusion around an allowed host.
    "https://app.example.com@evil.com",
    "https://app.example.com@evil.com/",
    "https://app.example.com:443@evil.com",
    "https://evil.com\\@app.example.com",
    "https://evil.com%5C@app.example.com",
    "https://evil.com\\.example.com",
    "https://evil.com#.example.com",
    "https://evil.com#@app.example.com",
    "https://evil.com?.example.com",
    "https://evil.com/.example.com",
    "https://evil.com%23.example.com",
    "https://evil.com%2F.example.com",
    "https://evil.com;.example.com",
    "//app.example.com@evil.com",
    "https://localhost@evil.com",
    "https://localhost.evil.com",
    // Look-alike hosts and IDN.
    "https://ex\u{0430}mple.com",
    "https://\u{0430}pp.example.com.evil.com",
    "\u{ff0f}\u{ff0f}evil.com",
    "/\u{ff0f}evil.com",
    "https://evil\u{3002}com",
    "https://evil\u{ff0e}com",
    "https://\u{24d4}\u{24e5}\u{24d8}\u{24db}.\u{24d2}\u{24de}\u{24dc}",
    "https://xn--exmple-4nf.com",
    "https://b\u{fc}cher.example",
    "https://example.com.evil.com",
    "https://app.example.com.evil.com",
    "https://evilexample.com",
    "https://notexample.com/",
    // IP literals in every spelling (the gateway's own host is a name in the tests).
    "http://[::1]",
    "http://[::1]:4180/",
    "http://[::ffff:127.0.0.1]/",
    "http://127.0.0.1",
    "http://2130706433",
    "http://0x7f.1",
    "http://0x7f000001",
    "http://017700000001",
    "http://127.1",
    "http://0.0.0.0",
    "http://169.254.169.254/latest/meta-data/",
    // The gateway's own host (`localhost` in the tests) on another port or scheme: another
    // origin, another service (the test adds its own port with the other scheme).
    "http://localhost:9999/x",
    "http://localhost:1/",
    "http://localhost/x",
    "https://localhost/x",
    "https://localhost:443/",
    "//localhost:9999/x",
    "http://LOCALHOST:9999/x",
    "http://localhost.:9999/x",
    "ws://localhost:9999/x",
    // Encoded schemes.
    "%68ttps://evil.com",
    "%68%74%74%70%73%3a%2f%2fevil.com",
    "https%3A%2F%2Fevil.com",
    "https%3a//evil.com",
    // Very long input.
    "/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa//evil.com",
];

/// Relative targets that stay on the gateway's origin (a browser resolves each to a path
/// on the same host); the gateway may honour them as given.
pub const SAME_ORIGIN: &[&str] = &[
    "/",
    "/deep/link?a=b",
    "/.evil.com",
    "/evil.com",
    "/https://evil.com",
    "/..//evil.com",
    "/%2e%2e//evil.com",
    "/%252F%252Fevil.com",
    "/x?next=//evil.com",
    "/x#//evil.com",
];

/// Request targets that try to reach a protected path (`/admin`) through a public prefix
/// (`/public/`), each sent byte for byte. None may reach the upstream without a login.
pub const PATH_CONFUSION: &[&str] = &[
    "/public/../admin",
    "/public/%2e%2e/admin",
    "/public/%2E%2E/admin",
    "/public/.%2e/admin",
    "/public/%2e./admin",
    "/public%2f..%2fadmin",
    "/public/..%2fadmin",
    "/public/..%2Fadmin",
    "/public/..%5cadmin",
    "/public/..%5Cadmin",
    "/public\\..\\admin",
    "/public/..\\admin",
    "/public/;/../admin",
    "/public;/admin",
    "/public/..;/admin",
    "//public/../admin",
    "/public/%00/../../admin",
    "/public/%23/../../admin",
    "/public/%3f/../../admin",
    "/public/%3F/../../admin",
    "/./public/../admin",
    "/PUBLIC/x",
    "/Public/x",
    "/public/../../admin",
    "/public/../admin/",
    "/public/./../admin",
    "/public/x/../../admin",
    "/public/%2e%2e%2fadmin",
    "/public/..%00/admin",
    "/public/..%0d%0a/admin",
    "/%70ublic/../admin",
    "/public/\t/../admin",
    "/admin",
    // Dots and spaces that Windows trims to `..` (an app on IIS climbs out of /public/).
    "/public/..%20/admin",
    "/public/..%20%20/admin",
    "/public/.../admin",
    "/public/..../admin",
    "/public/%2e%2e%2e/admin",
    "/public/..%2e%20/admin",
];

/// Targets that stay under `/public/` when decoded once (as the gateway does): they may be
/// forwarded, but only as a path under `/public/`, never as `/admin`.
pub const PATH_STAYS_PUBLIC: &[&str] = &["/public/%252e%252e/admin", "/public/x/.."];

/// Targets under `/public/` whose escapes do not decode to UTF-8: overlong forms (`%c0%ae` is
/// an overlong `.`, which a lenient decoder resolves as a dot segment; `%c0%af` an overlong
/// `/`, IIS's old traversal), stray or truncated bytes, surrogates, code points past U+10FFFF.
/// Each gets `400` even on a route that needs no login, and never reaches the upstream.
pub const PATH_NOT_UTF8: &[&str] = &[
    "/public/%c0%ae%c0%ae/admin",
    "/public/%C0%AE%C0%AE/admin",
    "/public/%c0%ae./admin",
    "/public/..%c0%af../admin",
    "/public/%e0%80%ae%e0%80%ae/admin",
    "/public/%f0%80%80%ae%f0%80%80%ae/admin",
    "/public/%ff",
    "/public/%fe%ff",
    "/public/%80x",
    "/public/caf%c3",
    "/public/%e2%82",
    "/public/%c3x%a9",
    "/public/%ed%a0%80",
    "/public/%f4%90%80%80",
    "/public/%f8%88%80%80%80",
];

/// Targets under `/public/` with escaped look-alikes that Unicode compatibility normalisation
/// (NFKC, applied by some apps and frameworks) or Windows' best-fit mappings turn into `/`, `\`
/// or a segment of dots: fullwidth, small and leader dots, the ellipsis, fullwidth and small
/// solidi. Each gets `400` even on a route that needs no login, and never reaches the upstream.
pub const PATH_LOOK_ALIKES: &[&str] = &[
    "/public/%EF%BC%8E%EF%BC%8E/admin",
    "/public/%ef%bc%8e%ef%bc%8e/admin",
    "/public/.%EF%BC%8E/admin",
    "/public/%E2%80%A5/admin",
    "/public/%E2%80%A4%E2%80%A4/admin",
    "/public/%E2%80%A6/admin",
    "/public/%EF%B9%92%EF%B9%92/admin",
    "/public/%EF%BC%8E%EF%BC%8E%E3%80%80/admin",
    "/public/..%EF%BC%8Fadmin",
    "/public/%EF%BC%8F..%EF%BC%8Fadmin",
    "/public/..%EF%BC%BCadmin",
    "/public/..%EF%B9%A8admin",
];

/// Targets under `/public/` with escaped UTF-8: forwarded, as the canonical (upper-case)
/// escapes.
pub const PATH_ENCODED_UTF8: &[(&str, &str)] = &[
    ("/public/caf%C3%A9", "/public/caf%C3%A9"),
    // Look-alike dots in a name, not a segment of dots.
    ("/public/Wait%e2%80%a6", "/public/Wait%E2%80%A6"),
    ("/public/v%EF%BC%8E2/x", "/public/v%EF%BC%8E2/x"),
    ("/public/caf%c3%a9", "/public/caf%C3%A9"),
    ("/public/%e2%82%ac/x", "/public/%E2%82%AC/x"),
    ("/public/%F0%9F%A6%80", "/public/%F0%9F%A6%80"),
];

/// The answer to one hand-written request, read until the server closed the connection.
#[derive(Debug, Clone)]
pub struct RawResp {
    /// The status code of the first response line, if one arrived.
    pub status: Option<u16>,
    /// Everything received (head and body), lossily decoded.
    pub text: String,
    /// The server closed the connection (EOF or reset) within the deadline.
    pub closed: bool,
}

impl RawResp {
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.text.split("\r\n\r\n").next().unwrap_or("");
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

fn status_of(bytes: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(bytes.get(..bytes.len().min(64))?).ok()?;
    let line = text.split("\r\n").next()?;
    let mut parts = line.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// Sends `request` byte for byte to 127.0.0.1:`port` and reads until the server closes
/// the connection or `deadline` passes. Write errors are ignored (the server may answer
/// and close before reading everything).
pub async fn raw_exchange(port: u16, request: &[u8], deadline: Duration) -> RawResp {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"));
    let (mut rd, mut wr) = stream.split();
    let req = request.to_vec();
    let mut got = Vec::new();
    let mut closed = false;
    let read = async {
        let mut buf = [0u8; 16384];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    closed = true;
                    break;
                }
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let write = async {
        let _ = wr.write_all(&req).await;
        let _ = wr.flush().await;
        // Keep the write half open: half-closing would end keep-alive handling early.
        std::future::pending::<()>().await;
    };
    let _ = tokio::time::timeout(deadline, async {
        tokio::select! {
            _ = read => {},
            _ = write => {},
        }
    })
    .await;
    RawResp {
        status: status_of(&got),
        text: String::from_utf8_lossy(&got).into_owned(),
        closed,
    }
}

/// A `GET` for `target` with `Host` and `Connection: close`, plus `extra` header lines.
pub fn raw_get(target: &str, host: &str, extra: &[&str]) -> Vec<u8> {
    let mut s = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n");
    for h in extra {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str("Connection: close\r\n\r\n");
    s.into_bytes()
}
