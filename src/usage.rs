//! The last-used batcher: successful authentications note a time in memory;
//! one background task writes the batch every `flush_interval` in one store
//! call. A failed write is retried on the next tick, and the pending set is
//! bounded (newest time wins per key). The task is owned by [`UsageHandle`]:
//! dropping it stops the task, and [`UsageHandle::shutdown`] does a final
//! flush.

use crate::auth::Principal;
use crate::key::KeyHash;
use crate::metrics::Metrics;
use crate::store::{LastUsed, Store};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The in-memory side, shared with every request.
pub struct Usage {
    pending: DashMap<Box<str>, LastUsed>,
    /// Entries in `pending`, counted beside it: `DashMap::len` would take
    /// every shard's lock, and cannot be called while holding an entry.
    count: AtomicUsize,
    max_pending: usize,
    metrics: Arc<Metrics>,
}

/// Keys written per store call; a backlog after an outage goes in several.
const BATCH: usize = 1000;

impl Usage {
    pub fn new(max_pending: usize, metrics: Arc<Metrics>) -> Usage {
        Usage {
            pending: DashMap::new(),
            count: AtomicUsize::new(0),
            max_pending,
            metrics,
        }
    }

    /// Notes a successful authentication at `at` (Unix ms), on the request
    /// path: within one millisecond only the first use of a key reaches the
    /// pending map.
    pub fn note_use(&self, principal: &Principal, hash: KeyHash, at: i64) {
        if principal.last_noted.fetch_max(at, Ordering::Relaxed) < at {
            self.add_pending(principal.key_id(), hash, at);
        }
    }

    /// Adds `at` to the batch to be written: the newest time wins; a key
    /// not yet pending is dropped (and counted) when `max_pending` keys are.
    pub fn add_pending(&self, key_id: &str, hash: KeyHash, at: i64) {
        if let Some(mut entry) = self.pending.get_mut(key_id) {
            entry.at = entry.at.max(at);
            return;
        }
        if self.count.load(Ordering::Relaxed) >= self.max_pending {
            self.metrics
                .local()
                .usage_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.pending.entry(key_id.into()) {
            Entry::Occupied(mut e) => e.get_mut().at = e.get().at.max(at),
            Entry::Vacant(e) => {
                e.insert(LastUsed {
                    id: key_id.to_owned(),
                    hash,
                    at,
                });
                self.count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn pending(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Writes what is pending, `BATCH` keys per store call. Entries noted
    /// while a write was in flight, with a newer time, stay for the next
    /// flush; on a failure the rest stays too and the error is returned.
    pub async fn flush(&self, store: &dyn Store) -> Result<usize, crate::store::StoreError> {
        let counters = self.metrics.local();
        let rounds = self.pending().div_ceil(BATCH);
        let mut written = 0;
        for _ in 0..rounds {
            let batch: Vec<LastUsed> = self
                .pending
                .iter()
                .take(BATCH)
                .map(|e| e.value().clone())
                .collect();
            if batch.is_empty() {
                break;
            }
            if let Err(e) = store.record_last_used(batch.clone()).await {
                counters
                    .usage_flushes_failed
                    .fetch_add(1, Ordering::Relaxed);
                counters.store_errors.fetch_add(1, Ordering::Relaxed);
                counters
                    .usage_pending
                    .store(self.pending() as u64, Ordering::Relaxed);
                return Err(e);
            }
            for used in &batch {
                let removed = self
                    .pending
                    .remove_if(used.id.as_str(), |_, pending| pending.at <= used.at);
                if removed.is_some() {
                    self.count.fetch_sub(1, Ordering::Relaxed);
                }
            }
            written += batch.len();
            counters.usage_flushes_ok.fetch_add(1, Ordering::Relaxed);
            counters
                .usage_writes
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        counters
            .usage_pending
            .store(self.pending() as u64, Ordering::Relaxed);
        Ok(written)
    }
}

/// Owns the flush task, and what its final flush needs.
pub struct UsageHandle {
    usage: Arc<Usage>,
    store: Arc<dyn Store>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl UsageHandle {
    /// Starts the flush loop on the current runtime.
    pub fn spawn(usage: Arc<Usage>, store: Arc<dyn Store>, interval: Duration) -> UsageHandle {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn({
            let (usage, store) = (usage.clone(), store.clone());
            async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stopped.changed() => break,
                    }
                    if let Err(e) = usage.flush(store.as_ref()).await {
                        tracing::warn!(error = %e, pending = usage.pending(), "lastUsedAt flush failed; will retry");
                    }
                }
            }
        });
        UsageHandle {
            usage,
            store,
            stop,
            task: Some(task),
        }
    }

    /// Stops the loop, then flushes what is pending, retrying until
    /// `deadline` passes. Returns how many keys were still unwritten.
    pub async fn shutdown(mut self, deadline: Duration) -> usize {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let (usage, store) = (self.usage.clone(), self.store.clone());
        let until = tokio::time::Instant::now() + deadline;
        loop {
            match usage.flush(store.as_ref()).await {
                Ok(_) if usage.pending() == 0 => return 0,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "final lastUsedAt flush failed"),
            }
            if tokio::time::Instant::now() >= until {
                let left = usage.pending();
                tracing::error!(pending = left, "gave up writing lastUsedAt at shutdown");
                return left;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for UsageHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_time_wins_and_the_bound_holds() {
        let usage = Usage::new(2, Arc::new(Metrics::new([])));
        let h = KeyHash::of("wfb_a");
        usage.add_pending("a", h, 5);
        usage.add_pending("a", h, 3);
        usage.add_pending("b", h, 1);
        usage.add_pending("c", h, 1);
        assert_eq!(usage.pending(), 2);
        assert_eq!(usage.pending.get("a").unwrap().at, 5);
        assert!(usage.pending.get("c").is_none());
        usage.add_pending("a", h, 9);
        assert_eq!(usage.pending.get("a").unwrap().at, 9);
    }
}
