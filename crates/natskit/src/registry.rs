//! What a client tracks of its subscriptions and consumers, so that
//! slow-consumer events reach the right counters and `close` can drain and
//! stop everything: the connection layer's bookkeeping, no I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

/// Counters of one subscription, from [`Subscription::stats`](crate::Subscription::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionStats {
    /// Messages taken from the subscription.
    pub received: u64,
    /// Handler invocations that finished (in any way).
    pub handled: u64,
    /// Handlers that returned an error.
    pub errors: u64,
    /// Handlers that panicked.
    pub panics: u64,
    /// Handlers that exceeded the per-message deadline.
    pub timeouts: u64,
    /// Messages dropped because this subscription fell behind. natskit
    /// reads the subscription without pause into its own queue of
    /// `subscription_capacity` messages while handlers run, and counts every
    /// message that does not fit exactly; async-nats' buffer behind it is
    /// then rarely full, and its drops (reported by best-effort events) are
    /// added when reported.
    pub dropped: u64,
}

#[derive(Debug)]
pub(crate) struct StatsCell {
    pub(crate) received_metric: metrics::Counter,
    pub(crate) dropped_metric: metrics::Counter,
    pub(crate) received: AtomicU64,
    pub(crate) handled: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) panics: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) dropped: AtomicU64,
    /// Nanoseconds since `created` of the last drop warning.
    pub(crate) last_warned: AtomicU64,
    pub(crate) created: Instant,
    /// The client's count of dropped messages.
    pub(crate) client_dropped: Arc<AtomicU64>,
}

impl StatsCell {
    pub(crate) fn new(
        (received_metric, dropped_metric): (metrics::Counter, metrics::Counter),
        client_dropped: Arc<AtomicU64>,
    ) -> Self {
        Self {
            received_metric,
            dropped_metric,
            received: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_warned: AtomicU64::new(0),
            created: Instant::now(),
            client_dropped,
        }
    }

    /// Counts one dropped message (here, client-wide and in the metric) and
    /// warns at most once a second per subscription.
    pub(crate) fn record_drop(&self, subject: &str) {
        self.record_drops(1, subject);
    }

    /// Counts `n` dropped messages; see [`record_drop`](Self::record_drop).
    pub(crate) fn record_drops(&self, n: u64, subject: &str) {
        let dropped = self.dropped.fetch_add(n, Ordering::Relaxed) + n;
        self.client_dropped.fetch_add(n, Ordering::Relaxed);
        self.dropped_metric.increment(n);
        let now = u64::try_from(self.created.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.last_warned.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 1_000_000_000)
            && self
                .last_warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(%subject, dropped, "slow consumer: messages dropped");
        }
    }

    pub(crate) fn snapshot(&self) -> SubscriptionStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SubscriptionStats {
            received: get(&self.received),
            handled: get(&self.handled),
            errors: get(&self.errors),
            panics: get(&self.panics),
            timeouts: get(&self.timeouts),
            dropped: get(&self.dropped),
        }
    }
}

/// Maps async-nats subscription ids to natskit stats, so slow-consumer
/// events are counted per subscription.
/// Also keeps every running subscription's control channel, for `close`.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    subs: Mutex<HashMap<u64, (String, Weak<StatsCell>)>>,
    controls: Mutex<Vec<Arc<watch::Sender<Control>>>>,
    /// Sizes after the last pruning passes.
    subs_kept: AtomicUsize,
    controls_kept: AtomicUsize,
}

impl Registry {
    pub(crate) fn add_control(&self, control: &Arc<watch::Sender<Control>>) {
        if let Ok(mut controls) = self.controls.lock() {
            // A finished runner has dropped its receiver. Pruned when the
            // list has doubled since the last pass, so subscribing stays
            // O(1) amortized (pruning on every call made 10,000
            // subscriptions quadratic).
            if controls.len() >= 2 * self.controls_kept.load(Ordering::Relaxed).max(32) {
                controls.retain(|c| c.receiver_count() > 0);
                self.controls_kept.store(controls.len(), Ordering::Relaxed);
            }
            controls.push(control.clone());
        }
    }

