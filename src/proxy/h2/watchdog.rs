//! Bounds hyper leaves to its user, per stream and per connection: a
//! stream whose client takes none of its answer for `send_timeout` is
//! reset ([`StreamExec`] runs each stream under a watchdog that sees when
//! hyper last asked the body for data), and a connection's open streams
//! are counted, so one with none for `h2_idle_timeout` can be closed.

use super::body::ProxyBody;
use crate::clock::uptime_ms;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;

tokio::task_local! {
    /// The progress of the stream whose task this is (see [`StreamExec`]).
    pub(super) static STREAM: Arc<Progress>;
}

/// When hyper last handed a stream's answer data it has not yet asked
/// past: milliseconds since `start` + 1, or 0 while hyper is asking for
/// more (or the answer has not started).
pub struct Progress {
    start: tokio::time::Instant,
    handed: AtomicU64,
    wake: Notify,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            start: tokio::time::Instant::now(),
            handed: AtomicU64::new(0),
            wake: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The client has something of the answer to take.
    pub(super) fn handed(&self) {
        self.handed.store(self.now() + 1, Ordering::Release);
        self.wake.notify_one();
    }

    /// hyper asks for more: the client took what it had.
    fn asked(&self) {
        self.handed.store(0, Ordering::Release);
    }

    /// Resolves once something was handed and not asked past for `timeout`.
    async fn stalled(&self, timeout: Duration) {
        let timeout = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            let handed = self.handed.load(Ordering::Acquire);
            if handed == 0 {
                self.wake.notified().await;
                continue;
            }
            let due = (handed - 1).saturating_add(timeout);
            let now = self.now();
            if now >= due {
                if self.handed.load(Ordering::Acquire) == handed {
                    return;
                }
                continue;
            }
            tokio::time::sleep(Duration::from_millis(due - now)).await;
        }
    }
}

/// Spawns hyper's per-stream tasks, each under a watchdog: a stream that
/// holds an answer its client takes none of for `send_timeout` is dropped,
/// which resets it (RST_STREAM CANCEL) and drops its upstream connection.
#[derive(Clone)]
pub struct StreamExec {
    pub(super) send_timeout: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        let progress = Arc::new(Progress::new());
        let timeout = self.send_timeout;
        tokio::spawn(STREAM.scope(progress.clone(), async move {
            tokio::select! {
                biased;
                () = stream => {}
                () = progress.stalled(timeout) => {
                    tracing::debug!("HTTP/2 client took none of its answer in time; stream reset");
                }
            }
        }));
    }
}

/// Streams open on one connection, and since when it has had none.
#[derive(Default)]
pub(super) struct Streams {
    pub(super) open: AtomicUsize,
    /// Uptime milliseconds when the last stream closed (or the connection
    /// opened).
    pub(super) idle_since: AtomicU64,
}

/// One open stream, counted until its answer is done.
pub(super) struct Open(Arc<Streams>);

impl Open {
    pub(super) fn new(streams: &Arc<Streams>) -> Open {
        streams.open.fetch_add(1, Ordering::AcqRel);
        Open(streams.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.idle_since.store(uptime_ms(), Ordering::Release);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body, seen by the stream's watchdog and counted as an open
/// stream until hyper drops it.
pub struct Watched {
    pub(super) body: ProxyBody,
    pub(super) progress: Option<Arc<Progress>>,
    pub(super) _open: Open,
}

impl Body for Watched {
    type Data = Bytes;
    type Error = super::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(p) = &this.progress {
            p.asked();
        }
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(_))), Some(p)) = (&polled, &this.progress) {
            p.handed();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stall_is_seen_only_while_an_answer_waits_untaken() {
        let progress = Arc::new(Progress::new());
        let timeout = Duration::from_secs(2);
        // Nothing handed yet: no stall however long it takes.
        let watch = tokio::spawn({
            let p = progress.clone();
            async move { p.stalled(timeout).await }
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!watch.is_finished());
        progress.handed();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        progress.asked();
        progress.handed();
        assert!(!watch.is_finished());
        watch.await.unwrap();
    }
}
