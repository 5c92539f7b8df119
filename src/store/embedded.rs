//! The default store: one crash-safe redb file, nothing to install.
//!
//! Tables: `keys` (id → JSON record), `key_by_hash` (SHA-256 → id),
//! `user_keys` (user → ids, multimap), `owners` (workflow → user),
//! `integrations` (id → JSON record, the secret sealed) and
//! `user_integrations` (user → ids, multimap), `expiring` (expiry ms and
//! id → nothing, the keys with an expiry) and `audit` (time ms and entry id
//! → JSON entry).
//! redb is synchronous, so every call runs on tokio's blocking pool.

use super::{
    AuditEntry, IntegrationRecord, KeyRecord, LastUsed, Store, StoreError, StoreFuture,
    WorkflowOwner, sort_integrations, sort_newest_first,
};
use crate::key::KeyHash;
use redb::{Database, MultimapTableDefinition, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::Arc;

const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const KEY_BY_HASH: TableDefinition<&[u8], &str> = TableDefinition::new("key_by_hash");
const USER_KEYS: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("user_keys");
const OWNERS: TableDefinition<&str, &str> = TableDefinition::new("owners");
const INTEGRATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("integrations");
const USER_INTEGRATIONS: MultimapTableDefinition<&str, &str> =
    MultimapTableDefinition::new("user_integrations");
const EXPIRING: TableDefinition<(i64, &str), ()> = TableDefinition::new("expiring");
const AUDIT: TableDefinition<(i64, &str), &[u8]> = TableDefinition::new("audit");

pub struct EmbeddedStore {
    db: Arc<Database>,
}

fn fail(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EmbeddedStore {
    /// Opens or creates the file (and its folder), creating the tables.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
                "{} is already open in another keygate process",
                path.display()
            )),
            other => StoreError::Unavailable(format!("cannot open {}: {other}", path.display())),
        })?;
        let txn = db.begin_write().map_err(fail)?;
        txn.open_table(KEYS).map_err(fail)?;
        txn.open_table(KEY_BY_HASH).map_err(fail)?;
        txn.open_multimap_table(USER_KEYS).map_err(fail)?;
        txn.open_table(OWNERS).map_err(fail)?;
        txn.open_table(INTEGRATIONS).map_err(fail)?;
        txn.open_multimap_table(USER_INTEGRATIONS).map_err(fail)?;
        txn.open_table(EXPIRING).map_err(fail)?;
        txn.open_table(AUDIT).map_err(fail)?;
        txn.commit().map_err(fail)?;
        Ok(EmbeddedStore { db: Arc::new(db) })
    }

    fn blocking<T, F>(&self, f: F) -> StoreFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&db))
                .await
                .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
        })
    }
}

fn decode(bytes: &[u8]) -> Result<KeyRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode(record: &KeyRecord) -> Vec<u8> {
    serde_json::to_vec(record).expect("a key record always serializes")
}

fn decode_integration(bytes: &[u8]) -> Result<IntegrationRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode_integration(record: &IntegrationRecord) -> Vec<u8> {
    serde_json::to_vec(record).expect("an integration record always serializes")
}

impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn create_key(&self, record: KeyRecord) -> StoreFuture<'_, ()> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(fail)?;
            {
                let mut keys = txn.open_table(KEYS).map_err(fail)?;
                let mut by_hash = txn.open_table(KEY_BY_HASH).map_err(fail)?;
                if keys.get(record.id.as_str()).map_err(fail)?.is_some()
                    || by_hash.get(&record.hash.0[..]).map_err(fail)?.is_some()
                {
                    return Err(StoreError::Conflict(format!("key {}", record.id)));
                }
                keys.insert(record.id.as_str(), encode(&record).as_slice())
                    .map_err(fail)?;
                by_hash
                    .insert(&record.hash.0[..], record.id.as_str())
                    .map_err(fail)?;
                let mut user_keys = txn.open_multimap_table(USER_KEYS).map_err(fail)?;
                user_keys
                    .insert(record.user_id.as_str(), record.id.as_str())
                    .map_err(fail)?;
                if let Some(at) = record.expires_at {
                    txn.open_table(EXPIRING)
                        .map_err(fail)?
                        .insert((at, record.id.as_str()), ())
                        .map_err(fail)?;
                }
            }
            txn.commit().map_err(fail)
        })
    }

    fn get_key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<KeyRecord>> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(fail)?;
            let keys = txn.open_table(KEYS).map_err(fail)?;
            match keys.get(id.as_str()).map_err(fail)? {
                Some(bytes) => decode(bytes.value()).map(Some),
                None => Ok(None),
            }
        })
    }

    fn list_all_keys(&self) -> StoreFuture<'_, Vec<KeyRecord>> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(fail)?;
            let keys = txn.open_table(KEYS).map_err(fail)?;
            let mut out = Vec::new();
            for entry in keys.iter().map_err(fail)? {
                let (_, bytes) = entry.map_err(fail)?;
                out.push(decode(bytes.value())?);
            }
            sort_newest_first(&mut out);
            Ok(out)
        })
    }

    fn expire_key<'a>(&'a self, id: &'a str, at: i64) -> StoreFuture<'a, KeyRecord> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(fail)?;
            let record = {
                let mut keys = txn.open_table(KEYS).map_err(fail)?;
                let Some(bytes) = keys.get(id.as_str()).map_err(fail)? else {
                    return Err(StoreError::UnknownKey(id));
                };
                let mut record = decode(bytes.value())?;
                drop(bytes);
                if record.expires_at.is_none_or(|current| at < current) {
                    let mut expiring = txn.open_table(EXPIRING).map_err(fail)?;
                    if let Some(current) = record.expires_at {
                        expiring.remove((current, id.as_str())).map_err(fail)?;
                    }
                    expiring.insert((at, id.as_str()), ()).map_err(fail)?;
                    record.expires_at = Some(at);
                    keys.insert(id.as_str(), encode(&record).as_slice())
                        .map_err(fail)?;
                }
                record
            };
            txn.commit().map_err(fail)?;
            Ok(record)
        })
    }

    fn expired_keys(&self, now: i64) -> StoreFuture<'_, Vec<KeyRecord>> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(fail)?;
            let expiring = txn.open_table(EXPIRING).map_err(fail)?;
            let keys = txn.open_table(KEYS).map_err(fail)?;
            let mut out = Vec::new();
            for entry in expiring
                .range((i64::MIN, "")..(now.saturating_add(1), ""))
                .map_err(fail)?
            {
                let (due, _) = entry.map_err(fail)?;
                let (_, id) = due.value();
                if let Some(bytes) = keys.get(id).map_err(fail)? {
                    out.push(decode(bytes.value())?);
                }
            }
            Ok(out)
        })
    }

    fn append_audit(&self, entry: AuditEntry, keep_since: i64) -> StoreFuture<'_, ()> {
        self.blocking(move |db| {
            let json = serde_json::to_vec(&entry).expect("an audit entry always serializes");
            let txn = db.begin_write().map_err(fail)?;
            {
                let mut audit = txn.open_table(AUDIT).map_err(fail)?;
                audit
                    .insert((entry.at, entry.id.as_str()), json.as_slice())
                    .map_err(fail)?;
                audit
                    .retain_in((i64::MIN, "")..(keep_since, ""), |_, _| false)
                    .map_err(fail)?;
            }
            txn.commit().map_err(fail)
        })
    }

    fn list_audit(&self, since: i64) -> StoreFuture<'_, Vec<AuditEntry>> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(fail)?;
            let audit = txn.open_table(AUDIT).map_err(fail)?;
            let mut out = Vec::new();
            for entry in audit.range((since, "")..).map_err(fail)? {
                let (_, json) = entry.map_err(fail)?;
                out.push(
                    serde_json::from_slice(json.value())
                        .map_err(|e| StoreError::Corrupt(format!("audit entry: {e}")))?,
                );
            }
            Ok(out)
        })
    }

    fn find_by_hash(&self, hash: KeyHash) -> StoreFuture<'_, Option<KeyRecord>> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(fail)?;
            let by_hash = txn.open_table(KEY_BY_HASH).map_err(fail)?;
            let Some(id) = by_hash.get(&hash.0[..]).map_err(fail)? else {
                return Ok(None);
            };
            let keys = txn.open_table(KEYS).map_err(fail)?;
            match keys.get(id.value()).map_err(fail)? {
                Some(bytes) => decode(bytes.value()).map(Some),
                None => Ok(None),
            }
        })
    }

    fn list_keys<'a>(&'a self, user_id: &'a str) -> StoreFuture<'a, Vec<KeyRecord>> {
        let user_id = user_id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(fail)?;
            let user_keys = txn.open_multimap_table(USER_KEYS).map_err(fail)?;
            let keys = txn.open_table(KEYS).map_err(fail)?;
            let mut out = Vec::new();
            for id in user_keys.get(user_id.as_str()).map_err(fail)? {
                let id = id.map_err(fail)?;
                if let Some(bytes) = keys.get(id.value()).map_err(fail)? {
                    out.push(decode(bytes.value())?);
                }
            }
            sort_newest_first(&mut out);
            Ok(out)
        })
    }

    fn revoke_key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, KeyRecord> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(fail)?;
            let record = {
                let mut keys = txn.open_table(KEYS).map_err(fail)?;
                let Some(bytes) = keys.remove(id.as_str()).map_err(fail)? else {
                    return Err(StoreError::UnknownKey(id));
                };
                let record = decode(bytes.value())?;
                drop(bytes);
                txn.open_table(KEY_BY_HASH)
                    .map_err(fail)?
                    .remove(&record.hash.0[..])
                    .map_err(fail)?;
                txn.open_multimap_table(USER_KEYS)
                    .map_err(fail)?
                    .remove(record.user_id.as_str(), id.as_str())
                    .map_err(fail)?;
                if let Some(at) = record.expires_at {
                    txn.open_table(EXPIRING)
                        .map_err(fail)?
                        .remove((at, id.as_str()))
                        .map_err(fail)?;
                }
                record
            };
            txn.commit().map_err(fail)?;
            Ok(record)
        })
    }

    fn record_last_used(&self, batch: Vec<LastUsed>) -> StoreFuture<'_, ()> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(fail)?;
            {
                let mut keys = txn.open_table(KEYS).map_err(fail)?;
                for used in &batch {
                    let current = match keys.get(used.id.as_str()).map_err(fail)? {
                        Some(bytes) => match decode(bytes.value()) {
                            Ok(record) => record,
                            // One unreadable record must not block every other key's write.
                            Err(e) => {
                                tracing::warn!(id = %used.id, error = %e, "skipping lastUsedAt for an unreadable key record");
                                continue;
                            }
                        },
                        None => continue,
                    };
                    if current.last_used_at.is_some_and(|t| t >= used.at) {
                        continue;
                    }
                    let updated = KeyRecord {
                        last_used_at: Some(used.at),
                        ..current
                    };
                    keys.insert(used.id.as_str(), encode(&updated).as_slice())
                        .map_err(fail)?;
                }
            }
            txn.commit().map_err(fail)
        })
    }

    fn set_owner<'a>(&'a self, workflow_id: &'a str, user_id: &'a str) -> StoreFuture<'a, ()> {
        let (workflow_id, user_id) = (workflow_id.to_owned(), user_id.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(fail)?;
            txn.open_table(OWNERS)
                .map_err(fail)?
                .insert(workflow_id.as_str(), user_id.as_str())
                .map_err(fail)?;
            txn.commit().map_err(fail)
        })
    }

    fn remove_owner<'a>(&'a self, workflow_id: &'a str) -> StoreFuture<'a, ()> {
        let workflow_id = workflow_id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(fail)?;
            let removed = txn
                .open_table(OWNERS)
                .map_err(fail)?
                .remove(workflow_id.as_str())
                .map_err(fail)?
                .is_some();
            if !removed {
                return Err(StoreError::UnknownWorkflow(workflow_id));
            }
            txn.commit().map_err(fail)
        })
    }

    fn get_owner<'a>(&'a self, workflow_id: &'a str) -> StoreFuture<'a, Option<String>> {
        let workflow_id = workflow_id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(fail)?;
            let owners = txn.open_table(OWNERS).map_err(fail)?;
            Ok(owners
                .get(workflow_id.as_str())
                .map_err(fail)?
                .map(|v| v.value().to_owned()))
        })
    }

    fn list_workflows(&self) -> StoreFuture<'_, Vec<WorkflowOwner>> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(fail)?;
            let owners = txn.open_table(OWNERS).map_err(fail)?;
            let mut out = Vec::new();
            for entry in owners.iter().map_err(fail)? {
                let (k, v) = entry.map_err(fail)?;
                out.push(WorkflowOwner {
                    workflow_id: k.value().to_owned(),
                    owner: v.value().to_owned(),
                });
            }
            Ok(out)
        })
    }

    fn create_integration(&self, record: IntegrationRecord) -> StoreFuture<'_, ()> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(fail)?;
            {
                let mut table = txn.open_table(INTEGRATIONS).map_err(fail)?;
                if table.get(record.id.as_str()).map_err(fail)?.is_some() {
                    return Err(StoreError::Conflict(format!("integration {}", record.id)));
                }
                table
                    .insert(record.id.as_str(), encode_integration(&record).as_slice())
                    .map_err(fail)?;
                txn.open_multimap_table(USER_INTEGRATIONS)
                    .map_err(fail)?
                    .insert(record.user_id.as_str(), record.id.as_str())
                    .map_err(fail)?;
            }
            txn.commit().map_err(fail)
        })
    }

    fn get_integration<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<IntegrationRecord>> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(fail)?;
            let table = txn.open_table(INTEGRATIONS).map_err(fail)?;
            table
                .get(id.as_str())
                .map_err(fail)?
                .map(|v| decode_integration(v.value()))
                .transpose()
        })
    }

    fn list_integrations<'a>(
        &'a self,
        user_id: &'a str,
    ) -> StoreFuture<'a, Vec<IntegrationRecord>> {
        let user_id = user_id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(fail)?;
            let table = txn.open_table(INTEGRATIONS).map_err(fail)?;
            let ids = txn.open_multimap_table(USER_INTEGRATIONS).map_err(fail)?;
            let mut out = Vec::new();
            for id in ids.get(user_id.as_str()).map_err(fail)? {
                let id = id.map_err(fail)?;
                if let Some(bytes) = table.get(id.value()).map_err(fail)? {
                    out.push(decode_integration(bytes.value())?);
                }
            }
            sort_integrations(&mut out);
            Ok(out)
        })
    }

    fn all_integrations(&self) -> StoreFuture<'_, Vec<IntegrationRecord>> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(fail)?;
            let table = txn.open_table(INTEGRATIONS).map_err(fail)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(fail)? {
                let (_, bytes) = entry.map_err(fail)?;
                out.push(decode_integration(bytes.value())?);
            }
            Ok(out)
        })
    }

    fn reseal_integration(&self, record: IntegrationRecord) -> StoreFuture<'_, ()> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(fail)?;
            {
                let mut table = txn.open_table(INTEGRATIONS).map_err(fail)?;
                let current = match table.get(record.id.as_str()).map_err(fail)? {
                    Some(bytes) => decode_integration(bytes.value())?,
                    None => return Err(StoreError::UnknownIntegration(record.id)),
                };
                let resealed = IntegrationRecord {
                    key_id: record.key_id,
                    nonce: record.nonce,
                    ciphertext: record.ciphertext,
                    ..current
                };
                table
                    .insert(
                        resealed.id.as_str(),
                        encode_integration(&resealed).as_slice(),
                    )
                    .map_err(fail)?;
            }
            txn.commit().map_err(fail)
        })
    }

    fn remove_integration<'a>(&'a self, id: &'a str) -> StoreFuture<'a, IntegrationRecord> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(fail)?;
            let removed = {
                let mut table = txn.open_table(INTEGRATIONS).map_err(fail)?;
                let removed = match table.remove(id.as_str()).map_err(fail)? {
                    Some(bytes) => decode_integration(bytes.value())?,
                    None => return Err(StoreError::UnknownIntegration(id)),
                };
                txn.open_multimap_table(USER_INTEGRATIONS)
                    .map_err(fail)?
                    .remove(removed.user_id.as_str(), id.as_str())
                    .map_err(fail)?;
                removed
            };
            txn.commit().map_err(fail)?;
            Ok(removed)
        })
    }

    fn integration_used<'a>(&'a self, id: &'a str, at: i64) -> StoreFuture<'a, ()> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(fail)?;
            {
                let mut table = txn.open_table(INTEGRATIONS).map_err(fail)?;
                let current = match table.get(id.as_str()).map_err(fail)? {
                    Some(bytes) => decode_integration(bytes.value())?,
                    None => return Ok(()),
                };
                if current.last_used_at.is_some_and(|t| t >= at) {
                    return Ok(());
                }
                let used = IntegrationRecord {
                    last_used_at: Some(at),
                    ..current
                };
                table
                    .insert(id.as_str(), encode_integration(&used).as_slice())
                    .map_err(fail)?;
            }
            txn.commit().map_err(fail)
        })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        self.blocking(|db| db.begin_read().map(drop).map_err(fail))
    }
}
