//! The key path: front copy, key cache, negative cache, then one shared
//! store read per hash.

use super::cache::Slot;
use super::fence::{Fenced, live, now};
use super::principal::{Policy, Principal};
use super::{Auth, AuthError, Budget, RACE_RETRIES};
use crate::key::KeyHash;
use crate::store::KeyRecord;
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl Auth {
    pub(super) fn front_key(&self, hash: &KeyHash) -> Option<Arc<Principal>> {
        self.with_front(|front| {
            let entry = front.keys.get(hash)?;
            if self.key_usable(hash, entry) {
                return Some(entry.value.clone());
            }
            front.keys.remove(hash);
            None
        })
    }

    pub(super) fn keep_key(&self, hash: KeyHash, entry: &Fenced<Arc<Principal>>) {
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

    /// Whether a key answer read at `epoch` may still be served.
    pub(super) fn key_valid(&self, hash: &KeyHash, epoch: u64) -> bool {
        self.fresh(epoch) && !self.keys.fences.is_stale(hash, epoch)
    }

    /// Whether a cached key answer may be served now: within its TTL and
    /// not void by an invalidation.
    pub(super) fn key_usable(&self, hash: &KeyHash, entry: &Fenced<Arc<Principal>>) -> bool {
        live(entry.loaded, self.keys.ttl(), now()) && self.key_valid(hash, entry.epoch)
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
            let loaded = now();
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

    pub(super) fn settle_key(
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

    /// Whether the negative cache holds a live answer that `hash` is unknown.
    pub(super) fn known_unknown(&self, hash: &KeyHash) -> bool {
        if let Some(entry) = self.unknown.get(hash) {
            let ttl = self.unknown_ttl.load(Ordering::Relaxed);
            if live(entry.loaded, ttl, now()) && self.key_valid(hash, entry.epoch) {
                self.count(|c| &c.key_cache_hits);
                return true;
            }
            self.unknown.remove(hash);
        }
        false
    }

    /// Drops a key (after revocation): no answer read before this call is
    /// served after it returns.
    pub fn invalidate_key(&self, hash: KeyHash) {
        let epoch = self.next_epoch();
        self.keys.fences.raise(hash, epoch);
        self.keys.cache.remove(&hash);
        self.unknown.remove(&hash);
        self.count(|c| &c.invalidations);
    }
}

pub(super) fn principal(record: KeyRecord) -> Principal {
    Principal::new(&record.id, &record.user_id, &record.prefix).with_policy(Policy {
        expires_at: record.expires_at,
        workflows: record
            .workflows
            .map(|list| list.into_iter().map(String::into_boxed_str).collect()),
        rate: record.rate,
    })
}
