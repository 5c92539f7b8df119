//! Redis store: what lets many gateway instances share keys.
//!
//! Key schema (every name starts with the configured prefix, `keygate:` by
//! default):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `key:<sha256 hex>` | hash | `id`, `userId`, `name`, `keyPrefix`, `createdAt` |
//! | `id:<key id>` | string | the key's SHA-256 hex (revoke by id) |
//! | `user:<user id>` | sorted set | the user's key ids, scored by `createdAt` |
//! | `lastused` | sorted set | key SHA-256 hex, scored by `lastUsedAt` (Unix ms) |
//! | `owners` | hash | workflow id → owner user id |
//! | `integration:<id>` | string | the integration record as JSON, its secret sealed |
//! | `user_integrations:<user id>` | sorted set | the user's integration ids, scored by `createdAt` |
//! | `integrations` | set | every integration id (for re-sealing) |
//! | `integration_used` | sorted set | integration id, scored by `lastUsedAt` (Unix ms) |
//!
//! The hot path (`find_by_hash`) is one round trip: `HGETALL` of the key and
//! `ZSCORE` of its last use. A whole batch of last-used times is one
//! `ZADD GT`, so a time never moves backwards and Redis spends a fraction of
//! a millisecond per flush whatever the batch size (a member left by a key
//! revoked mid-flush is ignored: it has no record). Writes that
//! touch several keys are ordered so that a crash between them never leaves
//! an authenticating key that cannot be listed or revoked: create writes the
//! indexes first and `key:<hash>` last; revoke deletes `key:<hash>` first.
//! No command spans two keys, so the schema is ready for Redis Cluster,
//! where each key hashes on its own (a deployment that wants every key in
//! one slot can tag the prefix, `{keygate}:`). This store connects to a
//! single node; a cluster connection is not implemented yet.

use super::{
    IntegrationRecord, KeyRecord, LastUsed, Store, StoreError, StoreFuture, WorkflowOwner,
    sort_integrations, sort_newest_first,
};
use crate::config::RedisConfig;
use crate::key::KeyHash;
use dashmap::DashMap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

pub struct RedisStore {
    client: redis::Client,
    manager_config: ConnectionManagerConfig,
    /// One multiplexed connection per thread that uses the store, created
    /// on first use there, so its driver runs on that thread's runtime and a
    /// cache miss on a data-plane worker never waits for another thread.
    conns: DashMap<std::thread::ThreadId, ConnectionManager>,
    prefix: String,
    timeout: Duration,
}

/// Why one attempt at an operation failed.
enum Failure {
    Redis(redis::RedisError),
    Store(StoreError),
}

impl From<redis::RedisError> for Failure {
    fn from(e: redis::RedisError) -> Failure {
        Failure::Redis(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        Failure::Store(e)
    }
}

impl From<Failure> for StoreError {
    fn from(f: Failure) -> StoreError {
        match f {
            Failure::Redis(e) => StoreError::Unavailable(format!("redis: {e}")),
            Failure::Store(e) => e,
        }
    }
}

/// A connection that died while idle (Redis restarted, say) fails its next
/// command before the manager reconnects; such a command never ran.
fn stale_connection(f: &Failure) -> bool {
    matches!(f, Failure::Redis(e)
        if (e.is_connection_dropped() || e.is_io_error()) && !e.is_timeout() && !e.is_connection_refusal())
}

/// Whether an operation may run a second time after a stale connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads and idempotent writes.
    Safe,
    /// Writes whose second run would answer differently (`SET NX`, `HDEL`).
    Never,
}

