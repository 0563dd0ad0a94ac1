//! How natskit runs user code for a message, and the size check every
//! outgoing message passes: the connection layer's shared prologue and
//! invocation path.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use async_nats::HeaderMap;
use futures_util::FutureExt;

use crate::client::trace;
use crate::core::error::{BoxError, Error, Result};

/// What a message handler may return: `()` or `Result<(), E>`. Errors are
/// counted in [`SubscriptionStats::errors`](crate::SubscriptionStats::errors) and logged.
pub trait HandlerOutcome {
    /// Converts into a result.
    fn into_result(self) -> std::result::Result<(), BoxError>;
}

impl HandlerOutcome for () {
    fn into_result(self) -> std::result::Result<(), BoxError> {
        Ok(())
    }
}

impl<E: Into<BoxError>> HandlerOutcome for std::result::Result<(), E> {
    fn into_result(self) -> std::result::Result<(), BoxError> {
        self.map_err(Into::into)
    }
}

/// The future of a message handler: `Send + 'static`, with an output that
/// is a [`HandlerOutcome`]. Implemented for every such future; named so
/// that handler bounds read as one line.
pub trait HandlerFuture: Future<Output: HandlerOutcome> + Send + 'static {}

impl<T: Future<Output: HandlerOutcome> + Send + 'static> HandlerFuture for T {}

/// A message handler: an async function or closure of one message `M`
/// whose future is a [`HandlerFuture`], shareable across the tasks that run
/// it. Implemented for every such `Fn`; there is nothing to implement.
///
/// ```
/// use natskit::{Handler, HandlerFuture, Message};
///
/// fn takes_handler<H: Handler<Message, Fut>, Fut: HandlerFuture>(_handler: H) {}
///
/// takes_handler(|msg: Message| async move {
///     println!("{}", msg.subject);
/// });
/// // Handlers may fail; the error is counted and logged.
/// takes_handler(|_msg: Message| async move { Ok::<(), std::io::Error>(()) });
/// ```
pub trait Handler<M, Fut: HandlerFuture>: Fn(M) -> Fut + Send + Sync + 'static {}

impl<M, Fut: HandlerFuture, F> Handler<M, Fut> for F where F: Fn(M) -> Fut + Send + Sync + 'static {}

/// Checks payload plus encoded headers against the server's `max_payload`.
#[inline]
pub(crate) fn check_payload(
    conn: &async_nats::Client,
    payload: usize,
    headers: Option<&HeaderMap>,
) -> Result<()> {
    let max = conn.max_payload();
    if max == 0 {
        return Ok(());
    }
    let size = payload + headers.map_or(0, encoded_len);
    if size > max {
        return Err(Error::PayloadTooLarge { size, max });
    }
    Ok(())
}

/// Size of headers on the wire: `NATS/1.0\r\n`, `Name: value\r\n` each, `\r\n`.
fn encoded_len(headers: &HeaderMap) -> usize {
    let fields: usize = headers
        .iter()
        .map(|(name, values)| {
            let name = AsRef::<str>::as_ref(name).len();
            values
                .iter()
                .map(|v| name + 2 + v.as_str().len() + 2)
                .sum::<usize>()
        })
        .sum();
    10 + fields + 2
}

/// How one run of user code for a message ended.
pub(crate) enum Invocation<T> {
    /// It returned.
    Done(T),
    /// It panicked, with the panic's message.
    Panicked(String),
    /// It ran past its deadline and was cancelled.
    TimedOut,
}

impl<T> Invocation<T> {
    /// The same ending with the output mapped.
    pub(crate) fn map<U>(self, f: impl FnOnce(T) -> U) -> Invocation<U> {
        match self {
            Invocation::Done(output) => Invocation::Done(f(output)),
            Invocation::Panicked(what) => Invocation::Panicked(what),
            Invocation::TimedOut => Invocation::TimedOut,
        }
    }
}

/// The one way natskit runs user code for a message (subscriptions,
/// services, consumers): in the trace scope of the message's headers, under
/// a deadline, with a panic caught and its message kept.
///
/// Built from combinators, not as an `async fn`: an `async fn` keeps its
/// arguments beside the futures made from them, and nested ones did that at
/// every level; this future was 1.3 KB for an empty handler, held in every
/// subscription's task.
pub(crate) fn invoke<Fut: Future>(
    headers: Option<&HeaderMap>,
    deadline: Duration,
    work: Fut,
) -> impl Future<Output = Invocation<Fut::Output>> + use<Fut> {
    invoke_in(trace::HandlerContext::from_headers(headers), deadline, work)
}

