//! Key-value buckets and [`KvStore`]: typed errors, compare-and-swap with
//! retry, JSON helpers, server-side key filtering and resilient watches.

#[cfg(feature = "temporal")]
pub(crate) mod temporal;
mod write;

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy, push};
use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::Client;
use crate::client::jetstream_errors::{
    Lookup, PublishFault, classify_publish, failed, timed_out, unavailable,
};
use crate::client::retry::{self, Retry};
use crate::core::backoff::Backoff;
use crate::core::error::{BoxError, Error, Result};
use crate::core::subject;
use crate::core::sync::lock;
use write::{Next, Resolution, Sent, WriteCore};

/// What a KV entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KvOperation {
    /// A value was written.
    Put,
    /// The key was deleted (a delete marker).
    Delete,
    /// The key was purged (its history removed, a purge marker).
    Purge,
}

/// One revision of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    /// The key.
    pub key: String,
    /// The value (empty for delete and purge markers).
    pub value: Bytes,
    /// The revision (the stream sequence).
    pub revision: u64,
    /// When it was written.
    pub created: SystemTime,
    /// Put, delete or purge.
    pub operation: KvOperation,
}

impl KvEntry {
    /// Whether the entry is a live value (not a delete or purge marker).
    pub fn is_value(&self) -> bool {
        self.operation == KvOperation::Put
    }
}