impl RedisStore {
    /// Connects lazily: the gateway starts (and answers 503, not ready)
    /// while Redis is down, and the manager reconnects on the next call.
    pub fn connect(config: &RedisConfig) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| StoreError::Unavailable(format!("invalid redis url: {e}")))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        Ok(RedisStore {
            client,
            manager_config,
            conns: DashMap::new(),
            prefix: config.prefix.clone(),
            timeout: config.timeout,
        })
    }

    /// This thread's connection.
    fn conn(&self) -> Result<ConnectionManager, Failure> {
        let thread = std::thread::current().id();
        if let Some(conn) = self.conns.get(&thread) {
            return Ok(conn.clone());
        }
        let conn = ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            self.manager_config.clone(),
        )?;
        self.conns.insert(thread, conn.clone());
        Ok(conn)
    }

    fn key_key(&self, hash: &KeyHash) -> String {
        format!("{}key:{}", self.prefix, hash.to_hex())
    }

    fn id_key(&self, id: &str) -> String {
        format!("{}id:{id}", self.prefix)
    }

    fn user_key(&self, user: &str) -> String {
        format!("{}user:{user}", self.prefix)
    }

    fn last_used_key(&self) -> String {
        format!("{}lastused", self.prefix)
    }

    fn owners_key(&self) -> String {
        format!("{}owners", self.prefix)
    }

    fn integration_key(&self, id: &str) -> String {
        format!("{}integration:{id}", self.prefix)
    }

    fn user_integrations_key(&self, user: &str) -> String {
        format!("{}user_integrations:{user}", self.prefix)
    }

    fn integrations_key(&self) -> String {
        format!("{}integrations", self.prefix)
    }

    fn integration_used_key(&self) -> String {
        format!("{}integration_used", self.prefix)
    }

    /// The records of `ids` that still exist, with their last use.
    async fn integrations_of(
        &self,
        conn: &mut ConnectionManager,
        ids: &[String],
    ) -> Result<Vec<IntegrationRecord>, Failure> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("GET").arg(self.integration_key(id));
        }
        let records: Vec<Option<String>> = pipe.query_async(conn).await?;
        let mut scores = redis::cmd("ZMSCORE");
        scores.arg(self.integration_used_key());
        for id in ids {
            scores.arg(id);
        }
        let used: Vec<Option<f64>> = scores.query_async(conn).await?;
        let mut out = Vec::with_capacity(ids.len());
        for (json, used) in records.into_iter().zip(used) {
            // One removed between the two reads is left out.
            if let Some(json) = json {
                out.push(parse_integration(&json, used)?);
            }
        }
        Ok(out)
    }

    /// Runs one store operation within one deadline (`timeout`), so a
    /// stalled Redis becomes a 503 rather than a hung request, and a
    /// reconnect or a retry does not stretch it; retries once on a stale
    /// connection when that is safe.
    async fn run<T, F, Fut>(&self, retry: Retry, op: F) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let attempt = || async {
            let conn = self.conn()?;
            op(conn).await
        };
        let attempts = async {
            match attempt().await {
                Err(f) if retry == Retry::Safe && stale_connection(&f) => attempt().await,
                other => other,
            }
        };
        tokio::time::timeout(self.timeout, attempts)
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("redis: timed out".into()).into()))
            .map_err(StoreError::from)
    }
}

fn parse_record(
    fields: HashMap<String, String>,
    hash: KeyHash,
    last_used: Option<f64>,
) -> Result<KeyRecord, StoreError> {
    let get = |name: &str| {
        fields
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::Corrupt(format!("key record without {name}")))
    };
    let created_at = get("createdAt")?
        .parse::<i64>()
        .map_err(|_| StoreError::Corrupt("key record with a non-numeric createdAt".into()))?;
    Ok(KeyRecord {
        id: get("id")?,
        user_id: get("userId")?,
        name: get("name")?,
        prefix: get("keyPrefix")?,
        hash,
        created_at,
        // Unix ms fit a double's 53-bit mantissa exactly.
        last_used_at: last_used.map(|t| t as i64),
    })
}

