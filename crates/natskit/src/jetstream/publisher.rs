//! The pipelined publisher: many acknowledgements in flight at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use crate::client::Client;
use crate::client::ack_inbox::{AckInbox, ack_outcome, take_replies};
use crate::client::jetstream_errors::map_publish;
use crate::core::backoff::RetryConfig;
use crate::core::error::{Error, Result};
use crate::core::message_id::MessageIds;
use crate::core::subject::IntoSubject;
use crate::core::sync::lock;
use crate::jetstream::pipeline::{Handoff, Slots};
use crate::jetstream::publish::{
    Outgoing, SendPolicy, StreamPublishOptions, default_publish_retry, reconnected,
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
    /// The first acks come to an inbox of the publisher's own (one
    /// subscription to `_INBOX.<nuid>.*`), so the client's user needs
    /// permission to subscribe under `_INBOX.`, as for requests. Keep
    /// `max_in_flight` below the client's subscription capacity
    /// ([`ClientBuilder::subscription_capacity`](crate::ClientBuilder::subscription_capacity),
    /// 65,536 by default): acks beyond it would be dropped by the client
    /// and their messages sent again after the 5 s ack wait (stored once,
    /// but late).
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
        let inbox = Arc::new(AckInbox::new(&conn.new_inbox()));
        // For the stream lookup after no responders (see `settle_publish`).
        let js = async_nats::jetstream::ContextBuilder::new()
            .api_prefix(self.jetstream_api_prefix())
            .build(conn.clone());
        let acks = Arc::new(Handoff::new());
        let shared = Arc::new(PublisherShared::default());
        // None until the collector has subscribed to the inbox, so no ack
        // can come before that subscription.
        let slots = Arc::new(Slots::opening_later(max_in_flight));
        tokio::spawn(collect_acks(
            Collector {
                jobs: acks.clone(),
                slots: slots.clone(),
                inbox: inbox.clone(),
                conn,
            },
            shared.clone(),
            self.clone(),
            js,
        ));
        Ok(StreamPublisher {
            client: self.clone(),
            acks,
            shared,
            slots,
            inbox,
            ids: MessageIds::new(nuid::next().as_str()),
        })
    }
}

#[derive(Debug, Default)]
struct PublisherShared {
    /// The next publish's index (one is taken by every publish that got
    /// a slot, also when its send then failed).
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

/// One sent message on its way to the collector: its index (its first
/// ack comes to the inbox subject of that index), the connection epoch it
/// was sent on, and what the collector keeps while the ack is out.
struct AckJob {
    index: u64,
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
/// is awaited, by index, with the connection epoch each was sent on and
/// when the collector saw it, and the latest epoch seen. Which message an
/// ack settles, which ones a reconnect makes stale (their acks will never
/// come), which ones waited too long, acks that came before their message
/// was registered, when the shell's one timer is next due, and how many
/// outcomes were counted since the slots were last given back (each
/// message's once). `A` is what a failed ack carries.
struct AwaitingAcks<T, A> {
    seen: u64,
    /// How long a first ack may take.
    wait: Duration,
    /// When to look for overdue messages next; `None` while nothing is
    /// awaited (see [`check_at`](Self::check_at)).
    check_at: Option<Instant>,
    by_index: HashMap<u64, Awaiting<T>, foldhash::fast::FixedState>,
    /// Acks whose message was not registered when they came (the
    /// collector takes a message after its publish is queued, and its ack
    /// can overtake it), or never will be (a late ack of a message already
    /// handed back); kept for one ack wait.
    early: HashMap<u64, (Instant, Result<(), A>), foldhash::fast::FixedState>,
    /// Outcomes counted since [`take_counted`](Self::take_counted), and
    /// the acks among them.
    counted: usize,
    acked: u64,
}

/// A message awaiting its first ack.
struct Awaiting<T> {
    epoch: u64,
    since: Instant,
    item: T,
}

/// What registering a sent message found.
#[derive(Debug, PartialEq)]
enum Registered<T, A> {
    /// Its ack is awaited (or came already, and was counted).
    Awaiting,
    /// Sent on a connection already replaced: its ack will never come.
    Stale(T),
    /// Its ack came already, and failed.
    Failed(T, A),
}

impl<T, A> AwaitingAcks<T, A> {
    /// Nothing awaited yet; connection epoch `seen`; first acks may take
    /// `wait`.
    fn new(seen: u64, wait: Duration) -> Self {
        Self {
            seen,
            wait,
            check_at: None,
            by_index: HashMap::default(),
            early: HashMap::default(),
            counted: 0,
            acked: 0,
        }
    }

