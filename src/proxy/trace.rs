//! What is known of a request for the metrics and the access log
//! ([`Trace`], written out by [`Tracer::finish`]), and its id: the client's
//! `X-Request-Id` when it is short and plain, else one of keygate's own,
//! kept inline (no allocation per request).

use crate::auth::Principal;
use crate::metrics::{self, Metrics};
use http::Method;
use http::header::{HeaderName, HeaderValue};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// `Trace::route` of a request that matched no route.
pub(crate) const NO_ROUTE: usize = usize::MAX;

/// Per-request facts for the metrics and the access log.
pub(crate) struct Trace {
    /// Index of the route it matched, or [`NO_ROUTE`].
    pub(crate) route: usize,
    pub(crate) workflow: Option<String>,
    pub(crate) principal: Option<Arc<Principal>>,
    method: Method,
    pub(crate) started: Instant,
    /// Client headers left out of the forwarded request (`_` in the name,
    /// or on `headers.strip`).
    pub(crate) dropped: usize,
    pub(crate) request_id: RequestId,
}

/// Counts requests and writes their access log lines.
pub(crate) struct Tracer {
    metrics: Arc<Metrics>,
    /// Per route: its label, and the metrics slot its requests count in.
    routes: Vec<(String, usize)>,
    access_log: bool,
    ids: RequestIds,
}

impl Tracer {
    /// A tracer for routes labelled `labels`, each given a metrics slot.
    pub(crate) fn new<'a>(
        metrics: Arc<Metrics>,
        labels: impl Iterator<Item = &'a str>,
        access_log: bool,
    ) -> Result<Tracer, String> {
        let routes = labels
            .map(|label| Ok((label.to_owned(), metrics.register(label)?)))
            .collect::<Result<_, String>>()?;
        Ok(Tracer {
            metrics,
            routes,
            access_log,
            ids: RequestIds::default(),
        })
    }

    /// Whether the access log wants the workflow and key of each request.
    pub(crate) fn logs_access(&self) -> bool {
        self.access_log
    }

    /// A route's label for logs.
    pub(crate) fn label(&self, route: usize) -> &str {
        self.routes
            .get(route)
            .map_or("-", |(label, _)| label.as_str())
    }

    /// Starts a request's trace: its clock, and its request id (the
    /// client's `X-Request-Id` if it is plain, else a new one).
    pub(crate) fn begin(&self, method: &Method, client_id: Option<&[u8]>) -> Trace {
        let request_id = client_id
            .and_then(RequestId::from_client)
            .unwrap_or_else(|| self.ids.next());
        Trace {
            route: NO_ROUTE,
            workflow: None,
            principal: None,
            method: method.clone(),
            started: Instant::now(),
            dropped: 0,
            request_id,
        }
    }

    /// An id for an answer to a request that could not be read.
    pub(crate) fn next_id(&self) -> RequestId {
        self.ids.next()
    }

    /// Counts a request that matched no route (it could not be read).
    pub(crate) fn unmatched(&self, status: u16) {
        let metrics = &self.metrics;
        metrics.observe(metrics.unmatched(), status, std::time::Duration::ZERO);
    }

    /// Counts the request and writes its access log line.
    pub(crate) fn finish(&self, trace: &Trace, status: u16) {
        let elapsed = trace.started.elapsed();
        let slot = self
            .routes
            .get(trace.route)
            .map_or(self.metrics.unmatched(), |(_, slot)| *slot);
        self.metrics.observe(slot, status, elapsed);
        if self.access_log {
            // Microsecond resolution is all a latency needs.
            let latency_ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3;
            tracing::info!(
                target: "keygate::access",
                method = %trace.method,
                route = self.label(trace.route),
                workflow = trace.workflow.as_deref().unwrap_or("-"),
                outcome = metrics::OUTCOMES[metrics::outcome_index(status)],
                status,
                latency_ms,
                request_id = trace.request_id.as_str(),
                key = trace.principal.as_ref().map_or("-", |p| p.prefix()),
                dropped_headers = trace.dropped,
            );
        }
    }
}

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest `X-Request-Id` kept from a client.
const REQUEST_ID_MAX: usize = 128;

/// A request's id, the client's or one of ours, kept inline: no allocation
/// per request.
#[derive(Clone)]
pub struct RequestId {
    len: u8,
    bytes: [u8; REQUEST_ID_MAX],
}

impl RequestId {
    /// The client's id, if it is short and plain.
    pub fn from_client(id: &[u8]) -> Option<RequestId> {
        sane_request_id(id).then(|| RequestId::new(id))
    }

    fn new(id: &[u8]) -> RequestId {
        let mut bytes = [0u8; REQUEST_ID_MAX];
        bytes[..id.len()].copy_from_slice(id);
        RequestId {
            len: id.len() as u8,
            bytes,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Ids are plain ASCII by construction.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("-")
    }

    pub fn to_header_value(&self) -> HeaderValue {
        HeaderValue::from_bytes(self.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static("-"))
    }
}

/// A client's `X-Request-Id` is kept if it is short and plain.
pub fn sane_request_id(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes.len() <= REQUEST_ID_MAX
        && bytes.iter().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'+' | b'=')
        })
}

/// Request ids for requests that bring none: a random per-process part and
/// a counter, unique without a syscall per request.
pub struct RequestIds {
    base: u64,
    counter: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> RequestIds {
        RequestIds {
            base: getrandom::u64().unwrap_or(0),
            counter: AtomicU64::new(0),
        }
    }
}

impl RequestIds {
    /// The process's part, then the counter's low 32 bits: 24 hex digits.
    pub fn next(&self) -> RequestId {
        let n = self.counter.fetch_add(1, Ordering::Relaxed) as u32;
        let mut raw = [0u8; 12];
        raw[..8].copy_from_slice(&self.base.to_be_bytes());
        raw[8..].copy_from_slice(&n.to_be_bytes());
        let mut id = [0u8; 24];
        // 12 bytes always fit 24 digits.
        let _ = hex::encode_to_slice(raw, &mut id);
        RequestId::new(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_screened() {
        assert!(sane_request_id(b"abc-123_x.y"));
        assert!(!sane_request_id(b"has space"));
        assert!(!sane_request_id(b""));
        assert!(!sane_request_id("a".repeat(129).as_bytes()));
    }
}
