//! The HTTP/1.1 side facing clients. One task per connection reads a request
//! head, runs the gateway's checks, and drives the upstream exchange itself:
//! the request goes upstream and the answer comes back in as few writes as
//! the bodies allow, with no task or channel in between (README,
//! "Performance"); HTTP/2 stays with hyper.
//!
//! Every write to the client must make progress within
//! `limits.send_timeout`, so a client that stops reading cannot hold the
//! connection (or the upstream connection behind it). An idle keep-alive
//! connection holds no buffer: its buffers go back to a per-thread spare
//! list until the client sends again.

use super::reject::Reject;
use super::upstream::{Answer, BodySource, SourceError};
use super::{
    Authorization, Checked, ConnInfo, Facts, Forwarder, Gateway, Trace, Upstreamed, WorkerGateway,
    answer, body::ProxyBody,
};
use crate::http1::{self, Decoded, Decoder, Fields, Framing, RequestHead, WireError};
use bytes::{Buf, Bytes, BytesMut};
use http::header::HeaderMap;
use http::{Method, Response, StatusCode, Version};
use std::cell::RefCell;
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
/// What a connection reads into at a time.
const READ_CHUNK: usize = 8 * 1024;

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
fn now_or_never<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// The buffers a connection uses while it has a request to read or answer.
pub struct Buffers {
    /// What has been read from the client.
    pub buf: BytesMut,
    /// The output being put together.
    out: Vec<u8>,
    /// The head being sent upstream.
    up: Vec<u8>,
    /// Where the current request head's fields lie in `buf`.
    fields: Fields,
}

/// Spare buffer sets kept per worker thread: taken by a connection that
/// has bytes to read, given back when it goes idle, so idle connections
/// cost no buffer and busy ones no allocation.
const SPARE_SETS: usize = 256;
/// Buffers that grew past this are freed rather than kept spare.
const SPARE_MAX_BYTES: usize = 16 * 1024;

thread_local! {
    /// Boxed: a connection holds its set by the box, so taking one and
    /// giving it back moves a pointer and allocates nothing.
    #[allow(clippy::vec_box)]
    static SPARE: RefCell<Vec<Box<Buffers>>> = const { RefCell::new(Vec::new()) };
}

/// What a parked connection's buffers read as: empty.
static EMPTY: std::sync::LazyLock<Buffers> = std::sync::LazyLock::new(|| Buffers {
    buf: BytesMut::new(),
    out: Vec::new(),
    up: Vec::new(),
    fields: Fields::default(),
});

impl Buffers {
    /// A set from this thread's spares, or a new one.
    fn take() -> Box<Buffers> {
        SPARE
            .with(|spare| spare.borrow_mut().pop())
            .unwrap_or_else(|| {
                Box::new(Buffers {
                    buf: BytesMut::with_capacity(READ_CHUNK),
                    out: Vec::with_capacity(4 * 1024),
                    up: Vec::with_capacity(1024),
                    fields: Fields::default(),
                })
            })
    }

    /// Gives a set back to this thread's spares (what it holds is dropped).
    fn give_back(mut self: Box<Buffers>) {
        if self.out.capacity() > SPARE_MAX_BYTES
            || self.up.capacity() > SPARE_MAX_BYTES
            || self.buf.capacity() > SPARE_MAX_BYTES
        {
            return;
        }
        self.buf.clear();
        self.out.clear();
        self.up.clear();
        SPARE.with(|spare| {
            let mut spare = spare.borrow_mut();
            if spare.len() < SPARE_SETS {
                spare.push(self);
            }
        });
    }
}

/// A connection's buffers while it has them: none while it is idle (they
/// are with the spares, and read as empty); using them takes a set.
struct Held(Option<Box<Buffers>>);

impl std::ops::Deref for Held {
    type Target = Buffers;

    fn deref(&self) -> &Buffers {
        self.0.as_deref().unwrap_or(&EMPTY)
    }
}

impl std::ops::DerefMut for Held {
    fn deref_mut(&mut self) -> &mut Buffers {
        self.0.get_or_insert_with(Buffers::take)
    }
}

