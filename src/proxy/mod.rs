//! The data plane: match the route, run the checks in DESIGN.md's order,
//! forward with the trusted identity headers, and count and log the result.

pub mod answer;
pub mod body;
pub mod h1;
pub mod h2;
pub mod identity;
pub mod limiter;
pub mod reject;
pub mod route;
pub mod trace;
pub mod upstream;

use crate::auth::{Auth, AuthError, Principal};
use crate::config::{Config, HeaderNames, Limits};
use crate::http1::{self, Framing};
use crate::key::{self, KeyHash, Presented};
use crate::metrics::Metrics;
use crate::usage::Usage;
use body::ProxyBody;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use identity::Injected;
use limiter::Limiter;
use reject::Reject;
use route::{Matched, Router};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use upstream::{Answer, ForwardError, Pool, SourceError};

/// Shared by every worker: routes, checks and counters.
pub struct Gateway {
    router: Router,
    pub auth: Arc<Auth>,
    pub usage: Arc<Usage>,
    limiter: Limiter,
    key_rate: KeyRate,
    pub metrics: Arc<Metrics>,
    headers: HeaderNames,
    cors: Option<Cors>,
    pub(crate) limits: Limits,
    access_log: bool,
    /// Per route: which upstream pool, and the `Host` to send it.
    route_upstreams: Vec<(usize, HeaderValue)>,
    /// Distinct upstream authorities; each worker keeps a pool per entry.
    upstreams: Vec<String>,
    /// Per route: the slot its requests are counted in.
    route_slots: Vec<usize>,
    pub(crate) request_ids: trace::RequestIds,
}

struct Cors {
    allow_origin: HeaderValue,
    allow_methods: HeaderValue,
    allow_headers: HeaderValue,
    max_age: HeaderValue,
}

/// One worker's upstream connections.
pub struct Forwarder {
    pub(crate) pools: Vec<Pool>,
}

/// What the listener knows about a connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's address as `X-Forwarded-For` gives it.
    pub peer_ip: PeerIp,
    pub tls: bool,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> ConnInfo {
        ConnInfo {
            peer,
            peer_ip: PeerIp::new(peer.ip()),
            tls,
        }
    }
}

/// An IP address in text, rendered once per connection and kept inline:
/// no allocation per connection or per request.
#[derive(Clone, Copy)]
pub struct PeerIp {
    len: u8,
    text: [u8; 45],
}

impl PeerIp {
    pub fn new(ip: std::net::IpAddr) -> PeerIp {
        use std::io::Write;
        let mut text = [0u8; 45];
        let mut cursor = std::io::Cursor::new(&mut text[..]);
        // The longest address text (IPv4-mapped IPv6) is 45 characters.
        let _ = write!(cursor, "{ip}");
        let len = cursor.position() as u8;
        PeerIp { len, text }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.text[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for PeerIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::str::from_utf8(self.as_bytes()).unwrap_or("?"))
    }
}

/// `rate_limit.key_requests` per `key_window`, per key on this instance.
struct KeyRate {
    requests: u32,
    window_ms: u64,
}

/// What the checks decided.
pub(crate) enum Checked {
    Forward {
        route: usize,
        principal: Arc<Principal>,
    },
    Preflight,
}

/// What the checks read from a request head, whichever protocol brought it.
pub(crate) struct Facts<'a> {
    pub method: &'a Method,
    /// The path without its query.
    pub path: &'a str,
    pub authorization: Authorization<'a>,
    /// `Content-Length`, if declared.
    pub content_length: Option<u64>,
}

/// The `Authorization` fields of a request.
pub(crate) enum Authorization<'a> {
    Missing,
    One(&'a [u8]),
    /// More than one: never guessed between.
    Several,
}

