//! The pipelined publisher: many acknowledgements in flight at once.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream::publish::PublishAck;
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};

use crate::client::Client;
use crate::client::jetstream_errors::map_publish;
use crate::core::backoff::RetryConfig;
use crate::core::error::{Error, Result};
use crate::core::message_id::MessageIds;
use crate::core::subject::IntoSubject;
use crate::core::sync::lock;
use crate::jetstream::pipeline::{Handoff, Slots};
use crate::jetstream::publish::{
    Outgoing, StreamPublishOptions, default_publish_retry, reconnected,
};

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
        let acks = Arc::new(Handoff::new());
        let shared = Arc::new(PublisherShared::default());
        let slots = Arc::new(Slots::new(max_in_flight));
        tokio::spawn(collect_acks(
            Collector {
                jobs: acks.clone(),
                slots: slots.clone(),
            },
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

/// One sent message on its way to the collector: its index, first ack,
/// the connection epoch it was sent on, and what the collector keeps while
/// the ack is out.
struct AckJob {
    index: u64,
    ack: async_nats::jetstream::context::PublishAckFuture,
    epoch: u64,
    sent: InFlight,
}

/// A sent message whose outcome is not known yet: the message (to send
/// again) and the retry budget. Its slot is given back when its outcome
/// is counted.
struct InFlight {
    outgoing: Outgoing,
    retry: RetryConfig,
}

/// The collector's decisions, without I/O: the messages whose first ack
/// is awaited, by index, with the connection epoch each was sent on, and
/// the latest epoch seen. Which message an ack settles, which ones a
/// reconnect makes stale (their acks will never come), and how many
/// outcomes were counted since the slots were last given back (each
/// message's once).
struct AwaitingAcks<T> {
    seen: u64,
    by_index: HashMap<u64, (u64, T), foldhash::fast::FixedState>,
    /// Outcomes counted since [`take_counted`](Self::take_counted), and
    /// the acks among them.
    counted: usize,
    acked: u64,
}

impl<T> AwaitingAcks<T> {
    fn new(seen: u64) -> Self {
        Self {
            seen,
            by_index: HashMap::default(),
            counted: 0,
            acked: 0,
        }
    }

    /// The first ack of message `index` came: counted, unless a reconnect
    /// already handed the message back (its resend counts instead).
    fn acked(&mut self, index: u64) {
        if self.answered(index).is_some() {
            self.count(true);
        }
    }

    /// One outcome counted (an ack, or a handed-back message settled).
    fn count(&mut self, acked: bool) {
        self.counted += 1;
        self.acked += u64::from(acked);
    }

    /// The outcomes counted since the last call and the acks among them,
    /// if any: their slots are due back.
    fn take_counted(&mut self) -> Option<(usize, u64)> {
        let counted = (
            std::mem::take(&mut self.counted),
            std::mem::take(&mut self.acked),
        );
        (counted.0 > 0).then_some(counted)
    }

    fn has_counted(&self) -> bool {
        self.counted > 0
    }

    /// Message `index`, sent on connection `epoch`: kept until its ack, or
    /// handed back when that connection was already replaced.
    fn sent(&mut self, index: u64, epoch: u64, item: T) -> Option<T> {
        if epoch < self.seen {
            return Some(item);
        }
        self.by_index.insert(index, (epoch, item));
        None
    }

    /// The first ack of message `index` came (or failed): the message,
    /// unless a reconnect already handed it back.
    fn answered(&mut self, index: u64) -> Option<T> {
        self.by_index.remove(&index).map(|(_, item)| item)
    }

    /// The connection epoch is now `epoch`: every message sent before it.
    fn reconnected(&mut self, epoch: u64) -> Vec<(u64, T)> {
        self.seen = self.seen.max(epoch);
        let stale: Vec<u64> = self
            .by_index
            .iter()
            .filter(|(_, (sent_on, _))| *sent_on < epoch)
            .map(|(index, _)| *index)
            .collect();
        stale
            .into_iter()
            .filter_map(|index| Some((index, self.answered(index)?)))
            .collect()
    }

    fn is_empty(&self) -> bool {
        self.by_index.is_empty()
    }
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
    acks: Arc<Handoff<AckJob>>,
    shared: Arc<PublisherShared>,
    slots: Arc<Slots>,
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
                options.prepare(traced, &self.ids)
            })?;
        let (permit, headers) = (out.permit, out.headers);
        let slot = self.slots.take().await?;
        let mut outgoing = Outgoing::new(subject, payload, headers, &mut options);
        let epoch = self.client.epoch_now();
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
                epoch,
                sent: InFlight { outgoing, retry },
            })
            .map_err(|_| Error::Closed)?;
        slot.handed();
        Ok(())
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
        self.slots.flush().await;
        PublishReport {
            acked: self.shared.acked.load(Ordering::Relaxed),
            failed: self.shared.failed.load(Ordering::Relaxed),
            errors: std::mem::take(&mut *lock(&self.shared.errors)),
        }
    }

    /// Messages acknowledged so far. The collector hands its counts over
    /// once per burst of acks, so between flushes this may trail the
    /// server by the acks of one burst; [`flush`](Self::flush) is exact.
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::Relaxed)
    }

    /// Messages failed so far.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }
}

