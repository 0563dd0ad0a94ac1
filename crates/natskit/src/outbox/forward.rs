//! The forwarder: the async shell around [`Window`]. It loads stored
//! messages, sends them, awaits their acknowledgements, watches the
//! connection and the breaker, and carries out the window's effects on the
//! outbox's counters, metrics and store. Every decision is the window's.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishError;
use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::store::{self, Cmd};
use super::window::{Ack, Early, Effect, Expectation, LOAD_BATCH, Settle, Window};
use super::{Shared, as_i64};
use crate::client::Client;
use crate::client::ack_inbox::{AckInbox, read_ack, take_replies};
use crate::client::breaker::Permit;
use crate::client::jetstream_errors::{PublishFault, classify_publish};
use crate::client::retry;
use crate::core::error::{Error, Result};
use crate::core::sync::lock;

/// What the forwarder sends for one stored message.
pub(super) struct Body {
    subject: async_nats::Subject,
    msg_id: String,
    fields: Vec<(String, String)>,
    payload: Bytes,
}

impl Body {
    /// The stored headers plus the message id, and in strict order what
    /// the stream must hold last before it.
    fn headers(&self, expect: Option<Expectation<'_, Body>>) -> HeaderMap {
        let mut headers = super::header_map(&self.fields);
        headers.insert(async_nats::header::NATS_MESSAGE_ID, self.msg_id.as_str());
        match expect {
            Some(Expectation::MessageId(previous)) => {
                headers.insert(
                    async_nats::header::NATS_EXPECTED_LAST_MESSAGE_ID,
                    previous.msg_id.as_str(),
                );
            }
            Some(Expectation::Sequence(sequence)) => {
                headers.insert(
                    async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
                    sequence.to_string().as_str(),
                );
            }
            None => {}
        }
        headers
    }
}

/// The forwarder's ack inbox and its subscription.
struct Replies {
    inbox: AckInbox,
    subscription: async_nats::Subscriber,
}

/// A send in flight as the shell tracks it: its number (its ack comes to
/// the inbox subject of that number) and the ack, once read.
#[derive(Debug)]
pub(super) struct AckSlot {
    number: u64,
    answer: Option<std::result::Result<Ack, PublishError>>,
}

type Loaded = Result<Vec<store::LoadedRow>>;

/// What the forwarder holds besides the window: the outbox's shared state,
/// the breaker's admission of the current run of sends, and the load under
/// way.
struct Shell<'c> {
    window: Window<Body, AckSlot>,
    shared: Arc<Shared>,
    client: &'c Client,
    js: Option<async_nats::jetstream::Context>,
    permit: Option<Permit<'c>>,
    loading: Option<tokio::task::JoinHandle<Loaded>>,
    /// Where the acks come (see `ack_inbox`): subscribed before the first
    /// send, and again (a new inbox) after the subscription ended.
    replies: Option<Replies>,
    /// The next send's number.
    sends: u64,
}

