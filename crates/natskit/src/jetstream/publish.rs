//! Acknowledged publishing to a stream: message ids, preconditions, and
//! resends across reconnects and elections.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::publish::PublishAck;
use bytes::Bytes;

use crate::client::Client;
use crate::client::ack_inbox::publish_for_ack;
use crate::client::jetstream_errors::{map_publish, timed_out, unavailable};
use crate::client::retry::{self, Retry};
use crate::core::backoff::RetryConfig;
use crate::core::error::{Error, Result};
use crate::core::message_id::{MessageId, MessageIds};
use crate::core::subject::{self, IntoSubject};

/// Options of one acknowledged publish.
///
/// ```
/// use std::time::Duration;
/// let opts = natskit::StreamPublishOptions::new()
///     .message_id("order-42")          // server-side de-duplication
///     .expected_last_sequence(41)      // optimistic concurrency
///     .timeout(Duration::from_secs(2));
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct StreamPublishOptions {
    pub(crate) message_id: Option<MessageId>,
    pub(crate) expected_last_sequence: Option<u64>,
    pub(crate) expected_last_subject_sequence: Option<u64>,
    pub(crate) expected_stream: Option<String>,
    pub(crate) headers: Option<HeaderMap>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) retry: Option<RetryConfig>,
}

impl StreamPublishOptions {
    /// No options: the client's retry settings, the JetStream timeout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `Nats-Msg-Id`: the stream stores a message id once per
    /// duplicate window, so retries cannot duplicate it.
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(MessageId::from(id.into()));
        self
    }

    /// Rejects the publish unless the stream's last sequence is `seq`.
    pub fn expected_last_sequence(mut self, seq: u64) -> Self {
        self.expected_last_sequence = Some(seq);
        self
    }

    /// Rejects the publish unless the last sequence on this subject is `seq`.
    pub fn expected_last_subject_sequence(mut self, seq: u64) -> Self {
        self.expected_last_subject_sequence = Some(seq);
        self
    }

    /// Rejects the publish unless it lands in stream `name`.
    pub fn expected_stream(mut self, name: impl Into<String>) -> Self {
        self.expected_stream = Some(name.into());
        self
    }

    /// Headers to send.
    pub fn headers(mut self, headers: HeaderMap) -> Self {
        self.headers = Some(headers);
        self
    }

    /// Bound on waiting for the ack, per attempt.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Retries while JetStream is unavailable (default: 10 retries from 100 ms
    /// to 1 s; a resend carries the same message id).
    pub fn retry(mut self, retry: RetryConfig) -> Self {
        self.retry = Some(retry);
        self
    }

    /// Checks the values the options put in headers (the caller's own
    /// headers are checked by `Client::prologue`).
    pub(crate) fn validate(&self) -> Result<()> {
        use async_nats::header;
        if let Some(id) = self.message_id.as_ref().map(MessageId::as_str) {
            if id.is_empty() {
                return Err(Error::InvalidHeader {
                    name: header::NATS_MESSAGE_ID.to_string(),
                    reason: "empty message id",
                });
            }
            crate::core::header::validate_value(header::NATS_MESSAGE_ID.as_ref(), id)?;
        }
        if let Some(stream) = &self.expected_stream {
            subject::validate_name("stream", stream)?;
        }
        Ok(())
    }

    /// The one preparation of a stream publish's headers, for
    /// [`Client::prologue`]: checks the options, assigns an id from `ids`
    /// unless one is given, keeps `traced` (the caller's headers with the
    /// trace) with the options' expectations added as the headers a resend
    /// starts from, and returns every header of the first send (those plus
    /// the id). [`Outgoing::new`] takes what it keeps.
    pub(crate) fn prepare(
        &mut self,
        traced: Option<HeaderMap>,
        ids: &MessageIds,
    ) -> Result<Option<HeaderMap>> {
        self.validate()?;
        // The id's text for the first send: assigned with the id, or a
        // copy of the given one.
        let id = match &self.message_id {
            Some(given) => given.as_str().to_owned(),
            None => {
                let (kept, text) = ids.next_id();
                self.message_id = Some(kept);
                text
            }
        };
        self.headers = self.with_expectations(traced);
        Ok(Some(with_message_id(self.headers.clone(), id)))
    }

    /// `base` (the caller's headers) with the options' expectations added:
    /// every header but the message id (usually none at all).
    fn with_expectations(&self, base: Option<HeaderMap>) -> Option<HeaderMap> {
        use async_nats::header;
        if self.expected_last_sequence.is_none()
            && self.expected_last_subject_sequence.is_none()
            && self.expected_stream.is_none()
        {
            return base.filter(|h| !h.is_empty());
        }
        let mut headers = base.unwrap_or_default();
        if let Some(seq) = self.expected_last_sequence {
            headers.insert(
                header::NATS_EXPECTED_LAST_SEQUENCE,
                seq.to_string().as_str(),
            );
        }
        if let Some(seq) = self.expected_last_subject_sequence {
            headers.insert(
                header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                seq.to_string().as_str(),
            );
        }
        if let Some(stream) = &self.expected_stream {
            headers.insert(header::NATS_EXPECTED_STREAM, stream.as_str());
        }
        Some(headers)
    }
}

