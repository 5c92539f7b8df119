//! Redis store: what lets many gateway instances share keys, on one Redis
//! or a Redis Cluster ([`conn`]).
//!
//! Key schema (every name starts with the configured prefix, `keygate:` by
//! default):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `key:<sha256 hex>` | hash | `id`, `userId`, `name`, `keyPrefix`, `createdAt`, `lastUsedAt` |
//! | `id:<key id>` | string | the key's SHA-256 hex (revoke by id) |
//! | `user:<user id>` | sorted set | the user's key ids, scored by `createdAt` |
//! | `owner:<workflow id>` | string | the workflow's owner |
//! | `workflows` | set | the workflows with an owner (for listing) |
//! | `integration:<id>` | hash | `record` (JSON, its secret sealed), `lastUsedAt` |
//! | `user_integrations:<user id>` | sorted set | the user's integration ids, scored by `createdAt` |
//! | `integrations` | set | every integration id (for re-sealing) |
//! | `expiring` | sorted set | ids of keys with an expiry, scored by it (the sweep) |
//! | `audit` | sorted set | audit entries (JSON), scored by their time |
//!
//! A key's hash also holds `expiresAt`, `workflows` (a JSON array) and
//! `rate` (`N/DUR`) when it has them. Listing every user's keys scans
//! `key:*` on every master: an admin call, never a request's.
//!
//! No command spans two keys and nothing every request touches is one key,
//! so on a cluster the keys spread over every master and a lost master
//! takes only its own slots' keys and workflows with it. The hot path
//! (`find_by_hash`) is one `HGETALL`; a workflow's owner is one `GET`. A
//! last-used time is a field of its key's hash, written by a script that
//! keeps the newer time and leaves a revoked key revoked; a batch is one
//! pipeline on a single node and one call per key, all at once, on a
//! cluster. Writes that touch several keys are ordered so that a crash
//! between them never leaves an authenticating key that cannot be listed or
//! revoked: create writes the indexes first and `key:<hash>` last; revoke
//! deletes `key:<hash>` first.
//!
//! A store written by keygate before this layout (last-used times in one
//! `lastused` sorted set, owners in one `owners` hash) is moved over at
//! start ([`migrate`]); owners are read from the old hash too until then.

mod conn;
mod health;
mod migrate;

pub(crate) use conn::node_client;

use super::{
    AuditEntry, IntegrationRecord, KeyRecord, LastUsed, Store, StoreError, StoreFuture,
    WorkflowOwner, sort_integrations, sort_newest_first,
};
use crate::config::RedisConfig;
use crate::key::KeyHash;
use conn::{Backend, Conn, each};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub struct RedisStore {
    backend: Backend,
    prefix: String,
    timeout: Duration,
    config: RedisConfig,
    /// True until [`migrate`] has found no data in the old layout.
    legacy_owners: AtomicBool,
}

/// Sets a hash's `lastUsedAt` to ARGV[1] if that is newer, and only if
/// the hash still exists (a revoked key stays revoked).
const KEEP_NEWER: &str = "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
     local current = tonumber(redis.call('HGET', KEYS[1], 'lastUsedAt')) \
     if current == nil or current < tonumber(ARGV[1]) then \
       redis.call('HSET', KEYS[1], 'lastUsedAt', ARGV[1]) return 1 end \
     return 0";

/// Sets a key hash's `expiresAt` to ARGV[1] unless it expires sooner;
/// 0 if the key is gone.
const EXPIRE_SOONER: &str = "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
     local current = tonumber(redis.call('HGET', KEYS[1], 'expiresAt')) \
     if current == nil or tonumber(ARGV[1]) < current then \
       redis.call('HSET', KEYS[1], 'expiresAt', ARGV[1]) end \
     return 1";

/// Replaces an integration's `record` only if the integration still exists.
const RESEAL: &str = "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
     redis.call('HSET', KEYS[1], 'record', ARGV[1]) return 1";

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
    /// Writes whose second run would answer differently (`SET NX`, `DEL`).
    Never,
}

