//! The admin API on its own listener: key lifecycle and workflow owners
//! under `/admin/v1/...` (bearer admin token, see [`token`]), integration
//! credentials and run tokens ([`integrations`]), plus `/healthz`,
//! `/readyz` and `/metrics`. [`views`] shapes the answers, [`rules`] the ids
//! and names it accepts, and [`client`] is how the CLI (and a takeover)
//! call it.

mod audit;
pub mod client;
mod integrations;
mod keys;
mod rules;
mod token;
mod ui;
mod views;

pub use rules::{NAME_RULE, valid_name, valid_user_id, valid_workflow_id};
pub use token::{AdminToken, read_token_file, server_token};
pub use views::percent_encode;

use crate::auth::Auth;
use crate::config::{AuditConfig, KeysConfig, UiConfig};
use crate::invalidate::Invalidator;
use crate::metrics::Metrics;
use crate::store::{AuditEntry, Store, StoreError};
use crate::vault::Credentials;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use rules::refuse_user_id;
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use views::{
    AdminResponse, SetOwner, WorkflowView, error, json, percent_decode, query_param, store_error,
};

pub struct Admin {
    store: Arc<dyn Store>,
    auth: Arc<Auth>,
    metrics: Arc<Metrics>,
    invalidator: Arc<Invalidator>,
    token: AdminToken,
    /// With a vault: integration credentials and run tokens.
    credentials: Option<Arc<Credentials>>,
    /// `egress.mint_token`: admits `POST /admin/v1/run-tokens` and nothing else.
    mint: Option<AdminToken>,
    keys: KeysConfig,
    audit: AuditConfig,
    /// The panel's sessions and settings.
    panel: ui::Panel,
}

/// What the admin API takes from the config besides its token.
#[derive(Clone, Copy, Debug)]
pub struct AdminSettings {
    pub keys: KeysConfig,
    pub audit: AuditConfig,
    pub ui: UiConfig,
    pub ui_session_ttl: std::time::Duration,
}

impl AdminSettings {
    pub fn of(config: &crate::config::Config) -> AdminSettings {
        AdminSettings {
            keys: config.keys,
            audit: config.audit,
            ui: config.ui,
            ui_session_ttl: config.admin.ui_session_ttl,
        }
    }
}

