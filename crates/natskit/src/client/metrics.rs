//! Metrics through the [`metrics`] facade: install any recorder (Prometheus,
//! StatsD...) and natskit reports into it. Every name starts with
//! `natskit_`; every series carries a `client` label (the client name, or
//! `default`), so several clients in one process stay apart.
//!
//! | name | kind | labels |
//! | --- | --- | --- |
//! | `natskit_connection_status` | gauge: 0 disconnected, 1 connecting, 2 connected, 3 reconnecting, 4 circuit open, 5 closed | client |
//! | `natskit_reconnects_total` | counter | client |
//! | `natskit_breaker_state` | gauge: 0 closed, 1 open, 2 half-open | client |
//! | `natskit_breaker_transitions_total` | counter | client, to |
//! | `natskit_breaker_rejections_total` | counter | client |
//! | `natskit_publishes_total` | counter | client |
//! | `natskit_request_duration_seconds` | histogram | client |
//! | `natskit_retries_total` | counter | client, op |
//! | `natskit_messages_received_total`, `natskit_messages_dropped_total` | counter | client, subject |
//! | `natskit_kv_cas_conflicts_total` | counter | client, bucket |
//! | `natskit_jetstream_reachable` | gauge: 1 when another JetStream domain or API the client targets answers, 0 when not | client, api |
//! | `natskit_consumer_deliveries_total`, `..._redeliveries_total`, `..._recreations_total` | counter | client, stream, consumer |
//! | `natskit_stream_messages`, `natskit_stream_bytes` | gauge (server values) | client, stream |
//! | `natskit_consumer_pending` | gauge (server values) | client, stream, consumer |
//! | `natskit_outbox_pending_messages`, `natskit_outbox_pending_bytes`, `natskit_outbox_oldest_age_seconds`, `natskit_outbox_dead_letters` | gauge | client |
//! | `natskit_outbox_enqueued_total`, `..._forwarded_total`, `..._failed_total`, `..._resent_total`, `..._reordered_total`, `..._dead_lettered_total` | counter | client |
//!
//! Handles are registered when a client is built: install the global
//! recorder before building clients. A subscription's two counters are
//! registered when it first counts a message (received or dropped), so a
//! subscription that never got one has no series. The stream gauges are polled by
//! [`Client::monitor_stream`](crate::Client::monitor_stream) and set from the server's numbers (never
//! accumulated).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use crate::client::breaker::BreakerState;
use crate::core::status::Status;

/// A count natskit reports twice, bumped in one call: an atomic that
/// `stats()` and `status_info()` read back, and a counter of the metrics
/// facade.
#[derive(Debug)]
pub(crate) struct Tally {
    count: AtomicU64,
    metric: Counter,
}

impl Tally {
    /// Zero, reported to `metric`.
    pub(crate) fn new(metric: Counter) -> Self {
        Self {
            count: AtomicU64::new(0),
            metric,
        }
    }

    /// Adds `n`; returns the new count.
    #[inline]
    pub(crate) fn add(&self, n: u64) -> u64 {
        self.metric.increment(n);
        self.count.fetch_add(n, Ordering::Relaxed) + n
    }

    /// The count so far.
    pub(crate) fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Handles of one client's metrics.
#[derive(Clone)]
pub(crate) struct ClientMetrics {
    /// The `client` label (shared with every subscription's lazily
    /// registered counters).
    pub(crate) client: Arc<str>,
    pub(crate) status: Gauge,
    /// Shared by the clones (the status task bumps it).
    pub(crate) reconnects: Arc<Tally>,
    pub(crate) breaker_state: Gauge,
    pub(crate) breaker_rejections: Counter,
    pub(crate) publishes: Counter,
    pub(crate) request_duration: Histogram,
}

impl std::fmt::Debug for ClientMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientMetrics")
            .field("client", &self.client)
            .finish()
    }
}

/// A subscription's received and dropped counters, registered when the
/// subscription first counts something (registering them at subscribe
/// time cost about 2,900 instructions a subscription, a third of
/// async-nats' whole subscribe).
pub(crate) fn subscription(client: &str, subject: &str) -> (Counter, Counter) {
    let labels = [
        ("client", client.to_owned()),
        ("subject", subject.to_owned()),
    ];
    (
        counter!("natskit_messages_received_total", &labels),
        counter!("natskit_messages_dropped_total", &labels),
    )
}

pub(crate) fn status_code(status: Status) -> f64 {
    match status {
        Status::Disconnected => 0.0,
        Status::Connecting => 1.0,
        Status::Connected => 2.0,
        Status::Reconnecting => 3.0,
        Status::CircuitOpen => 4.0,
        Status::Closed => 5.0,
    }
}

