//! The status model of a client: what [`Client::status`](crate::Client::status)
//! and [`Client::status_info`](crate::Client::status_info) report, and
//! [`StatusCore`], the pure state machine that decides them from connection
//! events, breaker changes, health checks and time (given as an argument).

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::core::breaker::BreakerState;

/// Connection status of a [`Client`](crate::Client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// Not connected, and not trying (before `connect`, or after giving up).
    Disconnected,
    /// The first connection attempt is under way.
    Connecting,
    /// Connected and usable.
    Connected,
    /// The connection dropped; the client is reconnecting by itself.
    Reconnecting,
    /// The circuit breaker is open: calls fail fast until its back-off ends.
    CircuitOpen,
    /// [`Client::close`](crate::Client::close) has finished; the client cannot be used again.
    Closed,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Disconnected => "disconnected",
            Status::Connecting => "connecting",
            Status::Connected => "connected",
            Status::Reconnecting => "reconnecting",
            Status::CircuitOpen => "circuit open",
            Status::Closed => "closed",
        })
    }
}

/// Detailed status, from [`Client::status_info`](crate::Client::status_info).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StatusInfo {
    /// Connection status.
    pub status: Status,
    /// Circuit breaker state.
    pub breaker: BreakerState,
    /// Consecutive infrastructure failures counted by the breaker.
    pub consecutive_failures: u32,
    /// All infrastructure failures since the client was built.
    pub total_failures: u64,
    /// When the last failure happened.
    pub last_failure: Option<SystemTime>,
    /// Successful reconnections (the first connection does not count).
    pub reconnects: u64,
    /// Round-trip time measured by the last health check or [`Client::rtt`](crate::Client::rtt).
    pub rtt: Option<Duration>,
    /// Result of the last health check.
    pub healthy: bool,
    /// Messages dropped because a subscription could not keep up.
    pub dropped_messages: u64,
    /// Panics caught in the client's callbacks (`on_status_change`,
    /// `on_disconnect`...); the client keeps running.
    pub callback_panics: u64,
    /// The figures of the durable outbox attached to this client (see
    /// `Outbox::open`), if any.
    pub outbox: Option<OutboxStats>,
    /// Whether each other JetStream domain or API this client targets
    /// answers (checked on the health schedule while the connection is up):
    /// on a leaf node, "my uplink is down" while `status` says the local
    /// link is fine. Empty when the client only uses its server's own
    /// domain.
    pub jetstream_apis: Vec<JetStreamReach>,
}

/// Whether one JetStream API a client targets answers, from
/// [`StatusInfo::jetstream_apis`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JetStreamReach {
    /// The API prefix, `$JS.<domain>.API` for a domain.
    pub api_prefix: String,
    /// Whether its `INFO` request was answered at the last check; `None`
    /// before the first.
    pub reachable: Option<bool>,
}

/// Figures of a durable outbox, from `Outbox::stats` and
/// [`StatusInfo::outbox`].
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct OutboxStats {
    /// Messages stored and not yet acknowledged by JetStream.
    pub pending_messages: u64,
    /// Their stored size in bytes.
    pub pending_bytes: u64,
    /// How long the oldest pending message has waited (None when empty).
    pub oldest_age: Option<Duration>,
    /// Messages stored durably since the outbox was opened.
    pub enqueued: u64,
    /// Messages acknowledged by JetStream (and removed) since opened.
    pub forwarded: u64,
    /// Acknowledgements that said the stream had the message already (a
    /// resend the duplicate window absorbed).
    pub duplicates: u64,
    /// Sends that failed for a reason that passes (no ack in time, no
    /// connection, no leader); the message was sent again.
    pub failed: u64,
    /// Messages sent again after a failure or a reconnection.
    pub resent: u64,
    /// Messages the outbox saw stored out of its order (a connection lost
    /// mid-pipeline): non-zero exactly when the stream's order differs from
    /// the store's, though it counts the overtaking messages it saw, not
    /// every message stored after a later one. See the ordering notes of
    /// `natskit::outbox`.
    pub reordered: u64,
    /// Messages moved aside for good (refused by JetStream, or unreadable
    /// in the store) and still in the dead-letter area.
    pub dead_letters: u64,
    /// Streams whose duplicate window is shorter than the outbox counts on
    /// (exactly-once then degrades to at-least-once), with their window.
    pub short_duplicate_windows: Vec<(String, Duration)>,
}