fn system_time(t: time::OffsetDateTime) -> SystemTime {
    let nanos = t.unix_timestamp_nanos();
    match u64::try_from(nanos) {
        Ok(n) => SystemTime::UNIX_EPOCH + Duration::from_nanos(n),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

impl From<kv::Entry> for KvEntry {
    fn from(entry: kv::Entry) -> Self {
        Self {
            key: entry.key,
            value: entry.value,
            revision: entry.revision,
            created: system_time(entry.created),
            operation: match entry.operation {
                Operation::Put => KvOperation::Put,
                Operation::Delete => KvOperation::Delete,
                Operation::Purge => KvOperation::Purge,
            },
        }
    }
}

/// Behaviour of a [`KvStore`]; `Default` gives 20 CAS retries from 10 ms to
/// 1 s with jitter, a 5 s timeout per operation and 1 MiB values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvOptions {
    /// CAS retries after the first attempt (default 20: with 8 writers
    /// contending for one key on an R3 bucket, about one update in 2,000
    /// still lost 11 attempts in a row, so 10 was not enough for zero
    /// errors).
    pub max_retries: u32,
    /// Delay before the first retry (default 10 ms).
    pub retry_delay: Duration,
    /// Grow the delay exponentially with jitter (default true); otherwise a
    /// fixed delay.
    pub exponential_backoff: bool,
    /// Cap on the retry delay (default 1 s).
    pub max_retry_delay: Duration,
    /// Timeout of each KV operation (default 5 s). It bounds one operation,
    /// never a whole CAS loop, so back-off can never eat the loop's time.
    pub timeout: Duration,
    /// Largest value accepted (default 1 MiB).
    pub max_value_size: usize,
}

impl Default for KvOptions {
    fn default() -> Self {
        Self {
            max_retries: 20,
            retry_delay: Duration::from_millis(10),
            exponential_backoff: true,
            max_retry_delay: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            max_value_size: 1024 * 1024,
        }
    }
}

impl KvOptions {
    fn backoff(&self) -> Backoff {
        if self.exponential_backoff {
            Backoff::new(self.retry_delay, self.max_retry_delay)
        } else {
            Backoff::new(self.retry_delay, self.retry_delay).without_jitter()
        }
    }
}

/// Something to tell when a key changes through a [`KvStore`] (the
/// temporal resolver's cache).
pub(crate) trait Invalidate: Send + Sync {
    fn invalidate(&self, key: &str);
}

/// A KV bucket with CAS retry, JSON helpers and typed errors. Cheap to clone.
///
/// ```no_run
/// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
/// use async_nats::jetstream::kv;
/// let bucket = client
///     .ensure_key_value_bucket(kv::Config { bucket: "config".into(), history: 5, ..Default::default() })
///     .await?;
/// let store = client.kv_store(bucket, natskit::KvOptions::default());
/// store.update_json("service.config", |config| {
///     config.insert("workers".into(), 10.into());
///     Ok::<_, std::convert::Infallible>(())
/// })
/// .await?;
/// let workers: serde_json::Value = store.get_json("service.config").await?;
/// # let _ = workers; Ok(()) }
/// ```
#[derive(Clone)]
pub struct KvStore {
    client: Client,
    bucket: kv::Store,
    options: KvOptions,
    listeners: Arc<Mutex<Vec<Weak<dyn Invalidate>>>>,
    conflicts: metrics::Counter,
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore")
            .field("bucket", &self.bucket.name)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Gets the bucket, creating it when missing. When it exists with a
    /// different history, max age, max bytes or max value size, those are
    /// updated; a different storage type is [`Error::BucketConfigConflict`].
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::BucketConfigConflict`],
    /// [`Error::JetStreamUnavailable`], [`Error::JetStream`].
    pub async fn ensure_key_value_bucket(&self, config: kv::Config) -> Result<kv::Store> {
        self.ensure_open()?;
        check_bucket_name(&config.bucket)?;
        match self.get_key_value_bucket(&config.bucket).await {
            Ok(existing) => {
                // Fetched by get_key_value just now.
                let have = existing.stream.cached_info().config.clone();
                if have.storage != config.storage {
                    return Err(Error::BucketConfigConflict {
                        bucket: config.bucket,
                        fields: vec!["storage"],
                    });
                }
                let history = config.history.max(1);
                let differs = have.max_messages_per_subject != history
                    || have.max_age != config.max_age
                    || (config.max_bytes > 0 && have.max_bytes != config.max_bytes)
                    || (config.max_value_size > 0
                        && have.max_message_size != config.max_value_size);
                if !differs {
                    return Ok(existing);
                }
                tracing::info!(bucket = %config.bucket, "updating KV bucket configuration");
                let (permit, js) = self.js_call()?;
                let result = js
                    .update_key_value(config)
                    .await
                    .map_err(|e| failed("update bucket", e));
                permit.record(result)
            }
            Err(Error::BucketNotFound { .. }) => {
                let (permit, js) = self.js_call()?;
                let result = js
                    .create_key_value(config)
                    .await
                    .map_err(|e| match e.kind() {
                        async_nats::jetstream::context::CreateKeyValueErrorKind::TimedOut => {
                            unavailable("create bucket", e)
                        }
                        _ => failed("create bucket", e),
                    });
                permit.record(result)
            }
            Err(err) => Err(err),
        }
    }

    /// Opens an existing bucket.
    ///
    /// # Errors
    /// [`Error::BucketNotFound`] (an answer, not a breaker failure),
    /// [`Error::InvalidName`], [`Error::JetStreamUnavailable`].
    pub async fn get_key_value_bucket(&self, name: &str) -> Result<kv::Store> {
        self.ensure_open()?;
        check_bucket_name(name)?;
        let (permit, js) = self.js_call()?;
        let result = js.get_key_value(name).await.map_err(|err| {
            // async-nats wraps the stream lookup's error: classify by its kind.
            let lookup = std::error::Error::source(&err)
                .and_then(|s| s.downcast_ref::<async_nats::jetstream::context::GetStreamError>())
                .map(|e| crate::client::jetstream_errors::classify_get_stream(&e.kind()));
            match lookup {
                Some(Lookup::NotFound) => Error::BucketNotFound {
                    bucket: name.to_owned(),
                },
                Some(Lookup::Unavailable) => unavailable("get bucket", err),
                _ => failed("get bucket", err),
            }
        });
        permit.record(result)
    }

    /// Deletes a bucket; `Ok(false)` when it did not exist.
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::JetStreamUnavailable`], [`Error::JetStream`].
    pub async fn delete_key_value_bucket(&self, name: &str) -> Result<bool> {
        self.ensure_open()?;
        check_bucket_name(name)?;
        self.delete_stream(&format!("KV_{name}")).await
    }

    /// Names of all buckets.
    ///
    /// # Errors
    /// [`Error::JetStreamUnavailable`].
    pub async fn list_key_value_buckets(&self) -> Result<Vec<String>> {
        self.ensure_open()?;
        let (permit, js) = self.js_call()?;
        let result = async {
            let mut names = js.stream_names();
            let mut buckets = Vec::new();
            while let Some(name) = names.next().await {
                let name = name.map_err(|e| unavailable("list buckets", e))?;
                if let Some(bucket) = name.strip_prefix("KV_") {
                    buckets.push(bucket.to_owned());
                }
            }
            buckets.sort();
            Ok(buckets)
        }
        .await;
        permit.record(result)
    }

    /// Wraps a bucket in a [`KvStore`].
    pub fn kv_store(&self, bucket: kv::Store, options: KvOptions) -> KvStore {
        KvStore {
            conflicts: self.metrics().kv_conflicts(&bucket.name),
            client: self.clone(),
            bucket,
            options,
            listeners: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

fn check_bucket_name(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::InvalidName {
            what: "bucket",
            name: name.to_owned(),
            reason: "only A-Z a-z 0-9 - _ are allowed",
        });
    }
    Ok(())
}

/// Bytes a KV write's headers take on the wire: `NATS/1.0`, a message id
/// and an expected revision, with room to spare.
const KV_WRITE_HEADER_OVERHEAD: usize = 160;

/// The outcome of one CAS attempt.
enum Attempt {
    Done(u64),
    Conflict,
}

impl KvStore {
    /// The bucket name.
    pub fn bucket(&self) -> &str {
        &self.bucket.name
    }

    /// The underlying async-nats bucket.
    pub fn inner(&self) -> &kv::Store {
        &self.bucket
    }

    /// The options.
    pub fn options(&self) -> &KvOptions {
        &self.options
    }

    #[cfg_attr(not(feature = "temporal"), allow(dead_code))]
    pub(crate) fn subscribe_invalidations(&self, listener: Weak<dyn Invalidate>) {
        let mut listeners = lock(&self.listeners);
        listeners.retain(|l| l.strong_count() > 0);
        listeners.push(listener);
    }

    fn written(&self, key: &str) {
        // Collected first: a listener runs without the lock held.
        let listeners: Vec<_> = lock(&self.listeners)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for listener in listeners {
            listener.invalidate(key);
        }
    }

    /// Runs one KV operation through the breaker under the per-operation timeout.
    async fn op<T>(&self, op: &'static str, fut: impl Future<Output = Result<T>>) -> Result<T> {
        self.op_within(op, self.options.timeout, fut).await
    }

    /// Runs one KV write through the breaker. Its resends stop at the
    /// timeout; finding out whether an unconfirmed send was applied may take
    /// up to one more timeout (an election), so that `Ok` is returned exactly
    /// when the write was applied.
    async fn write_op<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        self.op_within(op, self.options.timeout * 2, fut).await
    }

    async fn op_within<T>(
        &self,
        op: &'static str,
        limit: Duration,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        self.client.ensure_open()?;
        let permit = self.client.guard()?;
        self.client.live_conn()?;
        let result = match tokio::time::timeout(limit, fut).await {
            Ok(result) => result,
            Err(_) => Err(timed_out(op, format!("no answer within {limit:?}"))),
        };
        permit.record(result)
    }

    /// The subject a write of `key` goes to, unless the bucket is reached
    /// through another JetStream domain (then async-nats writes).
    fn write_subject(&self, key: &str) -> Option<String> {
        if self.bucket.use_jetstream_prefix {
            return None;
        }
        let prefix = self
            .bucket
            .put_prefix
            .as_ref()
            .unwrap_or(&self.bucket.prefix);
        Some(format!("{prefix}{key}"))
    }

    /// One KV write as a JetStream publish with a unique `Nats-Msg-Id`,
    /// resent (same id) on no-responders, no leader, a dropped connection and
    /// a missing ack. The id makes a resend of a write that was stored a
    /// duplicate the server answers with the original revision, so a write
    /// is never applied twice and `Ok` is returned exactly when it was
    /// applied. A failed precondition (10071, or 10164 on a clustered
    /// bucket) is [`Error::RevisionMismatch`].
    ///
    /// Resends stop at the operation's timeout, unless a send may have been
    /// applied unheard (no ack, a dropped connection): then resending goes on
    /// for up to one more timeout (an election) until the outcome is known,
    /// and only an outcome still unknown then is a timeout error.
    async fn write(
        &self,
        op: &'static str,
        subject: String,
        key: &str,
        value: Bytes,
        expected: Option<u64>,
    ) -> Result<u64> {
        use async_nats::header;
        use async_nats::jetstream::message::PublishMessage;
        let js = self.client.jetstream()?;
        let id = nuid::next().to_string();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(header::NATS_MESSAGE_ID, id.as_str());
        if let Some(revision) = expected {
            headers.insert(
                header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                revision.to_string().as_str(),
            );
        }
        let mut core = WriteCore::new(Instant::now(), self.options.timeout, retry::ELECTION);
        let mut epoch = self.client.connection_epoch();
        loop {
            epoch.borrow_and_update();
            let message = PublishMessage::build()
                .payload(value.clone())
                .headers(headers.clone());
            let ack_wait = core.ack_wait(Instant::now());
            let sent = async {
                let ack = js.send_publish(subject.clone(), message).await?;
                ack.await
            };
            // What the send came to, and the error it stands for should the
            // write end on it.
            let (outcome, fault) = tokio::select! {
                outcome = tokio::time::timeout(ack_wait, sent) => match outcome {
                    Ok(Ok(ack)) => return Ok(ack.sequence),
                    Ok(Err(err)) => {
                        let kind = classify_publish(&err);
                        let fault = match kind {
                            PublishFault::Conflict => unavailable(op, err),
                            PublishFault::Timeout | PublishFault::Unavailable => timed_out(op, err),
                            PublishFault::NoResponders => unavailable(
                                op,
                                "no responders: the bucket's stream has no leader (an election or a restart)",
                            ),
                            PublishFault::TooLarge | PublishFault::WrongMessageId | PublishFault::Other => {
                                failed(op, err)
                            }
                        };
                        (Sent::Fault(kind), fault)
                    }
                    Err(_) => (Sent::NoAck, timed_out(op, format!("no ack within {ack_wait:?}"))),
                },
                // Reconnected while the ack was awaited: it will not come.
                _ = epoch.changed() => {
                    (Sent::Reconnected, unavailable(op, "reconnected while awaiting the ack"))
                }
            };
            let mut next = core.sent(outcome, Instant::now(), fastrand::f64());
            let delay = loop {
                match next {
                    Next::Applied(revision) => return Ok(revision),
                    Next::Conflict => {
                        return Err(Error::RevisionMismatch {
                            key: key.to_owned(),
                            expected: expected.unwrap_or(0),
                        });
                    }
                    Next::TooLarge => {
                        return Err(Error::ValueTooLarge {
                            size: value.len(),
                            max: self.max_value_size(),
                        });
                    }
                    Next::Failed | Next::GiveUp => return Err(fault),
                    // `Ok` exactly when the write was applied; an outcome
                    // still unknown is a timeout.
                    Next::TimedOut => {
                        return Err(match fault {
                            fault @ Error::JetStreamTimeout { .. } => fault,
                            other => timed_out(op, other.to_string()),
                        });
                    }
                    Next::Resolve => {
                        let found = self.resolve(&subject, &id, expected).await;
                        next = core.resolved(found, Instant::now(), fastrand::f64());
                    }
                    Next::Resend { delay } => break delay,
                }
            };
            tracing::debug!(bucket = %self.bucket.name, key, attempt = core.attempts(), err = %fault, "kv write not confirmed; resending");
            self.client.metrics().retry("kv_write");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = epoch.changed() => {}
            }
        }
    }

    /// Whether the write with message id `id` was applied. With an
    /// expected revision this is exact: only one message can follow that
    /// revision on the subject, so the first one after it (read from the
    /// stream leader) is either ours or the write that won. Without one (a
    /// put), only a write that is still the last one is recognised.
    async fn resolve(&self, subject: &str, id: &str, expected: Option<u64>) -> Resolution {
        let stream = &self.bucket.stream;
        let found = match expected {
            Some(revision) => {
                stream
                    .get_first_raw_message_by_subject(subject, revision + 1)
                    .await
            }
            None => stream.get_last_raw_message_by_subject(subject).await,
        };
        match found {
            Ok(message) => {
                let ours = message
                    .headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .is_some_and(|stored| stored.as_str() == id);
                match (ours, expected) {
                    (true, _) => Resolution::Applied(message.sequence),
                    (false, Some(_)) => Resolution::NotApplied,
                    (false, None) => Resolution::Unknown,
                }
            }
            Err(err)
                if expected.is_some()
                    && err.kind()
                        == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                Resolution::NotApplied
            }
            Err(_) => Resolution::Unknown,
        }
    }

    /// Closed first, then the key: the order every operation checks in.
    fn check_key(&self, key: &str) -> Result<()> {
        self.client.ensure_open()?;
        subject::validate_key(key)
    }

    /// The largest value a write can carry: the store's limit, and what
    /// the server's `max_payload` leaves after the write's headers.
    pub fn max_value_size(&self) -> usize {
        let server = self
            .client
            .nats()
            .map_or(0, async_nats::Client::max_payload);
        if server == 0 {
            self.options.max_value_size
        } else {
            self.options
                .max_value_size
                .min(server.saturating_sub(KV_WRITE_HEADER_OVERHEAD))
        }
    }

    /// A value too large is a caller mistake, found before any I/O (never
    /// a server rejection counted against the breaker).
    fn check_value(&self, value: &[u8]) -> Result<()> {
        let max = self.max_value_size();
        if value.len() > max {
            return Err(Error::ValueTooLarge {
                size: value.len(),
                max,
            });
        }
        Ok(())
    }

    /// The current entry of `key`, with its revision.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`] when it was never written, deleted or purged;
    /// [`Error::InvalidKey`]; [`Error::JetStreamUnavailable`].
    pub async fn get(&self, key: &str) -> Result<KvEntry> {
        self.check_key(key)?;
        match self.entry_raw(key).await? {
            Some(entry) if entry.operation == Operation::Put => Ok(entry.into()),
            _ => Err(Error::KeyNotFound {
                key: key.to_owned(),
            }),
        }
    }

    async fn entry_raw(&self, key: &str) -> Result<Option<kv::Entry>> {
        self.op("kv get", async {
            // Reads are idempotent: retry what an election or a restart
            // causes (no responders, no answer) until the timeout.
            let mut waits = Retry::new(retry::ELECTION);
            loop {
                let err = match self.bucket.entry(key).await {
                    Ok(entry) => return Ok(entry),
                    Err(e) if e.kind() == kv::EntryErrorKind::InvalidKey => {
                        return Err(Error::InvalidKey {
                            key: key.to_owned(),
                            reason: "rejected by the KV store",
                        });
                    }
                    Err(e) if e.kind() == kv::EntryErrorKind::TimedOut => timed_out("kv get", e),
                    Err(e) => unavailable("kv get", e),
                };
                tracing::debug!(bucket = %self.bucket.name, key, attempt = waits.attempt(), %err, "kv read failed; retrying");
                waits.wait().await;
            }
        })
        .await
    }

    /// Writes `value`, returning the new revision.
    ///
    /// # Errors
    /// [`Error::InvalidKey`], [`Error::ValueTooLarge`], [`Error::JetStreamUnavailable`].
    pub async fn put(&self, key: &str, value: impl Into<Bytes>) -> Result<u64> {
        self.check_key(key)?;
        let value = value.into();
        self.check_value(&value)?;
        let revision = self
            .write_op("kv put", async {
                match self.write_subject(key) {
                    Some(subject) => self.write("kv put", subject, key, value, None).await,
                    None => {
                        self.bucket
                            .put(key, value)
                            .await
                            .map_err(|e| match classify_publish(&e) {
                                PublishFault::Timeout => timed_out("kv put", e),
                                PublishFault::NoResponders | PublishFault::Unavailable => {
                                    unavailable("kv put", e)
                                }
                                _ => failed("kv put", e),
                            })
                    }
                }
            })
            .await?;
        tracing::debug!(bucket = %self.bucket.name, key, revision, "kv put");
        self.written(key);
        Ok(revision)
    }

    /// Writes `value` only if the key does not exist (a deleted or purged
    /// key counts as not existing).
    ///
    /// # Errors
    /// [`Error::KeyExists`], [`Error::InvalidKey`], [`Error::ValueTooLarge`],
    /// [`Error::JetStreamUnavailable`].
    pub async fn create(&self, key: &str, value: impl Into<Bytes>) -> Result<u64> {
        self.check_key(key)?;
        let value = value.into();
        self.check_value(&value)?;
        let exists = || Error::KeyExists {
            key: key.to_owned(),
        };
        let revision = self
            .write_op("kv create", async {
                let Some(subject) = self.write_subject(key) else {
                    return self
                        .bucket
                        .create(key, value)
                        .await
                        .map_err(|e| match e.kind() {
                            CreateErrorKind::AlreadyExists => exists(),
                            _ => match classify_publish(&e) {
                                PublishFault::Conflict => exists(),
                                PublishFault::Timeout => timed_out("kv create", e),
                                PublishFault::NoResponders | PublishFault::Unavailable => {
                                    unavailable("kv create", e)
                                }
                                _ => failed("kv create", e),
                            },
                        });
                };
                match self
                    .write("kv create", subject.clone(), key, value.clone(), Some(0))
                    .await
                {
                    Err(Error::RevisionMismatch { .. }) => {}
                    other => return other,
                }
                // The key has history: a delete or purge marker counts as
                // absent, so write over it (only if it is still the last).
                match self.bucket.entry(key).await {
                    Ok(Some(entry)) if entry.operation != Operation::Put => {
                        match self
                            .write("kv create", subject, key, value, Some(entry.revision))
                            .await
                        {
                            Err(Error::RevisionMismatch { .. }) => Err(exists()),
                            other => other,
                        }
                    }
                    _ => Err(exists()),
                }
            })
            .await?;
        self.written(key);
        Ok(revision)
    }

    /// Writes `value` only if the key's current revision is `revision`
    /// (compare-and-swap).
    ///
    /// # Errors
    /// [`Error::RevisionMismatch`], [`Error::InvalidKey`],
    /// [`Error::ValueTooLarge`], [`Error::JetStreamUnavailable`].
    pub async fn update(&self, key: &str, value: impl Into<Bytes>, revision: u64) -> Result<u64> {
        self.check_key(key)?;
        let value = value.into();
        self.check_value(&value)?;
        let new = self
            .write_op("kv update", async {
                let Some(subject) = self.write_subject(key) else {
                    return self.bucket.update(key, value, revision).await.map_err(|e| {
                        match (e.kind(), classify_publish(&e)) {
                            (UpdateErrorKind::WrongLastRevision, _)
                            | (_, PublishFault::Conflict) => Error::RevisionMismatch {
                                key: key.to_owned(),
                                expected: revision,
                            },
                            (UpdateErrorKind::TimedOut, _) | (_, PublishFault::Timeout) => {
                                timed_out("kv update", e)
                            }
                            (_, PublishFault::NoResponders | PublishFault::Unavailable) => {
                                unavailable("kv update", e)
                            }
                            _ => failed("kv update", e),
                        }
                    });
                };
                self.write("kv update", subject, key, value, Some(revision))
                    .await
            })
            .await?;
        self.written(key);
        Ok(new)
    }

    /// Deletes the key (a delete marker; history is kept).
    ///
    /// # Errors
    /// [`Error::InvalidKey`], [`Error::JetStreamUnavailable`].
    pub async fn delete(&self, key: &str) -> Result<()> {
        self.check_key(key)?;
        self.op("kv delete", async {
            self.bucket
                .delete(key)
                .await
                .map_err(|e| failed("kv delete", e))
        })
        .await?;
        self.written(key);
        Ok(())
    }

    /// Purges the key: removes its history, leaving a purge marker.
    ///
    /// # Errors
    /// [`Error::InvalidKey`], [`Error::JetStreamUnavailable`].
    pub async fn purge(&self, key: &str) -> Result<()> {
        self.check_key(key)?;
        self.op("kv purge", async {
            self.bucket
                .purge(key)
                .await
                .map_err(|e| failed("kv purge", e))
        })
        .await?;
        self.written(key);
        Ok(())
    }

    /// Every revision of `key` still kept, oldest first, delete and purge
    /// markers included. The depth is bounded by the bucket's `history`
    /// setting (at most 64).
    ///
    /// # Errors
    /// [`Error::KeyNotFound`] when the key has no revision at all;
    /// [`Error::InvalidKey`]; [`Error::JetStreamUnavailable`].
    pub async fn history(&self, key: &str) -> Result<Vec<KvEntry>> {
        self.check_key(key)?;
        let entries: Vec<KvEntry> = self
            .op("kv history", async {
                let mut history = self
                    .bucket
                    .history(key)
                    .await
                    .map_err(|e| failed("kv history", e))?;
                let mut entries = Vec::new();
                while let Some(entry) = history.next().await {
                    entries.push(KvEntry::from(entry.map_err(|e| failed("kv history", e))?));
                }
                Ok(entries)
            })
            .await?;
        if entries.is_empty() {
            return Err(Error::KeyNotFound {
                key: key.to_owned(),
            });
        }
        Ok(entries)
    }

    /// All live keys, sorted.
    ///
    /// # Errors
    /// [`Error::JetStreamUnavailable`].
    pub async fn keys(&self) -> Result<Vec<String>> {
        self.filtered_keys(">").await
    }

    /// Live keys starting with `prefix`, sorted. The server filters on the
    /// last whole token of the prefix (`entity.sen` asks the server for
    /// `entity.>`); the rest of the prefix is matched here, so a prefix need
    /// not end on a token boundary. An empty prefix lists every key.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for a prefix no key could start with;
    /// [`Error::JetStreamUnavailable`].
    pub async fn keys_by_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        self.client.ensure_open()?;
        if prefix.is_empty() {
            return self.keys().await;
        }
        if prefix.starts_with('.') || prefix.contains("..") {
            return Err(Error::InvalidKey {
                key: prefix.to_owned(),
                reason: "empty token (leading or double '.')",
            });
        }
        if let Err(Error::InvalidKey { reason, .. }) = subject::validate_key(&format!("{prefix}x"))
        {
            return Err(Error::InvalidKey {
                key: prefix.to_owned(),
                reason,
            });
        }
        let filter = match prefix.rfind('.') {
            Some(dot) => format!("{}.>", &prefix[..dot]),
            None => ">".to_owned(),
        };
        let mut keys = self.filtered_keys(&filter).await?;
        keys.retain(|k| k.starts_with(prefix));
        Ok(keys)
    }

    /// Live keys matching the NATS wildcard `pattern` (such as `0.>` or
    /// `sensors.*.temp`), filtered by the server, sorted.
    ///
    /// # Errors
    /// [`Error::InvalidSubject`] for a bad pattern; [`Error::JetStreamUnavailable`].
    pub async fn filtered_keys(&self, pattern: &str) -> Result<Vec<String>> {
        self.client.ensure_open()?;
        subject::validate_subscribe(pattern)?;
        let prefix = self.bucket.prefix.clone();
        let stream = self.bucket.stream.clone();
        let conn = self.client.nats()?.clone();
        self.op("kv keys", async move {
            let consumer = stream
                .create_consumer(push::OrderedConfig {
                    deliver_subject: conn.new_inbox(),
                    filter_subject: format!("{prefix}{pattern}"),
                    headers_only: true,
                    replay_policy: ReplayPolicy::Instant,
                    deliver_policy: DeliverPolicy::LastPerSubject,
                    ..Default::default()
                })
                .await
                .map_err(|e| unavailable("kv keys", e))?;
            let mut pending = consumer.cached_info().num_pending;
            let mut keys = Vec::new();
            if pending == 0 {
                return Ok(keys);
            }
            let mut messages = consumer
                .messages()
                .await
                .map_err(|e| unavailable("kv keys", e))?;
            while pending > 0 {
                let Some(message) = messages.next().await else {
                    break;
                };
                let message = message.map_err(|e| unavailable("kv keys", e))?;
                pending = message.info().map(|i| i.pending).unwrap_or(0);
                let deleted = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("KV-Operation"))
                    .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
                if !deleted && let Some(key) = message.subject.strip_prefix(prefix.as_str()) {
                    keys.push(key.to_owned());
                }
            }
            keys.sort();
            Ok(keys)
        })
        .await
    }

    /// Reads, transforms and writes `key` atomically: `update` gets the
    /// current value (`None` when the key is missing, deleted or purged) and
    /// returns the new one, which is written with compare-and-swap (create
    /// when missing). On a concurrent write the key is re-read and `update`
    /// called again, after a jittered exponential back-off. Returns the
    /// committed revision.
    ///
    /// Only conflicts are retried. An error from `update`, an oversize value
    /// or an infrastructure error ends the call at once; nothing is written.
    ///
    /// ```no_run
    /// # async fn demo(store: natskit::KvStore) -> natskit::Result<()> {
    /// let revision = store
    ///     .update_with_retry("counter", |current| {
    ///         let n: u64 = match current {
    ///             Some(v) => std::str::from_utf8(v)?.parse()?,
    ///             None => 0,
    ///         };
    ///         Ok::<_, Box<dyn std::error::Error + Send + Sync>>((n + 1).to_string().into_bytes())
    ///     })
    ///     .await?;
    /// # let _ = revision; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::UpdateAborted`] (keeps the closure's error as its source),
    /// [`Error::ValueTooLarge`], [`Error::MaxRetriesExceeded`] with the attempt
    /// count, [`Error::InvalidKey`], [`Error::JetStreamUnavailable`].
    pub async fn update_with_retry<F, E>(&self, key: &str, mut update: F) -> Result<u64>
    where
        F: FnMut(Option<&[u8]>) -> std::result::Result<Vec<u8>, E>,
        E: Into<BoxError>,
    {
        self.cas_loop(key, |current| {
            update(current).map_err(|e| Error::UpdateAborted {
                key: key.to_owned(),
                source: e.into(),
            })
        })
        .await
    }

    /// [`update_with_retry`](Self::update_with_retry) with an async update
    /// function, for updates that must await something (a lookup, another
    /// service). It gets the current value (`None` when the key is missing,
    /// deleted or purged) and may run again after a conflict.
    ///
    /// ```no_run
    /// # async fn demo(store: natskit::KvStore, client: natskit::Client) -> natskit::Result<()> {
    /// store
    ///     .update_with_retry_async("price", |current| {
    ///         let client = client.clone();
    ///         async move {
    ///             let quote = client.request("pricing.quote", current.unwrap_or_default()).await?;
    ///             Ok::<_, natskit::Error>(quote.to_vec())
    ///         }
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`update_with_retry`](Self::update_with_retry).
    pub async fn update_with_retry_async<F, Fut, E>(&self, key: &str, mut update: F) -> Result<u64>
    where
        F: FnMut(Option<Bytes>) -> Fut,
        Fut: Future<Output = std::result::Result<Vec<u8>, E>>,
        E: Into<BoxError>,
    {
        self.cas_loop_async(key, |current| {
            let pending = update(current);
            async move {
                pending.await.map_err(|e| Error::UpdateAborted {
                    key: key.to_owned(),
                    source: e.into(),
                })
            }
        })
        .await
    }

    /// The CAS loop with a synchronous update; `update` already reports
    /// natskit errors (a JSON helper's decode error stays [`Error::Json`]).
    async fn cas_loop<F>(&self, key: &str, mut update: F) -> Result<u64>
    where
        F: FnMut(Option<&[u8]>) -> Result<Vec<u8>>,
    {
        self.cas_loop_async(key, |current| {
            std::future::ready(update(current.as_deref()))
        })
        .await
    }

    /// The one CAS loop: read, update, write with the read revision, retry
    /// on conflict with back-off.
    async fn cas_loop_async<F, Fut>(&self, key: &str, mut update: F) -> Result<u64>
    where
        F: FnMut(Option<Bytes>) -> Fut,
        Fut: Future<Output = Result<Vec<u8>>>,
    {
        self.check_key(key)?;
        let mut waits = Retry::new(self.options.backoff());
        let attempts = self.options.max_retries.saturating_add(1);
        for attempt in 0..attempts {
            if attempt > 0 {
                waits.wait().await;
            }
            let current = self.entry_raw(key).await?;
            let (value, revision) = match current {
                Some(e) if e.operation == Operation::Put => (Some(e.value), Some(e.revision)),
                _ => (None, None),
            };
            let new = update(value).await?;
            self.check_value(&new)?;
            match self.try_write(key, new.into(), revision).await? {
                Attempt::Done(revision) => return Ok(revision),
                Attempt::Conflict => {
                    self.conflicts.increment(1);
                    self.client.metrics().retry("kv_cas");
                    tracing::debug!(bucket = %self.bucket.name, key, attempt, "kv CAS conflict; retrying");
                }
            }
        }
        Err(Error::MaxRetriesExceeded {
            key: key.to_owned(),
            attempts,
        })
    }

    async fn try_write(&self, key: &str, value: Bytes, revision: Option<u64>) -> Result<Attempt> {
        let result = match revision {
            Some(revision) => self.update(key, value, revision).await,
            None => self.create(key, value).await,
        };
        match result {
            Ok(revision) => Ok(Attempt::Done(revision)),
            Err(err) if err.is_conflict() => Ok(Attempt::Conflict),
            Err(err) => Err(err),
        }
    }

    /// [`update_with_retry`](Self::update_with_retry) on a JSON object:
    /// `update` edits the map in place (an empty map when the key is
    /// missing). Integers stay integers.
    ///
    /// # Errors
    /// [`Error::Json`] when the stored value is not a JSON object,
    /// [`Error::JsonNull`] when it is `null` (in both cases `update` is
    /// never called and nothing is written), and the errors of
    /// [`update_with_retry`](Self::update_with_retry).
    pub async fn update_json<F, E>(&self, key: &str, mut update: F) -> Result<u64>
    where
        F: FnMut(&mut serde_json::Map<String, serde_json::Value>) -> std::result::Result<(), E>,
        E: Into<BoxError>,
    {
        self.cas_loop(key, |current: Option<&[u8]>| {
            let mut map = match current {
                None => serde_json::Map::new(),
                Some(bytes) => match decode::<serde_json::Value>(key, bytes)? {
                    serde_json::Value::Object(map) => map,
                    serde_json::Value::Null => {
                        return Err(Error::JsonNull {
                            key: key.to_owned(),
                        });
                    }
                    other => {
                        return Err(Error::Json {
                            key: key.to_owned(),
                            source: <serde_json::Error as serde::de::Error>::custom(format!(
                                "expected a JSON object, found {}",
                                json_kind(&other)
                            )),
                        });
                    }
                },
            };
            update(&mut map).map_err(|e| Error::UpdateAborted {
                key: key.to_owned(),
                source: e.into(),
            })?;
            serde_json::to_vec(&map).map_err(|source| Error::Json {
                key: key.to_owned(),
                source,
            })
        })
        .await
    }

    /// [`update_with_retry`](Self::update_with_retry) on a typed JSON value:
    /// `update` edits `T` in place (`T::default()` when the key is missing).
    ///
    /// ```no_run
    /// # async fn demo(store: natskit::KvStore) -> natskit::Result<()> {
    /// #[derive(Default, serde::Serialize, serde::Deserialize)]
    /// struct Counter { n: u64 }
    /// store.update_typed("visits", |c: &mut Counter| { c.n += 1; Ok::<_, std::convert::Infallible>(()) }).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Json`] for a stored value that does not decode as `T`
    /// (`update` is not called), and the errors of
    /// [`update_with_retry`](Self::update_with_retry).
    pub async fn update_typed<T, F, E>(&self, key: &str, mut update: F) -> Result<u64>
    where
        T: Serialize + DeserializeOwned + Default,
        F: FnMut(&mut T) -> std::result::Result<(), E>,
        E: Into<BoxError>,
    {
        self.cas_loop(key, |current: Option<&[u8]>| {
            let mut value = match current {
                None => T::default(),
                Some(bytes) => decode::<T>(key, bytes)?,
            };
            update(&mut value).map_err(|e| Error::UpdateAborted {
                key: key.to_owned(),
                source: e.into(),
            })?;
            serde_json::to_vec(&value).map_err(|source| Error::Json {
                key: key.to_owned(),
                source,
            })
        })
        .await
    }

    /// Reads `key` as JSON into `T`.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`], [`Error::Json`] (invalid JSON or a type
    /// mismatch), [`Error::InvalidKey`], [`Error::JetStreamUnavailable`].
    pub async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        let entry = self.get(key).await?;
        decode(key, &entry.value)
    }

    /// Writes `value` as JSON.
    ///
    /// # Errors
    /// As [`put`](Self::put), plus [`Error::Json`] if `value` cannot be serialized.
    pub async fn put_json<T: Serialize>(&self, key: &str, value: &T) -> Result<u64> {
        let bytes = serde_json::to_vec(value).map_err(|source| Error::Json {
            key: key.to_owned(),
            source,
        })?;
        self.put(key, bytes).await
    }

    /// Watches keys matching `pattern` (`>` for all): first the current value
    /// of every matching key, then [`WatchEvent::InitialDone`] (also for an
    /// empty bucket), then live changes. Survives reconnects and server
    /// restarts: when the underlying watcher fails it is re-created from the
    /// last revision seen.
    ///
    /// # Errors
    /// [`Error::InvalidSubject`] for a bad pattern; [`Error::JetStreamUnavailable`].
    pub async fn watch(&self, pattern: &str) -> Result<KvWatch> {
        self.client.ensure_open()?;
        subject::validate_subscribe(pattern)?;
        let initial = self.filtered_subject_count(pattern).await?;
        let watcher = self
            .op("kv watch", async {
                self.bucket
                    .watch_with_history(pattern)
                    .await
                    .map_err(|e| unavailable("kv watch", e))
            })
            .await?;
        Ok(KvWatch::new(
            self.clone(),
            pattern.to_owned(),
            watcher,
            initial == 0,
        ))
    }

    /// How many keys (with markers) match `pattern`, from stream state.
    async fn filtered_subject_count(&self, pattern: &str) -> Result<usize> {
        let stream = self.bucket.stream.clone();
        let filter = format!("{}{pattern}", self.bucket.prefix);
        self.op("kv watch", async move {
            let mut subjects = stream
                .info_with_subjects(filter)
                .await
                .map_err(|e| unavailable("kv watch", e))?;
            let mut count = 0usize;
            while let Some(subject) = subjects.next().await {
                subject.map_err(|e| unavailable("kv watch", e))?;
                count += 1;
            }
            Ok(count)
        })
        .await
    }
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| Error::Json {
        key: key.to_owned(),
        source,
    })
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// An event of a [`KvWatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WatchEvent {
    /// A key's value, deletion or purge.
    Entry(KvEntry),
    /// Every key's value at the time the watch started has been delivered.
    InitialDone,
}

