//! The checks that turn the raw shape into [`Config`], one function per
//! section; every message names the field it is about.

use super::raw::{
    Raw, RawAdmin, RawCache, RawCacheSize, RawCors, RawHeaders, RawKeys, RawLimits, RawLog,
    RawRateLimit, RawRedis, RawRoute, RawStore, RawTls, RawUsage,
};
use super::route::{RouteConfig, route};
use super::{
    AdminConfig, AuditConfig, CacheConfig, CacheSize, Config, ConfigError, CorsConfig,
    DEFAULT_STRIP, HeaderNames, KeysConfig, Limits, LogConfig, LogFormat, RateLimitConfig,
    RedisConfig, RedisNodes, StoreConfig, TlsFiles, UiConfig, Upstream, UsageConfig,
    WorkerAffinity, WorkerPolicy,
};
use http::HeaderName;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Reads `${NAME}` values.
type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub(super) fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// The checked config; `base` resolves relative paths.
pub(super) fn config(raw: Raw, base: &Path, env: Env<'_>) -> Result<Config, ConfigError> {
    let listen = socket_addr("listen", raw.listen.as_deref().unwrap_or("127.0.0.1:8080"))?;
    let upstream = upstream(
        "upstream",
        raw.upstream.as_deref().unwrap_or("http://127.0.0.1:3000"),
    )?;
    let store = store(raw.store, base, env)?;
    let admin = admin(raw.admin.unwrap_or_default(), &store, listen, base, env)?;
    let vault = raw
        .vault
        .map(|vault| super::vault::vault(vault, env))
        .transpose()?;
    let egress = match (&vault, raw.egress) {
        (Some(_), egress) => Some(super::vault::egress(egress.unwrap_or_default(), base, env)?),
        (None, Some(_)) => {
            return err("egress: needs vault.master_keys, to open the credentials it injects");
        }
        (None, None) => None,
    };
    let upstream_ca_file = raw.upstream_ca_file.map(|path| resolve(base, path));
    Ok(Config {
        upstream_ca_file,
        listen,
        workers: workers(raw.workers)?,
        worker_policy: worker_policy(raw.worker_policy.as_deref())?,
        worker_cpu_affinity: worker_cpu_affinity(raw.worker_cpu_affinity.as_deref())?,
        tls: raw.tls.map(|files| tls(files, base)),
        store,
        admin,
        routes: routes(raw.routes, &upstream)?,
        upstream,
        cors: cors(raw.cors)?,
        headers: headers(raw.headers.unwrap_or_default())?,
        cache: cache(raw.cache.unwrap_or_default())?,
        limits: limits(raw.limits.unwrap_or_default())?,
        usage: usage(raw.usage.unwrap_or_default())?,
        rate_limit: rate_limit(raw.rate_limit.unwrap_or_default())?,
        log: log(raw.log.unwrap_or_default())?,
        shutdown_timeout: duration("shutdown_timeout", raw.shutdown_timeout.as_deref(), "30s")?,
        keys: keys(raw.keys.unwrap_or_default())?,
        ui: UiConfig {
            stale_after: at_least_a_second(
                "ui.stale_after",
                raw.ui.unwrap_or_default().stale_after.as_deref(),
                "30d",
            )?,
        },
        audit: AuditConfig {
            retention: at_least_a_second(
                "audit.retention",
                raw.audit.unwrap_or_default().retention.as_deref(),
                "90d",
            )?,
        },
        vault,
        egress,
    })
}

