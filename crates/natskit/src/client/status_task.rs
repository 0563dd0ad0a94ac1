//! The status task: turns connection events, breaker changes, timers and
//! probe results into [`StatusInput`]s for [`StatusCore`] and carries out
//! its effects (status, health, callbacks, counters).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Config, Inner, duration_nanos};
use crate::client::breaker::BreakerState;
use crate::client::metrics::ClientMetrics;
use crate::client::registry::Registry;
use crate::core::error::{Error, Result};
use crate::core::status::{Status, StatusCore, StatusEffect, StatusInput, record_reach};
use crate::core::sync::lock;

/// A subscription on a private inbox that measures round trips through the
/// server. (`flush` only waits for the socket, so it cannot tell a frozen
/// server from a live one.)
pub(crate) struct Probe {
    subject: async_nats::Subject,
    subscriber: async_nats::Subscriber,
    seq: u64,
}

impl Probe {
    pub(crate) async fn new(conn: &async_nats::Client) -> Result<Self> {
        let subject = async_nats::Subject::from(conn.new_inbox());
        let subscriber = conn
            .subscribe(subject.clone())
            .await
            .map_err(Error::Subscribe)?;
        Ok(Self {
            subject,
            subscriber,
            seq: 0,
        })
    }

    pub(crate) async fn round_trip(
        &mut self,
        conn: &async_nats::Client,
        timeout: Duration,
    ) -> Result<Duration> {
        use futures_util::StreamExt;
        self.seq += 1;
        let token = bytes::Bytes::from(self.seq.to_string());
        let start = Instant::now();
        conn.publish(self.subject.clone(), token.clone())
            .await
            .map_err(Error::Publish)?;
        let echo = async {
            // Skip echoes of earlier probes that timed out.
            while let Some(msg) = self.subscriber.next().await {
                if msg.payload == token {
                    return true;
                }
            }
            false
        };
        match tokio::time::timeout(timeout, echo).await {
            Ok(true) => Ok(start.elapsed()),
            Ok(false) => Err(Error::NotConnected),
            Err(_) => Err(Error::ConnectionTimeout(timeout)),
        }
    }
}

/// What the supervisor task reacts to.
pub(crate) enum Signal {
    Nats(async_nats::Event),
    Breaker(BreakerState),
    Connecting,
    /// `connect()` succeeded (in case async-nats' event was dropped).
    Established,
    ConnectFailed(String),
    Closed,
}

/// Why a round trip through the server was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeKind {
    Health,
    Breaker,
}

/// How often the client probes the server itself while the breaker is open
/// and the connection is up (a frozen or overloaded server).
const BREAKER_PROBE_INTERVAL: Duration = Duration::from_millis(250);

type ProbeFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = (ProbeKind, Option<Probe>, Result<Duration>)> + Send>,
>;

