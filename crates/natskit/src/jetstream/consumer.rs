//! Supervised JetStream consumers and the heartbeat helper for long work.
//!
//! A consumer started here keeps delivering across reconnects, server
//! restarts and the consumer being deleted on the server: a supervisor task
//! watches the pull stream's heartbeats and recreates the consumer with
//! back-off under the same name, resuming at the lowest stream sequence not
//! yet settled (the server's ack floor, polled while messages flow), so a
//! message waiting for redelivery is never skipped and no orphan consumers
//! pile up.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::{self, PullConsumer, pull};
use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;
use tokio::sync::watch;

use crate::client::handler::{Handler, HandlerFuture, HandlerOutcome, Invocation, invoke};
use crate::client::jetstream_errors::{is_consumer_not_found, map_consumer};
use crate::client::metrics::ConsumerMetrics;
use crate::client::retry::{self, Retry};
use crate::client::{Client, WeakClient};
use crate::core::error::{BoxError, Error, Result, check_nonzero};
use crate::core::subject;
use crate::jetstream::StreamAutoCreateConfig;

/// Where a new consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeliverPolicy {
    /// Every message in the stream (default).
    #[default]
    All,
    /// The last message of the stream, then new ones.
    Last,
    /// The last message of every subject, then new ones.
    LastPerSubject,
    /// Only messages published after the consumer is created.
    New,
    /// Messages stored at or after this time.
    ByStartTime(SystemTime),
    /// Messages from this stream sequence on.
    ByStartSequence(u64),
}

/// How messages are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckPolicy {
    /// Every message must be acknowledged (default).
    #[default]
    Explicit,
    /// No acknowledgements.
    None,
    /// Acknowledging a message acknowledges every earlier one.
    All,
}

/// Configuration of a supervised consumer: durable or ephemeral, filter,
/// deliver and ack policy, max deliver, ack wait, back-off, max ack pending,
/// auto-create, per-message timeout, heartbeat; each with a getter.
///
/// ```
/// use std::time::Duration;
/// use natskit::{AckPolicy, DeliverPolicy, StreamConsumerConfig};
/// let config = StreamConsumerConfig::new("ORDERS")
///     .durable("billing")
///     .filter_subject("orders.*.created")
///     .deliver_policy(DeliverPolicy::New)
///     .ack_policy(AckPolicy::Explicit)
///     .max_deliver(5)
///     .ack_wait(Duration::from_secs(10))
///     .backoff(vec![Duration::from_secs(1), Duration::from_secs(5)])
///     .max_ack_pending(100)
///     .message_timeout(Duration::from_secs(20));
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct StreamConsumerConfig {
    stream: String,
    durable: Option<String>,
    filter_subject: Option<String>,
    deliver_policy: DeliverPolicy,
    ack_policy: AckPolicy,
    max_deliver: Option<u32>,
    ack_wait: Duration,
    backoff: Vec<Duration>,
    max_ack_pending: Option<u32>,
    auto_create: Option<StreamAutoCreateConfig>,
    message_timeout: Duration,
    heartbeat: Duration,
    inactive_threshold: Duration,
}

