//! Passing the upstream's answer on to the client as it arrives, in as
//! few writes as the bodies allow, re-framed for the client's version.

use super::answer;
use super::body::ClientBody;
use super::deadline::Deadline;
use super::io::ClientIo;
use crate::http1::{self, Decoded, Decoder, Framing};
use crate::proxy::trace::Trace;
use crate::proxy::upstream::{UpstreamResponse, WRITE_BATCH};
use bytes::Buf;
use std::time::Duration;
use tokio::time::Instant;

/// Writes the upstream's answer to the client as it arrives. Returns
/// whether the client connection may be kept.
pub(super) async fn pass_on<IO: ClientIo>(
    body: &mut ClientBody<'_, IO>,
    answer: UpstreamResponse,
    trace: &Trace,
    keep_alive: bool,
    deadline: &mut Deadline,
    idle: Duration,
) -> bool {
    let UpstreamResponse {
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
