//! One body type for everything the gateway sends or receives: a streamed body (HTTP/2
//! client, HTTP/1 client, upstream), a buffer it wrote itself, or nothing. An enum, not a
//! box: no allocation per request.

use crate::server::h1::io::ClientBodyError;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

#[derive(Debug, Default)]
pub enum Body {
    #[default]
    Empty,
    Full(Option<Bytes>),
    Streamed(Incoming),
    /// An upstream response (its connection returns to the pool at the end).
    Upstream(crate::proxy::pool::UpstreamBody),
    /// An HTTP/1 client's request body.
    Client(crate::server::h1::io::RequestBody),
    /// A request body on its way to the upstream, watched by its connection (boxed: only
    /// requests with a body pay for it).
    Upload(Box<crate::proxy::pool::Upload>),
}

/// A body that stopped short.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Client(#[from] ClientBodyError),
    /// The upstream sent nothing of its response body for the response timeout.
    #[error("the upstream sent no more of its response in time")]
    UpstreamStalled,
}

impl Body {
    pub fn full(data: impl Into<Bytes>) -> Self {
        Body::Full(Some(data.into()))
    }
}

impl From<crate::proxy::pool::UpstreamBody> for Body {
    fn from(b: crate::proxy::pool::UpstreamBody) -> Self {
        Body::Upstream(b)
    }
}

impl From<Incoming> for Body {
    fn from(b: Incoming) -> Self {
        Body::Streamed(b)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::Streamed(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            Body::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            Body::Client(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            Body::Upload(b) => Pin::new(&mut **b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(d) => d.is_none(),
            Body::Streamed(b) => b.is_end_stream(),
            Body::Upstream(b) => b.is_end_stream(),
            Body::Client(b) => b.is_end_stream(),
            Body::Upload(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(d) => SizeHint::with_exact(d.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Streamed(b) => b.size_hint(),
            Body::Upstream(b) => b.size_hint(),
            Body::Client(b) => b.size_hint(),
            Body::Upload(b) => b.size_hint(),
        }
    }
}

/// Reads a body into memory, refusing more than `limit` bytes, and giving up on one that does
/// not move for `idle`: a client's body to the gateway's own endpoints (`timeouts.idle`;
/// HTTP/1.1's reader keeps that limit itself, HTTP/2's does not, and a stalled stream would
/// otherwise hold its connection open for good), or a provider's answer (its call's timeout).
pub async fn read_limited<B>(body: B, limit: usize, idle: Duration) -> Result<Bytes, ReadError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    // A length said up front that is over the limit: refused now, not after waiting for it.
    if body.size_hint().lower() > limit as u64 {
        return Err(ReadError::TooLarge);
    }
    let limited = http_body_util::Limited::new(body, limit);
    let mut limited = std::pin::pin!(limited);
    let mut data = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout(idle, limited.frame()).await {
            Err(_) => return Err(ReadError::Client(ClientBodyError::Stalled)),
            Ok(None) => return Ok(data.freeze()),
            Ok(Some(Ok(frame))) => {
                if let Some(chunk) = frame.data_ref() {
                    data.extend_from_slice(chunk);
                }
            }
            Ok(Some(Err(e))) => return Err(ReadError::from_limited(e)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("body too large")]
    TooLarge,
    #[error("request body: {0}")]
    Client(ClientBodyError),
    #[error("reading body: {0}")]
    Io(String),
}

impl ReadError {
    /// What a `Limited` body's error was.
    fn from_limited(e: Box<dyn std::error::Error + Send + Sync>) -> Self {
        if e.is::<http_body_util::LengthLimitError>() {
            return ReadError::TooLarge;
        }
        match e.downcast_ref::<BodyError>() {
            Some(BodyError::Client(fault)) => ReadError::Client(*fault),
            _ => ReadError::Io(e.to_string()),
        }
    }

    pub fn status(&self) -> http::StatusCode {
        match self {
            ReadError::TooLarge => http::StatusCode::PAYLOAD_TOO_LARGE,
            ReadError::Client(ClientBodyError::Stalled) => http::StatusCode::REQUEST_TIMEOUT,
            ReadError::Client(_) | ReadError::Io(_) => http::StatusCode::BAD_REQUEST,
        }
    }

    /// For the pages that say why.
    pub fn reason(&self) -> &'static str {
        match self {
            ReadError::TooLarge => "request too large",
            ReadError::Client(ClientBodyError::Stalled) => "request body not received in time",
            ReadError::Client(_) | ReadError::Io(_) => "request body incomplete or malformed",
        }
    }
}
