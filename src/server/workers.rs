//! The data-plane worker threads: each runs a current-thread runtime that
//! accepts on its own listener socket, admits connections within the
//! connection limits, and serves them until the gateway stops.

use super::connection::Connection;
use super::listen;
use crate::config::{Config, WorkerAffinity, WorkerPolicy};
use crate::metrics::Metrics;
use crate::proxy::{ConnInfo, Live, WorkerGateway};
use dashmap::DashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::TlsAcceptor;

/// Client connections open, in all and per address, against
/// `limits.max_connections` and `limits.max_connections_per_ip`.
pub struct Connections {
    metrics: Arc<Metrics>,
    /// Open connections per client address (IPv6 by /64), kept only while
    /// a per-address limit is set.
    per_ip: DashMap<IpAddr, usize>,
    default_max: usize,
    /// Refusals not yet logged, and when the last log line was written
    /// (uptime ms): refusals are logged once a minute, not one by one.
    unlogged: AtomicU64,
    logged_at: AtomicU64,
}

/// An admitted connection; dropping it gives its place back.
pub struct Admitted {
    connections: Arc<Connections>,
    ip: Option<IpAddr>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let c = &self.connections;
        c.metrics.connections.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            c.per_ip.remove_if_mut(&ip, |_, n| {
                *n -= 1;
                *n == 0
            });
        }
    }
}

const REFUSAL_LOG_EVERY_MS: u64 = 60_000;

impl Connections {
    pub fn new(metrics: Arc<Metrics>, default_max: usize) -> Connections {
        Connections {
            metrics,
            per_ip: DashMap::new(),
            default_max,
            unlogged: AtomicU64::new(0),
            logged_at: AtomicU64::new(0),
        }
    }

    /// `limits.max_connections` when it is not set.
    pub fn default_max(&self) -> usize {
        self.default_max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        usize::try_from(self.metrics.connections.open.load(Ordering::Acquire)).unwrap_or(0)
    }

    /// A place for a new connection from `ip`, or `None` when a limit is
    /// reached (the refusal is counted, and logged at most once a minute).
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        max: Option<usize>,
        per_ip: usize,
    ) -> Option<Admitted> {
        let max = max.unwrap_or(self.default_max) as u64;
        let open = &self.metrics.connections.open;
        if open.fetch_add(1, Ordering::AcqRel) >= max {
            open.fetch_sub(1, Ordering::AcqRel);
            self.refused("limits.max_connections", ip);
            return None;
        }
        let mut admitted = Admitted {
            connections: self.clone(),
            ip: None,
        };
        if per_ip > 0 {
            let client = crate::proxy::limiter::client(ip);
            let mut count = self.per_ip.entry(client).or_insert(0);
            if *count >= per_ip {
                drop(count);
                drop(admitted);
                self.refused("limits.max_connections_per_ip", ip);
                return None;
            }
            *count += 1;
            admitted.ip = Some(client);
        }
        Some(admitted)
    }

    fn refused(&self, limit: &'static str, ip: IpAddr) {
        self.metrics
            .connections
            .refused
            .fetch_add(1, Ordering::Relaxed);
        self.unlogged.fetch_add(1, Ordering::Relaxed);
        let now = crate::clock::uptime_ms();
        let last = self.logged_at.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= REFUSAL_LOG_EVERY_MS;
        if due
            && self
                .logged_at
                .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            let refused = self.unlogged.swap(0, Ordering::AcqRel);
            tracing::warn!(
                refused,
                limit,
                last_peer = %ip,
                open = self.open(),
                "refusing connections over the connection limit (logged once a minute)"
            );
        }
    }
}

/// What a started worker reports: its thread id, and whether it keeps to
/// a CPU of its own.
type Report = Result<(Option<u32>, bool), String>;

/// Worker threads being started; see [`Starting::wait`].
pub struct Starting {
    ready: Vec<oneshot::Receiver<Report>>,
    finished: Vec<oneshot::Receiver<()>>,
    failed: Option<String>,
}

/// What the started workers reported.
pub struct Started {
    /// Their kernel thread ids.
    pub threads: Vec<u32>,
    /// How many keep to a CPU of their own.
    pub pinned: usize,
}

