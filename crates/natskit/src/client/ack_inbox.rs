//! Stream publish acks without async-nats' per-publish request machinery:
//! an inbox of reply subjects numbered per send ([`AckInbox`], pure), the
//! reading of an ack ([`read_ack`], pure), the batch read of an inbox
//! subscription ([`take_replies`]), and one write as a plain async-nats
//! request ([`publish_for_ack`]).
//!
//! async-nats' `send_publish` makes every publish a request of its own: an
//! inbox name formatted per message, a one-shot channel, an ack-permit, a
//! timer around the send and another around the ack, a boxed future, and
//! an untagged `serde` parse of the ack that first fails as an error
//! (formatting that error's message) and then parses again as an ack. On
//! the 256-in-flight path that was about 9,600 instructions of the 20,700 a
//! message cost raw async-nats (callgrind). A [`StreamPublisher`] instead
//! sends each message as a core publish whose reply subject is one of its
//! own inbox's (`<inbox>.<index in hex>`), reads every first ack from one
//! subscription to `<inbox>.*`, and keeps one timer for all of them. The
//! ack's meaning is read exactly as async-nats reads it ([`ack_outcome`]).
//!
//! The outbox's forwarder sends and reads its acks the same way;
//! `publish_to_stream` and KV writes, one at a time, use
//! [`publish_for_ack`].
//!
//! [`StreamPublisher`]: crate::StreamPublisher

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, ErrorCode};
use bytes::Bytes;
use futures_util::StreamExt;

/// A publisher's inbox: `_INBOX.<nuid>` (from `new_inbox`).
#[derive(Debug)]
pub(crate) struct AckInbox {
    /// The inbox and a dot: every reply subject starts with it.
    prefix: String,
}

impl AckInbox {
    /// Replies under `inbox` (a name from `async_nats::Client::new_inbox`).
    pub(crate) fn new(inbox: &str) -> Self {
        Self {
            prefix: format!("{inbox}."),
        }
    }

    /// The subject to subscribe to: every reply subject of this inbox.
    pub(crate) fn wildcard(&self) -> String {
        format!("{}*", self.prefix)
    }

    /// The reply subject of message `index`.
    fn reply(&self, index: u64) -> async_nats::Subject {
        let digits = hex_digits(index);
        // Exactly the length: a `Bytes` made from a full vector keeps it
        // without copying.
        let mut text = String::with_capacity(self.prefix.len() + digits);
        text.push_str(&self.prefix);
        for shift in (0..digits).rev() {
            let nibble = (index >> (shift * 4)) & 0xf;
            text.push(char::from(HEX[nibble as usize]));
        }
        async_nats::Subject::from(text)
    }

    /// Publishes message `index` on `conn` with its reply subject here
    /// (queued, like any core publish): async-nats' own future, not one
    /// around it.
    #[inline(always)]
    pub(crate) fn publish<'a>(
        &self,
        conn: &'a async_nats::Client,
        index: u64,
        subject: async_nats::Subject,
        headers: Option<HeaderMap>,
        payload: Bytes,
    ) -> impl std::future::Future<Output = Result<(), async_nats::PublishError>> + Send + 'a {
        use futures_util::future::Either;
        let reply = self.reply(index);
        match headers {
            Some(headers) => {
                Either::Left(conn.publish_with_reply_and_headers(subject, reply, headers, payload))
            }
            None => Either::Right(conn.publish_with_reply(subject, reply, payload)),
        }
    }

    /// The index of the message a reply subject of this inbox answers;
    /// `None` for any other subject.
    pub(crate) fn index_of(&self, subject: &str) -> Option<u64> {
        let token = subject.strip_prefix(self.prefix.as_str())?;
        if token.is_empty() || token.len() > 16 {
            return None;
        }
        token.bytes().try_fold(0u64, |n, byte| {
            let digit = match byte {
                b'0'..=b'9' => byte - b'0',
                b'a'..=b'f' => byte - b'a' + 10,
                _ => return None,
            };
            Some(n << 4 | u64::from(digit))
        })
    }
}

