//! The egress listener: where a run's steps call a provider through
//! keygate, which swaps the run token they present for the run owner's
//! credential on the way out. `ANY /integrations/{id}/{rest}` with a run
//! token (in the run-token header, `Authorization: Bearer kgr_…` or
//! `x-api-key: kgr_…`, so a provider SDK works unchanged with the token as
//! its API key) goes to the provider's fixed `base_url` + `rest` over
//! HTTPS, bodies streaming both ways; the plaintext credential exists only
//! while one request is built.
//!
//! Served by hyper (HTTP/1.1 and h2c) on the control-plane runtime with the
//! data plane's header limits: egress callers are the engine's own steps,
//! and its other half is an HTTPS client, which keygate's HTTP/1.1 engine
//! is not. [`providers`] holds the clients, [`outbound`] the request that
//! goes to the provider.

mod outbound;
pub(crate) mod providers;

use crate::config::{HeaderNames, Limits};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use crate::vault::Credentials;
use crate::vault::run_token::{RunClaims, SCHEME, TokenError};
use bytes::Bytes;
use dashmap::DashMap;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use providers::Providers;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) type EgressBody = Either<Full<Bytes>, Incoming>;
pub(crate) type EgressResponse = Response<EgressBody>;

/// How often an integration's `lastUsedAt` is written at the most.
const USED_EVERY_MS: i64 = 1000;

pub struct Egress {
    store: Arc<dyn Store>,
    credentials: Arc<Credentials>,
    providers: Providers,
    run_header: HeaderName,
    response_timeout: Duration,
    metrics: Arc<Metrics>,
    /// When each integration's last use was last written.
    used: DashMap<String, i64>,
    /// Those writes under way, waited for when egress stops.
    writes: std::sync::Mutex<tokio::task::JoinSet<()>>,
}

/// Why a call went no further, as the caller is told.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    NotFound,
    NoToken,
    KeygateKey,
    BadToken,
    Integration,
    StoreDown(String),
    NoProvider(String),
    Sealed(String),
    ProviderDown,
    ProviderSlow,
    BadPath,
}

impl Refusal {
    fn answer(&self) -> EgressResponse {
        let (status, message) = match self {
            Refusal::NotFound => (StatusCode::NOT_FOUND, "Not found".to_owned()),
            Refusal::NoToken | Refusal::BadToken => {
                (StatusCode::UNAUTHORIZED, "Invalid run token".to_owned())
            }
            Refusal::KeygateKey => (
                StatusCode::UNAUTHORIZED,
                "keygate API keys (wfb_…) cannot call provider APIs; present the run token"
                    .to_owned(),
            ),
            Refusal::Integration => (StatusCode::NOT_FOUND, "Integration not found".to_owned()),
            Refusal::StoreDown(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("store unavailable: {why}"),
            ),
            Refusal::NoProvider(kind) => (
                StatusCode::BAD_GATEWAY,
                format!(
                    "no provider is configured for integration type {kind:?} (egress.providers)"
                ),
            ),
            Refusal::Sealed(why) => (StatusCode::INTERNAL_SERVER_ERROR, why.clone()),
            Refusal::ProviderDown => (StatusCode::BAD_GATEWAY, "Provider unavailable".to_owned()),
            Refusal::ProviderSlow => (StatusCode::GATEWAY_TIMEOUT, "Provider timed out".to_owned()),
            Refusal::BadPath => (
                StatusCode::BAD_REQUEST,
                "the path after the integration id has a dot segment".to_owned(),
            ),
        };
        let body = serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default();
        let mut response = Response::new(Either::Left(Full::new(Bytes::from(body))));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }

    /// The outcome label in metrics and the access log.
    fn outcome(&self) -> &'static str {
        match self {
            Refusal::NotFound | Refusal::BadPath => "bad_request",
            Refusal::NoToken | Refusal::BadToken | Refusal::KeygateKey => "unauthorized",
            Refusal::Integration => "not_found",
            Refusal::StoreDown(_) => "store_unavailable",
            Refusal::NoProvider(_) | Refusal::Sealed(_) => "error",
            Refusal::ProviderDown => "provider_unavailable",
            Refusal::ProviderSlow => "provider_timeout",
        }
    }
}

