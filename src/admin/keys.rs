//! The key lifecycle on the admin API: create (with an expiry, workflow
//! scopes and a rate of its own), list (one user's, or every user's, or
//! those unused for a while), revoke, roll (a successor now, the old key
//! kept for a grace), each recorded in the audit log.

use super::audit::Action;
use super::rules::{refuse_key_as_id, refuse_user_id};
use super::views::{
    AdminResponse, CreateKey, CreatedKey, KeyView, RollKey, error, json, query_param, store_error,
};
use super::{Admin, NAME_RULE, read_json, valid_name, valid_workflow_id};
use crate::clock;
use crate::key::NewKey;
use crate::store::policy::{RATE_RULE, duration_text, parse_lifetime};
use crate::store::{AuditEntry, KeyRecord, Rate};
use http::{Request, StatusCode};
use hyper::body::Incoming;
use std::net::SocketAddr;

/// Workflows one key may be scoped to.
const MAX_SCOPES: usize = 100;

/// The refusal for a duration the API takes, naming the field.
fn bad_duration(field: &str) -> AdminResponse {
    error(
        StatusCode::BAD_REQUEST,
        format!("{field} must be a duration from 1s to 100 years, like 90s, 15m, 12h or 30d"),
    )
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Admin {
    pub(super) async fn create_key(
        &self,
        request: Request<Incoming>,
        caller: SocketAddr,
    ) -> AdminResponse {
        let body: CreateKey = match read_json(request).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        if let Some(refused) = refuse_user_id(&body.user_id) {
            return refused;
        }
        let name = body.name.unwrap_or_default();
        if !valid_name(&name) {
            return error(StatusCode::BAD_REQUEST, NAME_RULE);
        }
        let now = clock::now_ms();
        let expires_at = match body.expires_in.as_deref().map(parse_lifetime) {
            None => None,
            Some(None) => return bad_duration("expiresIn"),
            Some(Some(d)) => Some(now.saturating_add(ms(d))),
        };
        let workflows = match body.workflows {
            None => None,
            Some(list) if list.is_empty() || list.len() > MAX_SCOPES => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("workflows must list 1 to {MAX_SCOPES} workflow ids"),
                );
            }
            Some(list) => {
                if let Some(bad) = list.iter().find(|w| !valid_workflow_id(w)) {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "workflow id {bad:?} must be 1 to 256 of A-Z a-z 0-9 - _ . ~, and not . or .."
                        ),
                    );
                }
                let mut list = list;
                list.sort();
                list.dedup();
                Some(list)
            }
        };
        let rate = match body.rate.as_deref().map(Rate::parse) {
            None => None,
            Some(None) => return error(StatusCode::BAD_REQUEST, RATE_RULE),
            Some(Some(rate)) => Some(rate),
        };
        let template = KeyRecord {
            id: String::new(),
            user_id: body.user_id,
            name,
            prefix: String::new(),
            hash: crate::key::KeyHash([0; 32]),
            created_at: now,
            last_used_at: None,
            expires_at,
            workflows,
            rate,
        };
        match self.issue(template, caller).await {
            Ok((record, key)) => created(&record, &key),
            Err(response) => response,
        }
    }

    /// Stores a new key made like `template` (user, name, policy), audits
    /// it, and hands back the record and the key (shown this once).
    async fn issue(
        &self,
        template: KeyRecord,
        caller: SocketAddr,
    ) -> Result<(KeyRecord, NewKey), AdminResponse> {
        let (Ok(key), Ok(id)) = (NewKey::generate(), self.store.new_key_id()) else {
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the OS random source failed",
            ));
        };
        let record = KeyRecord {
            id,
            prefix: key.prefix(),
            hash: key.hash(),
            ..template
        };
        self.store
            .create_key(record.clone())
            .await
            .map_err(super::views::store_error)?;
        // A hash tried before it existed may sit in the negative cache.
        self.auth.invalidate_key(record.hash);
        tracing::info!(id = %record.id, user = %record.user_id, key = %record.prefix, %caller, "key created");
        self.record(
            Action::KeyCreated,
            caller,
            AuditEntry {
                detail: policy_text(&record),
                ..about(&record)
            },
        )
        .await;
        Ok((record, key))
    }

    /// `userId=U`, or `all=true`; either with `unusedFor=30d` (never used
    /// counts from creation).
    pub(super) async fn list_keys(&self, query: &str) -> AdminResponse {
        let all = query_param(query, "all").is_some_and(|v| v == "true" || v == "1");
        let unused_for = match query_param(query, "unusedFor") {
            None => None,
            Some(text) => match parse_lifetime(&text) {
                Some(d) => Some(d),
                None => return bad_duration("unusedFor"),
            },
        };
        let listed = match (all, query_param(query, "userId")) {
            (true, None) => self.store.list_all_keys().await,
            (false, Some(user)) => {
                if let Some(refused) = refuse_user_id(&user) {
                    return refused;
                }
                self.store.list_keys(&user).await
            }
            (true, Some(_)) => {
                return error(StatusCode::BAD_REQUEST, "give userId or all=true, not both");
            }
            (false, None) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "query parameter userId (or all=true) is required",
                );
            }
        };
        let mut keys = match listed {
            Ok(keys) => keys,
            Err(e) => return store_error(e),
        };
        if let Some(d) = unused_for {
            let before = clock::now_ms().saturating_sub(ms(d));
            keys.retain(|k| k.last_used_at.unwrap_or(k.created_at) <= before);
        }
        let view = if all {
            KeyView::with_user
        } else {
            KeyView::from
        };
        json(StatusCode::OK, &keys.iter().map(view).collect::<Vec<_>>())
    }

    pub(super) async fn revoke_key(&self, id: &str, caller: SocketAddr) -> AdminResponse {
        if let Some(refused) = refuse_key_as_id(id) {
            return refused;
        }
        match self.store.revoke_key(id).await {
            Ok(record) => {
                let propagated = self
                    .revoked(&record, Action::KeyRevoked, caller, None)
                    .await;
                let mut body =
                    serde_json::json!({"id": record.id, "revoked": true, "propagated": propagated});
                if !propagated {
                    body["warning"] = serde_json::Value::String(
                        "revoked in the store, but other instances could not be told; they refuse the key when their cache entry expires or they resubscribe".into(),
                    );
                }
                json(StatusCode::OK, &body)
            }
            Err(e) => {
                self.after_failed_write(&e, None).await;
                store_error(e)
            }
        }
    }

    /// After a key left the store: drop it here, tell every instance, log
    /// and audit. False when other instances could not be told.
    pub(super) async fn revoked(
        &self,
        record: &KeyRecord,
        action: Action,
        caller: SocketAddr,
        detail: Option<String>,
    ) -> bool {
        self.auth.invalidate_key(record.hash);
        let propagated = self.invalidator.key_revoked(record.hash).await;
        tracing::info!(id = %record.id, user = %record.user_id, key = %record.prefix, propagated, %caller, action = action.name(), "key revoked");
        self.record(
            action,
            caller,
            AuditEntry {
                detail,
                ..about(record)
            },
        )
        .await;
        propagated
    }

    /// A new key with the old one's user, name, scopes and rate (and, if it
    /// had an expiry, the same lifetime from now); the old key keeps working
    /// for `grace` (default 0: refused at once), at most `keys.max_grace`.
    pub(super) async fn roll_key(
        &self,
        id: &str,
        request: Request<Incoming>,
        caller: SocketAddr,
    ) -> AdminResponse {
        if let Some(refused) = refuse_key_as_id(id) {
            return refused;
        }
        let body: RollKey = match super::read_json_or_default(request).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let grace = match body.grace.as_deref() {
            None | Some("0" | "0s") => std::time::Duration::ZERO,
            Some(text) => match parse_lifetime(text) {
                Some(d) => d,
                None => return bad_duration("grace"),
            },
        };
        if grace > self.keys.max_grace {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "grace {} is over keys.max_grace ({})",
                    duration_text(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX)),
                    duration_text(
                        u64::try_from(self.keys.max_grace.as_millis()).unwrap_or(u64::MAX)
                    )
                ),
            );
        }
        let old = match self.store.get_key(id).await {
            Ok(Some(old)) => old,
            Ok(None) => return error(StatusCode::NOT_FOUND, format!("unknown key id: {id}")),
            Err(e) => return store_error(e),
        };
        let now = clock::now_ms();
        if old.expires_at.is_some_and(|at| at <= now) {
            return error(
                StatusCode::CONFLICT,
                format!("key {id} has expired; create a new key instead"),
            );
        }
        // Checked before the successor exists: a grace needs an expiry.
        if !grace.is_zero()
            && let Err(e) = self.store.keeps_policies().await
        {
            return store_error(e);
        }
        let template = KeyRecord {
            created_at: now,
            last_used_at: None,
            expires_at: old
                .expires_at
                .map(|at| now.saturating_add(at.saturating_sub(old.created_at))),
            ..old.clone()
        };
        let (new, key) = match self.issue(template, caller).await {
            Ok(made) => made,
            Err(response) => return response,
        };
        let detail = Some(format!(
            "successor {} ({}), grace {}",
            new.id,
            new.prefix,
            duration_text(u64::try_from(grace.as_millis()).unwrap_or(0))
        ));
        let (old_until, propagated) = if grace.is_zero() {
            match self.store.revoke_key(&old.id).await {
                Ok(record) => (
                    None,
                    self.revoked(&record, Action::KeyRolled, caller, detail)
                        .await,
                ),
                Err(e) => {
                    self.after_failed_write(&e, None).await;
                    return rolled_partly(&new, &key, &e);
                }
            }
        } else {
            match self
                .store
                .expire_key(&old.id, now.saturating_add(ms(grace)))
                .await
            {
                Ok(record) => {
                    self.auth.invalidate_key(record.hash);
                    let propagated = self.invalidator.key_revoked(record.hash).await;
                    tracing::info!(id = %record.id, successor = %new.id, key = %record.prefix, %caller, "key rolled");
                    self.record(
                        Action::KeyRolled,
                        caller,
                        AuditEntry {
                            detail,
                            ..about(&record)
                        },
                    )
                    .await;
                    (record.expires_at, propagated)
                }
                Err(e) => {
                    self.after_failed_write(&e, None).await;
                    return rolled_partly(&new, &key, &e);
                }
            }
        };
        let mut answer =
            serde_json::to_value(CreatedKey::of(&new, key.secret())).unwrap_or_default();
        answer["rolled"] = serde_json::json!({
            "id": old.id,
            "expiresAt": old_until.map(clock::rfc3339),
            "propagated": propagated,
        });
        json(StatusCode::CREATED, &answer)
    }
}

