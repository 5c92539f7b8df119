//! The gateway's decision on a request, in DESIGN.md's order: route,
//! failed-auth limit, key, owner, body size, key rate; then the head it
//! goes upstream with. The same for HTTP/1.1 and HTTP/2.

use super::cors::{self, Cors};
use super::credentials::Authorization;
use super::h2::body::ProxyBody;
use super::identity::{self, Injected};
use super::key_rate::KeyRate;
use super::limiter::Limiter;
use super::reject::Reject;
use super::route::{Matched, Router};
use super::trace::{Trace, Tracer};
use super::upstream::{ForwardError, Pool, UpstreamResponse};
use crate::auth::{Auth, Budget, Principal};
use crate::config::{Config, HeaderNames, Limits, Upstream};
use crate::http1::{Field, Framing};
use crate::key::KeyHash;
use crate::metrics::Metrics;
use crate::usage::Usage;
use crate::vault::Credentials;
use http::header::HeaderValue;
use http::{Method, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Shared by every worker: routes, checks and counters. Replaced whole on
/// a reload (see [`super::Live`]).
pub struct Gateway {
    router: Router,
    auth: Arc<Auth>,
    usage: Arc<Usage>,
    limiter: Limiter,
    key_rate: KeyRate,
    metrics: Arc<Metrics>,
    headers: HeaderNames,
    cors: Option<Cors>,
    pub(crate) limits: Limits,
    /// Per route: which upstream pool, and the `Host` to send it.
    route_upstreams: Vec<(usize, HeaderValue)>,
    /// Distinct upstreams; each worker keeps a pool per entry.
    upstreams: Vec<Upstream>,
    /// For `https://` upstreams: the TLS client, with the web roots and
    /// `upstream_ca_file`.
    upstream_tls: Option<tokio_rustls::TlsConnector>,
    pub(crate) trace: Tracer,
    /// With a vault: the run token each permitted call carries.
    credentials: Option<Arc<Credentials>>,
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

/// A request as the client sent it, as much as the checks and the
/// upstream head need, whichever protocol brought it.
pub(crate) struct ClientRequest<'a, F> {
    pub method: &'a Method,
    /// The path without its query: what routes match.
    pub path: &'a str,
    /// Origin-form, path and query: what goes upstream.
    pub target: &'a [u8],
    /// The client's `Host` or `:authority`.
    pub host: Option<&'a [u8]>,
    pub authorization: Authorization<'a>,
    /// `Content-Length`, if declared.
    pub content_length: Option<u64>,
    pub framing: Framing,
    /// Every field, for the upstream head.
    pub fields: F,
}

/// What the gateway decided for a request.
pub(crate) enum Decision {
    /// Permitted: its upstream head is written; send it on `pool`.
    Forward {
        route: usize,
        pool: usize,
    },
    /// A CORS preflight, answered without auth.
    Preflight,
    Refuse(Reject),
}

/// What the checks let through.
enum Verdict {
    Forward {
        route: usize,
        principal: Arc<Principal>,
    },
    Preflight,
}

impl Gateway {
    pub fn new(
        config: &Config,
        auth: Arc<Auth>,
        usage: Arc<Usage>,
        metrics: Arc<Metrics>,
        credentials: Option<Arc<Credentials>>,
    ) -> Result<Gateway, String> {
        let router = Router::new(&config.routes, config.cors.is_some());
        let trace = Tracer::new(
            metrics.clone(),
            config.routes.iter().map(|r| r.path.as_str()),
            config.log.access,
        )?;
        let mut upstreams: Vec<Upstream> = Vec::new();
        let mut route_upstreams = Vec::new();
        for route in &config.routes {
            let upstream = &route.upstream;
            let index = match upstreams.iter().position(|u| u == upstream) {
                Some(i) => i,
                None => {
                    upstreams.push(upstream.clone());
                    upstreams.len() - 1
                }
            };
            let host = HeaderValue::from_str(upstream.host_header()).map_err(|e| e.to_string())?;
            route_upstreams.push((index, host));
        }
        let upstream_tls = match upstreams.iter().any(|u| u.tls) {
            true => {
                let mut tls = crate::tls::client_config(
                    config.upstream_ca_file.as_deref(),
                    "upstream_ca_file",
                )?;
                // keygate speaks HTTP/1.1 to its upstreams.
                tls.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(tokio_rustls::TlsConnector::from(Arc::new(tls)))
            }
            false => None,
        };
        Ok(Gateway {
            router,
            auth,
            usage,
            limiter: Limiter::new(&config.rate_limit),
            key_rate: KeyRate::new(&config.rate_limit),
            metrics,
            headers: config.headers.clone(),
            cors: config.cors.as_ref().map(Cors::new).transpose()?,
            limits: config.limits,
            route_upstreams,
            upstreams,
            upstream_tls,
            trace,
            credentials,
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
                .map(|upstream| {
                    let tls = match (upstream.tls, &self.upstream_tls) {
                        (true, Some(connector)) => Some(connector.clone()),
                        _ => None,
                    };
                    let fresh = Pool::new(
                        upstream,
                        tls,
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

    /// Decides a request, from its head: refused (and counted by the
    /// failed-auth limiter when it failed to authenticate), a preflight,
    /// or permitted with its upstream head written to `head`.
    pub(crate) async fn decide<'a, F>(
        &self,
        request: ClientRequest<'_, F>,
        conn: &ConnInfo,
        trace: &mut Trace,
        head: &mut Vec<u8>,
    ) -> Decision
    where
        F: Iterator<Item = Field<'a>> + Clone,
    {
        match self.check(&request, conn, trace).await {
            Ok(Verdict::Forward { route, principal }) => {
                match self.upstream_head(head, &request, route, &principal, conn, trace) {
                    Ok(pool) => Decision::Forward { route, pool },
                    Err(reject) => Decision::Refuse(reject),
                }
            }
            Ok(Verdict::Preflight) => Decision::Preflight,
            Err(reject) => {
                if reject.is_failed_auth() {
                    self.limiter.failed(conn.peer.ip(), trace.started);
                }
                Decision::Refuse(reject)
            }
        }
    }

    /// Everything decided from the request head, in DESIGN.md's order.
    async fn check<F>(
        &self,
        request: &ClientRequest<'_, F>,
        conn: &ConnInfo,
        trace: &mut Trace,
    ) -> Result<Verdict, Reject> {
        let (route, workflow) = match self.router.find(request.method, request.path) {
            Matched::Route { index, workflow } => (index, workflow),
            Matched::Preflight { index } => {
                trace.route = index;
                return Ok(Verdict::Preflight);
            }
            Matched::MethodNotAllowed { index, route } => {
                trace.route = index;
                return Err(Reject::MethodNotAllowed {
                    allow: cors::allow(&route.methods, self.cors.is_some()),
                });
            }
            Matched::NotFound => return Err(Reject::NoRoute),
        };
        trace.route = route;
        if self.trace.logs_access() {
            trace.workflow = Some(workflow.to_owned());
        }
        if let Some(retry_after) = self.limiter.blocked(conn.peer.ip(), trace.started) {
            return Err(Reject::TooManyFailures { retry_after });
        }
        let key = request.authorization.key()?;
        let hash = KeyHash::of(key);
        // One deadline for every store read this request makes.
        let mut budget = Budget::default();
        let principal = self.auth.authenticate_within(hash, &mut budget).await?;
        let now = crate::clock::now_ms();
        // Checked on every use, so no cached answer outlives the expiry;
        // refused like an unknown key.
        if principal.expired(now) {
            self.auth.count_expired();
            return Err(crate::auth::AuthError::InvalidKey.into());
        }
        if self.trace.logs_access() {
            trace.principal = Some(principal.clone());
        }
        match self.auth.owner_within(workflow, &mut budget).await? {
            Some(owner) if *owner == *principal.user_id() => {}
            Some(_) => return Err(Reject::Forbidden),
            None => return Err(Reject::WorkflowNotFound),
        }
        if !principal.allows(workflow) {
            self.auth.count_out_of_scope();
            return Err(Reject::Forbidden);
        }
        if request
            .content_length
            .is_some_and(|n| n > self.limits.max_body_bytes)
        {
            return Err(Reject::PayloadTooLarge);
        }
        self.key_rate.admit(&principal, now)?;
        self.usage.note_use(&principal, hash, now);
        Ok(Verdict::Forward { route, principal })
    }

    /// Writes the head a permitted request goes upstream with (see
    /// [`identity::write_upstream_request`]). Returns the pool to send it on.
    fn upstream_head<'a, F>(
        &self,
        out: &mut Vec<u8>,
        request: &ClientRequest<'_, F>,
        route: usize,
        principal: &Principal,
        conn: &ConnInfo,
        trace: &mut Trace,
    ) -> Result<usize, Reject>
    where
        F: Iterator<Item = Field<'a>> + Clone,
    {
        let config = &self.router.routes()[route];
        let (pool_index, upstream_host) = &self.route_upstreams[route];
        let host = match (request.host, config.preserve_host) {
            (Some(h), true) => h,
            _ => upstream_host.as_bytes(),
        };
        // Ids are checked when set through the admin API; a record that
        // reached the store some other way and cannot be sent fails closed.
        let sendable = |id: &str| id.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
        let (user_id, key_id) = (principal.user_id(), principal.key_id());
        if !sendable(user_id) || !sendable(key_id) {
            tracing::error!(
                key = principal.prefix(),
                "stored key has an id that cannot be sent in a header"
            );
            return Err(Reject::Internal);
        }
        let mut write = |run_token: Option<&str>| {
            identity::write_upstream_request(
                out,
                request.method,
                request.target,
                request.fields.clone(),
                &Injected {
                    user_header: &self.headers.user_id,
                    user_id,
                    key_header: &self.headers.key_id,
                    key_id,
                    run_header: &self.headers.run_token,
                    run_token,
                    forward_authorization: config.forward_authorization,
                    client_ip: conn.peer_ip.as_bytes(),
                    tls: conn.tls,
                    original_host: request.host,
                    upstream_host: host,
                    request_id: trace.request_id.as_bytes(),
                    strip: &self.headers.strip,
                },
                request.framing,
            )
        };
        let removed = match &self.credentials {
            Some(credentials) => {
                super::run_token::with_run_token(credentials, user_id, key_id, |t| write(Some(t)))
            }
            None => write(None),
        };
        let counters = self.metrics.local();
        if removed.spoofed > 0 {
            counters
                .spoofed_headers
                .fetch_add(removed.spoofed as u64, Ordering::Relaxed);
            tracing::warn!(
                peer = %conn.peer.ip(),
                key = principal.prefix(),
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
    /// response, or the refusal that stands for its failure, logged.
    pub(crate) fn forwarded(
        &self,
        route: usize,
        sent: Option<Result<UpstreamResponse, ForwardError>>,
    ) -> Result<UpstreamResponse, Reject> {
        let label = self.trace.label(route);
        match sent {
            Some(Ok(response)) => Ok(response),
            None => Err(Reject::GatewayTimeout),
            Some(Err(e)) => {
                let reject = Reject::from(&e);
                match e {
                    ForwardError::Body(_) => {
                        tracing::debug!(route = %label, error = %e, "client body ended early");
                    }
                    _ => tracing::warn!(route = %label, error = %e, "upstream failed"),
                }
                Err(reject)
            }
        }
    }

    /// The answer to a CORS preflight.
    pub(crate) fn preflight(&self) -> Response<ProxyBody> {
        match &self.cors {
            Some(cors) => cors.preflight(),
            None => {
                let mut response = Response::new(ProxyBody::empty());
                *response.status_mut() = StatusCode::NO_CONTENT;
                response
            }
        }
    }
}
