//! The HTTP/1.1 side facing clients. One task per connection reads a request
//! head, runs the gateway's checks, and drives the upstream exchange itself:
//! the request goes upstream and the answer comes back in as few writes as
//! the bodies allow, with no task or channel in between. This is what
//! brought keygate's forwarding rate from 0.75 × nginx's to parity (README,
//! "Performance"); HTTP/2 stays with hyper.

use super::reject::Reject;
use super::upstream::{Answer, BodySource, SourceError};
use super::wire::{self, Decoded, Decoder, Fields, Framing, RequestHead, WireError};
use super::{
    Authorization, Checked, ConnInfo, Facts, Forwarder, Gateway, Trace, Upstreamed,
    body::ProxyBody, headers,
};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use std::future::Future;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

/// Above this much pending output a response body is written out.
const WRITE_BATCH: usize = 64 * 1024;
/// A refused request's body is read and dropped up to this many bytes (at
/// least), so the client can read the answer; past it the connection closes.
const DRAIN_MIN: u64 = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// The client's connection: its stream, what has been read from it, and the
/// output being put together.
pub struct Client<IO> {
    io: IO,
    buf: BytesMut,
    out: Vec<u8>,
    /// The head being sent upstream.
    up: Vec<u8>,
    /// Where the current request head's fields lie in `buf`.
    fields: Fields,
    /// The request being answered is HTTP/1.0.
    http10: bool,
}

/// Where a request goes once its head has been read.
enum Next {
    Forward { route: usize, pool: usize },
    Preflight,
    Refuse(Reject),
}

/// A connection's one timer. Setting a later deadline only records it; the
/// timer is re-armed when it fires early. So the usual request, which ends
/// well within its deadlines, costs no timer-wheel work at all.
struct Deadline {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    at: Instant,
}

impl Deadline {
    fn new() -> Deadline {
        let at = Instant::now() + Duration::from_secs(3600);
        Deadline {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            at,
        }
    }

    /// `future`'s output, or `None` if the instant `at` comes first.
    async fn until<F: Future>(&mut self, at: Instant, future: F) -> Option<F::Output> {
        self.at = at;
        if self.sleep.deadline() > self.at {
            self.sleep.as_mut().reset(self.at);
        }
        let mut future = std::pin::pin!(future);
        loop {
            tokio::select! {
                biased;
                out = &mut future => return Some(out),
                () = &mut self.sleep => {
                    if Instant::now() >= self.at {
                        return None;
                    }
                    self.sleep.as_mut().reset(self.at);
                }
            }
        }
    }
}

enum Head {
    Request(RequestHead),
    Bad(WireError),
    /// Closed, timed out or shutting down: nothing more to answer.
    Gone,
}

/// Serves requests on one connection until it closes, fails, or the
/// gateway stops. `buf` holds bytes already read from `io`.
pub async fn serve<IO>(
    gateway: &Gateway,
    forwarder: &Forwarder,
    info: &ConnInfo,
    io: IO,
    buf: BytesMut,
    mut stopped: watch::Receiver<bool>,
    header_timeout: Duration,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut client = Client {
        io,
        buf,
        out: Vec::with_capacity(4 * 1024),
        up: Vec::with_capacity(1024),
        fields: Fields::default(),
        http10: false,
    };
    let mut deadline = Deadline::new();
    while !*stopped.borrow() {
        let head = match client
            .read_head(&mut deadline, header_timeout, &mut stopped)
            .await
        {
            Head::Request(head) => head,
            Head::Gone => break,
            Head::Bad(e) => {
                client.answer_malformed(gateway, info, e).await;
                break;
            }
        };
        let keep_alive = exchange(gateway, forwarder, info, &mut client, &mut deadline, head).await;
        if !keep_alive {
            break;
        }
    }
    let _ = client.io.shutdown().await;
}