/// Admin bodies carry a name or a user id; this bounds what one request
/// can make the admin API hold.
const MAX_BODY: usize = 64 * 1024;
/// A client sending its body slower than this loses the connection, so a
/// slow sender cannot hold one open.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Admin {
    pub fn new(
        store: Arc<dyn Store>,
        auth: Arc<Auth>,
        metrics: Arc<Metrics>,
        invalidator: Arc<Invalidator>,
        token: &str,
        credentials: Option<Arc<Credentials>>,
        settings: AdminSettings,
    ) -> Admin {
        let mint = credentials
            .as_ref()
            .and_then(|c| c.mint_token.as_ref())
            .map(|t| AdminToken::new(&t.0));
        Admin {
            store,
            auth,
            metrics,
            invalidator,
            token: AdminToken::new(token),
            credentials,
            mint,
            keys: settings.keys,
            audit: settings.audit,
            panel: ui::Panel::new(settings.ui, settings.ui_session_ttl),
        }
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
                let mut text = self.metrics.render();
                text.push_str(&self.invalidator.render_metrics());
                let mut r = Response::new(Full::new(Bytes::from(text)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                return r;
            }
            _ => {}
        }
        if path == "/ui" || path.starts_with("/ui/") {
            return self.ui(request, caller).await;
        }
        let Some(rest) = path.strip_prefix("/admin/v1/") else {
            return error(StatusCode::NOT_FOUND, "Not found");
        };
        if method == Method::POST
            && rest == "run-tokens"
            && self.mint.as_ref().is_some_and(|m| m.admits(&request))
        {
            return self.mint_run_token(request, caller, "mint_token").await;
        }
        if !self.token.admits(&request) {
            let mut r = error(StatusCode::UNAUTHORIZED, "Invalid admin token");
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
        self.route(method, rest, request, caller).await
    }

    /// An admin call past its authentication (the bearer token, or a
    /// panel session with its CSRF token): `rest` is the path after
    /// `/admin/v1/`.
    async fn route(
        &self,
        method: Method,
        rest: &str,
        request: Request<Incoming>,
        caller: SocketAddr,
    ) -> AdminResponse {
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
            (Method::GET, ["keys"]) => self.list_keys(request.uri().query().unwrap_or("")).await,
            (Method::DELETE, ["keys", id]) => self.revoke_key(id, caller).await,
            (Method::POST, ["keys", id, "roll"]) => {
                let id = (*id).to_owned();
                self.roll_key(&id, request, caller).await
            }
            (Method::GET, ["audit"]) => self.list_audit(request.uri().query().unwrap_or("")).await,
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
            (Method::POST, ["integrations"]) => self.add_integration(request, caller).await,
            (Method::GET, ["integrations"]) => {
                let user = query_param(request.uri().query().unwrap_or(""), "userId");
                self.list_integrations(user).await
            }
            (Method::POST, ["integrations", "rekey"]) => self.rekey_integrations(caller).await,
            (Method::DELETE, ["integrations", id]) => self.remove_integration(id, caller).await,
            (Method::POST, ["run-tokens"]) => self.mint_run_token(request, caller, "admin").await,
            (
                _,
                ["keys" | "workflows" | "integrations" | "run-tokens" | "audit"]
                | ["keys" | "workflows" | "integrations", _]
                | ["keys", _, "roll"],
            ) => error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"),
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

    /// A write that failed on an unavailable store may still have happened:
    /// drop what it could have changed, here and (if Redis still listens)
    /// on every instance.
    async fn after_failed_write(&self, e: &StoreError, workflow: Option<&str>) {
        if !matches!(e, StoreError::Unavailable(_)) {
            return;
        }
        match workflow {
            Some(w) => {
                self.auth.invalidate_workflow(w);
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
        self.auth.invalidate_workflow(workflow);
        self.invalidator.workflow_changed(workflow).await;
        let in_engine = self.store.owners_in_engine();
        tracing::info!(workflow, user = %body.user_id, in_engine, %caller, "workflow owner set");
        self.record(
            audit::Action::OwnerSet,
            caller,
            AuditEntry {
                workflow_id: Some(workflow.to_owned()),
                user_id: Some(body.user_id.clone()),
                ..AuditEntry::default()
            },
        )
        .await;
        let mut answer = serde_json::json!(WorkflowView {
            workflow_id: workflow.to_owned(),
            user_id: body.user_id,
        });
        if in_engine {
            answer["note"] = "set in the engine's workflows table".into();
        }
        json(StatusCode::OK, &answer)
    }

    async fn remove_owner(&self, workflow: &str, caller: SocketAddr) -> AdminResponse {
        match self.store.remove_owner(workflow).await {
            Ok(()) => {
                self.auth.invalidate_workflow(workflow);
                self.invalidator.workflow_changed(workflow).await;
                tracing::info!(workflow, %caller, "workflow owner removed");
                self.record(
                    audit::Action::OwnerRemoved,
                    caller,
                    AuditEntry {
                        workflow_id: Some(workflow.to_owned()),
                        ..AuditEntry::default()
                    },
                )
                .await;
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

/// [`read_json`], with an empty body taken for `T::default()`.
async fn read_json_or_default<T: for<'de> Deserialize<'de> + Default>(
    request: Request<Incoming>,
) -> Result<T, AdminResponse> {
    let bytes = read_body(request, MAX_BODY).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

async fn read_json<T: for<'de> Deserialize<'de>>(
    request: Request<Incoming>,
) -> Result<T, AdminResponse> {
    let bytes = read_body(request, MAX_BODY).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

/// A whole request body, within `limit` and [`BODY_TIMEOUT`], in a buffer
/// zeroed when dropped (a body may hold a credential).
async fn read_body(
    request: Request<Incoming>,
    limit: usize,
) -> Result<zeroize::Zeroizing<Vec<u8>>, AdminResponse> {
    let mut body = Limited::new(request.into_body(), limit);
    let mut out = zeroize::Zeroizing::new(Vec::new());
    let read = tokio::time::timeout(BODY_TIMEOUT, async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| ())?;
            if let Some(data) = frame.data_ref() {
                // Grown by hand, so no unzeroed copy is left behind.
                if out.capacity() < out.len() + data.len() {
                    let mut bigger = zeroize::Zeroizing::new(Vec::with_capacity(
                        (out.len() + data.len()).max(out.capacity() * 2),
                    ));
                    bigger.extend_from_slice(&out);
                    out = bigger;
                }
                out.extend_from_slice(data);
            }
        }
        Ok::<(), ()>(())
    })
    .await;
    match read {
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time",
        )),
        Ok(Err(())) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large or unreadable",
        )),
        Ok(Ok(())) => Ok(out),
    }
}
