//! [`KvStore`]'s reads and writes: every write is one exactly-once
//! publish (the decisions are `write.rs`'s), every read retries through an
//! election.

use std::sync::Weak;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy, push};
use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::client::ack_inbox::publish_for_ack;
use crate::client::jetstream_errors::{
    PublishFault, classify_publish, failed, timed_out, unavailable,
};
use crate::client::retry::{self, Retry};
use crate::core::error::{Error, Result};
use crate::core::subject;
use crate::core::sync::lock;

use super::write::{Next, Resolution, Sent, WriteCore};
use super::{Invalidate, KvEntry, KvOptions, KvStore};

/// Where one KV write is published, and where the stream stores it: the
/// stored subject is the end of the published one (one allocation a write).
pub(super) struct WriteSubject {
    publish: String,
    /// Where the stored subject starts in `publish`.
    stored_at: usize,
}

impl WriteSubject {
    fn stored(&self) -> &str {
        &self.publish[self.stored_at..]
    }
}

/// Bytes a KV write's headers take on the wire: `NATS/1.0`, a message id
/// and an expected revision, with room to spare.
const KV_WRITE_HEADER_OVERHEAD: usize = 160;

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
    pub(super) fn op<T, F: Future<Output = Result<T>>>(
        &self,
        op: &'static str,
        fut: F,
    ) -> Guarded<'_, F> {
        self.op_within(op, self.options.timeout, fut)
    }

    /// Runs one KV write through the breaker. Its resends stop at the
    /// timeout; finding out whether an unconfirmed send was applied may take
    /// up to one more timeout (an election), so that `Ok` is returned exactly
    /// when the write was applied.
    #[inline(always)]
    fn write_op<T, F: Future<Output = Result<T>>>(
        &self,
        op: &'static str,
        fut: F,
    ) -> Guarded<'_, F> {
        self.op_within(op, self.options.timeout * 2, fut)
    }

    /// The checks now (closed, breaker, connection), then `fut` under
    /// `limit`, its outcome settling the breaker permit. Not an `async fn`:
    /// nested ones keep the operation's future as an argument beside the
    /// future made from it, at every level (a KV put's future was 7.9 KB,
    /// copied at each level: about 3,400 instructions a put).
    #[inline(always)]
    fn op_within<T, F: Future<Output = Result<T>>>(
        &self,
        op: &'static str,
        limit: Duration,
        fut: F,
    ) -> Guarded<'_, F> {
        let admitted = self.client.ensure_open().and_then(|()| {
            let permit = self.client.guard()?;
            self.client.live_conn()?;
            Ok(permit)
        });
        Guarded {
            admitted: Some(admitted),
            work: tokio::time::timeout(limit, fut),
            op,
            limit,
        }
    }

    /// Where a write of `key` goes: the subject it is published to (with
    /// the JetStream API prefix in front when the bucket is reached through
    /// another domain or an imported API, as async-nats writes it), and the
    /// subject the stream stores it under (what reading the outcome back
    /// looks for).
    fn write_subject(&self, key: &str) -> WriteSubject {
        let prefix = self
            .bucket
            .put_prefix
            .as_ref()
            .unwrap_or(&self.bucket.prefix);
        if self.bucket.use_jetstream_prefix {
            let api = self.client.jetstream_api_prefix();
            WriteSubject {
                publish: format!("{api}.{prefix}{key}"),
                stored_at: api.len() + 1,
            }
        } else {
            WriteSubject {
                publish: format!("{prefix}{key}"),
                stored_at: 0,
            }
        }
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
        subject: &WriteSubject,
        key: &str,
        value: Bytes,
        expected: Option<u64>,
    ) -> Result<u64> {
        use async_nats::header;
        let conn = self.client.nats()?;
        // On the stack: only the header holds a copy.
        let id = nuid::next();
        let id = id.as_str();
        // Built for each send (the first send's are not cloned: a clone
        // of the map cost three allocations a write).
        let headers = || {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(header::NATS_MESSAGE_ID, id);
            if let Some(revision) = expected {
                headers.insert(
                    header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                    async_nats::HeaderValue::from(revision),
                );
            }
            headers
        };
        let mut core = WriteCore::new(Instant::now(), self.options.timeout, retry::ELECTION);
        let mut epoch = self.client.connection_epoch();
        loop {
            epoch.borrow_and_update();
            let ack_wait = core.ack_wait(Instant::now());
            let sent = publish_for_ack(conn, subject.publish.clone(), headers(), value.clone());
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
                        // Boxed: the read is rare, and inline it made every
                        // write's future several KB (copied at each await
                        // level, about 3,400 instructions a put).
                        let found = Box::pin(self.resolve(subject.stored(), id, expected)).await;
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
    pub(super) fn check_key(&self, key: &str) -> Result<()> {
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
    pub(super) fn check_value(&self, value: &[u8]) -> Result<()> {
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

    pub(super) async fn entry_raw(&self, key: &str) -> Result<Option<kv::Entry>> {
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
        let subject = self.write_subject(key);
        let revision = self
            .write_op("kv put", self.write("kv put", &subject, key, value, None))
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
                let subject = self.write_subject(key);
                match self
                    .write("kv create", &subject, key, value.clone(), Some(0))
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
                            .write("kv create", &subject, key, value, Some(entry.revision))
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
            .write_op(
                "kv update",
                self.write(
                    "kv update",
                    &self.write_subject(key),
                    key,
                    value,
                    Some(revision),
                ),
            )
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
}

pin_project_lite::pin_project! {
    /// A KV operation admitted through the breaker (or refused), under its
    /// time limit; see `KvStore::op_within`.
    pub(super) struct Guarded<'a, F> {
        admitted: Option<Result<crate::client::breaker::Permit<'a>>>,
        #[pin]
        work: tokio::time::Timeout<F>,
        op: &'static str,
        limit: Duration,
    }
}

impl<T, F: Future<Output = Result<T>>> Future for Guarded<'_, F> {
    type Output = Result<T>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<T>> {
        let this = self.project();
        match this.admitted {
            Some(Ok(_)) => {}
            Some(Err(_)) => {
                return std::task::Poll::Ready(match this.admitted.take() {
                    Some(Err(err)) => Err(err),
                    _ => Err(Error::Closed),
                });
            }
            None => return std::task::Poll::Ready(Err(Error::Closed)),
        }
        let result = match std::task::ready!(this.work.poll(cx)) {
            Ok(result) => result,
            Err(_) => Err(timed_out(
                this.op,
                format!("no answer within {:?}", this.limit),
            )),
        };
        std::task::Poll::Ready(match this.admitted.take() {
            Some(Ok(permit)) => permit.record(result),
            _ => result,
        })
    }
}
