//! HTTP/1.1 wire format for the client side: request heads in, response heads out, chunked
//! request bodies decoded. The framing rules are RFC 9112's, applied as hyper applies them,
//! so that what the gateway reads as one request is what the upstream reads as one request.

use crate::policy::routes::{valid_host, valid_host_bytes};
use crate::proxy::headers::{has_token, tokens};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use std::mem::MaybeUninit;

/// Headers the gateway typically adds to a request on its way upstream.
const ADDED_HEADERS: usize = 12;

/// Longest request target accepted (as hyper).
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;
/// Header slots on the stack; more (a raised `limits.max_headers`) go on the heap.
const STACK_HEADERS: usize = 128;

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head and what it says about the connection.
#[derive(Debug)]
pub struct Head {
    pub request: Request<()>,
    pub framing: Framing,
    pub keep_alive: bool,
    pub expect_continue: bool,
    pub upgrade: bool,
}

/// Why a request head was refused; the status answered before closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    TooLarge,
    UriTooLong,
    Invalid,
    /// A transfer coding besides one `chunked` (RFC 9112 §6.1: the gateway cannot decode it).
    UnknownCoding,
}

impl HeadError {
    pub fn status(self) -> StatusCode {
        match self {
            HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::UriTooLong => StatusCode::URI_TOO_LONG,
            HeadError::Invalid => StatusCode::BAD_REQUEST,
            HeadError::UnknownCoding => StatusCode::NOT_IMPLEMENTED,
        }
    }
}

type Range = (usize, usize);

/// Why a head over `max_head` bytes is refused: `414 URI Too Long` when the request target
/// is what does not fit (it reaches past the limit, or is longer than any target accepted),
/// else `431` (the header fields do). `bytes`: the head so far, request line first.
fn oversized(bytes: &[u8], max_head: usize) -> HeadError {
    // Empty lines before the request line are skipped, as httparse does (RFC 9112 §2.2).
    let start = bytes
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(bytes.len());
    let line = &bytes[start..];
    let line = &line[..memchr::memchr(b'\n', line).unwrap_or(line.len())];
    // method SP request-target SP version: the target is what follows the first space.
    let Some(space) = memchr::memchr(b' ', line) else {
        return HeadError::TooLarge;
    };
    let target = &line[space + 1..];
    let target_len = memchr::memchr(b' ', target).unwrap_or(target.len());
    let target_end = start + space + 1 + target_len;
    if target_len > MAX_URI_LEN || target_end >= max_head {
        HeadError::UriTooLong
    } else {
        HeadError::TooLarge
    }
}

fn range_in(base: &[u8], part: &[u8]) -> Range {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    (start, start + part.len())
}