impl StreamConsumerConfig {
    /// A consumer on stream `stream` with the defaults: ephemeral, all
    /// subjects, deliver all, explicit acks, unlimited deliveries, 30 s ack
    /// wait, 30 s per-message timeout, 5 s heartbeats.
    pub fn new(stream: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            durable: None,
            filter_subject: None,
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            max_deliver: None,
            ack_wait: Duration::from_secs(30),
            backoff: Vec::new(),
            max_ack_pending: None,
            auto_create: None,
            message_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
            inactive_threshold: Duration::from_secs(300),
        }
    }

    /// Makes the consumer durable under `name` (default: ephemeral). An
    /// empty name is an [`Error::InvalidName`] when the consumer starts,
    /// never a silent ephemeral consumer.
    pub fn durable(mut self, name: impl Into<String>) -> Self {
        self.durable = Some(name.into());
        self
    }

    /// Only messages on subjects matching `filter` (default: all). An
    /// empty filter is an [`Error::InvalidSubject`] when the consumer
    /// starts.
    pub fn filter_subject(mut self, filter: impl Into<String>) -> Self {
        self.filter_subject = Some(filter.into());
        self
    }

    setter!(
        /// Where to start.
        deliver_policy: DeliverPolicy => deliver_policy);

    setter!(
        /// How to acknowledge.
        ack_policy: AckPolicy => ack_policy);

    /// At most `attempts` deliveries per message (default: unlimited). Zero
    /// is an [`Error::InvalidArgument`] when the consumer starts.
    pub fn max_deliver(mut self, attempts: u32) -> Self {
        self.max_deliver = Some(attempts);
        self
    }

    setter!(
        /// How long the server waits for an ack before redelivering.
        ack_wait: Duration => ack_wait);

    setter!(
        /// Redelivery delays per attempt, overriding the ack wait; the last one
        /// repeats. Needs `max_deliver` above its length.
        backoff: Vec<Duration> => backoff);

    /// At most `messages` delivered and not yet acknowledged (default: the
    /// server's). Zero is an [`Error::InvalidArgument`] when the consumer
    /// starts.
    pub fn max_ack_pending(mut self, messages: u32) -> Self {
        self.max_ack_pending = Some(messages);
        self
    }

    /// Creates the stream from `config` when it does not exist.
    pub fn auto_create(mut self, config: StreamAutoCreateConfig) -> Self {
        self.auto_create = Some(config);
        self
    }

    setter!(
        /// Deadline of one handler invocation; a handler past it is cancelled
        /// and the message naked (default 30 s).
        message_timeout: Duration => message_timeout);

    setter!(
        /// Idle heartbeat of the pull stream; two missed ones make the
        /// supervisor recreate the consumer (default 5 s).
        heartbeat: Duration => heartbeat);

    setter!(
        /// How long an ephemeral consumer survives without this client before
        /// the server removes it (default 5 min).
        inactive_threshold: Duration => inactive_threshold);

    /// The stream name (given to [`new`](Self::new)).
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// See [`durable`](Self::durable); `None` for an ephemeral consumer.
    pub fn get_durable(&self) -> Option<&str> {
        self.durable.as_deref()
    }

    /// See [`filter_subject`](Self::filter_subject); `None` for every
    /// subject of the stream.
    pub fn get_filter_subject(&self) -> Option<&str> {
        self.filter_subject.as_deref()
    }

    /// See [`deliver_policy`](Self::deliver_policy).
    pub fn get_deliver_policy(&self) -> DeliverPolicy {
        self.deliver_policy
    }

    /// See [`ack_policy`](Self::ack_policy).
    pub fn get_ack_policy(&self) -> AckPolicy {
        self.ack_policy
    }

    /// See [`max_deliver`](Self::max_deliver); `None` for unlimited.
    pub fn get_max_deliver(&self) -> Option<u32> {
        self.max_deliver
    }

    /// See [`ack_wait`](Self::ack_wait).
    pub fn get_ack_wait(&self) -> Duration {
        self.ack_wait
    }

    /// See [`backoff`](Self::backoff).
    pub fn get_backoff(&self) -> &[Duration] {
        &self.backoff
    }

    /// See [`max_ack_pending`](Self::max_ack_pending); `None` for the
    /// server's default.
    pub fn get_max_ack_pending(&self) -> Option<u32> {
        self.max_ack_pending
    }

    /// See [`auto_create`](Self::auto_create); `None` when the stream must
    /// exist.
    pub fn get_auto_create(&self) -> Option<&StreamAutoCreateConfig> {
        self.auto_create.as_ref()
    }

    /// See [`message_timeout`](Self::message_timeout).
    pub fn get_message_timeout(&self) -> Duration {
        self.message_timeout
    }

    /// See [`heartbeat`](Self::heartbeat).
    pub fn get_heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// See [`inactive_threshold`](Self::inactive_threshold).
    pub fn get_inactive_threshold(&self) -> Duration {
        self.inactive_threshold
    }

    fn validate(&self) -> Result<()> {
        subject::validate_name("stream", &self.stream)?;
        if let Some(name) = &self.durable {
            subject::validate_name("consumer", name)?;
        }
        if let Some(filter) = &self.filter_subject {
            subject::validate_subscribe(filter)?;
        }
        for (what, d) in [
            ("ack_wait", self.ack_wait),
            ("message_timeout", self.message_timeout),
            ("heartbeat", self.heartbeat),
            ("inactive_threshold", self.inactive_threshold),
        ] {
            check_nonzero(what, d)?;
        }
        for delay in &self.backoff {
            check_nonzero("a backoff delay", *delay)?;
        }
        if self.max_deliver == Some(0) || self.max_ack_pending == Some(0) {
            return Err(Error::InvalidArgument(
                "max_deliver and max_ack_pending must be at least 1 (leave them unset for no limit)"
                    .into(),
            ));
        }
        if !self.backoff.is_empty()
            && self
                .max_deliver
                .is_none_or(|max| usize::try_from(max).unwrap_or(usize::MAX) <= self.backoff.len())
        {
            return Err(Error::InvalidArgument(
                "backoff needs max_deliver greater than the number of delays".into(),
            ));
        }
        Ok(())
    }

    fn pull_config(&self, name: &str, resume_after: Option<u64>) -> Result<pull::Config> {
        let deliver_policy = match (resume_after, self.deliver_policy) {
            (Some(seq), _) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: seq + 1,
            },
            (None, DeliverPolicy::All) => consumer::DeliverPolicy::All,
            (None, DeliverPolicy::Last) => consumer::DeliverPolicy::Last,
            (None, DeliverPolicy::LastPerSubject) => consumer::DeliverPolicy::LastPerSubject,
            (None, DeliverPolicy::New) => consumer::DeliverPolicy::New,
            (None, DeliverPolicy::ByStartSequence(seq)) => {
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: seq,
                }
            }
            (None, DeliverPolicy::ByStartTime(at)) => consumer::DeliverPolicy::ByStartTime {
                start_time: to_offset_datetime(at)?,
            },
        };
        Ok(pull::Config {
            durable_name: self.durable.clone(),
            name: Some(name.to_owned()),
            filter_subject: self.filter_subject.clone().unwrap_or_default(),
            deliver_policy,
            ack_policy: match self.ack_policy {
                AckPolicy::Explicit => consumer::AckPolicy::Explicit,
                AckPolicy::None => consumer::AckPolicy::None,
                AckPolicy::All => consumer::AckPolicy::All,
            },
            ack_wait: self.ack_wait,
            // 0 asks the server for its default: unlimited deliveries.
            max_deliver: self.max_deliver.map_or(0, i64::from),
            backoff: self.backoff.clone(),
            max_ack_pending: self.max_ack_pending.map_or(0, i64::from),
            inactive_threshold: if self.durable.is_some() {
                Duration::ZERO
            } else {
                self.inactive_threshold
            },
            ..Default::default()
        })
    }
}

