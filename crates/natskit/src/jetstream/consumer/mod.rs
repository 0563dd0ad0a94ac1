//! Supervised JetStream consumers and the heartbeat helper for long work.
//!
//! A consumer started here keeps delivering across reconnects, server
//! restarts and the consumer being deleted on the server: a supervisor task
//! watches the pull stream's heartbeats and recreates the consumer with
//! back-off under the same name, resuming at the lowest stream sequence not
//! yet settled (the server's ack floor, polled while messages flow), so a
//! message waiting for redelivery is never skipped and no orphan consumers
//! pile up.

mod acks;
mod config;
mod heartbeat;
mod supervisor;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_nats::jetstream;
use tokio::sync::watch;

use crate::client::Client;
use crate::client::handler::{Handler, HandlerFuture};
use crate::client::jetstream_errors::{is_consumer_not_found, map_consumer};
use crate::client::metrics::ConsumerMetrics;
use crate::core::error::{BoxError, Result};
use crate::core::subject;

pub use config::{AckPolicy, DeliverPolicy, StreamConsumerConfig};
pub use heartbeat::{Permanent, Settled, consume_with_heartbeat};
use supervisor::{Supervisor, open_consumer};

/// Counters and health of a supervised consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// Messages delivered to the handler.
    pub delivered: u64,
    /// Deliveries that were redeliveries (delivery count above 1).
    pub redelivered: u64,
    /// Handler invocations that returned without error.
    pub handled: u64,
    /// Handlers that returned an error (the message was naked).
    pub errors: u64,
    /// Handlers that panicked (the message was naked).
    pub panics: u64,
    /// Handlers past the message timeout (cancelled, the message naked).
    pub timeouts: u64,
    /// Times the consumer was recreated on the server after being lost.
    pub recreations: u64,
    /// Stream sequence of the last handled message.
    pub last_stream_sequence: u64,
    /// The consumer's ack floor as last read from the server: every message
    /// at or below this stream sequence is settled. A recreated consumer
    /// resumes right after it.
    pub ack_floor: u64,
    /// Deliveries of messages natskit had already acknowledged (with
    /// [`StreamConsumerConfig::auto_ack`]), acknowledged again without
    /// calling the handler: the repeats a recreation at the ack floor
    /// would otherwise hand to it.
    pub repeats_skipped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    handled: AtomicU64,
    errors: AtomicU64,
    panics: AtomicU64,
    timeouts: AtomicU64,
    last_seq: AtomicU64,
    repeats_skipped: AtomicU64,
    /// The server's ack floor (stream sequence): every message at or below
    /// it is acked or terminated. Recreation resumes right after it.
    ack_floor: AtomicU64,
    healthy: AtomicBool,
}

#[derive(Debug)]
struct ConsumerShared {
    stream: String,
    name: String,
    counters: Counters,
    /// Deliveries, redeliveries and recreations, also reported as metrics.
    metrics: ConsumerMetrics,
    stop: watch::Sender<bool>,
    done: watch::Receiver<bool>,
}

/// A running supervised consumer. Cheap to clone; dropping it does not stop
/// the consumer (use [`stop`](Self::stop) or the client's `stop_*` methods).
#[derive(Debug, Clone)]
pub struct ConsumerHandle {
    shared: Arc<ConsumerShared>,
}

impl ConsumerHandle {
    /// The stream name.
    pub fn stream(&self) -> &str {
        &self.shared.stream
    }

    /// The consumer name on the server (generated for ephemeral consumers).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Whether the pull stream is currently established.
    pub fn is_healthy(&self) -> bool {
        self.shared.counters.healthy.load(Ordering::Relaxed)
    }

    /// Whether the supervisor has stopped.
    pub fn is_stopped(&self) -> bool {
        *self.shared.done.borrow()
    }