/// Parses a request head from the front of `buf`, taking it out of `buf` when complete.
/// `Ok(None)`: more bytes needed.
pub fn parse_head(
    buf: &mut BytesMut,
    max_headers: usize,
    max_head: usize,
) -> Result<Option<Head>, HeadError> {
    let mut stack = [MaybeUninit::<httparse::Header<'_>>::uninit(); STACK_HEADERS];
    let mut heap = Vec::new();
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if max_headers <= STACK_HEADERS {
        &mut stack[..max_headers]
    } else {
        heap.resize(max_headers, MaybeUninit::uninit());
        &mut heap
    };
    // Uninitialised, not zeroed: 4 KiB of memset per request otherwise.
    let mut ranges = [MaybeUninit::<(Range, Range)>::uninit(); STACK_HEADERS];
    let mut more_ranges = Vec::new();
    let (len, method, path, minor, count) = {
        let bytes: &[u8] = buf;
        let mut req = httparse::Request::new(&mut []);
        match httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut req, bytes, slots)
        {
            Ok(httparse::Status::Complete(len)) => {
                if len > max_head {
                    return Err(oversized(bytes, max_head));
                }
                let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version)
                else {
                    return Err(HeadError::Invalid);
                };
                if path.len() > MAX_URI_LEN {
                    return Err(HeadError::UriTooLong);
                }
                for (i, h) in req.headers.iter().enumerate() {
                    let r = (range_in(bytes, h.name.as_bytes()), range_in(bytes, h.value));
                    match ranges.get_mut(i) {
                        Some(slot) => {
                            slot.write(r);
                        }
                        None => more_ranges.push(r),
                    }
                }
                (
                    len,
                    range_in(bytes, method.as_bytes()),
                    range_in(bytes, path.as_bytes()),
                    minor,
                    req.headers.len(),
                )
            }
            Ok(httparse::Status::Partial) if buf.len() >= max_head => {
                return Err(oversized(bytes, max_head))
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Invalid),
        }
    };
    let head = buf.split_to(len).freeze();
    let method = Method::from_bytes(&head[method.0..method.1]).map_err(|_| HeadError::Invalid)?;
    let uri = Uri::from_maybe_shared(head.slice(path.0..path.1)).map_err(|_| HeadError::Invalid)?;
    if uri.authority().is_some_and(|a| !valid_host(a.as_str())) {
        return Err(HeadError::Invalid);
    }
    let http11 = minor == 1;
    // Room for what the gateway adds before forwarding (request id, bearer, identity and
    // forwarding headers): growing the map rehashes every header.
    let mut headers = super::io::take_map(count + ADDED_HEADERS);
    let mut framing = Framing::None;
    let mut keep_alive = http11;
    let mut saw_close = false;
    let mut expect_continue = false;
    let mut has_upgrade = false;
    let mut te = false;
    // `chunked` codings seen, whether any other coding was, and whether `chunked` came last.
    let (mut chunked, mut other_coding, mut chunked_last) = (0u32, false, false);
    let mut cl = false;
    let mut hosts = 0usize;
    // SAFETY: the first min(count, STACK_HEADERS) slots were written above.
    let written = unsafe {
        std::slice::from_raw_parts(
            ranges.as_ptr().cast::<(Range, Range)>(),
            count.min(STACK_HEADERS),
        )
    };
    for &(name, value) in written.iter().chain(more_ranges.iter()) {
        let name = HeaderName::from_bytes(&head[name.0..name.1]).map_err(|_| HeadError::Invalid)?;
        // SAFETY: httparse accepted these bytes as a header value: tab, 0x20..=0x7E and
        // 0x80..=0xFF only, exactly what HeaderValue allows (as hyper relies on too).
        let value =
            unsafe { HeaderValue::from_maybe_shared_unchecked(head.slice(value.0..value.1)) };
        match name {
            header::TRANSFER_ENCODING => {
                if !http11 {
                    return Err(HeadError::Invalid);
                }
                // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3), which is dropped
                // so nothing downstream can read it the other way; the connection then closes.
                te = true;
                if cl {
                    headers.remove(header::CONTENT_LENGTH);
                }
                for coding in tokens(&value).filter(|t| !t.is_empty()) {
                    chunked_last = coding.eq_ignore_ascii_case(b"chunked");
                    if chunked_last {
                        chunked += 1;
                    } else {
                        other_coding = true;
                    }
                }
                framing = Framing::Chunked;
            }
            header::CONTENT_LENGTH => {
                cl = true;
                if te {
                    continue;
                }
                let len = parse_content_length(value.as_bytes()).ok_or(HeadError::Invalid)?;
                match framing {
                    Framing::Length(prev) if prev != len => return Err(HeadError::Invalid),
                    Framing::Length(_) => continue,
                    _ => framing = Framing::Length(len),
                }
            }
            header::CONNECTION => {
                if saw_close || has_token(&value, "close") {
                    saw_close = true;
                    keep_alive = false;
                } else if !http11 {
                    keep_alive = has_token(&value, "keep-alive");
                }
            }
            // HTTP/1.0 has no 1xx responses: its expectation is ignored (RFC 9110 §10.1.1).
            header::EXPECT if !http11 => continue,
            header::EXPECT => {
                expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
            }
            header::UPGRADE => has_upgrade = http11,
            // A host the route matcher and a name-based upstream would read differently.
            header::HOST => {
                hosts += 1;
                if !valid_host_bytes(value.as_bytes()) {
                    return Err(HeadError::Invalid);
                }
            }
            _ => {}
        }
        headers.append(name, value);
    }
    // Only `chunked`, once (RFC 9112 §6.1, §6.3, §7): without it last the body's length is
    // unknown (400); a body coded otherwise as well would reach the upstream undecoded and
    // unannounced (501), and lists such as `identity, chunked` are read differently by other
    // servers (nginx refuses them too).
    if te && (!chunked_last || chunked != 1) {
        return Err(HeadError::Invalid);
    }
    if other_coding {
        return Err(HeadError::UnknownCoding);
    }
    // RFC 9112 §3.2: exactly one Host in HTTP/1.1, so that the gateway and the upstream
    // cannot disagree on which site a request is for.
    if hosts > 1 || (http11 && hosts == 0) {
        return Err(HeadError::Invalid);
    }
    // An absolute-form target names the site too (RFC 9112 §3.2.2: it wins over Host): the
    // two must agree, or routes matched on one would guard requests the upstream reads for
    // the other (as over HTTP/2, where `:authority` and Host must agree).
    // A CONNECT's target is an authority alone (`host:port`): it names no resource, and the
    // router answers it `405`.
    let tunnel = method == http::Method::CONNECT && uri.scheme().is_none();
    if let Some(authority) = uri.authority().filter(|_| !tunnel) {
        // Only http(s) URLs name a resource here (nginx refuses others too).
        let scheme = uri.scheme_str().unwrap_or_default();
        if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
            return Err(HeadError::Invalid);
        }
        let host = headers.get(header::HOST).map(HeaderValue::as_bytes);
        if host.is_some_and(|h| !h.eq_ignore_ascii_case(authority.as_str().as_bytes())) {
            return Err(HeadError::Invalid);
        }
    }
    if te && cl {
        keep_alive = false;
    }
    // A request with a body is not switched: the protocol changes once the request is
    // complete (RFC 9110 §7.8), and bytes of the body must not go into the tunnel.
    let upgrade = has_upgrade
        && matches!(framing, Framing::None | Framing::Length(0))
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, "upgrade"));
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = if http11 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    *request.headers_mut() = headers;
    Ok(Some(Head {
        request,
        framing,
        keep_alive,
        expect_continue,
        upgrade,
    }))
}

