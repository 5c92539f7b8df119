//! Process layout: the data plane runs one current-thread tokio runtime per
//! worker thread ([`workers`]), each accepting on its own `SO_REUSEPORT`
//! socket and keeping its own upstream pools, so a request never crosses
//! threads. The caller's runtime hosts the store connection, the admin API
//! and background tasks.
//!
//! Zero-downtime paths: `SIGHUP` reloads the config (routes, limits, cache
//! sizes, headers, certificates) in place, refusing an invalid one; and
//! `serve --takeover` starts a new binary beside a running one, joins its
//! listeners on purpose and tells it to drain ([`takeover`]). Without
//! `--takeover`, a listen address another process holds is an error.

mod connection;
mod listen;
mod takeover;
mod workers;

use crate::admin::{self, Admin};
use crate::auth::Auth;
use crate::config::{Config, PostgresConfig, StoreConfig};
use crate::egress::Egress;
use crate::invalidate::Invalidator;
use crate::metrics::Metrics;
use crate::proxy::{Gateway, Live};
use crate::store::Store;
use crate::store::embedded::EmbeddedStore;
use crate::store::postgres::PostgresStore;
use crate::store::redis::RedisStore;
use crate::usage::{Usage, UsageHandle};
use crate::vault::Credentials;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
pub use workers::Connections;

/// How to start.
#[derive(Debug, Default, Clone, Copy)]
pub struct Options {
    /// Join the listeners of the keygate already running with this config,
    /// then tell it to drain and stop (`serve --takeover`).
    pub takeover: bool,
}

/// A started gateway: its bound addresses and what it needs to reload and
/// to stop.
pub struct Running {
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub(crate) live: Arc<Live>,
    pub store: Arc<dyn Store>,
    /// The worker threads' kernel thread ids (Linux; empty elsewhere), to
    /// find them in `/proc` or `top -H`.
    pub worker_threads: Vec<u32>,
    pub connections: Arc<Connections>,
    /// The config in force, against which a reload is compared.
    config: Mutex<Config>,
    certs: Option<Arc<crate::tls::Certs>>,
    auth: Arc<Auth>,
    usage: Arc<Usage>,
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    workers: Vec<oneshot::Receiver<()>>,
    admin_task: tokio::task::JoinHandle<()>,
    usage_task: UsageHandle,
    shutdown_timeout: Duration,
    credentials: Option<Arc<Credentials>>,
    /// Where the egress listener took its address, with a vault.
    pub egress_addr: Option<SocketAddr>,
    egress_task: Option<tokio::task::JoinHandle<()>>,
}

/// Opens the store, binds both listeners and starts serving.
pub async fn start(config: Config) -> Result<Running, String> {
    start_with(config, Options::default()).await
}

