//! NATS micro services: request handlers that show up in `nats micro ls`,
//! `info` and `stats`, built on async-nats' implementation of the protocol
//! (`$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`, the `Nats-Service-Error`
//! headers), with natskit's handler deadline, panic capture, trace
//! propagation and queue group.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Message;
use async_nats::service::{self as micro, ServiceExt};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{Semaphore, watch};

use crate::client::Client;
use crate::client::handler::{Invocation, invoke};
use crate::client::registry::{StatsCell, SubscriptionStats};
use crate::core::error::ServiceError;
use crate::core::error::{Error, Result, check_nonzero};
use crate::core::subject;
use crate::messaging::pubsub::SubscribeOptions;

/// Settings of a [`Service`].
///
/// ```
/// let config = natskit::ServiceConfig::new("orders", "1.2.0")
///     .description("order book")
///     .queue_group("orders-workers");
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct ServiceConfig {
    name: String,
    version: String,
    description: Option<String>,
    queue_group: Option<String>,
    deadline: Option<Duration>,
}

impl ServiceConfig {
    /// A service `name` (letters, digits, `-`, `_`) at semantic `version`.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
            description: None,
            queue_group: None,
            deadline: None,
        }
    }

    /// A description shown by `nats micro info`.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// The queue group of every endpoint (default `q`, the protocol's).
    pub fn queue_group(mut self, queue_group: impl Into<String>) -> Self {
        self.queue_group = Some(queue_group.into());
        self
    }

    /// Deadline of one handler invocation (default: the client's handler
    /// deadline), counted from the handler's first wait (as
    /// [`ClientBuilder::handler_deadline`](crate::ClientBuilder::handler_deadline));
    /// past it the requester gets a 504 service error.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }
}

/// A running NATS micro service from [`Client::add_service`]. Add endpoints
/// with [`endpoint`](Self::endpoint). Dropping the handle does not stop the
/// service; [`stop`](Self::stop) does, and so does closing (or dropping)
/// the client.
#[derive(Debug, Clone)]
pub struct Service {
    inner: Arc<ServiceInner>,
}

#[derive(Debug)]
struct ServiceInner {
    client: Client,
    service: tokio::sync::Mutex<Option<micro::Service>>,
    deadline: Duration,
    queue_group: Option<String>,
    stop: watch::Sender<bool>,
}