/// The client's connection: its stream and, while it is busy, its buffers.
pub struct Client<IO> {
    io: IO,
    bufs: Held,
    /// The request being answered is HTTP/1.0.
    http10: bool,
    /// No request has been read yet: the bytes may be the HTTP/2 preface.
    first: bool,
    /// Bound on every write to the client.
    send_timeout: Duration,
    max_head: usize,
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
    fn until<F: Future>(&mut self, at: Instant, future: F) -> Until<'_, F> {
        self.at = at;
        if self.sleep.deadline() > self.at {
            self.sleep.as_mut().reset(self.at);
        }
        Until {
            future,
            deadline: self,
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Deadline::until`]: a future and the connection's timer, in one
    /// small state (an `async fn` would keep the future twice).
    struct Until<'a, F> {
        #[pin]
        future: F,
        deadline: &'a mut Deadline,
    }
}

impl<F: Future> Future for Until<'_, F> {
    type Output = Option<F::Output>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = self.project();
        if let Poll::Ready(out) = this.future.poll(cx) {
            return Poll::Ready(Some(out));
        }
        let deadline = this.deadline;
        loop {
            match deadline.sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if Instant::now() >= deadline.at => return Poll::Ready(None),
                Poll::Ready(()) => {
                    let at = deadline.at;
                    deadline.sleep.as_mut().reset(at);
                }
            }
        }
    }
}

enum Head {
    Request(RequestHead),
    Bad(WireError),
    /// The connection opened with the HTTP/2 preface (prior knowledge).
    Http2,
    /// Closed, timed out or shutting down: nothing more to answer.
    Gone,
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection that turned out to speak HTTP/2: its stream, and what has
/// been read from it (the preface and whatever followed).
pub struct Http2<IO> {
    pub io: IO,
    pub read: Bytes,
}

/// Serves requests on one connection until it closes, fails, or the
/// gateway stops. Each request is served by the gateway current when its
/// head arrives (a reload takes effect on the next request). A connection
/// that opens with the HTTP/2 preface is handed back, for HTTP/2.
pub async fn serve<IO: ClientIo>(
    worker: &WorkerGateway,
    info: &ConnInfo,
    io: IO,
    mut stopped: watch::Receiver<bool>,
) -> Option<Http2<IO>> {
    let mut current = worker.snapshot();
    let mut client = Client {
        io,
        bufs: Held(None),
        http10: false,
        first: true,
        send_timeout: current.gateway.limits.send_timeout,
        max_head: current.gateway.limits.max_header_bytes,
    };
    let mut deadline = Deadline::new();
    loop {
        if !worker.is_current(current.generation) {
            current = worker.snapshot();
        }
        client.follow(&current.gateway.limits);
        let limits = current.gateway.limits;
        let head = match client
            .read_head(&mut deadline, limits.header_read_timeout, &mut stopped)
            .await
        {
            Head::Request(head) => head,
            Head::Gone => break,
            Head::Bad(e) => {
                Box::pin(client.answer_malformed(&current.gateway, info, e, &mut deadline)).await;
                break;
            }
            Head::Http2 => {
                let read = std::mem::take(&mut client.bufs.buf).freeze();
                client.park();
                return Some(Http2 {
                    io: client.io,
                    read,
                });
            }
        };
        client.first = false;
        // A reload while the head was on its way applies to it.
        if !worker.is_current(current.generation) {
            current = worker.snapshot();
            client.follow(&current.gateway.limits);
        }
        // Boxed, so an idle connection's task holds only the small state
        // of waiting for the next head.
        let fut = exchange(
            &current.gateway,
            &current.forwarder,
            info,
            &mut client,
            &mut deadline,
            head,
            &stopped,
        );
        let keep_alive = Box::pin(fut).await;
        if !keep_alive {
            break;
        }
    }
    let _ = Box::pin(tokio::time::timeout(
        client.send_timeout,
        client.io.shutdown(),
    ))
    .await;
    client.park();
    None
}

/// Answers one request; returns whether the connection may carry another.
async fn exchange<IO: ClientIo>(
    gateway: &Gateway,
    forwarder: &Forwarder,
    info: &ConnInfo,
    client: &mut Client<IO>,
    deadline: &mut Deadline,
    head: RequestHead,
    stopped: &watch::Receiver<bool>,
) -> bool {
    client.http10 = head.version == Version::HTTP_10;
    let head_request = head.method == Method::HEAD;
    let mut up = std::mem::take(&mut client.bufs.up);
    up.clear();
    // Everything decided from the head, while it is still in the buffer.
    let (trace, next) = {
        let bufs = &*client.bufs;
        let bytes = &bufs.buf[..head.len];
        let fields = || bufs.fields.of(bytes);
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
                    framing: head.framing,
                };
                match gateway.upstream_head(&mut up, up_head, fields(), &mut trace) {
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
    client.bufs.buf.advance(head.len);
    let mut body = ClientBody {
        decoder: Decoder::new(head.framing, client.max_head),
        left: gateway.limits.max_body_bytes,
        send_continue: head.expect_continue,
        malformed: false,
        client,
    };
    // While the gateway drains, an answer keeps the connection only for a
    // request that has already arrived whole; the last one says close.
    let keep = |client: &mut Client<IO>| {
        head.keep_alive && (!*stopped.borrow() || client.next_head_buffered())
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
                    let keep = keep(body.client);
                    let idle = gateway.limits.upstream_response_timeout;
                    pass_on(&mut body, answer, &trace, keep, deadline, idle).await
                }
                Err(reject) => {
                    gateway.finish(&trace, reject.status().as_u16());
                    body.refuse(
                        reject.into_response(),
                        &trace,
                        &keep,
                        head_request,
                        deadline,
                    )
                    .await
                }
            }
        }
        Next::Preflight => {
            let response = gateway.preflight();
            gateway.finish(&trace, response.status().as_u16());
            body.refuse(response, &trace, &keep, false, deadline).await
        }
        Next::Refuse(reject) => {
            gateway.finish(&trace, reject.status().as_u16());
            body.refuse(
                reject.into_response(),
                &trace,
                &keep,
                head_request,
                deadline,
            )
            .await
        }
    };
    body.client.bufs.up = up;
    keep_alive
}

/// Writes the upstream's answer to the client as it arrives. Returns
/// whether the client connection may be kept.
async fn pass_on<IO: ClientIo>(
    body: &mut ClientBody<'_, IO>,
    answer: Answer,
    trace: &Trace,
    keep_alive: bool,
    deadline: &mut Deadline,
    idle: Duration,
) -> bool {
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
    client.bufs.out.clear();
    let connection = client.connection(keep);
    answer::write_client_response(
        &mut client.bufs.out,
        head.status,
        conn.fields.of(&conn.buf[..head.len]),
        answer::Body {
            framing: out_framing,
            declared: head.content_length,
        },
        connection,
        trace.request_id.as_bytes(),
    );
    conn.buf.advance(head.len);
    let mut decoder = Decoder::new(head.framing, client.max_head);
    let chunked = out_framing == Framing::Chunked;
    let complete = loop {
        match decoder.decode(&mut conn.buf) {
            Ok(Decoded::Data(data)) if chunked => http1::encode_chunk(&mut client.bufs.out, &data),
            Ok(Decoded::Data(data)) => client.bufs.out.extend_from_slice(&data),
            Ok(Decoded::End) => break true,
            Ok(Decoded::NeedMore) => {
                if !client.flush(deadline).await {
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
        if client.bufs.out.len() >= WRITE_BATCH && !client.flush(deadline).await {
            break false;
        }
    };
    if !complete {
        // The head has gone out: the only honest signal left is to close
        // without the end of the body.
        client.flush(deadline).await;
        return false;
    }
    if chunked {
        client.bufs.out.extend_from_slice(http1::LAST_CHUNK);
    }
    if !client.flush(deadline).await {
        return false;
    }
    if head.keep_alive && request_complete {
        conn.release();
    }
    keep
}

impl<IO: ClientIo> Client<IO> {
    /// Takes the limits the connection's own reads and writes keep to.
    fn follow(&mut self, limits: &crate::config::Limits) {
        self.send_timeout = limits.send_timeout;
        self.max_head = limits.max_header_bytes;
    }

    async fn read_more(&mut self) -> std::io::Result<usize> {
        let buf = &mut self.bufs.buf;
        buf.reserve(READ_CHUNK);
        self.io.read_buf(buf).await
    }

    /// Gives the buffers back to the spares while there is nothing in them.
    fn park(&mut self) {
        if self.bufs.0.as_ref().is_some_and(|b| b.buf.is_empty())
            && let Some(bufs) = self.bufs.0.take()
        {
            bufs.give_back();
        }
    }

    /// Whether a whole request head is already waiting in the buffer.
    fn next_head_buffered(&mut self) -> bool {
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
    async fn flush(&mut self, deadline: &mut Deadline) -> bool {
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
    async fn read_head(
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
                    Some(Ok(0)) | Some(Err(_)) => return Head::Gone,
                    Some(Ok(_)) | None => continue,
                }
            }
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
    async fn answer_malformed(
        &mut self,
        gateway: &Gateway,
        info: &ConnInfo,
        error: WireError,
        deadline: &mut Deadline,
    ) {
        tracing::debug!(peer = %info.peer, error = %error, "malformed request");
        let reject = Reject::Malformed(error);
        let status = reject.status().as_u16();
        let metrics = &gateway.metrics;
        metrics.observe(metrics.unmatched(), status, Duration::ZERO);
        let request_id = gateway.request_ids.next();
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
    async fn refuse(
        &mut self,
        response: Response<ProxyBody>,
        trace: &Trace,
        keep: &impl Fn(&mut Client<IO>) -> bool,
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
            let limit = self.left.saturating_mul(2).max(DRAIN_MIN);
            let _ = tokio::time::timeout(DRAIN_TIME, self.drain(leftover, limit)).await;
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
