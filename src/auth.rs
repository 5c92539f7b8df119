//! The key and owner checks, over caches in front of the store.
//!
//! Three caches: key hash → key, unknown hashes (a cache of its own with a
//! shorter TTL, so a flood of random keys cannot evict valid ones), and
//! workflow → owner. Concurrent misses for one entry share one store call,
//! and its outcome: the answer, "unknown", or a failure (503), handed to
//! all of them at once.
//!
//! All three are `quick_cache` caches (entries inline in one table: 162
//! bytes of RSS per entry for a 32-byte key and a 24-byte value, where moka
//! took 481), with each entry's age checked on read. So their capacities
//! and TTLs can change on a reload without emptying them.
//!
//! Invalidation is fenced: every cached value remembers the invalidation
//! epoch at which its store read began, and an invalidation records the
//! epoch it happened at. A value read before an invalidation of its entry
//! is never served after it, even if a concurrent miss inserts it late.
//!
//! In front of the key and owner caches, each thread keeps a small copy of
//! the answers it served (a cache read takes a shard lock and records an
//! access for the eviction policy, which costs more than the rest of the
//! check). A front entry is served under the same fence test as a cache
//! entry, and never past the TTL of the store read it came from.
//!
//! Store reads made for one request share one deadline (the store's own
//! timeout, see [`Budget`]): a hung store costs a request one timeout, not
//! one per lookup.

use crate::clock::uptime_ms;
use crate::config::{CacheConfig, CacheSize};
use crate::key::KeyHash;
use crate::metrics::{Counters, Metrics};
use crate::store::{KeyRecord, Store, StoreError};
use dashmap::DashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Who a valid key belongs to: what the proxy injects upstream. One of
/// these sits in the cache per valid key, so it is kept small: both ids
/// share one allocation and the prefix is stored inline.
#[derive(Debug)]
pub struct Principal {
    /// The key id followed by the user id.
    ids: Box<str>,
    split: usize,
    prefix: [u8; crate::key::PREFIX_LEN],
    prefix_len: u8,
    /// Last time (Unix ms) noted for the usage batcher, so a busy key
    /// touches the shared pending map at most once per millisecond.
    pub last_noted: std::sync::atomic::AtomicI64,
    /// The per-key rate window: window number in the high 40 bits, requests
    /// counted in it in the low 24.
    rate: AtomicU64,
}

impl Principal {
    pub fn new(key_id: &str, user_id: &str, prefix: &str) -> Principal {
        // Stored prefixes are ASCII (`wfb_` + base64url); anything else is
        // shown as nothing rather than cut inside a character.
        let prefix = if prefix.is_ascii() {
            prefix.as_bytes()
        } else {
            b""
        };
        let len = prefix.len().min(crate::key::PREFIX_LEN);
        let mut inline = [0u8; crate::key::PREFIX_LEN];
        inline[..len].copy_from_slice(&prefix[..len]);
        Principal {
            ids: format!("{key_id}{user_id}").into_boxed_str(),
            split: key_id.len(),
            prefix: inline,
            prefix_len: len as u8,
            last_noted: std::sync::atomic::AtomicI64::new(0),
            rate: AtomicU64::new(0),
        }
    }