    /// Counters.
    pub fn stats(&self) -> ConsumerStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ConsumerStats {
            delivered: self.shared.metrics.deliveries.get(),
            redelivered: self.shared.metrics.redeliveries.get(),
            handled: get(&c.handled),
            errors: get(&c.errors),
            panics: get(&c.panics),
            timeouts: get(&c.timeouts),
            recreations: self.shared.metrics.recreations.get(),
            last_stream_sequence: get(&c.last_seq),
            ack_floor: get(&c.ack_floor),
            repeats_skipped: get(&c.repeats_skipped),
        }
    }

    /// Stops delivering (a handler already running finishes) and waits for
    /// the supervisor to end. A durable consumer stays on the server; an
    /// ephemeral one is deleted from it (best effort: otherwise the server
    /// removes it after its inactivity threshold). Idempotent.
    pub async fn stop(&self) {
        self.shared.stop.send_replace(true);
        let mut done = self.shared.done.clone();
        let _ = done.wait_for(|d| *d).await;
    }
}

impl crate::client::registry::Stoppable for ConsumerHandle {
    fn is_stopped(&self) -> bool {
        ConsumerHandle::is_stopped(self)
    }

    fn stop(&self) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(ConsumerHandle::stop(self))
    }
}

impl Client {
    /// Consumes `stream` with an ephemeral consumer, filtered by `filter`
    /// (`None` for every subject), delivering all messages. The handler gets
    /// each message and acknowledges it.
    ///
    /// # Errors
    /// See [`consume_with`](Self::consume_with).
    pub async fn consume<F, Fut>(
        &self,
        stream: &str,
        filter: Option<&str>,
        handler: F,
    ) -> Result<ConsumerHandle>
    where
        F: Handler<jetstream::Message, Fut>,
        Fut: HandlerFuture,
    {
        let mut config = StreamConsumerConfig::new(stream);
        if let Some(filter) = filter {
            config = config.filter_subject(filter);
        }
        self.consume_with(config, handler).await
    }

