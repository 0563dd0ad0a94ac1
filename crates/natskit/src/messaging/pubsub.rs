//! Publish and subscribe: validated, breaker-guarded publishing, and
//! subscriptions whose handlers run under a deadline, survive panics, and
//! never lose messages silently.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::core::subject::IntoSubject;
use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::Semaphore;

use crate::client::handler::{Handler, HandlerFuture, HandlerOutcome, invoke_in};
use crate::client::registry::{Control, Registry, StatsCell, SubscriptionStats};
use crate::client::{Client, sync_with_server};
use crate::core::error::{Error, Result, check_nonzero};
use crate::core::subject;

/// Options of a handler subscription.
///
/// ```
/// use std::time::Duration;
/// let opts = natskit::SubscribeOptions::new()
///     .queue("workers")
///     .concurrency(8)
///     .deadline(Duration::from_secs(5));
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct SubscribeOptions {
    queue: Option<String>,
    concurrency: Option<usize>,
    deadline: Option<Duration>,
}

impl SubscribeOptions {
    /// Defaults: no queue group, one message at a time, the client's handler deadline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Joins a queue group: each message goes to one member.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Handles up to `n` messages at once (default 1, in order).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = Some(n.max(1));
        self
    }

    /// Deadline for one handler invocation (default: the client's),
    /// counted from the moment the handler first waits (see
    /// [`ClientBuilder::handler_deadline`](crate::ClientBuilder::handler_deadline)).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }
}

impl SubscribeOptions {
    pub(crate) fn queue_group(&self) -> Option<&str> {
        self.queue.as_deref()
    }

    pub(crate) fn handler_deadline(&self) -> Option<Duration> {
        self.deadline
    }

    pub(crate) fn handler_concurrency(&self) -> usize {
        self.concurrency.unwrap_or(1)
    }
}

/// A running handler subscription. Dropping the handle does **not** stop
/// it; call [`unsubscribe`](Self::unsubscribe) or [`drain`](Self::drain), or
/// close the client.
#[derive(Debug)]
pub struct Subscription {
    /// Its counters and commands.
    stats: Arc<StatsCell>,
    /// The client, for the round trip before a drain; weak, so a handle
    /// does not keep a dropped client's connection alive.
    client: std::sync::Weak<crate::client::Inner>,
}

impl Subscription {
    /// The subscribed subject.
    pub fn subject(&self) -> &str {
        &self.stats.subject
    }

    /// Current counters.
    pub fn stats(&self) -> SubscriptionStats {
        self.stats.snapshot()
    }

    /// Whether the subscription has ended.
    pub fn is_finished(&self) -> bool {
        self.stats.control.is_finished()
    }

    /// Stops at once: no further messages are handled; a handler already
    /// running finishes. Idempotent.
    pub async fn unsubscribe(&self) {
        self.stats.control.stop();
        self.wait_finished().await;
    }

    /// Handles every message the server sent before this call, then
    /// unsubscribes and ends. Idempotent.
    ///
    /// (One round trip through the server comes first, so messages in
    /// flight are not lost, unlike async-nats' own drain.)
    pub async fn drain(&self) {
        let client = self.client.upgrade();
        if !self.is_finished()
            && let Some(client) = &client
            && let Some(conn) = client.connection()
            && let Err(err) = sync_with_server(conn, client.sync_timeout()).await
        {
            let subject = &*self.stats.subject;
            tracing::warn!(%subject, %err, "could not sync with the server before draining");
        }
        drop(client);
        self.stats.control.drain();
        self.wait_finished().await;
    }

    async fn wait_finished(&self) {
        self.stats.control.wait_finished().await;
    }
}

impl Client {
    /// Publishes `payload` on `subject`.
    ///
    /// Checks, in the order every operation uses and before touching the
    /// network: closed ([`Error::Closed`]), invalid input (the subject,
    /// [`Error::InvalidSubject`]; the payload size against the server's
    /// maximum, [`Error::PayloadTooLarge`]), the circuit breaker
    /// ([`Error::CircuitOpen`]) and the connection ([`Error::NotConnected`],
    /// unless buffering while disconnected is on). Invalid input never counts
    /// against the breaker, and since a core publish is only buffered, its
    /// success does not count as proof that the server is reachable either.
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// client.publish("sensors.t1", "21.5").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// With [`TraceMode::Off`](crate::trace::TraceMode::Off) the checks
    /// run when `publish` is called (the fast path); otherwise when the
    /// future is first polled, so the trace context it sends is that of
    /// whoever awaits it. Either way the outcome, a refusal included, is
    /// what the future yields.
    ///
    /// # Errors
    /// As above, and [`Error::Publish`] when the client could not queue it.
    // Not an `async fn`, and inlined: see `publish_inner`.
    #[inline(always)]
    pub fn publish(
        &self,
        subject: impl IntoSubject,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<()>> + Send + '_ {
        self.publish_inner(subject.into_subject(), payload.into(), None)
    }