/// 201 with the key, shown this once.
fn created(record: &KeyRecord, key: &NewKey) -> AdminResponse {
    json(StatusCode::CREATED, &CreatedKey::of(record, key.secret()))
}

/// The successor exists but the old key could not be ended: say both, so
/// the key shown is not lost and the caller knows to retry the old one.
fn rolled_partly(new: &KeyRecord, key: &NewKey, e: &crate::store::StoreError) -> AdminResponse {
    let mut answer = serde_json::to_value(CreatedKey::of(new, key.secret())).unwrap_or_default();
    answer["error"] = serde_json::Value::String(format!(
        "the new key was created, but the old one could not be ended: {e}; revoke it (or roll again) when the store answers"
    ));
    json(StatusCode::SERVICE_UNAVAILABLE, &answer)
}

/// The audit fields of a key: never the key or its hash.
fn about(record: &KeyRecord) -> AuditEntry {
    AuditEntry {
        key_id: Some(record.id.clone()),
        key_prefix: Some(record.prefix.clone()),
        user_id: Some(record.user_id.clone()),
        ..AuditEntry::default()
    }
}

/// A key's policy in words, for its audit entry.
fn policy_text(record: &KeyRecord) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(at) = record.expires_at {
        parts.push(format!("expires {}", clock::rfc3339(at)));
    }
    if let Some(workflows) = &record.workflows {
        parts.push(format!("workflows {}", workflows.join(",")));
    }
    if let Some(rate) = record.rate {
        parts.push(format!("rate {rate}"));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}
