//! Body types of the HTTP/2 side (and keygate's own answers on both
//! sides). Bodies stream frame by frame in both directions; nothing here
//! buffers a whole body.

use crate::http1::{Decoded, Decoder, Framing, WireError};
use crate::proxy::drain;
use crate::proxy::upstream::{BodySource, Conn, SourceError};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What keygate answers with: its own small JSON, or the upstream's body.
pub enum ProxyBody {
    Full(Option<Bytes>),
    Upstream(OriginBody),
}

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Full(Some(bytes.into()))
    }

    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream(body) => body.poll_data(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Upstream(body) => body.conn.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Upstream(body) => body.size_hint,
        }
    }
}

/// The upstream's response body, read from its connection as hyper asks
/// for it; the connection goes back to the pool when the body has been read
/// to the end (and not before), if it may be reused. An upstream that sends
/// none of it for `idle` ends it with an error (hyper resets the stream).
pub struct OriginBody {
    /// `None` once the body has ended.
    conn: Option<Conn>,
    decoder: Decoder,
    reusable: bool,
    size_hint: SizeHint,
    idle: Duration,
    /// Armed while waiting for the upstream; re-armed after each read.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A read has come in since `stall` was armed.
    progressed: bool,
}

/// The upstream sent none of a body for `limits.upstream_response_timeout`.
#[derive(Debug)]
pub struct Stalled;

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream response body stalled")
    }
}

impl std::error::Error for Stalled {}

impl OriginBody {
    pub fn new(
        conn: Conn,
        framing: Framing,
        reusable: bool,
        idle: Duration,
        max_head: usize,
    ) -> OriginBody {
        let size_hint = match framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Chunked | Framing::UntilClose => SizeHint::default(),
        };
        let mut body = OriginBody {
            conn: Some(conn),
            decoder: Decoder::new(framing, max_head),
            reusable,
            size_hint,
            idle,
            stall: None,
            progressed: false,
        };
        if body.decoder.is_done() {
            body.end();
        }
        body
    }

    fn end(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reusable
        {
            conn.release();
        }
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let decoded = match self.decoder.decode(&mut conn.buf) {
                Ok(d) => d,
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            };
            match decoded {
                Decoded::Data(data) => {
                    if self.decoder.is_done() {
                        self.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoded::End => {
                    self.end();
                    return Poll::Ready(None);
                }
                Decoded::NeedMore => match conn.poll_read_more(cx) {
                    Poll::Pending => {
                        let idle = self.idle;
                        let stall = self
                            .stall
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                        if std::mem::take(&mut self.progressed) {
                            stall
                                .as_mut()
                                .reset(tokio::time::Instant::now() + self.idle);
                        }
                        if stall.as_mut().poll(cx).is_ready() {
                            tracing::warn!("upstream response body stalled");
                            self.conn = None;
                            return Poll::Ready(Some(Err(Box::new(Stalled))));
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(0)) => {
                        if let Err(e) = self.decoder.eof() {
                            self.conn = None;
                            return Poll::Ready(Some(Err(Box::new(e))));
                        }
                    }
                    Poll::Ready(Ok(_)) => self.progressed = true,
                    Poll::Ready(Err(e)) => {
                        self.conn = None;
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                },
            }
        }
    }
}

/// An HTTP/2 request body on its way upstream, cut off past the limit.
pub struct IncomingSource {
    body: Incoming,
    left: u64,
}

impl IncomingSource {
    pub fn new(body: Incoming, limit: u64) -> IncomingSource {
        IncomingSource { body, left: limit }
    }
}

impl BodySource for IncomingSource {
    async fn next(&mut self) -> Result<Option<Bytes>, SourceError> {
        use http_body_util::BodyExt;
        loop {
            let frame = match self.body.frame().await {
                None => return Ok(None),
                Some(Ok(frame)) => frame,
                Some(Err(_)) => return Err(SourceError::Aborted(WireError::Truncated)),
            };
            // Trailers are not forwarded.
            if let Ok(data) = frame.into_data() {
                let len = data.len() as u64;
                if len > self.left {
                    return Err(SourceError::TooLarge);
                }
                self.left -= len;
                return Ok(Some(data));
            }
        }
    }

    fn at_end(&self) -> bool {
        self.body.is_end_stream()
    }
}

/// Reads and throws away the body of a refused request in the background,
/// within [`drain`]'s bounds, so the client can finish sending and read the
/// answer; past them the stream is reset.
pub fn discard(body: Incoming, limit: u64) {
    if body.is_end_stream() {
        return;
    }
    tokio::spawn(async move {
        let mut body = body;
        let mut left = drain::bytes(limit);
        let until = tokio::time::Instant::now() + drain::TIME;
        while left > 0 {
            let frame =
                tokio::time::timeout_at(until, http_body_util::BodyExt::frame(&mut body)).await;
            match frame {
                Ok(Some(Ok(frame))) => {
                    let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                    left = left.saturating_sub(n);
                }
                _ => return,
            }
        }
    });
}