fn to_offset_datetime(at: SystemTime) -> Result<time::OffsetDateTime> {
    let nanos = match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => -i128::try_from(e.duration().as_nanos()).unwrap_or(i128::MAX),
    };
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .map_err(|e| Error::InvalidArgument(format!("start time out of range: {e}")))
}

/// Counters and health of a supervised consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// Messages delivered to the handler.
    pub delivered: u64,
    /// Deliveries that were redeliveries (delivery count above 1).
    pub redelivered: u64,
    /// Handler invocations that returned without error.
    pub handled: u64,
    /// Handlers that returned an error (the message was naked).
    pub errors: u64,
    /// Handlers that panicked (the message was naked).
    pub panics: u64,
    /// Handlers past the message timeout (cancelled, the message naked).
    pub timeouts: u64,
    /// Times the consumer was recreated on the server after being lost.
    pub recreations: u64,
    /// Stream sequence of the last handled message.
    pub last_stream_sequence: u64,
    /// The consumer's ack floor as last read from the server: every message
    /// at or below this stream sequence is settled. A recreated consumer
    /// resumes right after it.
    pub ack_floor: u64,
}

#[derive(Debug, Default)]
struct Counters {
    handled: AtomicU64,
    errors: AtomicU64,
    panics: AtomicU64,
    timeouts: AtomicU64,
    last_seq: AtomicU64,
    /// The server's ack floor (stream sequence): every message at or below
    /// it is acked or terminated. Recreation resumes right after it.
    ack_floor: AtomicU64,
    healthy: AtomicBool,
}

#[derive(Debug)]
struct ConsumerShared {
    stream: String,
    name: String,
    counters: Counters,
    /// Deliveries, redeliveries and recreations, also reported as metrics.
    metrics: ConsumerMetrics,
    stop: watch::Sender<bool>,
    done: watch::Receiver<bool>,
}

/// A running supervised consumer. Cheap to clone; dropping it does not stop
/// the consumer (use [`stop`](Self::stop) or the client's `stop_*` methods).
#[derive(Debug, Clone)]
pub struct ConsumerHandle {
    shared: Arc<ConsumerShared>,
}

impl ConsumerHandle {
    /// The stream name.
    pub fn stream(&self) -> &str {
        &self.shared.stream
    }

    /// The consumer name on the server (generated for ephemeral consumers).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Whether the pull stream is currently established.
    pub fn is_healthy(&self) -> bool {
        self.shared.counters.healthy.load(Ordering::Relaxed)
    }

