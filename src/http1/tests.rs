//! The engine's rules, one message at a time.

use super::*;
use bytes::BytesMut;
use http::Method;

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
    assert!(!head("GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade, Close\r\n\r\n").keep_alive);
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
