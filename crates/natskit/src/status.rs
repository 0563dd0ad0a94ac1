//! The status model of a client: what [`Client::status`](crate::Client::status)
//! and [`Client::status_info`](crate::Client::status_info) report. Pure data.

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::breaker::BreakerState;

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
}