impl Starting {
    /// Waits until every worker runs; hands each one's "finished" receiver
    /// to `finished` either way, so a failed start can stop the others.
    pub async fn wait(self, finished: &mut Vec<oneshot::Receiver<()>>) -> Result<Started, String> {
        finished.extend(self.finished);
        let mut failed = self.failed;
        let mut started = Started {
            threads: Vec::new(),
            pinned: 0,
        };
        for ready in self.ready {
            let report = ready
                .await
                .unwrap_or_else(|_| Err("a worker thread died while starting".to_string()));
            match report {
                Ok((id, on_own_cpu)) => {
                    started.threads.extend(id);
                    started.pinned += usize::from(on_own_cpu);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(started),
        }
    }
}

/// Starts one worker thread per socket. "Serving" means every worker is
/// named, scheduled, listening and running; see [`Starting::wait`].
pub fn spawn(
    config: &Config,
    sockets: Vec<std::net::TcpListener>,
    live: &Arc<Live>,
    tls: Option<TlsAcceptor>,
    connections: &Arc<Connections>,
    stopped: &watch::Receiver<bool>,
) -> Starting {
    let cpus = match config.worker_cpu_affinity {
        WorkerAffinity::Auto => crate::sched::allowed_cpus().and_then(|allowed| {
            crate::sched::one_per_cpu(sockets.len(), &allowed).map(<[usize]>::to_vec)
        }),
        WorkerAffinity::Unpinned => None,
    };
    let mut starting = Starting {
        ready: Vec::with_capacity(sockets.len()),
        finished: Vec::with_capacity(sockets.len()),
        failed: None,
    };
    for (i, socket) in sockets.into_iter().enumerate() {
        let cpu = cpus.as_ref().map(|cpus| cpus[i]);
        let (done, finished) = oneshot::channel();
        let (started, ready) = oneshot::channel::<Report>();
        let worker = Worker {
            live: live.clone(),
            tls: tls.clone(),
            connections: connections.clone(),
            stopped: stopped.clone(),
            shutdown_timeout: config.shutdown_timeout,
        };
        let policy = config.worker_policy;
        let spawned = std::thread::Builder::new()
            .name(format!("keygate-worker-{i}"))
            .spawn(move || {
                crate::metrics::set_thread_shard(i + 1);
                if policy == WorkerPolicy::Batch
                    && let Err(e) = crate::sched::batch_this_thread()
                {
                    tracing::warn!(error = %e, "cannot set SCHED_BATCH; workers keep the default policy");
                }
                let pinned = match cpu.map(crate::sched::pin_this_thread) {
                    Some(Ok(())) => true,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, cpu, "cannot keep a worker to its CPU; the kernel places it");
                        false
                    }
                    None => false,
                };
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = started.send(Err(format!("cannot start a worker runtime: {e}")));
                        return;
                    }
                };
                let listener = {
                    let _inside = runtime.enter();
                    TcpListener::from_std(socket)
                };
                let listener = match listener {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = started.send(Err(format!("cannot register listener: {e}")));
                        return;
                    }
                };
                let _ = started.send(Ok((crate::sched::thread_id(), pinned)));
                runtime.block_on(worker.run(listener));
                let _ = done.send(());
            });
        match spawned {
            Ok(_) => {
                starting.finished.push(finished);
                starting.ready.push(ready);
            }
            Err(e) => {
                starting.failed = Some(format!("cannot start worker thread: {e}"));
                break;
            }
        }
    }
    starting
}

/// What one worker thread serves with.
struct Worker {
    live: Arc<Live>,
    tls: Option<TlsAcceptor>,
    connections: Arc<Connections>,
    stopped: watch::Receiver<bool>,
    shutdown_timeout: Duration,
}

impl Worker {
    async fn run(mut self, listener: TcpListener) {
        let gateway = Arc::new(WorkerGateway::new(self.live.clone()));
        // Connections wait on this worker's own stop signal, so waiting
        // costs no lock shared with other threads.
        let (stop_local, stopped_local) = watch::channel(false);
        // Each connection holds a sender; all dropped means all done.
        let (open, mut all_done) = mpsc::channel::<()>(1);
        let serve = |stream: tokio::net::TcpStream, peer: std::net::SocketAddr| {
            let limits = gateway.snapshot().gateway.limits;
            let Some(admitted) = self.connections.admit(
                peer.ip(),
                limits.max_connections,
                limits.max_connections_per_ip,
            ) else {
                return;
            };
            let _ = stream.set_nodelay(true);
            let connection = Connection {
                gateway: gateway.clone(),
                info: ConnInfo::new(peer, self.tls.is_some()),
                stopped: stopped_local.clone(),
                _guards: (admitted, open.clone()),
            };
            match self.tls.clone() {
                None => tokio::spawn(connection.serve(stream)),
                Some(acceptor) => tokio::spawn(Box::pin(connection.serve_tls(stream, acceptor))),
            };
        };
        while let Some((stream, peer)) = listen::accept(&listener, &mut self.stopped).await {
            serve(stream, peer);
        }
        // Connections the kernel accepted for this socket but nobody took
        // yet would be reset when it closes: take them first.
        while let Some((stream, peer)) = listen::accept_ready(&listener) {
            serve(stream, peer);
        }
        drop(listener);
        let _ = stop_local.send(true);
        drop(open);
        if tokio::time::timeout(self.shutdown_timeout, all_done.recv())
            .await
            .is_err()
        {
            tracing::warn!("shutdown deadline passed with requests still in flight");
        }
    }
}
