//! The durable outbox: publishes that survive a partition and a process
//! crash, and reach JetStream exactly once.
//!
//! [`Outbox::publish_durable`] returns once the message is on local disk
//! (fsync'd, committed in groups with every other message waiting at that
//! moment). A forwarder task sends the stored messages to JetStream in the
//! order they were stored, up to [`OutboxConfig::max_in_flight`] at a time,
//! each with a `Nats-Msg-Id` that never changes, and deletes a message only
//! after the stream acknowledged it. It waits out disconnects, an open
//! circuit, server restarts and elections by itself, and resumes after a
//! restart of the process from what the file holds.
//!
//! # Semantics
//!
//! * **Never loss.** A message whose `publish_durable` returned `Ok` stays
//!   in the file until the stream acknowledged it (or JetStream refused it
//!   for good, which moves it to the dead-letter area, not away).
//! * **Exactly once** into the stream, as long as every resend of a message
//!   happens within the stream's duplicate window (2 minutes by default):
//!   the stream drops a second copy of a message id it has seen within its
//!   window. A resend after a partition or outage longer than the window
//!   may store a second copy (at-least-once). The outbox checks the
//!   duplicate window of every stream it delivers to and warns (log,
//!   [`OutboxStats::short_duplicate_windows`]) when it is shorter than
//!   [`OutboxConfig::duplicate_window`].
//! * **Order.** Messages are sent in the order they were stored, and after
//!   a failure the outbox goes back to the oldest unacknowledged one and
//!   resends from there. Order in the stream breaks only when a connection
//!   is lost mid-pipeline: what was written to the dying connection is lost
//!   with it, while later messages still queued inside async-nats go out on
//!   the next connection, ahead of the resends. The outbox sees that in the
//!   acks (a later message acknowledged first, or a resend stored fresh
//!   before a duplicate) and counts it in [`OutboxStats::reordered`]. A
//!   partition that heals without a reconnect keeps the order.
//!   [`OutboxConfig::strict_order`] makes the order exact for a stream the
//!   outbox writes alone: the stream refuses a message that would overtake
//!   a lost one, and the outbox resends in order.
//! * **Where it lands.** [`OutboxConfig::expect_stream`] names the one
//!   stream whose ack counts; an ack from another one is a dead letter.
//! * **Dead letters.** Messages JetStream refuses for good (no stream
//!   captures the subject, too large, refused by the stream, never
//!   acknowledged while later messages were, as a publish permission denial
//!   looks) and records the store cannot read are moved aside, counted and
//!   logged; they never block the queue. [`Outbox::dead_letters`] lists
//!   them and [`Outbox::requeue_dead_letters`] puts them back.
//!
//! # Storage
//!
//! One [redb](https://docs.rs/redb) file: an ACID, copy-on-write store with
//! checksummed commits, so a crash mid-write leaves the last complete
//! commit. A file damaged beyond that gives [`Error::OutboxCorrupted`].
//! One outbox may have a file open at a time, and a client one outbox;
//! [`close`](Outbox::close) one before opening its file again in the same
//! process.
//!
//! Records are packed into chunks of up to about 3.8 KB (one entry fills a
//! redb page; one record per entry filled pages about half), the pending
//! counts are kept in the file (opening reads only the first record: 1 ms
//! at 1,000,000 pending), and an outbox that empties compacts a file over
//! 4 MiB. After an I/O error (a full disk) the store reopens the file by
//! itself.
//!
//! ```no_run
//! # async fn demo(client: natskit::Client) -> natskit::Result<()> {
//! use natskit::{Outbox, OutboxConfig};
//! let outbox = Outbox::open(&client, OutboxConfig::new("/var/lib/app/outbox.redb")).await?;
//! let receipt = outbox.publish_durable("orders.created", "{\"id\":42}").await?;
//! println!("stored as #{} ({})", receipt.sequence, receipt.message_id);
//! outbox.flush_outbox(std::time::Duration::from_secs(30)).await?; // all acknowledged
//! # Ok(()) }
//! ```