/// `base` with `Nats-Msg-Id: id` added.
fn with_message_id(base: Option<HeaderMap>, id: String) -> HeaderMap {
    let mut headers = base.unwrap_or_default();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
    headers
}

/// A stream publish as sent (and sent again): its headers carry its
/// message id. The first send takes the headers the prologue built and
/// checked; a resend builds them again from `base` and `id` (a clone of
/// the whole map for every send cost three allocations a message).
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) subject: async_nats::Subject,
    pub(crate) payload: Bytes,
    /// The first send's headers, until it is made.
    first: Option<Option<HeaderMap>>,
    /// Every header but the message id (usually none).
    base: Option<HeaderMap>,
    id: Option<MessageId>,
}

impl Outgoing {
    /// `headers` as built by the prologue (every header), and what
    /// [`StreamPublishOptions::prepare`] built them from.
    pub(crate) fn new(
        subject: async_nats::Subject,
        payload: Bytes,
        headers: Option<HeaderMap>,
        options: &mut StreamPublishOptions,
    ) -> Self {
        Self {
            subject,
            payload,
            first: Some(headers),
            base: options.headers.take(),
            id: options.message_id.take(),
        }
    }

    /// The payload and headers for one send.
    pub(crate) fn parts(&mut self) -> (Bytes, Option<HeaderMap>) {
        (self.payload.clone(), self.next_headers())
    }

    /// The headers for one send.
    fn next_headers(&mut self) -> Option<HeaderMap> {
        match self.first.take() {
            Some(headers) => headers,
            // A resend: `prepare` gave every publish an id.
            None => match &self.id {
                Some(id) => Some(with_message_id(self.base.clone(), id.as_str().to_owned())),
                None => self.base.clone(),
            },
        }
    }
}

/// Whether a stream publish is sent again after `outcome`, its
/// `attempts`-th resend so far: only while JetStream was out of reach (no
/// responders, no leader, no ack in time, a replaced connection), within
/// the retry budget. A refusal, a success or any other error is final.
fn send_again(outcome: &Result<PublishAck>, attempts: u32, max_retries: u32) -> bool {
    let unreachable = matches!(
        outcome,
        Err(Error::StreamNotFound { .. }
            | Error::JetStreamUnavailable { .. }
            | Error::JetStreamTimeout { .. })
    );
    unreachable && attempts < max_retries
}

/// Why an ack will never come: the connection the message was sent on was
/// replaced ([`settle_publish`](Client::settle_publish) answers it with a
/// resend at once).
pub(crate) fn reconnected() -> Error {
    unavailable("publish", "reconnected while awaiting the ack")
}

/// How long one send of a stream publish waits for its ack before it is
/// sent again with the same message id.
const RESEND_ACK_WAIT: Duration = Duration::from_secs(1);

/// How a stream publish is sent and sent again: its retry budget, and how
/// long each send waits for its ack.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendPolicy {
    retry: RetryConfig,
    ack_wait: Duration,
}

impl SendPolicy {
    /// `retry`, and each send waiting at most a second for its ack (less
    /// when `timeout` is less) before it is sent again: a publish that went
    /// to a leader that just died is not held up for the whole ack timeout
    /// while a new leader is elected, and the id makes a resend harmless.
    pub(crate) fn new(retry: RetryConfig, timeout: Option<Duration>) -> Self {
        Self {
            retry,
            ack_wait: timeout.map_or(RESEND_ACK_WAIT, |t| t.min(RESEND_ACK_WAIT)),
        }
    }
}

/// Default retry of JetStream publishes while JetStream is unavailable.
pub(crate) fn default_publish_retry() -> RetryConfig {
    RetryConfig {
        max_retries: 10,
        backoff: retry::STREAM_PUBLISH,
    }
}

