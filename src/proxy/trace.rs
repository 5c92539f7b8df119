//! Request ids: the client's `X-Request-Id` when it is short and plain,
//! else one of keygate's own, kept inline (no allocation per request).

use http::header::{HeaderName, HeaderValue};
use std::sync::atomic::{AtomicU64, Ordering};

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
    pub fn next(&self) -> RequestId {
        use crate::key::HEX;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 24];
        for (i, byte) in id.iter_mut().enumerate() {
            let nibble = if i < 16 {
                self.base >> (60 - 4 * i)
            } else {
                n >> (28 - 4 * (i - 16))
            };
            *byte = HEX[(nibble & 0xf) as usize];
        }
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
