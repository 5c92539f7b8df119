//! The postgres store: the engine's own database, read as it is. Keys are
//! rows of the engine's `api_keys` (hash and prefix only, as the engine
//! keeps them), owners are `workflows.user_id`, users must exist in
//! `users`; the names are configurable ([`crate::config::EngineTables`]).
//!
//! Each thread that uses the store (a data-plane worker, the control
//! plane) has its own small pool, so a connection's driver runs on the
//! runtime of the thread that waits on it, as with the Redis store. Every
//! statement is prepared once per connection ([`sql`]); one call is bounded
//! by `timeout` in all, connection and retry included, and the server
//! stops a statement past it too.
//!
//! Changes the engine makes behind keygate's back reach the caches through
//! triggers ([`prepare`], `keygate store prepare`) that `pg_notify` the
//! channel one connection per instance listens on (`crate::invalidate`).

pub mod prepare;
pub mod schema;
mod sql;
pub mod tls;

use super::{
    AuditEntry, IntegrationRecord, KeyRecord, LastUsed, Rate, Store, StoreError, StoreFuture,
    WorkflowOwner,
};
use crate::config::PostgresConfig;
use crate::key::KeyHash;
use dashmap::DashMap;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use sql::Statements;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tls::Connector;
use tokio_postgres::error::SqlState;

pub use sql::quoted;

pub struct PostgresStore {
    connect: tokio_postgres::Config,
    tls: Connector,
    pool_size: usize,
    pools: DashMap<std::thread::ThreadId, Pool>,
    sql: Statements,
    timeout: Duration,
    channel: String,
    users_table: String,
    /// Whether keygate's policy and audit tables are there: 0 not known,
    /// 1 yes, 2 no; asked again every [`POLICIES_RECHECK_MS`] while no, and
    /// every instance's caches flushed when they turn up.
    policies: std::sync::atomic::AtomicU8,
    policies_checked: std::sync::atomic::AtomicU64,
}

const POLICIES_RECHECK_MS: u64 = 2_000;

/// The refusal for a key policy or an audit entry before `store prepare`.
const NEEDS_PREPARE: &str = "expiry, workflow scopes, per-key rates and the audit log need keygate's keygate_key_policies and keygate_audit tables in the engine's database: run `keygate store prepare`";

/// Why one attempt at an operation failed.
enum Failure {
    Postgres(tokio_postgres::Error),
    Pool(deadpool_postgres::PoolError),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Failure {
        Failure::Postgres(e)
    }
}

impl From<deadpool_postgres::PoolError> for Failure {
    fn from(e: deadpool_postgres::PoolError) -> Failure {
        Failure::Pool(e)
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
            Failure::Postgres(e) => StoreError::Unavailable(format!("postgres: {}", describe(&e))),
            Failure::Pool(e) => StoreError::Unavailable(format!("postgres: {e}")),
            Failure::Store(e) => e,
        }
    }
}

/// A database error with its message and detail, else tokio-postgres's
/// own wording.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => {
            let mut text = e.to_string();
            if let Some(source) = std::error::Error::source(e) {
                text = format!("{text}: {source}");
            }
            text
        }
    }
}

fn code(f: &Failure) -> Option<&SqlState> {
    match f {
        Failure::Postgres(e) => e.code(),
        _ => None,
    }
}

/// A pooled connection the server closed while it sat idle (a restart, an
/// administrator's `pg_terminate_backend`) fails its next statement before
/// the pool notices; that statement never ran.
fn stale_connection(f: &Failure) -> bool {
    matches!(f, Failure::Postgres(e) if e.is_closed())
}

/// Whether an operation may run a second time after a stale connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    Safe,
    /// Inserts and deletes: a second run would answer differently.
    Never,
}