/// The run token a request presents, or why there is none to use.
fn presented_token<B>(request: &Request<B>, run_header: &HeaderName) -> Result<String, Refusal> {
    let headers = request.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| crate::proxy::credentials::bearer(v.as_bytes()));
    let api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    // A keygate key here is a mistake worth naming, whatever else is sent.
    if [bearer, api_key]
        .iter()
        .flatten()
        .any(|v| v.starts_with(crate::key::KEY_SCHEME))
    {
        return Err(Refusal::KeygateKey);
    }
    let from_header = headers
        .get(run_header)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    [from_header, bearer, api_key]
        .into_iter()
        .flatten()
        .find(|v| v.starts_with(SCHEME))
        .map(str::to_owned)
        .ok_or(Refusal::NoToken)
}

/// `/integrations/{id}/{rest}`: the id, and the rest with its leading `/`.
fn split_path(path: &str) -> Option<(&str, &str)> {
    let after = path.strip_prefix("/integrations/")?;
    let (id, rest) = match after.find('/') {
        Some(slash) => (&after[..slash], &after[slash..]),
        None => (after, ""),
    };
    let valid = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    valid.then_some((id, rest))
}

impl Egress {
    pub fn new(
        store: Arc<dyn Store>,
        credentials: Arc<Credentials>,
        connect_timeout: Duration,
        response_timeout: Duration,
        headers: &HeaderNames,
        metrics: Arc<Metrics>,
    ) -> Result<Egress, String> {
        Ok(Egress {
            providers: Providers::new(&credentials.providers, connect_timeout)?,
            store,
            credentials,
            run_header: headers.run_token.clone(),
            response_timeout,
            metrics,
            used: DashMap::new(),
            writes: std::sync::Mutex::default(),
        })
    }

    pub async fn handle(&self, request: Request<Incoming>, peer: SocketAddr) -> EgressResponse {
        let started = Instant::now();
        let method = request.method().clone();
        let mut seen: Option<(String, String, String)> = None;
        let result = self.forward(request, &mut seen).await;
        let (status, outcome, response) = match result {
            Ok(response) => {
                let status = response.status();
                (status, status_class(status), response)
            }
            Err(refusal) => {
                let response = refusal.answer();
                (response.status(), refusal.outcome(), response)
            }
        };
        let (integration, kind, user) = seen.unwrap_or_default();
        self.metrics
            .egress(if kind.is_empty() { "-" } else { &kind }, outcome);
        tracing::info!(
            target: "keygate::egress",
            %peer,
            %method,
            integration = %integration,
            kind = %kind,
            user = %user,
            status = status.as_u16(),
            outcome,
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            "egress"
        );
        response
    }

