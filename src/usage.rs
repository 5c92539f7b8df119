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
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The in-memory side, shared with every request.
pub struct Usage {
    pending: DashMap<Box<str>, LastUsed>,
    max_pending: usize,
    metrics: Arc<Metrics>,
}

impl Usage {
    pub fn new(max_pending: usize, metrics: Arc<Metrics>) -> Usage {
        Usage {
            pending: DashMap::new(),
            max_pending,
            metrics,
        }
    }

    /// Notes a successful authentication at `at` (Unix ms). Within one
    /// millisecond only the first use of a key reaches the pending map.
    pub fn note(&self, principal: &Principal, hash: KeyHash, at: i64) {
        if principal.last_noted.fetch_max(at, Ordering::Relaxed) < at {
            self.record(principal.key_id(), hash, at);
        }
    }

    /// Adds `at` to the pending batch (newest time wins).
    pub fn record(&self, key_id: &str, hash: KeyHash, at: i64) {
        if let Some(mut entry) = self.pending.get_mut(key_id) {
            if entry.at < at {
                entry.at = at;
            }
            return;
        }
        if self.pending.len() >= self.max_pending {
            self.metrics
                .local()
                .usage_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.pending.insert(
            key_id.into(),
            LastUsed {
                id: key_id.to_owned(),
                hash,
                at,
            },
        );
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Writes everything pending in one store call. Entries noted while the
    /// write was in flight, with a newer time, stay for the next flush.
    pub async fn flush(&self, store: &dyn Store) -> Result<usize, crate::store::StoreError> {
        let batch: Vec<LastUsed> = self.pending.iter().map(|e| e.value().clone()).collect();
        self.metrics
            .local()
            .usage_pending
            .store(batch.len() as u64, Ordering::Relaxed);
        if batch.is_empty() {
            return Ok(0);
        }
        let written = batch.len();
        match store.record_last_used(batch.clone()).await {
            Ok(()) => {
                for used in batch {
                    self.pending
                        .remove_if(used.id.as_str(), |_, pending| pending.at <= used.at);
                }
                self.metrics
                    .local()
                    .usage_flushes_ok
                    .fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .local()
                    .usage_writes
                    .fetch_add(written as u64, Ordering::Relaxed);
                self.metrics
                    .local()
                    .usage_pending
                    .store(self.pending.len() as u64, Ordering::Relaxed);
                Ok(written)
            }
            Err(e) => {
                self.metrics
                    .local()
                    .usage_flushes_failed
                    .fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .local()
                    .store_errors
                    .fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

/// Owns the flush task.
pub struct UsageHandle {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl UsageHandle {
    /// Starts the flush loop on the current runtime.
    pub fn spawn(usage: Arc<Usage>, store: Arc<dyn Store>, interval: Duration) -> UsageHandle {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
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
        });
        UsageHandle {
            stop,
            task: Some(task),
        }
    }

    /// Stops the loop, then flushes what is pending, retrying until
    /// `deadline` passes. Returns how many keys were still unwritten.
    pub async fn shutdown(mut self, usage: &Usage, store: &dyn Store, deadline: Duration) -> usize {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let until = tokio::time::Instant::now() + deadline;
        loop {
            match usage.flush(store).await {
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
