//! Header rules for forwarded requests and returned responses: hop-by-hop
//! headers go, client-sent copies of the injected identity headers go (the
//! trusted values replace them), and `X-Forwarded-*` are set.
//!
//! The rules work on header fields as name and value bytes, so HTTP/1.1
//! heads are rewritten straight from the bytes they arrived in, and HTTP/2
//! header maps take the same rules.

use super::wire::{self, Framing};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1),
/// and `Upgrade`, which keygate does not carry out.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// One header field: name and value as they arrived.
pub type Field<'a> = (&'a [u8], &'a [u8]);

fn is(name: &[u8], lower: &str) -> bool {
    name.eq_ignore_ascii_case(lower.as_bytes())
}

/// The names a message's `Connection` fields list; they are hop-by-hop
/// too. Read from the fields when asked, so the usual message costs one
/// pass and no allocation.
pub struct Named<I> {
    fields: I,
    any: bool,
}

pub fn connection_named<'a, I>(fields: I) -> Named<I>
where
    I: Iterator<Item = Field<'a>> + Clone,
{
    let any = fields.clone().any(|(name, _)| is(name, "connection"));
    Named { fields, any }
}

impl<'a, I> Named<I>
where
    I: Iterator<Item = Field<'a>> + Clone,
{
    pub fn contains(&self, name: &[u8]) -> bool {
        self.any
            && self
                .fields
                .clone()
                .filter(|(n, _)| is(n, "connection"))
                .flat_map(|(_, value)| value.split(|b| *b == b','))
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(name))
    }

    /// Whether a field belongs to one connection only, by name.
    pub fn is_hop_by_hop(&self, name: &[u8]) -> bool {
        HOP_BY_HOP.iter().any(|h| is(name, h)) || self.contains(name)
    }
}

/// Removes hop-by-hop headers, including any named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let doomed: Vec<HeaderName> = {
        let named = connection_named(fields_of(headers));
        headers
            .keys()
            .filter(|n| named.is_hop_by_hop(n.as_str().as_bytes()))
            .cloned()
            .collect()
    };
    for name in doomed {
        headers.remove(name);
    }
}

/// A header map's fields in the form the rules take.
pub fn fields_of(headers: &HeaderMap) -> impl Iterator<Item = Field<'_>> + Clone {
    headers
        .iter()
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
        .collect::<Vec<_>>()
        .into_iter()
}

/// What the gateway injects into a forwarded request, and what it removes.
pub struct Injected<'a> {
    pub user_header: &'a HeaderName,
    pub user_id: &'a str,
    pub key_header: &'a HeaderName,
    pub key_id: &'a str,
    pub forward_authorization: bool,
    /// The client's address, already rendered.
    pub client_ip: &'a [u8],
    pub tls: bool,
    /// The client's `Host` (or HTTP/2 `:authority`).
    pub original_host: Option<&'a [u8]>,
    /// What to send as `Host`.
    pub upstream_host: &'a [u8],
    pub request_id: &'a [u8],
    /// Client headers that are never forwarded (`headers.strip`).
    pub strip: &'a [HeaderName],
}

/// What [`write_upstream_request`] left out of a client's request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    /// Client-sent copies (or look-alikes) of the injected identity headers.
    pub spoofed: usize,
    /// Names with `_` (nginx's `underscores_in_headers off`: CGI-style
    /// engines read `Content_Length` as `Content-Length`) and names on the
    /// strip list.
    pub dropped: usize,
}