    /// Counts one request against `limit` per `window_ms`; `Err` carries the
    /// milliseconds until the window ends. Fixed windows, per instance.
    pub fn admit(&self, now_ms: i64, window_ms: u64, limit: u32) -> Result<(), u64> {
        const COUNT_BITS: u32 = 24;
        const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
        let now = u64::try_from(now_ms).unwrap_or(0);
        let window = now / window_ms;
        let stamp = window & ((1 << (64 - COUNT_BITS)) - 1);
        let mut current = self.rate.load(Ordering::Relaxed);
        loop {
            let count = if current >> COUNT_BITS == stamp {
                current & COUNT_MASK
            } else {
                0
            };
            if count >= u64::from(limit) {
                return Err(window_ms - now % window_ms);
            }
            let next = (stamp << COUNT_BITS) | (count + 1).min(COUNT_MASK);
            match self.rate.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }

    pub fn key_id(&self) -> &str {
        &self.ids[..self.split]
    }

    pub fn user_id(&self) -> &str {
        &self.ids[self.split..]
    }

    /// The key's first characters, for logs; never the key.
    pub fn prefix(&self) -> &str {
        std::str::from_utf8(&self.prefix[..usize::from(self.prefix_len)]).unwrap_or("")
    }
}

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

#[derive(Clone)]
struct Fenced<T> {
    value: T,
    epoch: u64,
    /// When the store read began, in whole milliseconds of [`uptime_ms`]
    /// (rounded down, so a copy expires no later than its TTL says).
    loaded: u64,
}

impl<T> Fenced<T> {
    fn new(value: T, epoch: u64, loaded: u64) -> Fenced<T> {
        Fenced {
            value,
            epoch,
            loaded,
        }
    }
}

/// Most entries per thread and cache in the front copies (never more than
/// the cache's own capacity); a full front starts over, the caches behind
/// it still hold everything.
const FRONT_CAPACITY: u64 = 4096;

/// One thread's front copies for one [`Auth`].
#[derive(Default)]
struct Front {
    keys: std::collections::HashMap<KeyHash, Fenced<Arc<Principal>>>,
    owners: std::collections::HashMap<Box<str>, Fenced<Option<Arc<str>>>>,
}

thread_local! {
    /// Front copies by [`Auth::id`]; a process normally has one `Auth`.
    static FRONTS: std::cell::RefCell<Vec<(u64, Front)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Per-entry invalidation epochs, kept for as long as a stale value could
/// still live in the cache (its TTL, which a reload may change).
struct Fences<K> {
    epochs: DashMap<K, (u64, Instant)>,
    len: AtomicUsize,
    /// Milliseconds a fence is kept: the entries' TTL and a margin.
    keep_ms: AtomicU64,
}

impl<K: Hash + Eq + Clone> Fences<K> {
    /// Fences for entries that live `ttl`. Entries count their TTL from
    /// when their store read began, so a fence is kept longer than any
    /// read takes.
    fn new(ttl: Duration) -> Self {
        let fences = Fences {
            epochs: DashMap::new(),
            len: AtomicUsize::new(0),
            keep_ms: AtomicU64::new(0),
        };
        fences.keep_for(ttl);
        fences
    }

    fn keep_for(&self, ttl: Duration) {
        let keep = ttl.saturating_add(FENCE_MARGIN);
        self.keep_ms.store(ttl_ms(keep), Ordering::Relaxed);
    }

    fn raise(&self, key: K, epoch: u64) {
        let now = Instant::now();
        if self.epochs.len() >= 4096 {
            let keep = Duration::from_millis(self.keep_ms.load(Ordering::Relaxed));
            self.epochs
                .retain(|_, (_, at)| now.duration_since(*at) < keep);
        }
        self.epochs.insert(key, (epoch, now));
        self.len.store(self.epochs.len(), Ordering::Release);
    }

    /// True if `key` was invalidated after a read that began at `epoch`.
    fn is_stale<Q>(&self, key: &Q, epoch: u64) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.len.load(Ordering::Acquire) != 0 && self.epochs.get(key).is_some_and(|e| e.0 > epoch)
    }
}

/// What a cache holds for an entry. Only `Value` stays: the other two are
/// how a read that found nothing to keep hands its outcome to every request
/// waiting on it at once (a dropped placeholder would wake them one at a
/// time, each to read the store again), and are removed right after.
#[derive(Clone)]
enum Slot<T> {
    Value(Fenced<T>),
    /// Not in the store, as read at this epoch.
    Unknown(u64),
    /// The store read numbered so (see [`Entries::failures`]) failed.
    Failed(u64),
}

impl<T> Slot<T> {
    /// Whether `self` is this same read outcome (never true of values).
    fn is_outcome(&self, other: &Slot<T>) -> bool {
        match (self, other) {
            (Slot::Unknown(a), Slot::Unknown(b)) | (Slot::Failed(a), Slot::Failed(b)) => a == b,
            _ => false,
        }
    }
}

/// Values weigh one; passing outcomes weigh nothing, so they never evict a
/// value.
#[derive(Clone)]
struct SlotWeight;

impl<K, T> quick_cache::Weighter<K, Slot<T>> for SlotWeight {
    fn weight(&self, _: &K, slot: &Slot<T>) -> u64 {
        u64::from(matches!(slot, Slot::Value(_)))
    }
}

/// The right to read the store for one entry, waited on by the others.
type Guard<'a, K, T> = quick_cache::sync::PlaceholderGuard<
    'a,
    K,
    Slot<T>,
    SlotWeight,
    quick_cache::DefaultHashBuilder,
    quick_cache::sync::DefaultLifecycle<K, Slot<T>>,
>;

/// One cache of store answers: its entries, the fences that void them,
/// and its TTL.
struct Entries<K, T> {
    cache: quick_cache::sync::Cache<K, Slot<T>, SlotWeight>,
    fences: Fences<K>,
    /// Failed store reads so far (numbers [`Slot::Failed`]).
    failures: AtomicU64,
    ttl: AtomicU64,
    /// Front copies kept per thread.
    front: AtomicUsize,
}

impl<K: Hash + Eq + Clone, T: Clone> Entries<K, T> {
    /// Entries that live `size.ttl`, fenced for `fenced` (at least that:
    /// the keys' fences also void unknown-hash answers).
    fn new(size: CacheSize, fenced: Duration) -> Entries<K, T> {
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

    fn resize(&self, size: CacheSize, fenced: Duration) {
        self.cache.set_capacity(size.capacity);
        // Fences first, kept for the longer of the old and new TTLs: an
        // entry read under the old one may still be cached.
        let old = Duration::from_millis(self.ttl());
        self.fences.keep_for(fenced.max(size.ttl).max(old));
        self.ttl.store(ttl_ms(size.ttl), Ordering::Relaxed);
        self.front.store(front_size(size), Ordering::Relaxed);
    }

    fn ttl(&self) -> u64 {
        self.ttl.load(Ordering::Relaxed)
    }

    /// Gives a read's outcome to every request waiting on it, then takes
    /// it out of the cache (in one step: nothing can cancel in between).
    fn hand_over<Q>(&self, guard: Guard<'_, K, T>, key: &Q, outcome: Slot<T>)
    where
        Q: Hash + quick_cache::Equivalent<K> + ?Sized,
    {
        if guard.insert(outcome.clone()).is_ok() {
            self.cache.remove_if(key, |slot| slot.is_outcome(&outcome));
        }
    }

    /// Removes `entry` from the cache, unless a newer read replaced it.
    fn drop_entry<Q>(&self, key: &Q, entry: &Fenced<T>)
    where
        Q: Hash + quick_cache::Equivalent<K> + ?Sized,
    {
        self.cache.remove_if(key, |slot| {
            matches!(slot, Slot::Value(current)
                if current.epoch == entry.epoch && current.loaded == entry.loaded)
        });
    }
}

fn front_size(size: CacheSize) -> usize {
    size.capacity.min(FRONT_CAPACITY) as usize
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
}

/// How much longer than an entry's TTL its fence is kept.
const FENCE_MARGIN: Duration = Duration::from_secs(60);

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
        }
    }

