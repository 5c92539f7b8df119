//! The upstream client: one pool per upstream per worker runtime, each a
//! stack of idle HTTP/1.1 connections, spoken to with [`crate::http1`] from
//! the task of the request that holds the connection (no connection task,
//! no channel between the two).
//!
//! A connection goes back on the stack only when its exchange ended cleanly
//! with both bodies complete, and is checked for a close by the upstream
//! (readiness, no syscall when idle) before it is used again. Open
//! connections per pool are bounded; at the bound a request waits for one
//! to come back (within the response timeout). A request is never sent
//! twice: a POST that may have reached the upstream is not retried.
//!
//! An `https://` upstream's connections are TLS ([`Link::Tls`]), the
//! certificate checked for its host; the rest is the same.

use crate::http1::{self, Fields, Framing, ResponseHead, WireError};
use bytes::{Buf, Bytes, BytesMut};
use http::{Method, StatusCode};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Above this much pending output a streamed body is written out (both
/// legs).
pub(crate) const WRITE_BATCH: usize = 64 * 1024;

#[derive(Debug)]
pub enum ForwardError {
    /// Could not connect (refused, unreachable, name not found).
    Connect(std::io::Error),
    ConnectTimeout,
    /// The exchange failed after connecting.
    Exchange(std::io::Error),
    /// The upstream's answer broke HTTP/1.1.
    BadResponse(WireError),
    /// The client's body could not be read to its end.
    Body(SourceError),
}

impl std::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardError::Connect(e) => write!(f, "connect failed: {e}"),
            ForwardError::ConnectTimeout => f.write_str("connect timed out"),
            ForwardError::Exchange(e) => write!(f, "upstream exchange failed: {e}"),
            ForwardError::BadResponse(e) => write!(f, "upstream sent a bad response: {e}"),
            ForwardError::Body(SourceError::TooLarge) => f.write_str("request body too large"),
            ForwardError::Body(SourceError::Aborted(e)) => {
                write!(f, "request body ended early: {e}")
            }
        }
    }
}

/// Why a request body stopped short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceError {
    /// It grew past `limits.max_body_bytes`.
    TooLarge,
    /// The client broke off or sent a malformed body.
    Aborted(WireError),
}

/// Where a forwarded request's body comes from: the client's HTTP/1.1
/// connection or an HTTP/2 stream.
pub trait BodySource: Send {
    /// The next piece of the body, `None` at its end.
    fn next(&mut self) -> impl Future<Output = Result<Option<Bytes>, SourceError>> + Send;
    /// Whether [`BodySource::next`] would return `None` now.
    fn at_end(&self) -> bool;
}

struct PoolInner {
    authority: String,
    /// `https://`: the TLS client and the name the certificate must carry.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    idle: Mutex<Vec<Conn>>,
    max_idle: usize,
    /// Connections open (idle or busy), at most `max_open`.
    open: AtomicUsize,
    max_open: usize,
    /// Signalled when a connection goes idle or closes.
    freed: Notify,
    connect_timeout: Duration,
}

/// One upstream's connections on one worker.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

/// One place in a pool's bound, given back when its connection is dropped.
struct Place(Arc<PoolInner>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// The byte stream to an upstream.
enum Link {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Link {
    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Link::Plain(stream) => stream.write_all(data).await,
            Link::Tls(stream) => {
                stream.write_all(data).await?;
                stream.flush().await
            }
        }
    }
}

/// An upstream connection and what has been read from it.
pub struct Conn {
    stream: Link,
    pub buf: BytesMut,
    /// Where the response head's fields lie in `buf`.
    pub fields: Fields,
    place: Place,
}

/// A response head, and the connection its body is still to be read from.
pub struct UpstreamResponse {
    pub head: ResponseHead,
    pub conn: Conn,
    /// The request body went out whole; when false the connection (and the
    /// client's) cannot be reused.
    pub request_complete: bool,
}