    /// Verifies, opens and forwards; `seen` gets (integration, type, user)
    /// once known, for the log.
    async fn forward(
        &self,
        request: Request<Incoming>,
        seen: &mut Option<(String, String, String)>,
    ) -> Result<EgressResponse, Refusal> {
        let path = request.uri().path().to_owned();
        let Some((id, rest)) = split_path(&path) else {
            return Err(Refusal::NotFound);
        };
        let token = presented_token(&request, &self.run_header)?;
        let now = crate::clock::now_ms().div_euclid(1000);
        let claims: RunClaims =
            self.credentials
                .run_tokens
                .verify(&token, now)
                .map_err(|e| match e {
                    TokenError::Invalid | TokenError::Expired => Refusal::BadToken,
                })?;
        drop(token);
        let record = match self.store.get_integration(id).await {
            Ok(Some(record)) => record,
            Ok(None) => return Err(Refusal::Integration),
            Err(StoreError::Unavailable(why)) => return Err(Refusal::StoreDown(why)),
            Err(e) => return Err(Refusal::StoreDown(e.to_string())),
        };
        // Another user's integration answers as an unknown one.
        if record.user_id != claims.user_id {
            return Err(Refusal::Integration);
        }
        *seen = Some((
            record.id.clone(),
            record.kind.clone(),
            record.user_id.clone(),
        ));
        let Some(provider) = self.credentials.providers.get(&record.kind) else {
            return Err(Refusal::NoProvider(record.kind));
        };
        let Some(client) = self.providers.client(&record.kind) else {
            return Err(Refusal::NoProvider(record.kind));
        };
        if rest
            .split('/')
            .any(|s| s == "." || s == ".." || s.eq_ignore_ascii_case("%2e%2e"))
        {
            return Err(Refusal::BadPath);
        }
        let sealed = record.sealed().ok_or_else(|| {
            Refusal::Sealed(format!("integration {} has a malformed nonce", record.id))
        })?;
        let secret = self
            .credentials
            .vault
            .open(record.binding(), &sealed)
            .map_err(|e| {
                tracing::error!(integration = %record.id, error = %e, "cannot open an integration credential");
                Refusal::Sealed(e.to_string())
            })?;
        let outbound = outbound::build(request, provider, rest, &secret, &self.run_header)
            .map_err(|e| Refusal::Sealed(format!("integration {}: {e}", record.id)))?;
        drop(secret);
        let sent = tokio::time::timeout(self.response_timeout, client.request(outbound)).await;
        let response = match sent {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                let mut error = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    error = format!("{error}: {cause}");
                    source = cause.source();
                }
                tracing::warn!(integration = %record.id, kind = %record.kind, %error, "provider call failed");
                return Err(Refusal::ProviderDown);
            }
            Err(_) => return Err(Refusal::ProviderSlow),
        };
        self.note_use(&record.id);
        Ok(outbound::answer(response))
    }

    /// Writes the integration's `lastUsedAt`, at most once a second each.
    fn note_use(&self, id: &str) {
        let now = crate::clock::now_ms();
        let due = self
            .used
            .get(id)
            .is_none_or(|last| now - *last >= USED_EVERY_MS);
        if !due {
            return;
        }
        if self.used.len() > 100_000 {
            self.used.clear();
        }
        self.used.insert(id.to_owned(), now);
        let (store, id) = (self.store.clone(), id.to_owned());
        let mut writes = self
            .writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while writes.try_join_next().is_some() {}
        writes.spawn(async move {
            if let Err(e) = store.integration_used(&id, now).await {
                tracing::debug!(integration = %id, error = %e, "could not record an integration's last use");
            }
        });
    }

    /// Waits (within `deadline`) for the last-use writes under way.
    async fn finish_writes(&self, deadline: Duration) {
        let mut writes = std::mem::take(
            &mut *self
                .writes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let _ = tokio::time::timeout(deadline, async {
            while writes.join_next().await.is_some() {}
        })
        .await;
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Serves the egress listener until `stopped`; HTTP/1.1 and h2c.
pub async fn serve(
    listener: tokio::net::TcpListener,
    egress: Arc<Egress>,
    limits: Limits,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "egress accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let egress = egress.clone();
        let service = hyper::service::service_fn(move |request| {
            let egress = egress.clone();
            async move { Ok::<_, std::convert::Infallible>(egress.handle(request, peer).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = watched.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    egress.finish_writes(Duration::from_secs(5)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().uri("/integrations/int_1/predict");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn the_run_token_is_taken_from_any_of_its_three_places() {
        let run = HeaderName::from_static("x-keygate-run");
        for headers in [
            [("x-keygate-run", "kgr_abc")],
            [("authorization", "Bearer kgr_abc")],
            [("x-api-key", "kgr_abc")],
        ] {
            assert_eq!(
                presented_token(&request(&headers), &run).unwrap(),
                "kgr_abc"
            );
        }
        assert_eq!(presented_token(&request(&[]), &run), Err(Refusal::NoToken));
        assert_eq!(
            presented_token(&request(&[("authorization", "Bearer sk-live")]), &run),
            Err(Refusal::NoToken)
        );
        for headers in [
            [
                ("authorization", "Bearer wfb_abc"),
                ("x-keygate-run", "kgr_abc"),
            ],
            [("x-api-key", "wfb_abc"), ("x-keygate-run", "kgr_abc")],
        ] {
            assert_eq!(
                presented_token(&request(&headers), &run),
                Err(Refusal::KeygateKey)
            );
        }
    }

    #[test]
    fn paths_name_an_integration_and_what_follows() {
        assert_eq!(
            split_path("/integrations/int_1/v1/x"),
            Some(("int_1", "/v1/x"))
        );
        assert_eq!(split_path("/integrations/int_1"), Some(("int_1", "")));
        assert_eq!(split_path("/integrations/"), None);
        assert_eq!(split_path("/integrations/a.b/x"), None);
        assert_eq!(split_path("/other/int_1"), None);
    }

    #[test]
    fn every_refusal_is_json_and_names_no_secret() {
        for refusal in [
            Refusal::NotFound,
            Refusal::NoToken,
            Refusal::KeygateKey,
            Refusal::BadToken,
            Refusal::Integration,
            Refusal::StoreDown("down".into()),
            Refusal::NoProvider("x".into()),
            Refusal::Sealed("integration int_1 does not decrypt".into()),
            Refusal::ProviderDown,
            Refusal::ProviderSlow,
            Refusal::BadPath,
        ] {
            let answer = refusal.answer();
            assert_eq!(answer.headers()[header::CONTENT_TYPE], "application/json");
            assert!(answer.status().is_client_error() || answer.status().is_server_error());
        }
        assert_eq!(
            Refusal::BadToken.answer().status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            Refusal::Integration.answer().status(),
            StatusCode::NOT_FOUND
        );
    }
}
