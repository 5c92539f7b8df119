//! The HTTP/2 side facing clients, served by hyper; each request goes
//! upstream as HTTP/1.1 through the same checks and pools as the HTTP/1.1
//! side.
//!
//! hyper leaves three bounds to its user, which this module sets:
//! - a stream whose client takes none of its answer (a flow-control
//!   window kept at 0) for `limits.send_timeout` is reset and its upstream
//!   connection dropped: each stream runs under a watchdog that sees when
//!   hyper last asked the body for data ([`StreamExec`]);
//! - an upstream that sends none of a body for
//!   `limits.upstream_response_timeout` ends the stream (in [`OriginBody`]);
//! - a connection with no open stream for `limits.h2_idle_timeout` is
//!   closed with GOAWAY, however many PINGs it answers.
//!
//! On a graceful stop a connection gets GOAWAY and its open streams finish.

use super::body::{IncomingSource, OriginBody, ProxyBody};
use super::reject::Reject;
use super::trace::X_REQUEST_ID;
use super::upstream::Answer;
use super::{Authorization, Checked, ConnInfo, Facts, Forwarder, Gateway, Upstreamed};
use super::{Trace, WorkerGateway};
use crate::clock::uptime_ms;
use crate::http1::{self, Field, Framing};
use bytes::{Buf, Bytes};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, watch};

tokio::task_local! {
    /// The progress of the stream whose task this is (see [`StreamExec`]).
    static STREAM: Arc<Progress>;
}

/// When hyper last handed a stream's answer data it has not yet asked
/// past: milliseconds since `start` + 1, or 0 while hyper is asking for
/// more (or the answer has not started).
pub struct Progress {
    start: tokio::time::Instant,
    handed: AtomicU64,
    wake: Notify,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            start: tokio::time::Instant::now(),
            handed: AtomicU64::new(0),
            wake: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The client has something of the answer to take.
    fn handed(&self) {
        self.handed.store(self.now() + 1, Ordering::Release);
        self.wake.notify_one();
    }

    /// hyper asks for more: the client took what it had.
    fn asked(&self) {
        self.handed.store(0, Ordering::Release);
    }

    /// Resolves once something was handed and not asked past for `timeout`.
    async fn stalled(&self, timeout: Duration) {
        let timeout = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            let handed = self.handed.load(Ordering::Acquire);
            if handed == 0 {
                self.wake.notified().await;
                continue;
            }
            let due = (handed - 1).saturating_add(timeout);
            let now = self.now();
            if now >= due {
                if self.handed.load(Ordering::Acquire) == handed {
                    return;
                }
                continue;
            }
            tokio::time::sleep(Duration::from_millis(due - now)).await;
        }
    }
}

/// Spawns hyper's per-stream tasks, each under a watchdog: a stream that
/// holds an answer its client takes none of for `send_timeout` is dropped,
/// which resets it (RST_STREAM CANCEL) and drops its upstream connection.
#[derive(Clone)]
pub struct StreamExec {
    send_timeout: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        let progress = Arc::new(Progress::new());
        let timeout = self.send_timeout;
        tokio::spawn(STREAM.scope(progress.clone(), async move {
            tokio::select! {
                biased;
                () = stream => {}
                () = progress.stalled(timeout) => {
                    tracing::debug!("HTTP/2 client took none of its answer in time; stream reset");
                }
            }
        }));
    }
}

/// Streams open on one connection, and since when it has had none.
#[derive(Default)]
struct Streams {
    open: AtomicUsize,
    /// Uptime milliseconds when the last stream closed (or the connection
    /// opened).
    idle_since: AtomicU64,
}

/// One open stream, counted until its answer is done.
struct Open(Arc<Streams>);