impl Client {
    /// Starts a NATS micro service; endpoints are added to it with
    /// [`Service::endpoint`].
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// use natskit::{ServiceConfig, ServiceError};
    /// let service = client.add_service(ServiceConfig::new("orders", "1.0.0")).await?;
    /// service
    ///     .endpoint("orders.count", |_msg: async_nats::Message| async {
    ///         Ok::<_, ServiceError>("42".into())
    ///     })
    ///     .await?;
    /// // `nats micro info orders` now lists the endpoint and its counts.
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Closed`], [`Error::InvalidName`] for a bad name,
    /// [`Error::InvalidSubject`] for a bad queue group,
    /// [`Error::CircuitOpen`], [`Error::NotConnected`], and
    /// [`Error::InvalidArgument`] when async-nats refuses the service (a
    /// version that is not semantic, say).
    pub async fn add_service(&self, config: ServiceConfig) -> Result<Service> {
        self.ensure_open()?;
        if config.name.is_empty()
            || !config
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::InvalidName {
                what: "service",
                name: subject::shorten(&config.name),
                reason: "only A-Z a-z 0-9 - _ are allowed",
            });
        }
        if let Some(queue) = &config.queue_group {
            subject::validate_queue(queue)?;
        }
        let permit = self.guard()?;
        let conn = self.live_conn()?;
        let mut builder = conn.service_builder();
        if let Some(description) = &config.description {
            builder = builder.description(description);
        }
        if let Some(queue) = &config.queue_group {
            builder = builder.queue_group(queue);
        }
        let started = builder
            .start(&config.name, &config.version)
            .await
            .map_err(|e| {
                Error::InvalidArgument(format!("starting service {:?}: {e}", config.name))
            });
        let service = permit.record_unconfirmed(started)?;
        Ok(Service {
            inner: Arc::new(ServiceInner {
                client: self.clone(),
                service: tokio::sync::Mutex::new(Some(service)),
                deadline: config.deadline.unwrap_or(self.config().handler_deadline),
                queue_group: config.queue_group,
                stop: watch::Sender::new(false),
            }),
        })
    }
}

/// One endpoint of a [`Service`], from [`Service::endpoint`]. Like every
/// handle to work natskit runs for you, dropping it does not stop the
/// endpoint; stopping the service does.
#[derive(Debug, Clone)]
pub struct Endpoint {
    subject: String,
    stats: Arc<StatsCell>,
}

impl Endpoint {
    /// The endpoint's subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The same counts a subscription keeps: requests received and handled,
    /// error replies, panics and deadline overruns. (Requests async-nats
    /// drops before natskit sees them count client-wide, in
    /// [`StatusInfo::dropped_messages`](crate::StatusInfo::dropped_messages):
    /// async-nats does not say which endpoint they were for.)
    pub fn stats(&self) -> SubscriptionStats {
        self.stats.snapshot()
    }
}

impl Service {
    /// Adds an endpoint on `subject` with the service's defaults: one
    /// request at a time, in order, under the service's deadline. See
    /// [`endpoint_with`](Self::endpoint_with).
    ///
    /// # Errors
    /// See [`endpoint_with`](Self::endpoint_with).
    pub async fn endpoint<F, Fut>(&self, subject: &str, handler: F) -> Result<Endpoint>
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Bytes, ServiceError>> + Send + 'static,
    {
        self.endpoint_with(subject, SubscribeOptions::new(), handler)
            .await
    }

    /// Adds an endpoint on `subject` with the same handler options as a
    /// subscription: [`queue`](SubscribeOptions::queue) (default: the
    /// service's queue group), [`concurrency`](SubscribeOptions::concurrency)
    /// (default one request at a time, in order) and
    /// [`deadline`](SubscribeOptions::deadline) (default: the service's).
    /// Each request runs `handler` in the request's trace scope. `Ok` is the
    /// reply; `Err` replies with the `Nats-Service-Error` headers (the
    /// message cleaned of line breaks) and counts as an error in
    /// `$SRV.STATS`; a panic replies 500 and a deadline overrun 504. Every
    /// outcome is counted in [`Endpoint::stats`].
    ///
    /// ```no_run
    /// # async fn demo(service: natskit::Service) -> natskit::Result<()> {
    /// use natskit::{ServiceError, SubscribeOptions};
    /// let endpoint = service
    ///     .endpoint_with("orders.price", SubscribeOptions::new().concurrency(8), |msg: natskit::Message| async move {
    ///         Ok::<_, ServiceError>(msg.payload)
    ///     })
    ///     .await?;
    /// println!("{:?}", endpoint.stats());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Closed`] (client closed or service stopped),
    /// [`Error::InvalidSubject`] (also for a bad queue group),
    /// [`Error::ZeroDuration`], [`Error::InvalidArgument`] when async-nats
    /// refuses the endpoint.
    pub async fn endpoint_with<F, Fut>(
        &self,
        subject: &str,
        options: SubscribeOptions,
        handler: F,
    ) -> Result<Endpoint>
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Bytes, ServiceError>> + Send + 'static,
    {
        let client = &self.inner.client;
        client.ensure_open()?;
        subject::validate_subscribe(subject)?;
        let queue = options.queue_group().or(self.inner.queue_group.as_deref());
        if let Some(queue) = queue {
            subject::validate_queue(queue)?;
        }
        let deadline = options.handler_deadline().unwrap_or(self.inner.deadline);
        check_nonzero("endpoint deadline", deadline)?;
        let concurrency = options.handler_concurrency();
        let builder = {
            let service = self.inner.service.lock().await;
            let Some(service) = service.as_ref() else {
                return Err(Error::Closed);
            };
            let mut builder = service.endpoint_builder();
            if let Some(queue) = queue {
                builder = builder.queue_group(queue);
            }
            builder
        };
        let endpoint = builder
            .add(subject)
            .await
            .map_err(|e| Error::InvalidArgument(format!("adding endpoint {subject:?}: {e}")))?;
        let stats = client.new_stats(&subject.into());
        let runner = EndpointRunner {
            handler: Arc::new(handler),
            stats: stats.clone(),
            subject: subject.to_owned(),
            deadline,
        };
        let shutdown = client.shutdown().clone();
        let stop = self.inner.stop.subscribe();
        let tasks = client.tasks().clone();
        client
            .tasks()
            .spawn(runner.run(endpoint, concurrency, shutdown, stop, tasks));
        Ok(Endpoint {
            subject: subject.to_owned(),
            stats,
        })
    }

