//! The data plane: match the route, run the checks in DESIGN.md's order,
//! forward with the trusted identity headers, and count and log the result.

pub mod body;
pub mod headers;
pub mod limiter;
pub mod reject;
pub mod route;
pub mod upstream;

use crate::auth::{Auth, AuthError, Principal};
use crate::config::{Config, HeaderNames, Limits};
use crate::key::{self, KeyHash, Presented};
use crate::metrics::Metrics;
use crate::usage::Usage;
use body::{LimitedBody, ProxyBody};
use headers::{Injected, X_REQUEST_ID};
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use limiter::Limiter;
use reject::Reject;
use route::{Matched, Router};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use upstream::{ForwardError, Pool};

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
    limits: Limits,
    access_log: bool,
    /// Per route: which upstream pool, and the `Host` to send it.
    route_upstreams: Vec<(usize, HeaderValue)>,
    /// Distinct upstream authorities; each worker keeps a pool per entry.
    upstreams: Vec<String>,
    request_ids: headers::RequestIds,
}

struct Cors {
    allow_origin: HeaderValue,
    allow_methods: HeaderValue,
    allow_headers: HeaderValue,
    max_age: HeaderValue,
}

/// One worker's upstream connections.
pub struct Forwarder {
    pools: Vec<Pool>,
}

/// What the listener knows about a connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's address as a header value, rendered once per connection.
    pub peer_ip: HeaderValue,
    pub tls: bool,
}

/// `rate_limit.key_requests` per `key_window`, per key on this instance.
struct KeyRate {
    requests: u32,
    window_ms: u64,
}

/// What the checks decided.
enum Checked {
    Forward {
        route: usize,
        principal: Arc<Principal>,
    },
    Preflight,
}

/// Per-request facts for the access log.
struct Trace {
    route: usize,
    workflow: Option<String>,
    principal: Option<Arc<Principal>>,
}