/// [`start`], taking over from a running instance when asked.
pub async fn start_with(config: Config, options: Options) -> Result<Running, String> {
    let fd_limit = listen::raise_fd_limit();
    // A takeover finds the running instance first: nothing is bound yet if
    // there is none.
    let previous = match options.takeover {
        true => Some(takeover::find(&config).await?),
        false => None,
    };
    let sockets = listen::data_sockets(config.listen, config.workers, options.takeover)?;
    let listen_addr = sockets[0].local_addr().map_err(|e| e.to_string())?;
    // The running instance stops accepting and drains; this one's sockets
    // already take their share of new connections, which wait in the
    // backlog until its workers start.
    let handover = takeover::handover_deadline(&config);
    if let Some(previous) = &previous {
        previous.terminate()?;
    }
    let (store, shared) = open_store(&config, previous.as_ref().map(|_| handover)).await?;
    warn_if_unreachable(store.clone());
    let token = admin::server_token(config.admin.token.as_deref(), &config.admin.token_file)?;
    let admin_listener =
        listen::admin(config.admin.listen, previous.as_ref().map(|_| handover)).await?;
    let admin_addr = admin_listener.local_addr().map_err(|e| e.to_string())?;
    if !admin_addr.ip().is_loopback() && config.admin.token.is_none() {
        tracing::warn!(
            admin = %admin_addr,
            "the admin listener is not on loopback and admin.token is not set: /metrics, /healthz and /readyz are open to anyone who can reach it"
        );
    }

    let metrics = Arc::new(Metrics::with_shards(
        config.routes.iter().map(|r| r.path.clone()),
        config.workers + 1,
    ));
    let auth = Arc::new(Auth::new(store.clone(), &config.cache, metrics.clone()));
    let invalidator = Arc::new(match (&config.store, shared) {
        (_, Shared::Redis(store)) => Invalidator::redis(store, auth.clone()),
        (StoreConfig::Postgres(config), Shared::Postgres(store)) => {
            // Until the listener finds the engine's triggers, nothing tells
            // this instance of the engine's own changes.
            auth.set_notified(false);
            Invalidator::postgres(config, store, auth.clone())
        }
        _ => Invalidator::local(),
    });
    let credentials = match (&config.vault, &config.egress) {
        (Some(vault), Some(egress)) => Some(Arc::new(Credentials::new(vault, egress))),
        _ => None,
    };
    let usage = Arc::new(Usage::new(config.usage.max_pending, metrics.clone()));
    let gateway = Gateway::new(
        &config,
        auth.clone(),
        usage.clone(),
        metrics.clone(),
        credentials.clone(),
    )?;
    let live = Arc::new(Live::new(Arc::new(gateway)));
    let (tls, certs) = match &config.tls {
        Some(files) => {
            let (acceptor, certs) = crate::tls::acceptor(files)?;
            (Some(acceptor), Some(certs))
        }
        None => (None, None),
    };
    let connections = Arc::new(Connections::new(
        metrics.clone(),
        listen::default_max_connections(fd_limit),
    ));

    let (stop, stopped) = watch::channel(false);
    let admin = Arc::new(Admin::new(
        store.clone(),
        auth.clone(),
        metrics.clone(),
        invalidator,
        &token,
        credentials.clone(),
        crate::admin::AdminSettings::of(&config),
    ));
    tokio::spawn(sweep_expired_keys(admin.clone(), stopped.clone()));
    let admin_task = tokio::spawn(serve_admin(admin_listener, admin, stopped.clone()));
    let (egress_addr, egress_task) = match (&credentials, &config.egress) {
        (Some(credentials), Some(egress_config)) => {
            let egress = Egress::new(
                store.clone(),
                credentials.clone(),
                egress_config.connect_timeout,
                egress_config.response_timeout,
                &config.headers,
                metrics.clone(),
            )?;
            let listener = listen::control(
                "egress",
                egress_config.listen,
                previous.as_ref().map(|_| handover),
            )
            .await?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            let task = tokio::spawn(crate::egress::serve(
                listener,
                Arc::new(egress),
                config.limits,
                stopped.clone(),
            ));
            (Some(addr), Some(task))
        }
        _ => (None, None),
    };
    let usage_task = UsageHandle::spawn(usage.clone(), store.clone(), config.usage.flush_interval);
    let started = workers::spawn(&config, sockets, &live, tls, &connections, &stopped);
    let mut running = Running {
        listen_addr,
        admin_addr,
        live,
        store,
        worker_threads: Vec::new(),
        connections,
        config: Mutex::new(config),
        certs,
        auth,
        usage,
        metrics,
        stop,
        workers: Vec::new(),
        admin_task,
        usage_task,
        shutdown_timeout: Duration::ZERO,
        credentials,
        egress_addr,
        egress_task,
    };
    running.shutdown_timeout = running.config().shutdown_timeout;
    let started = started.wait(&mut running.workers).await;
    let started = match started {
        Ok(started) => started,
        Err(e) => {
            running.shutdown().await;
            return Err(e);
        }
    };
    running.worker_threads = started.threads;
    let config = running.config();
    tracing::info!(
        listen = %listen_addr,
        admin = %admin_addr,
        workers = running.workers.len(),
        pinned_to_cpus = started.pinned,
        max_connections = config
            .limits
            .max_connections
            .unwrap_or(running.connections.default_max()),
        store = running.store.kind(),
        egress = running.egress_addr.map(|a| a.to_string()).as_deref().unwrap_or("off"),
        tls = config.tls.is_some(),
        took_over = previous.is_some(),
        "keygate serving"
    );
    Ok(running)
}

