//! The request body as it comes from the client, and what happens to it
//! when the request goes no further: read and dropped (bounded), so the
//! client can read its answer.

use super::deadline::Deadline;
use super::downstream::Downstream;
use super::io::ClientIo;
use crate::http1::{Decoded, Decoder, Framing, WireError};
use crate::proxy::drain;
use crate::proxy::h2::body::ProxyBody;
use crate::proxy::trace::Trace;
use crate::proxy::upstream::{BodySource, SourceError};
use bytes::{Bytes, BytesMut};
use http::Response;
use tokio::io::AsyncWriteExt;

/// The request body as it comes from the client, cut off past the limit.
pub(super) struct ClientBody<'a, IO> {
    pub(super) client: &'a mut Downstream<IO>,
    pub(super) decoder: Decoder,
    pub(super) left: u64,
    /// `Expect: 100-continue` still to be answered before the body is read.
    pub(super) send_continue: bool,
    /// The body broke its framing: nothing after it can be read.
    pub(super) malformed: bool,
}

impl<IO: ClientIo> BodySource for ClientBody<'_, IO> {
    async fn next(&mut self) -> Result<Option<Bytes>, SourceError> {
        loop {
            let decoded = self
                .decoder
                .decode(&mut self.client.bufs.buf)
                .map_err(|e| {
                    self.malformed = true;
                    SourceError::Aborted(e)
                })?;
            match decoded {
                Decoded::Data(data) => {
                    let len = data.len() as u64;
                    if len > self.left {
                        return Err(SourceError::TooLarge);
                    }
                    self.left -= len;
                    return Ok(Some(data));
                }
                Decoded::End => return Ok(None),
                Decoded::NeedMore => {
                    if std::mem::take(&mut self.send_continue) {
                        let client = &mut *self.client;
                        let sent = tokio::time::timeout(
                            client.send_timeout,
                            client.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n"),
                        )
                        .await;
                        if !matches!(sent, Ok(Ok(()))) {
                            return Err(SourceError::Aborted(WireError::Truncated));
                        }
                    }
                    match self.client.read_more().await {
                        Ok(0) | Err(_) => {
                            self.decoder.eof().map_err(SourceError::Aborted)?;
                            return Ok(None);
                        }
                        Ok(_) => {}
                    }
                }
            }
        }
    }

    fn at_end(&self) -> bool {
        self.decoder.is_done()
    }
}

impl<IO: ClientIo> ClientBody<'_, IO> {
    /// Answers a request that goes no further, then reads and drops its body
    /// (bounded) so the client can read the answer. `keep` says whether the
    /// connection may then carry another request, once the body has been
    /// read to its end; returns whether it may.
    pub(super) async fn refuse(
        &mut self,
        response: Response<ProxyBody>,
        trace: &Trace,
        keep: &impl Fn(&mut Downstream<IO>) -> bool,
        head_request: bool,
        deadline: &mut Deadline,
    ) -> bool {
        // A body that is not all here yet is drained, and the connection
        // closed after it; one that waits for `100 Continue` is never sent.
        let mut leftover = Decoder::new(Framing::Empty, self.client.max_head);
        std::mem::swap(&mut leftover, &mut self.decoder);
        let whole = drain_buffered(&mut leftover, &mut self.client.bufs.buf) == Some(true);
        let keep = whole && keep(self.client);
        let sent = self
            .client
            .answer(
                response,
                trace.request_id.as_bytes(),
                keep,
                head_request,
                deadline,
            )
            .await;
        if sent && !whole && !self.send_continue && !self.malformed {
            let limit = drain::bytes(self.left);
            let _ = tokio::time::timeout(drain::TIME, self.drain(leftover, limit)).await;
        }
        keep && sent
    }

    async fn drain(&mut self, mut decoder: Decoder, mut limit: u64) {
        while limit > 0 && drain_buffered(&mut decoder, &mut self.client.bufs.buf) == Some(false) {
            match self.client.read_more().await {
                Ok(0) | Err(_) => return,
                Ok(n) => limit = limit.saturating_sub(n as u64),
            }
        }
    }
}

/// Drops what of a body is in `buf`: `Some(true)` once the body has ended,
/// `Some(false)` when more is to come, `None` when it is malformed.
fn drain_buffered(decoder: &mut Decoder, buf: &mut BytesMut) -> Option<bool> {
    loop {
        match decoder.decode(buf) {
            Ok(Decoded::Data(_)) => {}
            Ok(Decoded::End) => return Some(true),
            Ok(Decoded::NeedMore) => return Some(false),
            Err(_) => return None,
        }
    }
}
