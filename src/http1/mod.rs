//! The HTTP/1.1 engine (RFC 9112), for both legs of the proxy: message
//! heads parsed with `httparse` into `http` types ([`head`]), body framing
//! decided strictly (anything ambiguous is refused, never guessed), chunked
//! bodies decoded as they stream ([`decode`]), heads and chunks written back
//! out ([`encode`]), and the hop-by-hop rules ([`hop`]).
//!
//! It knows nothing of keys, routes or stores: the proxy decides what to
//! do with a message, this module only reads and writes it.

mod decode;
mod encode;
mod error;
mod head;
mod hop;
#[cfg(test)]
mod tests;

pub(crate) use decode::{Decoded, Decoder};
pub(crate) use encode::{LAST_CHUNK, encode_chunk, write_field, write_framing, write_status_line};
pub(crate) use error::WireError;
pub(crate) use head::{
    Fields, RequestHead, ResponseHead, content_length, parse_request, parse_response,
};
pub(crate) use hop::{connection_named, fields_of, is};

/// Longest request or response head accepted by default
/// (`limits.max_header_bytes`).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head: the parser fills a fixed array of this
/// many slots on the stack (more is a 431).
pub const MAX_HEADERS: usize = 100;

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

/// One header field: name and value as they arrived.
pub type Field<'a> = (&'a [u8], &'a [u8]);
