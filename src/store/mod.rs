//! Where keys and workflow owners live: one [`Store`] trait with an embedded
//! (redb file), a Redis and a postgres (the engine's own database)
//! implementation. All pass the same conformance suite
//! (`tests/store_conformance.rs`).

pub mod embedded;
pub mod policy;
pub mod postgres;
pub mod redis;

pub use policy::{AuditEntry, Rate};

use crate::key::KeyHash;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

/// What a store returns; boxed because the store is chosen at run time
/// (`Arc<dyn Store>`) and only cache misses reach it.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A stored API key. Never holds the key itself: only its hash and prefix.
/// Its serde form (`camelCase`, the hash in hex) is what the embedded store
/// keeps.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyRecord {
    pub id: String,
    pub user_id: String,
    pub name: String,
    #[serde(rename = "keyPrefix")]
    pub prefix: String,
    #[serde(rename = "keyHash", with = "hex_hash")]
    pub hash: KeyHash,
    /// Unix milliseconds.
    pub created_at: i64,
    #[serde(default)]
    pub last_used_at: Option<i64>,
    /// Unix milliseconds; refused from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// The workflows it may call (of its user's); `None` for all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflows: Option<Vec<String>>,
    /// Its own rate, instead of `rate_limit.key_requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
}

impl KeyRecord {
    /// Whether it has an expiry, scopes or a rate of its own.
    pub fn has_policy(&self) -> bool {
        self.expires_at.is_some() || self.workflows.is_some() || self.rate.is_some()
    }
}

/// A key hash as lower-case hex in serde forms.
mod hex_hash {
    use crate::key::KeyHash;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(hash: &KeyHash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hash.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<KeyHash, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        KeyHash::from_hex(&text).ok_or_else(|| serde::de::Error::custom("a malformed key hash"))
    }
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("user_id", &self.user_id)
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .field("created_at", &self.created_at)
            .field("last_used_at", &self.last_used_at)
            .finish_non_exhaustive()
    }
}

/// An integration credential as stored: who it is for, and its secret
/// sealed by the vault (never the plaintext). The serde form (`camelCase`,
/// bytes in base64) is what the embedded store keeps.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IntegrationRecord {
    pub id: String,
    pub user_id: String,
    /// The provider type (`skytells`, `stripe`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    /// Unix milliseconds.
    pub created_at: i64,
    #[serde(default)]
    pub last_used_at: Option<i64>,
    /// The master key that sealed it.
    pub key_id: String,
    #[serde(with = "base64_bytes")]
    pub nonce: Vec<u8>,
    #[serde(with = "base64_bytes")]
    pub ciphertext: Vec<u8>,
}

impl IntegrationRecord {
    /// What the vault binds its secret to.
    pub fn binding(&self) -> crate::vault::Binding<'_> {
        crate::vault::Binding {
            id: &self.id,
            user_id: &self.user_id,
            kind: &self.kind,
        }
    }

    /// Its secret, sealed; `None` for a nonce of the wrong length.
    pub fn sealed(&self) -> Option<crate::vault::Sealed> {
        Some(crate::vault::Sealed {
            key_id: self.key_id.clone(),
            nonce: self.nonce.as_slice().try_into().ok()?,
            ciphertext: self.ciphertext.clone(),
        })
    }
}

impl fmt::Debug for IntegrationRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntegrationRecord")
            .field("id", &self.id)
            .field("user_id", &self.user_id)
            .field("kind", &self.kind)
            .field("name", &self.name)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Bytes as base64 in serde forms.
mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// One pending `lastUsedAt` write. The hash is carried so stores keyed by
/// hash need no extra lookup; it never leaves the process except to the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastUsed {
    pub id: String,
    pub hash: KeyHash,
    pub at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkflowOwner {
    pub workflow_id: String,
    pub owner: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// No key with this id (never existed, or already revoked).
    UnknownKey(String),
    /// No owner registered for this workflow.
    UnknownWorkflow(String),
    /// A user the store must know (the engine's users table) and does not.
    UnknownUser(String),
    /// A change this store does not make, and why.
    Refused(String),
    /// No integration with this id.
    UnknownIntegration(String),
    /// A key with this id or hash exists already.
    Conflict(String),
    /// The store cannot be reached or did not answer in time.
    Unavailable(String),
    /// The store answered with data keygate cannot read.
    Corrupt(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::UnknownKey(id) => write!(f, "unknown key id {id:?}"),
            StoreError::UnknownWorkflow(id) => write!(f, "workflow {id:?} has no owner"),
            StoreError::UnknownUser(id) => write!(f, "unknown user {id}"),
            StoreError::Refused(why) => f.write_str(why),
            StoreError::UnknownIntegration(id) => write!(f, "unknown integration id {id:?}"),
            StoreError::Conflict(what) => write!(f, "already exists: {what}"),
            StoreError::Unavailable(why) => write!(f, "store unavailable: {why}"),
            StoreError::Corrupt(why) => write!(f, "store data unreadable: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

pub trait Store: Send + Sync + 'static {
    /// Which implementation, for logs and metrics.
    fn kind(&self) -> &'static str;

    /// The id for a key keygate creates.
    fn new_key_id(&self) -> Result<String, getrandom::Error> {
        crate::key::random_id("key")
    }

    /// True when owners live in the engine's own tables (so setting one
    /// changes the engine's data, and removing one is not keygate's to do).
    fn owners_in_engine(&self) -> bool {
        false
    }

    fn create_key(&self, record: KeyRecord) -> StoreFuture<'_, ()>;

    fn find_by_hash(&self, hash: KeyHash) -> StoreFuture<'_, Option<KeyRecord>>;

    /// A user's keys, newest first.
    fn list_keys<'a>(&'a self, user_id: &'a str) -> StoreFuture<'a, Vec<KeyRecord>>;

    /// Deletes a key and returns what it was; `UnknownKey` if there is none.
    fn revoke_key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, KeyRecord>;

    /// A key by its id.
    fn get_key<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<KeyRecord>>;

    /// Every user's keys, newest first.
    fn list_all_keys(&self) -> StoreFuture<'_, Vec<KeyRecord>>;

    /// Makes a key expire at `at` (Unix ms) unless it expires sooner, and
    /// returns it as it is now; `UnknownKey` if there is none.
    fn expire_key<'a>(&'a self, id: &'a str, at: i64) -> StoreFuture<'a, KeyRecord>;

    /// Whether keys here can have an expiry, scopes or a rate (the postgres
    /// store needs `store prepare`'s tables); `Refused` saying what is
    /// missing when not.
    fn keeps_policies(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Keys whose expiry is at or before `now`, for the sweep.
    fn expired_keys(&self, now: i64) -> StoreFuture<'_, Vec<KeyRecord>> {
        Box::pin(async move {
            let mut keys = self.list_all_keys().await?;
            keys.retain(|k| k.expires_at.is_some_and(|at| at <= now));
            Ok(keys)
        })
    }

    /// Appends to the audit log, dropping entries older than `keep_since`.
    fn append_audit(&self, entry: AuditEntry, keep_since: i64) -> StoreFuture<'_, ()>;

    /// Audit entries from `since` on (Unix ms), oldest first.
    fn list_audit(&self, since: i64) -> StoreFuture<'_, Vec<AuditEntry>>;

    /// Writes a batch of last-used times; a time never moves backwards and a
    /// revoked key is not brought back.
    fn record_last_used(&self, batch: Vec<LastUsed>) -> StoreFuture<'_, ()>;

    fn set_owner<'a>(&'a self, workflow_id: &'a str, user_id: &'a str) -> StoreFuture<'a, ()>;

    /// `UnknownWorkflow` if the workflow had no owner.
    fn remove_owner<'a>(&'a self, workflow_id: &'a str) -> StoreFuture<'a, ()>;

    fn get_owner<'a>(&'a self, workflow_id: &'a str) -> StoreFuture<'a, Option<String>>;

    /// All workflows with an owner, sorted by id.
    fn list_workflows(&self) -> StoreFuture<'_, Vec<WorkflowOwner>>;

    // Integration credentials. A store that keeps none refuses them (the
    // three stores here all keep them).

    /// Conflict if the id is taken.
    fn create_integration(&self, record: IntegrationRecord) -> StoreFuture<'_, ()> {
        drop(record);
        no_integrations()
    }

    fn get_integration<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<IntegrationRecord>> {
        let _ = id;
        no_integrations()
    }

    /// A user's integrations, newest first.
    fn list_integrations<'a>(
        &'a self,
        user_id: &'a str,
    ) -> StoreFuture<'a, Vec<IntegrationRecord>> {
        let _ = user_id;
        no_integrations()
    }

    /// Every integration (for re-sealing them under a new master key).
    fn all_integrations(&self) -> StoreFuture<'_, Vec<IntegrationRecord>> {
        no_integrations()
    }

    /// Replaces a record's sealed secret (`key_id`, `nonce`, `ciphertext`);
    /// `UnknownIntegration` if it is gone.
    fn reseal_integration(&self, record: IntegrationRecord) -> StoreFuture<'_, ()> {
        drop(record);
        no_integrations()
    }

    /// Deletes and returns it; `UnknownIntegration` if there is none.
    fn remove_integration<'a>(&'a self, id: &'a str) -> StoreFuture<'a, IntegrationRecord> {
        let _ = id;
        no_integrations()
    }

    /// Never moves the time backwards; a removed integration stays removed.
    fn integration_used<'a>(&'a self, id: &'a str, at: i64) -> StoreFuture<'a, ()> {
        let _ = (id, at);
        no_integrations()
    }

    /// Succeeds when the store answers; backs `/readyz`.
    fn ping(&self) -> StoreFuture<'_, ()>;

    /// How long one request's lookups may wait on this store in all before
    /// they count as failed (503); `None` for a local store, which either
    /// answers or fails.
    fn timeout(&self) -> Option<std::time::Duration> {
        None
    }
}

fn no_integrations<T>() -> StoreFuture<'static, T> {
    Box::pin(async {
        Err(StoreError::Refused(
            "this store keeps no integrations".into(),
        ))
    })
}

/// Newest first; ties broken by id so listings are stable.
pub(crate) fn sort_integrations(list: &mut [IntegrationRecord]) {
    list.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then_with(|| b.id.cmp(&a.id))
    });
}

/// Newest first; ties broken by id so listings are stable.
pub(crate) fn sort_newest_first(keys: &mut [KeyRecord]) {
    keys.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then_with(|| b.id.cmp(&a.id))
    });
}
