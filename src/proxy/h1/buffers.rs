//! A connection's buffers, taken only while it has bytes to read or write:
//! an idle connection gives them back to a per-thread spare list.

use super::io::READ_CHUNK;
use crate::http1::Fields;
use bytes::BytesMut;
use std::cell::RefCell;

/// The buffers a connection uses while it has a request to read or answer.
pub(super) struct Buffers {
    /// What has been read from the client.
    pub(super) buf: BytesMut,
    /// The output being put together.
    pub(super) out: Vec<u8>,
    /// The head being sent upstream.
    pub(super) up: Vec<u8>,
    /// Where the current request head's fields lie in `buf`.
    pub(super) fields: Fields,
}

/// Spare buffer sets kept per worker thread: taken by a connection that
/// has bytes to read, given back when it goes idle, so idle connections
/// cost no buffer and busy ones no allocation.
const SPARE_SETS: usize = 256;
/// Buffers that grew past this are freed rather than kept spare.
const SPARE_MAX_BYTES: usize = 16 * 1024;

thread_local! {
    /// Boxed: a connection holds its set by the box, so taking one and
    /// giving it back moves a pointer and allocates nothing.
    #[allow(clippy::vec_box)]
    static SPARE: RefCell<Vec<Box<Buffers>>> = const { RefCell::new(Vec::new()) };
}

/// What a parked connection's buffers read as: empty.
static EMPTY: std::sync::LazyLock<Buffers> = std::sync::LazyLock::new(|| Buffers {
    buf: BytesMut::new(),
    out: Vec::new(),
    up: Vec::new(),
    fields: Fields::default(),
});

impl Buffers {
    /// A set from this thread's spares, or a new one.
    fn take() -> Box<Buffers> {
        SPARE
            .with(|spare| spare.borrow_mut().pop())
            .unwrap_or_else(|| {
                Box::new(Buffers {
                    buf: BytesMut::with_capacity(READ_CHUNK),
                    out: Vec::with_capacity(4 * 1024),
                    up: Vec::with_capacity(1024),
                    fields: Fields::default(),
                })
            })
    }

    /// Gives a set back to this thread's spares (what it holds is dropped).
    pub(super) fn give_back(mut self: Box<Buffers>) {
        if self.out.capacity() > SPARE_MAX_BYTES
            || self.up.capacity() > SPARE_MAX_BYTES
            || self.buf.capacity() > SPARE_MAX_BYTES
        {
            return;
        }
        self.buf.clear();
        self.out.clear();
        self.up.clear();
        SPARE.with(|spare| {
            let mut spare = spare.borrow_mut();
            if spare.len() < SPARE_SETS {
                spare.push(self);
            }
        });
    }
}

/// A connection's buffers while it has them: none while it is idle (they
/// are with the spares, and read as empty); using them takes a set.
pub(super) struct Held(pub(super) Option<Box<Buffers>>);

impl std::ops::Deref for Held {
    type Target = Buffers;

    fn deref(&self) -> &Buffers {
        self.0.as_deref().unwrap_or(&EMPTY)
    }
}

impl std::ops::DerefMut for Held {
    fn deref_mut(&mut self) -> &mut Buffers {
        self.0.get_or_insert_with(Buffers::take)
    }
}
