//! [`StreamConsumerConfig`]: every setting of a supervised consumer, checked
//! before any I/O.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::{self, pull};

use crate::core::error::{Error, Result, check_nonzero};
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
    pub(crate) stream: String,
    pub(crate) durable: Option<String>,
    pub(crate) filter_subject: Option<String>,
    pub(crate) deliver_policy: DeliverPolicy,
    pub(crate) ack_policy: AckPolicy,
    pub(crate) max_deliver: Option<u32>,
    pub(crate) ack_wait: Duration,
    pub(crate) backoff: Vec<Duration>,
    pub(crate) max_ack_pending: Option<u32>,
    pub(crate) auto_create: Option<StreamAutoCreateConfig>,
    pub(crate) message_timeout: Duration,
    pub(crate) heartbeat: Duration,
    pub(crate) inactive_threshold: Duration,
    pub(crate) auto_ack: bool,
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
            auto_ack: false,
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
        /// Deadline of one handler invocation, counted from its first wait
        /// (as [`ClientBuilder::handler_deadline`](crate::ClientBuilder::handler_deadline));
        /// a handler past it is cancelled and the message naked (default 30 s).
        message_timeout: Duration => message_timeout);

    setter!(
        /// Idle heartbeat of the pull stream; two missed ones make the
        /// supervisor recreate the consumer (default 5 s).
        heartbeat: Duration => heartbeat);

    setter!(
        /// How long an ephemeral consumer survives without this client before
        /// the server removes it (default 5 min).
        inactive_threshold: Duration => inactive_threshold);

    /// natskit acknowledges each message whose handler returned `Ok`
    /// (default: off, the handler acknowledges itself). Because natskit
    /// then knows what it acknowledged, it remembers those messages above
    /// the ack floor (up to 65,536, the oldest forgotten first) and, when a recreated consumer delivers
    /// one of them again, acknowledges it again without calling the handler
    /// ([`ConsumerStats::repeats_skipped`](crate::ConsumerStats::repeats_skipped)).
    /// At-least-once stays the promise: what was not remembered (a restart
    /// of the process, more than the bound) reaches the handler again.
    /// Needs an ack policy other than [`AckPolicy::None`].
    pub fn auto_ack(mut self, on: bool) -> Self {
        self.auto_ack = on;
        self
    }

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

    /// See [`auto_ack`](Self::auto_ack).
    pub fn get_auto_ack(&self) -> bool {
        self.auto_ack
    }

    /// See [`inactive_threshold`](Self::inactive_threshold).
    pub fn get_inactive_threshold(&self) -> Duration {
        self.inactive_threshold
    }

    pub(crate) fn validate(&self) -> Result<()> {
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
        if self.auto_ack && self.ack_policy == AckPolicy::None {
            return Err(Error::InvalidArgument(
                "auto_ack needs an ack policy other than None".into(),
            ));
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

    pub(crate) fn pull_config(
        &self,
        name: &str,
        resume_after: Option<u64>,
    ) -> Result<pull::Config> {
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