impl<'a> Authorization<'a> {
    pub fn of(mut values: impl Iterator<Item = &'a [u8]>) -> Authorization<'a> {
        match (values.next(), values.next()) {
            (None, _) => Authorization::Missing,
            (Some(one), None) => Authorization::One(one),
            (Some(_), Some(_)) => Authorization::Several,
        }
    }
}

/// A permitted request as the upstream head is written for it.
pub(crate) struct Upstreamed<'a> {
    pub conn: &'a ConnInfo,
    pub method: &'a Method,
    /// Origin-form: path and query.
    pub target: &'a [u8],
    /// The client's `Host` or `:authority`.
    pub original_host: Option<&'a [u8]>,
    pub route: usize,
    pub principal: &'a Principal,
    pub framing: Framing,
}

/// `Trace::route` of a request that matched no route.
const NO_ROUTE: usize = usize::MAX;

/// Per-request facts for the metrics and the access log.
pub(crate) struct Trace {
    route: usize,
    workflow: Option<String>,
    principal: Option<Arc<Principal>>,
    method: Method,
    started: Instant,
    /// Client headers left out of the forwarded request (`_` in the name,
    /// or on `headers.strip`).
    dropped: usize,
    pub(crate) request_id: trace::RequestId,
}

/// The gateway in force: replaced whole when the config is reloaded, and
/// picked up by each worker at its next request.
pub struct Live {
    generation: AtomicU64,
    current: RwLock<Arc<Gateway>>,
}

impl Live {
    pub fn new(gateway: Arc<Gateway>) -> Live {
        Live {
            generation: AtomicU64::new(1),
            current: RwLock::new(gateway),
        }
    }