/// Counts the outcome of every message a [`StreamPublisher`] sent. The
/// first acks are small futures in one set, keyed by index; the messages
/// wait beside them in a map; one watch of the connection epoch serves them
/// all. A message whose first ack fails, or whose connection was replaced
/// while it was out (its ack will never come), is settled by
/// [`Client::settle_publish`] in a future of its own: the rare path.
/// (Before, every message was one future holding all of this and its own
/// epoch watch: about 4,900 instructions a message more than raw
/// async-nats, most of them copying that future around.)
async fn collect_acks(
    collector: Collector,
    shared: Arc<PublisherShared>,
    client: Client,
    js: async_nats::jetstream::Context,
) {
    let (client, js) = (&client, &js);
    // Pinned once and again only after it fired: a `changed()` made on
    // every pass of the loop registered a waiter per message.
    let mut changed = std::pin::pin!(next_epoch(client.connection_epoch()));
    let mut watching = true;
    let mut acks = FuturesUnordered::new();
    let mut in_flight: AwaitingAcks<InFlight> = AwaitingAcks::new(client.epoch_now());
    let mut settling = FuturesUnordered::new();
    let mut batch = Vec::new();
    // Settles `sent` after `first` (its failed first outcome): sent again
    // until settled, or given up.
    let settle = |index: u64, mut sent: InFlight, first: Result<PublishAck>| {
        Box::pin(async move {
            let result = client
                .settle_publish(
                    js,
                    &mut sent.outgoing,
                    sent.retry,
                    client.connection_epoch(),
                    Some(first),
                )
                .await;
            (index, sent.outgoing.subject, result)
        })
    };
    let mut open = true;
    while open || !in_flight.is_empty() || !settling.is_empty() {
        // Biased, in this order: no random draw per pass; acks (which free
        // slots) before new messages; the rare reconnect polled after
        // them (the messages it makes stale are settled whenever it is
        // seen); last, once nothing else is ready, the slots given back.
        tokio::select! {
            biased;
            Some((index, result)) = acks.next(), if !acks.is_empty() => match result {
                Ok(_) => in_flight.acked(index),
                // Absent: already handed to `settle` after a reconnect.
                Err(err) => if let Some(sent) = in_flight.answered(index) {
                    let err = map_publish(&sent.outgoing.subject, err);
                    settling.push(settle(index, sent, Err(err)));
                },
            },
            Some((index, subject, result)) = settling.next(), if !settling.is_empty() => {
                in_flight.count(result.is_ok());
                if let Err(err) = result {
                    record_failure(&shared, index, &subject, err);
                }
            }
            more = std::future::poll_fn(|cx| collector.jobs.poll_take(cx, &mut batch)), if open => {
                if !more {
                    open = false;
                }
                for AckJob { index, ack, epoch, sent } in batch.drain(..) {
                    match in_flight.sent(index, epoch, sent) {
                        // Sent on a connection already replaced.
                        Some(sent) => settling.push(settle(index, sent, Err(reconnected()))),
                        None => acks.push(ack.into_future().map(move |result| (index, result))),
                    }
                }
            }
            change = &mut changed, if watching => {
                let Some((now, epoch)) = change else {
                    // The client is gone: no further reconnects to see.
                    watching = false;
                    continue;
                };
                changed.set(next_epoch(epoch));
                // The acks of what was sent before will never come: send
                // those again (their stale ack futures end on their own).
                for (index, sent) in in_flight.reconnected(now) {
                    settling.push(settle(index, sent, Err(reconnected())));
                }
            }
            () = std::future::ready(()), if in_flight.has_counted() => {
                give_back(&shared, &collector.slots, &mut in_flight);
            }
            else => break,
        }
    }
    give_back(&shared, &collector.slots, &mut in_flight);
}