pub(super) async fn forward(
    client: Client,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    first: u64,
) {
    let config = shared.config.clone();
    let mut shell = Shell {
        window: Window::new(first, retry::OUTBOX_RESEND)
            .strict_order(config.strict_order)
            .expect_stream(config.expected_stream.clone()),
        shared: shared.clone(),
        client: &client,
        js: None,
        permit: None,
        loading: None,
        replies: None,
        sends: 0,
    };
    let mut epoch = client.connection_epoch();
    epoch.borrow_and_update();
    // Both stay registered across passes of the loop (re-creating them per
    // pass took a lock or two per run of acks).
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    let mut epoch_changed = Box::pin(next_epoch(epoch));
    let mut status = client.status_watch();
    let tick =
        (config.ack_timeout / 10).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut answers = Vec::new();
    let mut deadlines = tokio::time::interval(tick);
    deadlines.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        shell.maybe_load();
        let mut link_down = false;
        if shell.window.can_send(Instant::now(), config.max_in_flight) {
            match client.live_conn() {
                Err(Error::Closed) => break,
                Err(_) => link_down = true,
                Ok(conn) => {
                    if shell.window.idle() && shell.permit.is_none() {
                        match client.guard() {
                            Ok(p) => shell.permit = Some(p),
                            Err(Error::CircuitOpen { retry_after }) => {
                                shell.window.pause_until(Instant::now() + retry_after);
                            }
                            Err(_) => link_down = true,
                        }
                    }
                    if shell.window.pause(Instant::now()).is_none() && !link_down {
                        shell.fill(conn, &cancel).await;
                    }
                }
            }
        }
        shell.publish_progress();
        if shell.window.removals_due(Instant::now()) {
            shell.flush_removals();
        }
        let pause = shell.window.pause(Instant::now());
        // Only while a load could start does a commit matter (one that
        // happened since `maybe_load` is kept by `Notify` as a permit).
        let want_wake = shell.loading.is_none() && shell.window.queued() < LOAD_BATCH;
        let has_inflight = !shell.window.idle();
        let is_loading = shell.loading.is_some();
        let listening = shell.replies.is_some();
        let Shell {
            loading, replies, ..
        } = &mut shell;
        tokio::select! {
            biased;
            () = &mut cancelled => break,
            (receiver, changed) = &mut epoch_changed => {
                if !changed {
                    break;
                }
                epoch_changed = Box::pin(next_epoch(receiver));
                // Acks of the old connection are lost: send again now, not
                // after the back-off of the failures that led here.
                shell.window.reconnected();
                shell.apply_effects();
            }
            more = std::future::poll_fn(|cx| match replies.as_mut() {
                Some(replies) => take_replies(&mut replies.subscription, cx, &mut answers),
                None => std::task::Poll::Pending,
            }), if listening => {
                if let Some(Replies { inbox, .. }) = &shell.replies {
                    for message in answers.drain(..) {
                        let Some(number) = inbox.index_of(&message.subject) else {
                            continue;
                        };
                        // A late answer to a send that went back is not found.
                        if let Some(slot) = shell.window.ack_by(|slot| slot.number.cmp(&number)) {
                            slot.answer.get_or_insert_with(|| read_answer(&message));
                        }
                    }
                }
                if !more {
                    // Its acks are lost as with a replaced connection: what
                    // is in flight goes back at once (as the pipelined
                    // publisher's does), and the next send subscribes again.
                    shell.replies = None;
                    shell.window.reconnected();
                    shell.apply_effects();
                }
                // Then the oldest send, and every later one in order that
                // is answered: one pass of the loop settles a run of acks.
                while let Some(answer) = shell.window.front_ack().and_then(|slot| slot.answer.take()) {
                    let settle = match answer {
                        Ok(ack) => Settle::Acked(ack),
                        Err(err) => {
                            let subject = shell.window.front().map(|body| body.subject.clone());
                            classify(&client, shell.js.as_ref(), subject, err).await
                        }
                    };
                    let settled = !matches!(settle, Settle::Transient(_));
                    shell.settle_front(settle);
                    if !settled {
                        break;
                    }
                }
            }
            loaded = async {
                match loading.as_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            }, if is_loading => {
                shell.loading = None;
                shell.take_loaded(loaded);
            }
            () = shared.signals.wake.notified(), if want_wake => {}
            // Ack deadlines are checked on a tick (one timer, not one per
            // message).
            _ = deadlines.tick(), if has_inflight => {
                if shell.window.front_overdue(Instant::now()) {
                    shell.settle_front(Settle::Transient("no acknowledgement in time".into()));
                }
            }
            () = async {
                match pause {
                    Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                    None => std::future::pending().await,
                }
            }, if pause.is_some() => {}
            _ = status.changed(), if link_down => {}
            // The status can change before the connection is usable: poll too.
            () = tokio::time::sleep(Duration::from_millis(50)), if link_down => {}
        }
    }
    shell.permit = None;
    if let Some(load) = shell.loading.take() {
        // It holds the file open; let it finish.
        let _ = load.await;
    }
    shell.publish_progress();
    shell.flush_removals();
    let _ = shared.commands.send(Cmd::Shutdown);
}

/// What an ack on the inbox tells the window.
fn read_answer(message: &async_nats::Message) -> std::result::Result<Ack, PublishError> {
    read_ack::<String>(message).map(|stored| Ack {
        stream: stored.stream,
        sequence: stored.sequence,
        duplicate: stored.duplicate,
    })
}

/// Waits for the next connection epoch; gives the receiver back, and
/// whether it changed (false: the client is gone).
async fn next_epoch(mut epoch: watch::Receiver<u64>) -> (watch::Receiver<u64>, bool) {
    let changed = epoch.changed().await.is_ok();
    (epoch, changed)
}