impl PostgresStore {
    /// Connects lazily: the gateway starts (and answers 503, not ready)
    /// while the database is down, and each call tries again.
    pub fn connect(config: &PostgresConfig) -> Result<PostgresStore, StoreError> {
        Ok(PostgresStore {
            connect: config.connect.clone(),
            tls: Connector::new(&config.tls).map_err(StoreError::Unavailable)?,
            pool_size: config.pool_size,
            pools: DashMap::new(),
            sql: Statements::new(&config.tables),
            timeout: config.timeout,
            channel: config.channel.clone(),
            users_table: config.tables.users.table.clone(),
            policies: std::sync::atomic::AtomicU8::new(0),
            policies_checked: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// This thread's pool.
    fn pool(&self) -> Result<Pool, Failure> {
        let thread = std::thread::current().id();
        if let Some(pool) = self.pools.get(&thread) {
            return Ok(pool.clone());
        }
        let manager = Manager::from_config(
            self.connect.clone(),
            self.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(self.timeout))
            .create_timeout(Some(self.timeout))
            .recycle_timeout(Some(self.timeout))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("postgres pool: {e}")))?;
        self.pools.insert(thread, pool.clone());
        Ok(pool)
    }

    /// Runs one operation on a pooled connection within one deadline;
    /// retries once on a stale connection when that is safe.
    async fn run<T, F, Fut>(&self, retry: Retry, op: F) -> Result<T, StoreError>
    where
        F: Fn(Object) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let attempt = || async {
            let client = self.pool()?.get().await?;
            op(client).await
        };
        let attempts = async {
            match attempt().await {
                Err(f) if retry == Retry::Safe && stale_connection(&f) => attempt().await,
                other => other,
            }
        };
        tokio::time::timeout(self.timeout, attempts)
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("postgres: timed out".into()).into()))
            .map_err(StoreError::from)
    }

    /// Tells every instance's listener (and this one's) what changed.
    pub async fn notify(&self, message: String) -> Result<(), StoreError> {
        self.run(Retry::Safe, |client| {
            let message = message.clone();
            async move {
                let statement = client.prepare_cached("SELECT pg_notify($1, $2)").await?;
                client
                    .execute(&statement, &[&self.channel, &message])
                    .await?;
                Ok(())
            }
        })
        .await
    }

    /// Whether keygate's policy and audit tables exist (after `store
    /// prepare`); known once found, asked again now and then while not.
    async fn has_policies(&self, client: &Object) -> Result<bool, Failure> {
        use std::sync::atomic::Ordering;
        let now = crate::clock::uptime_ms();
        match self.policies.load(Ordering::Acquire) {
            1 => return Ok(true),
            2 if now.saturating_sub(self.policies_checked.load(Ordering::Acquire))
                < POLICIES_RECHECK_MS =>
            {
                return Ok(false);
            }
            _ => {}
        }
        let statement = client.prepare_cached(&self.sql.policies_exist).await?;
        let found: bool = client.query_one(&statement, &[]).await?.get(0);
        self.policies_checked.store(now, Ordering::Release);
        let was = self
            .policies
            .swap(if found { 1 } else { 2 }, Ordering::AcqRel);
        if found && was == 2 {
            // Keys read without their policies may be cached on every
            // instance: every instance drops its caches (each one that
            // finds the tables later says so again).
            let statement = client
                .prepare_cached("SELECT pg_notify($1, 'flush')")
                .await?;
            client.execute(&statement, &[&self.channel]).await?;
        }
        Ok(found)
    }

    /// The key statements to use: with the policy columns once keygate's
    /// tables exist.
    async fn key_statements(&self, client: &Object) -> Result<&sql::KeyStatements, Failure> {
        Ok(match self.has_policies(client).await? {
            true => &self.sql.with_policies.keys,
            false => &self.sql.keys,
        })
    }

    /// Refuses a user the engine does not know.
    async fn user_must_exist(&self, client: &Object, user: &str) -> Result<(), Failure> {
        let statement = client.prepare_cached(&self.sql.user_exists).await?;
        match client.query_opt(&statement, &[&user]).await? {
            Some(_) => Ok(()),
            None => Err(self.unknown_user(user).into()),
        }
    }

    fn unknown_user(&self, user: &str) -> StoreError {
        StoreError::UnknownUser(format!(
            "{user} (not in the engine's {} table)",
            self.users_table
        ))
    }
}

/// A connection of its own, outside the pools (the invalidation listener,
/// `store prepare`, the schema check), opened within the config's timeout;
/// the caller drives the connection.
pub async fn open(
    config: &PostgresConfig,
    connect: &tokio_postgres::Config,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, tls::TlsStream>,
    ),
    String,
