//! Cache invalidation across instances. A revoke or an owner change is
//! published as `key:<hash hex>` or `workflow:<id>` (or `flush` when what
//! changed is unknown), and every instance drops that entry on receipt:
//! - with Redis, on the `<prefix>invalidate` pub/sub channel ([`redis`]);
//! - with postgres, by `pg_notify` on the configured channel, which the
//!   engine's own writes reach too, through the triggers `keygate store
//!   prepare` installs ([`postgres`]).
//!
//! Each instance listens on a dedicated connection that this module
//! re-establishes itself (on a Redis Cluster, two, on different nodes, so
//! losing one node is no gap); whenever a subscription comes up while none
//! was, it flushes all its caches, since messages sent while it was not
//! listening are lost.
//!
//! With the embedded store there is one instance and nobody to tell.

mod postgres;
mod redis;

use crate::auth::Auth;
use crate::config::PostgresConfig;
use crate::key::KeyHash;
use crate::store::postgres::PostgresStore;
use crate::store::redis::RedisStore;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;

pub struct Invalidator {
    bus: Option<Bus>,
}

enum Bus {
    Redis(redis::RedisBus),
    Postgres(postgres::PostgresBus),
}

/// An instance's listeners: how many are subscribed (`/readyz` reports
/// whether any is), and their tasks.
struct Listening {
    live: Arc<Live>,
    tasks: Vec<JoinHandle<()>>,
}

/// How many of an instance's subscriptions are up.
#[derive(Default)]
struct Live {
    count: AtomicUsize,
    ever: AtomicBool,
}

impl Live {
    /// A subscription is up. When none was, anything cached may predate a
    /// message this instance never received: flush. (Called once listening,
    /// so nothing sent after the flush is missed.)
    fn up(&self, auth: &Auth) {
        if self.count.fetch_add(1, Ordering::AcqRel) == 0 {
            auth.invalidate_all();
            if self.ever.swap(true, Ordering::AcqRel) {
                tracing::info!("invalidation stream resubscribed; caches flushed");
            }
        }
    }

    fn down(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }

    fn any(&self) -> bool {
        self.count() > 0
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

/// How often a listener checks its connection.
const PING_EVERY: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

impl Invalidator {
    /// For a store that only one instance uses.
    pub fn local() -> Invalidator {
        Invalidator { bus: None }
    }

    /// Publishes to, and subscribes on, the Redis invalidation channel;
    /// received messages are applied to `auth`.
    pub fn redis(store: Arc<RedisStore>, auth: Arc<Auth>) -> Invalidator {
        Invalidator {
            bus: Some(Bus::Redis(redis::RedisBus::new(store, auth))),
        }
    }

    /// Notifies through `store`, and listens on the postgres channel.
    pub fn postgres(
        config: &PostgresConfig,
        store: Arc<PostgresStore>,
        auth: Arc<Auth>,
    ) -> Invalidator {
        Invalidator {
            bus: Some(Bus::Postgres(postgres::PostgresBus::new(
                config, store, auth,
            ))),
        }
    }

    /// False while a shared store's invalidation stream is down.
    pub fn ready(&self) -> bool {
        let listening = match &self.bus {
            None => return true,
            Some(Bus::Redis(bus)) => &bus.listening,
            Some(Bus::Postgres(bus)) => &bus.listening,
        };
        listening.live.any()
    }

    /// The listeners' gauge, in Prometheus text: how many subscriptions are
    /// up (none with the embedded store).
    pub fn render_metrics(&self) -> String {
        let (live, held) = match &self.bus {
            None => (0, 0),
            Some(Bus::Redis(bus)) => (bus.listening.live.count(), bus.listening.tasks.len()),
            Some(Bus::Postgres(bus)) => (bus.listening.live.count(), bus.listening.tasks.len()),
        };
        format!(
            "# HELP keygate_invalidation_subscriptions Invalidation subscriptions up, of keygate_invalidation_listeners.\n\
             # TYPE keygate_invalidation_subscriptions gauge\nkeygate_invalidation_subscriptions {live}\n\
             # HELP keygate_invalidation_listeners Invalidation listeners this instance runs.\n\
             # TYPE keygate_invalidation_listeners gauge\nkeygate_invalidation_listeners {held}\n"
        )
    }

    /// Each of these returns false when other instances may not have been
    /// told (the publish failed).
    pub async fn key_revoked(&self, hash: KeyHash) -> bool {
        self.publish(format!("key:{}", hash.to_hex())).await
    }

    pub async fn workflow_changed(&self, workflow: &str) -> bool {
        self.publish(format!("workflow:{workflow}")).await
    }

    /// Asks every instance to drop all cached answers, for when a change may
    /// have happened but which one is unknown (a write that timed out).
    pub async fn flush_all(&self) -> bool {
        self.publish("flush".to_owned()).await
    }

    async fn publish(&self, message: String) -> bool {
        match &self.bus {
            None => true,
            Some(Bus::Redis(bus)) => bus.publish(message).await,
            Some(Bus::Postgres(bus)) => bus.publish(message).await,
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What one invalidation message asks for.
#[derive(Debug, PartialEq, Eq)]
enum Message {
    Key(KeyHash),
    Workflow(String),
    /// `flush`, or anything unreadable: drop everything.
    Flush,
}

fn parse(payload: &[u8]) -> Message {
    let text = std::str::from_utf8(payload).unwrap_or("");
    if let Some(hash) = text.strip_prefix("key:").and_then(KeyHash::from_hex) {
        return Message::Key(hash);
    }
    if let Some(workflow) = text.strip_prefix("workflow:") {
        return Message::Workflow(workflow.to_owned());
    }
    if text != "flush" {
        tracing::warn!("unreadable invalidation message; flushing caches");
    }
    Message::Flush
}

fn apply(auth: &Auth, message: Message) {
    match message {
        Message::Key(hash) => auth.invalidate_key(hash),
        Message::Workflow(w) => auth.invalidate_workflow(&w),
        Message::Flush => auth.invalidate_all(),
    }
}

/// The next wait before subscribing again.
fn back_off(backoff: &mut Duration) -> Duration {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    wait
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_and_anything_else_flushes() {
        let hash = KeyHash::of("wfb_x");
        assert_eq!(
            parse(format!("key:{}", hash.to_hex()).as_bytes()),
            Message::Key(hash)
        );
        assert_eq!(parse(b"workflow:wf_1"), Message::Workflow("wf_1".into()));
        assert_eq!(parse(b"flush"), Message::Flush);
        assert_eq!(parse(b"key:zz"), Message::Flush);
        assert_eq!(parse(&[0xff, 0xfe]), Message::Flush);
    }
}