    /// Publishes with headers. See [`publish`](Self::publish).
    ///
    /// # Errors
    /// See [`publish`](Self::publish).
    #[inline(always)]
    pub fn publish_with_headers(
        &self,
        subject: impl IntoSubject,
        headers: HeaderMap,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<()>> + Send + '_ {
        self.publish_inner(subject.into_subject(), payload.into(), Some(headers))
    }

    /// One future for both ways a core publish runs. With tracing off, the
    /// prologue runs now and the future is async-nats' own publish future,
    /// wrapped only to settle the breaker permit. With tracing on, the
    /// prologue runs at the first poll, so the trace context of whoever
    /// awaits the future (`trace::scope`, `with_context`) is the one sent.
    ///
    /// Measured with `perf` (callgrind counts a `memcpy` as a few
    /// instructions and missed this): nested in an `async fn`, async-nats'
    /// 664-byte publish future is built and then copied into the outer
    /// future's state twice per message, and a wrapper not inlined into the
    /// caller copies its own future twice more; those copies were most of
    /// core publish's gap to raw async-nats.
    #[inline(always)]
    fn publish_inner(
        &self,
        subject: async_nats::Subject,
        payload: Bytes,
        headers: Option<HeaderMap>,
    ) -> impl Future<Output = Result<()>> + Send + '_ {
        if self.config().trace_mode != crate::client::trace::TraceMode::Off {
            return CorePublish::Lazy {
                client: self,
                message: Some((subject, payload, headers)),
                send: send_core,
            };
        }
        CorePublish::start(self, subject, payload, headers, send_core)
    }

    /// Subscribes with an async handler that receives every message
    /// (subject, reply, headers, payload) in order, one at a time.
    ///
    /// Each invocation runs under the client's handler deadline; a handler
    /// that panics, errs or overruns is counted and logged, and the
    /// subscription keeps running.
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// let sub = client
    ///     .subscribe("sensors.*", |msg: async_nats::Message| async move {
    ///         println!("{}: {:?}", msg.subject, msg.payload);
    ///     })
    ///     .await?;
    /// # sub.unsubscribe().await;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidSubject`], [`Error::CircuitOpen`], [`Error::NotConnected`],
    /// [`Error::Closed`], [`Error::Subscribe`].
    pub async fn subscribe<F, Fut>(
        &self,
        subject: impl IntoSubject,
        handler: F,
    ) -> Result<Subscription>
    where
        F: Handler<Message, Fut>,
        Fut: HandlerFuture,
    {
        self.subscribe_with(subject, SubscribeOptions::new(), handler)
            .await
    }

    /// Subscribes as a member of queue group `queue`. See [`subscribe`](Self::subscribe).
    ///
    /// # Errors
    /// See [`subscribe`](Self::subscribe).
    pub async fn queue_subscribe<F, Fut>(
        &self,
        subject: impl IntoSubject,
        queue: impl Into<String>,
        handler: F,
    ) -> Result<Subscription>
    where
        F: Handler<Message, Fut>,
        Fut: HandlerFuture,
    {
        self.subscribe_with(subject, SubscribeOptions::new().queue(queue), handler)
            .await
    }

    /// Subscribes with explicit [`SubscribeOptions`]. See [`subscribe`](Self::subscribe).
    ///
    /// # Errors
    /// See [`subscribe`](Self::subscribe).
    pub async fn subscribe_with<F, Fut>(
        &self,
        subject: impl IntoSubject,
        options: SubscribeOptions,
        handler: F,
    ) -> Result<Subscription>
    where
        F: Handler<Message, Fut>,
        Fut: HandlerFuture,
    {
        let subject = subject.into_subject();
        if let Some(deadline) = options.handler_deadline() {
            self.ensure_open()?;
            check_nonzero("handler deadline", deadline)?;
        }
        let subscriber = self
            .subscriber_inner(&subject, options.queue.clone())
            .await?;
        // Registered for slow-consumer events once it receives (see
        // `Unstarted::park`), off the caller's path.
        let stats = self.new_stats(&subject);
        self.registry().add_control(&stats);
        let parked = Unstarted {
            handler,
            deadline: options
                .handler_deadline()
                .unwrap_or(self.config().handler_deadline),
            stats: stats.clone(),
            capacity: self.config().subscription_capacity,
        }
        .park(
            subscriber,
            options.handler_concurrency(),
            self.tasks().clone(),
            Arc::downgrade(self.registry()),
        );
        if let Err(parked) = self.registry().park(parked, self.tasks()) {
            self.tasks().spawn(parked);
        }
        Ok(Subscription {
            stats,
            client: Arc::downgrade(&self.inner),
        })
    }

    /// Subscribes and returns the raw async-nats [`Subscriber`](async_nats::Subscriber)
    /// stream, after the same checks as [`subscribe`](Self::subscribe).
    /// Drops on such a subscription count in
    /// [`StatusInfo::dropped_messages`](crate::StatusInfo::dropped_messages).
    ///
    /// # Errors
    /// See [`subscribe`](Self::subscribe).
    pub async fn subscriber(&self, subject: impl IntoSubject) -> Result<async_nats::Subscriber> {
        self.subscriber_inner(&subject.into_subject(), None).await
    }

    /// Subscribes and returns the messages as a [`futures_util::Stream`]
    /// ([`MessageStream`]), after the same checks as
    /// [`subscribe`](Self::subscribe), with the same stats. Dropping the
    /// stream unsubscribes.
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// use futures_util::StreamExt;
    /// let mut messages = client.subscribe_stream("sensors.>").await?;
    /// while let Some(msg) = messages.next().await {
    ///     println!("{}", msg.subject);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// See [`subscribe`](Self::subscribe).
    pub async fn subscribe_stream(&self, subject: impl IntoSubject) -> Result<MessageStream> {
        let subject = subject.into_subject();
        let subscriber = self.subscriber_inner(&subject, None).await?;
        let stats = self.tracked_stats(&subject, &subscriber);
        Ok(MessageStream { subscriber, stats })
    }

    /// A subscription's counters, registered so that async-nats'
    /// slow-consumer events for it reach them.
    fn tracked_stats(
        &self,
        subject: &async_nats::Subject,
        subscriber: &async_nats::Subscriber,
    ) -> Arc<StatsCell> {
        let stats = self.new_stats(subject);
        self.registry().track(subscriber, &stats);
        stats
    }

    /// A subscription's (or service endpoint's) counters, not yet
    /// registered for slow-consumer events.
    pub(crate) fn new_stats(&self, subject: &async_nats::Subject) -> Arc<StatsCell> {
        Arc::new(StatsCell::new(
            self.metrics().client.clone(),
            subject.clone(),
            self.dropped_counter(),
        ))
    }

    async fn subscriber_inner(
        &self,
        subject: &async_nats::Subject,
        queue: Option<String>,
    ) -> Result<async_nats::Subscriber> {
        self.ensure_open()?;
        subject::validate_subscribe(subject)?;
        if let Some(queue) = &queue {
            subject::validate_queue(queue)?;
        }
        let permit = self.guard()?;
        let conn = self.live_conn()?;
        let result = match queue {
            None => conn.subscribe(subject.clone()).await,
            Some(queue) => conn.queue_subscribe(subject.clone(), queue).await,
        };
        permit.record(result.map_err(Error::Subscribe))
    }
}