/// Answers one request; returns whether the connection may carry another.
async fn exchange<IO>(
    gateway: &Gateway,
    forwarder: &Forwarder,
    info: &ConnInfo,
    client: &mut Client<IO>,
    deadline: &mut Deadline,
    head: RequestHead,
) -> bool
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let keep_alive = head.keep_alive;
    client.http10 = head.version == Version::HTTP_10;
    let head_request = head.method == Method::HEAD;
    let mut up = std::mem::take(&mut client.up);
    up.clear();
    // Everything decided from the head, while it is still in the buffer.
    let (trace, next) = {
        let bytes = &client.buf[..head.len];
        let fields = || client.fields.of(bytes);
        let find = |name: &[u8]| {
            fields()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        };
        let mut trace = gateway.begin(&head.method, find(b"x-request-id"));
        // Absolute-form (`POST http://host/path`) is read as the path, and
        // its authority stands in for a missing `Host`.
        let sent_target = head.target(bytes);
        let absolute = (!sent_target.starts_with('/'))
            .then(|| sent_target.parse::<http::Uri>().ok())
            .flatten();
        let target = match &absolute {
            Some(uri) => uri.path_and_query().map_or("/", |pq| pq.as_str()),
            None => sent_target,
        };
        let facts = Facts {
            method: &head.method,
            path: target.split('?').next().unwrap_or(target),
            authorization: Authorization::of(
                fields()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(b"authorization"))
                    .map(|(_, v)| v),
            ),
            content_length: head.content_length,
        };
        let next = match gateway.check(&facts, info, &mut trace).await {
            Ok(Checked::Forward { route, principal }) => {
                let original_host = find(b"host").or_else(|| {
                    absolute
                        .as_ref()
                        .and_then(|u| u.authority())
                        .map(|a| a.as_str().as_bytes())
                });
                let up_head = Upstreamed {
                    conn: info,
                    method: &head.method,
                    target: target.as_bytes(),
                    original_host,
                    route,
                    principal: &principal,
                    trace: &trace,
                    framing: head.framing,
                };
                match gateway.upstream_head(&mut up, up_head, fields()) {
                    Ok(pool) => Next::Forward { route, pool },
                    Err(reject) => Next::Refuse(reject),
                }
            }
            Ok(Checked::Preflight) => Next::Preflight,
            Err(reject) => {
                gateway.refused(&reject, info, &trace);
                Next::Refuse(reject)
            }
        };
        (trace, next)
    };
    client.buf.advance(head.len);
    let mut body = ClientBody {
        decoder: Decoder::new(head.framing),
        left: gateway.limits.max_body_bytes,
        send_continue: head.expect_continue,
        malformed: false,
        client,
    };
    // Each arm counts the request before its answer's head goes out, so a
    // client that has read the answer also sees it in the metrics.
    let keep_alive = match next {
        Next::Forward { route, pool } => {
            let sent = deadline
                .until(
                    Instant::now() + gateway.limits.upstream_response_timeout,
                    forwarder.pools[pool].send(&mut up, head.framing, &mut body, &head.method),
                )
                .await;
            let sent = gateway.forward_outcome(route, sent);
            match sent {
                Ok(answer) => {
                    gateway.finish(&trace, answer.head.status.as_u16());
                    let idle = gateway.limits.upstream_response_timeout;
                    pass_on(&mut body, answer, &trace, keep_alive, deadline, idle).await
                }
                Err(reject) => {
                    gateway.finish(&trace, reject.status().as_u16());
                    body.refuse(reject.into_response(), &trace, keep_alive, head_request)
                        .await
                }
            }
        }
        Next::Preflight => {
            let response = gateway.preflight();
            gateway.finish(&trace, response.status().as_u16());
            body.refuse(response, &trace, keep_alive, false).await
        }
        Next::Refuse(reject) => {
            gateway.finish(&trace, reject.status().as_u16());
            body.refuse(reject.into_response(), &trace, keep_alive, head_request)
                .await
        }
    };
    body.client.up = up;
    keep_alive
}