    /// Whether the supervisor has stopped.
    pub fn is_stopped(&self) -> bool {
        *self.shared.done.borrow()
    }

    /// Counters.
    pub fn stats(&self) -> ConsumerStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ConsumerStats {
            delivered: self.shared.metrics.deliveries.get(),
            redelivered: self.shared.metrics.redeliveries.get(),
            handled: get(&c.handled),
            errors: get(&c.errors),
            panics: get(&c.panics),
            timeouts: get(&c.timeouts),
            recreations: self.shared.metrics.recreations.get(),
            last_stream_sequence: get(&c.last_seq),
            ack_floor: get(&c.ack_floor),
        }
    }

    /// Stops delivering (a handler already running finishes) and waits for
    /// the supervisor to end. A durable consumer stays on the server; an
    /// ephemeral one is deleted from it (best effort: otherwise the server
    /// removes it after its inactivity threshold). Idempotent.
    pub async fn stop(&self) {
        self.shared.stop.send_replace(true);
        let mut done = self.shared.done.clone();
        let _ = done.wait_for(|d| *d).await;
    }
}

impl crate::client::registry::Stoppable for ConsumerHandle {
    fn is_stopped(&self) -> bool {
        ConsumerHandle::is_stopped(self)
    }

    fn stop(&self) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(ConsumerHandle::stop(self))
    }
}

impl Client {
    /// Consumes `stream` with an ephemeral consumer, filtered by `filter`
    /// (`None` for every subject), delivering all messages. The handler gets
    /// each message and acknowledges it.
    ///
    /// # Errors
    /// See [`consume_with`](Self::consume_with).
    pub async fn consume<F, Fut>(
        &self,
        stream: &str,
        filter: Option<&str>,
        handler: F,
    ) -> Result<ConsumerHandle>
    where
        F: Handler<jetstream::Message, Fut>,
        Fut: HandlerFuture,
    {
        let mut config = StreamConsumerConfig::new(stream);
        if let Some(filter) = filter {
            config = config.filter_subject(filter);
        }
        self.consume_with(config, handler).await
    }

    /// Starts a supervised pull consumer.
    ///
    /// The handler acknowledges each message itself (`msg.ack().await`). A
    /// handler that returns an error, panics, or runs past the message
    /// timeout has its message naked (with explicit or all acks), and the
    /// consumer keeps running.
    ///
    /// The consumer is created (or, for a durable, opened) before this
    /// returns; then a supervisor keeps it delivering: when heartbeats stop
    /// or the consumer disappears, it is recreated with back-off under the
    /// same name, resuming at its ack floor as last read from the server:
    /// nothing unacknowledged is skipped, and messages acknowledged above
    /// the floor may come again (at-least-once).
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// use natskit::StreamConsumerConfig;
    /// let consumer = client
    ///     .consume_with(
    ///         StreamConsumerConfig::new("ORDERS").durable("billing"),
    ///         |msg: async_nats::jetstream::Message| async move {
    ///             println!("{}", msg.subject);
    ///             msg.ack().await
    ///         },
    ///     )
    ///     .await?;
    /// println!("{:?}", consumer.stats());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::InvalidArgument`] (zero intervals,
    /// a back-off without enough deliveries, a filter outside the stream's
    /// subjects), [`Error::StreamNotFound`] without auto-create, and the
    /// errors of creating the consumer.
    pub async fn consume_with<F, Fut>(
        &self,
        config: StreamConsumerConfig,
        handler: F,
    ) -> Result<ConsumerHandle>
    where
        F: Handler<jetstream::Message, Fut>,
        Fut: HandlerFuture,
    {
        self.ensure_open()?;
        config.validate()?;
        let name = config
            .durable
            .clone()
            .unwrap_or_else(|| format!("natskit_{}", nuid::next()));
        let (consumer, _) = open_consumer(self, &config, &name, None, true).await?;
        let initial_floor = consumer.cached_info().ack_floor.stream_sequence;
        let (stop, stop_rx) = watch::channel(false);
        let (done_tx, done) = watch::channel(false);
        let shared = Arc::new(ConsumerShared {
            stream: config.stream.clone(),
            name: name.clone(),
            counters: Counters::default(),
            metrics: self.metrics().consumer(&config.stream, &name),
            stop,
            done,
        });
        shared
            .counters
            .ack_floor
            .store(initial_floor, Ordering::Relaxed);
        let handle = ConsumerHandle {
            shared: shared.clone(),
        };
        self.consumers()
            .insert(&config.stream, &name, Arc::new(handle.clone()));
        let supervisor = Supervisor {
            client: self.downgrade(),
            shutdown: self.shutdown().clone(),
            config,
            name,
            handler: Arc::new(handler),
            shared,
        };
        self.tasks().spawn(async move {
            supervisor.run(consumer, stop_rx).await;
            let _ = done_tx.send(true);
        });
        Ok(handle)
    }