mod forward;
mod store;
mod window;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::client::metrics::OutboxMetrics;
use crate::core::error::{Error, Result, check_nonzero};
use crate::core::status::OutboxStats;
use crate::core::subject::IntoSubject;
use crate::core::sync::{lock, read, write};
use crate::outbox::store::{Cmd, NewMessage, Opened, Signals, Writer};

/// Settings of a durable outbox.
///
/// ```
/// use std::time::Duration;
/// let config = natskit::OutboxConfig::new("outbox.redb")
///     .max_messages(100_000)
///     .max_bytes(64 << 20)
///     .max_in_flight(256)
///     .ack_timeout(Duration::from_secs(5));
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct OutboxConfig {
    path: PathBuf,
    max_messages: u64,
    max_bytes: u64,
    max_in_flight: usize,
    ack_timeout: Duration,
    duplicate_window: Duration,
    set_aside_corrupted: bool,
    jetstream_domain: Option<String>,
    strict_order: bool,
    expected_stream: Option<String>,
}

impl OutboxConfig {
    /// An outbox in the file at `path` (created when missing), with the
    /// defaults: 1,000,000 messages or 256 MiB, 256 in flight, 5 s ack
    /// timeout, a 2 minute duplicate window counted on.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_messages: 1_000_000,
            max_bytes: 256 << 20,
            max_in_flight: 256,
            ack_timeout: Duration::from_secs(5),
            duplicate_window: Duration::from_secs(120),
            set_aside_corrupted: false,
            jetstream_domain: None,
            strict_order: false,
            expected_stream: None,
        }
    }

    setter!(
        /// Most messages pending at once; beyond it `publish_durable` gives
        /// [`Error::OutboxFull`].
        max_messages: u64 => max_messages
    );
    setter!(
        /// Most bytes pending at once, counted as the records' own bytes
        /// (subject, headers, id, payload); beyond it `publish_durable`
        /// gives [`Error::OutboxFull`]. It bounds the logical bytes, not
        /// the file: while messages are pending the file is up to about
        /// twice this (redb doubles its file as it grows; measured 1.5-1.9x
        /// with 128-byte payloads), and once the outbox is empty the file is
        /// compacted to about 1-3 MiB. Size a small disk for twice
        /// `max_bytes`; a full disk is [`Error::OutboxDiskFull`].
        max_bytes: u64 => max_bytes
    );
    setter!(
        /// Most messages sent and not yet acknowledged.
        max_in_flight: usize => max_in_flight
    );
    setter!(
        /// How long a send waits for its ack before the outbox goes back and
        /// sends again from the oldest unacknowledged message.
        ack_timeout: Duration => ack_timeout
    );
    setter!(
        /// The duplicate window exactly-once counts on; a stream with a
        /// shorter one is reported (see the module docs).
        duplicate_window: Duration => duplicate_window
    );
    setter!(
        /// When the file is damaged beyond what the store repairs: rename it
        /// to `<file>.corrupt-<unix ms>` (kept for inspection and manual
        /// salvage) and start an empty outbox, instead of failing with
        /// [`Error::OutboxCorrupted`]. The messages in the damaged file are
        /// not forwarded; [`Outbox::set_aside`] names the file and an error
        /// is logged. Off by default: a service that must not lose a message
        /// should stop and page someone.
        set_aside_corrupted: bool => set_aside_corrupted
    );

    /// Forwards to the JetStream of `domain` (`$JS.<domain>.API`): from a
    /// leaf node to the hub's streams, say (default: the JetStream its
    /// client handle targets, see
    /// [`Client::with_jetstream_domain`](crate::Client::with_jetstream_domain)).
    /// An invalid domain is [`Error::InvalidConfig`] from
    /// [`Outbox::open`].
    pub fn jetstream_domain(mut self, domain: impl Into<String>) -> Self {
        self.jetstream_domain = Some(domain.into());
        self
    }

    setter!(
        /// Strict order, for a stream this outbox writes alone: the stream
        /// stores the messages in exactly the order they were stored here,
        /// also across lost connections, server restarts and elections
        /// ([`OutboxStats::reordered`] stays 0). Each message sent behind
        /// an unacknowledged one names what the stream must hold last
        /// before it (`Nats-Expected-Last-Msg-Id` on a stream without
        /// replicas, `Nats-Expected-Last-Sequence` on a replicated one,
        /// where a message id refusal stalls the stream), so the stream
        /// refuses a message that would overtake a lost one; the outbox
        /// then goes back and resends in order. Sends stay pipelined. Off by
        /// default: another writer to the stream makes the expectation
        /// fail and costs resends (never a dead letter, never disorder of
        /// this outbox's messages). All its subjects belong in that one
        /// stream (a message for another stream cannot name its
        /// predecessor, and goes out alone). Do not set the header
        /// yourself on durable messages.
        ///
        /// ```
        /// let config = natskit::OutboxConfig::new("outbox.redb")
        ///     .strict_order(true)
        ///     .expect_stream("ORDERS");
        /// # let _ = config;
        /// ```
        strict_order: bool => strict_order
    );

    /// Counts only an acknowledgement from `stream` as delivery. An ack
    /// from any other stream (at the edge: a leaf stream that also
    /// captures the subject, reached first) moves the message to the dead
    /// letters with both names in the reason, so it is reported (in
    /// [`FlushReport`], [`Outbox::dead_letters`] and the counters), never
    /// counted as delivered. Without it, an ack from any stream counts. A
    /// name that is not a valid stream name is [`Error::InvalidName`]
    /// from [`Outbox::open`].
    pub fn expect_stream(mut self, stream: impl Into<String>) -> Self {
        self.expected_stream = Some(stream.into());
        self
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn validate(&self) -> Result<()> {
        if self.max_messages == 0 || self.max_bytes == 0 {
            return Err(Error::InvalidConfig(
                "outbox limits must be at least 1".into(),
            ));
        }
        if self.max_in_flight == 0 {
            return Err(Error::InvalidConfig(
                "outbox max_in_flight must be at least 1".into(),
            ));
        }
        check_nonzero("outbox ack_timeout", self.ack_timeout)?;
        if let Some(stream) = &self.expected_stream {
            crate::core::subject::validate_name("outbox expect_stream", stream)?;
        }
        check_nonzero("outbox duplicate_window", self.duplicate_window)?;
        Ok(())
    }
}