/// What the client last saw go wrong before a connection dropped: what
/// [`on_disconnect`](crate::ClientBuilder::on_disconnect) and
/// [`on_connection_lost`](crate::ClientBuilder::on_connection_lost) receive.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The server sent an error (`-ERR`: authorization expired, a stale
    /// connection...).
    ServerError(String),
    /// async-nats reported an error on the client's side.
    ClientError(String),
    /// A connection attempt failed.
    ConnectFailed(String),
    /// No error was seen: the link just closed.
    LinkClosed,
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::ServerError(e) => write!(f, "server error: {e}"),
            DisconnectReason::ClientError(e) => write!(f, "client error: {e}"),
            DisconnectReason::ConnectFailed(e) => write!(f, "connect failed: {e}"),
            DisconnectReason::LinkClosed => f.write_str("the connection closed"),
        }
    }
}

/// What the status machine reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StatusInput {
    /// A connection attempt of `connect()` started.
    Connecting,
    /// Connected: async-nats' event, or `connect()` returning.
    Connected,
    /// The connection dropped.
    Disconnected,
    /// The first connection attempt failed, with the cause.
    ConnectFailed(String),
    /// async-nats reported a client error; `gave_up` when it stopped
    /// reconnecting (max reconnects).
    ClientError { message: String, gave_up: bool },
    /// The server sent an error.
    ServerError(String),
    /// The breaker changed state.
    Breaker(BreakerState),
    /// The connection's real state, read when events may have been lost.
    LinkObserved { up: bool },
    /// A health check finished.
    HealthChecked(bool),
    /// The connection-lost deadline passed.
    LostTimerFired,
    /// `close()` finished.
    Closed,
}

/// What the shell must do after an input, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StatusEffect {
    /// The connection is up again: reset the breaker's failure count.
    ConnectionSucceeded,
    /// Count a successful reconnection.
    CountReconnect,
    /// Fire `on_disconnect` with the last error seen.
    Disconnected(DisconnectReason),
    /// Fire `on_reconnect`.
    Reconnected,
    /// Fire `on_connection_lost` with the last error seen.
    ConnectionLost(DisconnectReason),
    /// Health changed: store it and fire `on_health_change`.
    HealthChanged(bool),
    /// Status changed: publish it and fire `on_status_change`.
    StatusChanged(Status),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Idle,
    Connecting,
    Up,
    Down,
}

/// The pure status machine behind a client's status task: events, breaker
/// changes, health results and time in; status, health and the callbacks to
/// fire out. Nothing here does I/O or reads a clock.
#[derive(Debug, Clone)]
pub(crate) struct StatusCore {
    lost_after: Duration,
    link: Link,
    breaker_open: bool,
    closed: bool,
    ever_connected: bool,
    healthy: bool,
    last_error: Option<DisconnectReason>,
    lost_deadline: Option<std::time::Instant>,
    status: Status,
}

impl StatusCore {
    /// A client that has not connected; `connection_lost_after` is how long
    /// the link must stay down before `on_connection_lost`.
    pub(crate) fn new(connection_lost_after: Duration) -> Self {
        Self {
            lost_after: connection_lost_after,
            link: Link::Idle,
            breaker_open: false,
            closed: false,
            ever_connected: false,
            healthy: false,
            last_error: None,
            lost_deadline: None,
            status: Status::Disconnected,
        }
    }

    /// The current status.
    #[cfg(test)]
    pub(crate) fn status(&self) -> Status {
        self.status
    }

    /// When the connection-lost callback is due, if it is pending.
    pub(crate) fn lost_deadline(&self) -> Option<std::time::Instant> {
        self.lost_deadline
    }

    /// Whether the link is up.
    pub(crate) fn is_up(&self) -> bool {
        self.link == Link::Up
    }

    /// Whether the client should probe the server itself: the breaker is
    /// open while the connection is up (a frozen or overloaded server).
    pub(crate) fn should_probe_breaker(&self) -> bool {
        self.breaker_open && self.link == Link::Up && !self.closed
    }