impl Gateway {
    pub fn new(
        config: &Config,
        auth: Arc<Auth>,
        usage: Arc<Usage>,
        metrics: Arc<Metrics>,
    ) -> Result<Gateway, String> {
        let router = Router::new(&config.routes, config.cors.is_some())?;
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
            request_ids: headers::RequestIds::default(),
        })
    }

    /// A fresh set of upstream pools, for one worker runtime.
    pub fn forwarder(&self) -> Forwarder {
        Forwarder {
            pools: self
                .upstreams
                .iter()
                .map(|a| {
                    Pool::new(
                        a.clone(),
                        self.limits.upstream_idle_per_worker,
                        self.limits.upstream_max_per_worker,
                        self.limits.upstream_connect_timeout,
                    )
                })
                .collect(),
        }
    }

    /// Answers one request; never fails (every error becomes a response).
    pub async fn handle(
        &self,
        forwarder: &Forwarder,
        conn: &ConnInfo,
        request: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let method = request.method().clone();
        let request_id = match request.headers().get(&X_REQUEST_ID) {
            Some(v) if headers::sane_request_id(v) => v.clone(),
            _ => self.request_ids.next(),
        };
        let mut trace = Trace {
            route: self.metrics.unmatched(),
            workflow: None,
            principal: None,
        };
        let (parts, body) = request.into_parts();
        let checked = self.check(&parts, conn, &mut trace).await;
        let mut response = match checked {
            Ok(Checked::Forward { route, principal }) => {
                match self
                    .forward(
                        forwarder,
                        conn,
                        parts,
                        body,
                        route,
                        &principal,
                        request_id.clone(),
                    )
                    .await
                {
                    Ok(response) => response,
                    Err(reject) => reject.into_response(),
                }
            }
            Ok(Checked::Preflight) => {
                body::discard(body, self.limits.max_body_bytes);
                self.preflight()
            }
            Err(reject) => {
                body::discard(body, self.limits.max_body_bytes);
                if matches!(
                    reject,
                    Reject::MissingAuthorization
                        | Reject::InvalidFormat
                        | Reject::IntegrationKey
                        | Reject::InvalidKey
                ) {
                    self.limiter.failed(conn.peer.ip(), started);
                }
                reject.into_response()
            }
        };
        response
            .headers_mut()
            .entry(X_REQUEST_ID.clone())
            .or_insert(request_id.clone());
        let status = response.status().as_u16();
        let elapsed = started.elapsed();
        self.metrics.observe(trace.route, status, elapsed);
        if self.access_log {
            let route = self
                .router
                .routes()
                .get(trace.route)
                .map_or("-", |r| r.label.as_str());
            tracing::info!(
                target: "keygate::access",
                method = %method,
                route,
                workflow = trace.workflow.as_deref().unwrap_or("-"),
                outcome = crate::metrics::OUTCOMES[crate::metrics::outcome_index(status)],
                status,
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                request_id = request_id.to_str().unwrap_or("-"),
                key = trace.principal.as_ref().map_or("-", |p| p.prefix()),
            );
        }
        response
    }

    /// Everything decided from the request head, in DESIGN.md's order.
    async fn check(
        &self,
        parts: &http::request::Parts,
        conn: &ConnInfo,
        trace: &mut Trace,
    ) -> Result<Checked, Reject> {
        let (index, workflow) = match self.router.find(&parts.method, parts.uri.path()) {
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

        if let Some(retry_after) = self.limiter.blocked(conn.peer.ip(), Instant::now()) {
            return Err(Reject::TooManyFailures { retry_after });
        }
        let (principal, hash) = self.authenticate(&parts.headers).await?;
        if self.access_log {
            trace.principal = Some(principal.clone());
        }
        match self.auth.owner(workflow).await {
            Ok(Some(owner)) if *owner == *principal.user_id() => {}
            Ok(Some(_)) => return Err(Reject::Forbidden),
            Ok(None) => return Err(Reject::WorkflowNotFound),
            Err(AuthError::Unavailable) => return Err(Reject::StoreUnavailable),
            Err(AuthError::InvalidKey) => return Err(Reject::InvalidKey),
        }
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.limits.max_body_bytes) {
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

    /// Sends a permitted request upstream with the trusted headers.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        forwarder: &Forwarder,
        conn: &ConnInfo,
        mut parts: http::request::Parts,
        body: Incoming,
        index: usize,
        principal: &Principal,
        request_id: HeaderValue,
    ) -> Result<Response<ProxyBody>, Reject> {
        let route = &self.router.routes()[index];
        let (pool_index, upstream_host) = &self.route_upstreams[index];
        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let host = match (&original_host, route.config.preserve_host) {
            (Some(h), true) => h.clone(),
            _ => upstream_host.clone(),
        };
        // Ids are checked when set through the admin API; a record that
        // reached the store some other way and cannot be sent fails closed.
        let (Ok(user_id), Ok(key_id)) = (
            HeaderValue::from_str(principal.user_id()),
            HeaderValue::from_str(principal.key_id()),
        ) else {
            tracing::error!(
                key = principal.prefix(),
                "stored key has an id that cannot be sent in a header"
            );
            return Err(Reject::Internal);
        };
        let spoofed = headers::prepare_request(
            &mut parts.headers,
            Injected {
                user_header: &self.headers.user_id,
                user_id,
                key_header: &self.headers.key_id,
                key_id,
                forward_authorization: route.config.forward_authorization,
                client_ip: &conn.peer_ip,
                tls: conn.tls,
                original_host,
                upstream_host: host,
                request_id,
            },
        );
        if spoofed > 0 {
            self.metrics
                .local()
                .spoofed_headers
                .fetch_add(spoofed as u64, Ordering::Relaxed);
            tracing::warn!(
                peer = %conn.peer.ip(),
                key = principal.prefix(),
                removed = spoofed,
                "removed client-sent identity headers"
            );
        }
        parts.uri = match parts.uri.path_and_query() {
            Some(pq) => Uri::from(pq.clone()),
            None => Uri::from_static("/"),
        };
        parts.version = Version::HTTP_11;

        let body = LimitedBody::new(body, self.limits.max_body_bytes);
        let upstream_request = Request::from_parts(parts, body);
        let pool = &forwarder.pools[*pool_index];
        let result = tokio::time::timeout(
            self.limits.upstream_response_timeout,
            pool.send(upstream_request),
        )
        .await;
        let response = match result {
            Err(_) => return Err(Reject::GatewayTimeout),
            Ok(Err(ForwardError::Exchange(e))) if body::BodyTooLarge::caused(&e) => {
                return Err(Reject::PayloadTooLarge);
            }
            Ok(Err(ForwardError::ConnectTimeout)) => {
                tracing::warn!(route = %route.label, "upstream connect timed out");
                return Err(Reject::GatewayTimeout);
            }
            Ok(Err(e)) => {
                tracing::warn!(route = %route.label, error = %e, "upstream failed");
                return Err(Reject::BadGateway);
            }
            Ok(Ok(response)) => response,
        };
        let (mut parts, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, ProxyBody::Upstream(body)))
    }

    /// Checks 1 to 3 of the table: header present, right shape, known key.
    async fn authenticate(&self, headers: &HeaderMap) -> Result<(Arc<Principal>, KeyHash), Reject> {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let value = values.next().ok_or(Reject::MissingAuthorization)?;
        if values.next().is_some() {
            return Err(Reject::InvalidFormat);
        }
        let token = bearer_token(value)?;
        let key = match key::classify(token) {
            Presented::Key(key) => key,
            Presented::IntegrationKey => return Err(Reject::IntegrationKey),
            Presented::Malformed => return Err(Reject::InvalidFormat),
        };
        let hash = KeyHash::of(key);
        match self.auth.authenticate(hash).await {
            Ok(principal) => Ok((principal, hash)),
            Err(AuthError::InvalidKey) => Err(Reject::InvalidKey),
            Err(AuthError::Unavailable) => Err(Reject::StoreUnavailable),
        }
    }

    fn preflight(&self) -> Response<ProxyBody> {
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
fn bearer_token(value: &HeaderValue) -> Result<&str, Reject> {
    let value = value.to_str().map_err(|_| Reject::InvalidFormat)?;
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
            assert_eq!(
                bearer_token(&HeaderValue::from_static(v)),
                Ok("wfb_x"),
                "{v}"
            );
        }
    }

    #[test]
    fn other_schemes_and_empty_tokens_are_bad_format() {
        for v in ["Basic abc", "Bearer", "Bearer ", "wfb_x", "Token wfb_x"] {
            assert_eq!(
                bearer_token(&HeaderValue::from_static(v)),
                Err(Reject::InvalidFormat),
                "{v}"
            );
        }
        let non_utf8 = HeaderValue::from_bytes(b"Bearer \xff").unwrap();
        assert_eq!(bearer_token(&non_utf8), Err(Reject::InvalidFormat));
    }
}