fn workers(workers: Option<usize>) -> Result<usize, ConfigError> {
    match workers {
        None | Some(0) => {
            Ok(std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
        }
        Some(n) if n > 256 => err("workers: at most 256"),
        Some(n) => Ok(n),
    }
}

fn worker_policy(policy: Option<&str>) -> Result<WorkerPolicy, ConfigError> {
    match policy {
        None | Some("batch") => Ok(WorkerPolicy::Batch),
        Some("normal") => Ok(WorkerPolicy::Normal),
        Some(other) => err(format!(
            "worker_policy: expected batch or normal, got {other:?}"
        )),
    }
}

fn worker_cpu_affinity(affinity: Option<&str>) -> Result<WorkerAffinity, ConfigError> {
    match affinity {
        None | Some("auto") => Ok(WorkerAffinity::Auto),
        Some("none") => Ok(WorkerAffinity::Unpinned),
        Some(other) => err(format!(
            "worker_cpu_affinity: expected auto or none, got {other:?}"
        )),
    }
}

fn tls(files: RawTls, base: &Path) -> TlsFiles {
    TlsFiles {
        cert: resolve(base, files.cert),
        key: resolve(base, files.key),
    }
}

fn store(raw: Option<RawStore>, base: &Path, env: Env<'_>) -> Result<StoreConfig, ConfigError> {
    const DEFAULT_PATH: &str = "data/keygate.redb";
    let Some(raw) = raw else {
        return Ok(StoreConfig::Embedded {
            path: resolve(base, DEFAULT_PATH),
        });
    };
    match (raw.embedded, raw.redis, raw.postgres) {
        (Some(embedded), None, None) => Ok(StoreConfig::Embedded {
            path: resolve(base, embedded.path.as_deref().unwrap_or(DEFAULT_PATH)),
        }),
        (None, Some(redis), None) => Ok(StoreConfig::Redis(redis_store(redis, base, env)?)),
        (None, None, Some(postgres)) => {
            let url = from_env("store.postgres.url", &postgres.url, env)?;
            Ok(StoreConfig::Postgres(Box::new(super::postgres::postgres(
                postgres, &url, base,
            )?)))
        }
        (None, None, None) => err("store: set one of `embedded`, `redis` or `postgres`"),
        _ => err("store: choose one of `embedded`, `redis` or `postgres`, not several"),
    }
}

fn redis_store(raw: RawRedis, base: &Path, env: Env<'_>) -> Result<RedisConfig, ConfigError> {
    let checked = |field: &str, url: &str| -> Result<String, ConfigError> {
        let url = from_env(field, url, env)?;
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return err(format!(
                "{field}: expected redis://host:port or rediss://host:port"
            ));
        }
        if url.contains('#') {
            return err(format!(
                "{field}: no #fragment (set store.redis.insecure instead)"
            ));
        }
        redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|e| ConfigError(format!("{field}: {e}")))?;
        Ok(url)
    };
    let nodes = match (raw.url, raw.cluster) {
        (Some(url), None) => RedisNodes::Single(checked("store.redis.url", &url)?),
        (None, Some(seeds)) => {
            if seeds.is_empty() {
                return err("store.redis.cluster: list at least one seed node");
            }
            let seeds = seeds
                .iter()
                .enumerate()
                .map(|(i, url)| checked(&format!("store.redis.cluster[{i}]"), url))
                .collect::<Result<Vec<_>, _>>()?;
            let tls = seeds.iter().filter(|u| u.starts_with("rediss://")).count();
            if tls != 0 && tls != seeds.len() {
                return err("store.redis.cluster: all redis:// or all rediss://, not both");
            }
            RedisNodes::Cluster(seeds)
        }
        (Some(_), Some(_)) => {
            return err("store.redis: set url (one node) or cluster (seed nodes), not both");
        }
        (None, None) => return err("store.redis: set url (one node) or cluster (seed nodes)"),
    };
    let insecure = raw.insecure.unwrap_or(false);
    if (insecure || raw.ca_file.is_some()) && !nodes.tls() {
        return err("store.redis: ca_file and insecure are for rediss:// URLs");
    }
    Ok(RedisConfig {
        nodes,
        prefix: raw.prefix.unwrap_or_else(|| "keygate:".to_owned()),
        timeout: duration("store.redis.timeout", raw.timeout.as_deref(), "2s")?,
        ca_file: raw.ca_file.map(|path| resolve(base, path)),
        insecure,
    })
}

fn admin(
    raw: RawAdmin,
    store: &StoreConfig,
    listen: SocketAddr,
    base: &Path,
    env: Env<'_>,
) -> Result<AdminConfig, ConfigError> {
    let token_file = match (&raw.token_file, store) {
        (Some(path), _) => resolve(base, path),
        (None, StoreConfig::Embedded { path }) => path.parent().unwrap_or(base).join("admin.token"),
        (None, StoreConfig::Redis(_) | StoreConfig::Postgres(_)) => {
            resolve(base, "data/admin.token")
        }
    };
    let token = match raw.token {
        None => None,
        Some(token) => {
            let token = from_env("admin.token", &token, env)?;
            if token.len() < 16 {
                return err("admin.token: use at least 16 characters");
            }
            Some(token)
        }
    };
    let admin = AdminConfig {
        listen: socket_addr(
            "admin.listen",
            raw.listen.as_deref().unwrap_or("127.0.0.1:9090"),
        )?,
        token,
        token_file,
        ui_session_ttl: at_least_a_second(
            "admin.ui_session_ttl",
            raw.ui_session_ttl.as_deref(),
            "8h",
        )?,
    };
    if admin.listen == listen && listen.port() != 0 {
        return err("admin.listen: must differ from listen");
    }
    Ok(admin)
}

