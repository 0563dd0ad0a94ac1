//! The pipelined publisher: many acknowledgements in flight at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream::publish::PublishAck;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{Semaphore, mpsc};

use crate::client::Client;
use crate::client::jetstream_errors::map_publish;
use crate::core::backoff::RetryConfig;
use crate::core::error::{Error, Result};
use crate::core::message_id::MessageIds;
use crate::core::subject::IntoSubject;
use crate::core::sync::lock;
use crate::jetstream::publish::{Outgoing, StreamPublishOptions, default_publish_retry, first_ack};

impl Client {
    /// A publisher that keeps up to `max_in_flight` acknowledgements
    /// outstanding: for throughput, where awaiting each ack would cap a
    /// client at one round trip per message.
    ///
    /// It makes the promise [`publish_to_stream`](Self::publish_to_stream)
    /// makes, pipelined: every message carries a `Nats-Msg-Id` (assigned
    /// unless the options give one), and a message whose ack does not come
    /// (a lost connection, an election, a server restart) is sent again
    /// with the same id, at once after a reconnect and with back-off while
    /// JetStream is unavailable; the stream stores it once. So
    /// [`flush`](StreamPublisher::flush) reports as failed only what was
    /// refused for good or not stored within the retry budget (by default
    /// 10 resends).
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
            .api_prefix(self.jetstream_api_prefix())
            .max_ack_inflight(max_in_flight)
            .build(conn);
        let (acks, ack_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(PublisherShared::default());
        let slots = Arc::new(Semaphore::new(max_in_flight));
        tokio::spawn(collect_acks(
            ack_rx,
            shared.clone(),
            self.clone(),
            js.clone(),
        ));
        Ok(StreamPublisher {
            client: self.clone(),
            js,
            acks,
            shared,
            slots,
            max_in_flight,
            ids: MessageIds::new(nuid::next().as_str()),
        })
    }
}

#[derive(Debug, Default)]
struct PublisherShared {
    /// Messages handed to the server (also the next publish's index).
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

/// One sent message the collector sees through: its index, first ack,
/// the message (to send again), the connection epoch before the send, the
/// retry budget and its slot.
struct AckJob {
    index: u64,
    ack: async_nats::jetstream::context::PublishAckFuture,
    outgoing: Outgoing,
    epoch: tokio::sync::watch::Receiver<u64>,
    retry: RetryConfig,
    slot: tokio::sync::OwnedSemaphorePermit,
}

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
    /// Assigns the message ids the options do not give.
    ids: MessageIds,
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
        let retry = options.retry.unwrap_or_else(default_publish_retry);
        let out = self
            .client
            .prologue(&subject, caller_headers, payload.len(), |traced| {
                options.validate()?;
                options.headers = traced;
                if options.message_id.is_none() {
                    options.message_id = Some(self.ids.next_id());
                }
                Ok(options.header_map())
            })?;
        let (permit, headers) = (out.permit, out.headers);
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed)?;
        let mut outgoing = Outgoing::new(subject, payload, headers, &mut options);
        let epoch = self.client.connection_epoch();
        let message = outgoing.message();
        let sent = self
            .js
            .send_publish(outgoing.subject.clone(), message)
            .await
            .map_err(|e| map_publish(&outgoing.subject, e));
        // Queued, not yet acknowledged: proves nothing about the server.
        let ack = permit.record_unconfirmed(sent)?;
        let index = self.shared.sent.fetch_add(1, Ordering::Relaxed);
        self.acks
            .send(AckJob {
                index,
                ack,
                outgoing,
                epoch,
                retry,
                slot,
            })
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

async fn collect_acks(
    mut jobs: mpsc::UnboundedReceiver<AckJob>,
    shared: Arc<PublisherShared>,
    client: Client,
    js: async_nats::jetstream::Context,
) {
    let (client, js) = (&client, &js);
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            job = jobs.recv() => match job {
                // The slot is released only after the outcome is counted, so
                // a flush that holds every slot sees every count. A message
                // whose ack does not come is sent again meanwhile.
                Some(job) => pending.push(async move {
                    let AckJob { index, ack, mut outgoing, mut epoch, retry, slot } = job;
                    let result = match first_ack(ack, &mut epoch, &outgoing.subject).await {
                        Ok(ack) => Ok(ack),
                        // Sent again until settled, in a future of its own:
                        // boxed, so every message in flight does not carry
                        // the resend loop's size (one allocation of it per
                        // message cost more than the rest of the collector).
                        Err(err) => {
                            Box::pin(client.settle_publish(js, &mut outgoing, retry, epoch, Some(Err(err))))
                                .await
                        }
                    };
                    (index, outgoing.subject, result, slot)
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

fn record_ack(shared: &PublisherShared, index: u64, subject: &str, result: Result<PublishAck>) {
    match result {
        Ok(_) => {
            shared.acked.fetch_add(1, Ordering::Relaxed);
        }
        Err(err) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%subject, %err, "pipelined publish failed");
            lock(&shared.errors).push((index, err));
        }
    }
}
