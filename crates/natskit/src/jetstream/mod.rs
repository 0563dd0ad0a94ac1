//! JetStream streams and publishing: create/get/ensure/delete streams,
//! acknowledged publishing with preconditions and retry, and a pipelined
//! publisher for throughput.

pub(crate) mod consumer;
pub(crate) mod monitor;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::core::subject::IntoSubject;
use crate::core::sync::lock;
use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{Semaphore, mpsc};

pub use async_nats::jetstream::publish::PublishAck;

use crate::client::Client;
use crate::client::jetstream_errors::{
    map_create_stream, map_delete_stream, map_get_stream, map_publish, timed_out, unavailable,
};
use crate::client::retry::{self, Retry};
use crate::core::backoff::RetryConfig;
use crate::core::error::{Error, Result};
use crate::core::subject;

/// Options of one acknowledged publish.
///
/// ```
/// use std::time::Duration;
/// let opts = natskit::StreamPublishOptions::new()
///     .message_id("order-42")          // server-side de-duplication
///     .expected_last_sequence(41)      // optimistic concurrency
///     .timeout(Duration::from_secs(2));
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct StreamPublishOptions {
    message_id: Option<String>,
    expected_last_sequence: Option<u64>,
    expected_last_subject_sequence: Option<u64>,
    expected_stream: Option<String>,
    headers: Option<HeaderMap>,
    timeout: Option<Duration>,
    retry: Option<RetryConfig>,
}

impl StreamPublishOptions {
    /// No options: the client's retry settings, the JetStream timeout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `Nats-Msg-Id`: the stream stores a message id once per
    /// duplicate window, so retries cannot duplicate it.
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Rejects the publish unless the stream's last sequence is `seq`.
    pub fn expected_last_sequence(mut self, seq: u64) -> Self {
        self.expected_last_sequence = Some(seq);
        self
    }

    /// Rejects the publish unless the last sequence on this subject is `seq`.
    pub fn expected_last_subject_sequence(mut self, seq: u64) -> Self {
        self.expected_last_subject_sequence = Some(seq);
        self
    }

    /// Rejects the publish unless it lands in stream `name`.
    pub fn expected_stream(mut self, name: impl Into<String>) -> Self {
        self.expected_stream = Some(name.into());
        self
    }

    /// Headers to send.
    pub fn headers(mut self, headers: HeaderMap) -> Self {
        self.headers = Some(headers);
        self
    }

    /// Bound on waiting for the ack, per attempt.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Retries while JetStream is unavailable (default: 10 retries from 100 ms
    /// to 1 s; a resend carries the same message id).
    pub fn retry(mut self, retry: RetryConfig) -> Self {
        self.retry = Some(retry);
        self
    }

    /// Checks the values the options put in headers (the caller's own
    /// headers are checked by `Client::prologue`).
    fn validate(&self) -> Result<()> {
        use async_nats::header;
        if let Some(id) = &self.message_id {
            if id.is_empty() {
                return Err(Error::InvalidHeader {
                    name: header::NATS_MESSAGE_ID.to_string(),
                    reason: "empty message id",
                });
            }
            crate::core::header::validate_value(header::NATS_MESSAGE_ID.as_ref(), id)?;
        }
        if let Some(stream) = &self.expected_stream {
            subject::validate_name("stream", stream)?;
        }
        Ok(())
    }

    /// Every header this publish carries: the caller's, then the options'.
    /// Call [`validate`](Self::validate) first.
    fn header_map(&self) -> Option<HeaderMap> {
        use async_nats::header;
        let mut headers = self.headers.clone().unwrap_or_default();
        if let Some(id) = &self.message_id {
            headers.insert(header::NATS_MESSAGE_ID, id.as_str());
        }
        if let Some(seq) = self.expected_last_sequence {
            headers.insert(
                header::NATS_EXPECTED_LAST_SEQUENCE,
                seq.to_string().as_str(),
            );
        }
        if let Some(seq) = self.expected_last_subject_sequence {
            headers.insert(
                header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                seq.to_string().as_str(),
            );
        }
        if let Some(stream) = &self.expected_stream {
            headers.insert(header::NATS_EXPECTED_STREAM, stream.as_str());
        }
        (!headers.is_empty()).then_some(headers)
    }
}

/// How long one send of a stream publish waits for its ack before it is
/// sent again with the same message id.
const RESEND_ACK_WAIT: Duration = Duration::from_secs(1);

