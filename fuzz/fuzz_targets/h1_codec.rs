//! The HTTP/1 codec on arbitrary bytes: the request-head parser never panics, what it accepts
//! is consistent (one Host, one body framing), and neither it nor the chunked decoder gives a
//! different answer when the bytes arrive in two pieces rather than one.
#![no_main]
use bytes::BytesMut;
use http::{header, HeaderMap, StatusCode, Version};
use libfuzzer_sys::fuzz_target;
use portcullis::proxy::headers::has_token;
use portcullis::server::h1::codec::{
    encode_head, parse_head, BodyKind, ChunkError, ChunkedDecoder, Decoded, Framing, Head,
    HeadError,
};

const MAX_HEADERS: usize = 16;
const MAX_HEAD: usize = 4096;
const CHUNK_OVERHEAD: usize = 64;

fuzz_target!(|data: &[u8]| {
    let split = data
        .first()
        .map_or(0, |&b| usize::from(b) % (data.len() + 1));
    head(data, split);
    chunked(data, split);
});

/// What a parsed head says, in a form that can be compared.
#[derive(Debug, PartialEq)]
struct Summary {
    method: http::Method,
    uri: http::Uri,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
    upgrade: bool,
}

fn summary(h: &Head) -> Summary {
    Summary {
        method: h.request.method().clone(),
        uri: h.request.uri().clone(),
        version: h.request.version(),
        headers: h.request.headers().clone(),
        framing: h.framing,
        keep_alive: h.keep_alive,
        expect_continue: h.expect_continue,
        upgrade: h.upgrade,
    }
}

/// The parser's answer and what it left in the buffer.
type Parsed = (Result<Option<Summary>, HeadError>, BytesMut);

/// Feeds `pieces` one after the other, as a connection would: the parser is asked again
/// only while it needs more; the pieces it was not asked about are left in the buffer.
fn parse_pieces(pieces: &[&[u8]]) -> Parsed {
    let mut buf = BytesMut::new();
    let mut result = Ok(None);
    for piece in pieces {
        buf.extend_from_slice(piece);
        if matches!(result, Ok(None)) {
            result = parse_head(&mut buf, MAX_HEADERS, MAX_HEAD).map(|h| h.as_ref().map(summary));
        }
    }
    (result, buf)
}

fn head(data: &[u8], split: usize) {
    let mut buf = BytesMut::from(data);
    let result = parse_head(&mut buf, MAX_HEADERS, MAX_HEAD);
    match &result {
        Ok(None) => {
            assert_eq!(&buf[..], data, "more bytes needed, but some were taken");
            assert!(data.len() < MAX_HEAD, "an incomplete head past the limit");
        }
        Ok(Some(h)) => {
            let used = data.len() - buf.len();
            assert!(used > 0 && used <= MAX_HEAD, "{used} bytes used");
            assert_eq!(
                &buf[..],
                &data[used..],
                "what follows the head is kept as is"
            );
            assert_eq!(data[used - 1], b'\n', "a head ends with an empty line");
            check_head(h);
            check_response(h, data);
        }
        Err(_) => {}
    }

    // In two pieces: the same answer (the kind of refusal may differ: a head that grows past
    // the limit before its bad byte arrives is too large rather than invalid).
    let one = (result.map(|h| h.as_ref().map(summary)), buf);
    let two = parse_pieces(&[&data[..split], &data[split..]]);
    match (&one, &two) {
        ((Err(_), _), (Err(_), _)) => {}
        _ => assert_eq!(one, two, "split at {split}"),
    }
}