impl Conn {
    /// Reads more of the response into `buf`; `Ok(0)` at the upstream's close.
    pub async fn read_more(&mut self) -> std::io::Result<usize> {
        match &mut self.stream {
            Link::Plain(stream) => crate::proxy::h1::read_more(stream, &mut self.buf).await,
            Link::Tls(stream) => crate::proxy::h1::read_more(stream, &mut self.buf).await,
        }
    }

    /// Poll form of [`Conn::read_more`], for bodies polled by hyper.
    pub fn poll_read_more(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        match &mut self.stream {
            Link::Plain(stream) => loop {
                std::task::ready!(stream.poll_read_ready(cx))?;
                self.buf.reserve(crate::proxy::h1::READ_CHUNK);
                match stream.try_read_buf(&mut self.buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    done => return std::task::Poll::Ready(done),
                }
            },
            Link::Tls(stream) => {
                let mut chunk = [0u8; crate::proxy::h1::READ_CHUNK];
                let mut read = tokio::io::ReadBuf::new(&mut chunk);
                std::task::ready!(tokio::io::AsyncRead::poll_read(
                    std::pin::Pin::new(stream),
                    cx,
                    &mut read
                ))?;
                self.buf.extend_from_slice(read.filled());
                std::task::Poll::Ready(Ok(read.filled().len()))
            }
        }
    }

    /// Whether the upstream has closed or written out of turn while idle.
    fn is_dead(&mut self) -> bool {
        let mut probe = [0u8; 1];
        if !self.buf.is_empty() {
            return true;
        }
        match &mut self.stream {
            Link::Plain(stream) => !matches!(
                stream.try_read(&mut probe),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            ),
            // Polled once without waiting: a TLS record that is only a
            // session ticket reads as nothing yet, a close or data as dead.
            Link::Tls(stream) => {
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                let mut read = tokio::io::ReadBuf::new(&mut probe);
                tokio::io::AsyncRead::poll_read(std::pin::Pin::new(stream), &mut cx, &mut read)
                    .is_ready()
            }
        }
    }

    /// Gives the connection back to its pool for the next request.
    pub fn release(self) {
        if !self.buf.is_empty() {
            return;
        }
        let pool = self.place.0.clone();
        let mut idle = pool
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < pool.max_idle {
            idle.push(self);
            drop(idle);
            pool.freed.notify_one();
        }
    }
}

impl Pool {
    pub fn new(
        upstream: &crate::config::Upstream,
        tls: Option<tokio_rustls::TlsConnector>,
        max_idle: usize,
        max_open: usize,
        connect_timeout: Duration,
    ) -> Pool {
        let tls = tls.and_then(|connector| {
            let name = rustls_pki_types::ServerName::try_from(upstream.host().to_owned()).ok()?;
            Some((connector, name))
        });
        Pool {
            inner: Arc::new(PoolInner {
                authority: upstream.authority.clone(),
                tls,
                idle: Mutex::new(Vec::new()),
                max_idle: max_idle.min(max_open),
                open: AtomicUsize::new(0),
                max_open: max_open.max(1),
                freed: Notify::new(),
                connect_timeout,
            }),
        }
    }

    /// Whether `other` would be the same pool: same upstream, same bounds.
    pub fn same_as(&self, other: &Pool) -> bool {
        let (a, b) = (&self.inner, &other.inner);
        a.authority == b.authority
            && a.tls.as_ref().map(|(_, name)| name) == b.tls.as_ref().map(|(_, name)| name)
            && a.max_idle == b.max_idle
            && a.max_open == b.max_open
            && a.connect_timeout == b.connect_timeout
    }

    /// Sends a request head (already written for the upstream, in `head`,
    /// which is used up as the output buffer) and its body, and reads the
    /// response head, which stays at the front of the connection's buffer.
    /// The body follows `framing`: kept as is for a length, chunk-coded for
    /// `Chunked`.
    pub async fn send<S: BodySource>(
        &self,
        head: &mut Vec<u8>,
        framing: Framing,
        body: &mut S,
        method: &Method,
    ) -> Result<UpstreamResponse, ForwardError> {
        let mut conn = self.checkout().await?;
        let request_complete = match write_request(&mut conn, head, framing, body).await {
            Ok(()) => true,
            Err(ForwardError::Exchange(e)) => {
                // The upstream may have answered and closed before taking the
                // whole body (a 413, say): pass that answer on if it did.
                return match read_head(&mut conn, method).await {
                    Ok(mut head) => {
                        head.keep_alive = false;
                        Ok(UpstreamResponse {
                            head,
                            conn,
                            request_complete: false,
                        })
                    }
                    Err(_) => Err(ForwardError::Exchange(e)),
                };
            }
            Err(other) => return Err(other),
        };
        let head = read_head(&mut conn, method).await?;
        Ok(UpstreamResponse {
            head,
            conn,
            request_complete,
        })
    }