    /// The service's `$SRV.INFO` answer: name, id, version, endpoints.
    ///
    /// # Errors
    /// [`Error::Closed`] once stopped.
    pub async fn info(&self) -> Result<micro::Info> {
        let service = self.inner.service.lock().await;
        match service.as_ref() {
            Some(service) => Ok(service.info().await),
            None => Err(Error::Closed),
        }
    }

    /// The per-endpoint counts of `$SRV.STATS`: requests, errors,
    /// processing time, last error.
    ///
    /// # Errors
    /// [`Error::Closed`] once stopped.
    pub async fn stats(&self) -> Result<Vec<micro::endpoint::Stats>> {
        let service = self.inner.service.lock().await;
        match service.as_ref() {
            Some(service) => Ok(service.stats().await.into_values().collect()),
            None => Err(Error::Closed),
        }
    }

    /// Stops every endpoint (a request being handled finishes) and removes
    /// the service from discovery. Idempotent.
    pub async fn stop(&self) {
        self.inner.stop.send_replace(true);
        let service = self.inner.service.lock().await.take();
        if let Some(service) = service
            && let Err(err) = service.stop().await
        {
            tracing::debug!(%err, "stopping the service");
        }
    }
}

/// What runs one endpoint's requests.
struct EndpointRunner<F> {
    handler: Arc<F>,
    stats: Arc<StatsCell>,
    subject: String,
    deadline: Duration,
}

impl<F, Fut> EndpointRunner<F>
where
    F: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<Bytes, ServiceError>> + Send + 'static,
{
    /// Takes requests until the service stops or the client closes, up to
    /// `concurrency` at once (inline, in order, for one); a request being
    /// handled finishes either way.
    async fn run(
        self,
        mut endpoint: micro::endpoint::Endpoint,
        concurrency: usize,
        shutdown: tokio_util::sync::CancellationToken,
        mut stop: watch::Receiver<bool>,
        tasks: tokio_util::task::TaskTracker,
    ) {
        let runner = Arc::new(self);
        let limiter = Arc::new(Semaphore::new(concurrency));
        let mut cancelled = std::pin::pin!(shutdown.cancelled());
        loop {
            let slot = tokio::select! {
                () = &mut cancelled => break,
                _ = stop.wait_for(|s| *s) => break,
                slot = limiter.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
            };
            let request = tokio::select! {
                () = &mut cancelled => break,
                _ = stop.wait_for(|s| *s) => break,
                request = endpoint.next() => match request {
                    Some(request) => request,
                    None => break,
                },
            };
            runner.stats.add_received(1);
            if concurrency == 1 {
                runner.handle(request).await;
                drop(slot);
            } else {
                let runner = runner.clone();
                tasks.spawn(async move {
                    runner.handle(request).await;
                    drop(slot);
                });
            }
        }
        // Requests already taken are answered before the endpoint stops.
        let all = u32::try_from(concurrency).unwrap_or(u32::MAX);
        let _ = limiter.acquire_many(all).await;
        let _ = endpoint.stop().await;
    }

    /// Runs the handler for one request, replies, and counts the outcome.
    async fn handle(&self, request: micro::Request) {
        let headers = request.message.headers.clone();
        let invocation = invoke(
            headers.as_ref(),
            self.deadline,
            (self.handler)(request.message.clone()),
        )
        .await;
        let subject = &self.subject;
        let response = match &invocation {
            Invocation::Done(Ok(body)) => Ok(body.clone()),
            Invocation::Done(Err(err)) => Err(micro_error(err)),
            Invocation::Panicked(_) => {
                Err(micro_error(&ServiceError::new(500, "handler panicked")))
            }
            Invocation::TimedOut => Err(micro_error(&ServiceError::new(
                504,
                "handler deadline exceeded",
            ))),
        };
        self.stats
            .record(self.deadline, invocation.map(|r| r.map(drop)));
        if request.message.reply.is_some()
            && let Err(err) = request.respond(response).await
        {
            tracing::warn!(%subject, %err, "could not send the service reply");
        }
    }
}

/// A service error as the micro protocol carries it, its message cleaned of
/// line breaks (async-nats would panic on them in a header).
fn micro_error(err: &ServiceError) -> micro::error::Error {
    micro::error::Error {
        status: crate::core::header::sanitize_value(&err.message).into_owned(),
        code: usize::from(err.code),
    }
}
