//! The head of an answer to an HTTP/1.1 client: the upstream's fields (or
//! keygate's own) less hop-by-hop and framing ones, `X-Request-Id` and
//! `Date` where missing, and keygate's own framing and `Connection`.

use crate::http1::{self, Field, Framing, connection_named, is, write_field as field};
use http::StatusCode;
use std::io::Write;

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
    http1::write_status_line(out, status);
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
    http1::write_framing(out, body.framing);
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

#[cfg(test)]
mod tests {
    use super::*;

    const RID: &[u8] = b"rid-1";

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
}
