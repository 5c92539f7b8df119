//! Process layout: the data plane runs one current-thread tokio runtime per
//! worker thread, each accepting on its own `SO_REUSEPORT` socket and keeping
//! its own upstream pool, so a request never crosses threads. The caller's
//! runtime hosts the store connection, the admin API and background tasks.

use crate::admin::{self, Admin};
use crate::auth::Auth;
use crate::config::{Config, StoreConfig, WorkerAffinity, WorkerPolicy};
use crate::invalidate::Invalidator;
use crate::metrics::Metrics;
use crate::proxy::{ConnInfo, Forwarder, Gateway};
use crate::store::Store;
use crate::store::embedded::EmbeddedStore;
use crate::store::redis::RedisStore;
use crate::usage::{Usage, UsageHandle};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsAcceptor;

/// A started gateway: its bound addresses and what it needs to stop.
pub struct Running {
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    pub store: Arc<dyn Store>,
    /// The worker threads' kernel thread ids (Linux; empty elsewhere), to
    /// find them in `/proc` or `top -H`.
    pub worker_threads: Vec<u32>,
    stop: watch::Sender<bool>,
    workers: Vec<oneshot::Receiver<()>>,
    admin_task: tokio::task::JoinHandle<()>,
    usage_task: UsageHandle,
    shutdown_timeout: Duration,
}