    /// Whether the machine has reached `Closed` (the task can end).
    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Applies one input at `now`; returns the effects, in order.
    pub(crate) fn handle(
        &mut self,
        input: StatusInput,
        now: std::time::Instant,
    ) -> Vec<StatusEffect> {
        let mut effects = Vec::new();
        match input {
            StatusInput::Connected | StatusInput::LinkObserved { up: true }
                if self.link != Link::Up =>
            {
                effects.push(StatusEffect::ConnectionSucceeded);
                let reconnected = self.ever_connected;
                if reconnected {
                    effects.push(StatusEffect::CountReconnect);
                }
                self.ever_connected = true;
                self.link = Link::Up;
                self.lost_deadline = None;
                self.set_healthy(true, &mut effects);
                if reconnected {
                    effects.push(StatusEffect::Reconnected);
                }
            }
            StatusInput::Connected | StatusInput::LinkObserved { up: true } => {}
            StatusInput::Disconnected | StatusInput::LinkObserved { up: false } => {
                if self.link == Link::Up {
                    self.link = Link::Down;
                    self.lost_deadline = Some(now + self.lost_after);
                    self.set_healthy(false, &mut effects);
                    effects.push(StatusEffect::Disconnected(self.reason()));
                }
            }
            StatusInput::Connecting => {
                if self.link == Link::Idle {
                    self.link = Link::Connecting;
                }
            }
            StatusInput::ConnectFailed(err) => {
                self.last_error = Some(DisconnectReason::ConnectFailed(err));
                if self.link == Link::Connecting {
                    self.link = Link::Idle;
                }
            }
            StatusInput::ClientError { message, gave_up } => {
                if gave_up {
                    self.link = Link::Idle;
                }
                self.last_error = Some(DisconnectReason::ClientError(message));
            }
            StatusInput::ServerError(message) => {
                self.last_error = Some(DisconnectReason::ServerError(message));
            }
            StatusInput::Breaker(state) => self.breaker_open = state != BreakerState::Closed,
            StatusInput::HealthChecked(ok) => {
                let healthy = ok && self.link == Link::Up && !self.closed;
                self.set_healthy(healthy, &mut effects);
            }
            StatusInput::LostTimerFired => {
                if self.lost_deadline.is_some_and(|at| now >= at) {
                    self.lost_deadline = None;
                    effects.push(StatusEffect::ConnectionLost(self.reason()));
                }
            }
            StatusInput::Closed => {
                self.closed = true;
                self.lost_deadline = None;
                self.set_healthy(false, &mut effects);
            }
        }
        let status = self.compute_status();
        if status != self.status {
            self.status = status;
            effects.push(StatusEffect::StatusChanged(status));
        }
        effects
    }

    /// The last error seen, or a plain close.
    fn reason(&self) -> DisconnectReason {
        self.last_error
            .clone()
            .unwrap_or(DisconnectReason::LinkClosed)
    }

    fn set_healthy(&mut self, healthy: bool, effects: &mut Vec<StatusEffect>) {
        if self.healthy != healthy {
            self.healthy = healthy;
            effects.push(StatusEffect::HealthChanged(healthy));
        }
    }

    fn compute_status(&self) -> Status {
        if self.closed {
            Status::Closed
        } else if self.breaker_open {
            Status::CircuitOpen
        } else {
            match self.link {
                Link::Idle => Status::Disconnected,
                Link::Connecting => Status::Connecting,
                Link::Up => Status::Connected,
                Link::Down => Status::Reconnecting,
            }
        }
    }
}