    /// A supervised consumer as a [`futures_util::Stream`] of messages
    /// ([`ConsumerStream`]): the same supervision as
    /// [`consume_with`](Self::consume_with)
    /// (recreated with back-off when lost, resuming at the ack floor). The
    /// caller acknowledges each message. A message not taken from the stream
    /// within the config's message timeout is nak'd and comes again.
    /// Dropping the stream stops the consumer (deleting it when ephemeral).
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// use futures_util::StreamExt;
    /// use natskit::StreamConsumerConfig;
    /// let mut orders = client
    ///     .consume_messages(StreamConsumerConfig::new("ORDERS").durable("billing"))
    ///     .await?;
    /// while let Some(msg) = orders.next().await {
    ///     println!("{}", msg.subject);
    ///     msg.ack().await.ok();
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// See [`consume_with`](Self::consume_with).
    pub async fn consume_messages(&self, config: StreamConsumerConfig) -> Result<ConsumerStream> {
        let (tx, rx) = tokio::sync::mpsc::channel::<jetstream::Message>(1);
        let handle = self
            .consume_with(config, move |msg: jetstream::Message| {
                let tx = tx.clone();
                async move {
                    tx.send(msg)
                        .await
                        .map_err(|_| BoxError::from("the consumer stream was dropped"))
                }
            })
            .await?;
        Ok(ConsumerStream { rx, handle })
    }

    /// Stops the consumer `name` on `stream` that this client runs, as
    /// [`ConsumerHandle::stop`] does: a durable consumer stays on the server,
    /// an ephemeral one is deleted. Stopping an unknown or stopped consumer
    /// does nothing.
    pub async fn stop_consumer(&self, stream: &str, name: &str) {
        if let Some(handle) = self.consumers().remove(stream, name) {
            handle.stop().await;
        }
    }

    /// Names of the consumers this client runs on `stream`.
    pub fn consumer_names_on(&self, stream: &str) -> Vec<String> {
        self.consumers().names_on(stream)
    }

    /// Stops every consumer this client runs.
    pub async fn stop_all_consumers(&self) {
        self.consumers().stop_all().await;
    }