/// Default retry of JetStream publishes while JetStream is unavailable.
fn default_publish_retry() -> RetryConfig {
    RetryConfig {
        max_retries: 10,
        backoff: retry::STREAM_PUBLISH,
    }
}

/// The stream configuration fields [`Client::ensure_stream`] compares, and
/// whether the server can change each in place.
fn config_differences(
    want: &stream::Config,
    have: &stream::Config,
) -> (Vec<&'static str>, Vec<&'static str>) {
    let mut fixed = Vec::new();
    let mut updatable = Vec::new();
    if want.storage != have.storage {
        fixed.push("storage");
    }
    if want.retention != have.retention {
        fixed.push("retention");
    }
    let mut want_subjects = want.subjects.clone();
    let mut have_subjects = have.subjects.clone();
    want_subjects.sort();
    have_subjects.sort();
    if want_subjects != have_subjects {
        updatable.push("subjects");
    }
    let limit = |v: i64| if v <= 0 { -1 } else { v };
    if limit(want.max_messages) != limit(have.max_messages) {
        updatable.push("max_messages");
    }
    if limit(want.max_bytes) != limit(have.max_bytes) {
        updatable.push("max_bytes");
    }
    if limit(want.max_messages_per_subject) != limit(have.max_messages_per_subject) {
        updatable.push("max_messages_per_subject");
    }
    if want.max_age != have.max_age {
        updatable.push("max_age");
    }
    if want.num_replicas.max(1) != have.num_replicas.max(1) {
        updatable.push("num_replicas");
    }
    if want.description.is_some() && want.description != have.description {
        updatable.push("description");
    }
    if !want.duplicate_window.is_zero() && want.duplicate_window != have.duplicate_window {
        updatable.push("duplicate_window");
    }
    if want.discard != have.discard {
        updatable.push("discard");
    }
    (fixed, updatable)
}

impl Client {
    /// A JetStream context on this client's connection.
    ///
    /// # Errors
    /// [`Error::NotConnected`] before the first connection, [`Error::Closed`].
    pub fn jetstream(&self) -> Result<&async_nats::jetstream::Context> {
        let conn = self.nats()?;
        Ok(self
            .jetstream_cell()
            .get_or_init(|| async_nats::jetstream::new(conn.clone())))
    }

    /// The breaker, then the connection: the checks every JetStream call
    /// makes after its input was validated (see [`Client::publish`] for the
    /// order).
    pub(crate) fn js_call(
        &self,
    ) -> Result<(
        crate::client::breaker::Permit<'_>,
        &async_nats::jetstream::Context,
    )> {
        let permit = self.guard()?;
        self.live_conn()?;
        Ok((permit, self.jetstream()?))
    }

    /// Creates a stream.
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// use async_nats::jetstream::stream;
    /// let stream = client
    ///     .create_stream(stream::Config {
    ///         name: "EVENTS".into(),
    ///         subjects: vec!["events.>".into()],
    ///         ..Default::default()
    ///     })
    ///     .await?;
    /// # let _ = stream; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::InvalidSubject`] for a bad subject,
    /// [`Error::JetStreamUnavailable`], [`Error::JetStream`] (for example
    /// when a stream with another config exists).
    pub async fn create_stream(&self, config: stream::Config) -> Result<stream::Stream> {
        self.ensure_open()?;
        check_stream_config(&config)?;
        let (permit, js) = self.js_call()?;
        let name = config.name.clone();
        let result = js
            .create_stream(config)
            .await
            .map_err(|e| map_create_stream("create stream", &name, e));
        permit.record(result)
    }

    /// Gets an existing stream.
    ///
    /// # Errors
    /// [`Error::StreamNotFound`] (an answer, not a breaker failure),
    /// [`Error::InvalidName`], [`Error::JetStreamUnavailable`].
    pub async fn get_stream(&self, name: &str) -> Result<stream::Stream> {
        self.ensure_open()?;
        subject::validate_name("stream", name)?;
        let (permit, js) = self.js_call()?;
        let result = js
            .get_stream(name)
            .await
            .map_err(|e| map_get_stream(name, e));
        permit.record(result)
    }

