//! HTTP/1.1 on the wire, for both legs of the proxy: message heads parsed
//! with `httparse` into `http` types, body framing decided by RFC 9112 §6
//! (strictly: anything ambiguous is refused, never guessed), chunked bodies
//! decoded as they stream, and heads written back out.

use super::headers::{self, Field};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use std::io::Write;
use std::ops::Range;

/// Longest request or response head accepted by default
/// (`limits.max_header_bytes`).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (size and extensions) or trailer line.
const MAX_CHUNK_LINE: usize = 4096;

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    Length(u64),
    Chunked,
    /// Until the sender closes the connection (responses only).
    UntilClose,
}

/// What is wrong with a message, in terms its sender can be told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    Malformed(&'static str),
    HeadTooLarge,
    /// The trailer section of a chunked body is over the head limit.
    TrailersTooLarge,
    /// A transfer coding other than `chunked`.
    UnsupportedCoding,
    /// The connection ended inside a message.
    Truncated,
}

impl WireError {
    /// The status for a client whose request had this fault.
    pub fn status(self) -> StatusCode {
        match self {
            WireError::HeadTooLarge | WireError::TrailersTooLarge => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            WireError::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
            WireError::Malformed(_) | WireError::Truncated => StatusCode::BAD_REQUEST,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            WireError::Malformed(what) => what,
            WireError::HeadTooLarge => "request head too large",
            WireError::TrailersTooLarge => "trailer section too large",
            WireError::UnsupportedCoding => "unsupported transfer coding",
            WireError::Truncated => "connection closed mid-message",
        }
    }
}

impl std::error::Error for WireError {}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

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
        let named = headers::connection_named(self.of(head));
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
    /// The request target as sent (origin-form for any routed request).
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
    let named = headers::connection_named(fields);
    let has = |token: &[u8]| named.contains(token);
    if version == Version::HTTP_11 {
        !has(b"close")
    } else {
        has(b"keep-alive")
    }
}

/// What a decoder took out of its buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The buffer holds no more of the body yet.
    NeedMore,
    /// The body is complete.
    End,
}

/// Takes a body out of a read buffer as it arrives, undoing chunked coding.
/// Chunk extensions and trailer fields are read and dropped; what they may
/// take in all is bounded by the head limit, so a body cannot smuggle
/// unbounded data past the body limit in them.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// Bytes of chunk extensions, and of trailer lines, still allowed.
    extensions_left: usize,
    trailers_left: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    UntilClose,
    Done,
}

