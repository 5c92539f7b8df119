//! The HTTP/2 side facing clients, served by hyper; each request goes
//! upstream as HTTP/1.1 through the same decision and pools as the
//! HTTP/1.1 side. [`watchdog`] holds the bounds hyper leaves to its user
//! (a stream whose client takes nothing, an idle connection); [`body`] the
//! bodies both ways, an upstream that stalls mid-body included. On a
//! graceful stop a connection gets GOAWAY and its open streams finish.

pub(crate) mod body;
mod watchdog;

use super::credentials::Authorization;
use super::gateway::{ClientRequest, ConnInfo, Decision, Forwarder, Gateway};
use super::live::WorkerGateway;
use super::reject::Reject;
use super::trace::{Trace, X_REQUEST_ID};
use super::upstream::UpstreamResponse;
use crate::clock::uptime_ms;
use crate::http1::{self, Field, Framing};
use body::{IncomingSource, OriginBody, ProxyBody};
use bytes::Buf;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use watchdog::{Open, STREAM, StreamExec, Streams, Watched};

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
    let mut trace = gateway.trace.begin(
        &parts.method,
        parts.headers.get(&X_REQUEST_ID).map(HeaderValue::as_bytes),
    );
    let framing = match body.size_hint().exact() {
        Some(0) if body.is_end_stream() && parts.method != Method::POST => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::Chunked,
    };
    let mut joined = Vec::new();
    let request = ClientRequest {
        method: &parts.method,
        path: parts.uri.path(),
        target: parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .as_bytes(),
        host: parts
            .headers
            .get(header::HOST)
            .map(HeaderValue::as_bytes)
            .or_else(|| parts.uri.authority().map(|a| a.as_str().as_bytes())),
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
        framing,
        fields: upstream_fields(&parts.headers, &mut joined),
    };
    let mut head = Vec::with_capacity(1024);
    let decision = gateway.decide(request, conn, &mut trace, &mut head).await;
    let mut response = match decision {
        Decision::Forward { route, pool } => {
            let forwarded = forward(
                gateway, forwarder, &parts, body, route, pool, framing, head, &trace,
            )
            .await;
            forwarded.unwrap_or_else(Reject::into_response)
        }
        Decision::Preflight => {
            body::discard(body, gateway.limits.max_body_bytes);
            gateway.preflight()
        }
        Decision::Refuse(reject) => {
            body::discard(body, gateway.limits.max_body_bytes);
            reject.into_response()
        }
    };
    response
        .headers_mut()
        .entry(X_REQUEST_ID.clone())
        .or_insert_with(|| trace.request_id.to_header_value());
    gateway.trace.finish(&trace, response.status().as_u16());
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

/// Sends a permitted HTTP/2 request upstream (its head already written,
/// in `head`); the response streams back.
#[allow(clippy::too_many_arguments)]
async fn forward(
    gateway: &Gateway,
    forwarder: &Forwarder,
    parts: &http::request::Parts,
    body: Incoming,
    route: usize,
    pool: usize,
    framing: Framing,
    mut head: Vec<u8>,
    trace: &Trace,
) -> Result<Response<ProxyBody>, Reject> {
    let limits = gateway.limits;
    let mut source = IncomingSource::new(body, limits.max_body_bytes);
    let sent = tokio::time::timeout(
        limits.upstream_response_timeout,
        forwarder.pools[pool].send(&mut head, framing, &mut source, &parts.method),
    )
    .await
    .ok();
    let UpstreamResponse {
        head,
        mut conn,
        request_complete,
    } = gateway.forwarded(route, sent)?;
    let headers = conn.fields.header_map(&conn.buf[..head.len]);
    conn.buf.advance(head.len);
    let Ok(mut headers) = headers else {
        tracing::warn!(route = %gateway.trace.label(route), "upstream sent a header HTTP/2 cannot carry");
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
}