/// Digits only: no sign, no spaces, no overflow.
fn parse_content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// What a response head says about its body on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// Nothing follows the head (HEAD, 1xx, 204, 304, or an empty body).
    Nothing,
    Length(u64),
    Chunked,
    /// HTTP/1.0 client and unknown length: the body ends when the connection does.
    UntilClose,
}

/// Writes a response head. `length`: the body's exact length if known. The body framing
/// headers are the gateway's: any the response carries are replaced. `keep_alive`: whether
/// the connection may stay open; set to false if the response's `Connection` lists `close`
/// (read here, in the pass that writes the headers, not with a lookup of its own).
pub fn encode_head(
    out: &mut BytesMut,
    status: StatusCode,
    headers: &HeaderMap,
    head_request: bool,
    http11: bool,
    length: Option<u64>,
    keep_alive: &mut bool,
) -> BodyKind {
    let code = status.as_u16();
    let no_body = (100..200).contains(&code) || code == 204 || code == 304;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| parse_content_length(v.as_bytes()));
    let kind = if no_body {
        BodyKind::Nothing
    } else if head_request {
        // The length a GET would have had, if known, is kept; nothing is sent.
        BodyKind::Nothing
    } else {
        match (declared, length) {
            (Some(n), _) => BodyKind::Length(n),
            (None, Some(n)) => BodyKind::Length(n),
            (None, None) if http11 => BodyKind::Chunked,
            (None, None) => BodyKind::UntilClose,
        }
    };
    if status == StatusCode::OK {
        // Most answers: the status line in one piece.
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.extend_from_slice(b" ");
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut has_date = false;
    for (name, value) in headers {
        match *name {
            header::TRANSFER_ENCODING => continue,
            header::CONNECTION => {
                if has_token(value, "close") {
                    *keep_alive = false;
                }
                continue;
            }
            header::CONTENT_LENGTH if no_body && code != 304 => continue,
            header::CONTENT_LENGTH if !head_request => continue,
            header::DATE => has_date = true,
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match kind {
        BodyKind::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            let mut digits = itoa_buf();
            out.extend_from_slice(itoa(n, &mut digits));
            out.extend_from_slice(b"\r\n");
        }
        BodyKind::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        date::append(out);
        out.extend_from_slice(b"\r\n");
    }
    if code == 101 {
        out.extend_from_slice(b"connection: upgrade\r\n");
    } else if !*keep_alive || kind == BodyKind::UntilClose {
        out.extend_from_slice(b"connection: close\r\n");
    } else if !http11 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    kind
}

fn itoa_buf() -> [u8; 20] {
    [0; 20]
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// The size line of one chunk (`<hex>\r\n`).
pub fn chunk_size_line(len: usize, buf: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = 16;
    let mut n = len;
    loop {
        i -= 1;
        buf[i] = HEX[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf[16] = b'\r';
    buf[17] = b'\n';
    &buf[i..]
}

/// The `Date` header value, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
    }

    pub fn append(out: &mut bytes::BytesMut) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                let text = httpdate::fmt_http_date(now);
                if text.len() == 29 {
                    c.1.copy_from_slice(text.as_bytes());
                    c.0 = secs;
                } else {
                    out.extend_from_slice(text.as_bytes());
                    return;
                }
            }
            out.extend_from_slice(&c.1);
        })
    }
}