/// [`invoke`] with the context already read from the message, so the
/// message itself can be moved into the work.
#[inline(always)]
pub(crate) fn invoke_in<Fut: Future>(
    context: trace::HandlerContext,
    deadline: Duration,
    work: Fut,
) -> impl Future<Output = Invocation<Fut::Output>> + use<Fut> {
    Invoked {
        inner: Deadline::new(deadline, AssertUnwindSafe(context.run(work)).catch_unwind()),
    }
}

pin_project_lite::pin_project! {
    /// [`invoke_in`]'s future. Not a `map` combinator: `Map` takes its
    /// closure back by replacing the whole future when the work completes,
    /// a `memcpy` of the handler's future per message (measured with
    /// callgrind on the subscribe path).
    struct Invoked<F> {
        #[pin]
        inner: Deadline<futures_util::future::CatchUnwind<AssertUnwindSafe<F>>>,
    }
}

impl<F: Future> Future for Invoked<F> {
    type Output = Invocation<F::Output>;

    #[inline]
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let outcome = std::task::ready!(self.project().inner.poll(cx));
        std::task::Poll::Ready(match outcome {
            Some(Ok(output)) => Invocation::Done(output),
            Some(Err(panic)) => Invocation::Panicked(
                panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default(),
            ),
            None => Invocation::TimedOut,
        })
    }
}

pin_project_lite::pin_project! {
    /// `work` under a deadline counted from the moment it first waits (the
    /// end of its first poll), whose timer is made only then: a handler that
    /// finishes in its first poll, as most do, reads no clock and arms no
    /// timer. A handler cannot be interrupted while it runs, so its deadline
    /// bounds its waiting; counting from the start of the first poll instead
    /// cost a clock read per message (about 2% of subscribe throughput,
    /// measured with perf). `None` when the deadline passed first.
    struct Deadline<F> {
        #[pin]
        work: F,
        deadline: Duration,
        timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<F> Deadline<F> {
    #[inline(always)]
    fn new(deadline: Duration, work: F) -> Self {
        Self {
            work,
            deadline,
            timer: None,
        }
    }
}

impl<F: Future> Future for Deadline<F> {
    type Output = Option<F::Output>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = self.project();
        if let Poll::Ready(output) = this.work.poll(cx) {
            return Poll::Ready(Some(output));
        }
        let deadline = *this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(deadline)));
        // Outside the task's cooperative budget, as tokio's `timeout` does:
        // work that spent the budget must not keep its deadline from firing.
        let mut check = std::pin::pin!(tokio::task::unconstrained(timer.as_mut()));
        match check.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_deadline_arms_its_timer_only_when_the_work_waits() {
        let mut ready = std::pin::pin!(Deadline::new(Duration::from_secs(1), async { 7 }));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert_eq!(
            ready.as_mut().poll(&mut cx),
            std::task::Poll::Ready(Some(7))
        );
        assert!(ready.timer.is_none(), "no timer for work done at once");

        let started = std::time::Instant::now();
        let waits = Deadline::new(Duration::from_millis(20), std::future::pending::<()>());
        assert_eq!(waits.await, None, "the deadline ends waiting work");
        assert!(started.elapsed() >= Duration::from_millis(20));

        let yields_once = Deadline::new(Duration::from_secs(5), async {
            tokio::task::yield_now().await;
            "done"
        });
        assert_eq!(yields_once.await, Some("done"));
    }

    /// The deadline bounds waiting: time the work spends running before it
    /// first waits is not counted (it could not be interrupted anyway).
    #[tokio::test]
    async fn a_deadline_counts_from_the_first_wait() {
        let work = Deadline::new(Duration::from_millis(200), async {
            let busy_until = std::time::Instant::now() + Duration::from_millis(300);
            while std::time::Instant::now() < busy_until {
                std::hint::spin_loop();
            }
            tokio::task::yield_now().await;
            "done"
        });
        assert_eq!(work.await, Some("done"));
    }

    /// Work that spends the task's whole cooperative budget on every poll
    /// still meets its deadline.
    #[tokio::test]
    async fn a_deadline_fires_for_work_that_spends_the_budget() {
        let busy = Deadline::new(Duration::from_millis(20), async {
            loop {
                tokio::task::consume_budget().await;
            }
        });
        let outcome = tokio::time::timeout(Duration::from_secs(5), busy).await;
        assert_eq!(outcome.ok(), Some(None), "the deadline fired");
    }
}