    async fn checkout(&self) -> Result<Conn, ForwardError> {
        loop {
            let idle = self
                .inner
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop();
            match idle {
                Some(mut conn) => {
                    if !conn.is_dead() {
                        return Ok(conn);
                    }
                }
                None if self.reserve() => return self.connect().await,
                None => self.inner.freed.notified().await,
            }
        }
    }

    /// Claims room for one more connection, if the pool has any.
    fn reserve(&self) -> bool {
        self.inner
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.inner.max_open).then_some(n + 1)
            })
            .is_ok()
    }

    /// Opens a connection in a place already reserved (given back on failure).
    async fn connect(&self) -> Result<Conn, ForwardError> {
        let place = Place(self.inner.clone());
        let connected = tokio::time::timeout(self.inner.connect_timeout, async {
            let stream = TcpStream::connect(self.inner.authority.as_str()).await?;
            let _ = stream.set_nodelay(true);
            match &self.inner.tls {
                None => Ok(Link::Plain(stream)),
                Some((connector, name)) => connector
                    .connect(name.clone(), stream)
                    .await
                    .map(|tls| Link::Tls(Box::new(tls))),
            }
        })
        .await
        .map_err(|_| ForwardError::ConnectTimeout)?
        .map_err(ForwardError::Connect)?;
        Ok(Conn {
            stream: connected,
            buf: BytesMut::with_capacity(8 * 1024),
            fields: Fields::default(),
            place,
        })
    }
}

/// Writes the head and the whole body; the head and a body that is already
/// at hand go out in one write.
async fn write_request<S: BodySource>(
    conn: &mut Conn,
    out: &mut Vec<u8>,
    framing: Framing,
    body: &mut S,
) -> Result<(), ForwardError> {
    let chunked = framing == Framing::Chunked;
    loop {
        match body.next().await.map_err(ForwardError::Body)? {
            Some(data) if chunked => http1::encode_chunk(out, &data),
            Some(data) => out.extend_from_slice(&data),
            None => {
                if chunked {
                    out.extend_from_slice(http1::LAST_CHUNK);
                }
                let written = conn.stream.write_all(out).await;
                out.clear();
                return written.map_err(ForwardError::Exchange);
            }
        }
        // More is on its way but not here yet: send what there is.
        if !body.at_end() || out.len() >= WRITE_BATCH {
            conn.stream
                .write_all(out)
                .await
                .map_err(ForwardError::Exchange)?;
            out.clear();
        }
    }
}

/// Reads the final response head, passing over interim (1xx) responses.
async fn read_head(conn: &mut Conn, method: &Method) -> Result<ResponseHead, ForwardError> {
    loop {
        match http1::parse_response(&conn.buf, method, &mut conn.fields, http1::MAX_HEAD)
            .map_err(ForwardError::BadResponse)?
        {
            Some(head) => {
                if head.status == StatusCode::SWITCHING_PROTOCOLS {
                    // keygate never asks for an upgrade.
                    return Err(ForwardError::BadResponse(WireError::Malformed(
                        "unrequested protocol switch",
                    )));
                }
                if !head.status.is_informational() {
                    return Ok(head);
                }
                conn.buf.advance(head.len);
            }
            None => match conn.read_more().await {
                Ok(0) => {
                    return Err(ForwardError::Exchange(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed before a response",
                    )));
                }
                Ok(_) => {}
                Err(e) => return Err(ForwardError::Exchange(e)),
            },
        }
    }
}