impl Decoder {
    /// A decoder for a body of `framing`, whose chunk extensions and
    /// trailer section may each take at most `max_head` bytes.
    pub fn new(framing: Framing, max_head: usize) -> Decoder {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        };
        Decoder {
            state,
            extensions_left: max_head,
            trailers_left: max_head,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Next piece of the body from `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, WireError> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::End),
                State::Length(left) | State::ChunkData(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = left.min(buf.len() as u64);
                    let data = buf.split_to(n as usize).freeze();
                    self.state = match (self.state, left - n) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), rest) => State::Length(rest),
                        (_, 0) => State::ChunkEnd,
                        (_, rest) => State::ChunkData(rest),
                    };
                    return Ok(Decoded::Data(data));
                }
                State::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                State::ChunkSize => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let (size, extensions) = chunk_size(&line)?;
                    self.extensions_left = self
                        .extensions_left
                        .checked_sub(extensions)
                        .ok_or(WireError::Malformed("chunk extensions too large"))?;
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(WireError::Malformed("chunk data longer than its size"));
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    // Trailer fields are read and dropped: nothing here or
                    // upstream relies on them.
                    let line = match take_line(buf) {
                        Ok(Some(line)) => line,
                        Ok(None) => return Ok(Decoded::NeedMore),
                        Err(WireError::Malformed("chunk line too long")) => {
                            return Err(WireError::TrailersTooLarge);
                        }
                        Err(e) => return Err(e),
                    };
                    self.trailers_left = self
                        .trailers_left
                        .checked_sub(line.len() + 2)
                        .ok_or(WireError::TrailersTooLarge)?;
                    if line.is_empty() {
                        self.state = State::Done;
                    }
                }
            }
        }
    }

    /// The peer closed the connection: the end for a close-delimited body,
    /// a truncation for any other.
    pub fn eof(&mut self) -> Result<(), WireError> {
        match self.state {
            State::UntilClose | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(WireError::Truncated),
        }
    }
}

/// One CRLF-terminated line of at most `MAX_CHUNK_LINE` bytes, without its
/// CRLF; a bare LF is refused.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, WireError> {
    let window = &buf[..buf.len().min(MAX_CHUNK_LINE + 2)];
    let Some(lf) = window.iter().position(|b| *b == b'\n') else {
        if buf.len() > MAX_CHUNK_LINE {
            return Err(WireError::Malformed("chunk line too long"));
        }
        return Ok(None);
    };
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err(WireError::Malformed("chunk line not ended by CRLF"));
    }
    let mut line = buf.split_to(lf + 1);
    line.truncate(lf - 1);
    Ok(Some(line))
}

/// `1*HEXDIG [ chunk-ext ]`: the size, and how many bytes of extensions
/// came with it (they are otherwise ignored).
fn chunk_size(line: &[u8]) -> Result<(u64, usize), WireError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = &line[digits..];
    if digits == 0
        || digits > 15
        || !(rest.is_empty() || rest.trim_ascii_start().starts_with(b";"))
        || rest.iter().any(|b| b.is_ascii_control() && *b != b'\t')
    {
        return Err(WireError::Malformed("malformed chunk size"));
    }
    let size = line[..digits].iter().fold(0u64, |n, d| {
        n * 16 + u64::from((*d as char).to_digit(16).unwrap_or(0))
    });
    Ok((size, rest.len()))
}

/// Appends `data` to `out` in the framing a body is sent with.
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// `HTTP/1.1 <code> <reason>` and its line end.
pub fn write_status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The framing header a body of `framing` is announced with, if any.
pub fn write_framing(out: &mut Vec<u8>, framing: Framing) {
    match framing {
        Framing::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty | Framing::UntilClose => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Result<Option<RequestHead>, WireError> {
        parse_request(text.as_bytes(), &mut Fields::default(), MAX_HEAD)
    }

    fn framing_of(text: &str) -> Result<Framing, WireError> {
        request(text).map(|r| r.expect("complete").framing)
    }

    #[test]
    fn a_head_is_found_and_what_follows_is_not_read() {
        let buf = b"POST /x?y HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\nbodyGET";
        let mut at = Fields::default();
        let head = parse_request(buf, &mut at, MAX_HEAD).unwrap().unwrap();
        assert_eq!(&buf[head.len..], b"bodyGET");
        assert_eq!(head.target(buf), "/x?y");
        let fields: Vec<_> = at.of(buf).collect();
        assert_eq!(fields, [(&b"Host"[..], &b"h"[..]), (b"X-A", b"1")]);
    }

    #[test]
    fn partial_heads_ask_for_more() {
        assert!(request("POST / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        assert!(request("").unwrap().is_none());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let head = "POST /a?b=1 HTTP/1.1\r\nHost: x\r\n";
        assert_eq!(framing_of(&format!("{head}\r\n")), Ok(Framing::Empty));
        assert_eq!(
            framing_of(&format!("{head}Content-Length: 0\r\n\r\n")),
            Ok(Framing::Length(0))
        );
        assert_eq!(
            framing_of(&format!("{head}Content-Length: 12\r\n\r\n")),
            Ok(Framing::Length(12))
        );
        assert_eq!(
            framing_of(&format!(
                "{head}Content-Length: 5, 5\r\ncontent-length: 5\r\n\r\n"
            )),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            framing_of(&format!("{head}Transfer-Encoding: Chunked\r\n\r\n")),
            Ok(Framing::Chunked)
        );
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let head = "POST / HTTP/1.1\r\nHost: x\r\n";
        for (fields, want) in [
            (
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                WireError::Malformed("both Transfer-Encoding and Content-Length"),
            ),
            (
                "Content-Length: 5\r\nContent-Length: 6\r\n",
                WireError::Malformed("conflicting Content-Length"),
            ),
            (
                "Content-Length: +5\r\n",
                WireError::Malformed("malformed Content-Length"),
            ),
            (
                "Content-Length: 99999999999999999999\r\n",
                WireError::Malformed("malformed Content-Length"),
            ),
            ("Transfer-Encoding: gzip\r\n", WireError::UnsupportedCoding),
            (
                "Transfer-Encoding: chunked, chunked\r\n",
                WireError::UnsupportedCoding,
            ),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
                WireError::UnsupportedCoding,
            ),
            (
                "Host: y\r\n",
                WireError::Malformed("more than one Host header"),
            ),
        ] {
            assert_eq!(
                framing_of(&format!("{head}{fields}\r\n")),
                Err(want),
                "{fields}"
            );
        }
        assert_eq!(
            framing_of("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(WireError::Malformed("Transfer-Encoding in HTTP/1.0"))
        );
    }

    #[test]
    fn malformed_heads_are_refused() {
        for text in [
            "POST / HTTP/1.1\r\nHost : x\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            "POST  / HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
            "POST / HTTP/2.0\r\n\r\n",
        ] {
            assert!(
                matches!(request(text), Err(WireError::Malformed(_))),
                "{text:?}"
            );
        }
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(request(&huge).unwrap_err(), WireError::HeadTooLarge);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            parse_request(huge.as_bytes(), &mut Fields::default(), 1024).unwrap_err(),
            WireError::HeadTooLarge
        );
        assert_eq!(
            request(&format!("GET / HTTP/1.1\r\n{many}\r\n")).unwrap_err(),
            WireError::HeadTooLarge
        );
    }

    #[test]
    fn keep_alive_and_expect_continue() {
        let head = |text: &str| request(text).unwrap().unwrap();
        assert!(head("GET / HTTP/1.1\r\nHost: x\r\n\r\n").keep_alive);
        assert!(
            !head("GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade, Close\r\n\r\n").keep_alive
        );
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(head("POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-Continue\r\n\r\n").expect_continue);
        assert!(!head("POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expect_continue);
    }

    #[test]
    fn response_framing() {
        let framing = |text: &str, method: Method| {
            parse_response(text.as_bytes(), &method, &mut Fields::default(), MAX_HEAD)
                .map(|r| r.expect("complete"))
                .map(|h| (h.framing, h.keep_alive))
        };
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", Method::POST),
            Ok((Framing::Length(3), true))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", Method::HEAD),
            Ok((Framing::Empty, true))
        );
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\n\r\n", Method::POST),
            Ok((Framing::Empty, true))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\n\r\n", Method::POST),
            Ok((Framing::UntilClose, false))
        );
        assert_eq!(
            framing(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
                Method::POST
            ),
            Ok((Framing::Chunked, false))
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", Method::POST),
            Ok((Framing::Length(1), false))
        );
        assert!(
            framing(
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Method::POST
            )
            .is_err()
        );
        assert_eq!(
            framing(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Method::POST
            ),
            Err(WireError::UnsupportedCoding)
        );
    }

    fn decode_all(framing: Framing, input: &[u8]) -> Result<(Vec<u8>, bool), WireError> {
        decode_all_with(framing, input, MAX_HEAD)
    }

    fn decode_all_with(
        framing: Framing,
        input: &[u8],
        max_head: usize,
    ) -> Result<(Vec<u8>, bool), WireError> {
        // Feed one byte at a time: every state must cope with partial input.
        let mut decoder = Decoder::new(framing, max_head);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for byte in input {
            buf.extend_from_slice(&[*byte]);
            loop {
                match decoder.decode(&mut buf)? {
                    Decoded::Data(d) => out.extend_from_slice(&d),
                    Decoded::NeedMore => break,
                    Decoded::End => return Ok((out, true)),
                }
            }
        }
        Ok((out, decoder.is_done()))
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n";
        assert_eq!(
            decode_all(Framing::Chunked, body),
            Ok((b"hello world".to_vec(), true))
        );
        assert_eq!(
            decode_all(Framing::Length(3), b"abcdef"),
            Ok((b"abc".to_vec(), true))
        );
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for body in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"x\r\n",
            b"-5\r\n",
            b"1000000000000000\r\n",
            b"5 junk\r\n",
        ] {
            assert!(
                decode_all(Framing::Chunked, body).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn http11_requests_need_exactly_one_valid_host() {
        let with = |fields: &str| request(&format!("POST / HTTP/1.1\r\n{fields}\r\n"));
        for good in [
            "Host: gw\r\n",
            "Host: gw.example:8080\r\n",
            "Host: 127.0.0.1\r\n",
            "Host: [::1]:443\r\n",
            "Host: \r\n",
        ] {
            assert!(with(good).unwrap().is_some(), "{good:?}");
        }
        assert_eq!(
            with("").unwrap_err(),
            WireError::Malformed("no Host header")
        );
        for bad in [
            "Host: gw, evil\r\n",
            "Host: gw evil\r\n",
            "Host: user@gw\r\n",
            "Host: gw:port\r\n",
            "Host: gw:80:80\r\n",
            "Host: [::1\r\n",
            "Host: gw/x\r\n",
        ] {
            assert_eq!(
                with(bad).unwrap_err(),
                WireError::Malformed("invalid Host header"),
                "{bad:?}"
            );
        }
        // HTTP/1.0 may leave it out.
        assert!(request("POST / HTTP/1.0\r\n\r\n").unwrap().is_some());
    }

    #[test]
    fn chunk_extensions_and_trailers_are_bounded() {
        // Each chunk line is at most a few KiB, whether or not its end has
        // arrived yet.
        let long = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(5000));
        let mut decoder = Decoder::new(Framing::Chunked, MAX_HEAD);
        let mut buf = BytesMut::from(long.as_bytes());
        assert_eq!(
            decoder.decode(&mut buf),
            Err(WireError::Malformed("chunk line too long"))
        );
        // Many short extensions add up to the head limit at most.
        let chunk = format!("1;{}\r\nx\r\n", "e".repeat(1000));
        let body = chunk.repeat(100) + "0\r\n\r\n";
        assert_eq!(
            decode_all_with(Framing::Chunked, body.as_bytes(), 64 * 1024),
            Err(WireError::Malformed("chunk extensions too large"))
        );
        assert_eq!(
            decode_all_with(Framing::Chunked, body.as_bytes(), 1 << 20).map(|(d, _)| d.len()),
            Ok(100)
        );
        // So do trailer lines.
        let trailer = format!("X-T: {}\r\n", "t".repeat(1000));
        let body = format!("1\r\nx\r\n0\r\n{}\r\n", trailer.repeat(100));
        assert_eq!(
            decode_all_with(Framing::Chunked, body.as_bytes(), 64 * 1024),
            Err(WireError::TrailersTooLarge)
        );
        assert_eq!(WireError::TrailersTooLarge.status(), 431);
        let one = format!("1\r\nx\r\n0\r\nX: {}\r\n\r\n", "t".repeat(5000));
        assert_eq!(
            decode_all_with(Framing::Chunked, one.as_bytes(), MAX_HEAD),
            Err(WireError::TrailersTooLarge)
        );
    }

    #[test]
    fn responses_report_their_declared_length() {
        let head = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
            &Method::HEAD,
            &mut Fields::default(),
            MAX_HEAD,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (head.framing, head.content_length),
            (Framing::Empty, Some(5))
        );
    }

    #[test]
    fn eof_ends_only_close_delimited_bodies() {
        let decoder = |framing| Decoder::new(framing, MAX_HEAD);
        assert_eq!(decoder(Framing::UntilClose).eof(), Ok(()));
        assert_eq!(decoder(Framing::Length(3)).eof(), Err(WireError::Truncated));
        assert_eq!(decoder(Framing::Chunked).eof(), Err(WireError::Truncated));
    }

    #[test]
    fn chunks_and_framing_are_written() {
        let mut out = Vec::new();
        write_framing(&mut out, Framing::Chunked);
        write_framing(&mut out, Framing::Length(7));
        write_framing(&mut out, Framing::UntilClose);
        assert_eq!(out, b"transfer-encoding: chunked\r\ncontent-length: 7\r\n");
        let mut chunk = Vec::new();
        encode_chunk(&mut chunk, b"hello world, 26 bytes long");
        assert_eq!(chunk, b"1a\r\nhello world, 26 bytes long\r\n");
    }
}
