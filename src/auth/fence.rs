//! Fences: an invalidation records the epoch it happened at, and a cached
//! answer read before it is never served after it, even if a concurrent
//! miss inserts it late. Ages are checked on read, against the TTL.

use crate::clock::uptime_ms;
use dashmap::DashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// How much longer than an entry's TTL its fence is kept.
const FENCE_MARGIN: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub(super) struct Fenced<T> {
    pub(super) value: T,
    pub(super) epoch: u64,
    /// When the store read began, in whole milliseconds of [`uptime_ms`]
    /// (rounded down, so a copy expires no later than its TTL says).
    pub(super) loaded: u64,
}

impl<T> Fenced<T> {
    pub(super) fn new(value: T, epoch: u64, loaded: u64) -> Fenced<T> {
        Fenced {
            value,
            epoch,
            loaded,
        }
    }
}

/// Per-entry invalidation epochs, kept for as long as a stale value could
/// still live in the cache (its TTL, which a reload may change).
pub(super) struct Fences<K> {
    /// Key → (epoch, when raised in milliseconds of [`uptime_ms`]).
    pub(super) epochs: DashMap<K, (u64, u64)>,
    pub(super) len: AtomicUsize,
    /// Milliseconds a fence is kept: the entries' TTL and a margin.
    pub(super) keep_ms: AtomicU64,
}

impl<K: Hash + Eq + Clone> Fences<K> {
    /// Fences for entries that live `ttl`. Entries count their TTL from
    /// when their store read began, so a fence is kept longer than any
    /// read takes.
    pub(super) fn new(ttl: Duration) -> Self {
        let fences = Fences {
            epochs: DashMap::new(),
            len: AtomicUsize::new(0),
            keep_ms: AtomicU64::new(0),
        };
        fences.keep_for(ttl);
        fences
    }

    pub(super) fn keep_for(&self, ttl: Duration) {
        let keep = ttl.saturating_add(FENCE_MARGIN);
        self.keep_ms.store(ttl_ms(keep), Ordering::Relaxed);
    }

    pub(super) fn raise(&self, key: K, epoch: u64) {
        let now = now();
        if self.epochs.len() >= 4096 {
            let keep = self.keep_ms.load(Ordering::Relaxed);
            self.epochs
                .retain(|_, (_, at)| now.saturating_sub(*at) < keep);
        }
        self.epochs.insert(key, (epoch, now));
        self.len.store(self.epochs.len(), Ordering::Release);
    }

    /// True if `key` was invalidated after a read that began at `epoch`.
    pub(super) fn is_stale<Q>(&self, key: &Q, epoch: u64) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.len.load(Ordering::Acquire) != 0 && self.epochs.get(key).is_some_and(|e| e.0 > epoch)
    }
}

pub(super) fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

/// Whether a value loaded at `loaded` is within `ttl` at `now` (milliseconds
/// of [`uptime_ms`]). `loaded` is rounded down, so this never runs past the
/// TTL; a TTL under a millisecond keeps nothing.
pub(super) fn live(loaded: u64, ttl: u64, now: u64) -> bool {
    now < loaded.saturating_add(ttl)
}

/// Whole milliseconds of [`uptime_ms`] now.
pub(super) fn now() -> u64 {
    uptime_ms()
}