/// Reads a failed ack of a message on `subject`: what passes, what is final.
async fn classify(
    client: &Client,
    js: Option<&async_nats::jetstream::Context>,
    subject: Option<async_nats::Subject>,
    err: PublishError,
) -> Settle {
    match classify_publish(&err) {
        PublishFault::Timeout | PublishFault::Unavailable => Settle::Transient(err.to_string()),
        PublishFault::TooLarge => Settle::Refused(format!("too large: {err}")),
        // The window tells its own expectation (strict order) from one in
        // the message's stored headers (final).
        PublishFault::Conflict | PublishFault::WrongMessageId => {
            Settle::ExpectationFailed(format!("a precondition in its headers failed: {err}"))
        }
        // No stream, or one without a leader: ask which.
        PublishFault::NoResponders => match js.zip(subject) {
            Some((js, subject)) => match client.confirm_stream_missing(js, &subject).await {
                Error::StreamNotFound { .. } => {
                    Settle::Refused("no stream captures the subject".into())
                }
                _ => Settle::Transient(err.to_string()),
            },
            None => Settle::Transient(err.to_string()),
        },
        // `classify_publish` reads "no leader" codes as `Unavailable`: any
        // other answer from the stream is final; no answer at all is not.
        PublishFault::Other => {
            if answered(&err) {
                Settle::Refused(format!("refused by JetStream: {err}"))
            } else {
                Settle::Transient(err.to_string())
            }
        }
    }
}

/// The stream answered (with a refusal), as opposed to no answer at all.
fn answered(err: &PublishError) -> bool {
    std::error::Error::source(err).is_some_and(|s| s.is::<async_nats::jetstream::Error>())
}