fn breaker_code(state: BreakerState) -> f64 {
    match state {
        BreakerState::Closed => 0.0,
        BreakerState::Open => 1.0,
        BreakerState::HalfOpen => 2.0,
    }
}

impl ClientMetrics {
    pub(crate) fn new(client: &str) -> Self {
        let client: Arc<str> = client.into();
        let labels = [("client", client.to_string())];
        Self {
            status: gauge!("natskit_connection_status", &labels),
            reconnects: Arc::new(Tally::new(counter!("natskit_reconnects_total", &labels))),
            breaker_state: gauge!("natskit_breaker_state", &labels),
            breaker_rejections: counter!("natskit_breaker_rejections_total", &labels),
            publishes: counter!("natskit_publishes_total", &labels),
            request_duration: histogram!("natskit_request_duration_seconds", &labels),
            client,
        }
    }

    pub(crate) fn breaker_changed(&self, to: BreakerState) {
        self.breaker_state.set(breaker_code(to));
        let to = match to {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        };
        counter!("natskit_breaker_transitions_total", "client" => self.client.to_string(), "to" => to)
            .increment(1);
    }

    pub(crate) fn retry(&self, op: &'static str) {
        counter!("natskit_retries_total", "client" => self.client.to_string(), "op" => op)
            .increment(1);
    }

    pub(crate) fn jetstream_reachable(&self, api: &str) -> Gauge {
        gauge!("natskit_jetstream_reachable", "client" => self.client.to_string(), "api" => api.to_owned())
    }

    pub(crate) fn kv_conflicts(&self, bucket: &str) -> Counter {
        counter!("natskit_kv_cas_conflicts_total", "client" => self.client.to_string(), "bucket" => bucket.to_owned())
    }

    pub(crate) fn consumer(&self, stream: &str, consumer: &str) -> ConsumerMetrics {
        let labels = [
            ("client", self.client.to_string()),
            ("stream", stream.to_owned()),
            ("consumer", consumer.to_owned()),
        ];
        ConsumerMetrics {
            deliveries: Tally::new(counter!("natskit_consumer_deliveries_total", &labels)),
            redeliveries: Tally::new(counter!("natskit_consumer_redeliveries_total", &labels)),
            recreations: Tally::new(counter!("natskit_consumer_recreations_total", &labels)),
        }
    }
}

#[cfg(feature = "outbox")]
impl ClientMetrics {
    pub(crate) fn outbox(&self) -> OutboxMetrics {
        let labels = [("client", self.client.to_string())];
        OutboxMetrics {
            pending_messages: gauge!("natskit_outbox_pending_messages", &labels),
            pending_bytes: gauge!("natskit_outbox_pending_bytes", &labels),
            oldest_age: gauge!("natskit_outbox_oldest_age_seconds", &labels),
            dead_letters: gauge!("natskit_outbox_dead_letters", &labels),
            enqueued: Tally::new(counter!("natskit_outbox_enqueued_total", &labels)),
            forwarded: Tally::new(counter!("natskit_outbox_forwarded_total", &labels)),
            failed: Tally::new(counter!("natskit_outbox_failed_total", &labels)),
            resent: Tally::new(counter!("natskit_outbox_resent_total", &labels)),
            reordered: Tally::new(counter!("natskit_outbox_reordered_total", &labels)),
            dead_lettered: Tally::new(counter!("natskit_outbox_dead_lettered_total", &labels)),
        }
    }
}

/// Handles of one outbox's metrics, and the counts it reports.
#[cfg(feature = "outbox")]
pub(crate) struct OutboxMetrics {
    pub(crate) pending_messages: Gauge,
    pub(crate) pending_bytes: Gauge,
    pub(crate) oldest_age: Gauge,
    pub(crate) dead_letters: Gauge,
    pub(crate) enqueued: Tally,
    pub(crate) forwarded: Tally,
    pub(crate) failed: Tally,
    pub(crate) resent: Tally,
    pub(crate) reordered: Tally,
    /// Moved to the dead letters since the outbox opened (never decreases;
    /// the `dead_letters` gauge is what is there now).
    pub(crate) dead_lettered: Tally,
}

#[cfg(feature = "outbox")]
impl std::fmt::Debug for OutboxMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutboxMetrics")
    }
}

/// One consumer's counts, reported as metrics too.
pub(crate) struct ConsumerMetrics {
    pub(crate) deliveries: Tally,
    pub(crate) redeliveries: Tally,
    pub(crate) recreations: Tally,
}

impl std::fmt::Debug for ConsumerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsumerMetrics")
    }
}
