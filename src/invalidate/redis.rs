//! Invalidations over Redis pub/sub: published with `PUBLISH` through the
//! store's connection (on a cluster any node takes it and passes it to
//! every node), received on a subscribed connection of its own to one node,
//! checked with a PING every [`PING_EVERY`]. When that connection goes
//! (`CLIENT KILL`, the node lost) the listener subscribes again, on the next
//! node it knows if that one does not answer, and flushes the caches: a gap
//! is never trusted to have been empty.

use super::{Listening, PING_EVERY, apply, back_off, now_subscribed, parse};
use crate::auth::Auth;
use crate::store::redis::{RedisStore, node_client};
use futures_core::Stream;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub(super) struct RedisBus {
    store: Arc<RedisStore>,
    channel: String,
    pub(super) listening: Listening,
}

impl RedisBus {
    pub(super) fn new(store: Arc<RedisStore>, auth: Arc<Auth>) -> RedisBus {
        let channel = format!("{}invalidate", store.config().prefix);
        let subscribed = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(subscribe(
            store.clone(),
            channel.clone(),
            auth,
            subscribed.clone(),
        ));
        RedisBus {
            store,
            channel,
            listening: Listening { subscribed, task },
        }
    }

    pub(super) async fn publish(&self, message: String) -> bool {
        for attempt in 0..3 {
            match self.store.publish(&self.channel, &message).await {
                Ok(()) => return true,
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

async fn subscribe(
    store: Arc<RedisStore>,
    channel: String,
    auth: Arc<Auth>,
    subscribed: Arc<AtomicBool>,
) {
    let config = store.config().clone();
    let timeout = config.timeout;
    let mut nodes: Vec<String> = config.nodes.urls().to_vec();
    let mut next = 0usize;
    let mut backoff = Duration::from_millis(50);
    let mut ever = false;
    loop {
        let url = nodes[next % nodes.len()].clone();
        next = next.wrapping_add(1);
        let connected = tokio::time::timeout(timeout, async {
            let client = node_client(&config, &url).map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "client", e))
            })?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let pubsub = match connected {
            Ok(Ok(pubsub)) => pubsub,
            failed => {
                if let Ok(Err(e)) = failed {
                    tracing::debug!(error = %e, node = %redacted(&url), "invalidation subscribe failed");
                }
                // Every node tried since the last success: wait before the next round.
                if next % nodes.len() == 0 {
                    tokio::time::sleep(back_off(&mut backoff)).await;
                }
                if let Ok(found) = store.node_urls().await
                    && !found.is_empty()
                {
                    nodes = found;
                }
                continue;
            }
        };
        // Listening first, then the flush.
        now_subscribed(&auth, &subscribed, &mut ever);
        backoff = Duration::from_millis(50);
        tracing::debug!(node = %redacted(&url), "invalidation stream subscribed");

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
        // The same node first, in case only the connection went.
        next = next.wrapping_sub(1);
        tracing::warn!("invalidation stream lost; resubscribing");
    }
}

/// A node's URL without its password, for logs.
fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://…@{host}"),
        _ => url.to_owned(),
    }
}