/// Why a chunked body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    Invalid,
    TooLong,
}

/// Decodes a chunked body incrementally (strict CRLFs; extensions and trailers skipped,
/// within `limit` bytes together).
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    size: u64,
    digits: u8,
    overhead: usize,
    limit: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    /// Blanks after the size: only more of them, an extension or the line's end may follow
    /// (RFC 9112 §7.1.1; `5 x` is no size line, as hyper and nginx agree).
    SizeWs,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

pub enum Decoded {
    Data(Bytes),
    /// More input needed.
    Need,
    End,
}

impl ChunkedDecoder {
    pub fn new(limit: usize) -> Self {
        Self {
            state: ChunkState::Size,
            size: 0,
            digits: 0,
            overhead: 0,
            limit,
        }
    }

    /// Takes what it can from `buf`: the next piece of data, or the end.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkError> {
        use ChunkState::*;
        loop {
            if self.state == Done {
                return Ok(Decoded::End);
            }
            if self.state == Data {
                if buf.is_empty() {
                    return Ok(Decoded::Need);
                }
                let n = (self.size.min(buf.len() as u64)) as usize;
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = DataCr;
                }
                return Ok(Decoded::Data(buf.split_to(n).freeze()));
            }
            let Some(&b) = buf.first() else {
                return Ok(Decoded::Need);
            };
            buf.advance(1);
            self.overhead += 1;
            if self.overhead > self.limit {
                return Err(ChunkError::TooLong);
            }
            self.state = match (self.state, b) {
                (Size, b) if b.is_ascii_hexdigit() => {
                    self.digits += 1;
                    if self.digits > 16 {
                        return Err(ChunkError::Invalid);
                    }
                    let d = (b as char).to_digit(16).unwrap_or(0);
                    self.size = (self.size << 4) | u64::from(d);
                    Size
                }
                (Size, b';') if self.digits > 0 => Extension,
                (Size, b' ' | b'\t') if self.digits > 0 => SizeWs,
                (Size, b'\r') if self.digits > 0 => SizeLf,
                (SizeWs, b' ' | b'\t') => SizeWs,
                (SizeWs, b';') => Extension,
                (SizeWs, b'\r') => SizeLf,
                (Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err(ChunkError::Invalid),
                (Extension, _) => Extension,
                (SizeLf, b'\n') => {
                    self.digits = 0;
                    if self.size == 0 {
                        TrailerStart
                    } else {
                        Data
                    }
                }
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => {
                    self.overhead = 0;
                    Size
                }
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart, _) | (Trailer, _) if b != b'\r' && b != b'\n' => Trailer,
                (Trailer, b'\r') => TrailerLf,
                (TrailerLf, b'\n') => TrailerStart,
                (EndLf, b'\n') => Done,
                _ => return Err(ChunkError::Invalid),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `text`, with a Host header added after the request line if it has none.
    fn parse(text: &str) -> Result<Option<Head>, HeadError> {
        let text = match text.split_once("\r\n") {
            Some((line, rest)) if !text.contains("Host:") => format!("{line}\r\nHost: a\r\n{rest}"),
            _ => text.to_string(),
        };
        parse_head(&mut BytesMut::from(text.as_str()), 100, 65536)
    }

    #[test]
    fn one_host_in_http11() {
        let parse_raw = |t: &str| parse_head(&mut BytesMut::from(t), 100, 65536);
        assert!(matches!(
            parse_raw("GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Some(_))
        ));
        assert!(matches!(parse_raw("GET / HTTP/1.0\r\n\r\n"), Ok(Some(_))));
        for bad in [
            "GET / HTTP/1.1\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
            // Host names, in the header or an absolute-form target, must be host names.
            "GET / HTTP/1.1\r\nHost: a..b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x/y\r\n\r\n",
            "GET http://a..b/ HTTP/1.0\r\n\r\n",
            // An absolute-form target and Host that name different sites.
            "GET http://evil.test/x HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http://a:8080/x HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http://a/x HTTP/1.0\r\nHost: a:8080\r\n\r\n",
            // Absolute-form targets other than http(s) URLs.
            "GET ftp://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET gopher://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET httpx://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(parse_raw(bad).err(), Some(HeadError::Invalid), "{bad:?}");
        }
        for good in [
            "GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http://A.test:8080/x HTTP/1.1\r\nHost: a.TEST:8080\r\n\r\n",
            "GET http://example.com:8080/x?y HTTP/1.0\r\n\r\n",
            "GET HTTPS://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
        ] {
            assert!(matches!(parse_raw(good), Ok(Some(_))), "{good:?}");
        }
    }

    fn head(text: &str) -> Head {
        match parse(text) {
            Ok(Some(h)) => h,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let h = head("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(h.framing, Framing::None);
        assert!(h.keep_alive);
        let h = head("POST / HTTP/1.1\r\nContent-Length: 200000\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(200_000));
        assert!(h.keep_alive, "a body of known length keeps the connection");
        // Up to 19 digits (anything shorter fits in 64 bits), leading zeros included.
        assert_eq!(
            parse_content_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        assert_eq!(parse_content_length(b"0000000000000000042"), Some(42));
        for bad in [
            &b"10000000000000000000"[..],
            b"",
            b"+5",
            b"-5",
            b" 5",
            b"5 ",
            b"0x5",
            b"5,5",
        ] {
            assert_eq!(
                parse_content_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let h = head("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(5));
        assert_eq!(
            h.request.headers().get_all("content-length").iter().count(),
            1
        );
        for chunked in ["Chunked", " chunked ", "chunked,", ", chunked"] {
            let h = head(&format!(
                "POST / HTTP/1.1\r\nTransfer-Encoding: {chunked}\r\n\r\n"
            ));
            assert_eq!(h.framing, Framing::Chunked, "{chunked:?}");
        }
        // Codings the gateway cannot decode, before the final `chunked` (RFC 9112 §6.1: 501).
        for coded in [
            "Transfer-Encoding: gzip, Chunked",
            "Transfer-Encoding: identity, chunked",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
        ] {
            let text = format!("POST / HTTP/1.1\r\n{coded}\r\n\r\n");
            assert!(
                matches!(parse(&text), Err(HeadError::UnknownCoding)),
                "{coded:?}"
            );
        }
        // Both: Transfer-Encoding wins, Content-Length is dropped, the connection closes.
        for text in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        ] {
            let h = head(text);
            assert_eq!(h.framing, Framing::Chunked);
            assert!(!h.keep_alive);
            assert!(h.request.headers().get("content-length").is_none());
        }
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            // Chunked twice (RFC 9112 §6.1 forbids it), or no coding at all.
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: \r\n\r\n",
            // Not `chunked` last: the length is unknown (RFC 9112 §6.3: 400).
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "G\x01T / HTTP/1.1\r\n\r\n",
        ] {
            assert!(matches!(parse(bad), Err(HeadError::Invalid)), "{bad:?}");
        }
    }

    #[test]
    fn connection_semantics() {
        assert!(!head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(
            !head("GET / HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n")
                .keep_alive
        );
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.1\r\nExpect: 100-Continue\r\n\r\n").expect_continue);
        // HTTP/1.0 knows no 1xx: the expectation is ignored, and not passed on.
        let h = head("POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
        assert!(!h.expect_continue);
        assert!(h.request.headers().get("expect").is_none());
        assert!(
            head("GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n")
                .upgrade
        );
        assert!(!head("GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n").upgrade);
        for body in ["Content-Length: 5", "Transfer-Encoding: chunked"] {
            let text = format!(
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{body}\r\n\r\n"
            );
            assert!(!head(&text).upgrade, "{body}");
        }
        assert!(
            !head("GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n").upgrade
        );
    }

    #[test]
    fn heads_are_bounded() {
        assert!(matches!(parse("GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None)));
        let long = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(70_000));
        assert_eq!(parse(&long).err(), Some(HeadError::TooLarge));
        let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")).err(),
            Some(HeadError::TooLarge)
        );
        // A request target that does not fit: 414, whole or still arriving, however much of
        // it has come; long header fields after a target that fits: 431.
        let long_uri = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "u".repeat(100_000));
        for cut in [70_000, 100_000, long_uri.len()] {
            let mut buf = BytesMut::from(&long_uri.as_bytes()[..cut]);
            assert_eq!(
                parse_head(&mut buf, 100, 65536).err(),
                Some(HeadError::UriTooLong),
                "{cut} bytes"
            );
        }
        let mut buf = BytesMut::from(&long_uri.as_bytes()[..70_000]);
        assert_eq!(
            parse_head(&mut buf, 100, 1 << 20).err(),
            None,
            "under a raised limit: more needed"
        );
        let mut buf = BytesMut::from(long_uri.as_str());
        assert_eq!(
            parse_head(&mut buf, 100, 1 << 20).err(),
            Some(HeadError::UriTooLong)
        );
        let near = format!("\r\nGET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "u".repeat(5000));
        assert_eq!(
            parse_head(&mut BytesMut::from(near.as_str()), 100, 4096).err(),
            Some(HeadError::UriTooLong)
        );
        let fits = format!(
            "GET /{} HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "u".repeat(3000),
            "h".repeat(2000)
        );
        assert_eq!(
            parse_head(&mut BytesMut::from(fits.as_str()), 100, 4096).err(),
            Some(HeadError::TooLarge)
        );
        // The limits are sizes a head may reach: a head of exactly `max_head` bytes, and a
        // target of exactly MAX_URI_LEN, pass; a byte more does not.
        let exact = |len: usize| {
            let fill = len - "GET / HTTP/1.1\r\nHost: a\r\nX: \r\n\r\n".len();
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
                "h".repeat(fill)
            )
        };
        let at =
            |text: String, max_head| parse_head(&mut BytesMut::from(text.as_str()), 100, max_head);
        assert!(matches!(at(exact(4096), 4096), Ok(Some(_))));
        assert_eq!(at(exact(4097), 4096).err(), Some(HeadError::TooLarge));
        let target =
            |len: usize| format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "u".repeat(len - 1));
        assert!(matches!(at(target(MAX_URI_LEN), 1 << 20), Ok(Some(_))));
        assert_eq!(
            at(target(MAX_URI_LEN + 1), 1 << 20).err(),
            Some(HeadError::UriTooLong)
        );
        let no_space = "G".repeat(70_000);
        assert_eq!(
            parse_head(&mut BytesMut::from(no_space.as_str()), 100, 65536).err(),
            Some(HeadError::TooLarge)
        );
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: b\r\n\r\nGET /next"[..]);
        assert!(matches!(parse_head(&mut buf, 200, 65536), Ok(Some(_))));
        assert_eq!(&buf[..], b"GET /next");
    }

    fn decode_all(input: &[u8]) -> Result<Vec<u8>, ChunkError> {
        let mut d = ChunkedDecoder::new(1024);
        let mut out = Vec::new();
        // Byte by byte: every state must survive a split anywhere.
        let mut buf = BytesMut::new();
        for &b in input {
            buf.extend_from_slice(&[b]);
            loop {
                match d.decode(&mut buf)? {
                    Decoded::Data(d) => out.extend_from_slice(&d),
                    Decoded::Need => break,
                    Decoded::End => return Ok(out),
                }
            }
        }
        Err(ChunkError::Invalid)
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(
            decode_all(b"3\r\nabc\r\nA;ext=1\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n"),
            Ok(b"abc0123456789".to_vec())
        );
        // Blanks after the size, before an extension or the line's end.
        assert_eq!(
            decode_all(b"3 \t ;x\r\nabc\r\n2 \r\nde\r\n0\r\n\r\n"),
            Ok(b"abcde".to_vec())
        );
        assert_eq!(decode_all(b"0\r\n\r\n"), Ok(Vec::new()));
        for bad in [
            &b"3\nabc\r\n0\r\n\r\n"[..],
            b"3\r\nabcd\r\n0\r\n\r\n",
            b"\r\n",
            b"x\r\n",
            b"-1\r\n",
            b"11111111111111111\r\n",
            b"0\r\n\n",
            // Size lines another parser could read otherwise (smuggling): a bare LF inside an
            // extension, no digits before an extension or whitespace, an empty size line.
            b"1;a\nb\r\nx\r\n0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            // Text after the size that is no extension.
            b"5 garbage\r\nhello\r\n0\r\n\r\n",
            b"5 6\r\nhello\r\n0\r\n\r\n",
            b";5\r\nhello\r\n0\r\n\r\n",
            b"\r\n\r\n",
        ] {
            assert!(
                decode_all(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let ext = format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(2000));
        assert_eq!(decode_all(ext.as_bytes()), Err(ChunkError::TooLong));
        // Sizes of up to 16 hex digits, leading zeros included.
        assert_eq!(
            decode_all(b"0000000000000001\r\na\r\n0\r\n\r\n"),
            Ok(b"a".to_vec())
        );
        // The overhead limit is a size the framing may reach.
        let mut d = ChunkedDecoder::new(5);
        let mut last = BytesMut::from(&b"0\r\n\r\n"[..]);
        assert!(matches!(d.decode(&mut last), Ok(Decoded::End)));
    }

    proptest::proptest! {
        /// Any body, cut into any chunks, delivered in any pieces, decodes to itself.
        #[test]
        fn chunked_round_trip(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            chunk in 1usize..700,
            piece in 1usize..300,
        ) {
            let mut wire = Vec::new();
            for c in body.chunks(chunk) {
                wire.extend_from_slice(format!("{:X}\r\n", c.len()).as_bytes());
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let mut d = ChunkedDecoder::new(1024);
            let (mut out, mut buf, mut ended) = (Vec::new(), BytesMut::new(), false);
            for p in wire.chunks(piece) {
                buf.extend_from_slice(p);
                loop {
                    match d.decode(&mut buf) {
                        Ok(Decoded::Data(d)) => out.extend_from_slice(&d),
                        Ok(Decoded::Need) => break,
                        Ok(Decoded::End) => { ended = true; break }
                        Err(e) => proptest::prop_assert!(false, "{e:?}"),
                    }
                }
            }
            proptest::prop_assert!(ended);
            proptest::prop_assert_eq!(out, body);
        }

        /// Arbitrary bytes after a request line: an answer either way, never a panic, and a
        /// parsed head never claims more bytes than it was given.
        #[test]
        fn heads_never_panic(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let mut bytes = b"POST /x HTTP/1.1\r\n".to_vec();
            bytes.extend_from_slice(&tail);
            let mut buf = BytesMut::from(&bytes[..]);
            if let Ok(Some(_)) = parse_head(&mut buf, 100, 65536) {
                proptest::prop_assert!(buf.len() < bytes.len());
            }
        }
    }

    #[test]
    fn response_heads() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("content-length", HeaderValue::from_static("5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("date", HeaderValue::from_static("then"));
        let mut out = BytesMut::new();
        let kind = encode_head(&mut out, StatusCode::OK, &h, false, true, None, &mut true);
        assert_eq!(kind, BodyKind::Length(5));
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 200 OK\r\nx-a: 1\r\ndate: then\r\ncontent-length: 5\r\n\r\n"
        );
        let mut out = BytesMut::new();
        let kind = encode_head(
            &mut out,
            StatusCode::OK,
            &HeaderMap::new(),
            false,
            false,
            None,
            &mut true,
        );
        assert_eq!(kind, BodyKind::UntilClose);
        assert!(String::from_utf8_lossy(&out).ends_with("connection: close\r\n\r\n"));
        let mut out = BytesMut::new();
        let kind = encode_head(
            &mut out,
            StatusCode::NO_CONTENT,
            &h,
            false,
            true,
            Some(3),
            &mut false,
        );
        assert_eq!(kind, BodyKind::Nothing);
        let text = String::from_utf8_lossy(&out);
        assert!(
            !text.contains("content-length") && text.contains("connection: close"),
            "{text}"
        );
        // A HEAD answered 204 says no length either (RFC 9110 §8.6); answered 200 or 304, it
        // keeps the length a GET would have had.
        for (status, head, kept) in [
            (StatusCode::NO_CONTENT, true, false),
            (StatusCode::OK, true, true),
            (StatusCode::NOT_MODIFIED, true, true),
        ] {
            let mut out = BytesMut::new();
            let kind = encode_head(&mut out, status, &h, head, true, None, &mut true);
            assert_eq!(kind, BodyKind::Nothing);
            let text = String::from_utf8_lossy(&out);
            assert_eq!(
                text.contains("content-length: 5"),
                kept,
                "{status}, HEAD {head}: {text}"
            );
        }
        // A response whose Connection lists close ends the connection (and is not written
        // as such: the gateway's own line says so); other Connection values change nothing.
        for (value, stays) in [
            ("close", false),
            ("Keep-Alive, CLOSE", false),
            ("x-a", true),
        ] {
            let mut h = HeaderMap::new();
            h.insert("connection", HeaderValue::from_static(value));
            let (mut out, mut keep_alive) = (BytesMut::new(), true);
            encode_head(
                &mut out,
                StatusCode::OK,
                &h,
                false,
                true,
                Some(0),
                &mut keep_alive,
            );
            let text = String::from_utf8_lossy(&out);
            assert_eq!(keep_alive, stays, "{value}");
            assert_eq!(text.contains("connection: close\r\n"), !stays, "{text}");
            assert_eq!(
                text.matches("connection:").count(),
                usize::from(!stays),
                "{text}"
            );
        }
        let mut buf = [0; 18];
        assert_eq!(chunk_size_line(0x1a2b, &mut buf), b"1a2b\r\n");
        let mut digits = itoa_buf();
        assert_eq!(itoa(1234567890, &mut digits), b"1234567890");
    }
}
