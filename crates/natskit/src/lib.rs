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
//! ([`Client::consume_with`], [`Client::consume_messages`]).
//!
//! ```no_run
//! # async fn demo(client: natskit::Client) -> natskit::Result<()> {
//! use natskit::StreamConsumerConfig;
//! let ack = client.publish_to_stream("orders.created", "{}").await?;
//! let consumer = client
//!     .consume_with(
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
//! [`TypedSubject`] binds a subject template to a payload type and a [`Codec`]
//! (JSON; MessagePack with the `msgpack` feature); undecodable messages are
//! counted, never fatal.
//!
//! ```no_run
//! # async fn demo(client: natskit::Client) -> natskit::Result<()> {
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Reading { celsius: f64 }
//! let readings = natskit::TypedSubject::<Reading>::new("sensors.t1.reading")?;
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
//!
//! # Names and handles
//!
//! - `x_with(.., options)` is `x` with an options or config value
//!   ([`Client::subscribe_with`], [`Client::request_with`],
//!   [`Client::consume_with`], [`Client::publish_to_stream_with`],
//!   [`Service::endpoint_with`]); `x_with_headers` takes headers;
//!   `x_timeout` takes a timeout.
//! - One set of handler options, [`SubscribeOptions`] (queue group,
//!   `concurrency(n)`, deadline), for subscriptions, `serve` and service
//!   endpoints, with the same counts ([`SubscriptionStats`]).
//! - A `Stream` you poll ([`MessageStream`], [`ConsumerStream`], [`KvWatch`])
//!   stops when dropped: nobody is left to read it. A handle to work natskit
//!   runs for you ([`Subscription`], [`ConsumerHandle`], [`Service`],
//!   [`Endpoint`], [`StreamMonitor`]) keeps running when dropped, until it is
//!   stopped or the client closes.
//! - Absent is `None`, never an empty string or a zero; every zero duration
//!   is [`Error::ZeroDuration`].
//!
//! # Cargo features
//!
//! `outbox` (the durable outbox, with redb) and `temporal` (the temporal
//! resolver's cache, with moka) are on by default; `msgpack` (a MessagePack
//! codec for typed subjects) and `opentelemetry` (the global propagator) are
//! off.
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

// The layers, bottom up; a folder uses only its own files and the layers
// below it, and the feature folders never use each other (checked by
// tests/it/architecture.rs).
mod core;

mod client;

mod jetstream;
mod kv;
mod messaging;
#[cfg(feature = "outbox")]
pub mod outbox;

mod typed;

pub use crate::client::{breaker, metrics, trace};
pub use crate::core::{header, subject};

pub use crate::client::breaker::{BreakerState, CircuitBreaker};
pub use crate::client::handler::{Handler, HandlerFuture, HandlerOutcome};
pub use crate::client::registry::SubscriptionStats;
pub use crate::client::{Client, ClientBuilder, JetStreamReach, Status, StatusInfo};
pub use crate::core::backoff::Backoff;
pub use crate::core::error::{BoxError, Error, Result};
pub use crate::core::status::{DisconnectReason, OutboxStats};
pub use crate::jetstream::consumer::{
    AckPolicy, ConsumerHandle, ConsumerStats, ConsumerStream, DeliverPolicy, Permanent, Settled,
    StreamConsumerConfig, consume_with_heartbeat,
};
pub use crate::jetstream::monitor::StreamMonitor;
pub use crate::jetstream::{
    PublishAck, PublishReport, StreamAutoCreateConfig, StreamPublishOptions, StreamPublisher,
};
#[cfg(feature = "temporal")]
pub use crate::kv::temporal::{CacheStats, DEFAULT_CACHE_TTL, TemporalResolver};
pub use crate::kv::{KvEntry, KvOperation, KvOptions, KvStore, KvWatch, WatchEvent};
pub use crate::messaging::pubsub::{MessageStream, SubscribeOptions, Subscription};
pub use crate::messaging::request::{
    DEFAULT_REQUEST_TIMEOUT, RequestOptions, RetryConfig, SERVICE_ERROR_CODE_HEADER,
    SERVICE_ERROR_HEADER, ServiceError,
};
pub use crate::messaging::service::{Endpoint, Service, ServiceConfig};
#[cfg(feature = "outbox")]
pub use crate::outbox::{DeadLetter, DeadMessage, FlushReport, Outbox, OutboxConfig, Receipt};
#[cfg(feature = "msgpack")]
pub use crate::typed::MsgPackCodec;
pub use crate::typed::{Codec, ErrorHook, JsonCodec, MAX_DECODE_DEPTH, TypedSubject};
/// The async-nats version natskit is built on, so that users need no
/// matching dependency of their own (`natskit::async_nats::jetstream::...`).
pub use async_nats;
pub use async_nats::{HeaderMap, Message};

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