    /// Deletes a stream; `Ok(false)` when it did not exist.
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::JetStreamUnavailable`], [`Error::JetStream`].
    pub async fn delete_stream(&self, name: &str) -> Result<bool> {
        self.ensure_open()?;
        subject::validate_name("stream", name)?;
        let (permit, js) = self.js_call()?;
        let result = match js.delete_stream(name).await {
            Ok(status) => Ok(status.success),
            Err(err) => map_delete_stream(err),
        };
        permit.record(result)
    }

    /// Gets the stream, creating it when missing. When it exists with a
    /// different configuration, fields the server can change in place
    /// (subjects, limits, replicas, description...) are updated; fields it
    /// cannot (storage, retention) give [`Error::StreamConfigConflict`]
    /// naming them. The requested configuration is never silently ignored.
    ///
    /// # Errors
    /// As [`create_stream`](Self::create_stream), plus the conflict above.
    pub async fn ensure_stream(&self, config: stream::Config) -> Result<stream::Stream> {
        self.ensure_open()?;
        check_stream_config(&config)?;
        let mut existing = match self.get_stream(&config.name).await {
            Ok(stream) => stream,
            Err(Error::StreamNotFound { .. }) => match self.create_stream(config.clone()).await {
                // Refused: either another client created it first (compare
                // with the winner's config below) or the server rejects the
                // config (report that).
                Err(err @ Error::JetStream { .. }) => match self.get_stream(&config.name).await {
                    Ok(stream) => stream,
                    Err(_) => return Err(err),
                },
                other => return other,
            },
            Err(err) => return Err(err),
        };
        let have = existing.cached_info().config.clone();
        let (fixed, updatable) = config_differences(&config, &have);
        if !fixed.is_empty() {
            return Err(Error::StreamConfigConflict {
                stream: config.name,
                fields: fixed,
            });
        }
        if updatable.is_empty() {
            return Ok(existing);
        }
        tracing::info!(stream = %config.name, fields = ?updatable, "updating stream configuration");
        let (permit, js) = self.js_call()?;
        let result = js
            .update_stream(&config)
            .await
            .map_err(|e| map_create_stream("update stream", &config.name, e));
        permit.record(result)?;
        existing
            .info()
            .await
            .map_err(|e| unavailable("stream info", e))?;
        Ok(existing)
    }

    /// Publishes to a stream and returns its acknowledgement (stream,
    /// sequence, duplicate flag).
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// let ack = client.publish_to_stream("events.user.created", "{}").await?;
    /// println!("stored in {} at {}", ack.stream, ack.sequence);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// See [`publish_to_stream_with`](Self::publish_to_stream_with).
    pub async fn publish_to_stream(
        &self,
        subject: impl IntoSubject,
        payload: impl Into<Bytes>,
    ) -> Result<PublishAck> {
        self.publish_to_stream_with(subject, payload, StreamPublishOptions::new())
            .await
    }

    /// Publishes to a stream with options and returns the acknowledgement.
    ///
    /// Every publish carries a `Nats-Msg-Id` (natskit assigns a unique one
    /// when none is set), so a resend can never store the message twice
    /// within the stream's duplicate window. That makes every failure safe
    /// to retry: while JetStream is unavailable (no responders during an
    /// election or restart, no ack in time), the publish is resent with
    /// back-off; and when the connection drops while the ack is awaited,
    /// it is resent as soon as the client has reconnected instead of
    /// waiting out the ack timeout. The whole call is one breaker outcome.
    ///
    /// # Errors
    /// [`Error::Closed`], [`Error::InvalidSubject`], [`Error::PayloadTooLarge`]
    /// (payload plus every header the options add), [`Error::CircuitOpen`],
    /// [`Error::NotConnected`], [`Error::StreamNotFound`] (only when the
    /// server confirms that no stream captures the subject),
    /// [`Error::PublishRejected`] (a precondition failed),
    /// [`Error::JetStreamTimeout`], [`Error::JetStreamUnavailable`].
    pub async fn publish_to_stream_with(
        &self,
        subject: impl IntoSubject,
        payload: impl Into<Bytes>,
        mut options: StreamPublishOptions,
    ) -> Result<PublishAck> {
        let subject = subject.into_subject();
        let payload = payload.into();
        let caller_headers = options.headers.take();
        let out = self.prologue(&subject, caller_headers, payload.len(), |traced| {
            options.validate()?;
            options.headers = traced;
            if options.message_id.is_none() {
                options.message_id = Some(nuid::next().to_string());
            }
            Ok(options.header_map())
        })?;
        let (permit, headers) = (out.permit, out.headers);
        // The shared context, or a copy with this call's timeout.
        let with_timeout;
        let js = match options.timeout {
            None => self.jetstream()?,
            Some(timeout) => {
                let mut js = self.jetstream()?.clone();
                js.set_timeout(timeout);
                with_timeout = js;
                &with_timeout
            }
        };
        let retry = options.retry.unwrap_or_else(default_publish_retry);
        let mut epoch = self.connection_epoch();
        let mut waits = Retry::new(retry.backoff);
        let result = loop {
            let message = match &headers {
                Some(h) => PublishMessage::build()
                    .payload(payload.clone())
                    .headers(h.clone()),
                None => PublishMessage::build().payload(payload.clone()),
            };
            epoch.borrow_and_update();
            // Each send waits at most a second for its ack before it is sent
            // again (the id makes a resend harmless), so a publish that went
            // to a leader that just died is not held up for the whole ack
            // timeout while a new leader is elected.
            let resend_wait = tokio::time::sleep(RESEND_ACK_WAIT);
            let outcome = match js.send_publish(subject.clone(), message).await {
                Ok(ack) => {
                    tokio::select! {
                        ack = ack => ack.map_err(|e| map_publish(&subject, e)),
                        () = resend_wait => Err(timed_out("publish", format!("no ack within {RESEND_ACK_WAIT:?} of a resend"))),
                        // The connection dropped and came back while the
                        // ack was awaited: it will never come; resend now.
                        _ = epoch.changed() => Err(unavailable("publish", "reconnected while awaiting the ack")),
                    }
                }
                Err(e) => Err(map_publish(&subject, e)),
            };
            let retriable = matches!(
                &outcome,
                Err(Error::StreamNotFound { .. }
                    | Error::JetStreamUnavailable { .. }
                    | Error::JetStreamTimeout { .. })
            );
            if !retriable || waits.attempt() >= retry.max_retries || self.ensure_open().is_err() {
                break outcome;
            }
            tracing::debug!(%subject, attempt = waits.attempt(), "JetStream unavailable; retrying publish");
            self.metrics().retry("stream_publish");
            waits.wait_or_reconnect(&mut epoch).await;
        };
        let result = match result {
            Err(Error::StreamNotFound { .. }) => {
                Err(self.confirm_stream_missing(js, &subject).await)
            }
            other => other,
        };
        permit.record(result)
    }

    /// After no-responders on a stream publish: asks the server whether a
    /// stream captures `subject`. [`Error::StreamNotFound`] only when it
    /// answers that none does; a stream without a leader (an election) is
    /// [`Error::JetStreamUnavailable`].
    pub(crate) async fn confirm_stream_missing(
        &self,
        js: &async_nats::jetstream::Context,
        subject: &str,
    ) -> Error {
        use async_nats::jetstream::context::GetStreamByNameErrorKind;
        match js.stream_by_subject(subject).await {
            Err(err) if matches!(err.kind(), GetStreamByNameErrorKind::NotFound) => {
                Error::StreamNotFound {
                    stream: None,
                    subject: Some(subject.to_owned()),
                }
            }
            Ok(stream) => unavailable(
                "publish",
                format!("stream {stream:?} captures {subject:?} but did not answer (no leader?)"),
            ),
            Err(err) => unavailable("publish", err),
        }
    }

    /// A publisher that keeps up to `max_in_flight` acknowledgements
    /// outstanding: for throughput, where awaiting each ack would cap a
    /// client at one round trip per message.
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// let publisher = client.stream_publisher(256)?;
    /// for i in 0..10_000 {
    ///     publisher.publish(format!("events.{i}"), "payload").await?;
    /// }
    /// let report = publisher.flush().await; // waits for every ack
    /// assert_eq!(report.acked, 10_000);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for zero, [`Error::NotConnected`], [`Error::Closed`].
    pub fn stream_publisher(&self, max_in_flight: usize) -> Result<StreamPublisher> {
        if max_in_flight == 0 {
            return Err(Error::InvalidArgument(
                "max_in_flight must be at least 1".into(),
            ));
        }
        let conn = self.nats()?.clone();
        let js = async_nats::jetstream::ContextBuilder::new()
            .max_ack_inflight(max_in_flight)
            .build(conn);
        let (acks, ack_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(PublisherShared::default());
        let slots = Arc::new(Semaphore::new(max_in_flight));
        tokio::spawn(collect_acks(ack_rx, shared.clone()));
        Ok(StreamPublisher {
            client: self.clone(),
            js,
            acks,
            shared,
            slots,
            max_in_flight,
        })
    }
}

fn check_stream_config(config: &stream::Config) -> Result<()> {
    subject::validate_name("stream", &config.name)?;
    for s in &config.subjects {
        subject::validate_subscribe(s)?;
    }
    Ok(())
}

/// Settings for creating a missing stream:
/// file storage, limits retention, 7 days max age, one replica.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamAutoCreateConfig {
    /// Subjects; empty means derived from the consumer's filter subject.
    pub subjects: Vec<String>,
    /// Storage (default file).
    pub storage: StorageType,
    /// Retention (default limits).
    pub retention: RetentionPolicy,
    /// Maximum message age (default 7 days).
    pub max_age: Duration,
    /// Maximum total bytes (0 = unlimited).
    pub max_bytes: i64,
    /// Maximum messages (0 = unlimited).
    pub max_messages: i64,
    /// Replicas (default 1).
    pub replicas: usize,
}

impl Default for StreamAutoCreateConfig {
    fn default() -> Self {
        Self {
            subjects: Vec::new(),
            storage: StorageType::File,
            retention: RetentionPolicy::Limits,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 0,
            max_messages: 0,
            replicas: 1,
        }
    }
}

impl StreamAutoCreateConfig {
    /// The stream config for stream `name`, deriving subjects from `filter`
    /// when none are set: a trailing `*` becomes `>`, a trailing `>` is
    /// kept, otherwise `.>` is appended.
    ///
    /// ```
    /// use natskit::StreamAutoCreateConfig;
    /// let derive = |f| StreamAutoCreateConfig::default().to_stream_config("S", f).subjects;
    /// assert_eq!(derive("orders.*"), vec!["orders.>"]);
    /// assert_eq!(derive("orders.>"), vec!["orders.>"]);
    /// assert_eq!(derive("orders"), vec!["orders.>"]);
    /// ```
    pub fn to_stream_config(&self, name: &str, filter: &str) -> stream::Config {
        let subjects = if !self.subjects.is_empty() {
            self.subjects.clone()
        } else if filter.is_empty() {
            vec![format!("{name}.>")]
        } else if let Some(prefix) = filter.strip_suffix('*') {
            vec![format!("{prefix}>")]
        } else if filter.ends_with('>') {
            vec![filter.to_owned()]
        } else {
            vec![format!("{filter}.>")]
        };
        stream::Config {
            name: name.to_owned(),
            subjects,
            storage: self.storage,
            retention: self.retention,
            max_age: self.max_age,
            max_bytes: if self.max_bytes > 0 {
                self.max_bytes
            } else {
                -1
            },
            max_messages: if self.max_messages > 0 {
                self.max_messages
            } else {
                -1
            },
            num_replicas: self.replicas.max(1),
            ..Default::default()
        }
    }
}