    /// Applies new cache capacities and TTLs in place (a reload): nothing
    /// cached is lost, and no entry is served past the new TTL.
    pub fn resize(&self, config: &CacheConfig) {
        self.keys.resize(config.keys, config.negative.ttl);
        self.owners.resize(config.owners, config.owners.ttl);
        self.unknown.set_capacity(config.negative.capacity);
        self.unknown_ttl
            .store(ttl_ms(config.negative.ttl), Ordering::Relaxed);
    }

    fn with_front<R>(&self, f: impl FnOnce(&mut Front) -> R) -> R {
        FRONTS.with(|fronts| {
            let mut fronts = fronts.borrow_mut();
            let index = match fronts.iter().position(|(id, _)| *id == self.id) {
                Some(i) => i,
                None => {
                    // Other `Auth`s (tests make many) keep a few slots.
                    if fronts.len() >= 8 {
                        fronts.remove(0);
                    }
                    fronts.push((self.id, Front::default()));
                    fronts.len() - 1
                }
            };
            f(&mut fronts[index].1)
        })
    }

    fn front_key(&self, hash: &KeyHash) -> Option<Arc<Principal>> {
        self.with_front(|front| {
            let entry = front.keys.get(hash)?;
            if self.key_usable(hash, entry) {
                return Some(entry.value.clone());
            }
            front.keys.remove(hash);
            None
        })
    }

