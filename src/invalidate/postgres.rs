//! Invalidations over PostgreSQL: published with `pg_notify` through the
//! store's pool, received by `LISTEN` on one connection of its own (a
//! pooled connection cannot receive notifications). The engine's own
//! writes notify too, through the triggers `keygate store prepare`
//! installs; each time the listener subscribes it checks they are there.
//! Without them every cached answer is held to
//! `cache.keys.ttl_without_notify`, so a deletion in the engine is honoured
//! within that bound; with them, at once.

use super::{Listening, Live, PING_EVERY, apply, back_off, parse};
use crate::auth::Auth;
use crate::config::PostgresConfig;
use crate::store::postgres::{PostgresStore, open, prepare, quoted};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::AsyncMessage;

/// How many pings pass between two checks that the triggers are still
/// there (they could be dropped while keygate runs).
const TRIGGER_CHECK_EVERY: u32 = 20;

pub(super) struct PostgresBus {
    store: Arc<PostgresStore>,
    pub(super) listening: Listening,
}

impl PostgresBus {
    pub(super) fn new(
        config: &PostgresConfig,
        store: Arc<PostgresStore>,
        auth: Arc<Auth>,
    ) -> PostgresBus {
        let live = Arc::new(Live::default());
        let task = tokio::spawn(listen(config.clone(), auth, live.clone()));
        PostgresBus {
            store,
            listening: Listening {
                live,
                tasks: vec![task],
            },
        }
    }

    pub(super) async fn publish(&self, message: String) -> bool {
        match self.store.notify(message).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "could not publish a cache invalidation");
                false
            }
        }
    }
}

/// Whether the engine's writes notify, as last checked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Triggers {
    Unknown,
    Installed,
    Missing,
}

async fn listen(config: PostgresConfig, auth: Arc<Auth>, live: Arc<Live>) {
    let mut connect = config.connect.clone();
    let name = connect
        .get_application_name()
        .unwrap_or("keygate")
        .to_owned();
    connect.application_name(format!("{name} listener"));
    let mut backoff = Duration::from_millis(50);
    let mut triggers = Triggers::Unknown;
    loop {
        let (client, mut connection) = match open(&config, &connect).await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "invalidation listener could not connect");
                tokio::time::sleep(back_off(&mut backoff)).await;
                continue;
            }
        };
        // The connection is driven here, and what it receives handed over.
        let (sender, mut received) = tokio::sync::mpsc::unbounded_channel::<String>();
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if sender.send(n.payload().to_owned()).is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                }
            }
        });
        let listening = tokio::time::timeout(config.timeout, async {
            client
                .batch_execute(&format!("LISTEN {}", quoted(&config.channel)))
                .await?;
            prepare::installed(&client, &config).await
        })
        .await;
        let Ok(Ok(found)) = listening else {
            driver.abort();
            tokio::time::sleep(back_off(&mut backoff)).await;
            continue;
        };
        note_triggers(&auth, &mut triggers, found);
        // Listening first, then the flush.
        live.up(&auth);
        backoff = Duration::from_millis(50);

        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut pings = 0u32;
        loop {
            tokio::select! {
                payload = received.recv() => {
                    let Some(payload) = payload else { break };
                    apply(&auth, parse(payload.as_bytes()));
                }
                _ = ping.tick() => {
                    pings = pings.wrapping_add(1);
                    let alive = tokio::time::timeout(config.timeout, async {
                        client.simple_query("SELECT 1").await?;
                        if pings % TRIGGER_CHECK_EVERY == 0 {
                            return prepare::installed(&client, &config).await.map(Some);
                        }
                        Ok(None)
                    })
                    .await;
                    match alive {
                        Ok(Ok(Some(found))) => note_triggers(&auth, &mut triggers, found),
                        Ok(Ok(None)) => {}
                        _ => break,
                    }
                }
            }
        }
        live.down();
        driver.abort();
        tracing::warn!("invalidation stream lost; listening again");
    }
}

/// Holds the caches' TTLs to `ttl_without_notify` unless the triggers are
/// in place; says so when that changes.
fn note_triggers(auth: &Auth, triggers: &mut Triggers, found: Result<(), String>) {
    let now = match &found {
        Ok(()) => Triggers::Installed,
        Err(_) => Triggers::Missing,
    };
    auth.set_notified(now == Triggers::Installed);
    if now == *triggers {
        return;
    }
    match found {
        Ok(()) => {
            tracing::info!("the engine's writes notify keygate: its changes take effect at once");
        }
        Err(missing) => tracing::warn!(
            missing = %missing,
            "the engine's database lacks keygate's triggers (run `keygate store prepare`): a key deleted or a workflow moved in the engine takes effect only as cached answers expire, within cache.keys.ttl_without_notify"
        ),
    }
    *triggers = now;
}