> {
    open_with(&config.tls, config.timeout, connect).await
}

/// [`open`] for any database: its TLS mode and how long to wait.
pub async fn open_with(
    tls: &crate::config::PgTls,
    timeout: Duration,
    connect: &tokio_postgres::Config,
) -> Result<
    (
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, tls::TlsStream>,
    ),
    String,
> {
    let tls = Connector::new(tls)?;
    match tokio::time::timeout(timeout, connect.connect(tls)).await {
        Ok(Ok(pair)) => Ok(pair),
        Ok(Err(e)) => Err(format!("postgres: {}", describe(&e))),
        Err(_) => Err("postgres: timed out connecting".to_owned()),
    }
}

/// [`open`], the connection driven by a task of its own until the client
/// is dropped.
pub async fn open_driven(config: &PostgresConfig) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = open(config, &config.connect).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A key row, in [`sql`]'s column order.
fn key_record(row: &tokio_postgres::Row) -> Result<KeyRecord, Failure> {
    let id: String = row.try_get(0)?;
    let hex: String = row.try_get(3)?;
    let hash = KeyHash::from_hex(&hex).ok_or_else(|| {
        StoreError::Corrupt(format!(
            "the key hash of key {id} is not a SHA-256 hex digest"
        ))
    })?;
    // With the policy columns (see `sql`), after the key's.
    let (expires_at, workflows, rate) = if row.len() > 7 {
        let rate = match row.try_get::<_, Option<String>>(9)? {
            None => None,
            Some(text) => Some(Rate::parse(&text).ok_or_else(|| {
                StoreError::Corrupt(format!("the rate of key {id} is unreadable"))
            })?),
        };
        (
            row.try_get::<_, Option<SystemTime>>(7)?.map(unix_ms),
            row.try_get::<_, Option<Vec<String>>>(8)?,
            rate,
        )
    } else {
        (None, None, None)
    };
    Ok(KeyRecord {
        user_id: row.try_get(1)?,
        name: row.try_get::<_, Option<String>>(2)?.unwrap_or_default(),
        hash,
        prefix: row.try_get(4)?,
        created_at: unix_ms(row.try_get(5)?),
        last_used_at: row.try_get::<_, Option<SystemTime>>(6)?.map(unix_ms),
        expires_at,
        workflows,
        rate,
        id,
    })
}

/// An integration row, in [`sql`]'s column order.
fn integration_record(row: &tokio_postgres::Row) -> Result<IntegrationRecord, Failure> {
    Ok(IntegrationRecord {
        id: row.try_get(0)?,
        user_id: row.try_get(1)?,
        kind: row.try_get(2)?,
        name: row.try_get(3)?,
        created_at: unix_ms(row.try_get(4)?),
        last_used_at: row.try_get::<_, Option<SystemTime>>(5)?.map(unix_ms),
        key_id: row.try_get(6)?,
        nonce: row.try_get(7)?,
        ciphertext: row.try_get(8)?,
    })
}

