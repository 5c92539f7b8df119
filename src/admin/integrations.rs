//! The admin API's integration credentials and run tokens:
//! `POST|GET /admin/v1/integrations`, `DELETE /admin/v1/integrations/{id}`,
//! `POST /admin/v1/integrations/rekey` and `POST /admin/v1/run-tokens`.
//! A secret arrives once, in a request body read into a zeroed buffer, is
//! sealed at once, and is never in an answer, a log line or an error.

use super::audit::Action;
use super::views::{AdminResponse, error, json, store_error};
use super::{Admin, MAX_BODY, read_body};
use crate::clock;
use crate::store::AuditEntry;
use crate::store::{IntegrationRecord, StoreError};
use crate::vault::{Credentials, Secret};
use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use zeroize::Zeroizing;

/// An integration as listings show it: never its secret.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct IntegrationView<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub name: &'a str,
    pub created_at: String,
    pub last_used_at: Option<String>,
    /// The master key that sealed it.
    pub key_id: &'a str,
}

impl<'a> From<&'a IntegrationRecord> for IntegrationView<'a> {
    fn from(r: &'a IntegrationRecord) -> IntegrationView<'a> {
        IntegrationView {
            id: &r.id,
            kind: &r.kind,
            name: &r.name,
            created_at: clock::rfc3339(r.created_at),
            last_used_at: r.last_used_at.map(clock::rfc3339),
            key_id: &r.key_id,
        }
    }
}

/// `POST /admin/v1/integrations`: the secret as `secret` (for the type's
/// credential field, or `field`), or as `fields` (every field, as an
/// import brings them); `id` and `createdAt` (Unix ms) only on import.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AddIntegration {
    user_id: String,
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
    field: Option<String>,
    secret: Option<Zeroizing<String>>,
    fields: Option<BTreeMap<String, Zeroizing<String>>>,
    id: Option<String>,
    created_at: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MintRunToken {
    user_id: String,
    ttl: Option<String>,
}

/// The longest a minted run token may live.
const MAX_MINTED_TTL: Duration = Duration::from_secs(24 * 3600);

fn no_vault() -> AdminResponse {
    error(
        StatusCode::CONFLICT,
        "integration credentials need a vault: set vault.master_keys",
    )
}

/// Why a credential's value is refused, if it is.
fn refuse_value(value: &str) -> Option<&'static str> {
    if value.starts_with(crate::key::KEY_SCHEME) {
        Some("keygate API keys (wfb_…) cannot be provider credentials")
    } else if value.starts_with(crate::vault::run_token::SCHEME) {
        Some("run tokens (kgr_…) cannot be provider credentials")
    } else if value.is_empty() || value.len() > 8192 {
        Some("a credential is 1 to 8192 characters")
    } else {
        None
    }
}

/// Ids an import brings: the template's, or keygate's own `int_…`.
fn valid_integration_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

