//! A connection's one timer, shared by every wait on the connection.

use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// A connection's one timer. Setting a later deadline only records it; the
/// timer is re-armed when it fires early. So the usual request, which ends
/// well within its deadlines, costs no timer-wheel work at all.
pub(super) struct Deadline {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    at: Instant,
}

impl Deadline {
    pub(super) fn new() -> Deadline {
        let at = Instant::now() + Duration::from_secs(3600);
        Deadline {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            at,
        }
    }

    /// `future`'s output, or `None` if the instant `at` comes first.
    pub(super) fn until<F: Future>(&mut self, at: Instant, future: F) -> Until<'_, F> {
        self.at = at;
        if self.sleep.deadline() > self.at {
            self.sleep.as_mut().reset(self.at);
        }
        Until {
            future,
            deadline: self,
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Deadline::until`]: a future and the connection's timer, in one
    /// small state (an `async fn` would keep the future twice).
    pub(super) struct Until<'a, F> {
        #[pin]
        future: F,
        deadline: &'a mut Deadline,
    }
}

impl<F: Future> Future for Until<'_, F> {
    type Output = Option<F::Output>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = self.project();
        if let Poll::Ready(out) = this.future.poll(cx) {
            return Poll::Ready(Some(out));
        }
        let deadline = this.deadline;
        loop {
            match deadline.sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if Instant::now() >= deadline.at => return Poll::Ready(None),
                Poll::Ready(()) => {
                    let at = deadline.at;
                    deadline.sleep.as_mut().reset(at);
                }
            }
        }
    }
}
