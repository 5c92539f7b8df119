//! Message heads: a request or response head parsed in place, its fields
//! located in the buffer (no allocation), and the body framing it declares
//! (RFC 9112 §6), read strictly.

use super::{Field, Framing, MAX_HEADERS, WireError, hop};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use std::ops::Range;

/// Where a header field's name and value lie in its head.
type FieldAt = (Range<usize>, Range<usize>);

/// Where a parsed head's fields lie in its bytes. Each connection keeps one
/// and reuses it, so parsing a head allocates nothing.
#[derive(Debug, Default)]
pub struct Fields(Vec<FieldAt>);

impl Fields {
    /// The fields, read from the head they were parsed from.
    pub fn of<'a>(&'a self, head: &'a [u8]) -> impl Iterator<Item = Field<'a>> + Clone {
        self.0
            .iter()
            .map(move |(name, value)| (&head[name.clone()], &head[value.clone()]))
    }

    fn locate(&mut self, whole: &[u8], parsed: &[httparse::Header<'_>]) {
        self.0.clear();
        self.0.extend(
            parsed
                .iter()
                .map(|f| (offset(whole, f.name.as_bytes()), offset(whole, f.value))),
        );
    }

    /// The fields as a header map, hop-by-hop ones and `Content-Length`
    /// left out (for HTTP/2, whose framing says the length).
    pub fn header_map(&self, head: &[u8]) -> Result<HeaderMap, WireError> {
        let named = hop::connection_named(self.of(head));
        let mut map = HeaderMap::with_capacity(self.0.len());
        for (name, value) in self.of(head) {
            if named.is_hop_by_hop(name) || name.eq_ignore_ascii_case(b"content-length") {
                continue;
            }
            let name = HeaderName::from_bytes(name)
                .map_err(|_| WireError::Malformed("malformed header name"))?;
            let value = HeaderValue::from_bytes(value)
                .map_err(|_| WireError::Malformed("malformed header value"))?;
            map.append(name, value);
        }
        Ok(map)
    }
}

/// A parsed request head: the first `len` bytes of the buffer it was
/// parsed from, which also holds its fields ([`Fields`]).
#[derive(Debug)]
pub struct RequestHead {
    pub len: usize,
    pub method: Method,
    target: Range<usize>,
    pub version: Version,
    pub framing: Framing,
    /// `Content-Length` as sent, if it was.
    pub content_length: Option<u64>,
    /// The client allows the connection to stay open after this exchange.
    pub keep_alive: bool,
    pub expect_continue: bool,
}

impl RequestHead {
    /// The request target as sent.
    pub fn target<'a>(&self, head: &'a [u8]) -> &'a str {
        std::str::from_utf8(&head[self.target.clone()]).unwrap_or("")
    }
}

/// A parsed response head: the first `len` bytes of its buffer.
#[derive(Debug)]
pub struct ResponseHead {
    pub len: usize,
    pub status: StatusCode,
    pub framing: Framing,
    /// The one length the `Content-Length` fields agree on, if any (what a
    /// bodiless answer to HEAD describes).
    pub content_length: Option<u64>,
    /// The upstream allows the connection to be used again.
    pub keep_alive: bool,
}

/// HTTP/1.1 for minor version 1, else HTTP/1.0 (httparse reads no other).
fn version(minor: Option<u8>) -> Version {
    match minor {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    }
}

