//! One accepted client connection: the TLS handshake when the listener has
//! TLS, then HTTP/2 when ALPN chose it or the client opens with its
//! preface (prior knowledge, seen by the HTTP/1.1 side), else HTTP/1.1.
//! Nothing is buffered for a connection until its client has sent
//! something.

use crate::proxy::h1::{self, ClientIo};
use crate::proxy::{ConnInfo, WorkerGateway, h2};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// One accepted connection and what serving it needs; `_guards` are held
/// until it is done (its place in the connection limits, and the worker's
/// count of open connections).
pub struct Connection<G> {
    pub gateway: Arc<WorkerGateway>,
    pub info: ConnInfo,
    pub stopped: watch::Receiver<bool>,
    pub _guards: G,
}

impl<G: Send + 'static> Connection<G> {
    /// Serves a cleartext connection to its end. Its task holds only the
    /// small state of waiting for its next request: what HTTP/2 needs is
    /// boxed, allocated only for connections that use it.
    pub async fn serve(self, stream: TcpStream) {
        let turned = h1::serve(&self.gateway, &self.info, stream, self.stopped.clone()).await;
        if let Some(h1::Http2 { io, read }) = turned {
            let io = Prefixed { prefix: read, io };
            Box::pin(h2::serve(self.gateway, self.info, io, self.stopped)).await;
        }
    }

    /// [`Connection::serve`] after a TLS handshake.
    pub async fn serve_tls(self, stream: TcpStream, acceptor: TlsAcceptor) {
        let timeout = self.gateway.snapshot().gateway.limits.header_read_timeout;
        let peer = self.info.peer;
        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => {
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                self.serve_io(stream, h2).await;
            }
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
        }
    }

    async fn serve_io<IO>(self, io: IO, alpn_h2: bool)
    where
        IO: ClientIo + 'static,
    {
        if alpn_h2 {
            return Box::pin(h2::serve(self.gateway, self.info, io, self.stopped)).await;
        }
        let turned = h1::serve(&self.gateway, &self.info, io, self.stopped.clone()).await;
        if let Some(h1::Http2 { io, read }) = turned {
            let io = Prefixed { prefix: read, io };
            Box::pin(h2::serve(self.gateway, self.info, io, self.stopped)).await;
        }
    }
}

/// A stream whose first bytes were already read: they are read again first.
struct Prefixed<IO> {
    prefix: bytes::Bytes,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.prefix.is_empty() {
            return std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix.split_to(n));
        std::task::Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
