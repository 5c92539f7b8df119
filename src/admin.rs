//! The admin API on its own listener: key lifecycle and workflow owners
//! under `/admin/v1/...` (bearer admin token, compared in constant time),
//! plus `/healthz`, `/readyz` and `/metrics`.
//!
//! The token comes from `admin.token` in config, or else from
//! `admin.token_file`, which the server creates (mode 0600) on first start
//! so the CLI on the same machine, reading the same config, can use it.

use crate::auth::Auth;
use crate::clock;
use crate::invalidate::Invalidator;
use crate::key::{self, NewKey};
use crate::metrics::Metrics;
use crate::store::{KeyRecord, Store, StoreError};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

pub struct Admin {
    pub store: Arc<dyn Store>,
    pub auth: Arc<Auth>,
    pub metrics: Arc<Metrics>,
    pub invalidator: Arc<Invalidator>,
    /// SHA-256 of the token: compared in constant time, never logged.
    token_hash: [u8; 32],
}

/// Largest admin request body.
const MAX_BODY: usize = 64 * 1024;
/// How long an admin request body may take to arrive.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub key_prefix: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
}

impl From<&KeyRecord> for KeyView {
    fn from(r: &KeyRecord) -> KeyView {
        KeyView {
            id: r.id.clone(),
            name: r.name.clone(),
            key_prefix: r.prefix.clone(),
            created_at: clock::rfc3339(r.created_at),
            last_used_at: r.last_used_at.map(clock::rfc3339),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CreatedKey {
    id: String,
    name: String,
    key_prefix: String,
    created_at: String,
    /// The only place the full key ever appears.
    key: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateKey {
    user_id: String,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SetOwner {
    user_id: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WorkflowView {
    workflow_id: String,
    user_id: String,
}

type AdminResponse = Response<Full<Bytes>>;

fn json(status: StatusCode, value: &impl Serialize) -> AdminResponse {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> AdminResponse {
    json(status, &serde_json::json!({ "error": message.into() }))
}

fn store_error(e: StoreError) -> AdminResponse {
    match e {
        StoreError::UnknownKey(id) => error(StatusCode::NOT_FOUND, format!("unknown key id: {id}")),
        StoreError::UnknownWorkflow(id) => {
            error(StatusCode::NOT_FOUND, format!("unknown workflow: {id}"))
        }
        StoreError::Conflict(what) => {
            error(StatusCode::CONFLICT, format!("already exists: {what}"))
        }
        e @ (StoreError::Unavailable(_) | StoreError::Corrupt(_)) => {
            tracing::warn!(error = %e, "admin call failed on the store");
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

/// User ids travel in a header upstream: visible ASCII only.
pub fn valid_user_id(s: &str) -> bool {
    (1..=256).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Workflow ids sit in a URL path segment: unreserved characters only,
/// and never a dot segment, which an engine could resolve to another path.
pub fn valid_workflow_id(s: &str) -> bool {
    (1..=256).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

/// The 400 for an unusable user id, if it is one.
fn refuse_user_id(user_id: &str) -> Option<AdminResponse> {
    (!valid_user_id(user_id)).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            "userId must be 1 to 256 visible ASCII characters",
        )
    })
}

/// Names are shown in listings, logs and terminals: printable text only.
/// Control characters, text-direction overrides and isolates (which can
/// make a name read as another, "Trojan Source"), zero-width characters
/// and line or paragraph separators are refused.
pub fn valid_name(s: &str) -> bool {
    s.chars().count() <= 128 && !s.chars().any(deceptive)
}

/// The message for a name [`valid_name`] refuses.
pub const NAME_RULE: &str = "name must be at most 128 characters, without control, zero-width, line-separator or text-direction characters";

fn deceptive(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200B}'..='\u{200F}'   // zero-width space, joiners, LRM, RLM
            | '\u{2028}' | '\u{2029}' // line and paragraph separators
            | '\u{202A}'..='\u{202E}' // embeddings and overrides
            | '\u{2060}'..='\u{2064}' // word joiner, invisible operators
            | '\u{2066}'..='\u{2069}' // isolates
            | '\u{061C}'               // Arabic letter mark
            | '\u{FEFF}') // zero-width no-break space
}

/// The refusal for a key id that is really a key: the key is never echoed.
fn refuse_key_as_id(id: &str) -> Option<AdminResponse> {
    (id.starts_with(key::KEY_SCHEME) || id.starts_with("sk-")).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            "that looks like a key, not a key id; use `keys list` to find the id",
        )
    })
}

impl Admin {
    pub fn new(
        store: Arc<dyn Store>,
        auth: Arc<Auth>,
        metrics: Arc<Metrics>,
        invalidator: Arc<Invalidator>,
        token: &str,
    ) -> Admin {
        Admin {
            store,
            auth,
            metrics,
            invalidator,
            token_hash: Sha256::digest(token.as_bytes()).into(),
        }
    }

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let Some(presented) = presented else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        subtle::ConstantTimeEq::ct_eq(&digest[..], &self.token_hash[..]).into()
    }

    /// Answers one admin request; `caller` is logged with every change.
    pub async fn handle(&self, request: Request<Incoming>, caller: SocketAddr) -> AdminResponse {
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        match (&method, path.as_str()) {
            (&Method::GET, "/healthz") => {
                return json(StatusCode::OK, &serde_json::json!({"status": "ok"}));
            }
            (&Method::GET, "/readyz") => return self.ready().await,
            (&Method::GET, "/metrics") => {
                let mut r = Response::new(Full::new(Bytes::from(self.metrics.render())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                return r;
            }
            _ => {}
        }
        let Some(rest) = path.strip_prefix("/admin/v1/") else {
            return error(StatusCode::NOT_FOUND, "Not found");
        };
        if !self.authorized(&request) {
            let mut r = error(StatusCode::UNAUTHORIZED, "Invalid admin token");
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
        let Some(decoded) = rest
            .split('/')
            .map(percent_decode)
            .collect::<Option<Vec<String>>>()
        else {
            return error(
                StatusCode::BAD_REQUEST,
                "malformed percent-encoding in the path",
            );
        };
        let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
        match (method, segments.as_slice()) {
            (Method::GET, ["instance"]) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "pid": std::process::id(),
                    "version": env!("CARGO_PKG_VERSION"),
                    "store": self.store.kind(),
                }),
            ),
            (Method::POST, ["keys"]) => self.create_key(request, caller).await,
            (Method::GET, ["keys"]) => {
                let user = query_param(request.uri().query().unwrap_or(""), "userId");
                self.list_keys(user).await
            }
            (Method::DELETE, ["keys", id]) => self.revoke_key(id, caller).await,
            (Method::GET, ["workflows"]) => match self.store.list_workflows().await {
                Ok(list) => json(
                    StatusCode::OK,
                    &list
                        .into_iter()
                        .map(|w| WorkflowView {
                            workflow_id: w.workflow_id,
                            user_id: w.owner,
                        })
                        .collect::<Vec<_>>(),
                ),
                Err(e) => store_error(e),
            },
            (Method::PUT, ["workflows", id]) => {
                let id = (*id).to_owned();
                self.set_owner(&id, request, caller).await
            }
            (Method::DELETE, ["workflows", id]) => self.remove_owner(id, caller).await,
            (_, ["keys"] | ["keys", _] | ["workflows"] | ["workflows", _]) => {
                error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed")
            }
            _ => error(StatusCode::NOT_FOUND, "Not found"),
        }
    }

    async fn ready(&self) -> AdminResponse {
        let ping = match self.store.ping().await {
            Ok(()) if !self.invalidator.ready() => Err(StoreError::Unavailable(
                "the invalidation stream is not subscribed".into(),
            )),
            other => other,
        };
        match ping {
            Ok(()) => json(
                StatusCode::OK,
                &serde_json::json!({"status": "ready", "store": self.store.kind()}),
            ),
            Err(e) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"status": "unavailable", "store": self.store.kind(), "error": e.to_string()}),
            ),
        }
    }

