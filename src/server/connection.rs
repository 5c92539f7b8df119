//! One accepted client connection: the TLS handshake when the listener has
//! TLS, then HTTP/2 when ALPN chose it or the client opens with its
//! preface (prior knowledge), else HTTP/1.1. Nothing is buffered for a
//! connection until its client has sent something.

use crate::proxy::h1::{self, Buffers, ClientIo};
use crate::proxy::{ConnInfo, WorkerGateway, h2};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One accepted connection and what serving it needs.
pub struct Connection {
    pub gateway: Arc<WorkerGateway>,
    pub info: ConnInfo,
    pub stopped: watch::Receiver<bool>,
}

impl Connection {
    pub async fn serve(self, stream: TcpStream, tls: Option<TlsAcceptor>) {
        let Some(acceptor) = tls else {
            return self.serve_io(stream, false).await;
        };
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

    async fn serve_io<IO>(self, mut io: IO, alpn_h2: bool)
    where
        IO: ClientIo + 'static,
    {
        if alpn_h2 {
            return h2::serve(self.gateway, self.info, io, self.stopped).await;
        }
        let timeout = self.gateway.snapshot().gateway.limits.header_read_timeout;
        let mut bufs = None;
        let sniffed = tokio::time::timeout(timeout, async {
            io.readable().await?;
            let bufs = bufs.insert(Buffers::take());
            while bufs.buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&bufs.buf) {
                if io.read_buf(&mut bufs.buf).await? == 0 {
                    break;
                }
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
        let Some(mut bufs) = bufs else { return };
        if !matches!(sniffed, Ok(Ok(()))) || bufs.buf.is_empty() {
            bufs.give_back();
            return;
        }
        if !bufs.buf.starts_with(H2_PREFACE) {
            return h1::serve(&self.gateway, &self.info, io, bufs, self.stopped).await;
        }
        let prefix = std::mem::take(&mut bufs.buf).freeze();
        bufs.give_back();
        let io = Prefixed { prefix, io };
        h2::serve(self.gateway, self.info, io, self.stopped).await;
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
