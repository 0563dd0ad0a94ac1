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
use crate::core::error::{BoxError, Error, Result};
use crate::messaging::pubsub::{SubscribeOptions, Subscription};

pub use crate::client::DEFAULT_REQUEST_TIMEOUT;
pub use crate::core::backoff::RetryConfig;
pub use crate::core::error::ServiceError;
pub use crate::core::header::{SERVICE_ERROR_CODE_HEADER, SERVICE_ERROR_HEADER};

/// A zero timeout is a caller mistake (it used to mean "the default").
fn check_timeout(timeout: Duration) -> Result<()> {
    if timeout.is_zero() {
        return Err(Error::InvalidArgument(
            "a request timeout must be above zero (request() uses the client's default)".into(),
        ));
    }
    Ok(())
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
    pub async fn request(
        &self,
        subject: impl IntoSubject,
        payload: impl Into<Bytes>,
    ) -> Result<Bytes> {
        self.request_timeout(subject, payload, self.config().request_timeout)
            .await
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
    /// As [`request`](Self::request); [`Error::InvalidArgument`] for a zero
    /// timeout.
    pub async fn request_timeout(
        &self,
        subject: impl IntoSubject,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes> {
        self.request_with_headers(subject, HeaderMap::new(), payload, timeout)
            .await
            .map(|reply| reply.payload)
    }

    /// Sends a request with headers and returns the whole reply message.
    ///
    /// # Errors
    /// See [`request`](Self::request).
    pub async fn request_with_headers(
        &self,
        subject: impl IntoSubject,
        headers: HeaderMap,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Message> {
        let subject = subject.into_subject();
        let payload = payload.into();
        let out = self.prologue(&subject, Some(headers), payload.len(), |traced| {
            check_timeout(timeout)?;
            Ok(traced.filter(|h| !h.is_empty()))
        })?;
        let (permit, headers) = (out.permit, out.headers);
        let started = std::time::Instant::now();
        let result = self
            .request_once(&subject, headers.as_ref(), &payload, timeout)
            .await;
        self.metrics()
            .request_duration
            .record(started.elapsed().as_secs_f64());
        permit.record(result)
    }

    /// Sends a request, retrying on no-responders and timeouts with
    /// jittered exponential back-off. The whole call is one outcome for the
    /// circuit breaker, however many attempts it takes. Gives up with the
    /// last attempt's error.
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// use natskit::RetryConfig;
    /// let reply = client
    ///     .request_with_retry("svc.echo", "hi", std::time::Duration::from_secs(1), RetryConfig::default())
    ///     .await?;
    /// # let _ = reply; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// See [`request`](Self::request).
    pub async fn request_with_retry(
        &self,
        subject: impl IntoSubject,
        payload: impl Into<Bytes>,
        timeout: Duration,
        retry: RetryConfig,
    ) -> Result<Bytes> {
        let subject = subject.into_subject();
        let payload = payload.into();
        let out = self.prologue(&subject, None, payload.len(), |traced| {
            check_timeout(timeout)?;
            Ok(traced.filter(|h| !h.is_empty()))
        })?;
        let (permit, headers) = (out.permit, out.headers);
        let started = std::time::Instant::now();
        let mut waits = Retry::new(retry.backoff);
        let result = loop {
            match self
                .request_once(&subject, headers.as_ref(), &payload, timeout)
                .await
            {
                Err(err @ (Error::NoResponders { .. } | Error::Timeout { .. }))
                    if waits.attempt() < retry.max_retries =>
                {
                    tracing::debug!(%subject, %err, attempt = waits.attempt(), "request failed; retrying");
                    self.metrics().retry("request");
                    waits.wait().await;
                }
                other => break other.map(|m| m.payload),
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
        headers: Option<&HeaderMap>,
        payload: &Bytes,
        timeout: Duration,
    ) -> Result<Message> {
        let conn = self.live_conn()?;
        let mut request = async_nats::Request::new()
            .payload(payload.clone())
            .timeout(Some(timeout));
        if let Some(headers) = headers {
            request = request.headers(headers.clone());
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

    /// Replies to a request. An empty `reply_to` (the message was not a
    /// request) does nothing.
    ///
    /// # Errors
    /// See [`publish`](Self::publish).
    pub async fn reply(&self, reply_to: &str, payload: impl Into<Bytes>) -> Result<()> {
        if reply_to.is_empty() {
            return Ok(());
        }
        self.publish(reply_to.to_owned(), payload).await
    }

    /// Replies with headers. An empty `reply_to` does nothing.
    ///
    /// # Errors
    /// See [`publish`](Self::publish).
    pub async fn reply_with_headers(
        &self,
        reply_to: &str,
        headers: HeaderMap,
        payload: impl Into<Bytes>,
    ) -> Result<()> {
        if reply_to.is_empty() {
            return Ok(());
        }
        self.publish_with_headers(reply_to.to_owned(), headers, payload)
            .await
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
                    Ok(body) => client.reply(&reply_to, body).await,
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
                            .reply_with_headers(
                                &reply_to,
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
