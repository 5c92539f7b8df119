//! Invalidations over Redis pub/sub: published with `PUBLISH` through the
//! store's connection (on a cluster, to every node), received on a
//! subscribed connection of its own, checked with a PING every
//! [`PING_EVERY`]. On a cluster an instance holds two subscriptions, on
//! different nodes, so that losing one node need not be a gap. When a
//! subscription goes (`CLIENT KILL`, the node lost) its listener subscribes
//! again, on the next node it knows if that one does not answer. The
//! caches are flushed unless another subscription, made before the lost
//! one's last sign of life, answers a PING now (then it heard everything
//! the lost one may have missed), and whenever one comes up while none was:
//! a gap is never trusted to have been empty.

use super::{Listening, Live, PING_EVERY, apply, back_off, parse};
use crate::auth::Auth;
use crate::store::redis::{RedisStore, node_client};
use futures_core::Stream;
use redis::aio::PubSubSink;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(super) struct RedisBus {
    store: Arc<RedisStore>,
    channel: String,
    pub(super) listening: Listening,
}

/// Subscriptions an instance holds on a cluster.
const CLUSTER_LISTENERS: usize = 2;

/// What an instance's listeners share: the channel, each one's
/// subscription, and the node each is on (each prefers one the others are
/// not on).
struct Shared {
    store: Arc<RedisStore>,
    channel: String,
    auth: Arc<Auth>,
    live: Arc<Live>,
    held: Mutex<Vec<Option<Held>>>,
    /// The node each listener is on or connecting to.
    picked: Mutex<Vec<Option<String>>>,
}

/// A listener's subscription: since when, the last moment it was known to
/// be up (a PING it answered, a message it brought), and a handle to PING
/// it.
#[derive(Clone)]
struct Held {
    since: Instant,
    proof: Instant,
    sink: PubSubSink,
}

impl RedisBus {
    pub(super) fn new(store: Arc<RedisStore>, auth: Arc<Auth>) -> RedisBus {
        let channel = format!("{}invalidate", store.config().prefix);
        let live = Arc::new(Live::default());
        let listeners = if store.is_cluster() {
            CLUSTER_LISTENERS
        } else {
            1
        };
        let shared = Arc::new(Shared {
            store: store.clone(),
            channel: channel.clone(),
            auth,
            live: live.clone(),
            held: Mutex::new(vec![None; listeners]),
            picked: Mutex::new(vec![None; listeners]),
        });
        let tasks = (0..listeners)
            .map(|index| tokio::spawn(subscribe(shared.clone(), index)))
            .collect();
        RedisBus {
            store,
            channel,
            listening: Listening { live, tasks },
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

/// One listener: subscribed on one node at a time, starting at the
/// `index`th it knows.
async fn subscribe(shared: Arc<Shared>, index: usize) {
    let store = &shared.store;
    let config = store.config().clone();
    let timeout = config.timeout;
    let mut nodes: Vec<String> = config.nodes.urls().to_vec();
    if store.is_cluster()
        && let Ok(found) = store.node_urls().await
        && !found.is_empty()
    {
        nodes = found;
    }
    let mut next = index;
    let mut tried = 0usize;
    let mut backoff = Duration::from_millis(50);
    loop {
        let at = pick(&shared, index, &nodes, next);
        let url = nodes[at].clone();
        next = at + 1;
        tried += 1;
        let connected = tokio::time::timeout(timeout, async {
            let client = node_client(&config, &url).map_err(|e| {
                redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "client", e))
            })?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&shared.channel).await?;
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
                if tried >= nodes.len() {
                    tried = 0;
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
        let (mut sink, stream) = pubsub.split();
        let since = Instant::now();
        hold(
            &shared,
            index,
            Some(Held {
                since,
                proof: since,
                sink: sink.clone(),
            }),
        );
        // The others shown up since this one was made, so that losing any
        // of them later is covered by this one.
        refresh_others(&shared, index, timeout).await;
        // Listening first, then (if no other listener was) the flush.
        shared.live.up(&shared.auth);
        tried = 0;
        backoff = Duration::from_millis(50);
        tracing::debug!(node = %redacted(&url), "invalidation stream subscribed");
        let mut stream: Pin<Box<dyn Stream<Item = redis::Msg> + Send>> = Box::pin(stream);
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                message = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)) => {
                    let Some(message) = message else { break };
                    prove(&shared, index, since, Instant::now());
                    apply(&shared.auth, parse(message.get_payload_bytes()));
                }
                _ = ping.tick() => {
                    // On a subscribed RESP2 connection PING answers
                    // ["pong", ""], so take any value as a sign of life.
                    let asked = Instant::now();
                    let alive = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break;
                    }
                    prove(&shared, index, since, asked);
                }
            }
        }
        let proof = lock(&shared)[index].as_ref().map_or(since, |h| h.proof);
        hold(&shared, index, None);
        shared.live.down();
        if covered(&shared, proof, timeout).await {
            tracing::info!("an invalidation subscription lost; another heard everything since");
        } else {
            // With none up, the next to come up flushes.
            if shared.live.any() {
                shared.auth.invalidate_all();
            }
            tracing::warn!("invalidation stream lost; resubscribing");
        }
        // The same node first, in case only the connection went.
        next = at;
    }
}