impl Client {
    /// Publishes to a stream and returns its acknowledgement (stream,
    /// sequence, duplicate flag).
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// let ack = client.publish_to_stream("events.user.created", "{}").await?;
    /// println!("stored in {} at {}", ack.stream, ack.sequence);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// See [`publish_to_stream_with`](Self::publish_to_stream_with).
    pub async fn publish_to_stream(
        &self,
        subject: impl IntoSubject,
        payload: impl Into<Bytes>,
    ) -> Result<PublishAck> {
        self.publish_to_stream_with(subject, payload, StreamPublishOptions::new())
            .await
    }

    /// Publishes to a stream with options and returns the acknowledgement.
    ///
    /// Every publish carries a `Nats-Msg-Id` (natskit assigns a unique one
    /// when none is set), so a resend can never store the message twice
    /// within the stream's duplicate window. That makes every failure safe
    /// to retry: while JetStream is unavailable (no responders during an
    /// election or restart, no ack in time), the publish is resent with
    /// back-off; and when the connection drops while the ack is awaited,
    /// it is resent as soon as the client has reconnected instead of
    /// waiting out the ack timeout. The whole call is one breaker outcome.
    ///
    /// # Errors
    /// [`Error::Closed`], [`Error::InvalidSubject`], [`Error::PayloadTooLarge`]
    /// (payload plus every header the options add), [`Error::CircuitOpen`],
    /// [`Error::NotConnected`], [`Error::StreamNotFound`] (only when the
    /// server confirms that no stream captures the subject),
    /// [`Error::PublishRejected`] (a precondition failed),
    /// [`Error::JetStreamTimeout`], [`Error::JetStreamUnavailable`].
    pub async fn publish_to_stream_with(
        &self,
        subject: impl IntoSubject,
        payload: impl Into<Bytes>,
        mut options: StreamPublishOptions,
    ) -> Result<PublishAck> {
        let subject = subject.into_subject();
        let payload = payload.into();
        let caller_headers = options.headers.take();
        let out = self.prologue(&subject, caller_headers, payload.len(), |traced| {
            options.prepare(traced, self.message_ids())
        })?;
        let (permit, headers) = (out.permit, out.headers);
        // The shared context, or a copy with this call's timeout.
        let with_timeout;
        let js = match options.timeout {
            None => self.jetstream()?,
            Some(timeout) => {
                let mut js = self.jetstream()?.clone();
                js.set_timeout(timeout);
                with_timeout = js;
                &with_timeout
            }
        };
        let retry = options.retry.unwrap_or_else(default_publish_retry);
        let mut outgoing = Outgoing::new(subject, payload, headers, &mut options);
        let result = self
            .settle_publish(
                js,
                &mut outgoing,
                SendPolicy::new(retry, options.timeout),
                self.connection_epoch(),
                None,
            )
            .await;
        permit.record(result)
    }

    /// Sends `outgoing` (its headers carry a message id, so a resend is a
    /// duplicate the stream absorbs) until it is stored or refused for
    /// good: while JetStream is unavailable (no responders during an
    /// election or restart, no ack in time) it is resent with back-off, and
    /// when the connection is replaced while an ack is awaited, at once.
    /// `first`, when given, is the outcome of a send already made (the
    /// pipelined publisher's). `epoch` must be taken before that first
    /// send.
    pub(crate) async fn settle_publish(
        &self,
        js: &async_nats::jetstream::Context,
        outgoing: &mut Outgoing,
        send: SendPolicy,
        mut epoch: tokio::sync::watch::Receiver<u64>,
        mut first: Option<Result<PublishAck>>,
    ) -> Result<PublishAck> {
        let SendPolicy { retry, ack_wait } = send;
        let mut waits = Retry::new(retry.backoff);
        let result = loop {
            let outcome = match first.take() {
                Some(outcome) => outcome,
                None => self.send_once(outgoing, ack_wait, &mut epoch).await,
            };
            let subject = &outgoing.subject;
            if !send_again(&outcome, waits.attempt(), retry.max_retries)
                || self.ensure_open().is_err()
            {
                break outcome;
            }
            tracing::debug!(%subject, attempt = waits.attempt(), "JetStream unavailable; retrying publish");
            self.metrics().retry("stream_publish");
            waits.wait_or_reconnect(&mut epoch).await;
        };
        match result {
            Err(Error::StreamNotFound { .. }) => {
                Err(self.confirm_stream_missing(js, &outgoing.subject).await)
            }
            other => other,
        }
    }