/// Writes the upstream's answer to the client as it arrives. Returns
/// whether the client connection may be kept.
async fn pass_on<IO>(
    body: &mut ClientBody<'_, IO>,
    answer: Answer,
    trace: &Trace,
    keep_alive: bool,
    deadline: &mut Deadline,
    idle: Duration,
) -> bool
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Answer {
        head,
        mut conn,
        request_complete,
    } = answer;
    let client = &mut *body.client;
    // An HTTP/1.0 client cannot take chunks: a body of unknown length is
    // sent until the connection closes.
    let out_framing = match head.framing {
        Framing::Chunked | Framing::UntilClose if client.http10 => Framing::UntilClose,
        Framing::Chunked | Framing::UntilClose => Framing::Chunked,
        other => other,
    };
    let keep = keep_alive
        && request_complete
        && body.decoder.is_done()
        && out_framing != Framing::UntilClose;
    client.out.clear();
    let connection = client.connection(keep);
    headers::write_client_response(
        &mut client.out,
        head.status,
        conn.fields.of(&conn.buf[..head.len]),
        out_framing,
        connection,
        trace.request_id.as_bytes(),
    );
    conn.buf.advance(head.len);
    let mut decoder = Decoder::new(head.framing);
    let chunked = out_framing == Framing::Chunked;
    let complete = loop {
        match decoder.decode(&mut conn.buf) {
            Ok(Decoded::Data(data)) if chunked => wire::encode_chunk(&mut client.out, &data),
            Ok(Decoded::Data(data)) => client.out.extend_from_slice(&data),
            Ok(Decoded::End) => break true,
            Ok(Decoded::NeedMore) => {
                if !client.flush_within(deadline, idle).await {
                    break false;
                }
                let read = deadline
                    .until(Instant::now() + idle, conn.read_more())
                    .await;
                let Some(read) = read else {
                    tracing::warn!("upstream response body stalled");
                    break false;
                };
                match read {
                    Ok(0) => match decoder.eof() {
                        Ok(()) => break true,
                        Err(e) => {
                            tracing::warn!(error = %e, "upstream response body cut short");
                            break false;
                        }
                    },
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "upstream response body failed");
                        break false;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream response body malformed");
                break false;
            }
        }
        if client.out.len() >= WRITE_BATCH && !client.flush_within(deadline, idle).await {
            break false;
        }
    };
    if !complete {
        // The head has gone out: the only honest signal left is to close
        // without the end of the body.
        client.flush_within(deadline, idle).await;
        return false;
    }
    if chunked {
        client.out.extend_from_slice(wire::LAST_CHUNK);
    }
    if !client.flush_within(deadline, idle).await {
        return false;
    }
    if head.keep_alive && request_complete {
        conn.release();
    }
    keep
}

