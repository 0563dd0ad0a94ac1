//! How async-nats' JetStream errors read: one classification shared by
//! streams, publishing, consumers, KV and the outbox. It sits in the client
//! layer because several feature folders need it and they never use each
//! other.

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{
    CreateStreamErrorKind, DeleteStreamError, DeleteStreamErrorKind, GetStreamErrorKind,
    PublishErrorKind,
};
use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};

use crate::core::error::{BoxError, Error};

pub(crate) fn unavailable(op: &'static str, err: impl Into<BoxError>) -> Error {
    Error::JetStreamUnavailable {
        op,
        source: err.into(),
    }
}

pub(crate) fn failed(op: &'static str, err: impl Into<BoxError>) -> Error {
    Error::JetStream {
        op,
        source: err.into(),
    }
}

/// Whether a JetStream API error code means "no leader / not ready".
fn is_unavailable_code(code: ErrorCode) -> bool {
    code == ErrorCode::CLUSTER_NOT_AVAILABLE
        || code == ErrorCode::CLUSTER_NO_PEERS
        || code == ErrorCode::JETSTREAM_NOT_ENABLED
        || code.0 == 10_008
        // "duplicate message id is in process" (a clustered stream is still
        // proposing the first copy): a resend later is answered as a
        // duplicate.
        || code.0 == 10_158
}

/// How a failed stream lookup reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    NotFound,
    Unavailable,
    Failed,
}

pub(crate) fn classify_get_stream(kind: &GetStreamErrorKind) -> Lookup {
    match kind {
        GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND => {
            Lookup::NotFound
        }
        GetStreamErrorKind::JetStream(e) if is_unavailable_code(e.error_code()) => {
            Lookup::Unavailable
        }
        GetStreamErrorKind::Request => Lookup::Unavailable,
        _ => Lookup::Failed,
    }
}

pub(crate) fn map_get_stream(
    name: &str,
    err: async_nats::jetstream::context::GetStreamError,
) -> Error {
    match classify_get_stream(&err.kind()) {
        Lookup::NotFound => Error::StreamNotFound {
            stream: Some(name.to_owned()),
            subject: None,
        },
        Lookup::Unavailable => unavailable("get stream", err),
        Lookup::Failed => failed("get stream", err),
    }
}

pub(crate) fn map_create_stream(
    op: &'static str,
    name: &str,
    err: async_nats::jetstream::context::CreateStreamError,
) -> Error {
    match err.kind() {
        CreateStreamErrorKind::JetStreamUnavailable | CreateStreamErrorKind::TimedOut => {
            unavailable(op, err)
        }
        CreateStreamErrorKind::JetStream(e) if is_unavailable_code(e.error_code()) => {
            unavailable(op, err)
        }
        CreateStreamErrorKind::NotFound => Error::StreamNotFound {
            stream: Some(name.to_owned()),
            subject: None,
        },
        _ => failed(op, err),
    }
}

/// A deleted stream's outcome: `Ok(false)` when it did not exist.
pub(crate) fn map_delete_stream(err: DeleteStreamError) -> Result<bool, Error> {
    match err.kind() {
        DeleteStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND => {
            Ok(false)
        }
        DeleteStreamErrorKind::Request => Err(unavailable("delete stream", err)),
        _ => Err(failed("delete stream", err)),
    }
}

/// Whether a consumer API error says the consumer does not exist.
pub(crate) fn is_consumer_not_found(kind: &ConsumerErrorKind) -> bool {
    matches!(kind, ConsumerErrorKind::JetStream(e)
        if e.error_code() == ErrorCode::CONSUMER_NOT_FOUND)
}

/// A failed consumer call: no answer is `JetStreamUnavailable`, any
/// answer `JetStream`.
pub(crate) fn map_consumer(op: &'static str, err: ConsumerError) -> Error {
    match err.kind() {
        ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request => unavailable(op, err),
        _ => failed(op, err),
    }
}

pub(crate) fn timed_out(op: &'static str, err: impl Into<BoxError>) -> Error {
    Error::JetStreamTimeout {
        op,
        source: err.into(),
    }
}

