//! The supervisor task of one consumer: delivers to the handler, reads the
//! ack floor, and recreates the consumer at that floor when it is lost.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::{PullConsumer, pull};
use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;
use tokio::sync::watch;

use crate::client::handler::{HandlerFuture, HandlerOutcome, Invocation, invoke};
use crate::client::jetstream_errors::map_consumer;
use crate::client::retry::{self, Retry};
use crate::client::{Client, WeakClient};
use crate::core::error::{Error, Result};
use crate::core::subject;
use crate::core::sync::lock;

use super::ConsumerShared;
use super::acks::AckMemory;
use super::config::{AckPolicy, StreamConsumerConfig};

/// Gets or creates the consumer. `create` forces a create (first start);
/// otherwise an existing consumer is reused and a missing one recreated
/// from `resume_after`.
pub(crate) async fn open_consumer(
    client: &Client,
    config: &StreamConsumerConfig,
    name: &str,
    resume_after: Option<u64>,
    create: bool,
) -> Result<(PullConsumer, bool)> {
    let stream = match client.get_stream(&config.stream).await {
        Ok(stream) => stream,
        Err(Error::StreamNotFound { .. }) if config.auto_create.is_some() => {
            let auto = config.auto_create.clone().unwrap_or_default();
            let filter = config.filter_subject.as_deref().unwrap_or("");
            client
                .ensure_stream(auto.to_stream_config(&config.stream, filter))
                .await?
        }
        Err(err) => return Err(err),
    };
    if let Some(filter) = &config.filter_subject {
        let subjects = &stream.cached_info().config.subjects;
        if !subjects.is_empty() && !subjects.iter().any(|s| subject::covers(s, filter)) {
            return Err(Error::InvalidArgument(format!(
                "filter {filter:?} is outside the subjects {subjects:?} of stream {:?}",
                config.stream
            )));
        }
    }
    let permit = client.guard()?;
    let result = if create {
        stream
            .create_consumer(config.pull_config(name, resume_after)?)
            .await
            .map(|c| (c, false))
            .map_err(|e| map_consumer("create consumer", e))
    } else {
        use async_nats::jetstream::context::ConsumerInfoErrorKind as InfoKind;
        match stream.consumer_info(name).await {
            Ok(_) => stream
                .get_consumer::<pull::Config>(name)
                .await
                .map(|c| (c, false))
                .map_err(|e| Error::JetStreamUnavailable {
                    op: "get consumer",
                    source: e,
                }),
            Err(err) if err.kind() == InfoKind::NotFound => {
                tracing::info!(consumer = %name, ?resume_after, "consumer gone from the server; recreating");
                stream
                    .create_consumer(config.pull_config(name, resume_after)?)
                    .await
                    .map(|c| (c, true))
                    .map_err(|e| map_consumer("recreate consumer", e))
            }
            Err(err)
                if matches!(
                    err.kind(),
                    InfoKind::TimedOut
                        | InfoKind::NoResponders
                        | InfoKind::Request
                        | InfoKind::Offline
                ) =>
            {
                Err(Error::JetStreamUnavailable {
                    op: "consumer info",
                    source: err.into(),
                })
            }
            Err(err) => Err(Error::JetStream {
                op: "consumer info",
                source: err.into(),
            }),
        }
    };
    permit.record(result)
}

/// How often the supervisor reads the consumer's ack floor while messages
/// flow. Messages acked since the last read are delivered again if the
/// consumer must be recreated (at-least-once); none is ever skipped.
const ACK_FLOOR_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) struct Supervisor<F> {
    /// Weak: a running consumer must not keep a dropped client alive.
    pub(crate) client: WeakClient,
    pub(crate) shutdown: tokio_util::sync::CancellationToken,
    pub(crate) config: StreamConsumerConfig,
    pub(crate) name: String,
    pub(crate) handler: Arc<F>,
    pub(crate) shared: Arc<ConsumerShared>,
    /// With `auto_ack`: what natskit acknowledged above the ack floor.
    pub(crate) acked: std::sync::Mutex<AckMemory>,
}