#[derive(Debug, Default)]
struct PublisherShared {
    sent: AtomicU64,
    acked: AtomicU64,
    failed: AtomicU64,
    errors: std::sync::Mutex<Vec<(u64, Error)>>,
}

/// Outcome counts of a [`StreamPublisher`] at a flush.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct PublishReport {
    /// Messages acknowledged since the publisher was created.
    pub acked: u64,
    /// Messages that failed since the publisher was created.
    pub failed: u64,
    /// Failures since the last flush: (publish index, error).
    pub errors: Vec<(u64, Error)>,
}

type AckJob = (
    u64,
    async_nats::jetstream::context::PublishAckFuture,
    String,
    tokio::sync::OwnedSemaphorePermit,
);

/// Pipelined JetStream publisher from [`Client::stream_publisher`]. Clone-free;
/// share it behind an `Arc` to publish from several tasks. Dropping it
/// abandons nothing already sent: the acks still in flight are awaited and
/// counted by its collector task, but nobody reads the counts; call
/// [`flush`](Self::flush) first to learn them.
#[derive(Debug)]
pub struct StreamPublisher {
    client: Client,
    js: async_nats::jetstream::Context,
    acks: mpsc::UnboundedSender<AckJob>,
    shared: Arc<PublisherShared>,
    slots: Arc<Semaphore>,
    max_in_flight: usize,
}