/// `part`'s place in `whole` (a slice httparse returned from it).
fn offset(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

/// A head's length from httparse's verdict on `buffered` bytes: `None`
/// while more are needed.
fn head_len(
    verdict: httparse::Result<usize>,
    buffered: usize,
    max_head: usize,
    malformed: &'static str,
) -> Result<Option<usize>, WireError> {
    match verdict {
        Ok(httparse::Status::Complete(len)) if len <= max_head => Ok(Some(len)),
        Ok(httparse::Status::Partial) if buffered <= max_head => Ok(None),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => Err(WireError::HeadTooLarge),
        Err(_) => Err(WireError::Malformed(malformed)),
    }
}

/// Parses a request head of at most `max_head` bytes at the front of `buf`
/// (left in place), its fields into `fields`: `Ok(None)` when more bytes
/// are needed.
pub fn parse_request(
    buf: &[u8],
    fields: &mut Fields,
    max_head: usize,
) -> Result<Option<RequestHead>, WireError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut slots);
    let verdict = parsed.parse(buf);
    let Some(len) = head_len(verdict, buf.len(), max_head, "malformed request head")? else {
        return Ok(None);
    };
    let version = version(parsed.version);
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| WireError::Malformed("malformed method"))?;
    let target = offset(buf, parsed.path.unwrap_or_default().as_bytes());
    fields.locate(buf, parsed.headers);
    let all = || fields.of(buf);
    check_host(version, all())?;
    let content_length = content_length(all())?;
    let framing = match (transfer_coding(all()), content_length) {
        (Some(_), Some(_)) => {
            return Err(WireError::Malformed(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        (Some(_), None) if version == Version::HTTP_10 => {
            return Err(WireError::Malformed("Transfer-Encoding in HTTP/1.0"));
        }
        (Some(Coding::Chunked), None) => Framing::Chunked,
        (Some(Coding::Other), None) => return Err(WireError::UnsupportedCoding),
        (None, Some(n)) => Framing::Length(n),
        (None, None) => Framing::Empty,
    };
    let keep_alive = keeps_alive(version, all());
    let expect_continue = version == Version::HTTP_11
        && all().any(|(n, v)| {
            n.eq_ignore_ascii_case(b"expect")
                && v.trim_ascii().eq_ignore_ascii_case(b"100-continue")
        });
    Ok(Some(RequestHead {
        len,
        method,
        target,
        version,
        framing,
        content_length,
        keep_alive,
        expect_continue,
    }))
}

/// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one `Host`, and its
/// value is a host with an optional port. Read strictly: a value an
/// engine could take for two hosts, or for user info, is refused.
fn check_host<'a>(
    version: Version,
    fields: impl Iterator<Item = Field<'a>>,
) -> Result<(), WireError> {
    let mut hosts = fields.filter(|(n, _)| n.eq_ignore_ascii_case(b"host"));
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(WireError::Malformed("more than one Host header")),
        (None, _) if version == Version::HTTP_11 => Err(WireError::Malformed("no Host header")),
        (None, _) => Ok(()),
        (Some((_, value)), None) if valid_host(value) => Ok(()),
        (Some(_), None) => Err(WireError::Malformed("invalid Host header")),
    }
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2), with a registered name held to
/// letters, digits and `-._~` (and percent-escapes), and the empty value
/// RFC 9112 allows.
pub fn valid_host(value: &[u8]) -> bool {
    let (host, port) = match value {
        [b'[', rest @ ..] => match rest.iter().position(|b| *b == b']') {
            Some(end) => {
                let literal = &rest[..end];
                let ok = !literal.is_empty()
                    && literal
                        .iter()
                        .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
                if !ok {
                    return false;
                }
                (&b""[..], &rest[end + 1..])
            }
            None => return false,
        },
        _ => match value.iter().position(|b| *b == b':') {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &b""[..]),
        },
    };
    let port_ok = match port {
        [] => true,
        [b':', digits @ ..] => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    port_ok
        && host
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'%'))
}

/// Parses a response head of at most `max_head` bytes, to a request made
/// with `method`, at the front of `buf` (left in place), its fields into
/// `fields`.
pub fn parse_response(
    buf: &[u8],
    method: &Method,
    fields: &mut Fields,
    max_head: usize,
) -> Result<Option<ResponseHead>, WireError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut slots);
    let verdict = parsed.parse(buf);
    let Some(len) = head_len(verdict, buf.len(), max_head, "malformed response head")? else {
        return Ok(None);
    };
    let version = version(parsed.version);
    let status = StatusCode::from_u16(parsed.code.unwrap_or_default())
        .map_err(|_| WireError::Malformed("malformed status code"))?;
    fields.locate(buf, parsed.headers);
    let all = || fields.of(buf);
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || method == Method::HEAD;
    let content_length = content_length(all())?;
    let framing = match (bodiless, transfer_coding(all()), content_length) {
        (true, _, _) => Framing::Empty,
        // A response with both is refused: it is how smuggling starts.
        (false, Some(_), Some(_)) => {
            return Err(WireError::Malformed(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        (false, Some(Coding::Chunked), None) => Framing::Chunked,
        // A coding keygate cannot re-frame (nginx answers 502 too).
        (false, Some(Coding::Other), None) => return Err(WireError::UnsupportedCoding),
        (false, None, None) => Framing::UntilClose,
        (false, None, Some(n)) => Framing::Length(n),
    };
    let keep_alive = framing != Framing::UntilClose && keeps_alive(version, all());
    Ok(Some(ResponseHead {
        len,
        status,
        framing,
        content_length,
        keep_alive,
    }))
}

enum Coding {
    Chunked,
    Other,
}

/// `chunked` only when it is the one and final coding; anything else
/// (gzip, a repeated chunked, empty) is `Other`.
fn transfer_coding<'a>(fields: impl Iterator<Item = Field<'a>>) -> Option<Coding> {
    let mut codings = Vec::new();
    for (name, value) in fields {
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            codings.extend(value.split(|b| *b == b',').map(<[u8]>::trim_ascii));
        }
    }
    match codings.as_slice() {
        [] => None,
        [only] if only.eq_ignore_ascii_case(b"chunked") => Some(Coding::Chunked),
        _ => Some(Coding::Other),
    }
}

/// One agreed length from every `Content-Length` (repeats must match).
pub fn content_length<'a>(
    fields: impl Iterator<Item = Field<'a>>,
) -> Result<Option<u64>, WireError> {
    let mut length = None;
    for (name, value) in fields {
        if !name.eq_ignore_ascii_case(b"content-length") {
            continue;
        }
        for item in value.split(|b| *b == b',') {
            let n = parse_decimal(item.trim_ascii())
                .ok_or(WireError::Malformed("malformed Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(WireError::Malformed("conflicting Content-Length"));
            }
            length = Some(n);
        }
    }
    Ok(length)
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn keeps_alive<'a>(version: Version, fields: impl Iterator<Item = Field<'a>> + Clone) -> bool {
    let named = hop::connection_named(fields);
    let has = |token: &[u8]| named.contains(token);
    if version == Version::HTTP_11 {
        !has(b"close")
    } else {
        has(b"keep-alive")
    }
}
