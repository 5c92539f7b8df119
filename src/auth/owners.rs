//! The owner path: front copy, owner cache, then one shared store read per
//! workflow ("no owner" is an answer, cached like the others).

use super::cache::Slot;
use super::fence::{Fenced, live, now};
use super::{Auth, AuthError, Budget, RACE_RETRIES};
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl Auth {
    pub(super) fn front_owner(&self, workflow: &str) -> Option<Option<Arc<str>>> {
        self.with_front(|front| {
            let entry = front.owners.get(workflow)?;
            if self.owner_usable(workflow, entry) {
                return Some(entry.value.clone());
            }
            front.owners.remove(workflow);
            None
        })
    }

    pub(super) fn keep_owner(&self, workflow: &str, entry: &Fenced<Option<Arc<str>>>) {
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

    pub(super) fn owner_valid(&self, workflow: &str, epoch: u64) -> bool {
        self.fresh(epoch) && !self.owners.fences.is_stale(workflow, epoch)
    }

    pub(super) fn owner_usable(&self, workflow: &str, entry: &Fenced<Option<Arc<str>>>) -> bool {
        live(entry.loaded, self.owners.ttl(), now()) && self.owner_valid(workflow, entry.epoch)
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
            let loaded = now();
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

    pub(super) fn settle_owner(
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

    /// Drops a workflow's owner (after it changed or was removed).
    pub fn invalidate_workflow(&self, workflow: &str) {
        let epoch = self.next_epoch();
        self.owners.fences.raise(workflow.to_owned(), epoch);
        self.owners.cache.remove(workflow);
        self.count(|c| &c.invalidations);
    }
}