impl RedisStore {
    /// Connects lazily: the gateway starts (and answers 503, not ready)
    /// while Redis is down, and each call tries again.
    pub fn connect(config: &RedisConfig) -> Result<RedisStore, StoreError> {
        Ok(RedisStore {
            backend: Backend::new(config).map_err(StoreError::Unavailable)?,
            prefix: config.prefix.clone(),
            timeout: config.timeout,
            config: config.clone(),
            legacy_owners: AtomicBool::new(true),
        })
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

    fn owner_key(&self, workflow: &str) -> String {
        format!("{}owner:{workflow}", self.prefix)
    }

    fn workflows_key(&self) -> String {
        format!("{}workflows", self.prefix)
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

    fn expiring_key(&self) -> String {
        format!("{}expiring", self.prefix)
    }

    fn audit_key(&self) -> String {
        format!("{}audit", self.prefix)
    }

    /// The names matching `pattern` on every master (on one node, that
    /// node), by `SCAN`.
    async fn scan(&self, pattern: String) -> Result<Vec<String>, StoreError> {
        async fn scan_one(
            conn: &mut impl redis::aio::ConnectionLike,
            pattern: &str,
        ) -> redis::RedisResult<Vec<String>> {
            let mut out = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(conn)
                    .await?;
                out.extend(page);
                if next == 0 {
                    return Ok(out);
                }
                cursor = next;
            }
        }
        let unavailable = |e: redis::RedisError| StoreError::Unavailable(format!("redis: {e}"));
        if !self.backend.is_cluster() {
            let pattern = &pattern;
            return self
                .run(Retry::Safe, move |mut conn| async move {
                    Ok(scan_one(&mut conn, pattern).await?)
                })
                .await;
        }
        let nodes: String = self
            .run(Retry::Safe, move |mut conn| async move {
                Ok(redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut conn)
                    .await?)
            })
            .await?;
        let mut out = Vec::new();
        for (address, failed) in health::masters(&nodes) {
            if failed {
                return Err(StoreError::Unavailable(format!(
                    "redis cluster: master {address} is down"
                )));
            }
            let client = node_client(&self.config, &conn::address_url(&self.config, &address))
                .map_err(StoreError::Unavailable)?;
            let mut conn =
                tokio::time::timeout(self.timeout, client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| StoreError::Unavailable(format!("redis: {address} timed out")))?
                    .map_err(unavailable)?;
            out.extend(scan_one(&mut conn, &pattern).await.map_err(unavailable)?);
        }
        Ok(out)
    }

    /// The old layout's single owners hash.
    fn legacy_owners_key(&self) -> String {
        format!("{}owners", self.prefix)
    }