fn routes(
    raw: Option<Vec<RawRoute>>,
    upstream: &Upstream,
) -> Result<Vec<RouteConfig>, ConfigError> {
    match raw {
        None => Ok(vec![RouteConfig::default_to(upstream)]),
        Some(list) if list.is_empty() => err("routes: list at least one route"),
        Some(list) if list.len() >= crate::metrics::ROUTE_SLOTS => err(format!(
            "routes: at most {} routes",
            crate::metrics::ROUTE_SLOTS - 1
        )),
        Some(list) => list
            .into_iter()
            .enumerate()
            .map(|(i, raw)| route(i, raw, upstream))
            .collect(),
    }
}

fn headers(raw: RawHeaders) -> Result<HeaderNames, ConfigError> {
    let headers = HeaderNames {
        user_id: header_name(
            "headers.user_id",
            raw.user_id.as_deref().unwrap_or("X-User-Id"),
        )?,
        key_id: header_name(
            "headers.key_id",
            raw.key_id.as_deref().unwrap_or("X-Api-Key-Id"),
        )?,
        run_token: header_name(
            "headers.run_token",
            raw.run_token.as_deref().unwrap_or("X-Keygate-Run"),
        )?,
        strip: match raw.strip {
            None => DEFAULT_STRIP
                .iter()
                .map(|name| HeaderName::from_static(name))
                .collect(),
            Some(list) => list
                .iter()
                .map(|name| header_name("headers.strip", name))
                .collect::<Result<_, _>>()?,
        },
    };
    if headers.user_id == headers.key_id
        || headers.run_token == headers.user_id
        || headers.run_token == headers.key_id
    {
        return err("headers: user_id, key_id and run_token must differ");
    }
    Ok(headers)
}

fn cache(raw: RawCache) -> Result<CacheConfig, ConfigError> {
    let (keys, ttl_without_notify) = match raw.keys {
        None => (None, None),
        Some(keys) => (
            Some(RawCacheSize {
                capacity: keys.capacity,
                ttl: keys.ttl,
            }),
            keys.ttl_without_notify,
        ),
    };
    let ttl_without_notify = duration(
        "cache.keys.ttl_without_notify",
        ttl_without_notify.as_deref(),
        "1s",
    )?;
    if ttl_without_notify.is_zero() {
        return err("cache.keys.ttl_without_notify: must be more than 0");
    }
    Ok(CacheConfig {
        ttl_without_notify,
        keys: cache_size("cache.keys", keys, 100_000, "60s")?,
        negative: cache_size("cache.negative", raw.negative, 100_000, "5s")?,
        owners: cache_size("cache.owners", raw.owners, 100_000, "60s")?,
    })
}

fn limits(raw: RawLimits) -> Result<Limits, ConfigError> {
    let limits = Limits {
        max_body_bytes: raw.max_body_bytes.unwrap_or(1024 * 1024),
        max_header_bytes: raw.max_header_bytes.unwrap_or(64 * 1024),
        header_read_timeout: duration(
            "limits.header_read_timeout",
            raw.header_read_timeout.as_deref(),
            "10s",
        )?,
        send_timeout: duration("limits.send_timeout", raw.send_timeout.as_deref(), "10s")?,
        max_connections: raw.max_connections,
        max_connections_per_ip: raw.max_connections_per_ip.unwrap_or(0),
        h2_idle_timeout: duration(
            "limits.h2_idle_timeout",
            raw.h2_idle_timeout.as_deref(),
            "60s",
        )?,
        upstream_connect_timeout: duration(
            "limits.upstream_connect_timeout",
            raw.upstream_connect_timeout.as_deref(),
            "5s",
        )?,
        upstream_response_timeout: duration(
            "limits.upstream_response_timeout",
            raw.upstream_response_timeout.as_deref(),
            "60s",
        )?,
        upstream_idle_per_worker: raw.upstream_idle_per_worker.unwrap_or(256),
        upstream_max_per_worker: raw.upstream_max_per_worker.unwrap_or(1024),
    };
    if limits.upstream_max_per_worker == 0 {
        return err("limits.upstream_max_per_worker: must be at least 1");
    }
    if !(1024..=1024 * 1024).contains(&limits.max_header_bytes) {
        return err("limits.max_header_bytes: must be between 1024 and 1048576");
    }
    if limits.max_connections == Some(0) {
        return err("limits.max_connections: must be at least 1 (leave it out for the default)");
    }
    for (field, value) in [
        ("limits.header_read_timeout", limits.header_read_timeout),
        ("limits.send_timeout", limits.send_timeout),
        ("limits.h2_idle_timeout", limits.h2_idle_timeout),
    ] {
        if value.is_zero() {
            return err(format!("{field}: must be more than 0"));
        }
    }
    Ok(limits)
}

