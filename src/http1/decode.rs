//! Bodies taken out of a read buffer as they arrive, chunked coding
//! undone.

use super::{Framing, WireError};
use bytes::{Buf, Bytes, BytesMut};

/// Longest chunk-size line (size and extensions) or trailer line.
const MAX_CHUNK_LINE: usize = 4096;

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
