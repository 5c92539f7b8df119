//! The audit log: every admin action appended to the store with its time,
//! ids, the key's prefix and the caller's address (never a key, hash or
//! secret), kept for `audit.retention`; `GET /admin/v1/audit?since=7d`
//! reads it. Also the sweep that revokes expired keys, audited as
//! `key.expired`.

use super::Admin;
use super::views::{AdminResponse, error, json, query_param, store_error};
use crate::clock;
use crate::store::AuditEntry;
use crate::store::policy::parse_lifetime;
use http::StatusCode;
use std::net::SocketAddr;

/// What an audit entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    KeyCreated,
    KeyRolled,
    KeyRevoked,
    KeyExpired,
    OwnerSet,
    OwnerRemoved,
    IntegrationAdded,
    IntegrationRemoved,
    IntegrationsRekeyed,
    RunTokenMinted,
}

impl Action {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Action::KeyCreated => "key.created",
            Action::KeyRolled => "key.rolled",
            Action::KeyRevoked => "key.revoked",
            Action::KeyExpired => "key.expired",
            Action::OwnerSet => "owner.set",
            Action::OwnerRemoved => "owner.removed",
            Action::IntegrationAdded => "integration.added",
            Action::IntegrationRemoved => "integration.removed",
            Action::IntegrationsRekeyed => "integrations.rekeyed",
            Action::RunTokenMinted => "run_token.minted",
        }
    }
}

/// The caller of what keygate does itself (the sweep).
const KEYGATE: &str = "keygate";

fn retention_ms(admin: &Admin) -> i64 {
    i64::try_from(admin.audit.retention.as_millis()).unwrap_or(i64::MAX)
}

impl Admin {
    /// Appends to the audit log. The action has happened already, so a
    /// store that cannot take the entry is logged (and counted), not
    /// turned into a failure of the action.
    pub(super) async fn record(&self, action: Action, caller: SocketAddr, entry: AuditEntry) {
        self.append(action, caller.to_string(), entry).await;
    }

    async fn append(&self, action: Action, caller: String, entry: AuditEntry) {
        let at = clock::now_ms();
        let id = crate::key::random_id("audit").unwrap_or_default();
        let entry = AuditEntry {
            at,
            action: action.name().to_owned(),
            caller,
            id,
            ..entry
        };
        let keep_since = at.saturating_sub(retention_ms(self));
        if let Err(e) = self.store.append_audit(entry, keep_since).await {
            self.metrics.audit_failed();
            tracing::warn!(action = action.name(), error = %e, "audit entry not written");
        }
    }

    /// `since=DUR` (default: the whole retention), oldest first.
    pub(super) async fn list_audit(&self, query: &str) -> AdminResponse {
        let since = match query_param(query, "since") {
            None => self.audit.retention,
            Some(text) => match parse_lifetime(&text) {
                Some(d) => d,
                None => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "since must be a duration from 1s to 100 years, like 90s, 15m, 12h or 30d",
                    );
                }
            },
        };
        let from =
            clock::now_ms().saturating_sub(i64::try_from(since.as_millis()).unwrap_or(i64::MAX));
        match self.store.list_audit(from).await {
            Ok(entries) => json(
                StatusCode::OK,
                &entries
                    .iter()
                    .map(|e| {
                        let mut v = serde_json::to_value(e).unwrap_or_default();
                        v["at"] = serde_json::Value::String(clock::rfc3339(e.at));
                        v
                    })
                    .collect::<Vec<_>>(),
            ),
            Err(e) => store_error(e),
        }
    }

    /// Revokes every key whose expiry has passed (on every instance, each
    /// audited once: the instance whose revoke took it). An expired key is
    /// refused from its expiry on whether swept or not; the sweep clears
    /// the store and the caches.
    pub async fn sweep_expired(&self) {
        let now = clock::now_ms();
        let expired = match self.store.expired_keys(now).await {
            Ok(expired) => expired,
            Err(e) => {
                tracing::debug!(error = %e, "expired keys not swept");
                return;
            }
        };
        for key in expired {
            match self.store.revoke_key(&key.id).await {
                Ok(record) => {
                    self.auth.invalidate_key(record.hash);
                    self.invalidator.key_revoked(record.hash).await;
                    tracing::info!(id = %record.id, user = %record.user_id, key = %record.prefix, "expired key swept");
                    self.append(
                        Action::KeyExpired,
                        KEYGATE.to_owned(),
                        AuditEntry {
                            key_id: Some(record.id.clone()),
                            key_prefix: Some(record.prefix.clone()),
                            user_id: Some(record.user_id.clone()),
                            detail: record
                                .expires_at
                                .map(|at| format!("expired {}", clock::rfc3339(at))),
                            ..AuditEntry::default()
                        },
                    )
                    .await;
                }
                // Another instance swept it first.
                Err(crate::store::StoreError::UnknownKey(_)) => {}
                Err(e) => tracing::debug!(error = %e, "expired key not swept"),
            }
        }
    }

    /// How often [`Admin::sweep_expired`] should run.
    pub fn sweep_interval(&self) -> std::time::Duration {
        self.keys.sweep_interval
    }
}
