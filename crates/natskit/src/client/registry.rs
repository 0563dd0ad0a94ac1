//! What a client tracks of its subscriptions and consumers, so that
//! slow-consumer events reach the right counters and `close` can drain and
//! stop everything: the connection layer's bookkeeping, no I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Instant;

use futures_util::future::BoxFuture;
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use crate::client::handler::Invocation;
use crate::core::sync::lock;

/// Counters of one subscription, from [`Subscription::stats`](crate::Subscription::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionStats {
    /// Messages taken from the subscription.
    pub received: u64,
    /// Handler invocations that finished (in any way).
    pub handled: u64,
    /// Handlers that returned an error.
    pub errors: u64,
    /// Handlers that panicked.
    pub panics: u64,
    /// Handlers that exceeded the per-message deadline.
    pub timeouts: u64,
    /// Messages dropped because this subscription fell behind. natskit
    /// reads the subscription without pause into its own queue of
    /// `subscription_capacity` messages while handlers run, and counts every
    /// message that does not fit exactly; async-nats' buffer behind it is
    /// then rarely full, and its drops (reported by best-effort events) are
    /// added when reported.
    pub dropped: u64,
}

/// A subscription's counters, shared by its handle, its runner and the
/// registry. It also holds the subject, once for all of them.
#[derive(Debug)]
pub(crate) struct StatsCell {
    /// The subscribed subject (shares async-nats' bytes).
    pub(crate) subject: async_nats::Subject,
    /// The client's `client` metrics label.
    client: Arc<str>,
    /// The `received` and `dropped` counters of the metrics facade,
    /// registered on first use.
    metrics: OnceLock<(metrics::Counter, metrics::Counter)>,
    received: AtomicU64,
    handled: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) panics: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    dropped: AtomicU64,
    /// Nanoseconds since [`warn_epoch`] of the last drop warning.
    pub(crate) last_warned: AtomicU64,
    /// The client's count of dropped messages.
    pub(crate) client_dropped: Arc<AtomicU64>,
    /// A handler subscription's commands (unused by other users): in the
    /// same allocation, one fewer per subscription.
    pub(crate) control: SubControl,
}

impl StatsCell {
    pub(crate) fn new(
        client: Arc<str>,
        subject: async_nats::Subject,
        client_dropped: Arc<AtomicU64>,
    ) -> Self {
        Self {
            subject,
            client,
            metrics: OnceLock::new(),
            received: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_warned: AtomicU64::new(0),
            client_dropped,
            control: SubControl::default(),
        }
    }

    fn metrics(&self) -> &(metrics::Counter, metrics::Counter) {
        self.metrics
            .get_or_init(|| crate::client::metrics::subscription(&self.client, &self.subject))
    }