/// A handler subscription until its first message or command (see
/// [`Registry::park`](crate::client::registry::Registry::park)): the
/// handler is shared (for concurrent invocations) only once it runs, so
/// creating a subscription allocates less.
struct Unstarted<F> {
    handler: F,
    deadline: Duration,
    stats: Arc<StatsCell>,
    capacity: usize,
}

impl<F, Fut> Unstarted<F>
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: HandlerFuture,
{
    /// Waits for the subscription's first message or command, then spawns
    /// its [`Runner`] with it.
    fn park(
        self,
        mut subscriber: async_nats::Subscriber,
        concurrency: usize,
        tasks: tokio_util::task::TaskTracker,
        // Weak: a parked subscription must not keep a dropped client's
        // registry alive (its drop stops every subscription).
        registry: std::sync::Weak<Registry>,
    ) -> crate::client::registry::Parked {
        Box::pin(async move {
            let control = &self.stats.control;
            let first = tokio::select! {
                biased;
                () = control.changed() => {
                    control.wake_again();
                    None
                }
                message = subscriber.next() => message,
            };
            // Told to stop or drain before any message (or ended): unless a
            // drain finds messages already buffered, end here, without a
            // runner (closing a client with many idle subscriptions spawned
            // a runner for each just to end it).
            let first = match first {
                Some(message) => Some(message),
                None if control.command() == Control::Drain => {
                    tokio::task::unconstrained(async { subscriber.next().now_or_never().flatten() })
                        .await
                }
                None => None,
            };
            let Some(first) = first else {
                drop(subscriber);
                self.stats.control.finish();
                return;
            };
            // Registered for slow-consumer events only now: async-nats can
            // drop a message only once its buffer is full, and a
            // subscription that never receives one never pays for the
            // registration (reading the id costs about 1,400 instructions).
            if let Some(registry) = registry.upgrade() {
                registry.track(&subscriber, &self.stats);
            }
            let run = Runner {
                handler: Arc::new(self.handler),
                deadline: self.deadline,
                stats: self.stats,
                capacity: self.capacity,
            };
            let mut queue = VecDeque::new();
            run.accept(first, &mut queue);
            // A combinator, not an `async` block: the block would keep the
            // runner's arguments beside the runner's future.
            let finished = run.stats.clone();
            let running = run.run(subscriber, queue, concurrency, tasks.clone());
            tasks.spawn(running.map(move |()| finished.control.finish()));
        })
    }
}