fn check_head(h: &Head) {
    let req = &h.request;
    let headers = req.headers();
    let http11 = req.version() == Version::HTTP_11;
    assert!(http11 || req.version() == Version::HTTP_10);

    let hosts = headers.get_all(header::HOST).iter().count();
    assert!(hosts <= 1, "{hosts} Host headers");
    assert!(!http11 || hosts == 1, "HTTP/1.1 without Host");

    let te = headers.get_all(header::TRANSFER_ENCODING).iter().count();
    let lengths: Vec<_> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    match h.framing {
        Framing::None => assert!(te == 0 && lengths.is_empty(), "unframed, yet {headers:?}"),
        Framing::Length(n) => {
            assert_eq!(te, 0, "Content-Length framing with Transfer-Encoding");
            assert_eq!(
                lengths.len(),
                1,
                "Content-Length forwarded {} times",
                lengths.len()
            );
            let text = lengths[0].to_str().ok();
            assert!(text.is_some_and(|t| t.bytes().all(|b| b.is_ascii_digit())));
            assert_eq!(text.and_then(|t| t.parse::<u64>().ok()), Some(n));
        }
        Framing::Chunked => {
            assert!(http11, "chunked in HTTP/1.0");
            assert!(te > 0, "chunked without Transfer-Encoding");
            assert!(
                lengths.is_empty(),
                "chunked and Content-Length both forwarded"
            );
        }
    }
    if te > 0 {
        assert_eq!(
            h.framing,
            Framing::Chunked,
            "Transfer-Encoding not ending in chunked"
        );
    }

    let connection: Vec<_> = headers.get_all(header::CONNECTION).iter().collect();
    if connection.iter().any(|v| has_token(v, "close")) {
        assert!(!h.keep_alive, "keep-alive despite Connection: close");
    }
    if !http11 && h.keep_alive {
        assert!(connection.iter().any(|v| has_token(v, "keep-alive")));
    }
    if h.upgrade {
        assert!(http11 && headers.contains_key(header::UPGRADE));
        assert!(connection.iter().any(|v| has_token(v, "upgrade")));
    }
    let expect = headers.get_all(header::EXPECT).iter().last();
    let continue_expected =
        expect.is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    assert_eq!(h.expect_continue, continue_expected);
}

/// A response carrying the request's headers: framed by the gateway alone, and parseable.
fn check_response(h: &Head, data: &[u8]) {
    const STATUSES: [u16; 8] = [200, 101, 204, 304, 404, 100, 502, 201];
    let flags = data.get(1).copied().unwrap_or(0);
    let status = StatusCode::from_u16(STATUSES[usize::from(flags & 7)]).unwrap();
    let head_request = flags & 8 != 0;
    let http11 = flags & 16 != 0;
    let length = (flags & 32 != 0).then_some(u64::from(flags));
    let asked_keep_alive = flags & 64 != 0;
    let mut keep_alive = asked_keep_alive;
    let mut out = BytesMut::new();
    let kind = encode_head(
        &mut out,
        status,
        h.request.headers(),
        head_request,
        http11,
        length,
        &mut keep_alive,
    );
    // Connection is the gateway's: a `close` in the headers ends keep-alive, nothing else does.
    let listed_close = h
        .request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| has_token(v, "close"));
    assert_eq!(keep_alive, asked_keep_alive && !listed_close);
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS + 4];
    let mut res = httparse::Response::new(&mut slots);
    let parsed = res.parse(&out);
    assert!(
        matches!(parsed, Ok(httparse::Status::Complete(n)) if n == out.len()),
        "{parsed:?}: {:?}",
        String::from_utf8_lossy(&out)
    );
    let count = |name: &str| {
        res.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count()
    };
    assert_eq!(
        count("transfer-encoding"),
        usize::from(kind == BodyKind::Chunked)
    );
    assert!(count("content-length") <= 1);
    assert!(
        count("connection") <= 1,
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    if let BodyKind::Length(n) = kind {
        let cl = res.headers.iter().find(|h| h.name == "content-length");
        assert_eq!(cl.map(|h| h.value), Some(n.to_string().as_bytes()));
    }
}

/// The decoder's answer: the data, how it stopped, and (at the end) what was left over.
#[derive(Debug, PartialEq)]
enum Stop {
    Need,
    End(Vec<u8>),
    Failed(ChunkError),
}

fn decode_pieces(pieces: &[&[u8]]) -> (Vec<u8>, Stop) {
    let mut decoder = ChunkedDecoder::new(CHUNK_OVERHEAD);
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(d)) => {
                    assert!(!d.is_empty(), "empty data");
                    body.extend_from_slice(&d);
                }
                Ok(Decoded::Need) => {
                    assert!(
                        buf.is_empty(),
                        "more input asked for with {} left",
                        buf.len()
                    );
                    break;
                }
                Ok(Decoded::End) => {
                    let mut rest = buf.to_vec();
                    pieces[i + 1..]
                        .iter()
                        .for_each(|p| rest.extend_from_slice(p));
                    return (body, Stop::End(rest));
                }
                Err(e) => return (body, Stop::Failed(e)),
            }
        }
    }
    (body, Stop::Need)
}

fn chunked(data: &[u8], split: usize) {
    let one = decode_pieces(&[data]);
    let two = decode_pieces(&[&data[..split], &data[split..]]);
    assert_eq!(one, two, "split at {split}");
}