/// A database time (UTC) as Unix milliseconds.
fn unix_ms(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// Unix milliseconds as a database time.
fn system_time(ms: i64) -> SystemTime {
    let magnitude = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

impl Store for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    /// Ids as the engine makes its own: 21 of `[0-9a-z]`.
    fn new_key_id(&self) -> Result<String, getrandom::Error> {
        crate::key::random_lowercase_id(21)
    }

    fn owners_in_engine(&self) -> bool {
        true
    }

    fn create_key(&self, record: KeyRecord) -> StoreFuture<'_, ()> {
        Box::pin(self.run(Retry::Never, move |mut client| {
            let record = record.clone();
            async move {
                self.user_must_exist(&client, &record.user_id).await?;
                let with_policy = record.has_policy();
                if with_policy && !self.has_policies(&client).await? {
                    return Err(StoreError::Refused(NEEDS_PREPARE.into()).into());
                }
                let transaction = client.transaction().await?;
                let statement = transaction.prepare_cached(&self.sql.insert_key).await?;
                let mut inserted = transaction
                    .execute(
                        &statement,
                        &[
                            &record.id,
                            &record.user_id,
                            &record.name,
                            &record.hash.to_hex(),
                            &record.prefix,
                            &system_time(record.created_at),
                        ],
                    )
                    .await;
                if inserted.is_ok() && with_policy {
                    let statement = transaction
                        .prepare_cached(&self.sql.with_policies.insert_policy)
                        .await?;
                    inserted = transaction
                        .execute(
                            &statement,
                            &[
                                &record.id,
                                &record.expires_at.map(system_time),
                                &record.workflows,
                                &record.rate.map(|r| r.to_string()),
                            ],
                        )
                        .await;
                }
                if inserted.is_ok() {
                    transaction.commit().await?;
                }
                match inserted {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        let failure = Failure::from(e);
                        Err(match code(&failure) {
                            Some(&SqlState::UNIQUE_VIOLATION) => {
                                StoreError::Conflict(format!("key {}", record.id)).into()
                            }
                            // The user was deleted between the check and the insert.
                            Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
                                self.unknown_user(&record.user_id).into()
                            }
                            _ => failure,
                        })
                    }
                }
            }
        }))
    }

    fn find_by_hash(&self, hash: KeyHash) -> StoreFuture<'_, Option<KeyRecord>> {
        Box::pin(self.run(Retry::Safe, move |client| async move {
            let statement = client
                .prepare_cached(&self.key_statements(&client).await?.find_by_hash)
                .await?;
            client
                .query_opt(&statement, &[&hash.to_hex()])
                .await?
                .map(|row| key_record(&row))
                .transpose()
        }))
    }

    fn list_keys<'a>(&'a self, user_id: &'a str) -> StoreFuture<'a, Vec<KeyRecord>> {
        Box::pin(self.run(Retry::Safe, move |client| async move {
            let statement = client
                .prepare_cached(&self.key_statements(&client).await?.list_keys)
                .await?;
            client
                .query(&statement, &[&user_id])
                .await?
                .iter()
                .map(key_record)
                .collect()
        }))
    }

    fn revoke_key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, KeyRecord> {
        Box::pin(self.run(Retry::Never, move |client| async move {
            let statement = client
                .prepare_cached(&self.key_statements(&client).await?.delete_key)
                .await?;
            match client.query_opt(&statement, &[&id]).await? {
                Some(row) => key_record(&row),
                None => Err(StoreError::UnknownKey(id.to_owned()).into()),
            }
        }))
    }

    fn get_key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<KeyRecord>> {
        Box::pin(self.run(Retry::Safe, move |client| async move {
            let statement = client
                .prepare_cached(&self.key_statements(&client).await?.get_key)
                .await?;
            client
                .query_opt(&statement, &[&id])
                .await?
                .map(|row| key_record(&row))
                .transpose()
        }))
    }

    fn list_all_keys(&self) -> StoreFuture<'_, Vec<KeyRecord>> {
        Box::pin(self.run(Retry::Safe, move |client| async move {
            let statement = client
                .prepare_cached(&self.key_statements(&client).await?.list_all_keys)
                .await?;
            client
                .query(&statement, &[])
                .await?
                .iter()
                .map(key_record)
                .collect()
        }))
    }

    fn keeps_policies(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.run(Retry::Safe, move |client| async move {
            match self.has_policies(&client).await? {
                true => Ok(()),
                false => Err(StoreError::Refused(NEEDS_PREPARE.into()).into()),
            }
        }))
    }

    fn expire_key<'a>(&'a self, id: &'a str, at: i64) -> StoreFuture<'a, KeyRecord> {
        Box::pin(self.run(Retry::Safe, move |client| async move {
            if !self.has_policies(&client).await? {
                return Err(StoreError::Refused(NEEDS_PREPARE.into()).into());
            }
            let statement = client
                .prepare_cached(&self.sql.with_policies.expire_key)
                .await?;
            if client.execute(&statement, &[&id, &system_time(at)]).await? == 0 {
                return Err(StoreError::UnknownKey(id.to_owned()).into());
            }
            let statement = client
                .prepare_cached(&self.sql.with_policies.keys.get_key)
                .await?;
            match client.query_opt(&statement, &[&id]).await? {
                Some(row) => key_record(&row),
                None => Err(StoreError::UnknownKey(id.to_owned()).into()),
            }
        }))
    }

    fn expired_keys(&self, now: i64) -> StoreFuture<'_, Vec<KeyRecord>> {
        Box::pin(self.run(Retry::Safe, move |client| async move {
            if !self.has_policies(&client).await? {
                return Ok(Vec::new());
            }
            let statement = client
                .prepare_cached(&self.sql.with_policies.expired_keys)
                .await?;
            client
                .query(&statement, &[&system_time(now)])
                .await?
                .iter()
                .map(key_record)
                .collect()
        }))
    }

    fn append_audit(&self, entry: AuditEntry, keep_since: i64) -> StoreFuture<'_, ()> {
        Box::pin(self.run(Retry::Never, move |client| {
            let json = serde_json::to_string(&entry).expect("an audit entry always serializes");
            let (at, id) = (system_time(entry.at), entry.id.clone());
            async move {
                if !self.has_policies(&client).await? {
                    return Err(StoreError::Refused(NEEDS_PREPARE.into()).into());
                }
                let statement = client.prepare_cached(&self.sql.insert_audit).await?;
                client.execute(&statement, &[&at, &id, &json]).await?;
                let statement = client.prepare_cached(&self.sql.trim_audit).await?;
                client
                    .execute(&statement, &[&system_time(keep_since)])
                    .await?;
                Ok(())
            }
        }))
    }

    fn list_audit(&self, since: i64) -> StoreFuture<'_, Vec<AuditEntry>> {
        Box::pin(self.run(Retry::Safe, move |client| async move {
            if !self.has_policies(&client).await? {
                return Err(StoreError::Refused(NEEDS_PREPARE.into()).into());
            }
            let statement = client.prepare_cached(&self.sql.list_audit).await?;
            client
                .query(&statement, &[&system_time(since)])
                .await?
                .iter()
                .map(|row| {
                    let json: String = row.try_get(0)?;
                    serde_json::from_str(&json).map_err(|e| {
                        Failure::Store(StoreError::Corrupt(format!("audit entry: {e}")))
                    })
                })
                .collect()
        }))
    }

    fn record_last_used(&self, batch: Vec<LastUsed>) -> StoreFuture<'_, ()> {
        let ids: Vec<String> = batch.iter().map(|u| u.id.clone()).collect();
        let times: Vec<SystemTime> = batch.iter().map(|u| system_time(u.at)).collect();
        Box::pin(self.run(Retry::Safe, move |client| {
            let (ids, times) = (ids.clone(), times.clone());
            async move {
                if ids.is_empty() {
                    return Ok(());
                }
                let statement = client.prepare_cached(&self.sql.last_used).await?;
                client.execute(&statement, &[&ids, &times]).await?;
                Ok(())
            }
        }))
    }

    fn set_owner<'a>(&'a self, workflow_id: &'a str, user_id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(self.run(Retry::Safe, move |client| async move {
            self.user_must_exist(&client, user_id).await?;
            let statement = client.prepare_cached(&self.sql.set_owner).await?;
            match client.execute(&statement, &[&workflow_id, &user_id]).await {
                Ok(0) => Err(StoreError::UnknownWorkflow(format!(
                    "{workflow_id} (the engine has no such workflow; create it there)"
                ))
                .into()),
                Ok(_) => Ok(()),
                Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
                    Err(self.unknown_user(user_id).into())
                }
                Err(e) => Err(e.into()),
            }
        }))
    }

    fn remove_owner<'a>(&'a self, workflow_id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            Err(StoreError::Refused(format!(
                "workflow {workflow_id}: owners come from the engine's workflows table; delete the workflow in the engine, or give it another owner with set-owner"
            )))
        })
    }

    fn get_owner<'a>(&'a self, workflow_id: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(self.run(Retry::Safe, move |client| async move {
            let statement = client.prepare_cached(&self.sql.get_owner).await?;
            Ok(match client.query_opt(&statement, &[&workflow_id]).await? {
                Some(row) => Some(row.try_get(0)?),
                None => None,
            })
        }))
    }

    fn list_workflows(&self) -> StoreFuture<'_, Vec<WorkflowOwner>> {
        Box::pin(self.run(Retry::Safe, move |client| async move {
            let statement = client.prepare_cached(&self.sql.list_workflows).await?;
            client
                .query(&statement, &[])
                .await?
                .iter()
                .map(|row| {
                    Ok(WorkflowOwner {
                        workflow_id: row.try_get(0)?,
                        owner: row.try_get(1)?,
                    })
                })
                .collect()
        }))
    }

    fn create_integration(&self, record: IntegrationRecord) -> StoreFuture<'_, ()> {
        Box::pin(self.run(Retry::Never, move |client| {
            let record = record.clone();
            async move {
                self.user_must_exist(&client, &record.user_id).await?;
                let statement = client.prepare_cached(&self.sql.insert_integration).await?;
                let inserted = client
                    .execute(
                        &statement,
                        &[
                            &record.id,
                            &record.user_id,
                            &record.kind,
                            &record.name,
                            &system_time(record.created_at),
                            &record.key_id,
                            &record.nonce,
                            &record.ciphertext,
                        ],
                    )
                    .await;
                match inserted {
                    Ok(_) => Ok(()),
                    Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                        Err(StoreError::Conflict(format!("integration {}", record.id)).into())
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }))
    }

    fn get_integration<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<IntegrationRecord>> {
        Box::pin(self.run(Retry::Safe, move |client| async move {
            let statement = client.prepare_cached(&self.sql.get_integration).await?;
            client
                .query_opt(&statement, &[&id])
                .await?
                .map(|row| integration_record(&row))
                .transpose()
        }))
    }

    fn list_integrations<'a>(
        &'a self,
        user_id: &'a str,
    ) -> StoreFuture<'a, Vec<IntegrationRecord>> {
        Box::pin(self.run(Retry::Safe, move |client| async move {
            let statement = client.prepare_cached(&self.sql.list_integrations).await?;
            client
                .query(&statement, &[&user_id])
                .await?
                .iter()
                .map(integration_record)
                .collect()
        }))
    }

    fn all_integrations(&self) -> StoreFuture<'_, Vec<IntegrationRecord>> {
        Box::pin(self.run(Retry::Safe, move |client| async move {
            let statement = client.prepare_cached(&self.sql.all_integrations).await?;
            client
                .query(&statement, &[])
                .await?
                .iter()
                .map(integration_record)
                .collect()
        }))
    }

    fn reseal_integration(&self, record: IntegrationRecord) -> StoreFuture<'_, ()> {
        Box::pin(self.run(Retry::Safe, move |client| {
            let record = record.clone();
            async move {
                let statement = client.prepare_cached(&self.sql.reseal_integration).await?;
                let updated = client
                    .execute(
                        &statement,
                        &[
                            &record.id,
                            &record.key_id,
                            &record.nonce,
                            &record.ciphertext,
                        ],
                    )
                    .await?;
                if updated == 0 {
                    return Err(StoreError::UnknownIntegration(record.id).into());
                }
                Ok(())
            }
        }))
    }

    fn remove_integration<'a>(&'a self, id: &'a str) -> StoreFuture<'a, IntegrationRecord> {
        Box::pin(self.run(Retry::Never, move |client| async move {
            let statement = client.prepare_cached(&self.sql.delete_integration).await?;
            match client.query_opt(&statement, &[&id]).await? {
                Some(row) => integration_record(&row),
                None => Err(StoreError::UnknownIntegration(id.to_owned()).into()),
            }
        }))
    }

    fn integration_used<'a>(&'a self, id: &'a str, at: i64) -> StoreFuture<'a, ()> {
        Box::pin(self.run(Retry::Safe, move |client| async move {
            let statement = client.prepare_cached(&self.sql.integration_used).await?;
            client.execute(&statement, &[&id, &system_time(at)]).await?;
            Ok(())
        }))
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.run(Retry::Safe, move |client| async move {
            client.simple_query("SELECT 1").await?;
            Ok(())
        }))
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_in_milliseconds() {
        for ms in [0, 1, 1_767_323_045_678, -1, -86_400_000] {
            assert_eq!(unix_ms(system_time(ms)), ms);
        }
    }
}
