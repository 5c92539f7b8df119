//! The HTTP/1.1 side facing clients. One task per connection reads a request
//! head, asks the gateway's decision, and drives the upstream exchange
//! itself: the request goes upstream and the answer comes back in as few
//! writes as the bodies allow, with no task or channel in between (README,
//! "Performance"); HTTP/2 stays with hyper.
//!
//! - [`downstream`]: the client's side of the connection, every read and
//!   write on it bounded (`send_timeout` for writes);
//! - [`buffers`]: taken only while there are bytes to read or write;
//! - [`body`]: the request body, and a refused one drained;
//! - [`pass`]: the upstream's answer passed on;
//! - [`answer`]: the head the client gets;
//! - [`deadline`], [`io`]: the connection's timer, and its stream.

mod answer;
mod body;
mod buffers;
mod deadline;
mod downstream;
mod io;
mod pass;

pub(crate) use io::{ClientIo, READ_CHUNK, read_more};

use super::credentials::Authorization;
use super::gateway::{ClientRequest, ConnInfo, Decision, Forwarder, Gateway};
use super::live::WorkerGateway;
use super::reject::Reject;
use crate::http1::{Decoder, RequestHead, WireError};
use body::ClientBody;
use buffers::Held;
use bytes::{Buf, Bytes};
use deadline::Deadline;
use downstream::Downstream;
use http::{Method, Version};
use pass::pass_on;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::Instant;

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
    let mut client = Downstream {
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
    client: &mut Downstream<IO>,
    deadline: &mut Deadline,
    head: RequestHead,
    stopped: &watch::Receiver<bool>,
) -> bool {
    client.http10 = head.version == Version::HTTP_10;
    let head_request = head.method == Method::HEAD;
    let mut up = std::mem::take(&mut client.bufs.up);
    up.clear();
    // Everything decided from the head, while it is still in the buffer.
    let (trace, decision) = {
        let bufs = &*client.bufs;
        let bytes = &bufs.buf[..head.len];
        let fields = || bufs.fields.of(bytes);
        let find = |name: &[u8]| {
            fields()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        };
        let mut trace = gateway.trace.begin(&head.method, find(b"x-request-id"));
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
        let request = ClientRequest {
            method: &head.method,
            path: target.split('?').next().unwrap_or(target),
            target: target.as_bytes(),
            host: find(b"host").or_else(|| {
                absolute
                    .as_ref()
                    .and_then(|u| u.authority())
                    .map(|a| a.as_str().as_bytes())
            }),
            authorization: Authorization::of(
                fields()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(b"authorization"))
                    .map(|(_, v)| v),
            ),
            content_length: head.content_length,
            framing: head.framing,
            fields: fields(),
        };
        let decision = gateway.decide(request, info, &mut trace, &mut up).await;
        (trace, decision)
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
    let keep = |client: &mut Downstream<IO>| {
        head.keep_alive && (!*stopped.borrow() || client.next_head_buffered())
    };
    // Either the upstream's answer, or keygate's own: a refusal or a
    // preflight's.
    let outcome = match decision {
        Decision::Forward { route, pool } => {
            let sent = deadline
                .until(
                    Instant::now() + gateway.limits.upstream_response_timeout,
                    forwarder.pools[pool].send(&mut up, head.framing, &mut body, &head.method),
                )
                .await;
            gateway
                .forwarded(route, sent)
                .map_err(Reject::into_response)
        }
        Decision::Preflight => Err(gateway.preflight()),
        Decision::Refuse(reject) => Err(reject.into_response()),
    };
    // The request is counted before its answer's head goes out, so a client
    // that has read the answer also sees it in the metrics.
    let keep_alive = match outcome {
        Ok(response) => {
            gateway.trace.finish(&trace, response.head.status.as_u16());
            let keep = keep(body.client);
            let idle = gateway.limits.upstream_response_timeout;
            pass_on(&mut body, response, &trace, keep, deadline, idle).await
        }
        Err(answer) => {
            gateway.trace.finish(&trace, answer.status().as_u16());
            body.refuse(answer, &trace, &keep, head_request, deadline)
                .await
        }
    };
    body.client.bufs.up = up;
    keep_alive
}