struct Runner<F> {
    handler: Arc<F>,
    deadline: Duration,
    stats: Arc<StatsCell>,
    /// Messages natskit buffers while handlers are busy; beyond it each
    /// message is dropped and counted.
    capacity: usize,
}

/// A subscription as a [`futures_util::Stream`] of messages, from
/// [`Client::subscribe_stream`]. Counts what it yields in
/// [`stats`](Self::stats) (drops reported by async-nats included). Dropping
/// it unsubscribes.
#[derive(Debug)]
pub struct MessageStream {
    subscriber: async_nats::Subscriber,
    stats: Arc<StatsCell>,
}

impl MessageStream {
    /// The subscribed subject.
    pub fn subject(&self) -> &str {
        &self.stats.subject
    }

    /// Counters: `received` is what the stream yielded.
    pub fn stats(&self) -> SubscriptionStats {
        self.stats.snapshot()
    }

    /// Unsubscribes now; messages already buffered are still yielded. An
    /// unsubscribe the client could not send is logged.
    pub async fn unsubscribe(&mut self) {
        if let Err(err) = self.subscriber.unsubscribe().await {
            let subject = &*self.stats.subject;
            tracing::debug!(%subject, %err, "unsubscribe failed");
        }
    }
}

impl futures_util::Stream for MessageStream {
    type Item = Message;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Message>> {
        let polled = self.subscriber.poll_next_unpin(cx);
        if let std::task::Poll::Ready(Some(_)) = &polled {
            self.stats.add_received(1);
            self.stats.note_handled();
        }
        polled
    }
}

/// Messages a runner takes from the subscription at once when they are
/// ready, before it looks at its handlers and controls again.
const READ_BATCH: usize = 1024;

/// Messages read in one go, counted once.
#[derive(Default)]
struct Batch {
    read: u64,
    dropped: u64,
}

impl Batch {
    fn accept(&mut self, message: Message, queue: &mut VecDeque<Message>, capacity: usize) {
        self.read += 1;
        if queue.len() < capacity {
            queue.push_back(message);
        } else {
            self.dropped += 1;
        }
    }
}

/// What ends a runner's loop.
enum Exit {
    /// Handle what is buffered, then unsubscribe.
    Drain,
    /// Unsubscribe at once (a running handler finishes).
    Stop,
}