    /// Counts one message taken from the subscription, without the
    /// metric: a runner that counts each message before handling it adds
    /// the metric once per run ([`add_received_metric`](Self::add_received_metric)).
    #[inline]
    pub(crate) fn note_received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` messages counted by [`note_received`](Self::note_received)
    /// to the metric.
    pub(crate) fn add_received_metric(&self, n: u64) {
        self.metrics().0.increment(n);
    }

    /// Counts `n` messages taken from the subscription.
    #[inline]
    pub(crate) fn add_received(&self, n: u64) {
        self.metrics().0.increment(n);
        self.received.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one dropped message (here, client-wide and in the metric) and
    /// warns at most once a second per subscription.
    pub(crate) fn record_drop(&self) {
        self.record_drops(1);
    }

    /// Counts `n` dropped messages; see [`record_drop`](Self::record_drop).
    pub(crate) fn record_drops(&self, n: u64) {
        self.metrics().1.increment(n);
        let dropped = self.dropped.fetch_add(n, Ordering::Relaxed) + n;
        self.client_dropped.fetch_add(n, Ordering::Relaxed);
        let now = u64::try_from(warn_epoch().elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.last_warned.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 1_000_000_000)
            && self
                .last_warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let subject = &*self.subject;
            tracing::warn!(%subject, dropped, "slow consumer: messages dropped");
        }
    }

    /// Counts one finished handler invocation, and logs what went wrong:
    /// the same accounting for subscriptions, `serve` and service
    /// endpoints.
    pub(crate) fn record<E: std::fmt::Display>(
        &self,
        deadline: std::time::Duration,
        invocation: Invocation<Result<(), E>>,
    ) {
        let subject = &*self.subject;
        match invocation {
            Invocation::Done(Ok(())) => {}
            Invocation::Done(Err(err)) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%subject, %err, "message handler failed");
            }
            Invocation::Panicked(what) => {
                self.panics.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%subject, panic = %what, "message handler panicked");
            }
            Invocation::TimedOut => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%subject, ?deadline, "message handler exceeded its deadline");
            }
        }
        self.note_handled();
    }

    /// Counts one handled message. Release, read with Acquire by
    /// `snapshot`: a message is counted received before it is handled, so
    /// a snapshot never shows more handled than received (free on x86).
    pub(crate) fn note_handled(&self) {
        self.handled.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn snapshot(&self) -> SubscriptionStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        // Outcomes first, then what was received (see `record`).
        let handled = self.handled.load(Ordering::Acquire);
        let (errors, panics, timeouts) =
            (get(&self.errors), get(&self.panics), get(&self.timeouts));
        SubscriptionStats {
            received: get(&self.received),
            handled,
            errors,
            panics,
            timeouts,
            dropped: get(&self.dropped),
        }
    }
}

/// The instant drop warnings are timed from: one for the process, not a
/// clock read per subscription.
fn warn_epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Maps async-nats subscription ids to natskit stats, so slow-consumer
/// events are counted per subscription.
/// Also keeps every handler subscription (its [`StatsCell::control`]), for
/// `close`, and the client's parking task for subscriptions waiting for
/// their first message.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// Hashed with foldhash: SipHash cost about 300 instructions a
    /// subscription, and the keys are the client's own ids.
    subs: Mutex<HashMap<u64, Weak<StatsCell>, foldhash::fast::FixedState>>,
    /// Every handler subscription (its [`StatsCell::control`]).
    controls: Mutex<Vec<Arc<StatsCell>>>,
    /// Where subscriptions wait for their first message (shared with the
    /// parking task).
    parking: Arc<Parking>,
    /// Sizes after the last pruning passes.
    subs_kept: AtomicUsize,
    controls_kept: AtomicUsize,
}

impl Registry {
    pub(crate) fn add_control(&self, control: &Arc<StatsCell>) {
        let mut controls = lock(&self.controls);
        // Finished runners are pruned when the list has doubled since the
        // last pass, so subscribing stays O(1) amortized (pruning on every
        // call made 10,000 subscriptions quadratic).
        if controls.len() >= 2 * self.controls_kept.load(Ordering::Relaxed).max(32) {
            controls.retain(|c| !c.control.is_finished());
            self.controls_kept.store(controls.len(), Ordering::Relaxed);
        }
        controls.push(control.clone());
    }

    /// Tells every running subscription to handle what it has buffered and
    /// stop. The caller has synced with the server first.
    pub(crate) fn drain_all(&self) {
        for shared in lock(&self.controls).iter() {
            shared.control.drain();
        }
        // The parking task ends once every parked subscription has left.
        self.parking.close();
    }

    /// Parks a subscription that has not received a message yet (`waiting`
    /// ends at its first message or command, and spawns the subscription's
    /// own task): one task per client waits for all of them, instead of a
    /// task each. Starts that task on first use. Hands `waiting` back once
    /// the client is closing, for the caller to spawn.
    ///
    /// The caller polls `waiting` once here, with the parking task's waker
    /// (once that task has run), so creating a subscription neither sends
    /// it anywhere nor wakes another task: only its first message or
    /// command does.
    pub(crate) fn park(&self, waiting: Parked, tasks: &TaskTracker) -> Result<(), Parked> {
        let parking = &self.parking;
        let mut state = lock(&parking.state);
        if parking.closed.load(Ordering::Acquire) {
            return Err(waiting);
        }
        if !state.started {
            state.started = true;
            tasks.spawn(ParkingTask(parking.clone()));
        }
        let ParkingState { parked, waker, .. } = &mut *state;
        parked.push(waiting);
        // Before the parking task's first run, that run polls it.
        if let Some(waker) = waker {
            poll_parked(parked, waker);
        }
        Ok(())
    }

    /// Registers `subscriber`'s counters for slow-consumer events.
    pub(crate) fn track(&self, subscriber: &async_nats::Subscriber, stats: &Arc<StatsCell>) {
        if let Some(sid) = subscriber_sid(subscriber) {
            self.register(sid, stats);
        }
    }

    fn register(&self, sid: u64, stats: &Arc<StatsCell>) {
        let mut subs = lock(&self.subs);
        // Amortized like `add_control`.
        if subs.len() >= 2 * self.subs_kept.load(Ordering::Relaxed).max(32) {
            subs.retain(|_, s| s.strong_count() > 0);
            self.subs_kept.store(subs.len(), Ordering::Relaxed);
        }
        subs.insert(sid, Arc::downgrade(stats));
    }

    /// A drop reported by async-nats (a slow-consumer event) for
    /// subscription `sid`; whether the subscription was known.
    pub(crate) fn record_drop(&self, sid: u64) -> bool {
        let found = lock(&self.subs).get(&sid).and_then(Weak::upgrade);
        let Some(stats) = found else {
            tracing::warn!(sid, "message dropped: subscription could not keep up");
            return false;
        };
        stats.record_drop();
        true
    }
}

impl Drop for Registry {
    /// The client was dropped (without `close()`): every subscription stops
    /// (a running handler finishes) and unsubscribes.
    fn drop(&mut self) {
        if let Ok(controls) = self.controls.get_mut() {
            for shared in controls.iter() {
                shared.control.stop();
            }
        }
        // Without the lock: this drop may run inside the parking task's
        // poll (a parked handler that held the last client clone).
        self.parking.close();
    }
}

/// A parked subscription: see [`Registry::park`].
pub(crate) type Parked = BoxFuture<'static, ()>;

/// A client's parked subscriptions, shared by the registry (which parks
/// them) and the parking task (which polls them when woken).
#[derive(Debug, Default)]
struct Parking {
    state: Mutex<ParkingState>,
    /// The client is closing (or gone): nothing more is parked, and the
    /// parking task ends once the last parked subscription has left.
    closed: AtomicBool,
    /// The parking task's waker, for `close`, which must not take the lock.
    task: futures_util::task::AtomicWaker,
}

#[derive(Debug, Default)]
struct ParkingState {
    parked: futures_util::stream::FuturesUnordered<Parked>,
    /// The parking task was spawned.
    started: bool,
    /// The parking task's waker, once it has run: whoever polls the parked
    /// set polls it with this, so every parked subscription's wake-up
    /// reaches that task.
    waker: Option<std::task::Waker>,
}

impl Parking {
    /// Nothing more is parked; wakes the parking task to end once empty.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Polls the parked subscriptions that were woken (or just parked) until
/// none is ready. Those that got their first message spawn their own task;
/// those told to stop end.
fn poll_parked(
    parked: &mut futures_util::stream::FuturesUnordered<Parked>,
    waker: &std::task::Waker,
) {
    use futures_util::StreamExt as _;
    let mut cx = std::task::Context::from_waker(waker);
    while let std::task::Poll::Ready(Some(())) = parked.poll_next_unpin(&mut cx) {}
}

/// The parking task: polls the parked subscriptions when one of them is
/// woken (by its first message or a command). Ends once the client is
/// closing (or dropped) and the last one has left.
///
/// A task per subscription cost a spawn (about 2,500 instructions with
/// its first poll) and about 1 KB while the subscription waited; a parked
/// one costs a node in the set and about 300 bytes. Sending each new
/// subscription to this task through a channel woke it (often on another
/// thread) once per subscription; now the subscriber polls it in place.
/// Handlers never run here: each subscription gets its own task at its
/// first message, so handlers of different subscriptions still run in
/// parallel.
struct ParkingTask(Arc<Parking>);

impl std::future::Future for ParkingTask {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let parking = &*self.0;
        // Registered before `closed` is read below, so no close is missed.
        parking.task.register(cx.waker());
        let mut state = lock(&parking.state);
        if !state
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.waker = Some(cx.waker().clone());
        }
        poll_parked(&mut state.parked, cx.waker());
        if parking.closed.load(Ordering::Acquire) && state.parked.is_empty() {
            // The waker would keep this task's header alive with the set.
            state.waker = None;
            return std::task::Poll::Ready(());
        }
        std::task::Poll::Pending
    }
}

/// async-nats keeps a subscriber's id private but prints it in `Debug`
/// (`Subscriber { sid: 7, .. }`); read it from there to map slow-consumer
/// events (which carry only the id) to the subscription.
///
/// Only the first bytes are formatted (`sid` is the first field): the
/// writer refuses the first write after the id's digits, which ends the
/// formatting, so the channel state after it is never printed (printing
/// it cost about 2,000 instructions a subscription).
pub(crate) fn subscriber_sid(subscriber: &async_nats::Subscriber) -> Option<u64> {
    use std::fmt::Write as _;
    let mut prefix = Prefix::default();
    let _ = write!(prefix, "{subscriber:?}");
    let (start, end) = prefix.id?;
    std::str::from_utf8(&prefix.buf[start..end])
        .ok()?
        .parse()
        .ok()
}

/// The first 64 bytes of a formatted value, up to the id's digits.
struct Prefix {
    buf: [u8; 64],
    len: usize,
    /// Where the digits written right after `sid: ` are in `buf`.
    id: Option<(usize, usize)>,
}

impl Default for Prefix {
    fn default() -> Self {
        Self {
            buf: [0; 64],
            len: 0,
            id: None,
        }
    }
}

impl std::fmt::Write for Prefix {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if self.id.is_some() && !digits {
            // Whatever follows the id is not needed.
            return Err(std::fmt::Error);
        }
        let take = s.len().min(self.buf.len() - self.len);
        if digits && self.buf[..self.len].ends_with(b"sid: ") {
            self.id = Some((self.len, self.len + take));
        }
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        if take < s.len() {
            Err(std::fmt::Error)
        } else {
            Ok(())
        }
    }
}

/// What a subscription's runner is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    Run,
    Drain,
    Stop,
}

/// What a subscription's handle, its runner (or, before its first
/// message, its parked future) and the client share: the command for the
/// runner and whether it has finished. Kept inside the subscription's
/// [`StatsCell`], in the same allocation as its counters.
#[derive(Debug, Default)]
pub(crate) struct SubControl {
    /// A [`Control`] as `u8`.
    command: AtomicU8,
    /// The runner is the only waiter; `notify_one` keeps a permit when it
    /// is busy, so no command is missed.
    wake_runner: Notify,
    finished: AtomicBool,
    finished_waiters: Notify,
}

const RUN: u8 = 0;
const DRAIN: u8 = 1;
const STOP: u8 = 2;

impl SubControl {
    /// Stops the runner at once (a running handler finishes).
    pub(crate) fn stop(&self) {
        self.command.store(STOP, Ordering::Release);
        self.wake_runner.notify_one();
    }

    /// Asks a running runner to handle what it has buffered and stop; no
    /// effect once it was told to drain or stop.
    pub(crate) fn drain(&self) {
        if self
            .command
            .compare_exchange(RUN, DRAIN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.wake_runner.notify_one();
        }
    }

    /// The current command.
    pub(crate) fn command(&self) -> Control {
        match self.command.load(Ordering::Acquire) {
            RUN => Control::Run,
            DRAIN => Control::Drain,
            _ => Control::Stop,
        }
    }

    /// Completes after a command was given (perhaps before this call).
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake_runner.notified()
    }

    /// Hands a command's wake-up on (a parked subscription took it and
    /// leaves for its own task, which must see it too).
    pub(crate) fn wake_again(&self) {
        self.wake_runner.notify_one();
    }

    /// Marks the runner finished and wakes everyone waiting for that.
    pub(crate) fn finish(&self) {
        self.finished.store(true, Ordering::Release);
        self.finished_waiters.notify_waiters();
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Waits until the runner has finished.
    pub(crate) async fn wait_finished(&self) {
        loop {
            let notified = self.finished_waiters.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a `finish` in between is seen.
            notified.as_mut().enable();
            if self.is_finished() {
                return;
            }
            notified.await;
        }
    }
}

/// A running consumer, as the client sees it: a key and a way to stop it.
pub(crate) trait Stoppable: Send + Sync + std::fmt::Debug {
    /// Whether it has stopped.
    fn is_stopped(&self) -> bool;
    /// Stops it and waits until it has.
    fn stop(&self) -> BoxFuture<'_, ()>;
}

/// The consumers a client runs, by (stream, consumer name).
#[derive(Debug, Default)]
pub(crate) struct Consumers {
    running: Mutex<HashMap<(String, String), Arc<dyn Stoppable>>>,
}

impl Consumers {
    pub(crate) fn insert(&self, stream: &str, name: &str, consumer: Arc<dyn Stoppable>) {
        let mut running = lock(&self.running);
        running.retain(|_, c| !c.is_stopped());
        running.insert((stream.to_owned(), name.to_owned()), consumer);
    }

    pub(crate) fn remove(&self, stream: &str, name: &str) -> Option<Arc<dyn Stoppable>> {
        lock(&self.running).remove(&(stream.to_owned(), name.to_owned()))
    }

    pub(crate) fn names_on(&self, stream: &str) -> Vec<String> {
        lock(&self.running)
            .iter()
            .filter(|((s, _), c)| s == stream && !c.is_stopped())
            .map(|((_, name), _)| name.clone())
            .collect()
    }

    /// Stops every consumer and waits for each.
    pub(crate) async fn stop_all(&self) {
        let all: Vec<_> = lock(&self.running).drain().map(|(_, c)| c).collect();
        for consumer in all {
            consumer.stop().await;
        }
    }
}