    async fn create_key(&self, request: Request<Incoming>, caller: SocketAddr) -> AdminResponse {
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
        let (key, id) = match (NewKey::generate(), key::random_id("key")) {
            (Ok(k), Ok(id)) => (k, id),
            _ => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the OS random source failed",
                );
            }
        };
        let record = KeyRecord {
            id,
            user_id: body.user_id,
            name,
            prefix: key.prefix(),
            hash: key.hash(),
            created_at: clock::now_ms(),
            last_used_at: None,
        };
        if let Err(e) = self.store.create_key(record.clone()).await {
            return store_error(e);
        }
        // A hash tried before it existed may sit in the negative cache.
        self.auth.invalidate_key(record.hash).await;
        tracing::info!(id = %record.id, user = %record.user_id, key = %record.prefix, %caller, "key created");
        json(
            StatusCode::CREATED,
            &CreatedKey {
                id: record.id,
                name: record.name,
                key_prefix: record.prefix,
                created_at: clock::rfc3339(record.created_at),
                key: key.secret().to_owned(),
            },
        )
    }

    async fn list_keys(&self, user: Option<String>) -> AdminResponse {
        let Some(user) = user else {
            return error(
                StatusCode::BAD_REQUEST,
                "query parameter userId is required",
            );
        };
        if let Some(refused) = refuse_user_id(&user) {
            return refused;
        }
        match self.store.list_keys(&user).await {
            Ok(keys) => json(
                StatusCode::OK,
                &keys.iter().map(KeyView::from).collect::<Vec<_>>(),
            ),
            Err(e) => store_error(e),
        }
    }

    async fn revoke_key(&self, id: &str, caller: SocketAddr) -> AdminResponse {
        if let Some(refused) = refuse_key_as_id(id) {
            return refused;
        }
        match self.store.revoke_key(id).await {
            Ok(record) => {
                self.auth.invalidate_key(record.hash).await;
                let propagated = self.invalidator.key_revoked(record.hash).await;
                tracing::info!(id = %record.id, user = %record.user_id, key = %record.prefix, propagated, %caller, "key revoked");
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

    /// A write that failed on an unavailable store may still have happened:
    /// drop what it could have changed, here and (if Redis still listens)
    /// on every instance.
    async fn after_failed_write(&self, e: &StoreError, workflow: Option<&str>) {
        if !matches!(e, StoreError::Unavailable(_)) {
            return;
        }
        match workflow {
            Some(w) => {
                self.auth.invalidate_workflow(w).await;
                self.invalidator.workflow_changed(w).await;
            }
            None => {
                self.auth.invalidate_all();
                self.invalidator.flush_all().await;
            }
        }
    }

    async fn set_owner(
        &self,
        workflow: &str,
        request: Request<Incoming>,
        caller: SocketAddr,
    ) -> AdminResponse {
        if !valid_workflow_id(workflow) {
            return error(
                StatusCode::BAD_REQUEST,
                "workflow id must be 1 to 256 of A-Z a-z 0-9 - _ . ~, and not . or ..",
            );
        }
        let body: SetOwner = match read_json(request).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        if let Some(refused) = refuse_user_id(&body.user_id) {
            return refused;
        }
        if let Err(e) = self.store.set_owner(workflow, &body.user_id).await {
            self.after_failed_write(&e, Some(workflow)).await;
            return store_error(e);
        }
        self.auth.invalidate_workflow(workflow).await;
        self.invalidator.workflow_changed(workflow).await;
        tracing::info!(workflow, user = %body.user_id, %caller, "workflow owner set");
        json(
            StatusCode::OK,
            &WorkflowView {
                workflow_id: workflow.to_owned(),
                user_id: body.user_id,
            },
        )
    }

    async fn remove_owner(&self, workflow: &str, caller: SocketAddr) -> AdminResponse {
        match self.store.remove_owner(workflow).await {
            Ok(()) => {
                self.auth.invalidate_workflow(workflow).await;
                self.invalidator.workflow_changed(workflow).await;
                tracing::info!(workflow, %caller, "workflow owner removed");
                json(
                    StatusCode::OK,
                    &serde_json::json!({"workflowId": workflow, "removed": true}),
                )
            }
            Err(e) => {
                self.after_failed_write(&e, Some(workflow)).await;
                store_error(e)
            }
        }
    }
}

async fn read_json<T: for<'de> Deserialize<'de>>(
    request: Request<Incoming>,
) -> Result<T, AdminResponse> {
    let collected = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(request.into_body(), MAX_BODY).collect(),
    )
    .await
    .map_err(|_| {
        error(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time",
        )
    })?;
    let bytes = collected
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large or unreadable",
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

/// The decoded value of `name` in a query string.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k)? == name)
            .then(|| percent_decode(v))
            .flatten()
    })
}

pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The token the server answers to: `admin.token` if set, else the token
/// file, created with mode 0600 when missing.
pub fn server_token(configured: Option<&str>, file: &Path) -> Result<String, String> {
    if let Some(token) = configured {
        return Ok(token.to_owned());
    }
    match read_token_file(file) {
        Ok(token) => {
            warn_if_shared(file);
            return Ok(token);
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!(
                "cannot read admin token file {}: {e}",
                file.display()
            ));
        }
        Err(_) => {}
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("OS random source failed: {e}"))?;
    let token = key::base64url(&bytes);
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(file) {
        Ok(mut f) => {
            f.write_all(token.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| format!("cannot write admin token file {}: {e}", file.display()))?;
            Ok(token)
        }
        // Another instance with the same config created it first.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_token_file(file)
            .map_err(|e| format!("cannot read admin token file {}: {e}", file.display())),
        Err(e) => Err(format!(
            "cannot create admin token file {}: {e}",
            file.display()
        )),
    }
}

/// The token file should be readable by its owner alone.
fn warn_if_shared(file: &Path) {
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(file) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %file.display(), "admin token file is readable by other users; chmod 600 it");
        }
    }
}

pub fn read_token_file(file: &Path) -> std::io::Result<String> {
    let token = std::fs::read_to_string(file)?.trim().to_owned();
    if token.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the file is empty",
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_param("userId=a%20b&x=1", "userId").as_deref(),
            Some("a b")
        );
        assert_eq!(query_param("x=1", "userId"), None);
        assert_eq!(query_param("userId=%zz", "userId"), None);
        let odd = "user|1@example.com";
        assert_eq!(
            query_param(&format!("userId={}", percent_encode(odd)), "userId").as_deref(),
            Some(odd)
        );
    }

    #[test]
    fn ids_are_screened() {
        assert!(valid_user_id("user_1@example.com"));
        assert!(!valid_user_id("has space"));
        assert!(!valid_user_id(""));
        assert!(valid_workflow_id("wf_AbC-1.2~"));
        assert!(valid_workflow_id("..."));
        assert!(!valid_workflow_id("a/b"));
        assert!(!valid_workflow_id("a%2Fb"));
        assert!(!valid_workflow_id("."));
        assert!(!valid_workflow_id(".."));
    }

    #[test]
    fn names_keep_printable_unicode_and_refuse_deceptive_characters() {
        for good in [
            "production",
            "Prod – EU",
            "clé de test",
            "東京",
            "🚀 deploy",
            "",
        ] {
            assert!(valid_name(good), "{good:?}");
        }
        for bad in [
            "tab\there",
            "new\nline",
            "bell\u{7}",
            "admin\u{202E}txt.exe",
            "a\u{2066}b\u{2069}",
            "zero\u{200B}width",
            "joiner\u{200D}",
            "bom\u{FEFF}",
            "line\u{2028}sep",
            "para\u{2029}sep",
            "\u{61C}mark",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(!valid_name(&"x".repeat(129)));
    }

    #[test]
    fn token_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/admin.token");
        let first = server_token(None, &file).unwrap();
        assert!(first.len() >= 40);
        assert_eq!(server_token(None, &file).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(
            server_token(Some("configured-token-123"), &file).unwrap(),
            "configured-token-123"
        );
    }
}
