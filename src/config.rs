//! Configuration: YAML parsed from a string into raw serde structs (unknown
//! keys rejected with their name and line), then validated into [`Config`],
//! the checked type the rest of the crate uses.

use http::{HeaderName, Method};
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration problem, worded for the operator who has to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// How the kernel schedules the data-plane threads (Linux; elsewhere the
/// system default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerPolicy {
    /// `SCHED_BATCH`: no wake-up preemption, so a worker woken by one event
    /// lets the running thread finish its slice and then handles the
    /// events that gathered meanwhile in one go.
    Batch,
    /// `SCHED_OTHER`, the default for processes.
    Normal,
}

/// Where the kernel may run the data-plane threads (Linux; elsewhere
/// anywhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerAffinity {
    /// One worker per CPU, each kept on its own, when there are as many
    /// workers as CPUs the process may use; otherwise as `Unpinned` (`none`).
    Auto,
    /// Any of the process's CPUs, as the kernel sees fit (`none`).
    Unpinned,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: Upstream,
    /// Data-plane threads, each with its own runtime and listener socket.
    pub workers: usize,
    /// The kernel scheduling policy of those threads.
    pub worker_policy: WorkerPolicy,
    /// Whether each of those threads keeps to one CPU.
    pub worker_cpu_affinity: WorkerAffinity,
    pub tls: Option<TlsFiles>,
    pub store: StoreConfig,
    pub admin: AdminConfig,
    pub routes: Vec<RouteConfig>,
    pub cors: Option<CorsConfig>,
    pub headers: HeaderNames,
    pub cache: CacheConfig,
    pub limits: Limits,
    pub usage: UsageConfig,
    pub rate_limit: RateLimitConfig,
    pub log: LogConfig,
    pub shutdown_timeout: Duration,
}

/// An HTTP/1.1 upstream, `http://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `host:port`, used both to connect and as the `Host` sent upstream.
    pub authority: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Embedded { path: PathBuf },
    Redis(RedisConfig),
}

#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    pub url: String,
    /// Prepended to every Redis key, so several deployments can share a server.
    pub prefix: String,
    /// Per-command timeout: a stalled Redis must turn into a 503, not a hang.
    pub timeout: Duration,
}

#[derive(Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// A token set in config (usually `${ENV_VAR}`); when absent the server
    /// creates `token_file` and the CLI reads it.
    pub token: Option<String>,
    pub token_file: PathBuf,
}

/// Secrets stay out of `Debug` output, so a logged config leaks nothing.
impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = match self.url.split_once('@') {
            Some((_, host)) => format!("redis://…@{host}"),
            None => self.url.clone(),
        };
        f.debug_struct("RedisConfig")
            .field("url", &shown)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub path: String,
    pub methods: Vec<Method>,
    pub upstream: Upstream,
    pub forward_authorization: bool,
    /// Send the client's `Host` upstream instead of the upstream's authority.
    pub preserve_host: bool,
}

#[derive(Debug, Clone)]
pub struct CorsConfig {
    pub allow_origin: String,
    pub allow_methods: String,
    pub allow_headers: String,
    pub max_age: Duration,
}

#[derive(Debug, Clone)]
pub struct HeaderNames {
    pub user_id: HeaderName,
    pub key_id: HeaderName,
    /// Client headers never forwarded: ones an engine behind keygate may
    /// trust for routing or to skip its own checks (lower case).
    pub strip: Vec<HeaderName>,
}

/// Client headers removed by default (`headers.strip`): Next.js's
/// `x-middleware-subrequest` lets a request skip the engine's middleware
/// (CVE-2025-29927); `X-Original-URL` / `X-Rewrite-URL` can make an engine
/// route to a path keygate did not check.
pub const DEFAULT_STRIP: [&str; 3] = ["x-middleware-subrequest", "x-original-url", "x-rewrite-url"];