impl<F, Fut> Runner<F>
where
    // An impl needs `Fut` bound through `Fn`'s output.
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: HandlerFuture,
{
    /// Hands messages straight to a handler that finishes at once, and
    /// reads the subscription without pause into natskit's own bounded
    /// queue while handlers wait, so async-nats' buffer (whose overflow is
    /// reported only by best-effort events) does not fill, and every
    /// message natskit has to drop is counted exactly. `queue` holds what
    /// came while the subscription was parked.
    async fn run(
        self,
        mut subscriber: async_nats::Subscriber,
        mut queue: VecDeque<Message>,
        concurrency: usize,
        tasks: tokio_util::task::TaskTracker,
    ) {
        let control = &self.stats.control;
        let limiter = (concurrency > 1).then(|| Arc::new(Semaphore::new(concurrency)));
        // The one handler running inline (concurrency 1).
        let mut running = std::pin::pin!(None);
        // Registered once and again only after it fired, not on every pass
        // (a pass per message: re-registering cost about 230 instructions
        // a message). `notify_one` keeps a permit, so nothing is missed.
        let mut changed = std::pin::pin!(control.changed());
        let exit = loop {
            if limiter.is_none() && running.is_none() && !queue.is_empty() {
                // Handlers that finish in their first poll run back to back,
                // not one pass of the select below per message (that pass
                // cost about 300 instructions a message). As many as one
                // read takes at most, so the queue cannot outgrow the
                // handlers; a command stops the run at once. Once the queue
                // is empty, messages come straight from the subscription:
                // staging them cost four copies of each message.
                std::future::poll_fn(|cx| {
                    let mut read = 0;
                    for _ in 0..=READ_BATCH {
                        if control.command() != Control::Run {
                            break;
                        }
                        if running.is_none() {
                            let message = match queue.pop_front() {
                                Some(message) => message,
                                None => match subscriber.poll_next_unpin(cx) {
                                    std::task::Poll::Ready(Some(message)) => {
                                        // Counted before it is handled, so
                                        // `received` never trails `handled`;
                                        // the metric once per run.
                                        self.stats.note_received();
                                        read += 1;
                                        message
                                    }
                                    // Nothing ready, or the end: the select
                                    // below sees it.
                                    _ => break,
                                },
                            };
                            running.set(Some(self.invoke_inline(message)));
                        }
                        let Some(handler) = running.as_mut().as_pin_mut() else {
                            break;
                        };
                        if handler.poll(cx).is_pending() {
                            break;
                        }
                        running.set(None);
                    }
                    if read > 0 {
                        self.stats.add_received_metric(read);
                    }
                    std::task::Poll::Ready(())
                })
                .await;
            }
            let slot_wanted = limiter.is_some() && !queue.is_empty();
            let slot = async {
                match &limiter {
                    // Boxed: only concurrent subscriptions (which spawn a
                    // task per message anyway) pay for it, not the size of
                    // every subscription's task.
                    Some(limiter) if slot_wanted => {
                        Box::pin(limiter.clone().acquire_owned()).await.ok()
                    }
                    _ => std::future::pending().await,
                }
            };
            let inline = async {
                match running.as_mut().as_pin_mut() {
                    Some(handler) => handler.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = &mut changed => {
                    changed.set(control.changed());
                    match control.command() {
                        Control::Run => {}
                        Control::Drain => break Exit::Drain,
                        Control::Stop => break Exit::Stop,
                    }
                }
                () = inline => running.set(None),
                Some(permit) = slot => {
                    if let Some(message) = queue.pop_front() {
                        self.spawn(message, permit, &tasks);
                    }
                }
                message = subscriber.next() => {
                    let Some(message) = message else { break Exit::Drain };
                    // While a handler is busy, take what else is ready
                    // without another round of the select (bounded, so
                    // handlers and control stay served), and count the
                    // batch once. Otherwise the loop's first step handles
                    // this message and reads the rest itself.
                    let mut batch = Batch::default();
                    batch.accept(message, &mut queue, self.capacity);
                    if running.is_some() || limiter.is_some() {
                        for _ in 0..READ_BATCH {
                            match subscriber.next().now_or_never() {
                                Some(Some(message)) => batch.accept(message, &mut queue, self.capacity),
                                Some(None) | None => break,
                            }
                        }
                    }
                    self.count(batch);
                }
            }
        };
        // A running handler finishes either way.
        if let Some(handler) = running.as_mut().as_pin_mut() {
            handler.await;
        }
        // The ending runs once per subscription: boxed, so its futures do
        // not add to the size every idle subscription's task keeps.
        Box::pin(self.finish(exit, subscriber, queue, limiter, concurrency, tasks)).await;
    }

    /// Drains (for [`Exit::Drain`]), unsubscribes, and waits for handlers
    /// still running in tasks of their own.
    async fn finish(
        &self,
        exit: Exit,
        mut subscriber: async_nats::Subscriber,
        mut queue: VecDeque<Message>,
        limiter: Option<Arc<Semaphore>>,
        concurrency: usize,
        tasks: tokio_util::task::TaskTracker,
    ) {
        if matches!(exit, Exit::Drain) {
            // Everything sent before the drain request is buffered by now:
            // handle it, then leave. Unconstrained: tokio's cooperative
            // budget would otherwise make the channel look empty after 128
            // messages, and the rest would be lost.
            tokio::task::unconstrained(async {
                while let Some(Some(message)) = subscriber.next().now_or_never() {
                    self.accept(message, &mut queue);
                }
            })
            .await;
            while let Some(message) = queue.pop_front() {
                match &limiter {
                    None => self.invoke_inline(message).await,
                    Some(limiter) => {
                        if let Ok(permit) = limiter.clone().acquire_owned().await {
                            self.spawn(message, permit, &tasks);
                        }
                    }
                }
            }
        }
        let _ = subscriber.unsubscribe().await;
        // Wait for in-flight concurrent handlers.
        if let Some(limiter) = limiter {
            let _ = limiter
                .acquire_many(u32::try_from(concurrency).unwrap_or(u32::MAX))
                .await;
        }
    }

    /// Counts a message read from the subscription and queues it, or drops
    /// it (counted) when the queue is full.
    fn accept(&self, message: Message, queue: &mut VecDeque<Message>) {
        let mut batch = Batch::default();
        batch.accept(message, queue, self.capacity);
        self.count(batch);
    }

    fn count(&self, batch: Batch) {
        self.stats.add_received(batch.read);
        if batch.dropped > 0 {
            self.stats.record_drops(batch.dropped);
        }
    }

    /// The handler for one message in this task: borrows the runner, so
    /// the hot path clones nothing per message.
    #[inline(always)]
    fn invoke_inline(&self, message: Message) -> impl Future<Output = ()> + '_ {
        handle(&*self.handler, message, self.deadline, &self.stats)
    }

    /// The handler for one message in a task of its own (concurrency above 1).
    fn invoke(&self, message: Message) -> impl Future<Output = ()> + Send + 'static {
        let (handler, stats) = (self.handler.clone(), self.stats.clone());
        let deadline = self.deadline;
        async move { handle(&*handler, message, deadline, &stats).await }
    }

    fn spawn(
        &self,
        message: Message,
        slot: tokio::sync::OwnedSemaphorePermit,
        tasks: &tokio_util::task::TaskTracker,
    ) {
        let invocation = self.invoke(message);
        tasks.spawn(async move {
            invocation.await;
            drop(slot);
        });
    }
}

