//! The key and owner checks, over caches in front of the store: the
//! [`Auth`] facade (authenticate, owner, invalidate), and its parts:
//! - [`principal`]: who a valid key belongs to, kept small;
//! - [`cache`]: one cache of store answers, where concurrent misses for an
//!   entry share one store read and its outcome;
//! - [`keys`] and [`owners`]: the two lookup paths over it (keys also have a
//!   negative cache, so a flood of random keys cannot evict valid ones);
//! - [`fence`]: epochs that void answers read before an invalidation, and
//!   ages checked on read against the TTL;
//! - [`front`]: per-thread copies of served answers, under the same rules.
//!
//! All caches are `quick_cache` caches (one table, entries held inline, so
//! an entry costs little; README gives the sizes), whose capacities and
//! TTLs a reload can change without emptying them. Store reads made for one
//! request share one deadline ([`Budget`]).

mod cache;
mod fence;
mod front;
mod keys;
mod owners;
mod principal;
#[cfg(test)]
mod tests;

pub use principal::Principal;

use crate::config::CacheConfig;
use crate::key::KeyHash;
use crate::metrics::{Counters, Metrics};
use crate::store::{Store, StoreError};
use cache::Entries;
use fence::{Fenced, ttl_ms};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// Unknown, revoked or expired key.
    InvalidKey,
    /// The store could not answer and nothing usable was cached.
    Unavailable,
}

/// One request's store deadline: set by its first store read, to the
/// store's timeout from then, and shared by every read after it.
#[derive(Debug, Default)]
pub struct Budget(Option<tokio::time::Instant>);

impl Budget {
    fn until(&mut self, timeout: Duration) -> tokio::time::Instant {
        *self
            .0
            .get_or_insert_with(|| tokio::time::Instant::now() + timeout)
    }
}

pub struct Auth {
    store: Arc<dyn Store>,
    /// The store's own timeout: one request's reads share it.
    store_timeout: Option<Duration>,
    keys: Entries<KeyHash, Arc<Principal>>,
    owners: Entries<String, Option<Arc<str>>>,
    /// Hashes the store did not know, as read at an epoch.
    unknown: quick_cache::sync::Cache<KeyHash, Fenced<()>>,
    unknown_ttl: AtomicU64,
    epoch: AtomicU64,
    /// Entries read before this epoch are void (a whole-cache flush).
    floor: AtomicU64,
    metrics: Arc<Metrics>,
    /// Tells this `Auth`'s front copies from another's on the same thread.
    id: u64,
    /// The configured sizes and TTLs, and whether the store tells this
    /// instance of changes made behind its back; when it does not, every
    /// TTL is held to `ttl_without_notify`.
    sizes: std::sync::Mutex<(CacheConfig, bool)>,
}

/// Reads that lose a race with an invalidation are retried this many times
/// through the cache before going to the store directly.
const RACE_RETRIES: usize = 3;

/// A counter among [`Counters`].
type Counter = fn(&Counters) -> &AtomicU64;

impl Auth {
    pub fn new(store: Arc<dyn Store>, config: &CacheConfig, metrics: Arc<Metrics>) -> Auth {
        let store_timeout = store.timeout();
        Auth {
            store,
            store_timeout,
            // Unknown hashes are fenced with the keys.
            keys: Entries::new(config.keys, config.negative.ttl),
            owners: Entries::new(config.owners, config.owners.ttl),
            unknown: quick_cache::sync::Cache::new(
                usize::try_from(config.negative.capacity).unwrap_or(usize::MAX),
            ),
            unknown_ttl: AtomicU64::new(ttl_ms(config.negative.ttl)),
            epoch: AtomicU64::new(1),
            floor: AtomicU64::new(0),
            metrics,
            id: {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed)
            },
            sizes: std::sync::Mutex::new((*config, true)),
        }
    }

    /// Applies new cache capacities and TTLs in place (a reload): nothing
    /// cached is lost, and no entry is served past the new TTL.
    pub fn resize(&self, config: &CacheConfig) {
        let mut sizes = self
            .sizes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sizes.0 = *config;
        self.apply(&sizes.0, sizes.1);
    }

    /// Whether the store notifies this instance of changes made behind its
    /// back (a postgres store with its triggers). Without that, every TTL
    /// is held to `ttl_without_notify`, entries already cached included.
    pub fn set_notified(&self, notified: bool) {
        let mut sizes = self
            .sizes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if sizes.1 != notified {
            sizes.1 = notified;
            self.apply(&sizes.0, notified);
        }
    }

    fn apply(&self, config: &CacheConfig, notified: bool) {
        let config = match notified {
            true => *config,
            false => config.capped(config.ttl_without_notify),
        };
        self.keys.resize(config.keys, config.negative.ttl);
        self.owners.resize(config.owners, config.owners.ttl);
        self.unknown.set_capacity(config.negative.capacity);
        self.unknown_ttl
            .store(ttl_ms(config.negative.ttl), Ordering::Relaxed);
    }

    fn fresh(&self, epoch: u64) -> bool {
        epoch >= self.floor.load(Ordering::Acquire)
    }

    fn count(&self, counter: Counter) {
        counter(self.metrics.local()).fetch_add(1, Ordering::Relaxed);
    }

    /// A store read under this request's deadline.
    async fn read<T>(
        &self,
        budget: &mut Budget,
        read: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match self.store_timeout {
            None => read.await,
            Some(timeout) => tokio::time::timeout_at(budget.until(timeout), read)
                .await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("timed out".into()))),
        }
    }

    fn store_failed(&self, e: &StoreError) -> AuthError {
        self.count(|c| &c.store_errors);
        tracing::warn!(error = %e, "store lookup failed");
        AuthError::Unavailable
    }

    fn next_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// A request refused because its key had expired.
    pub fn count_expired(&self) {
        self.count(|c| &c.expired_keys);
    }

    /// A request refused because its key is scoped to other workflows.
    pub fn count_out_of_scope(&self) {
        self.count(|c| &c.scope_refusals);
    }

    /// Voids every cached answer, for when invalidations may have been missed.
    pub fn invalidate_all(&self) {
        let epoch = self.next_epoch();
        // Two flushes at once must not lower the floor.
        self.floor.fetch_max(epoch, Ordering::AcqRel);
        self.keys.cache.clear();
        self.unknown.clear();
        self.owners.cache.clear();
        self.count(|c| &c.cache_flushes);
    }

    /// Number of cached valid keys (for the memory benchmark).
    pub fn cached_keys(&self) -> u64 {
        self.keys.cache.weight()
    }
}