fn parse_integration(json: &str, used: Option<f64>) -> Result<IntegrationRecord, StoreError> {
    let mut record: IntegrationRecord = serde_json::from_str(json)
        .map_err(|e| StoreError::Corrupt(format!("integration record: {e}")))?;
    // Unix ms fit a double's 53-bit mantissa exactly.
    record.last_used_at = used.map(|t| t as i64);
    Ok(record)
}

fn integration_json(record: &IntegrationRecord) -> String {
    let stored = IntegrationRecord {
        last_used_at: None,
        ..record.clone()
    };
    serde_json::to_string(&stored).expect("an integration record always serializes")
}

impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn create_key(&self, record: KeyRecord) -> StoreFuture<'_, ()> {
        Box::pin(self.run(Retry::Never, move |mut conn| {
            let record = record.clone();
            async move {
                let key_key = self.key_key(&record.hash);
                let exists: bool = redis::cmd("EXISTS")
                    .arg(&key_key)
                    .query_async(&mut conn)
                    .await?;
                if exists {
                    return Err(StoreError::Conflict(format!("key {}", record.id)).into());
                }
                let claimed: Option<String> = redis::cmd("SET")
                    .arg(self.id_key(&record.id))
                    .arg(record.hash.to_hex())
                    .arg("NX")
                    .query_async(&mut conn)
                    .await?;
                if claimed.is_none() {
                    return Err(StoreError::Conflict(format!("key {}", record.id)).into());
                }
                redis::pipe()
                    .cmd("ZADD")
                    .arg(self.user_key(&record.user_id))
                    .arg(record.created_at)
                    .arg(&record.id)
                    .ignore()
                    .cmd("HSET")
                    .arg(&key_key)
                    .arg("id")
                    .arg(&record.id)
                    .arg("userId")
                    .arg(&record.user_id)
                    .arg("name")
                    .arg(&record.name)
                    .arg("keyPrefix")
                    .arg(&record.prefix)
                    .arg("createdAt")
                    .arg(record.created_at)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await?;
                Ok(())
            }
        }))
    }

    fn find_by_hash(&self, hash: KeyHash) -> StoreFuture<'_, Option<KeyRecord>> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            let (fields, last_used): (HashMap<String, String>, Option<f64>) = redis::pipe()
                .cmd("HGETALL")
                .arg(self.key_key(&hash))
                .cmd("ZSCORE")
                .arg(self.last_used_key())
                .arg(hash.to_hex())
                .query_async(&mut conn)
                .await?;
            if fields.is_empty() {
                return Ok(None);
            }
            Ok(Some(parse_record(fields, hash, last_used)?))
        }))
    }

    fn list_keys<'a>(&'a self, user_id: &'a str) -> StoreFuture<'a, Vec<KeyRecord>> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            let ids: Vec<String> = redis::cmd("ZREVRANGE")
                .arg(self.user_key(user_id))
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("GET").arg(self.id_key(id));
            }
            let hashes: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
            let hashes: Vec<KeyHash> = hashes
                .iter()
                .flatten()
                .filter_map(|h| KeyHash::from_hex(h))
                .collect();
            if hashes.is_empty() {
                return Ok(Vec::new());
            }
            let mut pipe = redis::pipe();
            for hash in &hashes {
                pipe.cmd("HGETALL").arg(self.key_key(hash));
            }
            let records: Vec<HashMap<String, String>> = pipe.query_async(&mut conn).await?;
            let mut scores = redis::cmd("ZMSCORE");
            scores.arg(self.last_used_key());
            for hash in &hashes {
                scores.arg(hash.to_hex());
            }
            let last_used: Vec<Option<f64>> = scores.query_async(&mut conn).await?;
            let mut out = Vec::with_capacity(records.len());
            for ((fields, hash), last_used) in records.into_iter().zip(hashes).zip(last_used) {
                // A record missing here was revoked between the two reads.
                if !fields.is_empty() {
                    out.push(parse_record(fields, hash, last_used)?);
                }
            }
            sort_newest_first(&mut out);
            Ok(out)
        }))
    }

    fn revoke_key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, KeyRecord> {
        Box::pin(self.run(Retry::Never, move |mut conn| async move {
            let hash: Option<String> = redis::cmd("GET")
                .arg(self.id_key(id))
                .query_async(&mut conn)
                .await?;
            let Some(hash) = hash.as_deref().and_then(KeyHash::from_hex) else {
                return Err(StoreError::UnknownKey(id.to_owned()).into());
            };
            let key_key = self.key_key(&hash);
            let fields: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(&key_key)
                .query_async(&mut conn)
                .await?;
            // Authentication stops with this DEL; the index clean-up follows.
            let deleted: i64 = redis::cmd("DEL")
                .arg(&key_key)
                .query_async(&mut conn)
                .await?;
            let mut pipe = redis::pipe();
            pipe.cmd("DEL").arg(self.id_key(id)).ignore();
            pipe.cmd("ZREM")
                .arg(self.last_used_key())
                .arg(hash.to_hex())
                .ignore();
            let record = if fields.is_empty() {
                None
            } else {
                let record = parse_record(fields, hash, None)?;
                pipe.cmd("ZREM")
                    .arg(self.user_key(&record.user_id))
                    .arg(id)
                    .ignore();
                Some(record)
            };
            pipe.query_async::<()>(&mut conn).await?;
            match record {
                Some(record) if deleted == 1 => Ok(record),
                _ => Err(StoreError::UnknownKey(id.to_owned()).into()),
            }
        }))
    }

    fn record_last_used(&self, batch: Vec<LastUsed>) -> StoreFuture<'_, ()> {
        Box::pin(self.run(Retry::Safe, move |mut conn| {
            let mut add = redis::cmd("ZADD");
            add.arg(self.last_used_key()).arg("GT");
            for used in &batch {
                add.arg(used.at).arg(used.hash.to_hex());
            }
            let empty = batch.is_empty();
            async move {
                if !empty {
                    add.query_async::<()>(&mut conn).await?;
                }
                Ok(())
            }
        }))
    }

    fn set_owner<'a>(&'a self, workflow_id: &'a str, user_id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            redis::cmd("HSET")
                .arg(self.owners_key())
                .arg(workflow_id)
                .arg(user_id)
                .query_async::<()>(&mut conn)
                .await?;
            Ok(())
        }))
    }

    fn remove_owner<'a>(&'a self, workflow_id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(self.run(Retry::Never, move |mut conn| async move {
            let removed: i64 = redis::cmd("HDEL")
                .arg(self.owners_key())
                .arg(workflow_id)
                .query_async(&mut conn)
                .await?;
            if removed == 0 {
                return Err(StoreError::UnknownWorkflow(workflow_id.to_owned()).into());
            }
            Ok(())
        }))
    }

    fn get_owner<'a>(&'a self, workflow_id: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            Ok(redis::cmd("HGET")
                .arg(self.owners_key())
                .arg(workflow_id)
                .query_async(&mut conn)
                .await?)
        }))
    }

    fn list_workflows(&self) -> StoreFuture<'_, Vec<WorkflowOwner>> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            let all: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(self.owners_key())
                .query_async(&mut conn)
                .await?;
            let mut out: Vec<WorkflowOwner> = all
                .into_iter()
                .map(|(workflow_id, owner)| WorkflowOwner { workflow_id, owner })
                .collect();
            out.sort_by(|a, b| a.workflow_id.cmp(&b.workflow_id));
            Ok(out)
        }))
    }

    fn create_integration(&self, record: IntegrationRecord) -> StoreFuture<'_, ()> {
        Box::pin(self.run(Retry::Never, move |mut conn| {
            let record = record.clone();
            async move {
                let created: Option<String> = redis::cmd("SET")
                    .arg(self.integration_key(&record.id))
                    .arg(integration_json(&record))
                    .arg("NX")
                    .query_async(&mut conn)
                    .await?;
                if created.is_none() {
                    return Err(StoreError::Conflict(format!("integration {}", record.id)).into());
                }
                redis::pipe()
                    .cmd("ZADD")
                    .arg(self.user_integrations_key(&record.user_id))
                    .arg(record.created_at)
                    .arg(&record.id)
                    .ignore()
                    .cmd("SADD")
                    .arg(self.integrations_key())
                    .arg(&record.id)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await?;
                Ok(())
            }
        }))
    }

    fn get_integration<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<IntegrationRecord>> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            let found = self.integrations_of(&mut conn, &[id.to_owned()]).await?;
            Ok(found.into_iter().next())
        }))
    }

    fn list_integrations<'a>(
        &'a self,
        user_id: &'a str,
    ) -> StoreFuture<'a, Vec<IntegrationRecord>> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            let ids: Vec<String> = redis::cmd("ZREVRANGE")
                .arg(self.user_integrations_key(user_id))
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await?;
            let mut out = self.integrations_of(&mut conn, &ids).await?;
            sort_integrations(&mut out);
            Ok(out)
        }))
    }

    fn all_integrations(&self) -> StoreFuture<'_, Vec<IntegrationRecord>> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            let ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(self.integrations_key())
                .query_async(&mut conn)
                .await?;
            self.integrations_of(&mut conn, &ids).await
        }))
    }

    fn reseal_integration(&self, record: IntegrationRecord) -> StoreFuture<'_, ()> {
        Box::pin(self.run(Retry::Safe, move |mut conn| {
            let record = record.clone();
            async move {
                let key = self.integration_key(&record.id);
                let json: Option<String> =
                    redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
                let Some(json) = json else {
                    return Err(StoreError::UnknownIntegration(record.id).into());
                };
                let current = parse_integration(&json, None)?;
                let resealed = IntegrationRecord {
                    key_id: record.key_id,
                    nonce: record.nonce,
                    ciphertext: record.ciphertext,
                    ..current
                };
                let written: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(integration_json(&resealed))
                    .arg("XX")
                    .query_async(&mut conn)
                    .await?;
                match written {
                    Some(_) => Ok(()),
                    None => Err(StoreError::UnknownIntegration(resealed.id).into()),
                }
            }
        }))
    }

    fn remove_integration<'a>(&'a self, id: &'a str) -> StoreFuture<'a, IntegrationRecord> {
        Box::pin(self.run(Retry::Never, move |mut conn| async move {
            let key = self.integration_key(id);
            let json: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
            let Some(json) = json else {
                return Err(StoreError::UnknownIntegration(id.to_owned()).into());
            };
            let record = parse_integration(&json, None)?;
            let deleted: i64 = redis::cmd("DEL").arg(&key).query_async(&mut conn).await?;
            redis::pipe()
                .cmd("ZREM")
                .arg(self.user_integrations_key(&record.user_id))
                .arg(id)
                .ignore()
                .cmd("SREM")
                .arg(self.integrations_key())
                .arg(id)
                .ignore()
                .cmd("ZREM")
                .arg(self.integration_used_key())
                .arg(id)
                .ignore()
                .query_async::<()>(&mut conn)
                .await?;
            if deleted == 0 {
                return Err(StoreError::UnknownIntegration(id.to_owned()).into());
            }
            Ok(record)
        }))
    }

    fn integration_used<'a>(&'a self, id: &'a str, at: i64) -> StoreFuture<'a, ()> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            // GT: never backwards. A use racing a removal can leave a
            // score with no record, which no read returns.
            let exists: bool = redis::cmd("EXISTS")
                .arg(self.integration_key(id))
                .query_async(&mut conn)
                .await?;
            if exists {
                redis::cmd("ZADD")
                    .arg(self.integration_used_key())
                    .arg("GT")
                    .arg(at)
                    .arg(id)
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            Ok(())
        }))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            redis::cmd("PING").query_async::<String>(&mut conn).await?;
            Ok(())
        }))
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }
}
