//! Request/reply: requests with timeouts and retry, reply helpers, and
//! request handlers (`serve`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::core::subject::IntoSubject;
use async_nats::{HeaderMap, Message};
use bytes::Bytes;

use crate::client::Client;
use crate::client::retry::Retry;
use crate::core::error::{BoxError, Error, Result, check_nonzero};
use crate::messaging::pubsub::{SubscribeOptions, Subscription};

pub use crate::client::DEFAULT_REQUEST_TIMEOUT;
pub use crate::core::backoff::RetryConfig;
pub use crate::core::error::ServiceError;
pub use crate::core::header::{SERVICE_ERROR_CODE_HEADER, SERVICE_ERROR_HEADER};

/// Options of one request ([`Client::request_with`]): its timeout, its
/// headers and its retries, in any combination.
///
/// ```
/// use std::time::Duration;
/// let mut headers = natskit::HeaderMap::new();
/// headers.insert("tenant", "acme");
/// let options = natskit::RequestOptions::new()
///     .timeout(Duration::from_millis(500))
///     .headers(headers)
///     .retry(natskit::RetryConfig::default());
/// # let _ = options;
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct RequestOptions {
    timeout: Option<Duration>,
    headers: Option<HeaderMap>,
    retry: Option<RetryConfig>,
}

impl RequestOptions {
    /// The client's request timeout, no headers, no retries.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long each attempt waits for the reply (default: the client's
    /// [`request_timeout`](crate::ClientBuilder::request_timeout)). Zero is
    /// [`Error::ZeroDuration`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Headers sent with the request (trace headers are added).
    pub fn headers(mut self, headers: HeaderMap) -> Self {
        self.headers = Some(headers);
        self
    }

    /// Retries on no-responders and timeouts with jittered back-off (default:
    /// none). The whole call is one outcome for the circuit breaker, however
    /// many attempts it takes.
    pub fn retry(mut self, retry: RetryConfig) -> Self {
        self.retry = Some(retry);
        self
    }
}

/// The reply subject of `request`, or the error saying it has none.
fn reply_subject(request: &Message) -> Result<async_nats::Subject> {
    request.reply.clone().ok_or_else(|| Error::NoReplySubject {
        subject: request.subject.to_string(),
    })
}

/// The service error a reply carries in its `Nats-Service-Error` headers.
pub(crate) fn service_error(reply: &Message) -> Option<ServiceError> {
    let headers = reply.headers.as_ref()?;
    let message = headers.get(SERVICE_ERROR_HEADER)?;
    let code = headers
        .get(SERVICE_ERROR_CODE_HEADER)
        .and_then(|c| c.as_str().parse().ok())
        .unwrap_or(500);
    Some(ServiceError::new(code, message.as_str()))
}