/// One handler invocation, counted. Not an `async fn` (see
/// `handler::invoke`): the message is moved into the handler, not kept
/// beside it.
#[inline(always)]
fn handle<'a, F, Fut>(
    handler: &F,
    message: Message,
    deadline: Duration,
    stats: &'a StatsCell,
) -> impl Future<Output = ()> + 'a
where
    F: Fn(Message) -> Fut,
    Fut: Future + 'a,
    Fut::Output: HandlerOutcome,
{
    let context = crate::client::trace::HandlerContext::from_headers(message.headers.as_ref());
    Handled {
        invocation: invoke_in(context, deadline, handler(message)),
        stats,
        deadline,
    }
}

pin_project_lite::pin_project! {
    /// [`handle`]'s future: the invocation, then its count. Not a `map`
    /// combinator, whose completion moved the whole future (see
    /// `handler::Invoked`).
    struct Handled<'a, F> {
        #[pin]
        invocation: F,
        stats: &'a StatsCell,
        deadline: Duration,
    }
}

impl<F, T> Future for Handled<'_, F>
where
    F: Future<Output = crate::client::handler::Invocation<T>>,
    T: HandlerOutcome,
{
    type Output = ();

    #[inline]
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.project();
        let invocation = std::task::ready!(this.invocation.poll(cx));
        this.stats
            .record(*this.deadline, invocation.map(HandlerOutcome::into_result));
        std::task::Poll::Ready(())
    }
}