/// Opens the store, binds both listeners and starts serving.
pub async fn start(config: Config) -> Result<Running, String> {
    let store: Arc<dyn Store> = match &config.store {
        StoreConfig::Embedded { path } => {
            Arc::new(EmbeddedStore::open(path).map_err(|e| e.to_string())?)
        }
        StoreConfig::Redis(redis) => {
            Arc::new(RedisStore::connect(redis).map_err(|e| e.to_string())?)
        }
    };
    let token = admin::server_token(config.admin.token.as_deref(), &config.admin.token_file)?;

    let metrics = Arc::new(Metrics::with_shards(
        config.routes.iter().map(|r| r.path.clone()),
        config.workers + 1,
    ));
    let auth = Arc::new(Auth::new(store.clone(), &config.cache, metrics.clone()));
    let invalidator = Arc::new(match &config.store {
        StoreConfig::Redis(redis) => Invalidator::redis(redis, auth.clone())?,
        StoreConfig::Embedded { .. } => Invalidator::local(),
    });
    let usage = Arc::new(Usage::new(config.usage.max_pending, metrics.clone()));
    let gateway = Arc::new(Gateway::new(
        &config,
        auth.clone(),
        usage.clone(),
        metrics.clone(),
    )?);
    let tls = match &config.tls {
        Some(files) => Some(crate::tls::acceptor(files)?),
        None => None,
    };

    let admin_listener = TcpListener::bind(config.admin.listen).await.map_err(|e| {
        format!(
            "cannot listen on admin address {}: {e}",
            config.admin.listen
        )
    })?;
    let admin_addr = admin_listener.local_addr().map_err(|e| e.to_string())?;
    let sockets = bind_reuseport(config.listen, config.workers)?;
    let listen_addr = sockets[0].local_addr().map_err(|e| e.to_string())?;

    let (stop, stopped) = watch::channel(false);
    let admin = Arc::new(Admin::new(
        store.clone(),
        auth,
        metrics,
        invalidator,
        &token,
    ));
    let admin_task = tokio::spawn(serve_admin(admin_listener, admin, stopped.clone()));
    let usage_task = UsageHandle::spawn(usage, store.clone(), config.usage.flush_interval);

    let mut running = Running {
        listen_addr,
        admin_addr,
        gateway: gateway.clone(),
        store: store.clone(),
        worker_threads: Vec::with_capacity(sockets.len()),
        stop,
        workers: Vec::with_capacity(sockets.len()),
        admin_task,
        usage_task,
        shutdown_timeout: config.shutdown_timeout,
    };
    let cpus = match config.worker_cpu_affinity {
        WorkerAffinity::Auto => crate::sched::allowed_cpus().and_then(|allowed| {
            crate::sched::one_per_cpu(sockets.len(), &allowed).map(<[usize]>::to_vec)
        }),
        WorkerAffinity::Unpinned => None,
    };
    let mut starting = Vec::with_capacity(sockets.len());
    let mut failed = None;
    for (i, socket) in sockets.into_iter().enumerate() {
        let cpu = cpus.as_ref().map(|cpus| cpus[i]);
        let (done, finished) = oneshot::channel();
        // A started worker reports its thread id and whether it keeps to
        // its CPU.
        let (started, ready) = oneshot::channel::<Result<(Option<u32>, bool), String>>();
        let gateway = gateway.clone();
        let tls = tls.clone();
        let stopped = stopped.clone();
        let header_timeout = config.limits.header_read_timeout;
        let policy = config.worker_policy;
        let shutdown_timeout = config.shutdown_timeout;
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
                runtime.block_on(worker(
                    listener,
                    gateway,
                    tls,
                    stopped,
                    header_timeout,
                    shutdown_timeout,
                ));
                let _ = done.send(());
            });
        match spawned {
            Ok(_) => {
                running.workers.push(finished);
                starting.push(ready);
            }
            Err(e) => {
                failed = Some(format!("cannot start worker thread: {e}"));
                break;
            }
        }
    }
    // "Serving" means every worker is named, scheduled, listening and
    // running. When one cannot start, everything started stops again.
    let mut pinned = 0;
    for ready in starting {
        let started = ready
            .await
            .unwrap_or_else(|_| Err("a worker thread died while starting".to_string()));
        match started {
            Ok((id, on_own_cpu)) => {
                running.worker_threads.extend(id);
                pinned += usize::from(on_own_cpu);
            }
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failed {
        running.shutdown().await;
        return Err(e);
    }
    tracing::info!(
        listen = %listen_addr,
        admin = %admin_addr,
        workers = running.workers.len(),
        pinned_to_cpus = pinned,
        store = running.store.kind(),
        tls = config.tls.is_some(),
        "keygate serving"
    );
    Ok(running)
}

impl Running {
    /// Graceful stop: stop accepting, let in-flight requests finish within
    /// the shutdown timeout, then write pending `lastUsedAt` times. Returns
    /// how many keys' last-used times could not be written.
    pub async fn shutdown(self) -> usize {
        let _ = self.stop.send(true);
        for worker in self.workers {
            let _ = worker.await;
        }
        let _ = self.admin_task.await;
        let left = self
            .usage_task
            .shutdown(
                &self.gateway.usage,
                self.store.as_ref(),
                self.shutdown_timeout,
            )
            .await;
        tracing::info!("keygate stopped");
        left
    }
}

/// Runs until `signal()` resolves, then stops gracefully; a second signal
/// during the graceful stop ends it at once.
pub async fn run<F>(config: Config, signal: impl Fn() -> F) -> Result<(), String>
where
    F: Future<Output = ()>,
{
    let running = start(config).await?;
    signal().await;
    tracing::info!("shutting down");
    tokio::select! {
        left = running.shutdown() => match left {
            0 => Ok(()),
            left => Err(format!("{left} lastUsedAt updates could not be written")),
        },
        () = signal() => Err("second signal: stopped without waiting for in-flight requests".into()),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// `n` sockets on one address with `SO_REUSEPORT`, so the kernel spreads
/// connections across workers. Port 0 is resolved by the first bind.
fn bind_reuseport(addr: SocketAddr, n: usize) -> Result<Vec<std::net::TcpListener>, String> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    let mut bound = addr;
    for _ in 0..n.max(1) {
        let socket = Socket::new(
            Domain::for_address(bound),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .map_err(|e| format!("cannot create socket: {e}"))?;
        socket
            .set_reuse_address(true)
            .and_then(|()| socket.set_reuse_port(true))
            .and_then(|()| socket.set_tcp_nodelay(true))
            .and_then(|()| socket.set_nonblocking(true))
            .map_err(|e| format!("cannot configure socket: {e}"))?;
        socket
            .bind(&bound.into())
            .and_then(|()| socket.listen(1024))
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let listener: std::net::TcpListener = socket.into();
        if out.is_empty() {
            bound = listener.local_addr().map_err(|e| e.to_string())?;
        }
        out.push(listener);
    }
    Ok(out)
}

async fn worker(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    tls: Option<TlsAcceptor>,
    mut stopped: watch::Receiver<bool>,
    header_timeout: Duration,
    shutdown_timeout: Duration,
) {
    let forwarder = Arc::new(gateway.forwarder());
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    // HTTP/2 peers that vanish are found by PING; one connection may not
    // hold more than a bounded number of requests at once.
    h2.timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256);
    let h2 = Arc::new(h2);
    let graceful = GracefulShutdown::new();
    // Connections wait on this worker's own stop signal, so waiting costs
    // no lock shared with other threads.
    let (stop_local, stopped_local) = watch::channel(false);
    // Each HTTP/1.1 connection holds a sender; all dropped means all done.
    let (h1_open, mut h1_done) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let Some((stream, peer)) = accept(&listener, &mut stopped).await else {
            break;
        };
        let _ = stream.set_nodelay(true);
        let peer_ip = http::HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"));
        let info = ConnInfo {
            peer,
            peer_ip,
            tls: tls.is_some(),
        };
        let connection = Connection {
            gateway: gateway.clone(),
            forwarder: forwarder.clone(),
            info,
            h2: h2.clone(),
            stopped: stopped_local.clone(),
            header_timeout,
        };
        let watcher = graceful.watcher();
        let open = h1_open.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => connection.serve(stream, false, watcher, open).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(header_timeout, acceptor.accept(stream)).await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            connection.serve(stream, h2, watcher, open).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stop_local.send(true);
    drop(h1_open);
    let drained = async {
        graceful.shutdown().await;
        let _ = h1_done.recv().await;
    };
    if tokio::time::timeout(shutdown_timeout, drained)
        .await
        .is_err()
    {
        tracing::warn!("shutdown deadline passed with requests still in flight");
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One accepted connection and what serving it needs.
struct Connection {
    gateway: Arc<Gateway>,
    forwarder: Arc<Forwarder>,
    info: ConnInfo,
    h2: Arc<hyper::server::conn::http2::Builder<TokioExecutor>>,
    stopped: watch::Receiver<bool>,
    header_timeout: Duration,
}

impl Connection {
    /// Serves HTTP/2 when ALPN chose it or the client opens with its
    /// preface (prior knowledge), else HTTP/1.1.
    async fn serve<IO>(
        self,
        mut io: IO,
        alpn_h2: bool,
        watcher: hyper_util::server::graceful::Watcher,
        open: tokio::sync::mpsc::Sender<()>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut buf = bytes::BytesMut::with_capacity(8 * 1024);
        let h2 = alpn_h2 || {
            let sniffed = tokio::time::timeout(self.header_timeout, async {
                while buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&buf) {
                    if io.read_buf(&mut buf).await? == 0 {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(sniffed, Ok(Ok(()))) || buf.is_empty() {
                return;
            }
            buf.starts_with(H2_PREFACE)
        };
        if !h2 {
            crate::proxy::h1::serve(
                &self.gateway,
                &self.forwarder,
                &self.info,
                io,
                buf,
                self.stopped,
                self.header_timeout,
            )
            .await;
            drop(open);
            return;
        }
        drop(open);
        let Connection {
            gateway,
            forwarder,
            info,
            h2,
            ..
        } = self;
        let peer = info.peer;
        let service = service_fn(move |request| {
            let gateway = gateway.clone();
            let forwarder = forwarder.clone();
            let info = info.clone();
            async move { Ok::<_, Infallible>(gateway.handle(&forwarder, &info, request).await) }
        });
        let io = Prefixed {
            prefix: buf.freeze(),
            io,
        };
        let connection = h2.serve_connection(TokioIo::new(io), service);
        if let Err(e) = watcher.watch(connection).await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// A stream whose first bytes were already read: they are read again first.
struct Prefixed<IO> {
    prefix: bytes::Bytes,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.prefix.is_empty() {
            return std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix.split_to(n));
        std::task::Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The next connection, or `None` once shutdown has begun. Accept errors
/// (out of file descriptors and the like) back off briefly and retry.
async fn accept(
    listener: &TcpListener,
    stopped: &mut watch::Receiver<bool>,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => return Some(a),
                Err(e) => {
                    tracing::warn!(error = %e, local = ?listener.local_addr().ok(), "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped.changed() => return None,
        }
    }
}

async fn serve_admin(listener: TcpListener, admin: Arc<Admin>, mut stopped: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    loop {
        let Some((stream, _)) = accept(&listener, &mut stopped).await else {
            break;
        };
        let admin = admin.clone();
        let service = service_fn(move |request| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(admin.handle(request).await) }
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
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}