impl Admin {
    fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_deref()
    }

    pub(super) async fn add_integration(
        &self,
        request: Request<Incoming>,
        caller: SocketAddr,
    ) -> AdminResponse {
        let Some(credentials) = self.credentials() else {
            return no_vault();
        };
        let body = match read_body(request, MAX_BODY).await {
            Ok(body) => body,
            Err(r) => return r,
        };
        // serde's own messages may quote the input, which holds a secret:
        // say only where the body went wrong.
        let add: AddIntegration = match serde_json::from_slice(&body) {
            Ok(add) => add,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "invalid JSON body at line {} column {}: expected {{userId, type, name?, secret, field?}}",
                        e.line(),
                        e.column()
                    ),
                );
            }
        };
        drop(body);
        if let Some(refused) = super::rules::refuse_user_id(&add.user_id) {
            return refused;
        }
        let Some(provider) = credentials.providers.get(&add.kind) else {
            let known: Vec<&str> = credentials.providers.keys().map(String::as_str).collect();
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown integration type {:?}; known: {} (egress.providers adds others)",
                    add.kind,
                    known.join(", ")
                ),
            );
        };
        let name = add.name.unwrap_or_else(|| add.kind.clone());
        if name.is_empty() || !super::valid_name(&name) {
            return error(StatusCode::BAD_REQUEST, super::NAME_RULE);
        }
        let needed = provider.fields();
        let fields = match (add.secret, add.fields) {
            (Some(secret), None) => {
                let field = add
                    .field
                    .unwrap_or_else(|| needed.first().copied().unwrap_or("apiKey").to_owned());
                BTreeMap::from([(field, secret)])
            }
            (None, Some(fields)) if add.field.is_none() => fields,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "give the credential as secret (with field, optionally) or as fields, not both",
                );
            }
        };
        for (field, value) in &fields {
            if field.is_empty()
                || !field
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return error(
                    StatusCode::BAD_REQUEST,
                    "field names are letters, digits and _",
                );
            }
            if let Some(why) = refuse_value(value) {
                return error(StatusCode::BAD_REQUEST, why);
            }
        }
        if let Some(missing) = needed.iter().find(|f| !fields.contains_key(**f)) {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "type {} needs the field {missing} (its headers use {})",
                    add.kind,
                    needed.join(", ")
                ),
            );
        }
        let id = match add.id {
            Some(id) if valid_integration_id(&id) => id,
            Some(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "an integration id is 1 to 128 of A-Z a-z 0-9 - _",
                );
            }
            None => match crate::key::random_id("int") {
                Ok(id) => id,
                Err(_) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the OS random source failed",
                    );
                }
            },
        };
        let plain: BTreeMap<&str, &str> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        // Sized up front, so writing it never leaves a copy behind.
        let room: usize = plain.iter().map(|(k, v)| 2 * (k.len() + v.len()) + 8).sum();
        let mut encoded = Zeroizing::new(Vec::with_capacity(room + 2));
        if serde_json::to_writer(&mut *encoded, &plain).is_err() {
            return error(StatusCode::BAD_REQUEST, "the credential does not encode");
        }
        drop(plain);
        let secret = match Secret::from_json(encoded) {
            Ok(secret) => secret,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        };
        let mut record = IntegrationRecord {
            id,
            user_id: add.user_id,
            kind: add.kind,
            name,
            created_at: add.created_at.unwrap_or_else(clock::now_ms),
            last_used_at: None,
            key_id: String::new(),
            nonce: Vec::new(),
            ciphertext: Vec::new(),
        };
        let sealed = match credentials.vault.seal(record.binding(), &secret) {
            Ok(sealed) => sealed,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        drop(secret);
        record.key_id = sealed.key_id;
        record.nonce = sealed.nonce.to_vec();
        record.ciphertext = sealed.ciphertext;
        if let Err(e) = self.store.create_integration(record.clone()).await {
            return store_error(e);
        }
        tracing::info!(id = %record.id, user = %record.user_id, kind = %record.kind, key_id = %record.key_id, %caller, "integration added");
        self.record(
            Action::IntegrationAdded,
            caller,
            AuditEntry {
                integration_id: Some(record.id.clone()),
                user_id: Some(record.user_id.clone()),
                detail: Some(format!("type {}", record.kind)),
                ..AuditEntry::default()
            },
        )
        .await;
        json(StatusCode::CREATED, &IntegrationView::from(&record))
    }

    pub(super) async fn list_integrations(&self, user: Option<String>) -> AdminResponse {
        let Some(user) = user else {
            return error(
                StatusCode::BAD_REQUEST,
                "query parameter userId is required",
            );
        };
        if let Some(refused) = super::rules::refuse_user_id(&user) {
            return refused;
        }
        match self.store.list_integrations(&user).await {
            Ok(list) => json(
                StatusCode::OK,
                &list.iter().map(IntegrationView::from).collect::<Vec<_>>(),
            ),
            Err(e) => store_error(e),
        }
    }

    pub(super) async fn remove_integration(&self, id: &str, caller: SocketAddr) -> AdminResponse {
        match self.store.remove_integration(id).await {
            Ok(record) => {
                tracing::info!(id = %record.id, user = %record.user_id, kind = %record.kind, %caller, "integration removed");
                self.record(
                    Action::IntegrationRemoved,
                    caller,
                    AuditEntry {
                        integration_id: Some(record.id.clone()),
                        user_id: Some(record.user_id.clone()),
                        detail: Some(format!("type {}", record.kind)),
                        ..AuditEntry::default()
                    },
                )
                .await;
                json(
                    StatusCode::OK,
                    &serde_json::json!({"id": record.id, "removed": true}),
                )
            }
            Err(e) => store_error(e),
        }
    }

    /// Re-seals every integration not yet under the first master key.
    pub(super) async fn rekey_integrations(&self, caller: SocketAddr) -> AdminResponse {
        let Some(credentials) = self.credentials() else {
            return no_vault();
        };
        let all = match self.store.all_integrations().await {
            Ok(all) => all,
            Err(e) => return store_error(e),
        };
        let vault = &credentials.vault;
        let (mut rekeyed, mut current) = (0usize, 0usize);
        let mut failed = Vec::new();
        for record in all {
            let Some(sealed) = record.sealed() else {
                failed.push(serde_json::json!({"id": record.id, "error": "the stored nonce is not 12 bytes"}));
                continue;
            };
            if vault.is_current(&sealed) {
                current += 1;
                continue;
            }
            let resealed = vault
                .open(record.binding(), &sealed)
                .and_then(|secret| vault.seal(record.binding(), &secret));
            let resealed = match resealed {
                Ok(resealed) => resealed,
                Err(e) => {
                    failed.push(serde_json::json!({"id": record.id, "error": e.to_string()}));
                    continue;
                }
            };
            let update = IntegrationRecord {
                key_id: resealed.key_id,
                nonce: resealed.nonce.to_vec(),
                ciphertext: resealed.ciphertext,
                ..record
            };
            match self.store.reseal_integration(update).await {
                Ok(()) => rekeyed += 1,
                // Removed meanwhile: nothing left to re-seal.
                Err(StoreError::UnknownIntegration(_)) => {}
                Err(e) => return store_error(e),
            }
        }
        let key_id = vault.sealing_key_id();
        tracing::info!(rekeyed, current, failed = failed.len(), key_id, %caller, "integrations re-sealed");
        self.record(
            Action::IntegrationsRekeyed,
            caller,
            AuditEntry {
                detail: Some(format!(
                    "{rekeyed} re-sealed under {key_id}, {current} already, {} failed",
                    failed.len()
                )),
                ..AuditEntry::default()
            },
        )
        .await;
        json(
            StatusCode::OK,
            &serde_json::json!({"rekeyed": rekeyed, "alreadyCurrent": current, "keyId": key_id, "failed": failed}),
        )
    }

    /// `POST /admin/v1/run-tokens`, by the admin token or `egress.mint_token`.
    pub(super) async fn mint_run_token(
        &self,
        request: Request<Incoming>,
        caller: SocketAddr,
        by: &'static str,
    ) -> AdminResponse {
        let Some(credentials) = self.credentials() else {
            return no_vault();
        };
        let body: MintRunToken = match super::read_json(request).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        if let Some(refused) = super::rules::refuse_user_id(&body.user_id) {
            return refused;
        }
        let ttl = match body.ttl.as_deref() {
            None => credentials.run_token_ttl.min(MAX_MINTED_TTL),
            Some(text) => match crate::config::parse_duration(text) {
                Some(ttl) if !ttl.is_zero() && ttl <= MAX_MINTED_TTL => ttl,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "ttl is a duration like 15m or 1h, at most 24h",
                    );
                }
            },
        };
        let (token, expires_at) = credentials.run_token(&body.user_id, "", ttl);
        tracing::info!(target: "keygate::audit", user = %body.user_id, ttl_s = ttl.as_secs(), expires_at, by, %caller, "run token minted");
        self.record(
            Action::RunTokenMinted,
            caller,
            AuditEntry {
                user_id: Some(body.user_id.clone()),
                detail: Some(format!("ttl {}s, by the {by}", ttl.as_secs())),
                ..AuditEntry::default()
            },
        )
        .await;
        json(
            StatusCode::CREATED,
            &serde_json::json!({
                "token": token,
                "userId": body.user_id,
                "expiresAt": clock::rfc3339(expires_at.saturating_mul(1000)),
            }),
        )
    }
}