#[derive(Debug, Clone, Copy)]
pub struct CacheSize {
    pub capacity: u64,
    pub ttl: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    pub keys: CacheSize,
    pub negative: CacheSize,
    pub owners: CacheSize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_body_bytes: u64,
    /// Longest request head (and upstream response head, and trailer
    /// section) accepted: 431 above it.
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    /// Every write to a client must make progress within this (nginx's
    /// `send_timeout`), or the connection is closed.
    pub send_timeout: Duration,
    /// Client connections open at once; more are refused at accept.
    /// `None`: from the file-descriptor limit, when the server starts.
    pub max_connections: Option<usize>,
    /// Client connections from one address; 0 means no limit.
    pub max_connections_per_ip: usize,
    /// An HTTP/2 connection with no open stream for this long is closed
    /// (GOAWAY), however many PINGs it answers.
    pub h2_idle_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_response_timeout: Duration,
    /// Idle upstream connections kept per worker.
    pub upstream_idle_per_worker: usize,
    /// Open upstream connections per worker, idle or busy.
    pub upstream_max_per_worker: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageConfig {
    pub flush_interval: Duration,
    /// Keys with an unwritten `lastUsedAt` kept while the store is down.
    pub max_pending: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct RateLimitConfig {
    /// Failed authentications one client may make per window before 429.
    pub max_failures: u32,
    pub window: Duration,
    /// Requests one key may make per `key_window` on one instance; 0 means
    /// no limit.
    pub key_requests: u32,
    pub key_window: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: tracing::Level,
    /// One line per proxied request.
    pub access: bool,
}

// ---- raw YAML shape -------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Option<String>,
    upstream: Option<String>,
    workers: Option<usize>,
    worker_policy: Option<String>,
    worker_cpu_affinity: Option<String>,
    tls: Option<RawTls>,
    store: Option<RawStore>,
    admin: Option<RawAdmin>,
    routes: Option<Vec<RawRoute>>,
    cors: Option<RawCors>,
    headers: Option<RawHeaders>,
    cache: Option<RawCache>,
    limits: Option<RawLimits>,
    usage: Option<RawUsage>,
    rate_limit: Option<RawRateLimit>,
    log: Option<RawLog>,
    shutdown_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    embedded: Option<RawEmbedded>,
    redis: Option<RawRedis>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmbedded {
    path: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: String,
    prefix: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    token: Option<String>,
    token_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path: String,
    methods: Option<Vec<String>>,
    upstream: Option<String>,
    forward_authorization: Option<bool>,
    preserve_host: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCors {
    enabled: Option<bool>,
    allow_origin: Option<String>,
    allow_methods: Option<Vec<String>>,
    allow_headers: Option<Vec<String>>,
    max_age: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHeaders {
    user_id: Option<String>,
    key_id: Option<String>,
    strip: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCache {
    keys: Option<RawCacheSize>,
    negative: Option<RawCacheSize>,
    owners: Option<RawCacheSize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCacheSize {
    capacity: Option<u64>,
    ttl: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_body_bytes: Option<u64>,
    max_header_bytes: Option<usize>,
    header_read_timeout: Option<String>,
    send_timeout: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    h2_idle_timeout: Option<String>,
    upstream_connect_timeout: Option<String>,
    upstream_response_timeout: Option<String>,
    upstream_idle_per_worker: Option<usize>,
    upstream_max_per_worker: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUsage {
    flush_interval: Option<String>,
    max_pending: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    max_failures: Option<u32>,
    window: Option<String>,
    key_requests: Option<u32>,
    key_window: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
    access: Option<bool>,
}

// ---- validation -----------------------------------------------------------

pub const DEFAULT_ROUTE: &str = "/api/workflows/{workflow}/webhook";

impl Config {
    /// Reads and validates a config file; relative paths inside it are taken
    /// from the file's own folder, so the CLI and the server agree wherever
    /// they are started from.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_yaml(&text, base).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    /// Parses and validates YAML; `base` resolves relative paths.
    pub fn from_yaml(text: &str, base: &Path) -> Result<Config, ConfigError> {
        Config::from_yaml_with_env(text, base, &|name| std::env::var(name).ok())
    }

    /// As [`Config::from_yaml`], reading `${NAME}` values through `env`.
    pub fn from_yaml_with_env(
        text: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: Raw = if text.trim().is_empty() {
            Raw::default()
        } else {
            parse_raw(text)?
        };
        Config::validate(raw, base, env)
    }

    fn validate(
        raw: Raw,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let listen = socket_addr("listen", raw.listen.as_deref().unwrap_or("127.0.0.1:8080"))?;
        let upstream = upstream(
            "upstream",
            raw.upstream.as_deref().unwrap_or("http://127.0.0.1:3000"),
        )?;
        let workers = match raw.workers {
            None | Some(0) => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(n) if n > 256 => return err("workers: at most 256"),
            Some(n) => n,
        };
        let worker_policy = match raw.worker_policy.as_deref() {
            None | Some("batch") => WorkerPolicy::Batch,
            Some("normal") => WorkerPolicy::Normal,
            Some(other) => {
                return err(format!(
                    "worker_policy: expected batch or normal, got {other:?}"
                ));
            }
        };
        let worker_cpu_affinity = match raw.worker_cpu_affinity.as_deref() {
            None | Some("auto") => WorkerAffinity::Auto,
            Some("none") => WorkerAffinity::Unpinned,
            Some(other) => {
                return err(format!(
                    "worker_cpu_affinity: expected auto or none, got {other:?}"
                ));
            }
        };
        let tls = raw.tls.map(|t| TlsFiles {
            cert: resolve(base, t.cert),
            key: resolve(base, t.key),
        });

        let store = match raw.store {
            None => StoreConfig::Embedded {
                path: resolve(base, "data/keygate.redb"),
            },
            Some(RawStore {
                embedded: Some(_),
                redis: Some(_),
            }) => return err("store: choose one of `embedded` or `redis`, not both"),
            Some(RawStore {
                embedded: Some(e),
                redis: None,
            }) => StoreConfig::Embedded {
                path: resolve(base, e.path.as_deref().unwrap_or("data/keygate.redb")),
            },
            Some(RawStore {
                embedded: None,
                redis: Some(r),
            }) => {
                let url = from_env("store.redis.url", &r.url, env)?;
                if url.starts_with("rediss://") {
                    return err(
                        "store.redis.url: TLS to Redis (rediss://) is not supported by this build",
                    );
                }
                if !url.starts_with("redis://") {
                    return err("store.redis.url: expected redis://host:port");
                }
                StoreConfig::Redis(RedisConfig {
                    url,
                    prefix: r.prefix.unwrap_or_else(|| "keygate:".to_owned()),
                    timeout: duration("store.redis.timeout", r.timeout.as_deref(), "2s")?,
                })
            }
            Some(RawStore {
                embedded: None,
                redis: None,
            }) => return err("store: set `embedded` or `redis`"),
        };

        let admin_raw = raw.admin.unwrap_or_default();
        let token_file = match (&admin_raw.token_file, &store) {
            (Some(p), _) => resolve(base, p),
            (None, StoreConfig::Embedded { path }) => {
                path.parent().unwrap_or(base).join("admin.token")
            }
            (None, StoreConfig::Redis(_)) => resolve(base, "data/admin.token"),
        };
        let token = match admin_raw.token {
            None => None,
            Some(t) => {
                let t = from_env("admin.token", &t, env)?;
                if t.len() < 16 {
                    return err("admin.token: use at least 16 characters");
                }
                Some(t)
            }
        };
        let admin = AdminConfig {
            listen: socket_addr(
                "admin.listen",
                admin_raw.listen.as_deref().unwrap_or("127.0.0.1:9090"),
            )?,
            token,
            token_file,
        };
        if admin.listen == listen && listen.port() != 0 {
            return err("admin.listen: must differ from listen");
        }

        let routes = match raw.routes {
            None => vec![RouteConfig {
                path: DEFAULT_ROUTE.to_owned(),
                methods: vec![Method::POST],
                upstream: upstream.clone(),
                forward_authorization: false,
                preserve_host: false,
            }],
            Some(list) if list.is_empty() => return err("routes: list at least one route"),
            Some(list) if list.len() >= crate::metrics::ROUTE_SLOTS => {
                return err(format!(
                    "routes: at most {} routes",
                    crate::metrics::ROUTE_SLOTS - 1
                ));
            }
            Some(list) => list
                .into_iter()
                .enumerate()
                .map(|(i, r)| route(i, r, &upstream))
                .collect::<Result<_, _>>()?,
        };

        let cors = cors(raw.cors)?;

        let h = raw.headers.unwrap_or_default();
        let headers = HeaderNames {
            user_id: header_name(
                "headers.user_id",
                h.user_id.as_deref().unwrap_or("X-User-Id"),
            )?,
            key_id: header_name(
                "headers.key_id",
                h.key_id.as_deref().unwrap_or("X-Api-Key-Id"),
            )?,
            strip: match h.strip {
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
        if headers.user_id == headers.key_id {
            return err("headers: user_id and key_id must differ");
        }

        let c = raw.cache.unwrap_or_default();
        let cache = CacheConfig {
            keys: cache_size("cache.keys", c.keys, 100_000, "60s")?,
            negative: cache_size("cache.negative", c.negative, 100_000, "5s")?,
            owners: cache_size("cache.owners", c.owners, 100_000, "60s")?,
        };

        let l = raw.limits.unwrap_or_default();
        let limits = Limits {
            max_body_bytes: l.max_body_bytes.unwrap_or(1024 * 1024),
            max_header_bytes: l.max_header_bytes.unwrap_or(64 * 1024),
            header_read_timeout: duration(
                "limits.header_read_timeout",
                l.header_read_timeout.as_deref(),
                "10s",
            )?,
            send_timeout: duration("limits.send_timeout", l.send_timeout.as_deref(), "10s")?,
            max_connections: l.max_connections,
            max_connections_per_ip: l.max_connections_per_ip.unwrap_or(0),
            h2_idle_timeout: duration(
                "limits.h2_idle_timeout",
                l.h2_idle_timeout.as_deref(),
                "60s",
            )?,
            upstream_connect_timeout: duration(
                "limits.upstream_connect_timeout",
                l.upstream_connect_timeout.as_deref(),
                "5s",
            )?,
            upstream_response_timeout: duration(
                "limits.upstream_response_timeout",
                l.upstream_response_timeout.as_deref(),
                "60s",
            )?,
            upstream_idle_per_worker: l.upstream_idle_per_worker.unwrap_or(256),
            upstream_max_per_worker: l.upstream_max_per_worker.unwrap_or(1024),
        };
        if limits.upstream_max_per_worker == 0 {
            return err("limits.upstream_max_per_worker: must be at least 1");
        }
        if !(1024..=1024 * 1024).contains(&limits.max_header_bytes) {
            return err("limits.max_header_bytes: must be between 1024 and 1048576");
        }
        if limits.max_connections == Some(0) {
            return err(
                "limits.max_connections: must be at least 1 (leave it out for the default)",
            );
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

        let u = raw.usage.unwrap_or_default();
        let usage = UsageConfig {
            flush_interval: duration("usage.flush_interval", u.flush_interval.as_deref(), "1s")?,
            max_pending: u.max_pending.unwrap_or(1_000_000),
        };
        if usage.max_pending == 0 {
            return err("usage.max_pending: must be at least 1");
        }
        if usage.flush_interval.is_zero() {
            return err("usage.flush_interval: must be more than 0");
        }

        let rl = raw.rate_limit.unwrap_or_default();
        let rate_limit = RateLimitConfig {
            max_failures: rl.max_failures.unwrap_or(20),
            window: duration("rate_limit.window", rl.window.as_deref(), "60s")?,
            key_requests: rl.key_requests.unwrap_or(0),
            key_window: duration("rate_limit.key_window", rl.key_window.as_deref(), "1s")?,
        };
        if rate_limit.key_window.as_millis() == 0
            || rate_limit.key_window.as_millis() > u128::from(u32::MAX)
        {
            return err("rate_limit.key_window: must be between 1ms and about 49 days");
        }

        let lg = raw.log.unwrap_or_default();
        let log = LogConfig {
            format: match lg.format.as_deref().unwrap_or("text") {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => return err(format!("log.format: expected text or json, got {other:?}")),
            },
            level: match lg.level.as_deref().unwrap_or("info") {
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
            access: lg.access.unwrap_or(true),
        };

        Ok(Config {
            listen,
            upstream,
            workers,
            worker_policy,
            worker_cpu_affinity,
            tls,
            store,
            admin,
            routes,
            cors,
            headers,
            cache,
            limits,
            usage,
            rate_limit,
            log,
            shutdown_timeout: duration("shutdown_timeout", raw.shutdown_timeout.as_deref(), "30s")?,
        })
    }
}

impl Config {
    /// The settings that differ between `self` (in force) and `new` but
    /// take effect only after a restart: the listeners and their threads,
    /// the store, the admin token, TLS being on or off, logging, the
    /// last-used batcher and the shutdown timeout.
    pub fn needs_restart(&self, new: &Config) -> Vec<&'static str> {
        let differs = [
            ("listen", self.listen != new.listen),
            ("workers", self.workers != new.workers),
            ("worker_policy", self.worker_policy != new.worker_policy),
            (
                "worker_cpu_affinity",
                self.worker_cpu_affinity != new.worker_cpu_affinity,
            ),
            ("tls", self.tls.is_some() != new.tls.is_some()),
            ("store", self.store != new.store),
            ("admin", self.admin != new.admin),
            ("usage", self.usage != new.usage),
            ("log", self.log != new.log),
            (
                "shutdown_timeout",
                self.shutdown_timeout != new.shutdown_timeout,
            ),
        ];
        differs
            .into_iter()
            .filter_map(|(name, differs)| differs.then_some(name))
            .collect()
    }

    /// Takes the restart-only settings (see [`Config::needs_restart`]) from
    /// `running`, so `self` describes what is in force after a reload.
    pub fn keep_restart_only(&mut self, running: &Config) {
        self.listen = running.listen;
        self.workers = running.workers;
        self.worker_policy = running.worker_policy;
        self.worker_cpu_affinity = running.worker_cpu_affinity;
        if self.tls.is_some() != running.tls.is_some() {
            self.tls = running.tls.clone();
        }
        self.store = running.store.clone();
        self.admin = running.admin.clone();
        self.usage = running.usage;
        self.log = running.log.clone();
        self.shutdown_timeout = running.shutdown_timeout;
    }
}

/// The raw shape of `text`. An error names the field it is about (a value
/// of the wrong type, say) as well as its line.
fn parse_raw(text: &str) -> Result<Raw, ConfigError> {
    let mut field = None;
    serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            if path != "." && !path.is_empty() {
                field = Some(path);
            }
            e.into_inner()
        })
    })
    .map_err(|e| {
        let message = yaml_error(&e);
        ConfigError(match field {
            // An unknown key is named by the message itself.
            Some(field) if !message.contains(&format!("`{}`", leaf(&field))) => {
                format!("{field}: {message}")
            }
            _ => message,
        })
    })
}

/// The last part of a field path (`limits.send_timeout` → `send_timeout`).
fn leaf(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// serde-saphyr reports the key and its line; keep its first line only, so
/// the CLI can print a one-line error.
fn yaml_error(e: &serde_saphyr::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("invalid YAML").trim();
    let first = first.strip_prefix("error: ").unwrap_or(first).to_owned();
    match e.location() {
        Some(loc) if !first.contains("line") => {
            format!("{first} (line {}, column {})", loc.line(), loc.column())
        }
        _ => first,
    }
}

/// `${NAME}` takes the value from the environment, so secrets stay out of
/// the file.
fn from_env(
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
fn resolve(base: &Path, path: impl AsRef<Path>) -> PathBuf {
    base.join(path).components().collect()
}

/// An IP address and port, or a host name that resolves to one (the first
/// address it resolves to).
fn socket_addr(field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
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
    use std::net::ToSocketAddrs;
    match value.to_socket_addrs().map(|mut all| all.next()) {
        Ok(Some(addr)) => Ok(addr),
        Ok(None) | Err(_) => err(format!(
            "{field}: cannot resolve {host:?}; give an IP address, like 127.0.0.1:{port}"
        )),
    }
}

fn upstream(field: &str, value: &str) -> Result<Upstream, ConfigError> {
    let Some(rest) = value.strip_prefix("http://") else {
        return err(format!("{field}: expected http://host:port, got {value:?}"));
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') || authority.contains('@') {
        return err(format!(
            "{field}: expected http://host:port with no path, got {value:?}"
        ));
    }
    let authority = if has_port(authority) {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    if authority.parse::<http::uri::Authority>().is_err() {
        return err(format!("{field}: invalid host in {value:?}"));
    }
    Ok(Upstream { authority })
}

fn has_port(authority: &str) -> bool {
    match authority.rsplit_once(':') {
        Some((host, port)) => {
            !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':')
        }
        None => false,
    }
}

fn route(i: usize, r: RawRoute, default: &Upstream) -> Result<RouteConfig, ConfigError> {
    let field = format!("routes[{i}]");
    crate::proxy::route::Pattern::parse(&r.path)
        .map_err(|e| ConfigError(format!("{field}.path: {e}")))?;
    let methods = match r.methods {
        None => vec![Method::POST],
        Some(m) if m.is_empty() => {
            return err(format!("{field}.methods: list at least one method"));
        }
        Some(m) => m
            .iter()
            .map(|s| {
                Method::from_bytes(s.to_ascii_uppercase().as_bytes())
                    .map_err(|_| ConfigError(format!("{field}.methods: invalid method {s:?}")))
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(RouteConfig {
        path: r.path,
        methods,
        upstream: match r.upstream {
            Some(u) => upstream(&format!("{field}.upstream"), &u)?,
            None => default.clone(),
        },
        forward_authorization: r.forward_authorization.unwrap_or(false),
        preserve_host: r.preserve_host.unwrap_or(false),
    })
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

fn header_name(field: &str, value: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(value.as_bytes())
        .map_err(|_| ConfigError(format!("{field}: invalid header name {value:?}")))
}

fn cache_size(
    field: &str,
    raw: Option<RawCacheSize>,
    capacity: u64,
    ttl: &str,
) -> Result<CacheSize, ConfigError> {
    let (c, t) = raw.map_or((None, None), |r| (r.capacity, r.ttl));
    let size = CacheSize {
        capacity: c.unwrap_or(capacity),
        ttl: duration(&format!("{field}.ttl"), t.as_deref(), ttl)?,
    };
    if size.ttl.is_zero() {
        return err(format!("{field}.ttl: must be more than 0"));
    }
    Ok(size)
}

fn duration(field: &str, value: Option<&str>, default: &str) -> Result<Duration, ConfigError> {
    let value = value.unwrap_or(default);
    parse_duration(value).ok_or_else(|| {
        ConfigError(format!(
            "{field}: expected a duration like 500ms, 5s, 2m or 1h, got {value:?}"
        ))
    })
}

/// `500ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(yaml, Path::new("/etc/keygate"))
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../config.example.yaml");
        let c = parse(text).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert!(matches!(c.store, StoreConfig::Embedded { .. }));
        assert_eq!(c.routes[0].path, DEFAULT_ROUTE);
    }

    #[test]
    fn empty_config_takes_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.upstream.authority, "127.0.0.1:3000");
        assert_eq!(c.cache.keys.ttl, Duration::from_secs(60));
        assert_eq!(c.cache.negative.ttl, Duration::from_secs(5));
        assert_eq!(c.limits.max_body_bytes, 1 << 20);
        assert_eq!(
            c.admin.token_file,
            Path::new("/etc/keygate/data/admin.token")
        );
        assert!(c.cors.is_some());
        assert_eq!(c.worker_policy, WorkerPolicy::Batch);
        assert_eq!(c.worker_cpu_affinity, WorkerAffinity::Auto);
        let off = parse("worker_cpu_affinity: none\n").unwrap();
        assert_eq!(off.worker_cpu_affinity, WorkerAffinity::Unpinned);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = parse("listen: \"127.0.0.1:1\"\nadmin:\n  listen: \"127.0.0.1:2\"\n  tokne: x\n")
            .unwrap_err()
            .0;
        assert!(e.contains("tokne"), "{e}");
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let e = parse("listen: \"127.0.0.1:1\"\nupstreem: x\n")
            .unwrap_err()
            .0;
        assert!(e.contains("upstreem") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn secrets_come_from_the_environment() {
        let env = |name: &str| (name == "ADMIN_TOKEN").then(|| "0123456789abcdef-token".to_owned());
        let base = Path::new("/");
        let c =
            Config::from_yaml_with_env("admin:\n  token: ${ADMIN_TOKEN}\n", base, &env).unwrap();
        assert_eq!(c.admin.token.as_deref(), Some("0123456789abcdef-token"));
        let e = Config::from_yaml_with_env("admin:\n  token: ${UNSET_VARIABLE}\n", base, &env)
            .unwrap_err()
            .0;
        assert!(e.contains("UNSET_VARIABLE"), "{e}");
    }

    #[test]
    fn bad_values_are_explained() {
        for (yaml, needle) in [
            ("listen: nowhere\n", "listen"),
            ("upstream: ftp://x\n", "upstream"),
            ("cache:\n  keys:\n    ttl: soon\n", "cache.keys.ttl"),
            (
                "store:\n  embedded: {}\n  redis: {url: \"redis://x:1\"}\n",
                "not both",
            ),
            ("routes:\n  - path: /no/capture\n", "routes[0].path"),
            ("log:\n  format: xml\n", "log.format"),
            ("headers:\n  user_id: \"bad header\"\n", "headers.user_id"),
            ("worker_policy: fifo\n", "worker_policy"),
            ("worker_cpu_affinity: 0-1\n", "worker_cpu_affinity"),
            ("listen: [1, 2]\n", "line 1"),
            ("usage:\n  flush_interval: 0s\n", "usage.flush_interval"),
            (
                "store:\n  redis: {url: \"rediss://x:1\"}\n",
                "not supported",
            ),
        ] {
            let e = parse(yaml).unwrap_err().0;
            assert!(e.contains(needle), "{yaml:?} gave {e}");
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let env = |_: &str| Some("s3cret-admin-token-0123".to_owned());
        let c = Config::from_yaml_with_env(
            "store:\n  redis:\n    url: \"redis://:hunter2@db:6379\"\nadmin:\n  token: ${T}\n",
            Path::new("/"),
            &env,
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
    }

    #[test]
    fn hardening_limits_have_defaults_and_are_checked() {
        let c = parse("").unwrap();
        assert_eq!(c.limits.send_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.max_header_bytes, 64 * 1024);
        assert_eq!(c.limits.max_connections, None);
        assert_eq!(c.limits.max_connections_per_ip, 0);
        assert_eq!(c.limits.h2_idle_timeout, Duration::from_secs(60));
        let names: Vec<&str> = c.headers.strip.iter().map(HeaderName::as_str).collect();
        assert_eq!(names, DEFAULT_STRIP);
        let none = parse("headers:\n  strip: []\n").unwrap();
        assert!(none.headers.strip.is_empty());
        for (yaml, needle) in [
            ("limits:\n  send_timeout: 0s\n", "limits.send_timeout"),
            (
                "limits:\n  max_header_bytes: 10\n",
                "limits.max_header_bytes",
            ),
            ("limits:\n  max_connections: 0\n", "limits.max_connections"),
            ("headers:\n  strip: [\"bad name\"]\n", "headers.strip"),
        ] {
            let e = parse(yaml).unwrap_err().0;
            assert!(e.contains(needle), "{yaml:?} gave {e}");
        }
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_field() {
        for (yaml, field) in [
            ("workers: \"two\"\n", "workers"),
            ("limits:\n  max_body_bytes: lots\n", "limits.max_body_bytes"),
            (
                "routes:\n  - path: /x/{workflow}\n    methods: POST\n",
                "routes[0].methods",
            ),
        ] {
            let e = parse(yaml).unwrap_err().0;
            assert!(e.starts_with(&format!("{field}: ")), "{yaml:?} gave {e}");
            assert!(e.contains("line"), "{e}");
        }
    }

    #[test]
    fn host_names_in_listen_resolve_or_ask_for_an_ip() {
        let c = parse("listen: \"localhost:8081\"\n").unwrap();
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.listen.port(), 8081);
        let e = parse("listen: \"no-such-host.invalid:8080\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("give an IP address"), "{e}");
        let e = parse("listen: \"localhost\"\n").unwrap_err().0;
        assert!(e.contains("expected an address"), "{e}");
    }

    #[test]
    fn paths_read_as_an_operator_would_write_them() {
        let c = Config::from_yaml(
            "store:\n  embedded:\n    path: ./data/./kg.redb\n",
            Path::new("./conf/."),
        )
        .unwrap();
        let StoreConfig::Embedded { path } = &c.store else {
            panic!()
        };
        assert_eq!(path, Path::new("./conf/data/kg.redb"));
        assert!(!c.admin.token_file.display().to_string().contains("/./"));
    }

    #[test]
    fn a_reload_tells_what_needs_a_restart_and_keeps_it() {
        let running = parse("").unwrap();
        let mut new = parse(
            "listen: \"127.0.0.1:9999\"\nshutdown_timeout: 5s\nlimits:\n  max_body_bytes: 10\n",
        )
        .unwrap();
        assert_eq!(running.needs_restart(&new), ["listen", "shutdown_timeout"]);
        new.keep_restart_only(&running);
        assert_eq!(new.listen, running.listen);
        assert_eq!(new.shutdown_timeout, running.shutdown_timeout);
        assert_eq!(new.limits.max_body_bytes, 10);
        assert!(running.needs_restart(&new).is_empty());
    }

    #[test]
    fn routes_fit_the_metrics_slots() {
        let many: String = (0..crate::metrics::ROUTE_SLOTS)
            .map(|i| format!("  - path: /r{i}/{{workflow}}\n"))
            .collect();
        let e = parse(&format!("routes:\n{many}")).unwrap_err().0;
        assert!(e.contains("at most"), "{e}");
    }

    #[test]
    fn upstream_without_port_gets_80() {
        assert_eq!(
            upstream("u", "http://engine").unwrap().authority,
            "engine:80"
        );
        assert_eq!(
            upstream("u", "http://[::1]:3000/").unwrap().authority,
            "[::1]:3000"
        );
    }
}