impl Client {
    /// Sends a request and returns the reply's payload, waiting up to the
    /// client's request timeout ([`ClientBuilder::request_timeout`](crate::ClientBuilder::request_timeout),
    /// default [`DEFAULT_REQUEST_TIMEOUT`]).
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// let answer = client.request("time.now", "").await?;
    /// # let _ = answer; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Timeout`] and [`Error::NoResponders`] (distinct),
    /// [`Error::Service`] when the reply carries a service error (the
    /// `Nats-Service-Error` headers [`serve`](Self::serve) writes), plus the
    /// publish checks (subject, payload size, breaker, connection).
    // Not `async fn`s, this and `request_timeout`: each level of nesting
    // kept another copy of the request's future (see `ReplyPayload`).
    pub fn request(
        &self,
        subject: impl IntoSubject,
        payload: impl Into<Bytes>,
    ) -> impl Future<Output = Result<Bytes>> + Send + '_ {
        self.request_timeout(subject, payload, self.config().request_timeout)
    }

    /// [`request`](Self::request) with its own timeout.
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// let answer = client
    ///     .request_timeout("time.now", "", std::time::Duration::from_millis(200))
    ///     .await?;
    /// # let _ = answer; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`request`](Self::request); [`Error::ZeroDuration`] for a zero
    /// timeout.
    pub fn request_timeout(
        &self,
        subject: impl IntoSubject,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Bytes>> + Send + '_ {
        ReplyPayload {
            request: self.request_with(
                subject.into_subject(),
                payload.into(),
                RequestOptions::new().timeout(timeout),
            ),
        }
    }

    /// Sends a request with [`RequestOptions`] (timeout, headers, retries)
    /// and returns the whole reply message. With retries, no-responders and
    /// timeouts are retried with jittered back-off and the call gives up
    /// with the last attempt's error.
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// use natskit::{RequestOptions, RetryConfig};
    /// let mut headers = natskit::HeaderMap::new();
    /// headers.insert("tenant", "acme");
    /// let reply = client
    ///     .request_with(
    ///         "svc.echo",
    ///         "hi",
    ///         RequestOptions::new().headers(headers).retry(RetryConfig::default()),
    ///     )
    ///     .await?;
    /// println!("{:?}: {:?}", reply.headers, reply.payload);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// See [`request`](Self::request); [`Error::ZeroDuration`] for a zero
    /// timeout.
    pub async fn request_with(
        &self,
        subject: impl IntoSubject,
        payload: impl Into<Bytes>,
        options: RequestOptions,
    ) -> Result<Message> {
        let subject = subject.into_subject();
        let payload = payload.into();
        let timeout = options.timeout.unwrap_or(self.config().request_timeout);
        let out = self.prologue(&subject, options.headers, payload.len(), |traced| {
            check_nonzero("request timeout", timeout)?;
            Ok(traced.filter(|h| !h.is_empty()))
        })?;
        let (permit, mut headers) = (out.permit, out.headers);
        let started = std::time::Instant::now();
        let retry = options.retry.unwrap_or(RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        });
        let mut waits = Retry::new(retry.backoff);
        let result = loop {
            // The last attempt the budget allows takes the headers; only one
            // that may be retried sends a copy (a clone of the map is three
            // allocations).
            let attempt_headers = if waits.attempt() < retry.max_retries {
                headers.clone()
            } else {
                headers.take()
            };
            match self
                .request_once(&subject, attempt_headers, &payload, timeout)
                .await
            {
                Err(err @ (Error::NoResponders { .. } | Error::Timeout { .. }))
                    if waits.attempt() < retry.max_retries =>
                {
                    tracing::debug!(%subject, %err, attempt = waits.attempt(), "request failed; retrying");
                    self.metrics().retry("request");
                    waits.wait().await;
                }
                other => break other,
            }
        };
        self.metrics()
            .request_duration
            .record(started.elapsed().as_secs_f64());
        permit.record(result)
    }

    async fn request_once(
        &self,
        subject: &async_nats::Subject,
        headers: Option<HeaderMap>,
        payload: &Bytes,
        timeout: Duration,
    ) -> Result<Message> {
        let conn = self.live_conn()?;
        let mut request = async_nats::Request::new()
            .payload(payload.clone())
            .timeout(Some(timeout));
        if let Some(headers) = headers {
            request = request.headers(headers);
        }
        let reply = conn
            .send_request(subject.clone(), request)
            .await
            .map_err(|err| match err.kind() {
                async_nats::RequestErrorKind::TimedOut => Error::Timeout {
                    subject: subject.to_string(),
                    timeout,
                },
                async_nats::RequestErrorKind::NoResponders => Error::NoResponders {
                    subject: subject.to_string(),
                },
                _ => Error::Request(err),
            })?;
        match service_error(&reply) {
            Some(err) => Err(Error::Service(err)),
            None => Ok(reply),
        }
    }

    /// Replies to `request` (a message received with a reply subject).
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// let mut requests = client.subscribe_stream("time.now").await?;
    /// while let Some(request) = futures_util::StreamExt::next(&mut requests).await {
    ///     client.reply(&request, "12:00").await?;
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::NoReplySubject`] when `request` has no reply subject (it was
    /// published, not requested); otherwise see [`publish`](Self::publish).
    pub async fn reply(&self, request: &Message, payload: impl Into<Bytes>) -> Result<()> {
        let reply_to = reply_subject(request)?;
        self.publish(reply_to, payload).await
    }

    /// [`reply`](Self::reply) with headers.
    ///
    /// # Errors
    /// See [`reply`](Self::reply).
    pub async fn reply_with_headers(
        &self,
        request: &Message,
        headers: HeaderMap,
        payload: impl Into<Bytes>,
    ) -> Result<()> {
        let reply_to = reply_subject(request)?;
        self.publish_with_headers(reply_to, headers, payload).await
    }

    /// Serves requests on `subject`: the handler's `Ok` payload is the reply;
    /// an `Err` replies with the service error headers and `error: <message>`.
    /// Messages without a reply subject are handled and not answered.
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// use natskit::{ServiceError, SubscribeOptions};
    /// let service = client
    ///     .serve("math.double", SubscribeOptions::new().queue("math"), |msg: async_nats::Message| async move {
    ///         let n: i64 = std::str::from_utf8(&msg.payload)
    ///             .map_err(|e| ServiceError::new(400, e.to_string()))?
    ///             .parse()?;
    ///         Ok::<_, ServiceError>((n * 2).to_string().into())
    ///     })
    ///     .await?;
    /// # service.unsubscribe().await; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// See [`subscribe`](Self::subscribe).
    pub async fn serve<F, Fut>(
        &self,
        subject: impl IntoSubject,
        options: SubscribeOptions,
        handler: F,
    ) -> Result<Subscription>
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Bytes, ServiceError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        // Weak: a running service must not keep a dropped client alive.
        let weak = self.downgrade();
        self.subscribe_with(subject, options, move |message: Message| {
            let handler = handler.clone();
            let weak = weak.clone();
            async move {
                let Some(client) = weak.upgrade() else {
                    return Err(BoxError::from("client dropped"));
                };
                let reply_to = message.reply.clone();
                let outcome = handler(message).await;
                let Some(reply_to) = reply_to else {
                    return outcome.map(drop).map_err(|e| BoxError::from(e.to_string()));
                };
                let sent = match outcome {
                    Ok(body) => client.publish(reply_to, body).await,
                    Err(err) => {
                        // The message may hold line breaks: clean it, or the
                        // header block would break (async-nats panics).
                        let mut headers = HeaderMap::new();
                        headers.insert(
                            SERVICE_ERROR_HEADER,
                            crate::core::header::sanitize_value(&err.message).as_ref(),
                        );
                        headers.insert(SERVICE_ERROR_CODE_HEADER, err.code.to_string().as_str());
                        client
                            .publish_with_headers(
                                reply_to,
                                headers,
                                format!("error: {}", err.message),
                            )
                            .await
                    }
                };
                sent.map_err(BoxError::from)
            }
        })
        .await
    }
}

pin_project_lite::pin_project! {
    /// The payload of a request's reply. Not a `map` combinator, which
    /// moves the whole future when it completes.
    struct ReplyPayload<F> {
        #[pin]
        request: F,
    }
}

impl<F: Future<Output = Result<Message>>> Future for ReplyPayload<F> {
    type Output = Result<Bytes>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Bytes>> {
        self.project()
            .request
            .poll(cx)
            .map(|reply| reply.map(|reply| reply.payload))
    }
}
