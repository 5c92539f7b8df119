//! How much of a refused request's body keygate reads and drops (nginx's
//! lingering close), on either protocol: enough that a client can finish
//! sending and read its answer, and that a client just over the body limit
//! still reads its 413; past the bound the connection (or stream) closes.

use std::time::Duration;

/// Longest a refused body is read for.
pub(crate) const TIME: Duration = Duration::from_secs(10);

/// Bytes of a refused body read at most, for a body limit of `limit` (or
/// what is left of it): twice that, and never under 64 KiB.
pub(crate) fn bytes(limit: u64) -> u64 {
    limit.saturating_mul(2).max(64 * 1024)
}
