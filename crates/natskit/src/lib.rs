//! natskit: a NATS client for Rust services that keeps working when the
//! network does not, built on the official [`async_nats`] client (re-exported
//! as [`natskit::async_nats`](async_nats)).
//!
//! What it promises under faults, and how that is tested, is in
//! `RELIABILITY.md`; every breaking change is in `CHANGELOG.md`.
//!
//! # The client
//!
//! [`Client`]: one or many server URLs, a connect timeout, a
//! [circuit breaker](breaker) with exponential back-off and a real half-open
//! probe, reconnection, [`Status`] and [`StatusInfo`], health checks,
//! callbacks, user/password, token, nkey, credentials-file and TLS auth, and
//! a graceful [`close`](Client::close) that drains and wipes credentials.
//! Every operation checks, in order: closed, invalid input, the circuit, the
//! connection.
//!
//! ```no_run
//! use std::time::Duration;
//! # async fn demo() -> natskit::Result<()> {
//! let client = natskit::Client::builder("nats://127.0.0.1:4222")
//!     .name("quickstart")
//!     .breaker_threshold(5)
//!     .on_status_change(|status| println!("status: {status}"))
//!     .connect()
//!     .await?;
//! println!("{:?}", client.status_info());
//! client.close().await?;
//! # Ok(()) }
//! ```
//!
//! # Publish and subscribe
//!
//! Handlers run under a deadline with panics caught; every drop is counted
//! ([`SubscriptionStats`]). [`Client::subscribe_stream`] gives a
//! [`MessageStream`] instead.
//!
//! ```no_run
//! # async fn demo(client: natskit::Client) -> natskit::Result<()> {
//! let sub = client
//!     .subscribe("greetings.*", |msg: natskit::Message| async move {
//!         println!("{} says {:?}", msg.subject, msg.payload);
//!     })
//!     .await?;
//! client.publish("greetings.world", "hello").await?;
//! sub.drain().await;
//! # Ok(()) }
//! ```
//!
//! # Request/reply and services
//!
//! Timeouts and no-responders are distinct errors; a service error comes
//! back as [`Error::Service`]. [`Client::add_service`] registers a NATS micro
//! service ([`Service`]) discoverable through `$SRV.*`.
//!
//! ```no_run
//! # async fn demo(client: natskit::Client) -> natskit::Result<()> {
//! use natskit::{ServiceConfig, ServiceError};
//! let service = client.add_service(ServiceConfig::new("echo", "1.0.0")).await?;
//! service
//!     .endpoint("echo", |msg: natskit::Message| async move {
//!         Ok::<_, ServiceError>(msg.payload)
//!     })
//!     .await?;
//! let reply = client.request("echo", "ping").await?;
//! assert_eq!(&reply[..], b"ping");
//! # Ok(()) }
//! ```
//!
//! # JetStream
//!
//! Streams ([`Client::ensure_stream`]), acknowledged publishes that resend
//! with a message id across reconnects and elections
//! ([`Client::publish_to_stream`], [`StreamPublisher`]), and supervised
//! consumers that are recreated when lost and resume at the ack floor
//! ([`Client::consume_stream_with`], [`Client::consumer_stream`]).
//!
//! ```no_run
//! # async fn demo(client: natskit::Client) -> natskit::Result<()> {
//! use natskit::StreamConsumerConfig;
//! let ack = client.publish_to_stream("orders.created", "{}").await?;
//! let consumer = client
//!     .consume_stream_with(
//!         StreamConsumerConfig::new("ORDERS").durable("billing"),
//!         |msg: async_nats::jetstream::Message| async move { msg.ack().await },
//!     )
//!     .await?;
//! # let _ = (ack, consumer); Ok(()) }
//! ```
//!
//! # Durable outbox
//!
//! [`Outbox`]: publishes stored on local disk first (fsync'd, group
//! commit), then forwarded to JetStream in order, exactly once within the
//! stream's duplicate window, across partitions, crashes and elections; see
//! [`outbox`] for the semantics.
//!
//! ```no_run
//! # async fn demo(client: natskit::Client) -> natskit::Result<()> {
//! let outbox = client.outbox(natskit::OutboxConfig::new("outbox.redb")).await?;
//! let receipt = outbox.publish_durable("orders.created", "{}").await?;
//! # let _ = receipt; Ok(()) }
//! ```
//!
//! # Key-value and time travel
//!
//! [`KvStore`]: compare-and-swap with retry (sync or async updates), JSON
//! helpers, prefix and wildcard keys, resilient watches, exact outcomes
//! across elections; [`TemporalResolver`]: a key's value at a past time.
//!
//! ```no_run
//! # async fn demo(client: natskit::Client) -> natskit::Result<()> {
//! use async_nats::jetstream::kv;
//! let bucket = client
//!     .ensure_key_value_bucket(kv::Config { bucket: "config".into(), ..Default::default() })
//!     .await?;
//! let store = client.kv_store(bucket, natskit::KvOptions::default());
//! store
//!     .update_json("limits", |map| {
//!         map.insert("workers".into(), 8.into());
//!         Ok::<_, std::convert::Infallible>(())
//!     })
//!     .await?;
//! let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
//! let then = natskit::TemporalResolver::new(&store).get_at_timestamp("limits", an_hour_ago).await;
//! # let _ = then; Ok(()) }
//! ```
//!
//! # Typed subjects
//!
//! [`Subject`] binds a subject template to a payload type and a [`Codec`]
//! (JSON; MessagePack with the `msgpack` feature); undecodable messages are
//! counted, never fatal.
//!
//! ```no_run
//! # async fn demo(client: natskit::Client) -> natskit::Result<()> {
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Reading { celsius: f64 }
//! let readings = natskit::Subject::<Reading>::new("sensors.t1.reading")?;
//! readings.publish(&client, &Reading { celsius: 21.5 }).await?;
//! # Ok(()) }
//! ```
//!
//! # Around the edges
//!
//! - [`trace`]: W3C trace context (and `X-Trace-ID` headers) injected into
//!   what is sent and extracted into handlers.
//! - [`metrics`]: everything reported through the `metrics` facade;
//!   [`Client::monitor_stream`] polls server gauges.
//! - [`header`] and [`subject`]: the pure checks every input passes.
//! - [`breaker`]: the circuit breaker's pure state machine.
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
pub mod outbox;
mod outbox_store;
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
pub use outbox::{DeadLetter, DeadMessage, Outbox, OutboxConfig, Receipt};
pub use pubsub::{MessageStream, SubscribeOptions, Subscription};
pub use registry::SubscriptionStats;
pub use request::{
    DEFAULT_REQUEST_TIMEOUT, RetryConfig, SERVICE_ERROR_CODE_HEADER, SERVICE_ERROR_HEADER,
    ServiceError,
};
pub use service::{Service, ServiceConfig};
pub use status::OutboxStats;
pub use temporal::{CacheStats, DEFAULT_CACHE_TTL, TemporalResolver};
#[cfg(feature = "msgpack")]
pub use typed::MsgPackCodec;
pub use typed::{Codec, ErrorHook, JsonCodec, MAX_DECODE_DEPTH, Subject};

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
