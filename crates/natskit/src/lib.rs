//! natskit: a NATS client for Rust services that keeps working when the
//! network does not, built on the official [`async_nats`] client.
//!
//! - [`Client`]: one or many server URLs, connect timeout, a
//!   [circuit breaker](breaker) with exponential back-off and a real
//!   half-open probe, reconnection paced by the breaker, status and detailed
//!   status, health checks, disconnect/reconnect/lost callbacks, user/password,
//!   token, nkey, credentials-file and TLS auth, graceful close that drains and
//!   wipes credentials.
//! - Publish/subscribe with subject checks, payload limits, handler deadlines,
//!   panic isolation and counted (never silent) drops.
//! - Request/reply with timeouts, retry, reply helpers and request handlers.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! # async fn demo() -> natskit::Result<()> {
//! let client = natskit::Client::builder("nats://127.0.0.1:4222")
//!     .name("quickstart")
//!     .build()?;
//! client.connect().await?;
//!
//! let sub = client
//!     .subscribe("greetings.*", |msg: async_nats::Message| async move {
//!         println!("{} says {:?}", msg.subject, msg.payload);
//!     })
//!     .await?;
//! client.publish("greetings.world", "hello").await?;
//!
//! let service = client
//!     .serve("echo", natskit::SubscribeOptions::new(), |msg: async_nats::Message| async move {
//!         Ok::<_, natskit::ServiceError>(msg.payload)
//!     })
//!     .await?;
//! let reply = client.request_timeout("echo", "ping", Duration::from_secs(1)).await?;
//! assert_eq!(&reply[..], b"ping");
//!
//! sub.drain().await;
//! service.unsubscribe().await;
//! client.close().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

/// A documented builder method that sets one field: `name: Type => path.to.field`.
macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty => $($field:ident).+) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.$($field).+ = value;
            self
        }
    };
}

mod backoff;
pub mod breaker;
mod client;
mod consumer;
mod error;
mod handler;
pub mod header;
mod jetstream;
mod kv;
pub mod metrics;
mod monitor;
mod pubsub;
mod registry;
mod request;
mod service;
mod status;
pub mod subject;
mod temporal;
pub mod trace;
mod typed;

/// The async-nats version natskit is built on, so that users need no
/// matching dependency of their own (`natskit::async_nats::jetstream::...`).
pub use async_nats;
pub use async_nats::{HeaderMap, Message};
pub use backoff::Backoff;
pub use breaker::{BreakerState, CircuitBreaker};
pub use client::{Client, ClientBuilder, Status, StatusInfo};
pub use consumer::{
    AckPolicy, ConsumerHandle, ConsumerStats, ConsumerStream, DeliverPolicy, Permanent, Settled,
    StreamConsumerConfig, consume_with_heartbeat,
};
pub use error::{BoxError, Error, Result};
pub use handler::HandlerOutcome;
pub use jetstream::{
    PublishAck, PublishReport, StreamAutoCreateConfig, StreamPublishOptions, StreamPublisher,
};
pub use kv::{KvEntry, KvOperation, KvOptions, KvStore, KvWatch, WatchEvent};
pub use monitor::StreamMonitor;
pub use pubsub::{MessageStream, SubscribeOptions, Subscription};
pub use registry::SubscriptionStats;
pub use request::{
    DEFAULT_REQUEST_TIMEOUT, RetryConfig, SERVICE_ERROR_CODE_HEADER, SERVICE_ERROR_HEADER,
    ServiceError,
};
pub use service::{Service, ServiceConfig};
pub use temporal::{CacheStats, DEFAULT_CACHE_TTL, TemporalResolver};
#[cfg(feature = "msgpack")]
pub use typed::MsgPackCodec;
pub use typed::{Codec, ErrorHook, JsonCodec, MAX_DECODE_DEPTH, Subject};

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