impl Open {
    fn new(streams: &Arc<Streams>) -> Open {
        streams.open.fetch_add(1, Ordering::AcqRel);
        Open(streams.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.idle_since.store(uptime_ms(), Ordering::Release);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body, seen by the stream's watchdog and counted as an open
/// stream until hyper drops it.
pub struct Watched {
    body: ProxyBody,
    progress: Option<Arc<Progress>>,
    _open: Open,
}

impl Body for Watched {
    type Data = Bytes;
    type Error = super::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(p) = &this.progress {
            p.asked();
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(_))), Some(p)) = (&polled, &this.progress) {
            p.handed();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves one HTTP/2 connection until it closes, goes idle, or the gateway
/// stops (then with GOAWAY, letting open streams finish).
pub async fn serve<IO>(
    worker: Arc<WorkerGateway>,
    info: ConnInfo,
    io: IO,
    mut stopped: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = worker.snapshot().gateway.limits;
    let streams = Arc::new(Streams::default());
    streams.idle_since.store(uptime_ms(), Ordering::Release);
    let mut h2 = hyper::server::conn::http2::Builder::new(StreamExec {
        send_timeout: limits.send_timeout,
    });
    // Peers that vanish are found by PING; one connection may not hold
    // more than a bounded number of requests at once.
    h2.timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let peer = info.peer;
    let counted = streams.clone();
    let service = service_fn(move |request| {
        let open = Open::new(&counted);
        let current = worker.snapshot();
        let info = info.clone();
        async move {
            let response = handle(&current.gateway, &current.forwarder, &info, request).await;
            let progress = STREAM.try_with(Arc::clone).ok();
            if let Some(p) = &progress {
                // The head goes out now: from here the client is to take it.
                p.handed();
            }
            Ok::<_, Infallible>(response.map(|body| Watched {
                body,
                progress,
                _open: open,
            }))
        }
    });
    let connection = h2.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let idle = limits.h2_idle_timeout;
    let mut closing = false;
    loop {
        let next_check = tokio::time::Instant::now() + idle;
        tokio::select! {
            done = connection.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(%peer, error = %e, "HTTP/2 connection ended with an error");
                }
                return;
            }
            _ = stopped.changed(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            () = tokio::time::sleep_until(next_check), if !closing => {
                let quiet = uptime_ms().saturating_sub(streams.idle_since.load(Ordering::Acquire));
                if streams.open.load(Ordering::Acquire) == 0
                    && u128::from(quiet) >= idle.as_millis()
                {
                    tracing::debug!(%peer, "idle HTTP/2 connection closed");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// Answers one HTTP/2 request; never fails (every error becomes a
/// response).
pub async fn handle(
    gateway: &Gateway,
    forwarder: &Forwarder,
    conn: &ConnInfo,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let (parts, body) = request.into_parts();
    let mut trace = gateway.begin(
        &parts.method,
        parts.headers.get(&X_REQUEST_ID).map(HeaderValue::as_bytes),
    );
    let facts = Facts {
        method: &parts.method,
        path: parts.uri.path(),
        authorization: Authorization::of(
            parts
                .headers
                .get_all(header::AUTHORIZATION)
                .iter()
                .map(HeaderValue::as_bytes),
        ),
        content_length: http1::content_length(http1::fields_of(&parts.headers))
            .ok()
            .flatten(),
    };
    let mut response = match gateway.check(&facts, conn, &mut trace).await {
        Ok(Checked::Forward { route, principal }) => {
            let forwarded = forward(
                gateway, forwarder, conn, &parts, body, route, &principal, &mut trace,
            )
            .await;
            match forwarded {
                Ok(response) => response,
                Err(reject) => reject.into_response(),
            }
        }
        Ok(Checked::Preflight) => {
            super::body::discard(body, gateway.limits.max_body_bytes);
            gateway.preflight()
        }
        Err(reject) => {
            super::body::discard(body, gateway.limits.max_body_bytes);
            gateway.refused(&reject, conn, &trace);
            reject.into_response()
        }
    };
    response
        .headers_mut()
        .entry(X_REQUEST_ID.clone())
        .or_insert_with(|| trace.request_id.to_header_value());
    gateway.finish(&trace, response.status().as_u16());
    response
}

/// The request's fields as the HTTP/1.1 upstream is to see them: HTTP/2
/// may split `cookie` into several fields, which go upstream joined with
/// `; ` (RFC 9113 §8.2.3), since HTTP/1.1 allows only one.
fn upstream_fields<'a>(
    headers: &'a http::HeaderMap,
    joined: &'a mut Vec<u8>,
) -> impl Iterator<Item = Field<'a>> + Clone {
    let several = headers.get_all(header::COOKIE).iter().nth(1).is_some();
    if several {
        for (i, cookie) in headers.get_all(header::COOKIE).iter().enumerate() {
            if i > 0 {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(cookie.as_bytes());
        }
    }
    let joined: &'a [u8] = joined;
    let mut fields: Vec<Field<'a>> = headers
        .iter()
        .filter(|(name, _)| !several || *name != header::COOKIE)
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
        .collect();
    if several {
        fields.push((b"cookie", joined));
    }
    fields.into_iter()
}

/// Sends a permitted HTTP/2 request upstream; the response streams back.
#[allow(clippy::too_many_arguments)]
async fn forward(
    gateway: &Gateway,
    forwarder: &Forwarder,
    conn: &ConnInfo,
    parts: &http::request::Parts,
    body: Incoming,
    route: usize,
    principal: &crate::auth::Principal,
    trace: &mut Trace,
) -> Result<Response<ProxyBody>, Reject> {
    let framing = match body.size_hint().exact() {
        Some(0) if body.is_end_stream() && parts.method != Method::POST => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::Chunked,
    };
    let original_host = parts
        .headers
        .get(header::HOST)
        .map(HeaderValue::as_bytes)
        .or_else(|| parts.uri.authority().map(|a| a.as_str().as_bytes()));
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut head = Vec::with_capacity(1024);
    let mut joined = Vec::new();
    let pool = gateway.upstream_head(
        &mut head,
        Upstreamed {
            conn,
            method: &parts.method,
            target: target.as_bytes(),
            original_host,
            route,
            principal,
            framing,
        },
        upstream_fields(&parts.headers, &mut joined),
        trace,
    )?;
    let limits = gateway.limits;
    let mut source = IncomingSource::new(body, limits.max_body_bytes);
    let sent = tokio::time::timeout(
        limits.upstream_response_timeout,
        forwarder.pools[pool].send(&mut head, framing, &mut source, &parts.method),
    )
    .await
    .ok();
    let Answer {
        head,
        mut conn,
        request_complete,
    } = gateway.forward_outcome(route, sent)?;
    let headers = conn.fields.header_map(&conn.buf[..head.len]);
    conn.buf.advance(head.len);
    let Ok(mut headers) = headers else {
        tracing::warn!(route = %gateway.route_label(route), "upstream sent a header HTTP/2 cannot carry");
        return Err(Reject::BadGateway);
    };
    headers
        .entry(X_REQUEST_ID.clone())
        .or_insert_with(|| trace.request_id.to_header_value());
    // The length is keygate's own: the body's for a body, the declared
    // one for a bodiless answer to HEAD, none for 204 and 304.
    let length = match head.framing {
        Framing::Length(n) => Some(n),
        Framing::Empty
            if head.status != StatusCode::NO_CONTENT && head.status != StatusCode::NOT_MODIFIED =>
        {
            head.content_length
        }
        _ => None,
    };
    if let Some(n) = length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    let reusable = head.keep_alive && request_complete;
    let body = OriginBody::new(
        conn,
        head.framing,
        reusable,
        limits.upstream_response_timeout,
        limits.max_header_bytes,
    );
    let mut response = Response::new(ProxyBody::Upstream(body));
    *response.status_mut() = head.status;
    *response.headers_mut() = headers;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cookies_go_upstream_joined() {
        let mut map = http::HeaderMap::new();
        map.append(header::COOKIE, HeaderValue::from_static("a=1"));
        map.append("x-other", HeaderValue::from_static("y"));
        map.append(header::COOKIE, HeaderValue::from_static("b=2"));
        let mut joined = Vec::new();
        let fields: Vec<_> = upstream_fields(&map, &mut joined).collect();
        let cookies: Vec<_> = fields.iter().filter(|(n, _)| *n == b"cookie").collect();
        assert_eq!(cookies, [&(&b"cookie"[..], &b"a=1; b=2"[..])]);
        assert!(fields.contains(&(&b"x-other"[..], &b"y"[..])));

        let mut one = http::HeaderMap::new();
        one.append(header::COOKIE, HeaderValue::from_static("a=1"));
        let mut joined = Vec::new();
        let fields: Vec<_> = upstream_fields(&one, &mut joined).collect();
        assert_eq!(fields, [(&b"cookie"[..], &b"a=1"[..])]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_is_seen_only_while_an_answer_waits_untaken() {
        let progress = Arc::new(Progress::new());
        let timeout = Duration::from_secs(2);
        // Nothing handed yet: no stall however long it takes.
        let watch = tokio::spawn({
            let p = progress.clone();
            async move { p.stalled(timeout).await }
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!watch.is_finished());
        progress.handed();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        progress.asked();
        progress.handed();
        assert!(!watch.is_finished());
        watch.await.unwrap();
    }
}