type WatchFuture = Pin<Box<dyn Future<Output = Result<kv::Watch>> + Send>>;

/// A resilient watch from [`KvStore::watch`]; a `Stream` of [`WatchEvent`].
/// Dropping it ends the watch (its consumer on the server is ephemeral and
/// goes with it).
pub struct KvWatch {
    store: KvStore,
    pattern: String,
    watcher: Option<kv::Watch>,
    reopening: Option<WatchFuture>,
    initial_done_pending: bool,
    initial_done_sent: bool,
    last_revision: u64,
    /// The re-creation waits (reset once events flow again).
    waits: Retry,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl std::fmt::Debug for KvWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvWatch")
            .field("bucket", &self.store.bucket())
            .field("pattern", &self.pattern)
            .field("last_revision", &self.last_revision)
            .finish_non_exhaustive()
    }
}

impl KvWatch {
    fn new(store: KvStore, pattern: String, watcher: kv::Watch, empty: bool) -> Self {
        Self {
            store,
            pattern,
            watcher: Some(watcher),
            reopening: None,
            initial_done_pending: empty,
            initial_done_sent: false,
            last_revision: 0,
            waits: Retry::new(retry::RECREATE),
            sleep: None,
        }
    }

    fn reopen(&mut self) {
        self.watcher = None;
        let bucket = self.store.bucket.clone();
        let pattern = self.pattern.clone();
        let from = self.last_revision + 1;
        let delay = self.waits.next_delay();
        tracing::warn!(bucket = %bucket.name, %pattern, from, ?delay, "kv watch lost; re-creating");
        self.sleep = Some(Box::pin(tokio::time::sleep(delay)));
        self.reopening = Some(Box::pin(async move {
            bucket
                .watch_from_revision(pattern, from)
                .await
                .map_err(|e| unavailable("kv watch", e))
        }));
    }
}

