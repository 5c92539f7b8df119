//! Trusted identity on the way upstream: the client's fields go through
//! less hop-by-hop and framing ones, less any copy or look-alike of the
//! identity headers and less names the engine could be fooled by; then
//! keygate writes the trusted values (always remove, then insert).

use crate::http1::{self, Field, Framing, connection_named, is, write_field as field};
use http::Method;
use http::header::HeaderName;

/// What the gateway injects into a forwarded request, and what it removes.
pub struct Injected<'a> {
    pub user_header: &'a HeaderName,
    pub user_id: &'a str,
    pub key_header: &'a HeaderName,
    pub key_id: &'a str,
    /// The run-token header: client copies always removed; the token
    /// written when there is one (a vault is configured).
    pub run_header: &'a HeaderName,
    pub run_token: Option<&'a str>,
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
        inject.run_header.as_str().as_bytes(),
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
    if let Some(token) = inject.run_token {
        field(out, identity[2], token.as_bytes());
    }
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
    http1::write_framing(out, framing);
    out.extend_from_slice(b"\r\n");
    removed
}

/// Equal once `_` is read as `-`, ignoring case.
fn same_but_underscores(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.eq_ignore_ascii_case(y) || (*x == b'_' && *y == b'-') || (*x == b'-' && *y == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{self, HeaderMap, HeaderValue};

    const CLIENT: &[u8] = b"10.0.0.9";
    const RID: &[u8] = b"rid-1";

    fn inject<'a>(user: &'a HeaderName, key: &'a HeaderName, fwd_auth: bool) -> Injected<'a> {
        Injected {
            user_header: user,
            user_id: "user_1",
            key_header: key,
            key_id: "key_1",
            run_header: &RUN,
            run_token: Some("kgr_run"),
            forward_authorization: fwd_auth,
            client_ip: CLIENT,
            tls: false,
            original_host: Some(b"gw.example"),
            upstream_host: b"127.0.0.1:3000",
            request_id: RID,
            strip: &STRIP,
        }
    }

    static RUN: HeaderName = HeaderName::from_static("x-keygate-run");

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
        let mut fields = http1::Fields::default();
        let head = http1::parse_request(&out, &mut fields, http1::MAX_HEAD)
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
}
