//! Configuration: YAML parsed from a string into the raw serde shape
//! ([`raw`]: unknown keys rejected with their name and line, a value of the
//! wrong type with its field), then checked section by section
//! ([`validate`]) into [`Config`], the type the rest of the crate uses.
//! Routes are parsed once, into patterns ([`route`]); the postgres store's
//! section, with its URL and the engine's table names, is [`postgres`].

mod postgres;
mod raw;
mod route;
mod validate;
mod vault;

pub use postgres::{
    EngineTables, KeysTable, PgTls, PostgresConfig, RootCerts, UsersTable, WorkflowsTable,
    database_url, is_identifier,
};
pub use route::{DEFAULT_ROUTE, Pattern, RouteConfig, is_dot_segment};
pub use validate::parse_duration;
pub use vault::{
    EgressConfig, MasterKey, MintToken, Part, Provider, ProviderUrl, SecretKey, Template,
    VaultConfig,
};

use http::HeaderName;
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
    /// CA certificates (PEM) trusted for `https://` upstreams besides the
    /// bundled web roots.
    pub upstream_ca_file: Option<PathBuf>,
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
    /// Integration credentials' master keys; `None`: no vault, no egress.
    pub vault: Option<VaultConfig>,
    /// Present exactly when `vault` is.
    pub egress: Option<EgressConfig>,
    pub keys: KeysConfig,
    pub audit: AuditConfig,
    pub ui: UiConfig,
}

/// The panel on the admin listener.
#[derive(Debug, Clone, Copy)]
pub struct UiConfig {
    /// A key unused this long (or never used, this long after its
    /// creation) is marked stale.
    pub stale_after: Duration,
}

/// Key policies: how long a rolled key may keep working, and how often
/// expired keys are swept from the store.
#[derive(Debug, Clone, Copy)]
pub struct KeysConfig {
    pub max_grace: Duration,
    pub sweep_interval: Duration,
}

/// The audit log of admin actions, kept in the store.
#[derive(Debug, Clone, Copy)]
pub struct AuditConfig {
    pub retention: Duration,
}

/// An HTTP/1.1 upstream, `http://host:port` or `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `host:port`, to connect to.
    pub authority: String,
    /// `https://`: TLS, the certificate checked for the host (SNI), against
    /// the web roots and `upstream_ca_file`.
    pub tls: bool,
}

impl Upstream {
    /// The host (without brackets), for SNI and the certificate.
    pub fn host(&self) -> &str {
        let host = self
            .authority
            .rsplit_once(':')
            .map_or(self.authority.as_str(), |(host, _)| host);
        host.trim_start_matches('[').trim_end_matches(']')
    }

    /// What `Host` says: the authority (less `:443` for `https://`, as
    /// certificates and virtual hosts expect).
    pub fn host_header(&self) -> &str {
        match self.tls {
            true => self
                .authority
                .strip_suffix(":443")
                .unwrap_or(&self.authority),
            false => &self.authority,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Embedded {
        path: PathBuf,
    },
    Redis(RedisConfig),
    /// Boxed: tokio-postgres's config is large, the others small.
    Postgres(Box<PostgresConfig>),
}

#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    pub nodes: RedisNodes,
    /// Prepended to every Redis key, so several deployments can share a server.
    pub prefix: String,
    /// Per-command timeout: a stalled Redis must turn into a 503, not a hang.
    pub timeout: Duration,
    /// CA certificates (PEM) trusted for `rediss://` besides the system's.
    pub ca_file: Option<PathBuf>,
    /// `rediss://` without checking the certificate (never the default).
    pub insecure: bool,
}

/// One Redis (`store.redis.url`) or a Redis Cluster's seed nodes
/// (`store.redis.cluster`), each `redis://` or `rediss://`.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisNodes {
    Single(String),
    Cluster(Vec<String>),
}

impl RedisNodes {
    /// Every URL given.
    pub fn urls(&self) -> &[String] {
        match self {
            RedisNodes::Single(url) => std::slice::from_ref(url),
            RedisNodes::Cluster(seeds) => seeds,
        }
    }

    pub fn tls(&self) -> bool {
        self.urls().iter().any(|u| u.starts_with("rediss://"))
    }
}

impl RedisConfig {
    /// A single node's config with the defaults, for tests and tools.
    pub fn single(url: impl Into<String>, timeout: Duration) -> RedisConfig {
        RedisConfig {
            nodes: RedisNodes::Single(url.into()),
            prefix: "keygate:".to_owned(),
            timeout,
            ca_file: None,
            insecure: false,
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// A token set in config (usually `${ENV_VAR}`); when absent the server
    /// creates `token_file` and the CLI reads it.
    pub token: Option<String>,
    pub token_file: PathBuf,
    /// How long a signed-in session of the panel (`/ui/`) lasts.
    pub ui_session_ttl: Duration,
}

/// Secrets stay out of `Debug` output, so a logged config leaks nothing.
impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = self
            .nodes
            .urls()
            .iter()
            .map(|url| match (url.split_once("://"), url.rsplit_once('@')) {
                (Some((scheme, _)), Some((_, host))) => format!("{scheme}://…@{host}"),
                _ => url.clone(),
            })
            .collect();
        f.debug_struct("RedisConfig")
            .field("nodes", &shown)
            .field("cluster", &matches!(self.nodes, RedisNodes::Cluster(_)))
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_file)
            .field("insecure", &self.insecure)
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
    /// Carries the run token a webhook call's steps present to egress.
    pub run_token: HeaderName,
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
    /// The longest any answer is cached while the store cannot tell keygate
    /// of changes made behind its back (a postgres store without its
    /// triggers): every TTL above is held to it then.
    pub ttl_without_notify: Duration,
}

impl CacheConfig {
    /// These TTLs, each held to at most `ceiling`.
    #[must_use]
    pub fn capped(&self, ceiling: Duration) -> CacheConfig {
        let cap = |size: CacheSize| CacheSize {
            ttl: size.ttl.min(ceiling),
            ..size
        };
        CacheConfig {
            keys: cap(self.keys),
            negative: cap(self.negative),
            owners: cap(self.owners),
            ..*self
        }
    }
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
        let raw = if text.trim().is_empty() {
            raw::Raw::default()
        } else {
            raw::parse(text)?
        };
        validate::config(raw, base, env)
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
            ("vault", self.vault != new.vault),
            ("egress", self.egress != new.egress),
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
        self.vault = running.vault.clone();
        self.egress = running.egress.clone();
    }
}

#[cfg(test)]
mod tests;