    /// Runs one store operation within one deadline (`timeout`), so a
    /// stalled Redis becomes a 503 rather than a hung request, and a
    /// reconnect or a retry does not stretch it; retries once on a stale
    /// connection when that is safe.
    async fn run<T, F, Fut>(&self, retry: Retry, op: F) -> Result<T, StoreError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let attempt = || async {
            let conn = self.backend.conn()?;
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

    /// The key records of `hashes` that exist (one `HGETALL` each).
    async fn records_of(
        &self,
        conn: &mut Conn,
        hashes: &[KeyHash],
    ) -> Result<Vec<KeyRecord>, Failure> {
        let reads = hashes
            .iter()
            .map(|hash| {
                let mut cmd = redis::cmd("HGETALL");
                cmd.arg(self.key_key(hash));
                cmd
            })
            .collect();
        let records: Vec<HashMap<String, String>> = each(conn, reads).await?;
        let mut out = Vec::with_capacity(records.len());
        for (fields, hash) in records.into_iter().zip(hashes) {
            if !fields.is_empty() {
                out.push(parse_record(fields, *hash)?);
            }
        }
        Ok(out)
    }

    /// The records of `ids` that still exist.
    async fn integrations_of(
        &self,
        conn: &mut Conn,
        ids: &[String],
    ) -> Result<Vec<IntegrationRecord>, Failure> {
        let reads = ids
            .iter()
            .map(|id| {
                let mut cmd = redis::cmd("HGETALL");
                cmd.arg(self.integration_key(id));
                cmd
            })
            .collect();
        let found: Vec<HashMap<String, String>> = each(conn, reads).await?;
        // One removed between the two reads is left out.
        found
            .into_iter()
            .filter(|fields| fields.contains_key("record"))
            .map(|fields| parse_integration(&fields).map_err(Failure::from))
            .collect()
    }

    /// Moves data in the old layout over (idempotent; see [`migrate`]).
    pub async fn migrate(&self) -> Result<(usize, usize), StoreError> {
        let mut conn = self.backend.conn().map_err(Failure::from)?;
        let moved = migrate::run(self, &mut conn).await.map_err(Failure::from)?;
        self.legacy_owners.store(false, Ordering::Release);
        Ok(moved)
    }

    /// Whether every master answers (a cluster), or the node does.
    pub async fn health(&self) -> Result<(), String> {
        let mut conn = self.backend.conn().map_err(|e| e.to_string())?;
        match self.backend.is_cluster() {
            true => {
                tokio::time::timeout(self.timeout * 2, health::cluster(&mut conn, &self.config))
                    .await
                    .unwrap_or_else(|_| Err("the cluster did not answer in time".into()))
            }
            false => tokio::time::timeout(self.timeout, async {
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .map(drop)
                    .map_err(|e| format!("redis: {e}"))
            })
            .await
            .unwrap_or_else(|_| Err("redis: timed out".into())),
        }
    }

    /// Publishes on an invalidation channel. On a cluster it goes to every
    /// node itself, not to one that passes it on: Redis's cluster bus runs
    /// with Nagle's algorithm on, which holds a message up to 40 ms behind
    /// an unacknowledged one. Subscribers then get it from their own node at
    /// once and again over the bus later; an invalidation applied twice
    /// costs one extra store read.
    pub async fn publish(&self, channel: &str, message: &str) -> Result<(), StoreError> {
        self.run(Retry::Safe, move |conn| async move {
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(channel).arg(message);
            match conn {
                Conn::Single(mut single) => {
                    publish.query_async::<i64>(&mut single).await?;
                }
                Conn::Cluster(mut cluster) => {
                    use redis::cluster_routing::{
                        MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo,
                    };
                    let everywhere = RoutingInfo::MultiNode((
                        MultipleNodeRoutingInfo::AllNodes,
                        Some(ResponsePolicy::OneSucceeded),
                    ));
                    cluster.route_command(publish, everywhere).await?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.backend.is_cluster()
    }

    /// The URL of every node the cluster knows that is not failed, or the
    /// one node's; with the seeds' scheme and credentials.
    pub async fn node_urls(&self) -> Result<Vec<String>, StoreError> {
        let seeds = self.config.nodes.urls();
        if !self.backend.is_cluster() {
            return Ok(seeds.to_vec());
        }
        let nodes: String = self
            .run(Retry::Safe, move |mut conn| async move {
                Ok(redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut conn)
                    .await?)
            })
            .await?;
        // Sorted: each node lists the others in an order of its own.
        let mut urls: Vec<String> = nodes
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                let flags = fields.get(2)?;
                if flags
                    .split(',')
                    .any(|f| f == "fail" || f == "fail?" || f == "noaddr")
                {
                    return None;
                }
                let address = fields.get(1)?.split('@').next()?;
                Some(conn::address_url(&self.config, address))
            })
            .collect();
        urls.sort();
        Ok(urls)
    }

    /// The config it was made from (the invalidation listener's too).
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }
}

fn parse_record(fields: HashMap<String, String>, hash: KeyHash) -> Result<KeyRecord, StoreError> {
    let get = |name: &str| {
        fields
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::Corrupt(format!("key record without {name}")))
    };
    let created_at = get("createdAt")?
        .parse::<i64>()
        .map_err(|_| StoreError::Corrupt("key record with a non-numeric createdAt".into()))?;
    let number = |name: &str| match fields.get(name) {
        None => Ok(None),
        Some(t) => t
            .parse::<i64>()
            .map(Some)
            .map_err(|_| StoreError::Corrupt(format!("key record with a non-numeric {name}"))),
    };
    let workflows = match fields.get("workflows") {
        None => None,
        Some(json) => Some(
            serde_json::from_str(json)
                .map_err(|_| StoreError::Corrupt("key record with unreadable workflows".into()))?,
        ),
    };
    let rate = match fields.get("rate") {
        None => None,
        Some(text) => Some(
            crate::store::Rate::parse(text)
                .ok_or_else(|| StoreError::Corrupt("key record with an unreadable rate".into()))?,
        ),
    };
    Ok(KeyRecord {
        id: get("id")?,
        user_id: get("userId")?,
        name: get("name")?,
        prefix: get("keyPrefix")?,
        hash,
        created_at,
        last_used_at: number("lastUsedAt")?,
        expires_at: number("expiresAt")?,
        workflows,
        rate,
    })
}