fn usage(raw: RawUsage) -> Result<UsageConfig, ConfigError> {
    let usage = UsageConfig {
        flush_interval: duration("usage.flush_interval", raw.flush_interval.as_deref(), "1s")?,
        max_pending: raw.max_pending.unwrap_or(1_000_000),
    };
    if usage.max_pending == 0 {
        return err("usage.max_pending: must be at least 1");
    }
    if usage.flush_interval.is_zero() {
        return err("usage.flush_interval: must be more than 0");
    }
    Ok(usage)
}

fn keys(raw: RawKeys) -> Result<KeysConfig, ConfigError> {
    Ok(KeysConfig {
        max_grace: duration("keys.max_grace", raw.max_grace.as_deref(), "7d")?,
        sweep_interval: at_least_a_second(
            "keys.sweep_interval",
            raw.sweep_interval.as_deref(),
            "1m",
        )?,
    })
}

fn at_least_a_second(
    field: &str,
    value: Option<&str>,
    default: &str,
) -> Result<Duration, ConfigError> {
    let d = duration(field, value, default)?;
    if d < Duration::from_secs(1) {
        return err(format!("{field}: must be at least 1s"));
    }
    Ok(d)
}

fn rate_limit(raw: RawRateLimit) -> Result<RateLimitConfig, ConfigError> {
    let rate_limit = RateLimitConfig {
        max_failures: raw.max_failures.unwrap_or(20),
        window: duration("rate_limit.window", raw.window.as_deref(), "60s")?,
        key_requests: raw.key_requests.unwrap_or(0),
        key_window: duration("rate_limit.key_window", raw.key_window.as_deref(), "1s")?,
    };
    let window_ms = rate_limit.key_window.as_millis();
    if window_ms == 0 || window_ms > u128::from(u32::MAX) {
        return err("rate_limit.key_window: must be between 1ms and about 49 days");
    }
    Ok(rate_limit)
}

fn log(raw: RawLog) -> Result<LogConfig, ConfigError> {
    Ok(LogConfig {
        format: match raw.format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return err(format!("log.format: expected text or json, got {other:?}")),
        },
        level: match raw.level.as_deref().unwrap_or("info") {
            "error" => tracing::Level::ERROR,
            "warn" => tracing::Level::WARN,
            "info" => tracing::Level::INFO,
            "debug" => tracing::Level::DEBUG,
            "trace" => tracing::Level::TRACE,
            other => {
                return err(format!(
                    "log.level: expected error, warn, info, debug or trace, got {other:?}"
                ));
            }
        },
        access: raw.access.unwrap_or(true),
    })
}

/// `${NAME}` takes the value from the environment, so secrets stay out of
/// the file.
pub(super) fn from_env(
    field: &str,
    value: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    match value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
        None => Ok(value.to_owned()),
        Some(name) => env(name)
            .ok_or_else(|| ConfigError(format!("{field}: environment variable {name} is not set"))),
    }
}

/// `base` joined with `path`, without `./` in the middle, so logs and
/// errors show the path an operator would write.
pub(super) fn resolve(base: &Path, path: impl AsRef<Path>) -> PathBuf {
    base.join(path).components().collect()
}