/// Where in `nodes` listener `index` goes next: from `next` on, the first
/// node no other listener is on or connecting to (or `next`'s, when every
/// node has one); noted at once, so two listeners starting together part.
fn pick(shared: &Shared, index: usize, nodes: &[String], next: usize) -> usize {
    let mut picked = shared
        .picked
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let taken = |url: &String| {
        picked
            .iter()
            .enumerate()
            .any(|(i, p)| i != index && p.as_ref() == Some(url))
    };
    let at = (0..nodes.len())
        .map(|step| (next + step) % nodes.len())
        .find(|&at| !taken(&nodes[at]))
        .unwrap_or(next % nodes.len());
    picked[index] = Some(nodes[at].clone());
    at
}

/// Whether a subscription that was up before `proof` (a lost one's last
/// sign of life) still answers: an open subscribed connection has been
/// delivered everything published since it was made.
async fn covered(shared: &Shared, proof: Instant, timeout: Duration) -> bool {
    let others: Vec<Held> = lock(shared)
        .iter()
        .flatten()
        .filter(|h| h.since <= proof)
        .cloned()
        .collect();
    for mut other in others {
        let alive = tokio::time::timeout(timeout, other.sink.ping::<redis::Value>()).await;
        if matches!(alive, Ok(Ok(_))) {
            return true;
        }
    }
    false
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Vec<Option<Held>>> {
    shared
        .held
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Notes that listener `index`'s subscription made at `since` was up at
/// `at`.
fn prove(shared: &Shared, index: usize, since: Instant, at: Instant) {
    if let Some(held) = lock(shared)[index].as_mut()
        && held.since == since
    {
        held.proof = held.proof.max(at);
    }
}

/// PINGs every other listener's subscription, noting those that answer.
async fn refresh_others(shared: &Shared, index: usize, timeout: Duration) {
    let others: Vec<(usize, Held)> = lock(shared)
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != index)
        .filter_map(|(i, h)| Some((i, h.clone()?)))
        .collect();
    for (i, mut other) in others {
        let asked = Instant::now();
        let alive = tokio::time::timeout(timeout, other.sink.ping::<redis::Value>()).await;
        if matches!(alive, Ok(Ok(_))) {
            prove(shared, i, other.since, asked);
        }
    }
}

/// Sets this listener's entry.
fn hold(shared: &Shared, index: usize, held: Option<Held>) {
    lock(shared)[index] = held;
}

/// A node's URL without its password, for logs.
fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://…@{host}"),
        _ => url.to_owned(),
    }
}