/// Records the answers of one round of JetStream API checks in `known`
/// (APIs no handle targets any more are not added back) and returns what
/// changed, for the callbacks, metrics and logs.
pub(crate) fn record_reach(
    known: &mut std::collections::BTreeMap<String, Option<bool>>,
    results: Vec<(String, bool)>,
) -> Vec<JetStreamReach> {
    let mut changed = Vec::new();
    for (api_prefix, reachable) in results {
        if let Some(slot) = known.get_mut(&api_prefix)
            && *slot != Some(reachable)
        {
            *slot = Some(reachable);
            changed.push(JetStreamReach {
                api_prefix,
                reachable: Some(reachable),
            });
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jetstream_reach_reports_changes_only() {
        let hub = "$JS.hub.API".to_owned();
        let mut known = std::collections::BTreeMap::from([(hub.clone(), None)]);
        let first = record_reach(&mut known, vec![(hub.clone(), true)]);
        assert_eq!(first.len(), 1, "unknown -> reachable is a change");
        assert!(record_reach(&mut known, vec![(hub.clone(), true)]).is_empty());
        let down = record_reach(&mut known, vec![(hub.clone(), false)]);
        assert_eq!(down[0].reachable, Some(false));
        assert!(
            record_reach(&mut known, vec![("$JS.gone.API".into(), false)]).is_empty(),
            "an API nobody targets is not added"
        );
        assert_eq!(known.len(), 1);
    }
    use std::time::Instant;

    use StatusEffect as E;
    use StatusInput as I;

    fn core() -> StatusCore {
        StatusCore::new(Duration::from_secs(30))
    }

    #[test]
    fn first_connect_is_not_a_reconnect() {
        let t0 = Instant::now();
        let mut core = core();
        assert_eq!(
            core.handle(I::Connecting, t0),
            vec![E::StatusChanged(Status::Connecting)]
        );
        assert_eq!(
            core.handle(I::Connected, t0),
            vec![
                E::ConnectionSucceeded,
                E::HealthChanged(true),
                E::StatusChanged(Status::Connected)
            ]
        );
        // The same connection reported twice (event and connect()): nothing.
        assert_eq!(core.handle(I::Connected, t0), vec![]);
    }

    #[test]
    fn drop_and_reconnect_fire_in_order_with_the_last_error() {
        let t0 = Instant::now();
        let mut core = core();
        core.handle(I::Connected, t0);
        core.handle(I::ServerError("stale connection".into()), t0);
        assert_eq!(
            core.handle(I::Disconnected, t0),
            vec![
                E::HealthChanged(false),
                E::Disconnected(DisconnectReason::ServerError("stale connection".into())),
                E::StatusChanged(Status::Reconnecting)
            ]
        );
        assert_eq!(core.lost_deadline(), Some(t0 + Duration::from_secs(30)));
        assert_eq!(
            core.handle(I::Connected, t0 + Duration::from_secs(1)),
            vec![
                E::ConnectionSucceeded,
                E::CountReconnect,
                E::HealthChanged(true),
                E::Reconnected,
                E::StatusChanged(Status::Connected)
            ]
        );
        assert_eq!(
            core.lost_deadline(),
            None,
            "a reconnect cancels the lost timer"
        );
    }

    #[test]
    fn connection_lost_fires_once_per_outage_and_only_when_due() {
        let t0 = Instant::now();
        let mut core = core();
        core.handle(I::Connected, t0);
        core.handle(I::Disconnected, t0);
        assert_eq!(
            core.handle(I::LostTimerFired, t0 + Duration::from_secs(10)),
            vec![]
        );
        assert_eq!(
            core.handle(I::LostTimerFired, t0 + Duration::from_secs(30)),
            vec![E::ConnectionLost(DisconnectReason::LinkClosed)]
        );
        assert_eq!(
            core.handle(I::LostTimerFired, t0 + Duration::from_secs(60)),
            vec![]
        );
    }

    #[test]
    fn a_lost_event_is_reconciled_from_the_observed_link() {
        let t0 = Instant::now();
        let mut core = core();
        core.handle(I::Connected, t0);
        // The Disconnected event was dropped; the health tick sees the link down.
        let effects = core.handle(I::LinkObserved { up: false }, t0);
        assert!(effects.contains(&E::Disconnected(DisconnectReason::LinkClosed)));
        // ...and the Connected event was dropped too.
        let effects = core.handle(I::LinkObserved { up: true }, t0);
        assert!(effects.contains(&E::Reconnected) && effects.contains(&E::CountReconnect));
    }

    #[test]
    fn breaker_health_and_close() {
        let t0 = Instant::now();
        let mut core = core();
        core.handle(I::Connected, t0);
        assert_eq!(
            core.handle(I::Breaker(BreakerState::Open), t0),
            vec![E::StatusChanged(Status::CircuitOpen)]
        );
        assert!(core.should_probe_breaker());
        assert_eq!(
            core.handle(I::HealthChecked(false), t0),
            vec![E::HealthChanged(false)]
        );
        assert_eq!(
            core.handle(I::HealthChecked(true), t0),
            vec![E::HealthChanged(true)]
        );
        assert_eq!(
            core.handle(I::Breaker(BreakerState::Closed), t0),
            vec![E::StatusChanged(Status::Connected)]
        );
        assert_eq!(
            core.handle(I::Closed, t0),
            vec![E::HealthChanged(false), E::StatusChanged(Status::Closed)]
        );
        assert!(core.is_closed() && !core.should_probe_breaker());
        // Nothing moves a closed client, and a probe cannot make it healthy.
        assert_eq!(core.handle(I::HealthChecked(true), t0), vec![]);
        assert_eq!(core.status(), Status::Closed);
    }

    #[test]
    fn a_failed_first_connect_and_giving_up() {
        let t0 = Instant::now();
        let mut core = core();
        core.handle(I::Connecting, t0);
        assert_eq!(
            core.handle(I::ConnectFailed("refused".into()), t0),
            vec![E::StatusChanged(Status::Disconnected)]
        );
        core.handle(I::Connected, t0);
        core.handle(I::Disconnected, t0);
        let effects = core.handle(
            I::ClientError {
                message: "max reconnects".into(),
                gave_up: true,
            },
            t0,
        );
        assert_eq!(effects, vec![E::StatusChanged(Status::Disconnected)]);
    }
}