/// An IP address and port, or a host name that resolves to one (the first
/// address it resolves to).
pub(super) fn socket_addr(field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    let expected = || format!("{field}: expected an address like 127.0.0.1:8080, got {value:?}");
    let Some((host, port)) = value.rsplit_once(':') else {
        return err(expected());
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return err(expected());
    }
    match std::net::ToSocketAddrs::to_socket_addrs(value).map(|mut all| all.next()) {
        Ok(Some(addr)) => Ok(addr),
        Ok(None) | Err(_) => err(format!(
            "{field}: cannot resolve {host:?}; give an IP address, like 127.0.0.1:{port}"
        )),
    }
}

pub(super) fn upstream(field: &str, value: &str) -> Result<Upstream, ConfigError> {
    let (rest, tls) = match (
        value.strip_prefix("http://"),
        value.strip_prefix("https://"),
    ) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => {
            return err(format!(
                "{field}: expected http://host:port or https://host:port, got {value:?}"
            ));
        }
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') || authority.contains('@') {
        return err(format!(
            "{field}: expected a scheme and host:port with no path, got {value:?}"
        ));
    }
    let authority = if has_port(authority) {
        authority.to_owned()
    } else if tls {
        format!("{authority}:443")
    } else {
        format!("{authority}:80")
    };
    if authority.parse::<http::uri::Authority>().is_err() {
        return err(format!("{field}: invalid host in {value:?}"));
    }
    let upstream = Upstream { authority, tls };
    if tls && rustls_pki_types::ServerName::try_from(upstream.host().to_owned()).is_err() {
        return err(format!(
            "{field}: {value:?} has no host a certificate can name"
        ));
    }
    Ok(upstream)
}

fn has_port(authority: &str) -> bool {
    match authority.rsplit_once(':') {
        Some((host, port)) => {
            !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':')
        }
        None => false,
    }
}

fn cors(raw: Option<RawCors>) -> Result<Option<CorsConfig>, ConfigError> {
    let raw = raw.unwrap_or_default();
    if raw.enabled == Some(false) {
        return Ok(None);
    }
    let join =
        |field: &str, list: Option<Vec<String>>, default: &str| -> Result<String, ConfigError> {
            let value = list.map_or_else(|| default.to_owned(), |l| l.join(", "));
            if http::HeaderValue::from_str(&value).is_err() {
                return err(format!("{field}: not a valid header value"));
            }
            Ok(value)
        };
    let allow_origin = raw.allow_origin.unwrap_or_else(|| "*".to_owned());
    if http::HeaderValue::from_str(&allow_origin).is_err() {
        return err("cors.allow_origin: not a valid header value");
    }
    Ok(Some(CorsConfig {
        allow_origin,
        allow_methods: join("cors.allow_methods", raw.allow_methods, "POST, OPTIONS")?,
        allow_headers: join(
            "cors.allow_headers",
            raw.allow_headers,
            "Content-Type, Authorization",
        )?,
        max_age: duration("cors.max_age", raw.max_age.as_deref(), "86400s")?,
    }))
}

pub(super) fn header_name(field: &str, value: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(value.as_bytes())
        .map_err(|_| ConfigError(format!("{field}: invalid header name {value:?}")))
}

fn cache_size(
    field: &str,
    raw: Option<RawCacheSize>,
    capacity: u64,
    ttl: &str,
) -> Result<CacheSize, ConfigError> {
    let (given_capacity, given_ttl) = raw.map_or((None, None), |r| (r.capacity, r.ttl));
    let size = CacheSize {
        capacity: given_capacity.unwrap_or(capacity),
        ttl: duration(&format!("{field}.ttl"), given_ttl.as_deref(), ttl)?,
    };
    if size.ttl.is_zero() {
        return err(format!("{field}.ttl: must be more than 0"));
    }
    Ok(size)
}

pub(super) fn duration(
    field: &str,
    value: Option<&str>,
    default: &str,
) -> Result<Duration, ConfigError> {
    let value = value.unwrap_or(default);
    parse_duration(value).ok_or_else(|| {
        ConfigError(format!(
            "{field}: expected a duration like 500ms, 5s, 2m, 1h or 30d, got {value:?}"
        ))
    })
}

/// `500ms`, `5s`, `2m`, `1h`, `30d`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    let count: u64 = digits.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(count)),
        "s" => Some(Duration::from_secs(count)),
        "m" => Some(Duration::from_secs(count.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(count.checked_mul(3600)?)),
        "d" => Some(Duration::from_secs(count.checked_mul(86_400)?)),
        _ => None,
    }
}