/// A store several instances share, which invalidations go through.
enum Shared {
    None,
    Redis(Arc<RedisStore>),
    Postgres(Arc<PostgresStore>),
}

/// The configured store (and, for Redis and postgres, the store itself,
/// which the invalidations are published through). After a takeover the
/// previous instance may still hold an embedded store's file while it
/// drains: it is tried again until `wait` has passed.
async fn open_store(
    config: &Config,
    wait: Option<Duration>,
) -> Result<(Arc<dyn Store>, Shared), String> {
    let store: Arc<dyn Store> = match &config.store {
        StoreConfig::Embedded { path } => {
            let until = tokio::time::Instant::now() + wait.unwrap_or_default();
            loop {
                match EmbeddedStore::open(path) {
                    Ok(store) => break Arc::new(store),
                    Err(e) if wait.is_some() && tokio::time::Instant::now() < until => {
                        tracing::debug!(error = %e, "waiting for the previous instance to release the store");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        StoreConfig::Redis(redis) => {
            let store = Arc::new(RedisStore::connect(redis).map_err(|e| e.to_string())?);
            tokio::spawn(migrate_redis(store.clone()));
            return Ok((store.clone(), Shared::Redis(store)));
        }
        StoreConfig::Postgres(postgres) => {
            check_engine_schema(postgres, config.vault.is_some()).await?;
            let store = Arc::new(PostgresStore::connect(postgres).map_err(|e| e.to_string())?);
            return Ok((store.clone(), Shared::Postgres(store)));
        }
    };
    Ok((store, Shared::None))
}

/// Moves a Redis store written in the old single-key layout over, trying
/// again while Redis cannot be reached.
async fn migrate_redis(store: Arc<RedisStore>) {
    let mut wait = Duration::from_millis(100);
    loop {
        match store.migrate().await {
            Ok((0, 0)) => return,
            Ok((times, owners)) => {
                tracing::info!(
                    last_used = times,
                    owners,
                    "redis store moved to the per-key layout"
                );
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "redis layout check postponed");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Revokes expired keys every `keys.sweep_interval` until the stop.
async fn sweep_expired_keys(admin: Arc<Admin>, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(admin.sweep_interval()) => admin.sweep_expired().await,
            _ = stopped.changed() => return,
        }
    }
}

/// Refuses to start when the engine's tables lack a column the config
/// names, or (with a vault) keygate's integrations table is missing. A
/// database that cannot be reached now is not an error: the gateway starts
/// not ready, as with Redis.
async fn check_engine_schema(config: &PostgresConfig, vault: bool) -> Result<(), String> {
    let client = match crate::store::postgres::open_driven(config).await {
        Ok(client) => client,
        Err(e) => {
            tracing::debug!(error = %e, "engine schema not checked");
            return Ok(());
        }
    };
    if vault
        && let Ok(false) =
            crate::store::postgres::prepare::integrations_table_exists(&client, config).await
    {
        return Err(
            "store.postgres: the vault keeps integrations in keygate_integrations, which this database lacks; run `keygate store prepare`"
                .to_owned(),
        );
    }
    match crate::store::postgres::schema::check(&client, config).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(problems)) => Err(problems),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the engine's schema");
            Ok(())
        }
    }
}

/// Logs a warning as soon as the store turns out to be unreachable at start
/// (the gateway still starts: `/readyz` says not ready, and cached-nothing
/// requests get 503 until it answers).
fn warn_if_unreachable(store: Arc<dyn Store>) {
    tokio::spawn(async move {
        if let Err(e) = store.ping().await {
            tracing::warn!(store = store.kind(), error = %e, "the store is unreachable at start; uncached requests get 503 until it answers");
        }
    });
}

/// What a reload did not apply: settings that need a restart.
#[derive(Debug, Default)]
pub struct Reloaded {
    pub needs_restart: Vec<&'static str>,
}

impl Running {
    /// The config in force.
    pub fn config(&self) -> Config {
        self.config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `new` in force for every request that starts from now on: the
    /// routes, limits, cache sizes and TTLs, header names, CORS, rate limits
    /// and the TLS certificate. An error leaves the config in force as it
    /// was. Settings that cannot change without a restart are kept as they
    /// were and named in the answer.
    pub fn reload(&self, new: Config) -> Result<Reloaded, String> {
        let mut current = self
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let needs_restart = current.needs_restart(&new);
        // Builds everything that can fail before anything changes; new
        // routes take free metrics slots.
        let gateway = Gateway::new(
            &new,
            self.auth.clone(),
            self.usage.clone(),
            self.metrics.clone(),
            self.credentials.clone(),
        )?;
        if let (Some(certs), Some(files)) = (&self.certs, &new.tls) {
            certs.reload(files)?;
        }
        self.auth.resize(&new.cache);
        self.live.replace(Arc::new(gateway));
        // What needs a restart stays as it runs now.
        let mut kept = new;
        kept.keep_restart_only(&current);
        *current = kept;
        Ok(Reloaded { needs_restart })
    }

    /// Graceful stop: stop accepting, let in-flight requests finish within
    /// the shutdown timeout, then write pending `lastUsedAt` times. Returns
    /// how many keys' last-used times could not be written.
    pub async fn shutdown(self) -> usize {
        let _ = self.stop.send(true);
        for worker in self.workers {
            let _ = worker.await;
        }
        let _ = self.admin_task.await;
        if let Some(egress) = self.egress_task {
            let _ = egress.await;
        }
        let left = self.usage_task.shutdown(self.shutdown_timeout).await;
        tracing::info!("keygate stopped");
        left
    }
}

/// Reads the config again and puts it in force, logging what happened.
fn reload_from(running: &Running, path: Option<&Path>) {
    let loaded = match path {
        Some(path) => Config::load(path),
        None => Config::from_yaml("", Path::new(".")),
    };
    let config = match loaded {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: the new config is invalid; the old one stays");
            return;
        }
    };
    match running.reload(config) {
        Ok(reloaded) if reloaded.needs_restart.is_empty() => {
            tracing::info!("config reloaded");
        }
        Ok(reloaded) => tracing::warn!(
            needs_restart = %reloaded.needs_restart.join(", "),
            "config reloaded; these settings changed but take effect only after a restart"
        ),
        Err(e) => {
            tracing::error!(error = %e, "reload refused; the old config stays");
        }
    }
}

/// Runs until SIGTERM or SIGINT, then stops gracefully; a second signal
/// during the graceful stop ends it at once. SIGHUP reloads the config
/// from `path` (the built-in defaults when `None`).
pub async fn run(config: Config, path: Option<PathBuf>, options: Options) -> Result<(), String> {
    let running = start_with(config, options).await?;
    let mut signals = Signals::new()?;
    loop {
        match signals.next().await {
            Signal::Stop => break,
            Signal::Reload => reload_from(&running, path.as_deref()),
        }
    }
    tracing::info!("shutting down");
    tokio::select! {
        left = running.shutdown() => match left {
            0 => Ok(()),
            left => Err(format!("{left} lastUsedAt updates could not be written")),
        },
        _ = signals.stop() => Err("second signal: stopped without waiting for in-flight requests".into()),
    }
}

enum Signal {
    Stop,
    Reload,
}

/// SIGTERM and SIGINT (stop), SIGHUP (reload).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, String> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind| signal(kind).map_err(|e| format!("cannot listen for signals: {e}"));
            Ok(Signals {
                term: listen(SignalKind::terminate())?,
                hup: listen(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => Signal::Stop,
            _ = self.term.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Stop
        }
    }

    async fn stop(&mut self) {
        loop {
            if let Signal::Stop = self.next().await {
                return;
            }
        }
    }
}

async fn serve_admin(listener: TcpListener, admin: Arc<Admin>, mut stopped: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    loop {
        let Some((stream, peer)) = listen::accept(&listener, &mut stopped).await else {
            break;
        };
        let admin = admin.clone();
        let service = service_fn(move |request| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(admin.handle(request, peer).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .serve_connection(TokioIo::new(stream), service);
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = watched.await;
        });
    }
    // The port is free for a successor from here on.
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}