    /// Stops the consumer and deletes it from the server, losing its
    /// position. A consumer that does not exist is not an error.
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::StreamNotFound`],
    /// [`Error::JetStreamUnavailable`], [`Error::JetStream`].
    pub async fn stop_and_delete_consumer(&self, stream: &str, name: &str) -> Result<()> {
        self.ensure_open()?;
        subject::validate_name("consumer", name)?;
        self.stop_consumer(stream, name).await;
        let stream = self.get_stream(stream).await?;
        let permit = self.guard()?;
        let result = match stream.delete_consumer(name).await {
            Ok(_) => Ok(()),
            Err(err) if is_consumer_not_found(&err.kind()) => Ok(()),
            Err(err) => Err(map_consumer("delete consumer", err)),
        };
        permit.record(result)
    }
}

/// Gets or creates the consumer. `create` forces a create (first start);
/// otherwise an existing consumer is reused and a missing one recreated
/// from `resume_after`.
async fn open_consumer(
    client: &Client,
    config: &StreamConsumerConfig,
    name: &str,
    resume_after: Option<u64>,
    create: bool,
) -> Result<(PullConsumer, bool)> {
    let stream = match client.get_stream(&config.stream).await {
        Ok(stream) => stream,
        Err(Error::StreamNotFound { .. }) if config.auto_create.is_some() => {
            let auto = config.auto_create.clone().unwrap_or_default();
            let filter = config.filter_subject.as_deref().unwrap_or("");
            client
                .ensure_stream(auto.to_stream_config(&config.stream, filter))
                .await?
        }
        Err(err) => return Err(err),
    };
    if let Some(filter) = &config.filter_subject {
        let subjects = &stream.cached_info().config.subjects;
        if !subjects.is_empty() && !subjects.iter().any(|s| subject::covers(s, filter)) {
            return Err(Error::InvalidArgument(format!(
                "filter {filter:?} is outside the subjects {subjects:?} of stream {:?}",
                config.stream
            )));
        }
    }
    let permit = client.guard()?;
    let result = if create {
        stream
            .create_consumer(config.pull_config(name, resume_after)?)
            .await
            .map(|c| (c, false))
            .map_err(|e| map_consumer("create consumer", e))
    } else {
        use async_nats::jetstream::context::ConsumerInfoErrorKind as InfoKind;
        match stream.consumer_info(name).await {
            Ok(_) => stream
                .get_consumer::<pull::Config>(name)
                .await
                .map(|c| (c, false))
                .map_err(|e| Error::JetStreamUnavailable {
                    op: "get consumer",
                    source: e,
                }),
            Err(err) if err.kind() == InfoKind::NotFound => {
                tracing::info!(consumer = %name, ?resume_after, "consumer gone from the server; recreating");
                stream
                    .create_consumer(config.pull_config(name, resume_after)?)
                    .await
                    .map(|c| (c, true))
                    .map_err(|e| map_consumer("recreate consumer", e))
            }
            Err(err)
                if matches!(
                    err.kind(),
                    InfoKind::TimedOut
                        | InfoKind::NoResponders
                        | InfoKind::Request
                        | InfoKind::Offline
                ) =>
            {
                Err(Error::JetStreamUnavailable {
                    op: "consumer info",
                    source: err.into(),
                })
            }
            Err(err) => Err(Error::JetStream {
                op: "consumer info",
                source: err.into(),
            }),
        }
    };
    permit.record(result)
}

/// How often the supervisor reads the consumer's ack floor while messages
/// flow. Messages acked since the last read are delivered again if the
/// consumer must be recreated (at-least-once); none is ever skipped.
const ACK_FLOOR_INTERVAL: Duration = Duration::from_secs(1);

struct Supervisor<F> {
    /// Weak: a running consumer must not keep a dropped client alive.
    client: WeakClient,
    shutdown: tokio_util::sync::CancellationToken,
    config: StreamConsumerConfig,
    name: String,
    handler: Arc<F>,
    shared: Arc<ConsumerShared>,
}

impl<F, Fut> Supervisor<F>
where
    // An impl needs `Fut` bound through `Fn`'s output.
    F: Fn(jetstream::Message) -> Fut + Send + Sync + 'static,
    Fut: HandlerFuture,
{
    async fn run(self, first: PullConsumer, mut stop: watch::Receiver<bool>) {
        let stopped = self.deliver(first, &mut stop).await;
        self.shared.counters.healthy.store(false, Ordering::Relaxed);
        if stopped && self.config.durable.is_none() {
            self.delete_ephemeral().await;
        }
    }

    /// Deletes the ephemeral consumer from the server once stopped.
    async fn delete_ephemeral(&self) {
        let Some(client) = self.client.upgrade() else {
            return;
        };
        let Ok(js) = client.jetstream() else { return };
        let deleted = tokio::time::timeout(
            Duration::from_secs(2),
            js.delete_consumer_from_stream(&self.name, &self.config.stream),
        )
        .await;
        match deleted {
            Ok(Ok(_)) => tracing::debug!(consumer = %self.name, "ephemeral consumer deleted"),
            Ok(Err(err)) => {
                tracing::debug!(consumer = %self.name, %err, "could not delete the ephemeral consumer")
            }
            Err(_) => {
                tracing::debug!(consumer = %self.name, "deleting the ephemeral consumer timed out")
            }
        }
    }

    /// Delivers until stopped (`true`) or the client is gone (`false`).
    async fn deliver(&self, first: PullConsumer, stop: &mut watch::Receiver<bool>) -> bool {
        let counters = &self.shared.counters;
        let mut waits = Retry::new(retry::RECREATE);
        let mut consumer = Some(first);
        loop {
            if *stop.borrow() {
                return true;
            }
            let Some(client) = self.client.upgrade() else {
                return false;
            };
            let current = match consumer.take() {
                Some(c) => Ok(c),
                None => {
                    // Resume at the lowest sequence not yet settled: a
                    // nak'd, failed or in-flight message is delivered again.
                    let floor = counters.ack_floor.load(Ordering::Relaxed);
                    open_consumer(&client, &self.config, &self.name, Some(floor), false)
                        .await
                        .map(|(consumer, recreated)| {
                            if recreated {
                                self.shared.metrics.recreations.add(1);
                            }
                            consumer
                        })
                }
            };
            drop(client);
            let (messages, current) = match current {
                Ok(c) => (
                    c.stream()
                        .heartbeat(self.config.heartbeat)
                        .expires(self.config.heartbeat * 6)
                        .messages()
                        .await
                        .map_err(|e| Error::JetStreamUnavailable {
                            op: "pull",
                            source: e.into(),
                        }),
                    Some(c),
                ),
                Err(e) => (Err(e), None),
            };
            let mut messages = match messages {
                Ok(m) => m,
                Err(err) => {
                    counters.healthy.store(false, Ordering::Relaxed);
                    let delay = waits.next_delay();
                    tracing::warn!(stream = %self.config.stream, consumer = %self.name, %err, ?delay, "consumer unavailable; retrying");
                    tokio::select! {
                        _ = stop.changed() => return true,
                        () = self.shutdown.cancelled() => return false,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            counters.healthy.store(true, Ordering::Relaxed);
            waits.reset();
            let mut floor_ticker = tokio::time::interval(ACK_FLOOR_INTERVAL);
            floor_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut delivered_since_read = false;
            let mut reading: Option<std::pin::Pin<Box<dyn Future<Output = Option<u64>> + Send>>> =
                None;
            // Made once per session, not per message (it takes a lock).
            let mut cancelled = std::pin::pin!(self.shutdown.cancelled());
            loop {
                // Read while something was delivered since the last read, or
                // the floor is still below what was delivered (acks are
                // applied by the server asynchronously; a nak'd message
                // holds the floor until it is redelivered and acked).
                let behind = counters.ack_floor.load(Ordering::Relaxed)
                    < counters.last_seq.load(Ordering::Relaxed);
                let read_floor = reading.is_none() && (delivered_since_read || behind);
                let floor_read = async {
                    match reading.as_mut() {
                        Some(fut) => fut.await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    _ = stop.changed() => return true,
                    () = &mut cancelled => return false,
                    floor = floor_read => {
                        reading = None;
                        if let Some(floor) = floor {
                            counters.ack_floor.fetch_max(floor, Ordering::Relaxed);
                        }
                    }
                    _ = floor_ticker.tick(), if read_floor => {
                        delivered_since_read = false;
                        if let Some(mut c) = current.clone() {
                            reading = Some(Box::pin(async move {
                                c.info().await.ok().map(|i| i.ack_floor.stream_sequence)
                            }));
                        }
                    }
                    next = messages.next() => match next {
                        Some(Ok(message)) => {
                            delivered_since_read = true;
                            self.dispatch(message).await;
                        }
                        Some(Err(err)) => {
                            use async_nats::jetstream::consumer::pull::MessagesErrorKind as K;
                            match err.kind() {
                                K::MissingHeartbeat | K::ConsumerDeleted | K::NoResponders | K::PushBasedConsumer => {
                                    tracing::warn!(stream = %self.config.stream, consumer = %self.name, %err, "consumer stream lost; recreating");
                                    break;
                                }
                                _ => tracing::debug!(consumer = %self.name, %err, "pull error"),
                            }
                        }
                        None => break,
                    }
                }
            }
            counters.healthy.store(false, Ordering::Relaxed);
        }
    }

    async fn dispatch(&self, message: jetstream::Message) {
        let counters = &self.shared.counters;
        let (stream_seq, delivered) = message
            .info()
            .map(|i| (i.stream_sequence, i.delivered))
            .unwrap_or((0, 1));
        let reply = message.reply.clone();
        self.shared.metrics.deliveries.add(1);
        if delivered > 1 {
            self.shared.metrics.redeliveries.add(1);
        }
        let headers = message.headers.clone();
        let timeout = self.config.message_timeout;
        let failed = match invoke(headers.as_ref(), timeout, (self.handler)(message)).await {
            Invocation::Done(outcome) => match outcome.into_result() {
                Ok(()) => {
                    counters.handled.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Err(err) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(consumer = %self.name, %err, "consumer handler failed; naking");
                    true
                }
            },
            Invocation::Panicked(what) => {
                counters.panics.fetch_add(1, Ordering::Relaxed);
                tracing::error!(consumer = %self.name, panic = %what, "consumer handler panicked; naking");
                true
            }
            Invocation::TimedOut => {
                counters.timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(consumer = %self.name, ?timeout, "consumer handler timed out; naking");
                true
            }
        };
        if failed
            && self.config.ack_policy != AckPolicy::None
            && let Some(reply) = reply
            && let Some(client) = self.client.upgrade()
            && let Ok(conn) = client.nats()
        {
            let _ = conn.publish(reply, AckKind::Nak(None).into()).await;
        }
        if stream_seq > 0 {
            counters.last_seq.fetch_max(stream_seq, Ordering::Relaxed);
        }
    }
}

/// A supervised consumer as a [`futures_util::Stream`] of JetStream
/// messages, from [`Client::consume_messages`]. Dropping it stops the
/// consumer.
#[derive(Debug)]
pub struct ConsumerStream {
    rx: tokio::sync::mpsc::Receiver<jetstream::Message>,
    handle: ConsumerHandle,
}

impl ConsumerStream {
    /// The supervised consumer behind the stream: name, stats, health.
    pub fn handle(&self) -> &ConsumerHandle {
        &self.handle
    }
}

impl futures_util::Stream for ConsumerStream {
    type Item = jetstream::Message;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<jetstream::Message>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for ConsumerStream {
    fn drop(&mut self) {
        // Signal only: the supervisor stops (and deletes an ephemeral
        // consumer) on its own task.
        self.handle.shared.stop.send_replace(true);
    }
}

/// Marks a work error as permanent: [`consume_with_heartbeat`] terminates
/// the message instead of naking it, so it is never redelivered.
#[derive(Debug)]
pub struct Permanent(pub BoxError);

impl std::fmt::Display for Permanent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "permanent failure: {}", self.0)
    }
}

impl std::error::Error for Permanent {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// How [`consume_with_heartbeat`] settled the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settled {
    /// The work succeeded; the message was acknowledged.
    Acked,
    /// The work failed; the message was naked with a 30 s delay.
    Naked,
    /// The work failed permanently; the message was terminated.
    Terminated,
}

/// Runs `work` for `message` while telling the server every `interval`
/// that the work is in progress, so a short ack wait detects dead workers
/// while long work still completes.
///
/// Owns the acknowledgement: success acks; an error naks with a 30 s delay;
/// an error wrapped in [`Permanent`] terminates the message; dropping the
/// returned future (cancellation) naks with a 5 s delay. If an in-progress
/// signal cannot be sent, the work is cancelled (not left running) and the
/// error returned; the server will redeliver.
///
/// ```no_run
/// # async fn demo(msg: async_nats::jetstream::Message) -> natskit::Result<()> {
/// use std::time::Duration;
/// let settled = natskit::consume_with_heartbeat(&msg, Duration::from_secs(5), async {
///     // long work
///     Ok::<_, std::io::Error>(())
/// })
/// .await?;
/// # let _ = settled; Ok(()) }
/// ```
///
/// # Errors
/// [`Error::InvalidArgument`] for a zero interval (the message is not
/// touched); [`Error::JetStream`] when an in-progress or the final
/// acknowledgement could not be sent.
pub async fn consume_with_heartbeat<W, E>(
    message: &jetstream::Message,
    interval: Duration,
    work: W,
) -> Result<Settled>
where
    W: Future<Output = std::result::Result<(), E>>,
    E: Into<BoxError>,
{
    check_nonzero("heartbeat interval", interval)?;
    let ack_error = |op: &'static str, e: async_nats::Error| Error::JetStream { op, source: e };
    let mut guard = NakOnDrop {
        message: Some(message.clone()),
    };
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let mut work = std::pin::pin!(work);
    let outcome = loop {
        tokio::select! {
            result = &mut work => break result.map_err(Into::into),
            _ = ticker.tick() => {
                if let Err(err) = message.ack_with(AckKind::Progress).await {
                    guard.message = None; // the server redelivers; do not nak
                    return Err(ack_error("in-progress", err));
                }
            }
        }
    };
    guard.message = None;
    match outcome {
        Ok(()) => {
            message.ack().await.map_err(|e| ack_error("ack", e))?;
            Ok(Settled::Acked)
        }
        Err(err) if err.downcast_ref::<Permanent>().is_some() => {
            tracing::warn!(%err, "permanent failure; terminating message");
            message
                .ack_with(AckKind::Term)
                .await
                .map_err(|e| ack_error("term", e))?;
            Ok(Settled::Terminated)
        }
        Err(err) => {
            tracing::warn!(%err, "work failed; naking message for 30 s");
            message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(30))))
                .await
                .map_err(|e| ack_error("nak", e))?;
            Ok(Settled::Naked)
        }
    }
}

/// Naks with a 5 s delay when `consume_with_heartbeat` is cancelled.
struct NakOnDrop {
    message: Option<jetstream::Message>,
}

impl Drop for NakOnDrop {
    fn drop(&mut self) {
        if let Some(message) = self.message.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                    .await;
            });
        }
    }
}
