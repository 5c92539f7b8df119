//! Invalidations over Redis pub/sub: published with `PUBLISH` on
//! `<prefix>invalidate`, received on a dedicated subscribed connection
//! that is checked with a PING every [`PING_EVERY`].

use super::{Listening, PING_EVERY, apply, back_off, now_subscribed, parse};
use crate::auth::Auth;
use crate::config::RedisConfig;
use futures_core::Stream;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub(super) struct RedisBus {
    publisher: ConnectionManager,
    channel: String,
    pub(super) listening: Listening,
}

impl RedisBus {
    pub(super) fn new(config: &RedisConfig, auth: Arc<Auth>) -> Result<RedisBus, String> {
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
        Ok(RedisBus {
            publisher,
            channel,
            listening: Listening { subscribed, task },
        })
    }

    pub(super) async fn publish(&self, message: String) -> bool {
        for attempt in 0..3 {
            let mut conn = self.publisher.clone();
            let sent: Result<i64, _> = redis::cmd("PUBLISH")
                .arg(&self.channel)
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
                tokio::time::sleep(back_off(&mut backoff)).await;
                continue;
            }
            Err(_) => {
                tokio::time::sleep(back_off(&mut backoff)).await;
                continue;
            }
        };
        now_subscribed(&auth, &subscribed, &mut ever);
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
