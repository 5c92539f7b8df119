//! The upstream client: one pool per upstream per worker runtime, each a
//! stack of idle HTTP/1.1 connections (`hyper::client::conn::http1`).
//!
//! A connection goes back on the stack only when its response body has been
//! read to the end, and is dropped when the upstream has closed it. Open
//! connections per pool are bounded; at the bound a request waits for one
//! to come back (within the response timeout). A request
//! is retried on a fresh connection only when hyper hands it back unsent, so
//! a POST that may have reached the upstream is never sent twice.

use super::body::{LimitedBody, UpstreamResponseBody};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::Notify;

#[derive(Debug)]
pub enum ForwardError {
    /// Could not connect (refused, unreachable, name not found).
    Connect(std::io::Error),
    ConnectTimeout,
    /// The exchange failed after connecting.
    Exchange(hyper::Error),
}

impl std::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardError::Connect(e) => write!(f, "connect failed: {e}"),
            ForwardError::ConnectTimeout => f.write_str("connect timed out"),
            ForwardError::Exchange(e) => write!(f, "upstream exchange failed: {e}"),
        }
    }
}

struct PoolInner {
    authority: String,
    idle: Mutex<Vec<SendRequest<LimitedBody>>>,
    max_idle: usize,
    /// Connections open (idle or busy), at most `max_open`.
    open: AtomicUsize,
    max_open: usize,
    /// Signalled when a connection goes idle or closes.
    freed: Notify,
    connect_timeout: Duration,
}

/// One upstream's connections on one worker.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

/// A connection on loan to a response body; [`Checkin::release`] returns it.
pub struct Checkin {
    sender: SendRequest<LimitedBody>,
    pool: Arc<PoolInner>,
}

impl Checkin {
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.pool.max_idle {
            idle.push(self.sender);
            drop(idle);
            self.pool.freed.notify_one();
        }
    }
}

impl Pool {
    pub fn new(
        authority: String,
        max_idle: usize,
        max_open: usize,
        connect_timeout: Duration,
    ) -> Pool {
        Pool {
            inner: Arc::new(PoolInner {
                authority,
                idle: Mutex::new(Vec::new()),
                max_idle: max_idle.min(max_open),
                open: AtomicUsize::new(0),
                max_open: max_open.max(1),
                freed: Notify::new(),
                connect_timeout,
            }),
        }
    }

    /// Sends one request and returns the response head; the body streams.
    pub async fn send(
        &self,
        mut request: Request<LimitedBody>,
    ) -> Result<Response<UpstreamResponseBody>, ForwardError> {
        loop {
            let (mut sender, reused) = match self.checkout().await {
                Some(sender) => (sender, true),
                None if self.reserve() => (self.connect().await?, false),
                None => {
                    self.inner.freed.notified().await;
                    continue;
                }
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let checkin = Checkin {
                        sender,
                        pool: self.inner.clone(),
                    };
                    return Ok(Response::from_parts(
                        parts,
                        UpstreamResponseBody::new(body, checkin),
                    ));
                }
                Err(mut e) => match e.take_message() {
                    // The idle connection died before anything was written:
                    // safe to try again.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(ForwardError::Exchange(e.into_error())),
                },
            }
        }
    }

    async fn checkout(&self) -> Option<SendRequest<LimitedBody>> {
        loop {
            let mut sender = self
                .inner
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()?;
            if sender.is_closed() {
                continue;
            }
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// Claims room for one more connection, if the pool has any.
    fn reserve(&self) -> bool {
        self.inner
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.inner.max_open).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back a reserved place when its connection ends (or never began).
    fn closed(inner: &PoolInner) {
        inner.open.fetch_sub(1, Ordering::AcqRel);
        inner.freed.notify_one();
    }

    /// Opens a connection in a place already reserved.
    async fn connect(&self) -> Result<SendRequest<LimitedBody>, ForwardError> {
        let opened = self.open_connection().await;
        if opened.is_err() {
            Pool::closed(&self.inner);
        }
        opened
    }

    async fn open_connection(&self) -> Result<SendRequest<LimitedBody>, ForwardError> {
        let stream = tokio::time::timeout(
            self.inner.connect_timeout,
            TcpStream::connect(self.inner.authority.as_str()),
        )
        .await
        .map_err(|_| ForwardError::ConnectTimeout)?
        .map_err(ForwardError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ForwardError::Exchange)?;
        let inner = self.inner.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection closed with an error");
            }
            Pool::closed(&inner);
        });
        Ok(sender)
    }
}
