//! The pipelined publisher: many acknowledgements in flight at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{Semaphore, mpsc};

use crate::client::Client;
use crate::client::jetstream_errors::map_publish;
use crate::core::error::{Error, Result};
use crate::core::subject::IntoSubject;
use crate::core::sync::lock;
use crate::jetstream::publish::StreamPublishOptions;

impl Client {
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
            .api_prefix(self.jetstream_api_prefix())
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