impl<F, Fut> Supervisor<F>
where
    // An impl needs `Fut` bound through `Fn`'s output.
    F: Fn(jetstream::Message) -> Fut + Send + Sync + 'static,
    Fut: HandlerFuture,
{
    pub(crate) async fn run(self, first: PullConsumer, mut stop: watch::Receiver<bool>) {
        let stopped = self.deliver(first, &mut stop).await;
        self.shared.counters.healthy.store(false, Ordering::Relaxed);
        if stopped && self.config.durable.is_none() {
            self.delete_ephemeral().await;
        }
    }

    /// Deletes the ephemeral consumer from the server once stopped.
    async fn delete_ephemeral(&self) {
        let Some(client) = self.client.upgrade() else {
            return;
        };
        let Ok(js) = client.jetstream() else { return };
        let deleted = tokio::time::timeout(
            Duration::from_secs(2),
            js.delete_consumer_from_stream(&self.name, &self.config.stream),
        )
        .await;
        match deleted {
            Ok(Ok(_)) => tracing::debug!(consumer = %self.name, "ephemeral consumer deleted"),
            Ok(Err(err)) => {
                tracing::debug!(consumer = %self.name, %err, "could not delete the ephemeral consumer")
            }
            Err(_) => {
                tracing::debug!(consumer = %self.name, "deleting the ephemeral consumer timed out")
            }
        }
    }

    /// Delivers until stopped (`true`) or the client is gone (`false`).
    async fn deliver(&self, first: PullConsumer, stop: &mut watch::Receiver<bool>) -> bool {
        let counters = &self.shared.counters;
        let mut waits = Retry::new(retry::RECREATE);
        let mut consumer = Some(first);
        // A reconnect, or the consumer's JetStream answering again (a healed
        // uplink), ends a wait before the next attempt at once.
        let mut reconnected = match self.client.upgrade() {
            Some(client) => client.connection_epoch(),
            None => return false,
        };
        reconnected.borrow_and_update();
        loop {
            if *stop.borrow() {
                return true;
            }
            let Some(client) = self.client.upgrade() else {
                return false;
            };
            let current = match consumer.take() {
                Some(c) => Ok(c),
                None => {
                    // Resume at the lowest sequence not yet settled: a
                    // nak'd, failed or in-flight message is delivered again.
                    let floor = counters.ack_floor.load(Ordering::Relaxed);
                    let opening =
                        open_consumer(&client, &self.config, &self.name, Some(floor), false);
                    // A request into a silent uplink waits for the whole
                    // JetStream timeout: once the uplink answers again (or
                    // the connection is replaced), try again at once.
                    let opened = tokio::select! {
                        opened = opening => opened,
                        _ = stop.changed() => return true,
                        () = self.shutdown.cancelled() => return false,
                        _ = reconnected.changed() => continue,
                    };
                    opened.map(|(consumer, recreated)| {
                        if recreated {
                            self.shared.metrics.recreations.add(1);
                        }
                        consumer
                    })
                }
            };
            drop(client);
            let (messages, current) = match current {
                Ok(c) => (
                    c.stream()
                        .heartbeat(self.config.heartbeat)
                        .expires(self.config.heartbeat * 6)
                        .messages()
                        .await
                        .map_err(|e| Error::JetStreamUnavailable {
                            op: "pull",
                            source: e.into(),
                        }),
                    Some(c),
                ),
                Err(e) => (Err(e), None),
            };
            let mut messages = match messages {
                Ok(m) => m,
                Err(err) => {
                    counters.healthy.store(false, Ordering::Relaxed);
                    let delay = waits.next_delay();
                    tracing::warn!(stream = %self.config.stream, consumer = %self.name, %err, ?delay, "consumer unavailable; retrying");
                    tokio::select! {
                        _ = stop.changed() => return true,
                        () = self.shutdown.cancelled() => return false,
                        () = tokio::time::sleep(delay) => continue,
                        _ = reconnected.changed() => {
                            tracing::info!(stream = %self.config.stream, consumer = %self.name, "reconnected, or JetStream answers again; resuming the consumer");
                            continue;
                        }
                    }
                }
            };
            counters.healthy.store(true, Ordering::Relaxed);
            waits.reset();
            let mut floor_ticker = tokio::time::interval(ACK_FLOOR_INTERVAL);
            floor_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut delivered_since_read = false;
            let mut reading: Option<std::pin::Pin<Box<dyn Future<Output = Option<u64>> + Send>>> =
                None;
            // Made once per session, not per message (it takes a lock).
            let mut cancelled = std::pin::pin!(self.shutdown.cancelled());
            loop {
                // Read while something was delivered since the last read, or
                // the floor is still below what was delivered (acks are
                // applied by the server asynchronously; a nak'd message
                // holds the floor until it is redelivered and acked).
                let behind = counters.ack_floor.load(Ordering::Relaxed)
                    < counters.last_seq.load(Ordering::Relaxed);
                let read_floor = reading.is_none() && (delivered_since_read || behind);
                let floor_read = async {
                    match reading.as_mut() {
                        Some(fut) => fut.await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    _ = stop.changed() => return true,
                    () = &mut cancelled => return false,
                    floor = floor_read => {
                        reading = None;
                        if let Some(floor) = floor {
                            counters.ack_floor.fetch_max(floor, Ordering::Relaxed);
                            if self.config.auto_ack {
                                lock(&self.acked).floor(floor);
                            }
                        }
                    }
                    _ = floor_ticker.tick(), if read_floor => {
                        delivered_since_read = false;
                        if let Some(mut c) = current.clone() {
                            reading = Some(Box::pin(async move {
                                c.info().await.ok().map(|i| i.ack_floor.stream_sequence)
                            }));
                        }
                    }
                    next = messages.next() => match next {
                        Some(Ok(message)) => {
                            delivered_since_read = true;
                            self.dispatch(message).await;
                        }
                        Some(Err(err)) => {
                            use async_nats::jetstream::consumer::pull::MessagesErrorKind as K;
                            match err.kind() {
                                K::MissingHeartbeat | K::ConsumerDeleted | K::NoResponders | K::PushBasedConsumer => {
                                    tracing::warn!(stream = %self.config.stream, consumer = %self.name, %err, "consumer stream lost; recreating");
                                    break;
                                }
                                _ => tracing::debug!(consumer = %self.name, %err, "pull error"),
                            }
                        }
                        None => break,
                    }
                }
            }
            counters.healthy.store(false, Ordering::Relaxed);
        }
    }

    async fn dispatch(&self, message: jetstream::Message) {
        let counters = &self.shared.counters;
        let (stream_seq, delivered) = message
            .info()
            .map(|i| (i.stream_sequence, i.delivered))
            .unwrap_or((0, 1));
        let reply = message.reply.clone();
        self.shared.metrics.deliveries.add(1);
        if delivered > 1 {
            self.shared.metrics.redeliveries.add(1);
        }
        if self.config.auto_ack && lock(&self.acked).is_repeat(stream_seq) {
            // Acknowledged by this process before (a recreated consumer
            // starts again at the ack floor): acknowledge it again.
            counters.repeats_skipped.fetch_add(1, Ordering::Relaxed);
            self.settle(reply, AckKind::Ack).await;
            return;
        }
        let headers = message.headers.clone();
        let timeout = self.config.message_timeout;
        let failed = match invoke(headers.as_ref(), timeout, (self.handler)(message)).await {
            Invocation::Done(outcome) => match outcome.into_result() {
                Ok(()) => {
                    counters.handled.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Err(err) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(consumer = %self.name, %err, "consumer handler failed; naking");
                    true
                }
            },
            Invocation::Panicked(what) => {
                counters.panics.fetch_add(1, Ordering::Relaxed);
                tracing::error!(consumer = %self.name, panic = %what, "consumer handler panicked; naking");
                true
            }
            Invocation::TimedOut => {
                counters.timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(consumer = %self.name, ?timeout, "consumer handler timed out; naking");
                true
            }
        };
        if failed && self.config.ack_policy != AckPolicy::None {
            self.settle(reply, AckKind::Nak(None)).await;
        } else if !failed && self.config.auto_ack {
            self.settle(reply, AckKind::Ack).await;
            lock(&self.acked).acked(stream_seq);
        }
        if stream_seq > 0 {
            counters.last_seq.fetch_max(stream_seq, Ordering::Relaxed);
        }
    }

    /// Sends `kind` for the message with reply subject `reply`.
    async fn settle(&self, reply: Option<async_nats::Subject>, kind: AckKind) {
        if let Some(reply) = reply
            && let Some(client) = self.client.upgrade()
            && let Ok(conn) = client.nats()
        {
            let _ = conn.publish(reply, kind.into()).await;
        }
    }
}