    /// The first ack of message `index` came, at `now`, with `outcome`:
    /// counted when it is a success; the message back when it failed
    /// (unless a reconnect already handed it back); kept when the message
    /// is not registered yet.
    fn answered(&mut self, index: u64, now: Instant, outcome: Result<(), A>) -> Option<(T, A)> {
        let Some(awaiting) = self.by_index.remove(&index) else {
            self.early.insert(index, (now, outcome));
            return None;
        };
        match outcome {
            Ok(()) => {
                self.count(true);
                None
            }
            Err(failure) => Some((awaiting.item, failure)),
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

    /// Message `index`, sent on connection `epoch`, registered at `now`:
    /// kept until its ack, unless that ack came already, or the connection
    /// was already replaced.
    fn sent(&mut self, index: u64, epoch: u64, now: Instant, item: T) -> Registered<T, A> {
        if let Some((_, outcome)) = self.early.remove(&index) {
            return match outcome {
                Ok(()) => {
                    self.count(true);
                    Registered::Awaiting
                }
                Err(failure) => Registered::Failed(item, failure),
            };
        }
        if epoch < self.seen {
            return Registered::Stale(item);
        }
        let awaiting = Awaiting {
            epoch,
            since: now,
            item,
        };
        self.by_index.insert(index, awaiting);
        self.check_at.get_or_insert_with(|| now + self.wait);
        Registered::Awaiting
    }

    /// The connection epoch is now `epoch`: every message sent before it.
    fn reconnected(&mut self, epoch: u64) -> Vec<(u64, T)> {
        self.seen = self.seen.max(epoch);
        self.take_where(|awaiting| awaiting.epoch < epoch)
    }

    /// The look the timer was set for, at `now`: every message
    /// registered the whole wait or longer before `now` (and the early acks
    /// kept that long are dropped); [`check_at`](Self::check_at) moves on.
    fn overdue(&mut self, now: Instant) -> Vec<(u64, T)> {
        let wait = self.wait;
        self.early
            .retain(|_, (came, _)| now.saturating_duration_since(*came) < wait);
        let overdue =
            self.take_where(|awaiting| now.saturating_duration_since(awaiting.since) >= wait);
        self.check_at = self.next_check(now);
        overdue
    }

    /// When the shell's one timer should next call
    /// [`overdue`](Self::overdue): a wait after the first message
    /// registered while none was awaited, then as `overdue` sets it;
    /// `None` once a look found nothing awaited.
    fn check_at(&self) -> Option<Instant> {
        self.check_at
    }

    /// The subscription the first acks came on ended: none comes any
    /// more, so every message awaited goes back now, and so does every
    /// message registered after (as sent on a replaced connection).
    fn inbox_ended(&mut self) -> Vec<(u64, T)> {
        self.reconnected(u64::MAX)
    }

    /// When to look for overdue messages next: when the oldest is due,
    /// but not sooner than an eighth of the wait from `now` (one look finds
    /// every message due by then; messages are not looked at one by
    /// one); `None` when nothing is awaited.
    fn next_check(&self, now: Instant) -> Option<Instant> {
        let oldest = self.by_index.values().map(|a| a.since).min()?;
        Some((oldest + self.wait).max(now + self.wait / 8))
    }

    fn take_where(&mut self, stale: impl Fn(&Awaiting<T>) -> bool) -> Vec<(u64, T)> {
        let indexes: Vec<u64> = self
            .by_index
            .iter()
            .filter(|(_, awaiting)| stale(awaiting))
            .map(|(index, _)| *index)
            .collect();
        indexes
            .into_iter()
            .filter_map(|index| Some((index, self.by_index.remove(&index)?.item)))
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
    acks: Arc<Handoff<AckJob>>,
    shared: Arc<PublisherShared>,
    slots: Arc<Slots>,
    /// Where the first acks come.
    inbox: Arc<AckInbox>,
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
        let (permit, headers, conn) = (out.permit, out.headers, out.conn);
        let slot = self.slots.take().await?;
        let mut outgoing = Outgoing::new(subject, payload, headers, &mut options);
        let epoch = self.client.epoch_now();
        let index = self.shared.sent.fetch_add(1, Ordering::Relaxed);
        let (payload, headers) = outgoing.parts();
        let sent = self
            .inbox
            .publish(conn, index, outgoing.subject.clone(), headers, payload)
            .await;
        // Queued, not yet acknowledged: proves nothing about the server.
        permit.record_unconfirmed(sent.map_err(Error::Publish))?;
        self.acks
            .send(AckJob {
                index,
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

/// Counts the outcome of every message a [`StreamPublisher`] sent. It
/// subscribes to the publisher's inbox first (and only then opens the
/// slots), reads the first acks from there in batches, and keeps one timer
/// for the messages whose first ack is late; the messages wait in a map,
/// and one watch of the connection epoch serves them all. A message whose
/// first ack fails or does not come in time, or whose connection was
/// replaced while it was out (its ack will never come), is settled by
/// [`Client::settle_publish`] in a future of its own: the rare path.
/// (Before, every first ack was async-nats' own request: see
/// [`ack_inbox`](crate::client::ack_inbox).)
async fn collect_acks(
    collector: Collector,
    shared: Arc<PublisherShared>,
    client: Client,
    js: async_nats::jetstream::Context,
) {
    let mut replies = match collector.conn.subscribe(collector.inbox.wildcard()).await {
        Ok(replies) => replies,
        Err(err) => {
            // The client is closed: publishes get `Closed` (see `Collector`).
            tracing::debug!(%err, "pipelined publisher could not subscribe to its inbox");
            return;
        }
    };
    collector.slots.give_back(collector.slots.max());
    let (client, js) = (&client, &js);
    // Pinned once and again only after it fired: a `changed()` made on
    // every pass of the loop registered a waiter per message.
    let mut changed = std::pin::pin!(next_epoch(client.connection_epoch()));
    let mut watching = true;
    let mut listening = true;
    let mut in_flight: AwaitingAcks<InFlight, PublishError> =
        AwaitingAcks::new(client.epoch_now(), FIRST_ACK_WAIT);
    // One timer for every first ack, set when `in_flight` says (`timer_at`
    // is what it is set for; `None`: disarmed).
    let mut timer = std::pin::pin!(tokio::time::sleep(FIRST_ACK_WAIT));
    let mut timer_at = None;
    let mut settling = FuturesUnordered::new();
    let (mut batch, mut acks) = (Vec::new(), Vec::new());
    // Settles `sent` after `first` (its failed first outcome): sent again
    // until settled, or given up.
    let settle = |index: u64, mut sent: InFlight, first: Error| {
        Box::pin(async move {
            let result = client
                .settle_publish(
                    js,
                    &mut sent.outgoing,
                    SendPolicy::new(sent.retry, None),
                    client.connection_epoch(),
                    Some(Err(first)),
                )
                .await;
            (index, sent.outgoing.subject, result)
        })
    };
    let failed = |sent: InFlight, err: PublishError| {
        let err = map_publish(&sent.outgoing.subject, err);
        (sent, err)
    };
    let mut open = true;
    while open || !in_flight.is_empty() || !settling.is_empty() {
        // Biased, in this order: no random draw per pass; acks (which free
        // slots) before new messages; the rare reconnect and timer after
        // them (the messages they hand back are settled whenever they are
        // seen); last, once nothing else is ready, the slots given back.
        tokio::select! {
            biased;
            more = std::future::poll_fn(|cx| take_replies(&mut replies, cx, &mut acks)), if listening => {
                let now = Instant::now();
                for message in acks.drain(..) {
                    let Some(index) = collector.inbox.index_of(&message.subject) else {
                        continue;
                    };
                    if let Some((sent, err)) = in_flight.answered(index, now, ack_outcome(&message)) {
                        let (sent, err) = failed(sent, err);
                        settling.push(settle(index, sent, err));
                    }
                }
                if !more {
                    // The subscription ended (the client is closing): no
                    // first ack comes any more; what is out is sent again
                    // through async-nats' own requests, as is everything
                    // after.
                    listening = false;
                    for (index, sent) in in_flight.inbox_ended() {
                        settling.push(settle(index, sent, reconnected()));
                    }
                }
            }
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
                let now = Instant::now();
                for AckJob { index, epoch, sent } in batch.drain(..) {
                    match in_flight.sent(index, epoch, now, sent) {
                        Registered::Awaiting => {}
                        // Sent on a connection already replaced.
                        Registered::Stale(sent) => settling.push(settle(index, sent, reconnected())),
                        Registered::Failed(sent, err) => {
                            let (sent, err) = failed(sent, err);
                            settling.push(settle(index, sent, err));
                        }
                    }
                }
                set_timer(timer.as_mut(), &mut timer_at, in_flight.check_at());
            }
            change = &mut changed, if watching => {
                let Some((now, epoch)) = change else {
                    // The client is gone: no further reconnects to see.
                    watching = false;
                    continue;
                };
                changed.set(next_epoch(epoch));
                // The acks of what was sent before will never come: send
                // those again.
                for (index, sent) in in_flight.reconnected(now) {
                    settling.push(settle(index, sent, reconnected()));
                }
            }
            () = &mut timer, if timer_at.is_some() => {
                timer_at = None;
                for (index, sent) in in_flight.overdue(Instant::now()) {
                    let (sent, err) = failed(sent, PublishError::new(PublishErrorKind::TimedOut));
                    settling.push(settle(index, sent, err));
                }
                set_timer(timer.as_mut(), &mut timer_at, in_flight.check_at());
            }
            () = std::future::ready(()), if in_flight.has_counted() => {
                give_back(&shared, &collector.slots, &mut in_flight);
            }
            else => break,
        }
    }
    give_back(&shared, &collector.slots, &mut in_flight);
}

/// Sets `timer` for `wanted` unless it is set for that already (`set`: what
/// it is set for; `None` disarms it).
fn set_timer(
    timer: std::pin::Pin<&mut tokio::time::Sleep>,
    set: &mut Option<Instant>,
    wanted: Option<Instant>,
) {
    if *set != wanted {
        if let Some(at) = wanted {
            timer.reset(at.into());
        }
        *set = wanted;
    }
}

/// How long a first ack may take before its message is sent again (with
/// its id, so the stream stores it once): async-nats' default JetStream
/// timeout, which bounded the first ack before.
const FIRST_ACK_WAIT: Duration = Duration::from_secs(5);

/// Adds the acks counted since the last call and gives their messages'
/// slots back (in that order: a flush that sees every slot free reads
/// every count).
fn give_back<T, A>(shared: &PublisherShared, slots: &Slots, in_flight: &mut AwaitingAcks<T, A>) {
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
    inbox: Arc<AckInbox>,
    conn: async_nats::Client,
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

    type Core = AwaitingAcks<&'static str, &'static str>;

    const WAIT: Duration = Duration::from_secs(5);

    fn at(seconds: u64) -> Instant {
        START.with(|start| *start + Duration::from_secs(seconds))
    }

    thread_local! {
        static START: Instant = Instant::now();
    }

    #[test]
    fn an_ack_settles_a_message_until_a_reconnect_hands_it_back() {
        let mut awaiting = Core::new(1, WAIT);
        assert_eq!(awaiting.sent(0, 1, at(0), "a"), Registered::Awaiting);
        assert_eq!(awaiting.sent(1, 1, at(0), "b"), Registered::Awaiting);
        assert_eq!(awaiting.answered(0, at(0), Err("nak")), Some(("a", "nak")));
        assert_eq!(awaiting.answered(0, at(0), Ok(())), None, "answered once");
        // A reconnect hands back what was sent before it; its late ack
        // then finds nothing.
        assert_eq!(awaiting.sent(2, 2, at(0), "c"), Registered::Awaiting);
        assert_eq!(awaiting.reconnected(2), vec![(1, "b")]);
        assert_eq!(awaiting.answered(1, at(0), Err("late")), None);
        assert_eq!(
            awaiting.answered(2, at(0), Err("c failed")),
            Some(("c", "c failed"))
        );
        assert!(awaiting.is_empty());
        assert_eq!(awaiting.take_counted(), None, "no ack came");
    }

    /// Every message's outcome is counted once toward the slots: its ack,
    /// or (when its first ack failed or a reconnect handed it back) its
    /// settled resend, never a late ack as well.
    #[test]
    fn every_outcome_counts_once_toward_the_slots() {
        let mut awaiting = Core::new(1, WAIT);
        for (index, item) in [(0, "a"), (1, "b"), (2, "c")] {
            assert_eq!(awaiting.sent(index, 1, at(0), item), Registered::Awaiting);
        }
        assert_eq!(awaiting.take_counted(), None, "nothing answered yet");
        assert_eq!(awaiting.answered(0, at(0), Ok(())), None);
        assert_eq!(
            awaiting.answered(1, at(0), Err("x")),
            Some(("b", "x")),
            "its first ack failed"
        );
        assert_eq!(awaiting.reconnected(2), vec![(2, "c")]);
        assert_eq!(awaiting.answered(2, at(0), Ok(())), None, "a late ack");
        assert!(awaiting.has_counted());
        assert_eq!(awaiting.take_counted(), Some((1, 1)), "only a's ack");
        // The two handed to `settle`: one stored by a resend, one given up.
        awaiting.count(true);
        awaiting.count(false);
        assert_eq!(awaiting.take_counted(), Some((2, 1)));
        assert_eq!(awaiting.take_counted(), None);
        assert!(awaiting.is_empty());
        // The late ack is not kept past one wait.
        assert!(awaiting.overdue(at(5)).is_empty());
        assert_eq!(awaiting.sent(2, 2, at(5), "c again"), Registered::Awaiting);
        assert_eq!(awaiting.take_counted(), None, "the late ack was dropped");
    }

    #[test]
    fn a_message_sent_on_a_replaced_connection_is_handed_back_at_once() {
        let mut awaiting = Core::new(1, WAIT);
        assert!(awaiting.reconnected(3).is_empty());
        assert_eq!(awaiting.sent(0, 2, at(0), "old"), Registered::Stale("old"));
        assert_eq!(awaiting.sent(1, 3, at(0), "new"), Registered::Awaiting);
        // An older epoch seen late changes nothing.
        assert!(awaiting.reconnected(2).is_empty());
        assert_eq!(
            awaiting.sent(2, 2, at(0), "older"),
            Registered::Stale("older")
        );
        assert!(!awaiting.is_empty());
        // No more first acks at all: everything goes back, now and after.
        assert_eq!(awaiting.inbox_ended(), vec![(1, "new")]);
        assert_eq!(
            awaiting.sent(3, 9, at(0), "after"),
            Registered::Stale("after")
        );
        assert!(awaiting.is_empty());
    }

    /// The ack of a message can reach the collector before the message
    /// does (its publish is queued first, then handed over): it counts
    /// when the message comes, success or failure.
    #[test]
    fn an_ack_that_overtakes_its_message_is_kept_for_it() {
        let mut awaiting = Core::new(1, WAIT);
        assert_eq!(awaiting.answered(0, at(0), Ok(())), None);
        assert_eq!(awaiting.answered(1, at(0), Err("refused")), None);
        assert_eq!(awaiting.take_counted(), None, "not registered yet");
        assert_eq!(awaiting.sent(0, 1, at(1), "a"), Registered::Awaiting);
        assert_eq!(awaiting.take_counted(), Some((1, 1)));
        // Even on a replaced connection: the ack says it was stored.
        awaiting.reconnected(2);
        assert_eq!(
            awaiting.sent(1, 1, at(1), "b"),
            Registered::Failed("b", "refused")
        );
        assert!(awaiting.is_empty(), "neither is awaited");
    }

    /// One timer serves every first ack: a look finds each message that
    /// waited the whole wait, and the next look is due when the oldest
    /// left is, but not sooner than an eighth of the wait.
    #[test]
    fn messages_without_an_ack_in_time_are_handed_back_by_one_timer() {
        let wait = Duration::from_secs(8);
        let mut awaiting = Core::new(1, wait);
        assert_eq!(awaiting.next_check(at(0)), None, "nothing awaited");
        assert_eq!(awaiting.check_at(), None);
        assert_eq!(awaiting.sent(0, 1, at(0), "a"), Registered::Awaiting);
        assert_eq!(awaiting.sent(1, 1, at(3), "b"), Registered::Awaiting);
        assert_eq!(awaiting.sent(2, 1, at(8), "c"), Registered::Awaiting);
        assert_eq!(awaiting.next_check(at(0)), Some(at(8)));
        assert_eq!(awaiting.check_at(), Some(at(8)), "a wait after the first");
        assert!(awaiting.overdue(at(7)).is_empty());
        assert_eq!(awaiting.overdue(at(8)), vec![(0, "a")]);
        assert_eq!(awaiting.next_check(at(8)), Some(at(11)));
        assert_eq!(awaiting.check_at(), Some(at(11)), "when b is due");
        assert_eq!(awaiting.answered(1, at(9), Ok(())), None);
        // c is due at 16; a look at 15.5 would be sooner than 15.5 + 1.
        assert_eq!(
            awaiting.next_check(at(15) + Duration::from_millis(500)),
            Some(at(16) + Duration::from_millis(500))
        );
        assert_eq!(awaiting.overdue(at(16)), vec![(2, "c")]);
        assert_eq!(awaiting.next_check(at(16)), None);
        assert_eq!(awaiting.check_at(), None, "nothing awaited: disarmed");
        assert_eq!(awaiting.sent(3, 1, at(20), "d"), Registered::Awaiting);
        assert_eq!(awaiting.check_at(), Some(at(28)), "armed again");
        assert_eq!(awaiting.take_counted(), Some((1, 1)), "b's ack");
    }
}
