//! The client's byte stream as the HTTP/1.1 side needs it: whether it can
//! be waited on without a buffer (cleartext TCP) or not (TLS), and reads
//! into a connection's buffer.

use bytes::BytesMut;
use std::future::Future;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

/// What a connection reads into at a time.
pub(crate) const READ_CHUNK: usize = 8 * 1024;

/// A client connection's byte stream, and whether it can be waited on
/// without a buffer.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {
    /// [`ClientIo::readable`] works: the connection can wait for its next
    /// request holding no buffer.
    const PARKS: bool;
    /// Resolves when a read may find bytes (at times when it would not:
    /// a new socket counts as readable).
    fn readable(&self) -> impl Future<Output = std::io::Result<()>> + Send;
}

impl ClientIo for tokio::net::TcpStream {
    const PARKS: bool = true;

    fn readable(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        tokio::net::TcpStream::readable(self)
    }
}

/// TLS buffers inside rustls: a TLS connection waits with its buffers.
impl<IO: AsyncRead + AsyncWrite + Unpin + Send> ClientIo for tokio_rustls::server::TlsStream<IO> {
    const PARKS: bool = false;

    fn readable(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}

/// `future`'s output if it has one at once, without waiting for it: a
/// read that finds nothing clears the socket's readiness and is `None`.
pub(super) fn now_or_never<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// Reads more into `buf` (room for [`READ_CHUNK`] more first); `Ok(0)` at
/// the peer's close. Both legs read this way.
pub(crate) async fn read_more<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    buf.reserve(READ_CHUNK);
    io.read_buf(buf).await
}