    /// Tells every running subscription to handle what it has buffered and
    /// stop. The caller has synced with the server first.
    pub(crate) fn drain_all(&self) {
        if let Ok(controls) = self.controls.lock() {
            for control in controls.iter() {
                request_drain(control);
            }
        }
    }

    pub(crate) fn register(&self, sid: u64, subject: &str, stats: &Arc<StatsCell>) {
        if let Ok(mut subs) = self.subs.lock() {
            // Amortized like `add_control`.
            if subs.len() >= 2 * self.subs_kept.load(Ordering::Relaxed).max(32) {
                subs.retain(|_, (_, s)| s.strong_count() > 0);
                self.subs_kept.store(subs.len(), Ordering::Relaxed);
            }
            subs.insert(sid, (subject.to_owned(), Arc::downgrade(stats)));
        }
    }

    /// A drop reported by async-nats (a slow-consumer event) for
    /// subscription `sid`; whether the subscription was known.
    pub(crate) fn record_drop(&self, sid: u64) -> bool {
        let Some((subject, stats)) = self.subs.lock().ok().and_then(|subs| {
            subs.get(&sid)
                .and_then(|(s, w)| Some((s.clone(), w.upgrade()?)))
        }) else {
            tracing::warn!(sid, "message dropped: subscription could not keep up");
            return false;
        };
        stats.record_drop(&subject);
        true
    }
}

/// async-nats keeps a subscriber's id private but prints it in `Debug`
/// (`Subscriber { sid: 7, .. }`); read it from there to map slow-consumer
/// events (which carry only the id) to the subscription.
pub(crate) fn subscriber_sid(subscriber: &async_nats::Subscriber) -> Option<u64> {
    let text = format!("{subscriber:?}");
    let rest = text.split_once("sid: ")?.1;
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    Run,
    Drain,
    Stop,
}

pub(crate) fn request_drain(control: &watch::Sender<Control>) {
    control.send_if_modified(|c| {
        if *c == Control::Run {
            *c = Control::Drain;
            true
        } else {
            false
        }
    });
}

/// A running consumer, as the client sees it: a key and a way to stop it.
pub(crate) trait Stoppable: Send + Sync + std::fmt::Debug {
    /// Whether it has stopped.
    fn is_stopped(&self) -> bool;
    /// Stops it and waits until it has.
    fn stop(&self) -> BoxFuture<'_, ()>;
}

/// The consumers a client runs, by (stream, consumer name).
#[derive(Debug, Default)]
pub(crate) struct Consumers {
    running: Mutex<HashMap<(String, String), Arc<dyn Stoppable>>>,
}

impl Consumers {
    pub(crate) fn insert(&self, stream: &str, name: &str, consumer: Arc<dyn Stoppable>) {
        if let Ok(mut running) = self.running.lock() {
            running.retain(|_, c| !c.is_stopped());
            running.insert((stream.to_owned(), name.to_owned()), consumer);
        }
    }

    pub(crate) fn remove(&self, stream: &str, name: &str) -> Option<Arc<dyn Stoppable>> {
        self.running
            .lock()
            .ok()?
            .remove(&(stream.to_owned(), name.to_owned()))
    }

    pub(crate) fn names_on(&self, stream: &str) -> Vec<String> {
        self.running
            .lock()
            .map(|r| {
                r.iter()
                    .filter(|((s, _), c)| s == stream && !c.is_stopped())
                    .map(|((_, name), _)| name.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Stops every consumer and waits for each.
    pub(crate) async fn stop_all(&self) {
        let all: Vec<_> = self
            .running
            .lock()
            .map(|mut r| r.drain().map(|(_, c)| c).collect())
            .unwrap_or_default();
        for consumer in all {
            consumer.stop().await;
        }
    }
}