/// async-nats' own future for a core publish (its `publish` without
/// headers: a smaller future).
fn send_core(
    conn: &async_nats::Client,
    subject: async_nats::Subject,
    payload: Bytes,
    headers: Option<HeaderMap>,
) -> impl Future<Output = std::result::Result<(), async_nats::PublishError>> + Send + '_ {
    use futures_util::future::Either;
    match headers {
        None => Either::Left(conn.publish(subject, payload)),
        Some(headers) => Either::Right(conn.publish_with_headers(subject, headers, payload)),
    }
}

pin_project_lite::pin_project! {
    /// A core publish: waiting for its first poll to run the prologue
    /// (tracing on), refused by the prologue, or async-nats' own publish
    /// future (made by `send`, a function item) and the breaker permit its
    /// outcome settles.
    #[project = CorePublishProj]
    enum CorePublish<'a, F, S> {
        Lazy {
            client: &'a Client,
            message: Option<(async_nats::Subject, Bytes, Option<HeaderMap>)>,
            send: S,
        },
        Refused { error: Option<Error> },
        Sending {
            #[pin]
            send: F,
            permit: Option<crate::client::breaker::Permit<'a>>,
            client: &'a Client,
        },
    }
}

impl<'a, F, S> CorePublish<'a, F, S>
where
    S: Fn(&'a async_nats::Client, async_nats::Subject, Bytes, Option<HeaderMap>) -> F + Copy,
{
    /// Runs the prologue and starts the send (or is refused).
    #[inline(always)]
    fn start(
        client: &'a Client,
        subject: async_nats::Subject,
        payload: Bytes,
        headers: Option<HeaderMap>,
        send: S,
    ) -> Self {
        match client.prologue(&subject, headers, payload.len(), Ok) {
            Err(err) => CorePublish::Refused { error: Some(err) },
            Ok(out) => CorePublish::Sending {
                send: send(out.conn, subject, payload, out.headers),
                permit: Some(out.permit),
                client,
            },
        }
    }
}

impl<'a, F, S> Future for CorePublish<'a, F, S>
where
    F: Future<Output = std::result::Result<(), async_nats::PublishError>>,
    S: Fn(&'a async_nats::Client, async_nats::Subject, Bytes, Option<HeaderMap>) -> F + Copy,
{
    type Output = Result<()>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<()>> {
        if let CorePublishProj::Lazy {
            client,
            message,
            send,
        } = self.as_mut().project()
        {
            let started = match message.take() {
                Some((subject, payload, headers)) => {
                    CorePublish::start(client, subject, payload, headers, *send)
                }
                None => CorePublish::Refused { error: None },
            };
            self.set(started);
        }
        match self.project() {
            CorePublishProj::Lazy { .. } => std::task::Poll::Ready(Err(Error::Closed)),
            CorePublishProj::Refused { error } => {
                std::task::Poll::Ready(Err(error.take().unwrap_or(Error::Closed)))
            }
            CorePublishProj::Sending {
                send,
                permit,
                client,
            } => {
                let result = std::task::ready!(send.poll(cx));
                if result.is_ok() {
                    client.metrics().publishes.increment(1);
                }
                match permit.take() {
                    Some(permit) => std::task::Poll::Ready(
                        permit.record_unconfirmed(result.map_err(Error::Publish)),
                    ),
                    None => std::task::Poll::Ready(Err(Error::Closed)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::registry::subscriber_sid;

    /// async-nats 0.51 exposes a subscriber's id only through `Debug`; if a
    /// new version changes that, this fails loudly (slow-consumer events
    /// could no longer be attributed to their subscription).
    #[tokio::test]
    async fn subscription_ids_are_read_from_async_nats() {
        let server = natskit_testing::NatsServer::start().expect("a server");
        let conn = async_nats::connect(server.url()).await.expect("connect");
        let first = conn.subscribe("sid.a").await.expect("subscribe");
        let second = conn.subscribe("sid.b").await.expect("subscribe");
        let (a, b) = (subscriber_sid(&first), subscriber_sid(&second));
        assert!(a.is_some() && b.is_some(), "{first:?} / {second:?}");
        assert_ne!(a, b);
    }

    #[test]
    fn handler_outcomes() {
        assert!(().into_result().is_ok());
        assert!(Ok::<(), std::io::Error>(()).into_result().is_ok());
        assert!(Err::<(), _>("boom").into_result().is_err());
    }
}