fn parse_integration(fields: &HashMap<String, String>) -> Result<IntegrationRecord, StoreError> {
    let json = fields
        .get("record")
        .ok_or_else(|| StoreError::Corrupt("integration without its record".into()))?;
    let mut record: IntegrationRecord = serde_json::from_str(json)
        .map_err(|e| StoreError::Corrupt(format!("integration record: {e}")))?;
    record.last_used_at = fields.get("lastUsedAt").and_then(|t| t.parse().ok());
    Ok(record)
}

fn integration_json(record: &IntegrationRecord) -> String {
    let stored = IntegrationRecord {
        last_used_at: None,
        ..record.clone()
    };
    serde_json::to_string(&stored).expect("an integration record always serializes")
}

fn keep_newer(key: String, at: i64) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(KEEP_NEWER).arg(1).arg(key).arg(at);
    cmd
}

impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        if self.backend.is_cluster() {
            "redis-cluster"
        } else {
            "redis"
        }
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
                redis::cmd("ZADD")
                    .arg(self.user_key(&record.user_id))
                    .arg(record.created_at)
                    .arg(&record.id)
                    .query_async::<()>(&mut conn)
                    .await?;
                if let Some(at) = record.expires_at {
                    redis::cmd("ZADD")
                        .arg(self.expiring_key())
                        .arg(at)
                        .arg(&record.id)
                        .query_async::<()>(&mut conn)
                        .await?;
                }
                let mut hset = redis::cmd("HSET");
                hset.arg(&key_key)
                    .arg("id")
                    .arg(&record.id)
                    .arg("userId")
                    .arg(&record.user_id)
                    .arg("name")
                    .arg(&record.name)
                    .arg("keyPrefix")
                    .arg(&record.prefix)
                    .arg("createdAt")
                    .arg(record.created_at);
                if let Some(at) = record.expires_at {
                    hset.arg("expiresAt").arg(at);
                }
                if let Some(workflows) = &record.workflows {
                    hset.arg("workflows")
                        .arg(serde_json::to_string(workflows).expect("strings always serialize"));
                }
                if let Some(rate) = record.rate {
                    hset.arg("rate").arg(rate.to_string());
                }
                hset.query_async::<()>(&mut conn).await?;
                Ok(())
            }
        }))
    }

    fn find_by_hash(&self, hash: KeyHash) -> StoreFuture<'_, Option<KeyRecord>> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            let fields: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(self.key_key(&hash))
                .query_async(&mut conn)
                .await?;
            if fields.is_empty() {
                return Ok(None);
            }
            Ok(Some(parse_record(fields, hash)?))
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
            let gets = ids
                .iter()
                .map(|id| {
                    let mut cmd = redis::cmd("GET");
                    cmd.arg(self.id_key(id));
                    cmd
                })
                .collect();
            let hashes: Vec<Option<String>> = each(&mut conn, gets).await?;
            let hashes: Vec<KeyHash> = hashes
                .iter()
                .flatten()
                .filter_map(|h| KeyHash::from_hex(h))
                .collect();
            // A record missing here was revoked between the two reads.
            let mut out = self.records_of(&mut conn, &hashes).await?;
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
            let mut cleanup = vec![{
                let mut cmd = redis::cmd("DEL");
                cmd.arg(self.id_key(id));
                cmd
            }];
            let record = if fields.is_empty() {
                None
            } else {
                let record = parse_record(fields, hash)?;
                let mut cmd = redis::cmd("ZREM");
                cmd.arg(self.user_key(&record.user_id)).arg(id);
                cleanup.push(cmd);
                if record.expires_at.is_some() {
                    let mut cmd = redis::cmd("ZREM");
                    cmd.arg(self.expiring_key()).arg(id);
                    cleanup.push(cmd);
                }
                Some(record)
            };
            if let Err(e) = each::<i64>(&mut conn, cleanup).await {
                // Revoked all the same (the record is gone, so it is
                // announced); lists skip the index entries left.
                tracing::warn!(error = %e, "key revoked; its index entries not cleaned up");
            }
            match record {
                Some(record) if deleted == 1 => Ok(record),
                _ => Err(StoreError::UnknownKey(id.to_owned()).into()),
            }
        }))
    }

    fn get_key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<KeyRecord>> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            let hash: Option<String> = redis::cmd("GET")
                .arg(self.id_key(id))
                .query_async(&mut conn)
                .await?;
            let Some(hash) = hash.as_deref().and_then(KeyHash::from_hex) else {
                return Ok(None);
            };
            let fields: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(self.key_key(&hash))
                .query_async(&mut conn)
                .await?;
            match fields.is_empty() {
                true => Ok(None),
                false => Ok(Some(parse_record(fields, hash)?)),
            }
        }))
    }

    fn list_all_keys(&self) -> StoreFuture<'_, Vec<KeyRecord>> {
        Box::pin(async move {
            let names = self.scan(format!("{}key:*", self.prefix)).await?;
            let hashes: Vec<KeyHash> = names
                .iter()
                .filter_map(|n| n.rsplit(':').next().and_then(KeyHash::from_hex))
                .collect();
            let hashes = &hashes;
            self.run(Retry::Safe, move |mut conn| async move {
                let mut out = self.records_of(&mut conn, hashes).await?;
                sort_newest_first(&mut out);
                Ok(out)
            })
            .await
        })
    }

    fn expire_key<'a>(&'a self, id: &'a str, at: i64) -> StoreFuture<'a, KeyRecord> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            let hash: Option<String> = redis::cmd("GET")
                .arg(self.id_key(id))
                .query_async(&mut conn)
                .await?;
            let Some(hash) = hash.as_deref().and_then(KeyHash::from_hex) else {
                return Err(StoreError::UnknownKey(id.to_owned()).into());
            };
            // Indexed first, so the sweep finds whatever the hash says.
            redis::cmd("ZADD")
                .arg(self.expiring_key())
                .arg("LT")
                .arg(at)
                .arg(id)
                .query_async::<()>(&mut conn)
                .await?;
            let applied: i64 = redis::cmd("EVAL")
                .arg(EXPIRE_SOONER)
                .arg(1)
                .arg(self.key_key(&hash))
                .arg(at)
                .query_async(&mut conn)
                .await?;
            if applied == 0 {
                return Err(StoreError::UnknownKey(id.to_owned()).into());
            }
            let fields: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(self.key_key(&hash))
                .query_async(&mut conn)
                .await?;
            if fields.is_empty() {
                return Err(StoreError::UnknownKey(id.to_owned()).into());
            }
            Ok(parse_record(fields, hash)?)
        }))
    }

    fn expired_keys(&self, now: i64) -> StoreFuture<'_, Vec<KeyRecord>> {
        Box::pin(async move {
            let ids: Vec<String> = self
                .run(Retry::Safe, move |mut conn| async move {
                    Ok(redis::cmd("ZRANGEBYSCORE")
                        .arg(self.expiring_key())
                        .arg("-inf")
                        .arg(now)
                        .query_async(&mut conn)
                        .await?)
                })
                .await?;
            let mut out = Vec::with_capacity(ids.len());
            for id in &ids {
                match self.get_key(id).await? {
                    Some(record) => out.push(record),
                    // Revoked meanwhile: nothing left to sweep but the index.
                    None => {
                        let _ = self
                            .run(Retry::Safe, move |mut conn| async move {
                                Ok(redis::cmd("ZREM")
                                    .arg(self.expiring_key())
                                    .arg(id)
                                    .query_async::<i64>(&mut conn)
                                    .await?)
                            })
                            .await;
                    }
                }
            }
            Ok(out)
        })
    }

    fn append_audit(&self, entry: AuditEntry, keep_since: i64) -> StoreFuture<'_, ()> {
        Box::pin(self.run(Retry::Never, move |mut conn| {
            let json = serde_json::to_string(&entry).expect("an audit entry always serializes");
            async move {
                redis::cmd("ZADD")
                    .arg(self.audit_key())
                    .arg(entry.at)
                    .arg(&json)
                    .query_async::<()>(&mut conn)
                    .await?;
                redis::cmd("ZREMRANGEBYSCORE")
                    .arg(self.audit_key())
                    .arg("-inf")
                    .arg(format!("({keep_since}"))
                    .query_async::<()>(&mut conn)
                    .await?;
                Ok(())
            }
        }))
    }

    fn list_audit(&self, since: i64) -> StoreFuture<'_, Vec<AuditEntry>> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            let entries: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(self.audit_key())
                .arg(since)
                .arg("+inf")
                .query_async(&mut conn)
                .await?;
            let mut out = Vec::with_capacity(entries.len());
            for json in entries {
                out.push(
                    serde_json::from_str(&json)
                        .map_err(|e| StoreError::Corrupt(format!("audit entry: {e}")))?,
                );
            }
            Ok(out)
        }))
    }

    fn record_last_used(&self, batch: Vec<LastUsed>) -> StoreFuture<'_, ()> {
        Box::pin(self.run(Retry::Safe, move |mut conn| {
            let writes: Vec<redis::Cmd> = batch
                .iter()
                .map(|used| keep_newer(self.key_key(&used.hash), used.at))
                .collect();
            async move {
                each::<i64>(&mut conn, writes).await?;
                Ok(())
            }
        }))
    }

    fn set_owner<'a>(&'a self, workflow_id: &'a str, user_id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            redis::cmd("SET")
                .arg(self.owner_key(workflow_id))
                .arg(user_id)
                .query_async::<()>(&mut conn)
                .await?;
            redis::cmd("SADD")
                .arg(self.workflows_key())
                .arg(workflow_id)
                .query_async::<()>(&mut conn)
                .await?;
            if self.legacy_owners.load(Ordering::Acquire) {
                redis::cmd("HDEL")
                    .arg(self.legacy_owners_key())
                    .arg(workflow_id)
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            Ok(())
        }))
    }

    fn remove_owner<'a>(&'a self, workflow_id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(self.run(Retry::Never, move |mut conn| async move {
            let mut removed: i64 = redis::cmd("DEL")
                .arg(self.owner_key(workflow_id))
                .query_async(&mut conn)
                .await?;
            if self.legacy_owners.load(Ordering::Acquire) {
                removed += redis::cmd("HDEL")
                    .arg(self.legacy_owners_key())
                    .arg(workflow_id)
                    .query_async::<i64>(&mut conn)
                    .await?;
            }
            redis::cmd("SREM")
                .arg(self.workflows_key())
                .arg(workflow_id)
                .query_async::<()>(&mut conn)
                .await?;
            if removed == 0 {
                return Err(StoreError::UnknownWorkflow(workflow_id.to_owned()).into());
            }
            Ok(())
        }))
    }

    fn get_owner<'a>(&'a self, workflow_id: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            let owner: Option<String> = redis::cmd("GET")
                .arg(self.owner_key(workflow_id))
                .query_async(&mut conn)
                .await?;
            if owner.is_some() || !self.legacy_owners.load(Ordering::Acquire) {
                return Ok(owner);
            }
            Ok(redis::cmd("HGET")
                .arg(self.legacy_owners_key())
                .arg(workflow_id)
                .query_async(&mut conn)
                .await?)
        }))
    }

    fn list_workflows(&self) -> StoreFuture<'_, Vec<WorkflowOwner>> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            let ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(self.workflows_key())
                .query_async(&mut conn)
                .await?;
            let gets = ids
                .iter()
                .map(|id| {
                    let mut cmd = redis::cmd("GET");
                    cmd.arg(self.owner_key(id));
                    cmd
                })
                .collect();
            let owners: Vec<Option<String>> = each(&mut conn, gets).await?;
            let mut all: HashMap<String, String> = ids
                .into_iter()
                .zip(owners)
                .filter_map(|(workflow_id, owner)| Some((workflow_id, owner?)))
                .collect();
            if self.legacy_owners.load(Ordering::Acquire) {
                let legacy: HashMap<String, String> = redis::cmd("HGETALL")
                    .arg(self.legacy_owners_key())
                    .query_async(&mut conn)
                    .await?;
                for (workflow_id, owner) in legacy {
                    all.entry(workflow_id).or_insert(owner);
                }
            }
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
                let created: bool = redis::cmd("HSETNX")
                    .arg(self.integration_key(&record.id))
                    .arg("record")
                    .arg(integration_json(&record))
                    .query_async(&mut conn)
                    .await?;
                if !created {
                    return Err(StoreError::Conflict(format!("integration {}", record.id)).into());
                }
                let mut index = redis::cmd("ZADD");
                index
                    .arg(self.user_integrations_key(&record.user_id))
                    .arg(record.created_at)
                    .arg(&record.id);
                let mut all = redis::cmd("SADD");
                all.arg(self.integrations_key()).arg(&record.id);
                each::<i64>(&mut conn, vec![index, all]).await?;
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
                let fields: HashMap<String, String> = redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await?;
                if !fields.contains_key("record") {
                    return Err(StoreError::UnknownIntegration(record.id).into());
                }
                let current = parse_integration(&fields)?;
                let resealed = IntegrationRecord {
                    key_id: record.key_id,
                    nonce: record.nonce,
                    ciphertext: record.ciphertext,
                    ..current
                };
                let written: i64 = redis::cmd("EVAL")
                    .arg(RESEAL)
                    .arg(1)
                    .arg(&key)
                    .arg(integration_json(&resealed))
                    .query_async(&mut conn)
                    .await?;
                match written {
                    1 => Ok(()),
                    _ => Err(StoreError::UnknownIntegration(resealed.id).into()),
                }
            }
        }))
    }

    fn remove_integration<'a>(&'a self, id: &'a str) -> StoreFuture<'a, IntegrationRecord> {
        Box::pin(self.run(Retry::Never, move |mut conn| async move {
            let key = self.integration_key(id);
            let fields: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await?;
            if !fields.contains_key("record") {
                return Err(StoreError::UnknownIntegration(id.to_owned()).into());
            }
            let record = parse_integration(&fields)?;
            let deleted: i64 = redis::cmd("DEL").arg(&key).query_async(&mut conn).await?;
            let mut index = redis::cmd("ZREM");
            index
                .arg(self.user_integrations_key(&record.user_id))
                .arg(id);
            let mut all = redis::cmd("SREM");
            all.arg(self.integrations_key()).arg(id);
            each::<i64>(&mut conn, vec![index, all]).await?;
            if deleted == 0 {
                return Err(StoreError::UnknownIntegration(id.to_owned()).into());
            }
            Ok(record)
        }))
    }

    fn integration_used<'a>(&'a self, id: &'a str, at: i64) -> StoreFuture<'a, ()> {
        Box::pin(self.run(Retry::Safe, move |mut conn| async move {
            keep_newer(self.integration_key(id), at)
                .query_async::<i64>(&mut conn)
                .await?;
            Ok(())
        }))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.health().await.map_err(StoreError::Unavailable) })
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }
}