/// Proof that a message is stored durably: its place in the outbox and the
/// `Nats-Msg-Id` it carries to the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Receipt {
    /// Local sequence (order of storing; never reused by this file).
    pub sequence: u64,
    /// The message id the stream de-duplicates on.
    pub message_id: String,
}

/// A message moved aside, from [`Outbox::dead_letters`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its local sequence (the key to requeue or purge it by).
    pub sequence: u64,
    /// Why it was moved aside.
    pub reason: String,
    /// The message, or why the stored record cannot be read.
    pub message: std::result::Result<DeadMessage, String>,
}

/// The content of a dead letter.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadMessage {
    /// Subject.
    pub subject: String,
    /// Message id.
    pub message_id: String,
    /// Headers (without the message id).
    pub headers: HeaderMap,
    /// Payload.
    pub payload: Bytes,
    /// When it was stored.
    pub enqueued_at: SystemTime,
}

#[derive(Debug, Default)]
struct Counters {
    /// Resends answered as duplicates (no metric; the rest of the counts
    /// are `Tally`s in `OutboxMetrics`).
    duplicates: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Depth {
    messages: i64,
    bytes: i64,
}

#[derive(Debug)]
struct Shared {
    config: OutboxConfig,
    outbox_id: String,
    /// Length of a default message id (fixed per outbox).
    default_id_len: usize,
    /// Taken at close, so the file is released once the store thread and
    /// any read under way are done with it.
    db: store::DbSlot,
    closed: std::sync::atomic::AtomicBool,
    commands: std::sync::mpsc::Sender<Cmd>,
    signals: Arc<Signals>,
    depth: Mutex<Depth>,
    counters: Counters,
    dead_letters: Arc<AtomicU64>,
    /// Enqueue time (ms) of the oldest message the forwarder holds; 0: none.
    head_ms: AtomicU64,
    /// Lowest sequence not yet settled (acknowledged or moved aside).
    low_water: watch::Sender<u64>,
    short_windows: Mutex<Vec<(String, Duration)>>,
    metrics: OutboxMetrics,
    /// Dead letters counted (`metrics.dead_lettered`) up to the last
    /// [`FlushReport`]: each flush reports those since.
    dead_reported: AtomicU64,
    /// Replicas of the stream last acknowledging (0: not known yet).
    stream_replicas: AtomicU64,
}

impl Shared {
    fn db(&self) -> Result<Arc<redb::Database>> {
        match read(&self.db).clone() {
            Some(db) => Ok(db),
            None if self.closed.load(Ordering::Acquire) => Err(Error::Closed),
            // The store thread is opening the file again after an I/O
            // error (a full disk): a moment.
            None => Err(Error::Outbox {
                op: "read",
                source: "the store is being reopened after an I/O error".into(),
            }),
        }
    }

