//! Cache invalidation across instances. With Redis, a revoke or an owner
//! change publishes the key hash or workflow id on `<prefix>invalidate`, and
//! every instance drops that entry on receipt. The subscription runs on a
//! dedicated pub/sub connection that this module re-establishes itself;
//! after every (re)subscription the instance flushes all its caches, since
//! messages sent while it was not listening are lost.
//!
//! With the embedded store there is one instance and nobody to tell.

use crate::auth::Auth;
use crate::config::RedisConfig;
use crate::key::KeyHash;
use futures_core::Stream;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;

pub struct Invalidator {
    bus: Option<RedisBus>,
}

struct RedisBus {
    publisher: ConnectionManager,
    channel: String,
    /// True while the subscription is live; `/readyz` reports it.
    subscribed: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

/// How often the subscriber checks its connection with a PING.
const PING_EVERY: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

impl Invalidator {
    /// For a store that only one instance uses.
    pub fn local() -> Invalidator {
        Invalidator { bus: None }
    }

    /// Publishes to, and subscribes on, the Redis invalidation channel;
    /// received messages are applied to `auth`.
    pub fn redis(config: &RedisConfig, auth: Arc<Auth>) -> Result<Invalidator, String> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| format!("invalid redis url: {e}"))?;
        let publisher = ConnectionManager::new_lazy_with_config(
            client.clone(),
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(config.timeout))
                .set_response_timeout(Some(config.timeout))
                .set_number_of_retries(1),
        )
        .map_err(|e| format!("redis: {e}"))?;
        let channel = format!("{}invalidate", config.prefix);
        let subscribed = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(subscribe(
            client,
            channel.clone(),
            config.timeout,
            auth,
            subscribed.clone(),
        ));
        Ok(Invalidator {
            bus: Some(RedisBus {
                publisher,
                channel,
                subscribed,
                task,
            }),
        })
    }

    /// False while a shared store's invalidation stream is down.
    pub fn ready(&self) -> bool {
        self.bus
            .as_ref()
            .is_none_or(|b| b.subscribed.load(Ordering::Acquire))
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
        let Some(bus) = &self.bus else { return true };
        for attempt in 0..3 {
            let mut conn = bus.publisher.clone();
            let sent: Result<i64, _> = redis::cmd("PUBLISH")
                .arg(&bus.channel)
                .arg(&message)
                .query_async(&mut conn)
                .await;
            match sent {
                Ok(_) => return true,
                Err(e) if attempt == 2 => {
                    // Other instances hold the entry until its TTL, or until
                    // they resubscribe and flush.
                    tracing::error!(error = %e, "could not publish a cache invalidation");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        false
    }
}

impl Drop for Invalidator {
    fn drop(&mut self) {
        if let Some(bus) = &self.bus {
            bus.task.abort();
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

async fn subscribe(
    client: redis::Client,
    channel: String,
    timeout: Duration,
    auth: Arc<Auth>,
    subscribed: Arc<AtomicBool>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut ever = false;
    loop {
        let connected = tokio::time::timeout(timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let pubsub = match connected {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "invalidation subscribe failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        // Anything cached may predate a message we never saw.
        auth.invalidate_all();
        subscribed.store(true, Ordering::Release);
        if ever {
            tracing::info!("invalidation stream resubscribed; caches flushed");
        }
        ever = true;
        backoff = Duration::from_millis(50);

        let (mut sink, stream) = pubsub.split();
        let mut stream: Pin<Box<dyn Stream<Item = redis::Msg> + Send>> = Box::pin(stream);
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                message = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)) => {
                    let Some(message) = message else { break };
                    apply(&auth, parse(message.get_payload_bytes()));
                }
                _ = ping.tick() => {
                    // On a subscribed RESP2 connection PING answers
                    // ["pong", ""], so take any value as a sign of life.
                    let alive = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        subscribed.store(false, Ordering::Release);
        tracing::warn!("invalidation stream lost; resubscribing");
    }
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