impl Shell<'_> {
    /// Starts loading the next stored messages when the queue runs low.
    fn maybe_load(&mut self) {
        let committed = self.shared.signals.last_committed.load(Ordering::Acquire);
        if self.loading.is_some() || !self.window.wants_load(committed) {
            return;
        }
        let Ok(db) = self.shared.db() else { return };
        let path = self.shared.config.path.clone();
        let from = self.window.cursor();
        self.loading = Some(tokio::task::spawn_blocking(move || {
            store::load(&db, &path, from, LOAD_BATCH)
        }));
    }

    fn take_loaded(&mut self, loaded: std::result::Result<Loaded, tokio::task::JoinError>) {
        let rows = match loaded {
            Ok(Ok(rows)) => rows,
            Ok(Err(err)) => {
                tracing::error!(%err, "outbox: reading the store failed; retrying");
                self.window.load_failed(Instant::now());
                return;
            }
            Err(err) => {
                tracing::error!(%err, "outbox: the load task failed; retrying");
                return;
            }
        };
        for (seq, size, record) in rows {
            let row = record
                .map(|r| {
                    let body = Body {
                        subject: async_nats::Subject::from(r.subject),
                        msg_id: r.msg_id,
                        fields: r.headers,
                        payload: r.payload,
                    };
                    (r.enqueued_ms, body)
                })
                .map_err(|e| e.to_string());
            self.window.loaded(seq, size, row);
        }
        self.apply_effects();
    }

    /// Sends queued messages until the window is full.
    async fn fill(&mut self, conn: &async_nats::Client, cancel: &CancellationToken) {
        let config = &self.shared.config;
        let (max, ack_timeout) = (config.max_in_flight, config.ack_timeout);
        // Known once the first ack named the stream.
        self.window
            .set_stream_replicas(self.shared.stream_replicas.load(Ordering::Relaxed));
        // For the stream lookups after no responders (see `classify`).
        let api_prefix = self.client.jetstream_api_prefix();
        self.js.get_or_insert_with(|| {
            async_nats::jetstream::ContextBuilder::new()
                .api_prefix(api_prefix)
                .timeout(ack_timeout)
                .build(conn.clone())
        });
        if self.replies.is_none() {
            // Before any send, so no ack comes before the subscription.
            let inbox = AckInbox::new(&conn.new_inbox());
            match conn.subscribe(inbox.wildcard()).await {
                Ok(subscription) => {
                    self.replies = Some(Replies {
                        inbox,
                        subscription,
                    });
                }
                Err(err) => {
                    tracing::debug!(%err, "outbox: subscribing to the ack inbox failed");
                    return;
                }
            }
        }
        let Some(Replies { inbox, .. }) = &self.replies else {
            return;
        };
        while !cancel.is_cancelled() {
            let Some(msg) = self.window.next_to_send(max) else {
                break;
            };
            let headers = msg.body.headers(self.window.expectation());
            let number = self.sends;
            self.sends += 1;
            let (subject, payload) = (msg.body.subject.clone(), msg.body.payload.clone());
            let sent = inbox
                .publish(conn, number, subject, Some(headers), payload)
                .await;
            match sent {
                Ok(()) => {
                    let deadline = Instant::now() + ack_timeout;
                    let slot = AckSlot {
                        number,
                        answer: None,
                    };
                    self.window.sent(msg, slot, deadline);
                }
                Err(err)
                    if err.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded =>
                {
                    self.window.send_refused(msg, format!("too large: {err}"));
                }
                Err(err) => {
                    tracing::debug!(%err, "outbox: send failed");
                    self.window.send_failed(msg, Instant::now());
                    break;
                }
            }
        }
        self.apply_effects();
    }

    /// Settles the oldest send in flight; later acks already here are
    /// read without waiting.
    fn settle_front(&mut self, settle: Settle) {
        self.window
            .settle_front(settle, Instant::now(), fastrand::f64(), |slot| {
                match slot.answer.take()? {
                    Ok(ack) => Some(Early::Acked(ack)),
                    Err(err) if answered(&err) => Some(Early::Answered),
                    Err(_) => None,
                }
            });
        self.apply_effects();
    }

    /// Carries out the window's effects, in order.
    fn apply_effects(&mut self) {
        let shared = &self.shared;
        let counters = &shared.counters;
        let metrics = &shared.metrics;
        for effect in self.window.drain_effects() {
            match effect {
                Effect::BreakerSuccess => {
                    if let Some(p) = self.permit.take() {
                        p.success();
                    }
                }
                Effect::BreakerFailure => {
                    if let Some(p) = self.permit.take() {
                        p.failure();
                    }
                }
                Effect::BreakerRelease => self.permit = None,
                Effect::CountFailed => {
                    metrics.failed.add(1);
                }
                Effect::CountResent(n) => {
                    metrics.resent.add(n);
                }
                Effect::CountDuplicate => {
                    counters.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                Effect::Reordered { .. } => {
                    metrics.reordered.add(1);
                }
                Effect::DeadLetter { seq, size, reason } => {
                    let _ = shared.commands.send(Cmd::DeadLetter {
                        sequence: seq,
                        reason,
                    });
                    // Counted here, at once; the store thread counts only
                    // what leaves.
                    let dead = shared.dead_letters.fetch_add(1, Ordering::Relaxed) + 1;
                    metrics.dead_lettered.add(1);
                    metrics.dead_letters.set(dead as f64);
                    shared.adjust(-1, -as_i64(size));
                }
                Effect::CheckStream(stream) => {
                    if let Some(js) = &self.js {
                        check_duplicate_window(
                            js.clone(),
                            stream,
                            shared.clone(),
                            self.client.shutdown().clone(),
                        );
                    }
                }
            }
        }
    }

    fn flush_removals(&mut self) {
        let removed = self.window.take_removals();
        if !removed.is_empty() {
            let _ = self.shared.commands.send(Cmd::Remove(removed));
        }
    }

    /// Publishes the low-water mark (for `flush_outbox`), the oldest
    /// message's age and the gauges.
    fn publish_progress(&mut self) {
        let shared = &self.shared;
        let progress = self.window.progress();
        // Depth first: whoever sees the new low-water mark sees the depth
        // that goes with it.
        if progress.forwarded > 0 {
            shared.metrics.forwarded.add(progress.forwarded);
            shared.adjust(-as_i64(progress.forwarded), -as_i64(progress.bytes));
        }
        let low = progress.low_water;
        shared.low_water.send_if_modified(|current| {
            if *current != low {
                *current = low;
                true
            } else {
                false
            }
        });
        let head_ms = match progress.head {
            Some((_, ms)) => ms,
            // Nothing held and nothing left to load: empty.
            None if shared.signals.last_committed.load(Ordering::Acquire)
                < self.window.cursor() =>
            {
                0
            }
            // Not loaded yet: keep what is known (set at open).
            None => shared.head_ms.load(Ordering::Relaxed),
        };
        shared.head_ms.store(head_ms, Ordering::Relaxed);
        let age = if head_ms == 0 {
            0.0
        } else {
            store::now_ms().saturating_sub(head_ms) as f64 / 1000.0
        };
        shared.metrics.oldest_age.set(age);
    }
}

/// Warns (once per stream) when a stream's duplicate window is shorter
/// than the window exactly-once counts on, and notes its replicas (which
/// way strict order names a predecessor).
fn check_duplicate_window(
    js: async_nats::jetstream::Context,
    stream: String,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let info = tokio::select! {
            () = shutdown.cancelled() => return,
            info = async {
                let s = js.get_stream(&stream).await.ok()?;
                let config = &s.cached_info().config;
                Some((config.duplicate_window, config.num_replicas))
            } => info,
        };
        let Some((window, replicas)) = info else {
            return;
        };
        shared
            .stream_replicas
            .store(replicas.max(1) as u64, Ordering::Relaxed);
        if window < shared.config.duplicate_window {
            tracing::warn!(
                %stream,
                ?window,
                counted_on = ?shared.config.duplicate_window,
                "outbox: the stream's duplicate window is shorter than the outbox counts on; \
                 a resend after that long may store a message twice"
            );
            lock(&shared.short_windows).push((stream, window));
        }
    });
}