    pub fn gateway(&self) -> Arc<Gateway> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts `gateway` in force for every request that starts from now on.
    pub fn replace(&self, gateway: Arc<Gateway>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = gateway;
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// One worker's view of the live gateway, with the worker's own upstream
/// pools for it.
pub struct WorkerGateway {
    live: Arc<Live>,
    current: Mutex<Snapshot>,
}

/// The gateway a request is served by, and the pools it forwards over.
#[derive(Clone)]
pub struct Snapshot {
    pub generation: u64,
    pub gateway: Arc<Gateway>,
    pub forwarder: Arc<Forwarder>,
}

impl WorkerGateway {
    pub fn new(live: Arc<Live>) -> WorkerGateway {
        let generation = live.generation.load(Ordering::Acquire);
        let gateway = live.gateway();
        let forwarder = Arc::new(gateway.forwarder(None));
        WorkerGateway {
            live,
            current: Mutex::new(Snapshot {
                generation,
                gateway,
                forwarder,
            }),
        }
    }

    /// Whether a snapshot taken at `generation` is still the one in force:
    /// one atomic read, so each request can ask.
    pub fn is_current(&self, generation: u64) -> bool {
        self.live.generation.load(Ordering::Acquire) == generation
    }

    /// The gateway in force and this worker's pools for it (pools whose
    /// upstream and bounds did not change are kept across a reload).
    pub fn snapshot(&self) -> Snapshot {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.live.generation.load(Ordering::Acquire);
        if current.generation != generation {
            let gateway = self.live.gateway();
            let forwarder = Arc::new(gateway.forwarder(Some(&current.forwarder)));
            *current = Snapshot {
                generation,
                gateway,
                forwarder,
            };
        }
        current.clone()
    }
}

impl Gateway {
    pub fn new(
        config: &Config,
        auth: Arc<Auth>,
        usage: Arc<Usage>,
        metrics: Arc<Metrics>,
    ) -> Result<Gateway, String> {
        let router = Router::new(&config.routes, config.cors.is_some());
        let route_slots = config
            .routes
            .iter()
            .map(|r| metrics.register(&r.path))
            .collect::<Result<_, _>>()?;
        let mut upstreams: Vec<String> = Vec::new();
        let mut route_upstreams = Vec::new();
        for route in &config.routes {
            let authority = &route.upstream.authority;
            let index = match upstreams.iter().position(|a| a == authority) {
                Some(i) => i,
                None => {
                    upstreams.push(authority.clone());
                    upstreams.len() - 1
                }
            };
            let host = HeaderValue::from_str(authority).map_err(|e| e.to_string())?;
            route_upstreams.push((index, host));
        }
        let cors = match &config.cors {
            None => None,
            Some(c) => Some(Cors {
                allow_origin: HeaderValue::from_str(&c.allow_origin).map_err(|e| e.to_string())?,
                allow_methods: HeaderValue::from_str(&c.allow_methods)
                    .map_err(|e| e.to_string())?,
                allow_headers: HeaderValue::from_str(&c.allow_headers)
                    .map_err(|e| e.to_string())?,
                max_age: HeaderValue::from(c.max_age.as_secs()),
            }),
        };
        Ok(Gateway {
            router,
            auth,
            usage,
            limiter: Limiter::new(&config.rate_limit),
            key_rate: KeyRate {
                requests: config.rate_limit.key_requests,
                window_ms: config.rate_limit.key_window.as_millis().max(1) as u64,
            },
            metrics,
            headers: config.headers.clone(),
            cors,
            limits: config.limits,
            access_log: config.log.access,
            route_upstreams,
            upstreams,
            route_slots,
            request_ids: trace::RequestIds::default(),
        })
    }

    /// A set of upstream pools for one worker runtime, keeping the pools
    /// of `previous` that fit (same upstream, same bounds).
    pub fn forwarder(&self, previous: Option<&Forwarder>) -> Forwarder {
        let limits = &self.limits;
        Forwarder {
            pools: self
                .upstreams
                .iter()
                .map(|authority| {
                    let fresh = Pool::new(
                        authority.clone(),
                        limits.upstream_idle_per_worker,
                        limits.upstream_max_per_worker,
                        limits.upstream_connect_timeout,
                    );
                    previous
                        .and_then(|f| f.pools.iter().find(|p| p.same_as(&fresh)))
                        .cloned()
                        .unwrap_or(fresh)
                })
                .collect(),
        }
    }

    /// A route's label for logs and metrics.
    pub(crate) fn route_label(&self, route: usize) -> &str {
        self.router
            .routes()
            .get(route)
            .map_or("-", |r| r.label.as_str())
    }

    /// Starts a request's trace: its clock, and its request id (the
    /// client's `X-Request-Id` if it is plain, else a new one).
    pub(crate) fn begin(&self, method: &Method, client_id: Option<&[u8]>) -> Trace {
        let request_id = client_id
            .and_then(trace::RequestId::from_client)
            .unwrap_or_else(|| self.request_ids.next());
        Trace {
            route: NO_ROUTE,
            workflow: None,
            principal: None,
            method: method.clone(),
            started: Instant::now(),
            dropped: 0,
            request_id,
        }
    }

    /// Counts a refusal that the failed-auth limiter should know of.
    pub(crate) fn refused(&self, reject: &Reject, conn: &ConnInfo, trace: &Trace) {
        if matches!(
            reject,
            Reject::MissingAuthorization
                | Reject::InvalidFormat
                | Reject::IntegrationKey
                | Reject::InvalidKey
        ) {
            self.limiter.failed(conn.peer.ip(), trace.started);
        }
    }

    /// Counts the request and writes its access log line.
    pub(crate) fn finish(&self, trace: &Trace, status: u16) {
        let elapsed = trace.started.elapsed();
        let slot = self
            .route_slots
            .get(trace.route)
            .copied()
            .unwrap_or(self.metrics.unmatched());
        self.metrics.observe(slot, status, elapsed);
        if self.access_log {
            let route = self.route_label(trace.route);
            // Microsecond resolution is all a latency needs.
            let latency_ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3;
            tracing::info!(
                target: "keygate::access",
                method = %trace.method,
                route,
                workflow = trace.workflow.as_deref().unwrap_or("-"),
                outcome = crate::metrics::OUTCOMES[crate::metrics::outcome_index(status)],
                status,
                latency_ms,
                request_id = trace.request_id.as_str(),
                key = trace.principal.as_ref().map_or("-", |p| p.prefix()),
                dropped_headers = trace.dropped,
            );
        }
    }

    /// Everything decided from the request head, in DESIGN.md's order.
    pub(crate) async fn check(
        &self,
        facts: &Facts<'_>,
        conn: &ConnInfo,
        trace: &mut Trace,
    ) -> Result<Checked, Reject> {
        let (index, workflow) = match self.router.find(facts.method, facts.path) {
            Matched::Route {
                index, workflow, ..
            } => (index, workflow),
            Matched::Preflight { index } => {
                trace.route = index;
                return Ok(Checked::Preflight);
            }
            Matched::MethodNotAllowed { index, route } => {
                trace.route = index;
                let mut allow: Vec<&str> =
                    route.config.methods.iter().map(Method::as_str).collect();
                if self.cors.is_some() {
                    allow.push("OPTIONS");
                }
                return Err(Reject::MethodNotAllowed {
                    allow: allow.join(", "),
                });
            }
            Matched::NotFound => return Err(Reject::NoRoute),
        };
        trace.route = index;
        if self.access_log {
            trace.workflow = Some(workflow.to_owned());
        }

        if let Some(retry_after) = self.limiter.blocked(conn.peer.ip(), trace.started) {
            return Err(Reject::TooManyFailures { retry_after });
        }
        // One deadline for every store read this request makes.
        let mut budget = crate::auth::Budget::default();
        let (principal, hash) = self.authenticate(&facts.authorization, &mut budget).await?;
        if self.access_log {
            trace.principal = Some(principal.clone());
        }
        match self.auth.owner_within(workflow, &mut budget).await {
            Ok(Some(owner)) if *owner == *principal.user_id() => {}
            Ok(Some(_)) => return Err(Reject::Forbidden),
            Ok(None) => return Err(Reject::WorkflowNotFound),
            Err(AuthError::Unavailable) => return Err(Reject::StoreUnavailable),
            Err(AuthError::InvalidKey) => return Err(Reject::InvalidKey),
        }
        if facts
            .content_length
            .is_some_and(|n| n > self.limits.max_body_bytes)
        {
            return Err(Reject::PayloadTooLarge);
        }
        let now = crate::clock::now_ms();
        if self.key_rate.requests > 0 {
            principal
                .admit(now, self.key_rate.window_ms, self.key_rate.requests)
                .map_err(|ms| Reject::KeyRateExceeded {
                    retry_after: std::time::Duration::from_millis(ms),
                })?;
        }
        self.usage.note(&principal, hash, now);
        Ok(Checked::Forward {
            route: index,
            principal,
        })
    }

    /// Writes the head a permitted request goes upstream with (see
    /// [`identity::write_upstream_request`]). Returns the pool to send it on.
    pub(crate) fn upstream_head<'a>(
        &self,
        out: &mut Vec<u8>,
        up: Upstreamed<'_>,
        fields: impl Iterator<Item = http1::Field<'a>> + Clone,
        trace: &mut Trace,
    ) -> Result<usize, Reject> {
        let route = &self.router.routes()[up.route];
        let (pool_index, upstream_host) = &self.route_upstreams[up.route];
        let host = match (up.original_host, route.config.preserve_host) {
            (Some(h), true) => h,
            _ => upstream_host.as_bytes(),
        };
        // Ids are checked when set through the admin API; a record that
        // reached the store some other way and cannot be sent fails closed.
        let sendable = |id: &str| id.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
        let (user_id, key_id) = (up.principal.user_id(), up.principal.key_id());
        if !sendable(user_id) || !sendable(key_id) {
            tracing::error!(
                key = up.principal.prefix(),
                "stored key has an id that cannot be sent in a header"
            );
            return Err(Reject::Internal);
        }
        let removed = identity::write_upstream_request(
            out,
            up.method,
            up.target,
            fields,
            &Injected {
                user_header: &self.headers.user_id,
                user_id,
                key_header: &self.headers.key_id,
                key_id,
                forward_authorization: route.config.forward_authorization,
                client_ip: up.conn.peer_ip.as_bytes(),
                tls: up.conn.tls,
                original_host: up.original_host,
                upstream_host: host,
                request_id: trace.request_id.as_bytes(),
                strip: &self.headers.strip,
            },
            up.framing,
        );
        let counters = self.metrics.local();
        if removed.spoofed > 0 {
            counters
                .spoofed_headers
                .fetch_add(removed.spoofed as u64, Ordering::Relaxed);
            tracing::warn!(
                peer = %up.conn.peer.ip(),
                key = up.principal.prefix(),
                removed = removed.spoofed,
                "removed client-sent identity headers"
            );
        }
        if removed.dropped > 0 {
            counters
                .dropped_headers
                .fetch_add(removed.dropped as u64, Ordering::Relaxed);
            trace.dropped = removed.dropped;
        }
        Ok(*pool_index)
    }

    /// What an upstream exchange comes to (`None`: it timed out): its
    /// answer, or the refusal that stands for its failure.
    pub(crate) fn forward_outcome(
        &self,
        route: usize,
        sent: Option<Result<Answer, ForwardError>>,
    ) -> Result<Answer, Reject> {
        let label = self.route_label(route);
        match sent {
            Some(Ok(answer)) => Ok(answer),
            None => Err(Reject::GatewayTimeout),
            Some(Err(ForwardError::Body(SourceError::TooLarge))) => Err(Reject::PayloadTooLarge),
            Some(Err(ForwardError::Body(SourceError::Aborted(e)))) => {
                tracing::debug!(route = %label, error = %e, "client body ended early");
                Err(Reject::Malformed(e))
            }
            Some(Err(ForwardError::ConnectTimeout)) => {
                tracing::warn!(route = %label, "upstream connect timed out");
                Err(Reject::GatewayTimeout)
            }
            Some(Err(e)) => {
                tracing::warn!(route = %label, error = %e, "upstream failed");
                Err(Reject::BadGateway)
            }
        }
    }

    /// Checks 1 to 3 of the table: header present, right shape, known key.
    async fn authenticate(
        &self,
        authorization: &Authorization<'_>,
        budget: &mut crate::auth::Budget,
    ) -> Result<(Arc<Principal>, KeyHash), Reject> {
        let value = match authorization {
            Authorization::Missing => return Err(Reject::MissingAuthorization),
            Authorization::Several => return Err(Reject::InvalidFormat),
            Authorization::One(value) => value,
        };
        let token = bearer_token(value)?;
        let key = match key::classify(token) {
            Presented::Key(key) => key,
            Presented::IntegrationKey => return Err(Reject::IntegrationKey),
            Presented::Malformed => return Err(Reject::InvalidFormat),
        };
        let hash = KeyHash::of(key);
        match self.auth.authenticate_within(hash, budget).await {
            Ok(principal) => Ok((principal, hash)),
            Err(AuthError::InvalidKey) => Err(Reject::InvalidKey),
            Err(AuthError::Unavailable) => Err(Reject::StoreUnavailable),
        }
    }

    pub(crate) fn preflight(&self) -> Response<ProxyBody> {
        let mut response = Response::new(ProxyBody::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        if let Some(cors) = &self.cors {
            let h = response.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                cors.allow_origin.clone(),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                cors.allow_methods.clone(),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                cors.allow_headers.clone(),
            );
            h.insert(header::ACCESS_CONTROL_MAX_AGE, cors.max_age.clone());
        }
        response
    }
}

/// `Bearer <token>`, scheme case-insensitive (RFC 9110 §11.1).
fn bearer_token(value: &[u8]) -> Result<&str, Reject> {
    let value = std::str::from_utf8(value).map_err(|_| Reject::InvalidFormat)?;
    let (scheme, token) = value.split_once(' ').ok_or(Reject::InvalidFormat)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Reject::InvalidFormat);
    }
    let token = token.trim_matches(' ');
    if token.is_empty() {
        return Err(Reject::InvalidFormat);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in ["Bearer wfb_x", "bearer wfb_x", "BEARER  wfb_x"] {
            assert_eq!(bearer_token(v.as_bytes()), Ok("wfb_x"), "{v}");
        }
    }

    #[test]
    fn other_schemes_and_empty_tokens_are_bad_format() {
        for v in ["Basic abc", "Bearer", "Bearer ", "wfb_x", "Token wfb_x"] {
            assert_eq!(
                bearer_token(v.as_bytes()),
                Err(Reject::InvalidFormat),
                "{v}"
            );
        }
        assert_eq!(bearer_token(b"Bearer \xff"), Err(Reject::InvalidFormat));
    }
}