/// Adds the acks counted since the last call and gives their messages'
/// slots back (in that order: a flush that sees every slot free reads
/// every count).
fn give_back<T>(shared: &PublisherShared, slots: &Slots, in_flight: &mut AwaitingAcks<T>) {
    if let Some((counted, acked)) = in_flight.take_counted() {
        shared.acked.fetch_add(acked, Ordering::Relaxed);
        slots.give_back(counted);
    }
}

/// The collector's ends of the hand-offs: closed when it ends (or its task
/// is dropped), so publishes and flushes fail with [`Error::Closed`]
/// instead of waiting for it.
struct Collector {
    jobs: Arc<Handoff<AckJob>>,
    slots: Arc<Slots>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.jobs.close();
        self.slots.close();
    }
}

impl Drop for StreamPublisher {
    /// Nothing more is sent: the collector ends once every ack is counted.
    fn drop(&mut self) {
        self.acks.close();
    }
}

/// The next connection epoch, and the receiver to wait for the one after;
/// `None` once the client is gone.
async fn next_epoch(
    mut epoch: tokio::sync::watch::Receiver<u64>,
) -> Option<(u64, tokio::sync::watch::Receiver<u64>)> {
    epoch.changed().await.ok()?;
    let now = *epoch.borrow_and_update();
    Some((now, epoch))
}

/// A message that failed for good: counted, logged and kept for the next
/// flush's report.
fn record_failure(shared: &PublisherShared, index: u64, subject: &str, err: Error) {
    shared.failed.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(%subject, %err, "pipelined publish failed");
    lock(&shared.errors).push((index, err));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_settles_a_message_until_a_reconnect_hands_it_back() {
        let mut awaiting = AwaitingAcks::new(1);
        assert_eq!(awaiting.sent(0, 1, "a"), None);
        assert_eq!(awaiting.sent(1, 1, "b"), None);
        assert_eq!(awaiting.answered(0), Some("a"));
        assert_eq!(awaiting.answered(0), None, "answered once");
        // A reconnect hands back what was sent before it; its late ack
        // then finds nothing.
        assert_eq!(awaiting.sent(2, 2, "c"), None, "sent on the new connection");
        assert_eq!(awaiting.reconnected(2), vec![(1, "b")]);
        assert_eq!(awaiting.answered(1), None);
        assert_eq!(awaiting.answered(2), Some("c"));
        assert!(awaiting.is_empty());
    }

    /// Every message's outcome is counted once toward the slots: its ack,
    /// or (when its first ack failed or a reconnect handed it back) its
    /// settled resend, never a late ack as well.
    #[test]
    fn every_outcome_counts_once_toward_the_slots() {
        let mut awaiting = AwaitingAcks::new(1);
        for (index, item) in [(0, "a"), (1, "b"), (2, "c")] {
            assert_eq!(awaiting.sent(index, 1, item), None);
        }
        assert_eq!(awaiting.take_counted(), None, "nothing answered yet");
        awaiting.acked(0);
        assert_eq!(awaiting.answered(1), Some("b"), "its first ack failed");
        assert_eq!(awaiting.reconnected(2), vec![(2, "c")]);
        awaiting.acked(2);
        assert!(awaiting.has_counted());
        assert_eq!(awaiting.take_counted(), Some((1, 1)), "only a's ack");
        // The two handed to `settle`: one stored by a resend, one given up.
        awaiting.count(true);
        awaiting.count(false);
        assert_eq!(awaiting.take_counted(), Some((2, 1)));
        assert_eq!(awaiting.take_counted(), None);
        assert!(awaiting.is_empty());
    }

    #[test]
    fn a_message_sent_on_a_replaced_connection_is_handed_back_at_once() {
        let mut awaiting = AwaitingAcks::new(1);
        assert!(awaiting.reconnected(3).is_empty());
        assert_eq!(awaiting.sent(0, 2, "old"), Some("old"));
        assert_eq!(awaiting.sent(1, 3, "new"), None);
        // An older epoch seen late changes nothing.
        assert!(awaiting.reconnected(2).is_empty());
        assert_eq!(awaiting.sent(2, 2, "older"), Some("older"));
        assert!(!awaiting.is_empty());
    }
}