/// Writes the head a permitted request goes upstream with: the client's
/// fields less hop-by-hop ones, framing ones, any copy of the identity
/// headers, names with `_` and names on the strip list, then the trusted
/// identity, `X-Forwarded-*`, `Host` and `X-Request-Id`, then `framing`.
/// Returns what was removed, so the caller can log and count it.
pub fn write_upstream_request<'a>(
    out: &mut Vec<u8>,
    method: &Method,
    target: &[u8],
    fields: impl Iterator<Item = Field<'a>> + Clone,
    inject: &Injected<'_>,
    framing: Framing,
) -> Removed {
    let named = connection_named(fields.clone());
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let identity = [
        inject.user_header.as_str().as_bytes(),
        inject.key_header.as_str().as_bytes(),
    ];
    let mut removed = Removed::default();
    for (name, value) in fields.clone() {
        if named.is_hop_by_hop(name)
            || [
                "expect",
                "content-length",
                "host",
                "x-forwarded-proto",
                "x-forwarded-host",
                "x-request-id",
            ]
            .iter()
            .any(|h| is(name, h))
        {
            continue;
        }
        // CGI-style engines read `X_User_Id` as `X-User-Id`: look-alikes go too.
        if identity.iter().any(|h| same_but_underscores(name, h)) {
            removed.spoofed += 1;
            continue;
        }
        if name.contains(&b'_') || inject.strip.iter().any(|h| is(name, h.as_str())) {
            removed.dropped += 1;
            continue;
        }
        if is(name, "authorization") && !inject.forward_authorization {
            continue;
        }
        if is(name, "x-forwarded-for") {
            continue;
        }
        field(out, name, value);
    }
    field(out, identity[0], inject.user_id.as_bytes());
    field(out, identity[1], inject.key_id.as_bytes());
    // Earlier hops' addresses, in order, then the client's.
    out.extend_from_slice(b"x-forwarded-for: ");
    for (name, value) in fields {
        let value = value.trim_ascii();
        if is(name, "x-forwarded-for") && !value.is_empty() {
            out.extend_from_slice(value);
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(inject.client_ip);
    out.extend_from_slice(b"\r\n");
    let proto: &[u8] = if inject.tls { b"https" } else { b"http" };
    field(out, b"x-forwarded-proto", proto);
    if let Some(host) = inject.original_host {
        field(out, b"x-forwarded-host", host);
    }
    field(out, b"host", inject.upstream_host);
    field(out, b"x-request-id", inject.request_id);
    wire::write_framing(out, framing);
    out.extend_from_slice(b"\r\n");
    removed
}

/// How an answer's body goes to an HTTP/1.1 client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Body {
    pub framing: Framing,
    /// For a bodiless answer to HEAD: the length the body would have had.
    pub declared: Option<u64>,
}

impl From<Framing> for Body {
    fn from(framing: Framing) -> Body {
        Body {
            framing,
            declared: None,
        }
    }
}

/// Writes the head of an upstream's response for an HTTP/1.1 client: its
/// fields less hop-by-hop and framing ones, `X-Request-Id` and `Date` when
/// the upstream sent none, then the framing and `connection`. The length
/// is always keygate's own, written once: a bodiless answer to HEAD keeps
/// the length it describes, a 204 or 304 carries none.
pub fn write_client_response<'a>(
    out: &mut Vec<u8>,
    status: StatusCode,
    fields: impl Iterator<Item = Field<'a>> + Clone,
    body: Body,
    connection: Option<&str>,
    request_id: &[u8],
) {
    let named = connection_named(fields.clone());
    wire::write_status_line(out, status);
    let (mut has_id, mut has_date) = (false, false);
    for (name, value) in fields.clone() {
        if named.is_hop_by_hop(name) || is(name, "content-length") {
            continue;
        }
        has_id |= is(name, "x-request-id");
        has_date |= is(name, "date");
        field(out, name, value);
    }
    if !has_id {
        field(out, b"x-request-id", request_id);
    }
    if !has_date {
        crate::clock::http_date(|date| field(out, b"date", date));
    }
    wire::write_framing(out, body.framing);
    let lengthless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if let (Framing::Empty, Some(n), false) = (body.framing, body.declared, lengthless) {
        let _ = write!(out, "content-length: {n}\r\n");
    }
    if let Some(connection) = connection {
        field(out, b"connection", connection.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Equal once `_` is read as `-`, ignoring case.
fn same_but_underscores(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.eq_ignore_ascii_case(y) || (*x == b'_' && *y == b'-') || (*x == b'-' && *y == b'_')
        })
}

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
    use http::header;

    const CLIENT: &[u8] = b"10.0.0.9";
    const RID: &[u8] = b"rid-1";

    fn inject<'a>(user: &'a HeaderName, key: &'a HeaderName, fwd_auth: bool) -> Injected<'a> {
        Injected {
            user_header: user,
            user_id: "user_1",
            key_header: key,
            key_id: "key_1",
            forward_authorization: fwd_auth,
            client_ip: CLIENT,
            tls: false,
            original_host: Some(b"gw.example"),
            upstream_host: b"127.0.0.1:3000",
            request_id: RID,
            strip: &STRIP,
        }
    }

    static STRIP: [HeaderName; 2] = [
        HeaderName::from_static("x-middleware-subrequest"),
        HeaderName::from_static("x-original-url"),
    ];

    /// The upstream head for `fields`, parsed back into a header map.
    fn forwarded(fields: &[(&str, &str)], fwd_auth: bool) -> (HeaderMap, usize) {
        let (map, removed) = forwarded_with(fields, fwd_auth);
        (map, removed.spoofed)
    }

    fn forwarded_with(fields: &[(&str, &str)], fwd_auth: bool) -> (HeaderMap, Removed) {
        let user = HeaderName::from_static("x-user-id");
        let key = HeaderName::from_static("x-api-key-id");
        let mut out = Vec::new();
        let removed = write_upstream_request(
            &mut out,
            &Method::POST,
            b"/p?q=1",
            fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
            &inject(&user, &key, fwd_auth),
            Framing::Length(2),
        );
        let mut fields = wire::Fields::default();
        let head = wire::parse_request(&out, &mut fields, wire::MAX_HEAD)
            .unwrap()
            .unwrap();
        assert_eq!(head.len, out.len());
        assert_eq!(head.target(&out), "/p?q=1");
        assert_eq!(head.framing, Framing::Length(2));
        let mut map = HeaderMap::new();
        for (n, v) in fields.of(&out) {
            map.append(
                HeaderName::from_bytes(n).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        (map, removed)
    }

    #[test]
    fn spoofed_identity_headers_are_replaced() {
        let (h, removed) = forwarded(
            &[
                ("X-User-Id", "admin"),
                ("x-user-id", "root"),
                ("x-api-key-id", "forged"),
                ("x_user_id", "cgi-admin"),
                ("X-Api_Key-Id", "forged"),
                ("x_other", "kept"),
            ],
            false,
        );
        assert_eq!(removed, 5);
        assert!(!h.contains_key("x_user_id") && !h.contains_key("x-api_key-id"));
        assert_eq!(h.get_all("x-user-id").iter().count(), 1);
        assert_eq!(h["x-user-id"], "user_1");
        assert_eq!(h["x-api-key-id"], "key_1");
    }

    #[test]
    fn names_with_underscores_and_listed_names_are_dropped() {
        let (h, removed) = forwarded_with(
            &[
                ("Transfer_Encoding", "chunked"),
                ("Content_Length", "5"),
                ("x_other", "1"),
                ("X-Middleware-Subrequest", "middleware"),
                ("x-original-url", "/admin"),
                ("x-kept", "1"),
            ],
            false,
        );
        assert_eq!(
            removed,
            Removed {
                spoofed: 0,
                dropped: 5
            }
        );
        assert!(h.keys().all(|n| !n.as_str().contains('_')), "{h:?}");
        assert!(!h.contains_key("x-middleware-subrequest") && !h.contains_key("x-original-url"));
        assert_eq!(h["x-kept"], "1");
        assert_eq!(h[header::CONTENT_LENGTH], "2");
    }

    #[test]
    fn authorization_is_dropped_unless_asked_for() {
        let (h, _) = forwarded(&[("Authorization", "Bearer wfb_x")], false);
        assert!(!h.contains_key(header::AUTHORIZATION));
        let (h, _) = forwarded(&[("Authorization", "Bearer wfb_x")], true);
        assert_eq!(h[header::AUTHORIZATION], "Bearer wfb_x");
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let hops = [
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("TE", "trailers"),
            ("Upgrade", "websocket"),
            ("Expect", "100-continue"),
            ("Content-Length", "99"),
            ("x-kept", "1"),
        ];
        let (h, _) = forwarded(&hops, false);
        assert!(h.contains_key("x-kept"));
        for (name, _) in &hops[..7] {
            assert!(!h.contains_key(*name), "{name} forwarded");
        }
        assert_eq!(h[header::CONTENT_LENGTH], "2");

        let mut map = HeaderMap::new();
        for (n, v) in hops {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        strip_hop_by_hop(&mut map);
        let mut left: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "expect", "x-kept"]);
    }

    #[test]
    fn forwarded_headers_are_set_and_appended() {
        let (h, _) = forwarded(
            &[
                ("X-Forwarded-For", "203.0.113.7"),
                ("x-forwarded-for", "198.51.100.2"),
                ("Host", "gw.example"),
                ("X-Forwarded-Proto", "https"),
                ("X-Request-Id", "client-chosen"),
            ],
            false,
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 198.51.100.2, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "gw.example");
        assert_eq!(h.get_all(header::HOST).iter().count(), 1);
        assert_eq!(h[header::HOST], "127.0.0.1:3000");
        assert_eq!(h["x-request-id"], "rid-1");
    }

    #[test]
    fn responses_lose_hop_by_hop_fields_and_gain_id_and_date() {
        let fields: [(&[u8], &[u8]); 4] = [
            (b"Content-Type", b"text/plain"),
            (b"Connection", b"keep-alive"),
            (b"Content-Length", b"5"),
            (b"Keep-Alive", b"timeout=5"),
        ];
        let mut out = Vec::new();
        write_client_response(
            &mut out,
            StatusCode::OK,
            fields.iter().copied(),
            Framing::Length(5).into(),
            Some("close"),
            RID,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nx-request-id: rid-1\r\ndate: "
        ));
        assert!(
            text.ends_with(" GMT\r\ncontent-length: 5\r\nconnection: close\r\n\r\n"),
            "{text}"
        );
        assert!(!text.contains("Keep-Alive") && !text.contains("Content-Length"));
    }

    #[test]
    fn answer_lengths_are_keygates_own_and_bodiless_ones_carry_none() {
        let head = |status: u16, fields: &[(&[u8], &[u8])], body: Body| {
            let mut out = Vec::new();
            write_client_response(
                &mut out,
                StatusCode::from_u16(status).unwrap(),
                fields.iter().copied(),
                body,
                None,
                RID,
            );
            String::from_utf8(out).unwrap().to_ascii_lowercase()
        };
        let doubled: [(&[u8], &[u8]); 1] = [(b"Content-Length", b"5, 5")];
        let head_answer = Body {
            framing: Framing::Empty,
            declared: Some(5),
        };
        let text = head(200, &doubled, head_answer);
        assert_eq!(text.matches("content-length").count(), 1, "{text}");
        assert!(text.contains("content-length: 5\r\n"), "{text}");
        for bodiless in [204, 304] {
            let text = head(bodiless, &doubled, head_answer);
            assert!(!text.contains("content-length"), "{text}");
        }
        let text = head(200, &doubled, Framing::Length(5).into());
        assert_eq!(text.matches("content-length").count(), 1, "{text}");
    }

    #[test]
    fn request_ids_are_screened() {
        assert!(sane_request_id(b"abc-123_x.y"));
        assert!(!sane_request_id(b"has space"));
        assert!(!sane_request_id(b""));
        assert!(!sane_request_id("a".repeat(129).as_bytes()));
    }
}