    /// Starts a supervised pull consumer.
    ///
    /// The handler acknowledges each message itself (`msg.ack().await`). A
    /// handler that returns an error, panics, or runs past the message
    /// timeout has its message naked (with explicit or all acks), and the
    /// consumer keeps running.
    ///
    /// The consumer is created (or, for a durable, opened) before this
    /// returns; then a supervisor keeps it delivering: when heartbeats stop
    /// or the consumer disappears, it is recreated with back-off under the
    /// same name, resuming at its ack floor as last read from the server:
    /// nothing unacknowledged is skipped, and messages acknowledged above
    /// the floor may come again (at-least-once).
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// use natskit::StreamConsumerConfig;
    /// let consumer = client
    ///     .consume_with(
    ///         StreamConsumerConfig::new("ORDERS").durable("billing"),
    ///         |msg: async_nats::jetstream::Message| async move {
    ///             println!("{}", msg.subject);
    ///             msg.ack().await
    ///         },
    ///     )
    ///     .await?;
    /// println!("{:?}", consumer.stats());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidName`](crate::Error::InvalidName),
    /// [`Error::ZeroDuration`](crate::Error::ZeroDuration),
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) (a back-off
    /// without enough deliveries, a filter outside the stream's subjects),
    /// [`Error::StreamNotFound`](crate::Error::StreamNotFound) without
    /// auto-create, and the errors of creating the consumer.
    pub async fn consume_with<F, Fut>(
        &self,
        config: StreamConsumerConfig,
        handler: F,
    ) -> Result<ConsumerHandle>
    where
        F: Handler<jetstream::Message, Fut>,
        Fut: HandlerFuture,
    {
        self.ensure_open()?;
        config.validate()?;
        let name = config
            .durable
            .clone()
            .unwrap_or_else(|| format!("natskit_{}", nuid::next()));
        let (consumer, _) = open_consumer(self, &config, &name, None, true).await?;
        let initial_floor = consumer.cached_info().ack_floor.stream_sequence;
        let (stop, stop_rx) = watch::channel(false);
        let (done_tx, done) = watch::channel(false);
        let shared = Arc::new(ConsumerShared {
            stream: config.stream.clone(),
            name: name.clone(),
            counters: Counters::default(),
            metrics: self.metrics().consumer(&config.stream, &name),
            stop,
            done,
        });
        shared
            .counters
            .ack_floor
            .store(initial_floor, Ordering::Relaxed);
        let handle = ConsumerHandle {
            shared: shared.clone(),
        };
        self.consumers()
            .insert(&config.stream, &name, Arc::new(handle.clone()));
        let supervisor = Supervisor {
            client: self.downgrade(),
            shutdown: self.shutdown().clone(),
            config,
            name,
            handler: Arc::new(handler),
            shared,
            acked: std::sync::Mutex::default(),
        };
        self.tasks().spawn(async move {
            supervisor.run(consumer, stop_rx).await;
            let _ = done_tx.send(true);
        });
        Ok(handle)
    }

    /// A supervised consumer as a [`futures_util::Stream`] of messages
    /// ([`ConsumerStream`]): the same supervision as
    /// [`consume_with`](Self::consume_with)
    /// (recreated with back-off when lost, resuming at the ack floor). The
    /// caller acknowledges each message. A message not taken from the stream
    /// within the config's message timeout is nak'd and comes again.
    /// Dropping the stream stops the consumer (deleting it when ephemeral).
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// use futures_util::StreamExt;
    /// use natskit::StreamConsumerConfig;
    /// let mut orders = client
    ///     .consume_messages(StreamConsumerConfig::new("ORDERS").durable("billing"))
    ///     .await?;
    /// while let Some(msg) = orders.next().await {
    ///     println!("{}", msg.subject);
    ///     msg.ack().await.ok();
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// See [`consume_with`](Self::consume_with).
    pub async fn consume_messages(&self, config: StreamConsumerConfig) -> Result<ConsumerStream> {
        let (tx, rx) = tokio::sync::mpsc::channel::<jetstream::Message>(1);
        let handle = self
            .consume_with(config, move |msg: jetstream::Message| {
                let tx = tx.clone();
                async move {
                    tx.send(msg)
                        .await
                        .map_err(|_| BoxError::from("the consumer stream was dropped"))
                }
            })
            .await?;
        Ok(ConsumerStream { rx, handle })
    }

    /// Stops the consumer `name` on `stream` that this client runs, as
    /// [`ConsumerHandle::stop`] does: a durable consumer stays on the server,
    /// an ephemeral one is deleted. Stopping an unknown or stopped consumer
    /// does nothing.
    pub async fn stop_consumer(&self, stream: &str, name: &str) {
        if let Some(handle) = self.consumers().remove(stream, name) {
            handle.stop().await;
        }
    }

    /// Names of the consumers this client runs on `stream`.
    pub fn consumer_names_on(&self, stream: &str) -> Vec<String> {
        self.consumers().names_on(stream)
    }

    /// Stops every consumer this client runs.
    pub async fn stop_all_consumers(&self) {
        self.consumers().stop_all().await;
    }

    /// Stops the consumer and deletes it from the server, losing its
    /// position. A consumer that does not exist is not an error.
    ///
    /// # Errors
    /// [`Error::InvalidName`](crate::Error::InvalidName), [`Error::StreamNotFound`](crate::Error::StreamNotFound),
    /// [`Error::JetStreamUnavailable`](crate::Error::JetStreamUnavailable), [`Error::JetStream`](crate::Error::JetStream).
    pub async fn stop_and_delete_consumer(&self, stream: &str, name: &str) -> Result<()> {
        self.ensure_open()?;
        subject::validate_name("consumer", name)?;
        self.stop_consumer(stream, name).await;
        let stream = self.get_stream(stream).await?;
        let permit = self.guard()?;
        let result = match stream.delete_consumer(name).await {
            Ok(_) => Ok(()),
            Err(err) if is_consumer_not_found(&err.kind()) => Ok(()),
            Err(err) => Err(map_consumer("delete consumer", err)),
        };
        permit.record(result)
    }
}

/// A supervised consumer as a [`futures_util::Stream`] of JetStream
/// messages, from [`Client::consume_messages`]. Dropping it stops the
/// consumer.
#[derive(Debug)]
pub struct ConsumerStream {
    rx: tokio::sync::mpsc::Receiver<jetstream::Message>,
    handle: ConsumerHandle,
}

impl ConsumerStream {
    /// The supervised consumer behind the stream: name, stats, health.
    pub fn handle(&self) -> &ConsumerHandle {
        &self.handle
    }
}

impl futures_util::Stream for ConsumerStream {
    type Item = jetstream::Message;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<jetstream::Message>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for ConsumerStream {
    fn drop(&mut self) {
        // Signal only: the supervisor stops (and deletes an ephemeral
        // consumer) on its own task.
        self.handle.shared.stop.send_replace(true);
    }
}