/// Runs a user callback, catching and counting a panic so that the status
/// task survives it.
fn fire(inner: &Weak<Inner>, what: &'static str, callback: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(callback)).is_err() {
        tracing::error!(callback = what, "client callback panicked; ignored");
        if let Some(inner) = inner.upgrade() {
            inner
                .counters
                .callback_panics
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The status task: a thin async shell around [`StatusCore`], which decides
/// what status, health and callbacks follow from each input. The shell
/// turns signals, timers and probe results into inputs and carries out the
/// effects in order. Round trips (health checks, and probes while the
/// breaker is open) run beside it, so a frozen server never delays a status
/// change.
pub(crate) async fn supervise(
    inner: Weak<Inner>,
    signals: mpsc::UnboundedReceiver<Signal>,
    status_tx: watch::Sender<Status>,
    shutdown: CancellationToken,
) {
    if let Some(task) = StatusTask::new(inner, status_tx) {
        task.run(signals, shutdown).await;
    }
}

/// The status task's state: the core, the probe in flight and the timers.
struct StatusTask {
    inner: Weak<Inner>,
    config: Config,
    registry: Arc<Registry>,
    metrics: ClientMetrics,
    status_tx: watch::Sender<Status>,
    core: StatusCore,
    /// The probe subscription, kept between round trips.
    probe: Option<Probe>,
    /// The round trip in flight, if any.
    probing: Option<ProbeFuture>,
    health: Option<tokio::time::Interval>,
    breaker_ticker: tokio::time::Interval,
    /// The checks of the other JetStream APIs in flight, if any.
    uplinks: Option<UplinkFuture>,
}

/// Whether each checked JetStream API answered.
type UplinkFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Vec<(String, bool)>> + Send>>;

/// What woke the task up.
enum Wake {
    Shutdown,
    Signal(Option<Signal>),
    LostTimer,
    BreakerTick,
    ProbeDone(ProbeKind, Option<Probe>, Result<Duration>),
    HealthTick,
    UplinksChecked(Vec<(String, bool)>),
}

impl StatusTask {
    fn new(inner: Weak<Inner>, status_tx: watch::Sender<Status>) -> Option<Self> {
        let strong = inner.upgrade()?;
        let config = strong.config.clone();
        let registry = strong.registry.clone();
        let metrics = strong.metrics.clone();
        drop(strong);
        let health = config.health_interval.map(|every| {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        });
        let mut breaker_ticker = tokio::time::interval(BREAKER_PROBE_INTERVAL);
        breaker_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Some(Self {
            core: StatusCore::new(config.connection_lost_after),
            inner,
            config,
            registry,
            metrics,
            status_tx,
            probe: None,
            probing: None,
            health,
            breaker_ticker,
            uplinks: None,
        })
    }

    /// Runs until the core reaches `Closed` (from the `Closed` signal or the
    /// shutdown token, whichever comes first) or every signal sender is gone.
    async fn run(
        mut self,
        mut signals: mpsc::UnboundedReceiver<Signal>,
        shutdown: CancellationToken,
    ) {
        while !self.core.is_closed() {
            let input = match self.next_wake(&mut signals, &shutdown).await {
                Wake::Shutdown | Wake::Signal(Some(Signal::Closed)) => {
                    self.stop_probing();
                    StatusInput::Closed
                }
                Wake::Signal(None) => break,
                Wake::Signal(Some(signal)) => match self.read_signal(signal) {
                    Some(input) => input,
                    None => continue,
                },
                Wake::LostTimer => StatusInput::LostTimerFired,
                Wake::BreakerTick => {
                    self.start_probe(ProbeKind::Breaker);
                    continue;
                }
                Wake::ProbeDone(kind, kept, measured) => {
                    match self.probe_finished(kind, kept, measured) {
                        Some(input) => input,
                        None => continue,
                    }
                }
                Wake::HealthTick => match self.health_tick() {
                    Some(input) => input,
                    None => continue,
                },
                Wake::UplinksChecked(results) => {
                    self.uplinks = None;
                    self.uplinks_checked(results);
                    continue;
                }
            };
            self.handle(input);
        }
    }

    /// Waits for the next thing to react to.
    async fn next_wake(
        &mut self,
        signals: &mut mpsc::UnboundedReceiver<Signal>,
        shutdown: &CancellationToken,
    ) -> Wake {
        let lost_at = self.core.lost_deadline();
        let probe_breaker = self.core.should_probe_breaker();
        let lost_sleep = async {
            match lost_at {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        let health_tick = async {
            match self.health.as_mut() {
                Some(interval) => interval.tick().await,
                None => std::future::pending().await,
            }
        };
        let probe_done = async {
            match self.probing.as_mut() {
                Some(fut) => fut.await,
                None => std::future::pending().await,
            }
        };
        let uplinks_done = async {
            match self.uplinks.as_mut() {
                Some(fut) => fut.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => Wake::Shutdown,
            results = uplinks_done => Wake::UplinksChecked(results),
            signal = signals.recv() => Wake::Signal(signal),
            () = lost_sleep => Wake::LostTimer,
            _ = self.breaker_ticker.tick(), if probe_breaker => Wake::BreakerTick,
            (kind, kept, measured) = probe_done => Wake::ProbeDone(kind, kept, measured),
            _ = health_tick => Wake::HealthTick,
        }
    }

    /// The core's input for a signal, or `None` when it only counts.
    fn read_signal(&self, signal: Signal) -> Option<StatusInput> {
        Some(match signal {
            Signal::Nats(async_nats::Event::Connected) | Signal::Established => {
                StatusInput::Connected
            }
            Signal::Nats(async_nats::Event::Disconnected) => StatusInput::Disconnected,
            Signal::Nats(async_nats::Event::SlowConsumer(sid)) => {
                // Counted client-wide by the subscription's cell (or here
                // when the id is unknown).
                if !self.registry.record_drop(sid)
                    && let Some(inner) = self.inner.upgrade()
                {
                    inner.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
                return None;
            }
            Signal::Nats(async_nats::Event::ServerError(err)) => {
                tracing::warn!(%err, "NATS server error");
                StatusInput::ServerError(err.to_string())
            }
            Signal::Nats(async_nats::Event::ClientError(err)) => {
                tracing::warn!(%err, "NATS client error");
                StatusInput::ClientError {
                    gave_up: matches!(err, async_nats::ClientError::MaxReconnects),
                    message: err.to_string(),
                }
            }
            Signal::Nats(event) => {
                tracing::debug!(%event, "NATS event");
                return None;
            }
            Signal::Breaker(state) => {
                tracing::info!(%state, "circuit breaker changed");
                StatusInput::Breaker(state)
            }
            Signal::Connecting => StatusInput::Connecting,
            Signal::ConnectFailed(err) => StatusInput::ConnectFailed(err),
            Signal::Closed => StatusInput::Closed,
        })
    }

    /// Records a finished round trip; a health check becomes an input.
    fn probe_finished(
        &mut self,
        kind: ProbeKind,
        kept: Option<Probe>,
        measured: Result<Duration>,
    ) -> Option<StatusInput> {
        self.probing = None;
        self.probe = kept;
        match (&measured, kind) {
            (Ok(rtt), _) => {
                if let Some(inner) = self.inner.upgrade() {
                    inner
                        .counters
                        .rtt_nanos
                        .store(duration_nanos(*rtt), Ordering::Relaxed);
                    // The server answers: let the half-open probe through now.
                    if inner.breaker.server_reachable() {
                        tracing::info!(
                            ?rtt,
                            "server reachable again; admitting the breaker's probe"
                        );
                    }
                }
            }
            (Err(err), ProbeKind::Health) => tracing::warn!(%err, "health check failed"),
            (Err(_), ProbeKind::Breaker) => {}
        }
        (kind == ProbeKind::Health).then(|| StatusInput::HealthChecked(measured.is_ok()))
    }

    /// Reconciles with the connection's real state (async-nats drops events
    /// when its queue is full), then starts a health check when up.
    fn health_tick(&mut self) -> Option<StatusInput> {
        let conn = self.inner.upgrade().and_then(|i| i.conn.get().cloned())?;
        let up = conn.connection_state() == async_nats::connection::State::Connected;
        self.handle(StatusInput::LinkObserved { up });
        if self.core.is_up() {
            self.start_probe(ProbeKind::Health);
            self.start_uplink_checks(&conn);
            return None;
        }
        Some(StatusInput::HealthChecked(false))
    }

    /// Starts a round trip unless one is running; the probe subscription is
    /// kept between round trips.
    fn start_probe(&mut self, kind: ProbeKind) {
        if self.probing.is_some() {
            return;
        }
        let Some(conn) = self.inner.upgrade().and_then(|i| i.conn.get().cloned()) else {
            return;
        };
        let bound = match kind {
            ProbeKind::Health => self
                .config
                .health_interval
                .unwrap_or(self.config.connect_timeout)
                .min(self.config.connect_timeout),
            ProbeKind::Breaker => Duration::from_secs(1),
        };
        let existing = self.probe.take();
        self.probing = Some(Box::pin(async move {
            let mut p = match existing {
                Some(p) => p,
                None => match Probe::new(&conn).await {
                    Ok(p) => p,
                    Err(err) => return (kind, None, Err(err)),
                },
            };
            let result = p.round_trip(&conn, bound).await;
            (kind, Some(p), result)
        }));
    }

    /// No more round trips: the client is closing.
    fn stop_probing(&mut self) {
        self.probe = None;
        self.probing = None;
        self.health = None;
        self.uplinks = None;
    }

    /// Asks every other JetStream API this client targets for its `INFO`,
    /// beside the health check, unless a round of checks is still running.
    fn start_uplink_checks(&mut self, conn: &async_nats::Client) {
        if self.uplinks.is_some() {
            return;
        }
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let prefixes: Vec<String> = lock(&inner.uplinks).keys().cloned().collect();
        if prefixes.is_empty() {
            return;
        }
        let bound = self
            .config
            .health_interval
            .unwrap_or(self.config.connect_timeout)
            .min(self.config.connect_timeout);
        let conn = conn.clone();
        self.uplinks = Some(Box::pin(async move {
            let checks = prefixes.into_iter().map(|prefix| {
                let conn = conn.clone();
                async move {
                    let info = conn.request(format!("{prefix}.INFO"), bytes::Bytes::new());
                    let answered = matches!(tokio::time::timeout(bound, info).await, Ok(Ok(_)));
                    (prefix, answered)
                }
            });
            futures_util::future::join_all(checks).await
        }));
    }

    /// Records the answers; a change is logged, reported as a metric and to
    /// `on_jetstream_reachability`.
    fn uplinks_checked(&self, results: Vec<(String, bool)>) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let changed = record_reach(&mut lock(&inner.uplinks), results);
        if changed.iter().any(|r| r.reachable == Some(true)) {
            // The path is back: what waits on it resends or retries now.
            inner.epoch.send_modify(|e| *e += 1);
        }
        for reach in changed {
            let reachable = reach.reachable == Some(true);
            if reachable {
                tracing::info!(api = %reach.api_prefix, "JetStream API answers");
            } else {
                tracing::warn!(api = %reach.api_prefix, "JetStream API does not answer (uplink down?)");
            }
            self.metrics
                .jetstream_reachable(&reach.api_prefix)
                .set(if reachable { 1.0 } else { 0.0 });
            if let Some(cb) = &self.config.callbacks.on_jetstream_reachability {
                fire(&self.inner, "on_jetstream_reachability", || cb(&reach));
            }
        }
    }

    /// Feeds one input to the core and carries out its effects, in order.
    fn handle(&mut self, input: StatusInput) {
        for effect in self.core.handle(input, Instant::now()) {
            self.apply(effect);
        }
    }

    fn apply(&self, effect: StatusEffect) {
        let inner = &self.inner;
        let callbacks = &self.config.callbacks;
        match effect {
            StatusEffect::ConnectionSucceeded => {
                if let Some(inner) = inner.upgrade() {
                    inner.ever_connected.store(true, Ordering::Release);
                    inner.breaker.connection_succeeded();
                }
            }
            StatusEffect::CountReconnect => {
                self.metrics.reconnects.add(1);
            }
            StatusEffect::Disconnected(reason) => {
                tracing::warn!(?reason, "disconnected from NATS");
                if let Some(cb) = &callbacks.on_disconnect {
                    fire(inner, "on_disconnect", || cb(&reason));
                }
            }
            StatusEffect::Reconnected => {
                tracing::info!("reconnected to NATS");
                if let Some(cb) = &callbacks.on_reconnect {
                    fire(inner, "on_reconnect", || cb());
                }
            }
            StatusEffect::ConnectionLost(reason) => {
                tracing::error!(after = ?self.config.connection_lost_after, ?reason, "NATS connection lost");
                if let Some(cb) = &callbacks.on_connection_lost {
                    fire(inner, "on_connection_lost", || cb(&reason));
                }
            }
            StatusEffect::HealthChanged(healthy) => {
                if let Some(inner) = inner.upgrade() {
                    inner.counters.healthy.store(healthy, Ordering::Relaxed);
                }
                tracing::info!(healthy, "NATS health changed");
                if let Some(cb) = &callbacks.on_health_change {
                    fire(inner, "on_health_change", || cb(healthy));
                }
            }
            StatusEffect::StatusChanged(status) => {
                tracing::debug!(%status, "status changed");
                self.status_tx.send_replace(status);
                self.metrics
                    .status
                    .set(crate::client::metrics::status_code(status));
                if let Some(cb) = &callbacks.on_status_change {
                    fire(inner, "on_status_change", || cb(status));
                }
            }
        }
    }
}