    fn keep_key(&self, hash: KeyHash, entry: &Fenced<Arc<Principal>>) {
        let most = self.keys.front.load(Ordering::Relaxed);
        if most == 0 {
            return;
        }
        self.with_front(|front| {
            if front.keys.len() >= most {
                front.keys.clear();
            }
            front.keys.insert(hash, entry.clone());
        });
    }

    fn front_owner(&self, workflow: &str) -> Option<Option<Arc<str>>> {
        self.with_front(|front| {
            let entry = front.owners.get(workflow)?;
            if self.owner_usable(workflow, entry) {
                return Some(entry.value.clone());
            }
            front.owners.remove(workflow);
            None
        })
    }

    fn keep_owner(&self, workflow: &str, entry: &Fenced<Option<Arc<str>>>) {
        let most = self.owners.front.load(Ordering::Relaxed);
        if most == 0 {
            return;
        }
        self.with_front(|front| {
            if front.owners.len() >= most {
                front.owners.clear();
            }
            front.owners.insert(workflow.into(), entry.clone());
        });
    }

    fn fresh(&self, epoch: u64) -> bool {
        epoch >= self.floor.load(Ordering::Acquire)
    }

    fn count(&self, counter: Counter) {
        counter(self.metrics.local()).fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a key answer read at `epoch` may still be served.
    fn key_valid(&self, hash: &KeyHash, epoch: u64) -> bool {
        self.fresh(epoch) && !self.keys.fences.is_stale(hash, epoch)
    }

    fn owner_valid(&self, workflow: &str, epoch: u64) -> bool {
        self.fresh(epoch) && !self.owners.fences.is_stale(workflow, epoch)
    }

    /// Whether a cached key answer may be served now: within its TTL and
    /// not void by an invalidation.
    fn key_usable(&self, hash: &KeyHash, entry: &Fenced<Arc<Principal>>) -> bool {
        live(entry.loaded, self.keys.ttl(), uptime_ms()) && self.key_valid(hash, entry.epoch)
    }

    fn owner_usable(&self, workflow: &str, entry: &Fenced<Option<Arc<str>>>) -> bool {
        live(entry.loaded, self.owners.ttl(), uptime_ms())
            && self.owner_valid(workflow, entry.epoch)
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

    /// [`Auth::authenticate_within`] with a deadline of its own.
    pub async fn authenticate(&self, hash: KeyHash) -> Result<Arc<Principal>, AuthError> {
        self.authenticate_within(hash, &mut Budget::default()).await
    }

    /// Looks a key up by hash: cache, then store. A request that joins a
    /// store read begun before an invalidation of the same key does not take
    /// its answer: it reads again.
    pub async fn authenticate_within(
        &self,
        hash: KeyHash,
        budget: &mut Budget,
    ) -> Result<Arc<Principal>, AuthError> {
        if let Some(principal) = self.front_key(&hash) {
            self.count(|c| &c.key_cache_hits);
            return Ok(principal);
        }
        for _ in 0..RACE_RETRIES {
            let failures_before = self.keys.failures.load(Ordering::Acquire);
            // Cached answers first, without a placeholder: a flood of one
            // unknown key must not queue its requests on one.
            if let Some(slot) = self.keys.cache.get(&hash)
                && let Some(answer) = self.settle_key(&hash, slot, failures_before)
            {
                return answer;
            }
            if self.known_unknown(&hash) {
                return Err(AuthError::InvalidKey);
            }
            // Either the outcome of a read that was under way, or the right
            // to read the store for this key.
            let guard = match self.keys.cache.get_value_or_guard_async(&hash).await {
                Ok(slot) => match self.settle_key(&hash, slot, failures_before) {
                    Some(answer) => return answer,
                    None => continue,
                },
                Err(guard) => guard,
            };
            self.count(|c| &c.key_cache_misses);
            let loaded = uptime_ms();
            let epoch = self.epoch.load(Ordering::Acquire);
            match self.read(budget, self.store.find_by_hash(hash)).await {
                Ok(Some(record)) => {
                    let found = Fenced::new(Arc::new(principal(record)), epoch, loaded);
                    // Not placed only if an invalidation removed the
                    // placeholder meanwhile; the fence below decides.
                    let _ = guard.insert(Slot::Value(found.clone()));
                    if self.key_valid(&hash, found.epoch) {
                        self.keep_key(hash, &found);
                        return Ok(found.value);
                    }
                    self.keys.drop_entry(&hash, &found);
                }
                Ok(None) => {
                    let unknown = self.key_valid(&hash, epoch);
                    if unknown {
                        self.unknown.insert(hash, Fenced::new((), epoch, loaded));
                    }
                    self.keys.hand_over(guard, &hash, Slot::Unknown(epoch));
                    if unknown {
                        return Err(AuthError::InvalidKey);
                    }
                }
                Err(e) => {
                    let n = self.keys.failures.fetch_add(1, Ordering::AcqRel) + 1;
                    self.keys.hand_over(guard, &hash, Slot::Failed(n));
                    return Err(self.store_failed(&e));
                }
            }
        }
        // Invalidations kept racing the reads: ask the store, cache nothing.
        match self.read(budget, self.store.find_by_hash(hash)).await {
            Ok(Some(record)) => Ok(Arc::new(principal(record))),
            Ok(None) => Err(AuthError::InvalidKey),
            Err(e) => Err(self.store_failed(&e)),
        }
    }

    /// The answer a cache slot gives this request, if any: a live value, a
    /// live "unknown", or the failure of the read it waited on. A value
    /// that may no longer be served is removed.
    fn settle<K, Q, T>(
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
            Slot::Value(hit)
                if live(hit.loaded, entries.ttl(), uptime_ms()) && valid(key, hit.epoch) =>
            {
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

    fn settle_key(
        &self,
        hash: &KeyHash,
        slot: Slot<Arc<Principal>>,
        failures_before: u64,
    ) -> Option<Result<Arc<Principal>, AuthError>> {
        let valid = |hash: &KeyHash, epoch| self.key_valid(hash, epoch);
        let settled = self.settle(&self.keys, hash, slot, failures_before, valid, |c| {
            &c.key_cache_hits
        })?;
        Some(settled.map(|hit| {
            self.keep_key(*hash, &hit);
            hit.value
        }))
    }

    fn settle_owner(
        &self,
        workflow: &str,
        slot: Slot<Option<Arc<str>>>,
        failures_before: u64,
    ) -> Option<Result<Option<Arc<str>>, AuthError>> {
        let valid = |workflow: &str, epoch| self.owner_valid(workflow, epoch);
        let settled = self.settle(&self.owners, workflow, slot, failures_before, valid, |c| {
            &c.owner_cache_hits
        })?;
        Some(settled.map(|hit| {
            self.keep_owner(workflow, &hit);
            hit.value
        }))
    }

    /// Whether the negative cache holds a live answer that `hash` is unknown.
    fn known_unknown(&self, hash: &KeyHash) -> bool {
        if let Some(entry) = self.unknown.get(hash) {
            let ttl = self.unknown_ttl.load(Ordering::Relaxed);
            if live(entry.loaded, ttl, uptime_ms()) && self.key_valid(hash, entry.epoch) {
                self.count(|c| &c.key_cache_hits);
                return true;
            }
            self.unknown.remove(hash);
        }
        false
    }

    /// [`Auth::owner_within`] with a deadline of its own.
    pub async fn owner(&self, workflow: &str) -> Result<Option<Arc<str>>, AuthError> {
        self.owner_within(workflow, &mut Budget::default()).await
    }

    /// The owner of a workflow, `None` if it has none.
    pub async fn owner_within(
        &self,
        workflow: &str,
        budget: &mut Budget,
    ) -> Result<Option<Arc<str>>, AuthError> {
        if let Some(owner) = self.front_owner(workflow) {
            self.count(|c| &c.owner_cache_hits);
            return Ok(owner);
        }
        for _ in 0..RACE_RETRIES {
            let failures_before = self.owners.failures.load(Ordering::Acquire);
            if let Some(slot) = self.owners.cache.get(workflow)
                && let Some(answer) = self.settle_owner(workflow, slot, failures_before)
            {
                return answer;
            }
            let guard = match self.owners.cache.get_value_or_guard_async(workflow).await {
                Ok(slot) => match self.settle_owner(workflow, slot, failures_before) {
                    Some(answer) => return answer,
                    None => continue,
                },
                Err(guard) => guard,
            };
            self.count(|c| &c.owner_cache_misses);
            let loaded = uptime_ms();
            let epoch = self.epoch.load(Ordering::Acquire);
            match self.read(budget, self.store.get_owner(workflow)).await {
                Ok(owner) => {
                    let found = Fenced::new(owner.map(Arc::from), epoch, loaded);
                    let _ = guard.insert(Slot::Value(found.clone()));
                    if self.owner_valid(workflow, found.epoch) {
                        self.keep_owner(workflow, &found);
                        return Ok(found.value);
                    }
                    self.owners.drop_entry(workflow, &found);
                }
                Err(e) => {
                    let n = self.owners.failures.fetch_add(1, Ordering::AcqRel) + 1;
                    self.owners.hand_over(guard, workflow, Slot::Failed(n));
                    return Err(self.store_failed(&e));
                }
            }
        }
        match self.read(budget, self.store.get_owner(workflow)).await {
            Ok(owner) => Ok(owner.map(Arc::from)),
            Err(e) => Err(self.store_failed(&e)),
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

    /// Drops a key (after revocation): no answer read before this call is
    /// served after it returns.
    pub async fn invalidate_key(&self, hash: KeyHash) {
        let epoch = self.next_epoch();
        self.keys.fences.raise(hash, epoch);
        self.keys.cache.remove(&hash);
        self.unknown.remove(&hash);
        self.count(|c| &c.invalidations);
    }

    /// Drops a workflow's owner (after it changed or was removed).
    pub async fn invalidate_workflow(&self, workflow: &str) {
        let epoch = self.next_epoch();
        self.owners.fences.raise(workflow.to_owned(), epoch);
        self.owners.cache.remove(workflow);
        self.count(|c| &c.invalidations);
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

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

/// Whether a value loaded at `loaded` is within `ttl` at `now` (milliseconds
/// of [`uptime_ms`]). `loaded` is rounded down, so this never runs past the
/// TTL; a TTL under a millisecond keeps nothing.
fn live(loaded: u64, ttl: u64, now: u64) -> bool {
    now < loaded.saturating_add(ttl)
}

fn principal(record: KeyRecord) -> Principal {
    Principal::new(&record.id, &record.user_id, &record.prefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheSize;
    use crate::store::{LastUsed, StoreFuture, WorkflowOwner};
    use std::sync::Mutex;
    use std::time::Duration;
    use tokio::sync::Semaphore;

    /// A store whose key reads take their answer at once but return only
    /// when the test opens the gate: a read "in flight" across a revoke.
    struct GatedStore {
        keys: Mutex<Vec<KeyRecord>>,
        gate: Semaphore,
        reads: AtomicUsize,
        /// Key reads fail (after the gate) while set.
        down: std::sync::atomic::AtomicBool,
    }

    impl GatedStore {
        fn new(keys: Vec<KeyRecord>, permits: usize) -> Arc<GatedStore> {
            Arc::new(GatedStore {
                keys: Mutex::new(keys),
                gate: Semaphore::new(permits),
                reads: AtomicUsize::new(0),
                down: std::sync::atomic::AtomicBool::new(false),
            })
        }
    }

    impl Store for GatedStore {
        fn kind(&self) -> &'static str {
            "gated"
        }
        fn create_key(&self, _: KeyRecord) -> StoreFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn find_by_hash(&self, hash: KeyHash) -> StoreFuture<'_, Option<KeyRecord>> {
            let answer = self
                .keys
                .lock()
                .unwrap()
                .iter()
                .find(|k| k.hash == hash)
                .cloned();
            self.reads.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                self.gate.acquire().await.unwrap().forget();
                if self.down.load(Ordering::SeqCst) {
                    return Err(StoreError::Unavailable("down".into()));
                }
                Ok(answer)
            })
        }
        fn list_keys<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Vec<KeyRecord>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn revoke_key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, KeyRecord> {
            Box::pin(async move { Err(StoreError::UnknownKey(id.to_owned())) })
        }
        fn record_last_used(&self, _: Vec<LastUsed>) -> StoreFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn set_owner<'a>(&'a self, _: &'a str, _: &'a str) -> StoreFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
        fn remove_owner<'a>(&'a self, _: &'a str) -> StoreFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
        fn get_owner<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Option<String>> {
            Box::pin(async { Ok(None) })
        }
        fn list_workflows(&self) -> StoreFuture<'_, Vec<WorkflowOwner>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn ping(&self) -> StoreFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn a_read_begun_before_a_revoke_never_answers_after_it() {
        let hash = KeyHash::of("wfb_race");
        let store = GatedStore::new(vec![record(hash)], 0);
        let auth = auth_over(store.clone(), Duration::from_secs(60));
        // A's read takes the old answer and waits at the gate.
        let a = tokio::spawn({
            let auth = auth.clone();
            async move { auth.authenticate(hash).await }
        });
        while store.reads.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // The key is revoked in the store and on this instance.
        store.keys.lock().unwrap().clear();
        auth.invalidate_key(hash).await;
        // B arrives after the revoke and joins A's read.
        let b = tokio::spawn({
            let auth = auth.clone();
            async move { auth.authenticate(hash).await }
        });
        tokio::task::yield_now().await;
        store.gate.add_permits(100);
        assert_eq!(b.await.unwrap().err(), Some(AuthError::InvalidKey));
        // A began before the revoke: either answer is acceptable for it.
        let _ = a.await.unwrap();
        assert_eq!(
            auth.authenticate(hash).await.err(),
            Some(AuthError::InvalidKey)
        );
    }

    #[tokio::test]
    async fn front_copies_fall_with_the_entry_they_copy() {
        let hash = KeyHash::of("wfb_front");
        let store = GatedStore::new(vec![record(hash)], 1000);
        let auth = auth_over(store.clone(), Duration::from_secs(60));
        let reads = || store.reads.load(Ordering::SeqCst);
        for _ in 0..3 {
            assert_eq!(auth.authenticate(hash).await.unwrap().key_id(), "key_1");
        }
        assert_eq!(reads(), 1);
        assert!(auth.front_key(&hash).is_some());

        // A revoke voids the front copy on every thread at once: the fence
        // is shared, the copy is checked against it on each use.
        store.keys.lock().unwrap().clear();
        auth.invalidate_key(hash).await;
        assert!(auth.front_key(&hash).is_none());
        assert_eq!(
            auth.authenticate(hash).await.err(),
            Some(AuthError::InvalidKey)
        );
        assert_eq!(reads(), 2);

        // So does a whole-cache flush.
        store.keys.lock().unwrap().push(record(hash));
        auth.invalidate_all();
        assert!(auth.authenticate(hash).await.is_ok());
        assert_eq!(reads(), 3);
        auth.invalidate_all();
        assert!(auth.front_key(&hash).is_none());

        // Another `Auth` on this thread has fronts of its own.
        let other = auth_over(store.clone(), Duration::from_secs(60));
        assert!(other.front_key(&hash).is_none());
    }

    #[test]
    fn cached_copies_never_outlive_the_ttl() {
        // Loaded in millisecond 10 (rounded down) with a 5 ms TTL: served
        // in milliseconds 10 to 14, not in 15, whatever the fraction was.
        assert!(live(10, 5, 10) && live(10, 5, 14));
        assert!(!live(10, 5, 15));
        assert!(!live(10, 0, 10));
        assert!(live(u64::MAX - 1, 5, u64::MAX - 1));
    }

    fn record(hash: KeyHash) -> KeyRecord {
        KeyRecord {
            id: "key_1".into(),
            user_id: "u".into(),
            name: String::new(),
            prefix: "wfb_test".into(),
            hash,
            created_at: 0,
            last_used_at: None,
        }
    }

    fn auth_over(store: Arc<GatedStore>, ttl: Duration) -> Arc<Auth> {
        let size = CacheSize { capacity: 100, ttl };
        let config = CacheConfig {
            keys: size,
            negative: size,
            owners: size,
        };
        Arc::new(Auth::new(store, &config, Arc::new(Metrics::new([]))))
    }

    #[tokio::test]
    async fn a_cached_key_is_read_again_once_its_ttl_has_passed() {
        let hash = KeyHash::of("wfb_ttl");
        let store = GatedStore::new(vec![record(hash)], 1000);
        let auth = auth_over(store.clone(), Duration::from_millis(20));
        assert!(auth.authenticate(hash).await.is_ok());
        assert_eq!(store.reads.load(Ordering::SeqCst), 1);
        // Past the TTL neither the front copy nor the cache entry answers,
        // whichever thread asks.
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(auth.front_key(&hash).is_none());
        assert!(auth.authenticate(hash).await.is_ok());
        assert_eq!(store.reads.load(Ordering::SeqCst), 2);
        assert_eq!(auth.cached_keys(), 1);
    }

    #[tokio::test]
    async fn requests_waiting_on_a_failed_read_share_its_failure() {
        let hash = KeyHash::of("wfb_down");
        let store = GatedStore::new(vec![record(hash)], 0);
        store.down.store(true, Ordering::SeqCst);
        let auth = auth_over(store.clone(), Duration::from_secs(60));
        let reads = || store.reads.load(Ordering::SeqCst);
        let waiting: Vec<_> = (0..5)
            .map(|_| {
                let auth = auth.clone();
                tokio::spawn(async move { auth.authenticate(hash).await })
            })
            .collect();
        while reads() == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // The one read fails.
        store.gate.add_permits(1);
        while auth.keys.failures.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // A request that comes after the failure reads the store again,
        // and that read hangs; the five that waited on the failed read
        // must not wait on it too.
        store.down.store(false, Ordering::SeqCst);
        let later = tokio::spawn({
            let auth = auth.clone();
            async move { auth.authenticate(hash).await }
        });
        while reads() < 2 {
            tokio::task::yield_now().await;
        }
        for request in waiting {
            let answer = tokio::time::timeout(Duration::from_secs(10), request)
                .await
                .expect("a waiter was left behind the later read");
            assert_eq!(answer.unwrap().err(), Some(AuthError::Unavailable));
        }
        assert_eq!(reads(), 2);
        assert_eq!(auth.cached_keys(), 0);
        store.gate.add_permits(1);
        assert!(later.await.unwrap().is_ok());
        assert_eq!(auth.cached_keys(), 1);
    }

    #[tokio::test]
    async fn requests_waiting_on_a_read_that_finds_nothing_share_it() {
        let hash = KeyHash::of("wfb_nobody");
        let store = GatedStore::new(Vec::new(), 0);
        let auth = auth_over(store.clone(), Duration::from_secs(60));
        let waiting: Vec<_> = (0..5)
            .map(|_| {
                let auth = auth.clone();
                tokio::spawn(async move { auth.authenticate(hash).await })
            })
            .collect();
        while store.reads.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        store.gate.add_permits(100);
        for request in waiting {
            assert_eq!(request.await.unwrap().err(), Some(AuthError::InvalidKey));
        }
        assert_eq!(store.reads.load(Ordering::SeqCst), 1);
        // The hand-over leaves nothing in the key cache.
        assert_eq!(auth.keys.cache.len(), 0);
    }

    #[test]
    fn principal_keeps_both_ids_and_the_prefix() {
        let p = Principal::new("key_abc", "user_1", "wfb_1234567");
        assert_eq!(
            (p.key_id(), p.user_id(), p.prefix()),
            ("key_abc", "user_1", "wfb_1234567")
        );
        let short = Principal::new("k", "", "wfb_");
        assert_eq!(
            (short.key_id(), short.user_id(), short.prefix()),
            ("k", "", "wfb_")
        );
        assert_eq!(Principal::new("k", "u", "wfb_é").prefix(), "");
    }

    #[test]
    fn key_rate_counts_per_fixed_window() {
        let p = Principal::new("k", "u", "wfb_1234567");
        for _ in 0..3 {
            assert_eq!(p.admit(10_000, 1000, 3), Ok(()));
        }
        assert_eq!(p.admit(10_250, 1000, 3), Err(750));
        assert_eq!(p.admit(11_000, 1000, 3), Ok(()));
    }
}