    /// One send of `outgoing` and the wait for its ack.
    async fn send_once(
        &self,
        outgoing: &mut Outgoing,
        ack_wait: Duration,
        epoch: &mut tokio::sync::watch::Receiver<u64>,
    ) -> Result<PublishAck> {
        let conn = self.nats()?;
        let (payload, headers) = outgoing.parts();
        let subject = &outgoing.subject;
        epoch.borrow_and_update();
        let sent = publish_for_ack(conn, subject.clone(), headers.unwrap_or_default(), payload);
        tokio::select! {
            ack = sent => ack.map_err(|e| map_publish(subject, e)),
            () = tokio::time::sleep(ack_wait) => Err(timed_out("publish", format!("no ack within {ack_wait:?}"))),
            // The connection dropped and came back while the ack was
            // awaited: it will never come; resend now.
            _ = epoch.changed() => Err(reconnected()),
        }
    }

    /// After no-responders on a stream publish: asks the server whether a
    /// stream captures `subject`. [`Error::StreamNotFound`] only when it
    /// answers that none does; a stream without a leader (an election) is
    /// [`Error::JetStreamUnavailable`].
    pub(crate) async fn confirm_stream_missing(
        &self,
        js: &async_nats::jetstream::Context,
        subject: &str,
    ) -> Error {
        use async_nats::jetstream::context::GetStreamByNameErrorKind;
        match js.stream_by_subject(subject).await {
            Err(err) if matches!(err.kind(), GetStreamByNameErrorKind::NotFound) => {
                Error::StreamNotFound {
                    stream: None,
                    subject: Some(subject.to_owned()),
                }
            }
            Ok(stream) => unavailable(
                "publish",
                format!("stream {stream:?} captures {subject:?} but did not answer (no leader?)"),
            ),
            Err(err) => unavailable("publish", err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unreachable_jetstream_is_sent_again_within_the_budget() {
        let unavailable = || Err(unavailable("publish", "no responders"));
        assert!(send_again(&unavailable(), 0, 3));
        assert!(send_again(&unavailable(), 2, 3));
        assert!(!send_again(&unavailable(), 3, 3), "budget spent");
        assert!(send_again(&Err(timed_out("publish", "no ack")), 0, 1));
        let missing = Err(Error::StreamNotFound {
            stream: None,
            subject: Some("s".into()),
        });
        assert!(send_again(&missing, 0, 1));
        let refused = Err(Error::InvalidArgument("wrong last sequence".into()));
        assert!(!send_again(&refused, 0, 3), "a refusal is final");
        assert!(!send_again(&Err(Error::Closed), 0, 3));
    }

    /// Every send of a stream publish carries the same headers: the first
    /// the prologue's, each resend rebuilt from the caller's headers, the
    /// expectations and the id.
    #[test]
    fn a_resend_carries_the_first_sends_headers() {
        let mut caller = HeaderMap::new();
        caller.insert("tenant", "acme");
        let ids = MessageIds::new("P");
        let mut options = StreamPublishOptions::new()
            .message_id("id-1")
            .expected_last_sequence(7);
        let built = options.prepare(Some(caller), &ids).expect("valid options");
        let mut outgoing = Outgoing::new("s".into(), Bytes::from_static(b"x"), built, &mut options);
        let sends: Vec<_> = (0..3)
            .map(|_| outgoing.next_headers().unwrap_or_default())
            .collect();
        for headers in &sends {
            assert_eq!(headers.get("tenant").map(|v| v.as_str()), Some("acme"));
            assert_eq!(
                headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .map(|v| v.as_str()),
                Some("id-1")
            );
            assert_eq!(
                headers
                    .get(async_nats::header::NATS_EXPECTED_LAST_SEQUENCE)
                    .map(|v| v.as_str()),
                Some("7")
            );
        }
        let mut plain = StreamPublishOptions::new().message_id("id-2");
        let built = plain.prepare(None, &ids).expect("valid options");
        let mut outgoing = Outgoing::new("s".into(), Bytes::new(), built, &mut plain);
        for _ in 0..2 {
            let headers = outgoing.next_headers().unwrap_or_default();
            assert_eq!(headers.iter().count(), 1, "only the id");
        }
        // Without one, the id is assigned once and every send carries it.
        let mut assigned = StreamPublishOptions::new();
        let built = assigned.prepare(None, &ids).expect("valid options");
        let mut outgoing = Outgoing::new("s".into(), Bytes::new(), built, &mut assigned);
        let id = |h: Option<HeaderMap>| {
            h.and_then(|h| {
                h.get(async_nats::header::NATS_MESSAGE_ID)
                    .map(|v| v.as_str().to_owned())
            })
        };
        let first = id(outgoing.next_headers());
        assert_eq!(first.as_deref().map(str::len), Some(9), "{first:?}");
        assert_eq!(id(outgoing.next_headers()), first);
    }
}