impl<IO> Client<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn read_more(&mut self) -> std::io::Result<usize> {
        self.buf.reserve(8 * 1024);
        self.io.read_buf(&mut self.buf).await
    }

    /// The `Connection` header that says whether the connection stays open,
    /// in the terms of the request's HTTP version.
    fn connection(&self, keep: bool) -> Option<&'static str> {
        match (keep, self.http10) {
            (false, _) => Some("close"),
            (true, true) => Some("keep-alive"),
            (true, false) => None,
        }
    }

    /// Puts the head of one of keygate's own answers in the output.
    fn write_head(
        &mut self,
        status: StatusCode,
        headers: &HeaderMap,
        request_id: &[u8],
        framing: Framing,
        keep: bool,
    ) {
        let connection = self.connection(keep);
        headers::write_client_response(
            &mut self.out,
            status,
            headers::fields_of(headers),
            framing,
            connection,
            request_id,
        );
    }

    /// [`Client::flush`] that gives up when the client takes none of it for
    /// `idle` (nginx's `send_timeout`): a client that stops reading cannot
    /// hold the upstream connection. False when the output did not all go.
    async fn flush_within(&mut self, deadline: &mut Deadline, idle: Duration) -> bool {
        match deadline.until(Instant::now() + idle, self.flush()).await {
            Some(Ok(())) => true,
            Some(Err(_)) => false,
            None => {
                tracing::debug!("client stopped reading the response");
                false
            }
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let written = self.io.write_all(&self.out).await;
        self.out.clear();
        written
    }

    /// The next request head, whole within `timeout` of starting to wait
    /// for it (however the bytes trickle in).
    async fn read_head(
        &mut self,
        deadline: &mut Deadline,
        timeout: Duration,
        stopped: &mut watch::Receiver<bool>,
    ) -> Head {
        let at = Instant::now() + timeout;
        loop {
            if !self.buf.is_empty() {
                match wire::parse_request(&self.buf, &mut self.fields) {
                    Ok(Some(head)) => return Head::Request(head),
                    Ok(None) => {}
                    Err(e) => return Head::Bad(e),
                }
            }
            let idle = self.buf.is_empty();
            let read = tokio::select! {
                biased;
                read = deadline.until(at, self.read_more()) => read,
                _ = stopped.changed(), if idle => return Head::Gone,
            };
            match read {
                Some(Ok(0)) | Some(Err(_)) | None => return Head::Gone,
                Some(Ok(_)) => {}
            }
        }
    }

    /// One of keygate's own answers. The body is left out for HEAD.
    async fn answer(
        &mut self,
        response: Response<ProxyBody>,
        request_id: &[u8],
        close: bool,
        head_request: bool,
    ) {
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
        self.out.clear();
        self.write_head(parts.status, &parts.headers, request_id, framing, !close);
        if !head_request {
            self.out.extend_from_slice(&bytes);
        }
        let _ = self.flush().await;
    }

    /// 400, 431 or 501 for a request that could not be read; the
    /// connection closes after it.
    async fn answer_malformed(&mut self, gateway: &Gateway, info: &ConnInfo, error: WireError) {
        tracing::debug!(peer = %info.peer, error = %error, "malformed request");
        let body = format!(
            r#"{{"error":"Bad request","detail":"{}"}}"#,
            error.message()
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let request_id = gateway.request_ids.next();
        let request_id = request_id.as_bytes();
        self.out.clear();
        self.write_head(
            error.status(),
            &headers,
            request_id,
            Framing::Length(body.len() as u64),
            false,
        );
        self.out.extend_from_slice(body.as_bytes());
        let metrics = &gateway.metrics;
        metrics.observe(metrics.unmatched(), error.status().as_u16(), Duration::ZERO);
        let _ = self.flush().await;
    }
}

/// The request body as it comes from the client, cut off past the limit.
struct ClientBody<'a, IO> {
    client: &'a mut Client<IO>,
    decoder: Decoder,
    left: u64,
    /// `Expect: 100-continue` still to be answered before the body is read.
    send_continue: bool,
    /// The body broke its framing: nothing after it can be read.
    malformed: bool,
}

impl<IO> BodySource for ClientBody<'_, IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn next(&mut self) -> Result<Option<Bytes>, SourceError> {
        loop {
            let decoded = self.decoder.decode(&mut self.client.buf).map_err(|e| {
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
                        self.client
                            .io
                            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                            .await
                            .map_err(|_| SourceError::Aborted(WireError::Truncated))?;
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

impl<IO> ClientBody<'_, IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Answers a request that goes no further, then reads and drops its body
    /// (bounded) so the client can read the answer. Returns whether the
    /// connection may be kept.
    async fn refuse(
        &mut self,
        response: Response<ProxyBody>,
        trace: &Trace,
        keep_alive: bool,
        head_request: bool,
    ) -> bool {
        // A body that is not all here yet is drained, and the connection
        // closed after it; one that waits for `100 Continue` is never sent.
        let mut leftover = Decoder::new(Framing::Empty);
        std::mem::swap(&mut leftover, &mut self.decoder);
        let whole = drain_buffered(&mut leftover, &mut self.client.buf) == Some(true);
        let keep = keep_alive && whole;
        self.client
            .answer(response, trace.request_id.as_bytes(), !keep, head_request)
            .await;
        if !whole && !self.send_continue && !self.malformed {
            let limit = self.left.saturating_mul(2).max(DRAIN_MIN);
            let _ = tokio::time::timeout(DRAIN_TIME, self.drain(leftover, limit)).await;
        }
        keep
    }

    async fn drain(&mut self, mut decoder: Decoder, mut limit: u64) {
        while limit > 0 && drain_buffered(&mut decoder, &mut self.client.buf) == Some(false) {
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