impl StreamPublisher {
    /// Sends one message; waits only while `max_in_flight` acks are
    /// outstanding. Its ack (or failure) is counted and reported by
    /// [`flush`](Self::flush).
    ///
    /// # Errors
    /// Invalid subject, payload too large, not connected, circuit open, or
    /// the message could not be sent (nothing is counted then).
    pub async fn publish(
        &self,
        subject: impl IntoSubject,
        payload: impl Into<Bytes>,
    ) -> Result<()> {
        self.publish_with(subject, payload, StreamPublishOptions::new())
            .await
    }

    /// Sends one message with options. See [`publish`](Self::publish).
    ///
    /// # Errors
    /// See [`publish`](Self::publish).
    pub async fn publish_with(
        &self,
        subject: impl IntoSubject,
        payload: impl Into<Bytes>,
        mut options: StreamPublishOptions,
    ) -> Result<()> {
        let subject = subject.into_subject();
        let payload = payload.into();
        let caller_headers = options.headers.take();
        let out = self
            .client
            .prologue(&subject, caller_headers, payload.len(), |traced| {
                options.validate()?;
                options.headers = traced;
                Ok(options.header_map())
            })?;
        let (permit, headers) = (out.permit, out.headers);
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed)?;
        let message = match headers {
            Some(headers) => PublishMessage::build().payload(payload).headers(headers),
            None => PublishMessage::build().payload(payload),
        };
        let sent = self
            .js
            .send_publish(subject.clone(), message)
            .await
            .map_err(|e| map_publish(&subject, e));
        // Queued, not yet acknowledged: proves nothing about the server.
        let future = permit.record_unconfirmed(sent)?;
        let index = self.shared.sent.fetch_add(1, Ordering::Relaxed);
        self.acks
            .send((index, future, subject.to_string(), slot))
            .map_err(|_| Error::Closed)
    }

    /// Sends every message of `batch` and waits for all their acks.
    ///
    /// # Errors
    /// The first error that stopped sending; acks of what was sent are still
    /// awaited and counted.
    pub async fn publish_batch<S, P>(
        &self,
        batch: impl IntoIterator<Item = (S, P)>,
    ) -> Result<PublishReport>
    where
        S: IntoSubject,
        P: Into<Bytes>,
    {
        for (subject, payload) in batch {
            if let Err(err) = self.publish(subject, payload).await {
                self.flush().await;
                return Err(err);
            }
        }
        Ok(self.flush().await)
    }

    /// Waits until every outstanding ack has arrived or failed, and reports
    /// the totals and the failures since the last flush.
    pub async fn flush(&self) -> PublishReport {
        let all = u32::try_from(self.max_in_flight).unwrap_or(u32::MAX);
        if let Ok(permits) = self.slots.acquire_many(all).await {
            drop(permits);
        }
        PublishReport {
            acked: self.shared.acked.load(Ordering::Relaxed),
            failed: self.shared.failed.load(Ordering::Relaxed),
            errors: std::mem::take(&mut *lock(&self.shared.errors)),
        }
    }

    /// Messages acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::Relaxed)
    }

    /// Messages failed so far.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }
}

async fn collect_acks(mut jobs: mpsc::UnboundedReceiver<AckJob>, shared: Arc<PublisherShared>) {
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            job = jobs.recv() => match job {
                // The slot is released only after the outcome is counted, so
                // a flush that holds every slot sees every count.
                Some((index, future, subject, slot)) => pending.push(async move {
                    (index, subject, future.await, slot)
                }),
                None if pending.is_empty() => break,
                None => {
                    while let Some((index, subject, result, _slot)) = pending.next().await {
                        record_ack(&shared, index, &subject, result);
                    }
                    break;
                }
            },
            Some((index, subject, result, _slot)) = pending.next(), if !pending.is_empty() => {
                record_ack(&shared, index, &subject, result);
            }
        }
    }
}

fn record_ack(
    shared: &PublisherShared,
    index: u64,
    subject: &str,
    result: std::result::Result<PublishAck, async_nats::jetstream::context::PublishError>,
) {
    match result {
        Ok(_) => {
            shared.acked.fetch_add(1, Ordering::Relaxed);
        }
        Err(err) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            let err = map_publish(subject, err);
            tracing::warn!(%subject, %err, "pipelined publish failed");
            lock(&shared.errors).push((index, err));
        }
    }
}