/// The replies ready on the inbox, up to a batch: `Ready(true)` when some
/// were taken, `Ready(false)` when the subscription ended.
pub(crate) fn take_replies(
    replies: &mut async_nats::Subscriber,
    cx: &mut std::task::Context<'_>,
    taken: &mut Vec<async_nats::Message>,
) -> std::task::Poll<bool> {
    const BATCH: usize = 64;
    while taken.len() < BATCH {
        match replies.poll_next_unpin(cx) {
            std::task::Poll::Ready(Some(message)) => taken.push(message),
            std::task::Poll::Ready(None) => return std::task::Poll::Ready(!taken.is_empty()),
            std::task::Poll::Pending => break,
        }
    }
    if taken.is_empty() {
        std::task::Poll::Pending
    } else {
        std::task::Poll::Ready(true)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Hex digits of `n`, without leading zeros (one for zero).
fn hex_digits(n: u64) -> usize {
    (64 - (n | 1).leading_zeros() as usize).div_ceil(4)
}

/// What an ack (or its absence) says about the message it answers, as
/// async-nats' `PublishAckFuture` reads it: no responders is
/// `StreamNotFound`; a reply with an `error` is a refusal (a wrong last
/// message id or sequence by their codes); a reply with a stream and a
/// sequence is stored; anything else is `Other`. One pass of a plain
/// struct instead of async-nats' untagged enum (about 3,500 instructions,
/// most of them the failed first try).
pub(crate) fn ack_outcome(message: &async_nats::Message) -> Result<(), PublishError> {
    read_ack::<serde::de::IgnoredAny>(message).map(|_| ())
}

/// A stored message's ack: the stream (read as `S`; `IgnoredAny` skips
/// it), the sequence, whether it was a duplicate, and what else it may
/// name.
#[derive(Debug)]
pub(crate) struct Stored<S> {
    pub(crate) stream: S,
    pub(crate) sequence: u64,
    pub(crate) duplicate: bool,
    pub(crate) domain: Option<String>,
    pub(crate) value: Option<String>,
}

impl Stored<String> {
    /// As async-nats' own type. (An atomic batch's fields, which natskit's
    /// publishes never ask for, stay empty.)
    pub(crate) fn into_publish_ack(self) -> PublishAck {
        PublishAck {
            stream: self.stream,
            sequence: self.sequence,
            domain: self.domain.unwrap_or_default(),
            duplicate: self.duplicate,
            value: self.value,
            ..PublishAck::default()
        }
    }
}

/// One stream publish as an async-nats request (on its shared reply
/// subscription, with no timer of its own: the caller bounds the wait),
/// its ack read as [`read_ack`] reads it. async-nats' `send_publish` adds
/// an ack permit, two timers, a boxed future and its ack parse (about
/// 4,000 instructions a write more, callgrind).
pub(crate) async fn publish_for_ack(
    conn: &async_nats::Client,
    subject: impl async_nats::subject::ToSubject,
    headers: HeaderMap,
    payload: Bytes,
) -> Result<PublishAck, PublishError> {
    let request = async_nats::Request::new()
        .payload(payload)
        .headers(headers)
        .timeout(None);
    let reply = conn
        .send_request(subject, request)
        .await
        .map_err(request_failed)?;
    read_ack::<String>(&reply).map(Stored::into_publish_ack)
}

/// A failed request as the publish error async-nats' `send_publish`
/// would have given: no responders is `StreamNotFound`, a reply channel
/// dropped (the connection went) `BrokenPipe`.
fn request_failed(err: async_nats::RequestError) -> PublishError {
    use async_nats::RequestErrorKind;
    match err.kind() {
        RequestErrorKind::NoResponders => PublishError::new(PublishErrorKind::StreamNotFound),
        RequestErrorKind::MaxPayloadExceeded => {
            PublishError::with_source(PublishErrorKind::MaxPayloadExceeded, err)
        }
        RequestErrorKind::TimedOut => PublishError::with_source(PublishErrorKind::TimedOut, err),
        RequestErrorKind::Other
            if std::error::Error::source(&err)
                .is_some_and(|s| s.is::<tokio::sync::oneshot::error::RecvError>()) =>
        {
            PublishError::with_source(PublishErrorKind::BrokenPipe, err)
        }
        _ => PublishError::with_source(PublishErrorKind::Other, err),
    }
}

/// Reads an ack as [`ack_outcome`] does, keeping what a stored message's
/// ack says.
pub(crate) fn read_ack<S: serde::de::DeserializeOwned>(
    message: &async_nats::Message,
) -> Result<Stored<S>, PublishError> {
    if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
        return Err(PublishError::new(PublishErrorKind::StreamNotFound));
    }
    let reply: AckReply<S> = serde_json::from_slice(&message.payload)
        .map_err(|err| PublishError::with_source(PublishErrorKind::Other, err))?;
    match reply {
        AckReply {
            error: Some(error), ..
        } => Err(match error.error_code() {
            ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID => {
                PublishError::with_source(PublishErrorKind::WrongLastMessageId, error)
            }
            ErrorCode::STREAM_WRONG_LAST_SEQUENCE => {
                PublishError::with_source(PublishErrorKind::WrongLastSequence, error)
            }
            _ => PublishError::with_source(PublishErrorKind::Other, error),
        }),
        AckReply {
            stream: Some(stream),
            seq: Some(sequence),
            duplicate,
            domain,
            val,
            ..
        } => Ok(Stored {
            stream,
            sequence,
            duplicate,
            domain,
            value: val,
        }),
        AckReply { .. } => Err(PublishError::with_source(
            PublishErrorKind::Other,
            "an ack without a stream and a sequence",
        )),
    }
}

/// The fields of a publish ack that say how it went; the rest is skipped.
#[derive(serde::Deserialize)]
#[serde(bound = "S: serde::de::DeserializeOwned")]
struct AckReply<S> {
    #[serde(default)]
    error: Option<jetstream::Error>,
    #[serde(default)]
    stream: Option<S>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    val: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn reply(status: Option<u16>, payload: &'static str) -> async_nats::Message {
        async_nats::Message {
            subject: "_INBOX.x.1".into(),
            reply: None,
            payload: Bytes::from_static(payload.as_bytes()),
            headers: None,
            status: status.and_then(|s| async_nats::StatusCode::from_u16(s).ok()),
            description: None,
            length: payload.len(),
        }
    }

    /// A write's request failures mean what `send_publish`'s errors
    /// meant, so `classify_publish` reads them as before: no responders,
    /// too large, and a reply channel dropped with the connection.
    #[test]
    fn failed_requests_are_read_as_publish_errors() {
        use async_nats::{RequestError, RequestErrorKind};
        use futures_util::FutureExt as _;
        let kind = |err| request_failed(err).kind();
        let cases = [
            (
                RequestErrorKind::NoResponders,
                PublishErrorKind::StreamNotFound,
            ),
            (
                RequestErrorKind::MaxPayloadExceeded,
                PublishErrorKind::MaxPayloadExceeded,
            ),
            (RequestErrorKind::TimedOut, PublishErrorKind::TimedOut),
            (RequestErrorKind::Other, PublishErrorKind::Other),
        ];
        for (request, publish) in cases {
            assert_eq!(kind(RequestError::with_source(request, "x")), publish);
        }
        let (sender, receiver) = tokio::sync::oneshot::channel::<()>();
        drop(sender);
        let dropped = receiver
            .now_or_never()
            .and_then(Result::err)
            .expect("a dropped sender");
        let err = RequestError::with_source(RequestErrorKind::Other, dropped);
        assert_eq!(kind(err), PublishErrorKind::BrokenPipe);
    }

    #[test]
    fn reply_subjects_carry_the_index_and_nothing_else_matches() {
        let inbox = AckInbox::new("_INBOX.abc");
        assert_eq!(inbox.wildcard(), "_INBOX.abc.*");
        for index in [0, 1, 15, 16, 255, 4096, u64::from(u32::MAX), u64::MAX] {
            let subject = inbox.reply(index);
            assert_eq!(subject.as_str(), format!("_INBOX.abc.{index:x}"));
            assert_eq!(inbox.index_of(&subject), Some(index), "{subject}");
        }
        for other in [
            "_INBOX.abc.",
            "_INBOX.abc.1g",
            "_INBOX.abc.1.2",
            "_INBOX.abd.1",
            "_INBOX.abc.10000000000000000",
            "_INBOX.abc.A",
            "events.1",
        ] {
            assert_eq!(inbox.index_of(other), None, "{other}");
        }
    }

    #[test]
    fn acks_are_read_as_async_nats_reads_them() {
        assert!(ack_outcome(&reply(None, r#"{"stream":"S","seq":7}"#)).is_ok());
        assert!(
            ack_outcome(&reply(
                None,
                r#"{"stream":"S","seq":7,"domain":"hub","duplicate":true,"val":"1"}"#
            ))
            .is_ok()
        );
        let kind = |status, payload| {
            ack_outcome(&reply(status, payload))
                .expect_err("an error")
                .kind()
        };
        assert_eq!(kind(Some(503), ""), PublishErrorKind::StreamNotFound);
        // The server sends the stream (and a zero sequence) with an error.
        let refused = r#"{"stream":"S","seq":0,"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"}}"#;
        assert_eq!(kind(None, refused), PublishErrorKind::WrongLastSequence);
        let wrong_id =
            r#"{"error":{"code":400,"err_code":10070,"description":"wrong last msg ID: a"}}"#;
        assert_eq!(kind(None, wrong_id), PublishErrorKind::WrongLastMessageId);
        let other =
            r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#;
        assert_eq!(kind(None, other), PublishErrorKind::Other);
        assert_eq!(kind(None, r#"{"stream":"S"}"#), PublishErrorKind::Other);
        assert_eq!(kind(None, ""), PublishErrorKind::Other);
        assert_eq!(kind(None, "not json"), PublishErrorKind::Other);
    }

    #[test]
    fn a_stored_messages_ack_keeps_what_it_names() {
        let read = |payload| read_ack::<String>(&reply(None, payload)).expect("stored");
        let first = read(r#"{"stream":"ORDERS","seq":12,"domain":"hub"}"#);
        assert_eq!(
            (first.stream.as_str(), first.sequence, first.duplicate),
            ("ORDERS", 12, false)
        );
        let again = read(r#"{"stream":"ORDERS","seq":12,"duplicate":true}"#);
        assert_eq!(
            (again.stream.as_str(), again.sequence, again.duplicate),
            ("ORDERS", 12, true)
        );
        let ack = read(r#"{"stream":"C","seq":3,"domain":"hub","val":"42"}"#).into_publish_ack();
        let expected = PublishAck {
            stream: "C".into(),
            sequence: 3,
            domain: "hub".into(),
            value: Some("42".into()),
            ..PublishAck::default()
        };
        assert_eq!(ack, expected);
    }
}