    fn depth(&self) -> Depth {
        *lock(&self.depth)
    }

    fn reserve(&self, messages: u64, bytes: u64) -> Result<()> {
        let mut depth = lock(&self.depth);
        let (m, b) = (as_i64(messages), as_i64(bytes));
        if depth.messages + m > as_i64(self.config.max_messages)
            || depth.bytes + b > as_i64(self.config.max_bytes)
        {
            return Err(Error::OutboxFull {
                messages: depth.messages.max(0).unsigned_abs(),
                bytes: depth.bytes.max(0).unsigned_abs(),
                max_messages: self.config.max_messages,
                max_bytes: self.config.max_bytes,
            });
        }
        depth.messages += m;
        depth.bytes += b;
        Ok(())
    }

    fn adjust(&self, messages: i64, bytes: i64) {
        let mut depth = lock(&self.depth);
        depth.messages += messages;
        depth.bytes += bytes;
        self.metrics
            .pending_messages
            .set(depth.messages.max(0) as f64);
        self.metrics.pending_bytes.set(depth.bytes.max(0) as f64);
    }

    fn stats(&self) -> OutboxStats {
        let depth = self.depth();
        let head = self.head_ms.load(Ordering::Relaxed);
        let oldest_age = (depth.messages > 0 && head > 0)
            .then(|| Duration::from_millis(store::now_ms().saturating_sub(head)));
        let (c, m) = (&self.counters, &self.metrics);
        OutboxStats {
            pending_messages: depth.messages.max(0).unsigned_abs(),
            pending_bytes: depth.bytes.max(0).unsigned_abs(),
            oldest_age,
            enqueued: m.enqueued.get(),
            forwarded: m.forwarded.get(),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            failed: m.failed.get(),
            resent: m.resent.get(),
            reordered: m.reordered.get(),
            dead_letters: self.dead_letters.load(Ordering::Relaxed),
            short_duplicate_windows: lock(&self.short_windows).clone(),
        }
    }
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What the last `Outbox` handle's drop stops.
struct Handle {
    shared: Arc<Shared>,
    /// What this outbox attached to the client's `status_info`.
    stats_source: crate::client::OutboxStatsSource,
    set_aside: Option<PathBuf>,
    client: Client,
    cancel: CancellationToken,
    forwarder: Mutex<Option<tokio::task::JoinHandle<()>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.shared.config.path)
            .field("outbox_id", &self.shared.outbox_id)
            .field("set_aside", &self.set_aside)
            .field("stats", &self.shared.stats())
            .finish_non_exhaustive()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The forwarder sees this, stores what it settled and stops the
        // store thread, which closes the file.
        self.cancel.cancel();
        self.client.detach_outbox_stats(&self.stats_source);
    }
}

/// What [`Outbox::flush_outbox`] found once everything stored before it
/// was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct FlushReport {
    /// Messages moved to the dead letters (refused for good: see
    /// [`Outbox::dead_letters`]) since the previous flush returned, or
    /// since the outbox was opened: the flush's own messages that were
    /// refused are always among them, also when the forwarder refused them
    /// before the flush began.
    pub dead_lettered: u64,
}

/// A durable outbox attached to a [`Client`]: see the [module
/// docs](crate::outbox) for what it promises. Cheap to clone; forwarding
/// stops when the last clone is dropped or [`close`](Self::close)d (what was
/// not acknowledged stays in the file for the next open).
#[derive(Debug, Clone)]
pub struct Outbox {
    inner: Arc<Handle>,
}

