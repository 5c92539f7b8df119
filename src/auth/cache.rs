//! One cache of store answers ([`Entries`]): concurrent misses for an entry
//! share one store read, and its outcome (the answer, "unknown", or a
//! failure) is handed to all of them at once ([`Slot`]).

use super::fence::{Fenced, Fences, live, now, ttl_ms};
use super::{Auth, AuthError, Counter};
use crate::config::CacheSize;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Front copies kept per thread at the most (never more than the cache's
/// own capacity).
const FRONT_CAPACITY: u64 = 4096;

/// What a cache holds for an entry. Only `Value` stays: the other two are
/// how a read that found nothing to keep hands its outcome to every request
/// waiting on it at once (a dropped placeholder would wake them one at a
/// time, each to read the store again), and are removed right after.
#[derive(Clone)]
pub(super) enum Slot<T> {
    Value(Fenced<T>),
    /// Not in the store, as read at this epoch.
    Unknown(u64),
    /// The store read numbered so (see [`Entries::failures`]) failed.
    Failed(u64),
}

impl<T> Slot<T> {
    /// Whether `self` is this same read outcome (never true of values).
    pub(super) fn is_outcome(&self, other: &Slot<T>) -> bool {
        match (self, other) {
            (Slot::Unknown(a), Slot::Unknown(b)) | (Slot::Failed(a), Slot::Failed(b)) => a == b,
            _ => false,
        }
    }
}

/// Values weigh one; passing outcomes weigh nothing, so they never evict a
/// value.
#[derive(Clone)]
pub(super) struct SlotWeight;

impl<K, T> quick_cache::Weighter<K, Slot<T>> for SlotWeight {
    fn weight(&self, _: &K, slot: &Slot<T>) -> u64 {
        u64::from(matches!(slot, Slot::Value(_)))
    }
}

/// The right to read the store for one entry, waited on by the others.
pub(super) type Guard<'a, K, T> = quick_cache::sync::PlaceholderGuard<
    'a,
    K,
    Slot<T>,
    SlotWeight,
    quick_cache::DefaultHashBuilder,
    quick_cache::sync::DefaultLifecycle<K, Slot<T>>,
>;

/// One cache of store answers: its entries, the fences that void them,
/// and its TTL.
pub(super) struct Entries<K, T> {
    pub(super) cache: quick_cache::sync::Cache<K, Slot<T>, SlotWeight>,
    pub(super) fences: Fences<K>,
    /// Failed store reads so far (numbers [`Slot::Failed`]).
    pub(super) failures: AtomicU64,
    pub(super) ttl: AtomicU64,
    /// Front copies kept per thread.
    pub(super) front: AtomicUsize,
}

impl<K: Hash + Eq + Clone, T: Clone> Entries<K, T> {
    /// Entries that live `size.ttl`, fenced for `fenced` (at least that:
    /// the keys' fences also void unknown-hash answers).
    pub(super) fn new(size: CacheSize, fenced: Duration) -> Entries<K, T> {
        Entries {
            cache: quick_cache::sync::Cache::with_weighter(
                usize::try_from(size.capacity).unwrap_or(usize::MAX),
                size.capacity,
                SlotWeight,
            ),
            fences: Fences::new(fenced.max(size.ttl)),
            failures: AtomicU64::new(0),
            ttl: AtomicU64::new(ttl_ms(size.ttl)),
            front: AtomicUsize::new(front_size(size)),
        }
    }

    pub(super) fn resize(&self, size: CacheSize, fenced: Duration) {
        self.cache.set_capacity(size.capacity);
        // Fences first, kept for the longer of the old and new TTLs: an
        // entry read under the old one may still be cached.
        let old = Duration::from_millis(self.ttl());
        self.fences.keep_for(fenced.max(size.ttl).max(old));
        self.ttl.store(ttl_ms(size.ttl), Ordering::Relaxed);
        self.front.store(front_size(size), Ordering::Relaxed);
    }

    pub(super) fn ttl(&self) -> u64 {
        self.ttl.load(Ordering::Relaxed)
    }

    /// Gives a read's outcome to every request waiting on it, then takes
    /// it out of the cache (in one step: nothing can cancel in between).
    pub(super) fn hand_over<Q>(&self, guard: Guard<'_, K, T>, key: &Q, outcome: Slot<T>)
    where
        Q: Hash + quick_cache::Equivalent<K> + ?Sized,
    {
        if guard.insert(outcome.clone()).is_ok() {
            self.cache.remove_if(key, |slot| slot.is_outcome(&outcome));
        }
    }

    /// Removes `entry` from the cache, unless a newer read replaced it.
    pub(super) fn drop_entry<Q>(&self, key: &Q, entry: &Fenced<T>)
    where
        Q: Hash + quick_cache::Equivalent<K> + ?Sized,
    {
        self.cache.remove_if(key, |slot| {
            matches!(slot, Slot::Value(current)
                if current.epoch == entry.epoch && current.loaded == entry.loaded)
        });
    }
}

pub(super) fn front_size(size: CacheSize) -> usize {
    size.capacity.min(FRONT_CAPACITY) as usize
}

impl Auth {
    /// The answer a cache slot gives this request, if any: a live value, a
    /// live "unknown", or the failure of the read it waited on. A value
    /// that may no longer be served is removed.
    pub(super) fn settle<K, Q, T>(
        &self,
        entries: &Entries<K, T>,
        key: &Q,
        slot: Slot<T>,
        failures_before: u64,
        valid: impl Fn(&Q, u64) -> bool,
        hits: Counter,
    ) -> Option<Result<Fenced<T>, AuthError>>
    where
        K: Hash + Eq + Clone,
        Q: Hash + quick_cache::Equivalent<K> + ?Sized,
        T: Clone,
    {
        match slot {
            Slot::Value(hit) if live(hit.loaded, entries.ttl(), now()) && valid(key, hit.epoch) => {
                self.count(hits);
                Some(Ok(hit))
            }
            Slot::Value(stale) => {
                entries.drop_entry(key, &stale);
                None
            }
            Slot::Unknown(epoch) if valid(key, epoch) => {
                self.count(hits);
                Some(Err(AuthError::InvalidKey))
            }
            Slot::Unknown(_) => None,
            // A failure numbered after this request began is the read it
            // waited on; an older one is for the store to say again.
            Slot::Failed(n) if n > failures_before => {
                self.count(|c| &c.store_errors);
                Some(Err(AuthError::Unavailable))
            }
            Slot::Failed(_) => None,
        }
    }
}
