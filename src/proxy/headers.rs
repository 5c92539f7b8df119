//! Header rules for forwarded requests and returned responses: hop-by-hop
//! headers go, client-sent copies of the injected identity headers go (the
//! trusted values replace them), and `X-Forwarded-*` are set.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::sync::atomic::{AtomicU64, Ordering};

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Removes hop-by-hop headers, including any named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// What the gateway injects into a forwarded request.
pub struct Injected<'a> {
    pub user_header: &'a HeaderName,
    pub user_id: HeaderValue,
    pub key_header: &'a HeaderName,
    pub key_id: HeaderValue,
    pub forward_authorization: bool,
    /// The client's address, already rendered as a header value.
    pub client_ip: &'a HeaderValue,
    pub tls: bool,
    /// The client's `Host` (or HTTP/2 `:authority`).
    pub original_host: Option<HeaderValue>,
    /// What to send as `Host`.
    pub upstream_host: HeaderValue,
    pub request_id: HeaderValue,
}

/// Rewrites a client's headers for the upstream. Returns how many spoofed
/// identity headers were removed, so the caller can log and count them.
pub fn prepare_request(headers: &mut HeaderMap, inject: Injected<'_>) -> usize {
    strip_hop_by_hop(headers);
    headers.remove(header::EXPECT);
    let mut spoofed = 0;
    for name in [inject.user_header, inject.key_header] {
        if let header::Entry::Occupied(e) = headers.entry(name) {
            spoofed += e.remove_entry_mult().1.count();
        }
    }
    // CGI-style engines read `X_User_Id` as `X-User-Id`: drop look-alikes too.
    let lookalikes: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            n.as_str().contains('_')
                && [inject.user_header, inject.key_header]
                    .iter()
                    .any(|h| same_but_underscores(n.as_str(), h.as_str()))
        })
        .cloned()
        .collect();
    for name in lookalikes {
        if let header::Entry::Occupied(e) = headers.entry(name) {
            spoofed += e.remove_entry_mult().1.count();
        }
    }
    if !inject.forward_authorization {
        headers.remove(header::AUTHORIZATION);
    }
    headers.insert(inject.user_header.clone(), inject.user_id);
    headers.insert(inject.key_header.clone(), inject.key_id);
    let appended = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => {
            let ip = inject.client_ip.to_str().unwrap_or_default();
            HeaderValue::from_str(&format!("{prior}, {ip}")).ok()
        }
        _ => None,
    };
    headers.insert(
        X_FORWARDED_FOR.clone(),
        appended.unwrap_or_else(|| inject.client_ip.clone()),
    );
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if inject.tls { "https" } else { "http" }),
    );
    match inject.original_host {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
        None => headers.remove(&X_FORWARDED_HOST),
    };
    headers.insert(header::HOST, inject.upstream_host);
    headers.insert(X_REQUEST_ID.clone(), inject.request_id);
    spoofed
}

/// Equal once `_` is read as `-` (header names are already lower case).
fn same_but_underscores(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .all(|(x, y)| x == y || (x == b'_' && y == b'-') || (x == b'-' && y == b'_'))
}

/// A client's `X-Request-Id` is kept if it is short and plain.
pub fn sane_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
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
    pub fn next(&self) -> HeaderValue {
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
        HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("-"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static CLIENT: HeaderValue = HeaderValue::from_static("10.0.0.9");

    fn inject<'a>(user: &'a HeaderName, key: &'a HeaderName, fwd_auth: bool) -> Injected<'a> {
        Injected {
            user_header: user,
            user_id: HeaderValue::from_static("user_1"),
            key_header: key,
            key_id: HeaderValue::from_static("key_1"),
            forward_authorization: fwd_auth,
            client_ip: &CLIENT,
            tls: false,
            original_host: Some(HeaderValue::from_static("gw.example")),
            upstream_host: HeaderValue::from_static("127.0.0.1:3000"),
            request_id: HeaderValue::from_static("rid-1"),
        }
    }

    #[test]
    fn spoofed_identity_headers_are_replaced() {
        let user = HeaderName::from_static("x-user-id");
        let key = HeaderName::from_static("x-api-key-id");
        let mut h = HeaderMap::new();
        h.append("x-user-id", HeaderValue::from_static("admin"));
        h.append("x-user-id", HeaderValue::from_static("root"));
        h.insert("x-api-key-id", HeaderValue::from_static("forged"));
        h.insert("x_user_id", HeaderValue::from_static("cgi-admin"));
        h.insert("x-api_key-id", HeaderValue::from_static("forged"));
        h.insert("x_other", HeaderValue::from_static("kept"));
        let removed = prepare_request(&mut h, inject(&user, &key, false));
        assert_eq!(removed, 5);
        assert!(!h.contains_key("x_user_id") && !h.contains_key("x-api_key-id"));
        assert_eq!(h["x_other"], "kept");
        assert_eq!(h.get_all("x-user-id").iter().count(), 1);
        assert_eq!(h["x-user-id"], "user_1");
        assert_eq!(h["x-api-key-id"], "key_1");
    }

    #[test]
    fn authorization_is_dropped_unless_asked_for() {
        let user = HeaderName::from_static("x-user-id");
        let key = HeaderName::from_static("x-api-key-id");
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer wfb_x"),
        );
        prepare_request(&mut h, inject(&user, &key, false));
        assert!(!h.contains_key(header::AUTHORIZATION));
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer wfb_x"),
        );
        prepare_request(&mut h, inject(&user, &key, true));
        assert!(h.contains_key(header::AUTHORIZATION));
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarded_headers_are_set_and_appended() {
        let user = HeaderName::from_static("x-user-id");
        let key = HeaderName::from_static("x-api-key-id");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        h.insert(header::HOST, HeaderValue::from_static("gw.example"));
        prepare_request(&mut h, inject(&user, &key, false));
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "gw.example");
        assert_eq!(h[header::HOST], "127.0.0.1:3000");
        assert_eq!(h["x-request-id"], "rid-1");
    }

    #[test]
    fn request_ids_are_screened() {
        assert!(sane_request_id(&HeaderValue::from_static("abc-123_x.y")));
        assert!(!sane_request_id(&HeaderValue::from_static("has space")));
        assert!(!sane_request_id(&HeaderValue::from_static("")));
        let long = "a".repeat(129);
        assert!(!sane_request_id(&HeaderValue::from_str(&long).unwrap()));
    }

    #[test]
    fn request_ids_differ() {
        let ids = RequestIds::default();
        assert_ne!(ids.next(), ids.next());
    }
}