impl Client {
    /// Opens a durable outbox on this client: shorthand for
    /// [`Outbox::open`].
    ///
    /// # Errors
    /// See [`Outbox::open`].
    pub async fn outbox(&self, config: OutboxConfig) -> Result<Outbox> {
        Outbox::open(self, config).await
    }
}

impl Outbox {
    /// Opens (or creates) the outbox file and starts forwarding what it
    /// holds. Works while the client is disconnected: messages wait.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`]; [`Error::OutboxCorrupted`] when the file
    /// is damaged beyond repair; [`Error::Outbox`] when it cannot be opened
    /// (I/O, or open in another outbox) or this client has an outbox
    /// already; [`Error::Closed`].
    pub async fn open(client: &Client, config: OutboxConfig) -> Result<Outbox> {
        client.ensure_open()?;
        config.validate()?;
        // The handle the forwarder publishes through: the client's own, or
        // one on the same connection targeting the configured domain.
        let target = match &config.jetstream_domain {
            Some(domain) => client.with_jetstream_domain(domain)?,
            None => client.clone(),
        };
        let has_one = || Error::Outbox {
            op: "open",
            source: "this client has an outbox already".into(),
        };
        if client.has_outbox() {
            return Err(has_one());
        }
        let signals = Arc::new(Signals::default());
        let dead = Arc::new(AtomicU64::new(0));
        let (opened_tx, opened_rx) = oneshot::channel::<Result<Opened>>();
        let (commands, receiver) = std::sync::mpsc::channel();
        let path = config.path.clone();
        let set_aside = config.set_aside_corrupted;
        let slot: store::DbSlot = Arc::new(std::sync::RwLock::new(None));
        let writer = {
            let (signals, dead, slot) = (signals.clone(), dead.clone(), slot.clone());
            std::thread::Builder::new()
                .name("natskit-outbox".into())
                .spawn(move || match store::open(&path, set_aside) {
                    Ok((opened, next_seq)) => {
                        *write(&slot) = Some(opened.db.clone());
                        let writer = Writer {
                            db: Some(opened.db.clone()),
                            slot,
                            broken: false,
                            retry: Vec::new(),
                            path,
                            outbox_id: opened.outbox_id.clone(),
                            next_seq,
                            signals,
                            dead_letters: dead,
                            pending: (opened.pending_messages, opened.pending_bytes),
                        };
                        writer
                            .dead_letters
                            .store(opened.dead_letters, Ordering::Relaxed);
                        writer
                            .signals
                            .last_committed
                            .store(next_seq - 1, Ordering::Release);
                        if opened_tx.send(Ok(opened)).is_ok() {
                            writer.run(receiver);
                        }
                    }
                    Err(err) => {
                        let _ = opened_tx.send(Err(err));
                    }
                })
                .map_err(|e| Error::Outbox {
                    op: "start the store thread",
                    source: Box::new(e),
                })?
        };
        let opened = opened_rx.await.map_err(|_| Error::Outbox {
            op: "open",
            source: "the store thread ended while opening".into(),
        })??;
        let metrics = client.metrics().outbox();
        metrics.dead_letters.set(opened.dead_letters as f64);
        let shared = Arc::new(Shared {
            config,
            outbox_id: opened.outbox_id.clone(),
            default_id_len: store::default_msg_id(&opened.outbox_id, 0).len(),
            db: slot,
            closed: std::sync::atomic::AtomicBool::new(false),
            commands,
            signals,
            depth: Mutex::new(Depth {
                messages: as_i64(opened.pending_messages),
                bytes: as_i64(opened.pending_bytes),
            }),
            counters: Counters::default(),
            dead_letters: dead,
            head_ms: AtomicU64::new(opened.oldest_ms),
            low_water: watch::Sender::new(opened.first_pending),
            short_windows: Mutex::new(Vec::new()),
            metrics,
            dead_reported: AtomicU64::new(0),
            stream_replicas: AtomicU64::new(0),
        });
        shared.adjust(0, 0);
        let weak = Arc::downgrade(&shared);
        let stats_source: crate::client::OutboxStatsSource =
            Arc::new(move || weak.upgrade().map(|s| s.stats()).unwrap_or_default());
        if !client.attach_outbox_stats(stats_source.clone()) {
            // Another outbox was attached while this file opened.
            let _ = shared.commands.send(Cmd::Shutdown);
            return Err(has_one());
        }
        tracing::info!(
            path = %shared.config.path.display(),
            outbox = %opened.outbox_id,
            pending = opened.pending_messages,
            dead_letters = opened.dead_letters,
            "outbox opened"
        );
        let cancel = client.shutdown().child_token();
        let forwarder = tokio::spawn(forward::forward(
            target,
            shared.clone(),
            cancel.clone(),
            opened.first_pending,
        ));
        Ok(Outbox {
            inner: Arc::new(Handle {
                shared,
                stats_source,
                set_aside: opened.set_aside,
                client: client.clone(),
                cancel,
                forwarder: Mutex::new(Some(forwarder)),
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    /// Stores a message durably and returns once it is on disk; the
    /// forwarder delivers it to the stream that captures `subject`.
    ///
    /// ```no_run
    /// # async fn demo(outbox: natskit::Outbox) -> natskit::Result<()> {
    /// match outbox.publish_durable("sensor.t1", "21.5").await {
    ///     Ok(receipt) => println!("stored #{}", receipt.sequence),
    ///     Err(e) if e.is_outbox_full() => { /* back off: the link is down for long */ }
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidSubject`], [`Error::PayloadTooLarge`] (known once the
    /// client has connected), [`Error::OutboxFull`], [`Error::Outbox`] (the
    /// disk refused), [`Error::Closed`].
    pub async fn publish_durable(
        &self,
        subject: impl IntoSubject,
        payload: impl Into<Bytes>,
    ) -> Result<Receipt> {
        let message = self.prepare(subject.into_subject().as_str(), None, payload.into())?;
        let mut receipts = self.enqueue(vec![message]).await?;
        receipts.pop().ok_or(Error::Closed)
    }

    /// [`publish_durable`](Self::publish_durable) with headers. A
    /// `Nats-Msg-Id` among them becomes the message id (your own key for
    /// de-duplication); otherwise the outbox makes one.
    ///
    /// # Errors
    /// As [`publish_durable`](Self::publish_durable), plus
    /// [`Error::InvalidHeader`].
    pub async fn publish_durable_with_headers(
        &self,
        subject: impl IntoSubject,
        headers: HeaderMap,
        payload: impl Into<Bytes>,
    ) -> Result<Receipt> {
        let message = self.prepare(
            subject.into_subject().as_str(),
            Some(headers),
            payload.into(),
        )?;
        let mut receipts = self.enqueue(vec![message]).await?;
        receipts.pop().ok_or(Error::Closed)
    }

    /// Stores a batch in one commit: all of it, or (on error) none of it.
    ///
    /// # Errors
    /// As [`publish_durable`](Self::publish_durable); the first invalid
    /// message rejects the batch.
    pub async fn publish_durable_batch<S, P>(
        &self,
        batch: impl IntoIterator<Item = (S, P)>,
    ) -> Result<Vec<Receipt>>
    where
        S: IntoSubject,
        P: Into<Bytes>,
    {
        let messages = batch
            .into_iter()
            .map(|(s, p)| self.prepare(s.into_subject().as_str(), None, p.into()))
            .collect::<Result<Vec<_>>>()?;
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        self.enqueue(messages).await
    }

    fn prepare(
        &self,
        subject: &str,
        headers: Option<HeaderMap>,
        payload: Bytes,
    ) -> Result<NewMessage> {
        let client = &self.inner.client;
        client.ensure_open()?;
        crate::core::subject::validate_publish(subject)?;
        if let Some(headers) = &headers {
            crate::core::header::validate(headers)?;
        }
        let headers = crate::client::trace::outgoing(headers, client.config().trace_mode);
        let id_name = async_nats::header::NATS_MESSAGE_ID;
        let mut msg_id = None;
        let mut fields = Vec::new();
        if let Some(headers) = &headers {
            for (name, values) in headers.iter() {
                let name: &str = name.as_ref();
                for value in values {
                    if name.eq_ignore_ascii_case(id_name.as_ref()) {
                        if value.as_str().is_empty() {
                            return Err(Error::InvalidHeader {
                                name: name.to_owned(),
                                reason: "empty message id",
                            });
                        }
                        msg_id = Some(value.as_str().to_owned());
                    } else {
                        fields.push((name.to_owned(), value.as_str().to_owned()));
                    }
                }
            }
        }
        let id_len = msg_id
            .as_ref()
            .map_or(self.inner.shared.default_id_len, String::len);
        if let Ok(conn) = client.nats() {
            // A caller's id is in `headers` already; a default one is added
            // by the forwarder as `Nats-Msg-Id: <id>\r\n`.
            let added = if msg_id.is_some() {
                0
            } else {
                AsRef::<str>::as_ref(&id_name).len() + 4 + id_len
            };
            crate::client::handler::check_payload(conn, payload.len() + added, headers.as_ref())?;
        }
        let size = store::record_len(subject.len(), id_len, &fields, payload.len());
        Ok(NewMessage {
            subject: subject.to_owned(),
            msg_id,
            headers: fields,
            payload,
            size,
        })
    }

    async fn enqueue(&self, messages: Vec<NewMessage>) -> Result<Vec<Receipt>> {
        let shared = &self.inner.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let count = messages.len() as u64;
        let bytes: u64 = messages.iter().map(|m| m.size).sum();
        shared.reserve(count, bytes)?;
        let (reply, answer) = oneshot::channel();
        let release = || shared.adjust(-as_i64(count), -as_i64(bytes));
        if shared
            .commands
            .send(Cmd::Enqueue { messages, reply })
            .is_err()
        {
            release();
            return Err(Error::Closed);
        }
        match answer.await {
            Ok(Ok(stored)) => {
                shared.metrics.enqueued.add(count);
                Ok(stored
                    .into_iter()
                    .map(|s| Receipt {
                        sequence: s.sequence,
                        message_id: s.msg_id,
                    })
                    .collect())
            }
            Ok(Err(err)) => {
                release();
                Err(err)
            }
            Err(_) => {
                release();
                Err(Error::Closed)
            }
        }
    }

    /// Waits until every message stored before this call has been
    /// settled: acknowledged by its stream, or moved to the dead letters.
    /// The report says how many went to the dead letters since the previous
    /// flush (see [`FlushReport::dead_lettered`]), so `Ok` is never
    /// mistaken for "all delivered".
    ///
    /// ```no_run
    /// # async fn demo(outbox: natskit::Outbox) -> natskit::Result<()> {
    /// let report = outbox.flush_outbox(std::time::Duration::from_secs(10)).await?;
    /// if report.dead_lettered > 0 {
    ///     eprintln!("{} messages refused: see dead_letters()", report.dead_lettered);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::OutboxFlushTimeout`] with the count still pending;
    /// [`Error::Closed`] when the outbox or its client is closed.
    pub async fn flush_outbox(&self, timeout: Duration) -> Result<FlushReport> {
        self.inner.client.ensure_open()?;
        let shared = &self.inner.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let target = shared.signals.last_committed.load(Ordering::Acquire);
        let mut low = shared.low_water.subscribe();
        let wait = low.wait_for(|low| *low > target);
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(_)) => {
                // Each dead letter is reported by exactly one flush.
                let now = shared.metrics.dead_lettered.get();
                let before = shared.dead_reported.fetch_max(now, Ordering::AcqRel);
                Ok(FlushReport {
                    dead_lettered: now.saturating_sub(before),
                })
            }
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::OutboxFlushTimeout {
                timeout,
                pending: shared.depth().messages.max(0).unsigned_abs(),
            }),
        }
    }

    /// Where a damaged file was moved at open (see
    /// [`OutboxConfig::set_aside_corrupted`]); `None` when it was not.
    pub fn set_aside(&self) -> Option<&Path> {
        self.inner.set_aside.as_deref()
    }

    /// Depth, age of the oldest message, counters (also in
    /// [`Client::status_info`]).
    pub fn stats(&self) -> OutboxStats {
        self.inner.shared.stats()
    }

    /// Up to `max` dead letters, oldest first.
    ///
    /// # Errors
    /// [`Error::Outbox`] when the store cannot be read.
    pub async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>> {
        let shared = self.inner.shared.clone();
        // Read what the forwarder moved aside so far.
        let (done, committed) = oneshot::channel();
        shared
            .commands
            .send(Cmd::Barrier(done))
            .map_err(|_| Error::Closed)?;
        committed.await.map_err(|_| Error::Closed)?;
        let db = shared.db()?;
        let rows =
            tokio::task::spawn_blocking(move || store::list_dead(&db, &shared.config.path, max))
                .await
                .map_err(|e| Error::Outbox {
                    op: "read dead letters",
                    source: Box::new(e),
                })??;
        Ok(rows
            .into_iter()
            .map(|(sequence, reason, record)| DeadLetter {
                sequence,
                reason,
                message: record
                    .map(|r| DeadMessage {
                        headers: header_map(&r.headers),
                        enqueued_at: UNIX_EPOCH + Duration::from_millis(r.enqueued_ms),
                        subject: r.subject,
                        message_id: r.msg_id,
                        payload: r.payload,
                    })
                    .map_err(|e| e.to_string()),
            })
            .collect())
    }

    /// Puts one dead letter (`Some(sequence)`) or all of them back at the
    /// end of the queue, with their message ids; returns how many moved.
    /// Unreadable records stay where they are.
    ///
    /// # Errors
    /// [`Error::Outbox`], [`Error::Closed`].
    pub async fn requeue_dead_letters(&self, sequence: Option<u64>) -> Result<u64> {
        let shared = &self.inner.shared;
        let (reply, answer) = oneshot::channel();
        shared
            .commands
            .send(Cmd::Requeue { sequence, reply })
            .map_err(|_| Error::Closed)?;
        let (moved, bytes) = answer.await.map_err(|_| Error::Closed)??;
        shared.adjust(as_i64(moved), as_i64(bytes));
        shared.metrics.enqueued.add(moved);
        self.dead_letters_changed();
        Ok(moved)
    }

    /// Deletes one dead letter (`Some(sequence)`) or all of them; returns
    /// how many were deleted.
    ///
    /// # Errors
    /// [`Error::Outbox`], [`Error::Closed`].
    pub async fn purge_dead_letters(&self, sequence: Option<u64>) -> Result<u64> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .shared
            .commands
            .send(Cmd::PurgeDead { sequence, reply })
            .map_err(|_| Error::Closed)?;
        let purged = answer.await.map_err(|_| Error::Closed)??;
        self.dead_letters_changed();
        Ok(purged)
    }

    fn dead_letters_changed(&self) {
        let shared = &self.inner.shared;
        shared
            .metrics
            .dead_letters
            .set(shared.dead_letters.load(Ordering::Relaxed) as f64);
    }

    /// Stops forwarding, stores what was settled and closes the file. What
    /// was not acknowledged stays for the next [`open`](Self::open). Other
    /// clones of this outbox fail with [`Error::Closed`] afterwards.
    ///
    /// # Errors
    /// [`Error::Outbox`] when the store thread ended abnormally.
    pub async fn close(&self) -> Result<()> {
        self.inner.shared.closed.store(true, Ordering::Release);
        self.inner.cancel.cancel();
        let forwarder = lock(&self.inner.forwarder).take();
        if let Some(forwarder) = forwarder {
            let _ = forwarder.await;
        }
        // The forwarder asked the store thread to stop; make sure of it
        // even if the forwarder died.
        let _ = self.inner.shared.commands.send(Cmd::Shutdown);
        *write(&self.inner.shared.db) = None;
        let writer = lock(&self.inner.writer).take();
        if let Some(writer) = writer {
            tokio::task::spawn_blocking(move || writer.join())
                .await
                .map_err(|e| Error::Outbox {
                    op: "close",
                    source: Box::new(e),
                })?
                .map_err(|_| Error::Outbox {
                    op: "close",
                    source: "the store thread panicked".into(),
                })?;
        }
        self.inner
            .client
            .detach_outbox_stats(&self.inner.stats_source);
        Ok(())
    }
}

fn header_map(fields: &[(String, String)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in fields {
        headers.append(name.as_str(), value.as_str());
    }
    headers
}
