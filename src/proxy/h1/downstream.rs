//! The downstream side of one HTTP/1.1 connection: the client's stream,
//! its buffers while it is busy, and every read and write on it, each
//! bounded (heads by `header_read_timeout`, writes by `send_timeout`).

use super::answer;
use super::buffers::Held;
use super::deadline::Deadline;
use super::io::{ClientIo, now_or_never, read_more};
use super::{H2_PREFACE, Head};
use crate::http1::{self, Framing, WireError};
use crate::proxy::gateway::{ConnInfo, Gateway};
use crate::proxy::h2::body::ProxyBody;
use crate::proxy::reject::Reject;
use bytes::Bytes;
use http::header::HeaderMap;
use http::{Response, StatusCode};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::Instant;

/// The client's connection: its stream and, while it is busy, its buffers.
pub(super) struct Downstream<IO> {
    pub(super) io: IO,
    pub(super) bufs: Held,
    /// The request being answered is HTTP/1.0.
    pub(super) http10: bool,
    /// No request has been read yet: the bytes may be the HTTP/2 preface.
    pub(super) first: bool,
    /// Bound on every write to the client.
    pub(super) send_timeout: Duration,
    pub(super) max_head: usize,
}

impl<IO: ClientIo> Downstream<IO> {
    /// Takes the limits the connection's own reads and writes keep to.
    pub(super) fn follow(&mut self, limits: &crate::config::Limits) {
        self.send_timeout = limits.send_timeout;
        self.max_head = limits.max_header_bytes;
    }

    pub(super) async fn read_more(&mut self) -> std::io::Result<usize> {
        read_more(&mut self.io, &mut self.bufs.buf).await
    }

    /// Gives the buffers back to the spares while there is nothing in them.
    pub(super) fn park(&mut self) {
        if self.bufs.0.as_ref().is_some_and(|b| b.buf.is_empty())
            && let Some(bufs) = self.bufs.0.take()
        {
            bufs.give_back();
        }
    }

    /// Whether a whole request head is already waiting in the buffer.
    pub(super) fn next_head_buffered(&mut self) -> bool {
        if self.bufs.buf.is_empty() {
            return false;
        }
        let bufs = &mut *self.bufs;
        matches!(
            http1::parse_request(&bufs.buf, &mut bufs.fields, self.max_head),
            Ok(Some(_))
        )
    }

    /// The `Connection` header that says whether the connection stays open,
    /// in the terms of the request's HTTP version.
    pub(super) fn connection(&self, keep: bool) -> Option<&'static str> {
        match (keep, self.http10) {
            (false, _) => Some("close"),
            (true, true) => Some("keep-alive"),
            (true, false) => None,
        }
    }

    /// Puts the head of one of keygate's own answers in the output.
    pub(super) fn write_head(
        &mut self,
        status: StatusCode,
        headers: &HeaderMap,
        request_id: &[u8],
        framing: Framing,
        keep: bool,
    ) {
        let connection = self.connection(keep);
        answer::write_client_response(
            &mut self.bufs.out,
            status,
            http1::fields_of(headers),
            framing.into(),
            connection,
            request_id,
        );
    }

    /// Writes the output, giving up when the client takes none of it for
    /// `send_timeout` (nginx's `send_timeout`): a client that stops reading
    /// cannot hold the connection, nor the upstream connection behind it.
    /// False when the output did not all go.
    pub(super) async fn flush(&mut self, deadline: &mut Deadline) -> bool {
        if self.bufs.out.is_empty() {
            return true;
        }
        let at = Instant::now() + self.send_timeout;
        let written = deadline.until(at, self.io.write_all(&self.bufs.out)).await;
        self.bufs.out.clear();
        match written {
            Some(Ok(())) => true,
            Some(Err(_)) => false,
            None => {
                tracing::debug!("client stopped reading its answer");
                false
            }
        }
    }

    /// The next request head, whole within `timeout` of starting to wait
    /// for it (however the bytes trickle in). While nothing has arrived the
    /// connection holds no buffer.
    pub(super) async fn read_head(
        &mut self,
        deadline: &mut Deadline,
        timeout: Duration,
        stopped: &mut watch::Receiver<bool>,
    ) -> Head {
        let at = Instant::now() + timeout;
        loop {
            let buf = &self.bufs.buf;
            let preface = &H2_PREFACE[..buf.len().min(H2_PREFACE.len())];
            if self.first && !buf.is_empty() && buf.starts_with(preface) {
                if buf.len() >= H2_PREFACE.len() {
                    return Head::Http2;
                }
                // Still either protocol: read on.
            } else if !buf.is_empty() {
                let bufs = &mut *self.bufs;
                match http1::parse_request(&bufs.buf, &mut bufs.fields, self.max_head) {
                    Ok(Some(head)) => return Head::Request(head),
                    Ok(None) => {}
                    Err(e) => return Head::Bad(e),
                }
            }
            let idle = self.bufs.buf.is_empty();
            if idle && IO::PARKS {
                // Wait with no buffer, then take one for what has come.
                self.park();
                let ready = tokio::select! {
                    biased;
                    ready = deadline.until(at, self.io.readable()) => ready,
                    _ = stopped.changed() => return Head::Gone,
                };
                match ready {
                    Some(Ok(())) => {}
                    Some(Err(_)) | None => return Head::Gone,
                }
                // Read what came, as tokio reads: a short read marks the
                // socket drained, so the next wait costs no extra syscall.
                match now_or_never(self.read_more()) {
                    Some(Ok(0) | Err(_)) => return Head::Gone,
                    Some(Ok(_)) | None => continue,
                }
            }
            let read = tokio::select! {
                biased;
                read = deadline.until(at, self.read_more()) => read,
                _ = stopped.changed(), if idle => return Head::Gone,
            };
            match read {
                Some(Ok(0) | Err(_)) | None => return Head::Gone,
                Some(Ok(_)) => {}
            }
        }
    }

    /// One of keygate's own answers. The body is left out for HEAD.
    pub(super) async fn answer(
        &mut self,
        response: Response<ProxyBody>,
        request_id: &[u8],
        keep: bool,
        head_request: bool,
        deadline: &mut Deadline,
    ) -> bool {
        let (parts, body) = response.into_parts();
        let bytes = match body {
            ProxyBody::Full(bytes) => bytes.unwrap_or_default(),
            ProxyBody::Upstream(_) => Bytes::new(),
        };
        let framing = if parts.status == StatusCode::NO_CONTENT {
            Framing::Empty
        } else {
            Framing::Length(bytes.len() as u64)
        };
        self.bufs.out.clear();
        self.write_head(parts.status, &parts.headers, request_id, framing, keep);
        if !head_request {
            self.bufs.out.extend_from_slice(&bytes);
        }
        self.flush(deadline).await
    }

    /// 400, 431 or 501 for a request that could not be read; the
    /// connection closes after it.
    pub(super) async fn answer_malformed(
        &mut self,
        gateway: &Gateway,
        info: &ConnInfo,
        error: WireError,
        deadline: &mut Deadline,
    ) {
        tracing::debug!(peer = %info.peer, error = %error, "malformed request");
        let reject = Reject::Malformed(error);
        let status = reject.status().as_u16();
        gateway.trace.unmatched(status);
        let request_id = gateway.trace.next_id();
        self.answer(
            reject.into_response(),
            request_id.as_bytes(),
            false,
            false,
            deadline,
        )
        .await;
    }
}