/// What a failed JetStream publish means, read from the error and its
/// sources (a KV write error wraps the publish error that caused it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PublishFault {
    /// No ack in time: the message may or may not be stored.
    Timeout,
    /// No responders: no stream captures the subject, or its leader is
    /// being elected.
    NoResponders,
    /// The connection dropped, or no leader answered: nothing is known.
    Unavailable,
    /// An expected-last-sequence precondition failed: 10071, or 10164 (a
    /// clustered stream with another update to the subject in flight).
    Conflict,
    /// The expected last message id did not match.
    WrongMessageId,
    /// The message exceeds the server's maximum payload.
    TooLarge,
    /// Any other answer.
    Other,
}

/// JetStream API error codes of a precondition on the last sequence.
const WRONG_LAST_SEQUENCE: u64 = 10_071;
const WRONG_LAST_SEQUENCE_IN_FLIGHT: u64 = 10_164;

pub(crate) fn classify_publish(err: &(dyn std::error::Error + 'static)) -> PublishFault {
    use async_nats::jetstream::context::PublishError;
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(publish) = e.downcast_ref::<PublishError>() {
            match publish.kind() {
                PublishErrorKind::TimedOut => return PublishFault::Timeout,
                PublishErrorKind::StreamNotFound => return PublishFault::NoResponders,
                PublishErrorKind::WrongLastSequence => return PublishFault::Conflict,
                PublishErrorKind::WrongLastMessageId => return PublishFault::WrongMessageId,
                PublishErrorKind::BrokenPipe | PublishErrorKind::MaxAckPending => {
                    return PublishFault::Unavailable;
                }
                PublishErrorKind::MaxPayloadExceeded => return PublishFault::TooLarge,
                _ => {}
            }
        }
        if let Some(api) = e.downcast_ref::<async_nats::jetstream::Error>() {
            let code = api.error_code();
            return if code.0 == WRONG_LAST_SEQUENCE || code.0 == WRONG_LAST_SEQUENCE_IN_FLIGHT {
                PublishFault::Conflict
            } else if is_unavailable_code(code) {
                PublishFault::Unavailable
            } else {
                PublishFault::Other
            };
        }
        next = e.source();
    }
    PublishFault::Other
}

pub(crate) fn map_publish(
    subject: &str,
    err: async_nats::jetstream::context::PublishError,
) -> Error {
    match classify_publish(&err) {
        // Confirmed (or not) by the caller: see `confirm_stream_missing`.
        PublishFault::NoResponders => Error::StreamNotFound {
            stream: None,
            subject: Some(subject.to_owned()),
        },
        PublishFault::Conflict | PublishFault::WrongMessageId => Error::PublishRejected {
            subject: subject.to_owned(),
            reason: err.to_string(),
        },
        PublishFault::Timeout => timed_out("publish", err),
        PublishFault::Unavailable => unavailable("publish", err),
        PublishFault::TooLarge | PublishFault::Other => failed("publish", err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::context::PublishError;

    fn api_error(code: u64) -> async_nats::jetstream::Error {
        serde_json::from_str(&format!(
            r#"{{"code":400,"err_code":{code},"description":"test"}}"#
        ))
        .expect("an API error")
    }

    #[test]
    fn both_wrong_last_sequence_codes_are_conflicts() {
        for code in [10_071, 10_164] {
            let err = PublishError::with_source(PublishErrorKind::Other, api_error(code));
            assert_eq!(classify_publish(&err), PublishFault::Conflict, "{code}");
        }
        let err = PublishError::with_source(PublishErrorKind::Other, api_error(10_999));
        assert_eq!(classify_publish(&err), PublishFault::Other);
    }

    #[test]
    fn publish_faults_by_kind_and_through_wrappers() {
        let cases = [
            (PublishErrorKind::TimedOut, PublishFault::Timeout),
            (PublishErrorKind::StreamNotFound, PublishFault::NoResponders),
            (PublishErrorKind::WrongLastSequence, PublishFault::Conflict),
            (PublishErrorKind::BrokenPipe, PublishFault::Unavailable),
            (PublishErrorKind::MaxPayloadExceeded, PublishFault::TooLarge),
        ];
        for (kind, fault) in cases {
            assert_eq!(classify_publish(&PublishError::new(kind)), fault);
            // A KV put error wraps the publish error as its source.
            let wrapped = async_nats::jetstream::kv::PutError::with_source(
                async_nats::jetstream::kv::PutErrorKind::Publish,
                PublishError::new(kind),
            );
            assert_eq!(classify_publish(&wrapped), fault);
        }
        assert!(map_publish("s", PublishError::new(PublishErrorKind::TimedOut)).is_timeout());
    }
}