impl Stream for KvWatch {
    type Item = WatchEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        let this = &mut *self;
        loop {
            if this.initial_done_pending {
                this.initial_done_pending = false;
                this.initial_done_sent = true;
                return Poll::Ready(Some(WatchEvent::InitialDone));
            }
            if let Some(sleep) = this.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            }
            if let Some(reopening) = this.reopening.as_mut() {
                match reopening.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(watcher)) => {
                        this.reopening = None;
                        this.watcher = Some(watcher);
                    }
                    Poll::Ready(Err(err)) => {
                        tracing::debug!(%err, "kv watch re-create failed");
                        this.reopen();
                        continue;
                    }
                }
            }
            let Some(watcher) = this.watcher.as_mut() else {
                this.reopen();
                continue;
            };
            match watcher.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(entry))) => {
                    this.waits.reset();
                    if entry.revision <= this.last_revision {
                        continue; // replayed after a re-create
                    }
                    this.last_revision = entry.revision;
                    if !this.initial_done_sent && entry.delta == 0 {
                        this.initial_done_pending = true;
                    }
                    return Poll::Ready(Some(WatchEvent::Entry(entry.into())));
                }
                Poll::Ready(Some(Err(err))) => {
                    tracing::debug!(%err, "kv watch error");
                    this.reopen();
                }
                Poll::Ready(None) => this.reopen(),
            }
        }
    }
}
