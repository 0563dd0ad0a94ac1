//! The error type of every natskit operation.

use std::fmt;
use std::time::Duration;

/// An error a request handler returns; the requester receives it as a reply
/// with the `Nats-Service-Error` and `Nats-Service-Error-Code` headers and
/// the body `error: <message>`.
///
/// Any `std::error::Error` converts into it with code 500, so `?` works in
/// handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    /// Error code (HTTP-like; 500 by default).
    pub code: u16,
    /// Human-readable message.
    pub message: String,
}

impl ServiceError {
    /// An error with a code.
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

impl<E: std::error::Error> From<E> for ServiceError {
    fn from(err: E) -> Self {
        Self::new(500, err.to_string())
    }
}

/// A boxed error from user code or a lower layer.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of natskit operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a natskit operation can fail with.
///
/// Match on the variant, or use the `is_*` helpers, which keep working when
/// variants gain fields. [`Error::is_infrastructure`] tells which errors
/// count against the circuit breaker.
///
/// ```
/// # fn handle(err: natskit::Error) {
/// if err.is_circuit_open() {
///     // back off; the error says for how long
/// } else if err.is_not_connected() {
///     // the client reconnects by itself
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The client has no live connection (never connected, or reconnecting).
    #[error("not connected to NATS")]
    NotConnected,
    /// The client was closed; it cannot be used again.
    #[error("client is closed")]
    Closed,
    /// The circuit breaker is open: the call failed fast without touching the
    /// network.
    #[error("circuit breaker is open; retry after {retry_after:?}")]
    CircuitOpen {
        /// How long until the breaker lets a probe through.
        retry_after: Duration,
    },
    /// Connecting did not finish within the connect timeout.
    #[error("connection timed out after {0:?}")]
    ConnectionTimeout(Duration),
    /// Connecting failed (refused, DNS, TLS, authentication...).
    #[error("connect failed: {0}")]
    Connect(#[source] async_nats::ConnectError),
    /// The subject is not valid for this operation.
    #[error("invalid subject {subject:?}: {reason}")]
    InvalidSubject {
        /// The rejected subject.
        subject: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A message header is invalid (an empty name, a name with spaces or
    /// `:`, a value with a line break).
    #[error("invalid header {name:?}: {reason}")]
    InvalidHeader {
        /// The header's name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The payload is larger than the server accepts.
    #[error("payload of {size} bytes exceeds the server maximum of {max} bytes")]
    PayloadTooLarge {
        /// Payload size in bytes.
        size: usize,
        /// The server's `max_payload`.
        max: usize,
    },
    /// A request got no reply in time.
    #[error("request to {subject:?} timed out after {timeout:?}")]
    Timeout {
        /// The request subject.
        subject: String,
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// Nobody is subscribed to the request subject.
    #[error("no responders on {subject:?}")]
    NoResponders {
        /// The request subject.
        subject: String,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// Reading a credentials file or TLS file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Publishing failed in the client.
    #[error("publish failed: {0}")]
    Publish(#[source] async_nats::PublishError),
    /// Subscribing failed in the client.
    #[error("subscribe failed: {0}")]
    Subscribe(#[source] async_nats::SubscribeError),
    /// A request failed for a reason other than a timeout or no responders.
    #[error("request failed: {0}")]
    Request(#[source] async_nats::RequestError),
    /// Draining did not finish within the drain timeout.
    #[error("drain did not finish within {0:?}")]
    DrainTimeout(Duration),
    /// A stream, consumer or bucket name is invalid.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// What was named: "stream", "consumer", "bucket".
        what: &'static str,
        /// The rejected name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// An argument is out of range (a filter outside the
    /// stream's subjects...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A timeout, deadline, interval or TTL of zero: every duration natskit
    /// takes, in a configuration or as an argument, must be above zero.
    #[error("{what} must be above zero")]
    ZeroDuration {
        /// Which duration.
        what: &'static str,
    },
    /// A reply to a message that has no reply subject (it was published,
    /// not requested).
    #[error("the message on {subject:?} has no reply subject")]
    NoReplySubject {
        /// The message's subject.
        subject: String,
    },
    /// No stream has the name, or none captures the subject.
    #[error("stream not found ({})", where_found(.stream, .subject))]
    StreamNotFound {
        /// The stream's name, when a name was asked for.
        stream: Option<String>,
        /// The subject no stream captures, when a subject was published to.
        subject: Option<String>,
    },
    /// A stream exists whose configuration differs in fields that cannot be
    /// updated in place.
    #[error("stream {stream:?} exists with a different {fields:?}, which cannot be updated")]
    StreamConfigConflict {
        /// Stream name.
        stream: String,
        /// The conflicting fields.
        fields: Vec<&'static str>,
    },
    /// A publish precondition (expected last sequence, subject sequence or
    /// message id) did not hold; nothing was stored.
    #[error("publish to {subject:?} rejected: {reason}")]
    PublishRejected {
        /// The subject.
        subject: String,
        /// The server's reason.
        reason: String,
    },
    /// JetStream did not answer: no responders, a timeout, or no leader (a
    /// restart or an election). Counts against the breaker.
    #[error("JetStream unavailable during {op}: {source}")]
    JetStreamUnavailable {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// A JetStream or KV operation got no answer within its timeout (the
    /// server may still have carried it out). Counts against the breaker;
    /// [`is_timeout`](Error::is_timeout) is true.
    #[error("JetStream {op} timed out: {source}")]
    JetStreamTimeout {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The KV bucket does not exist.
    #[error("KV bucket {bucket:?} not found")]
    BucketNotFound {
        /// Bucket name.
        bucket: String,
    },
    /// A KV bucket exists whose configuration differs in fields that cannot
    /// be updated in place.
    #[error("KV bucket {bucket:?} exists with a different {fields:?}, which cannot be updated")]
    BucketConfigConflict {
        /// Bucket name.
        bucket: String,
        /// The conflicting fields.
        fields: Vec<&'static str>,
    },
    /// The key does not exist (never written, deleted or purged).
    #[error("kv: key {key:?} not found")]
    KeyNotFound {
        /// The key.
        key: String,
    },
    /// `create` found the key already present.
    #[error("kv: key {key:?} already exists")]
    KeyExists {
        /// The key.
        key: String,
    },
    /// A compare-and-swap found another revision than expected.
    #[error("kv: revision mismatch on {key:?} (expected {expected}; concurrent update)")]
    RevisionMismatch {
        /// The key.
        key: String,
        /// The revision the update expected.
        expected: u64,
    },
    /// Every attempt of a CAS update met a concurrent write.
    #[error("kv: max retries exceeded on {key:?} after {attempts} attempts")]
    MaxRetriesExceeded {
        /// The key.
        key: String,
        /// Attempts made (retries + 1).
        attempts: u32,
    },
    /// A value is larger than the store's limit.
    #[error("kv: value of {size} bytes exceeds the limit of {max} bytes")]
    ValueTooLarge {
        /// Value size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A KV key is invalid.
    #[error("kv: invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// Why.
        reason: &'static str,
    },
    /// An update closure returned an error; nothing was written.
    #[error("kv: update of {key:?} aborted by the update function: {source}")]
    UpdateAborted {
        /// The key.
        key: String,
        /// The closure's error.
        #[source]
        source: BoxError,
    },
    /// A stored value is not valid JSON for the requested type; nothing was
    /// written.
    #[error("kv: value of {key:?} is not valid JSON for the requested type: {source}")]
    Json {
        /// The key.
        key: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// A stored JSON value is `null` where an object was expected.
    #[error("kv: value of {key:?} is JSON null, expected an object")]
    JsonNull {
        /// The key.
        key: String,
    },
    /// A typed subject could not encode or decode a payload.
    #[error("{codec} {op} failed on {subject:?}: {source}")]
    Codec {
        /// The concrete subject.
        subject: String,
        /// The codec's name.
        codec: &'static str,
        /// "encode" or "decode".
        op: &'static str,
        /// The codec's error.
        #[source]
        source: BoxError,
    },
    /// A typed handler returned an error.
    #[error("handler failed: {source}")]
    Handler {
        /// The handler's error.
        #[source]
        source: BoxError,
    },
    /// A service answered a typed request with an error.
    #[error("service error: {0}")]
    Service(ServiceError),
    /// The durable outbox holds as many messages or bytes as it may: the
    /// message was not stored. Back-pressure: retry once it drained.
    #[error(
        "outbox full: {messages} messages, {bytes} bytes pending (limits {max_messages} messages, {max_bytes} bytes)"
    )]
    OutboxFull {
        /// Messages pending.
        messages: u64,
        /// Bytes pending.
        bytes: u64,
        /// The message limit.
        max_messages: u64,
        /// The byte limit.
        max_bytes: u64,
    },
    /// The disk holding the outbox file is full: the message was not
    /// stored. Back-pressure, like [`Error::OutboxFull`]: forwarding goes on
    /// and frees space, and the same outbox accepts again once there is
    /// room (it reopens its file by itself).
    #[error("outbox disk full: {path} cannot grow; nothing was stored")]
    OutboxDiskFull {
        /// The file.
        path: String,
    },
    /// The outbox's store failed (an I/O error, the file open in another
    /// outbox).
    #[error("outbox {op} failed: {source}")]
    Outbox {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The outbox file is damaged beyond what its store repairs on open.
    #[error("outbox store {path} is corrupted: {reason}")]
    OutboxCorrupted {
        /// The file.
        path: String,
        /// What the store found.
        reason: String,
    },
    /// `flush_outbox` ended before everything stored was acknowledged.
    #[error("outbox flush timed out after {timeout:?} with {pending} messages pending")]
    OutboxFlushTimeout {
        /// The timeout that elapsed.
        timeout: Duration,
        /// Messages still pending.
        pending: u64,
    },
    /// JetStream answered with an error.
    #[error("JetStream {op} failed: {source}")]
    JetStream {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: BoxError,
    },
}

/// How a missing stream was looked for.
fn where_found(stream: &Option<String>, subject: &Option<String>) -> String {
    match (stream, subject) {
        (Some(stream), _) => format!("no stream named {stream:?}"),
        (None, Some(subject)) => format!("no stream captures {subject:?}"),
        (None, None) => "no stream".to_owned(),
    }
}

/// [`Error::ZeroDuration`] for a zero `duration`, named `what`.
pub(crate) fn check_nonzero(what: &'static str, duration: Duration) -> Result<()> {
    if duration.is_zero() {
        return Err(Error::ZeroDuration { what });
    }
    Ok(())
}

impl Error {
    /// The circuit breaker rejected the call.
    pub fn is_circuit_open(&self) -> bool {
        matches!(self, Error::CircuitOpen { .. })
    }

    /// No live connection.
    pub fn is_not_connected(&self) -> bool {
        matches!(self, Error::NotConnected)
    }

    /// The client is closed.
    pub fn is_closed(&self) -> bool {
        matches!(self, Error::Closed)
    }

    /// A timeout: request, connect, or drain.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. }
                | Error::ConnectionTimeout(_)
                | Error::DrainTimeout(_)
                | Error::JetStreamTimeout { .. }
                | Error::OutboxFlushTimeout { .. }
        ) || matches!(self, Error::Connect(e) if e.kind() == async_nats::ConnectErrorKind::TimedOut)
    }

    /// A stream, bucket or key does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Error::StreamNotFound { .. } | Error::BucketNotFound { .. } | Error::KeyNotFound { .. }
        )
    }

    /// A concurrent write won: the key exists, the revision moved on, or a
    /// CAS update ran out of retries.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            Error::KeyExists { .. }
                | Error::RevisionMismatch { .. }
                | Error::MaxRetriesExceeded { .. }
        )
    }

    /// The JetStream API error code the server answered with (10071 wrong
    /// last sequence, 10059 stream not found...), found anywhere in this
    /// error's sources.
    ///
    /// ```
    /// # fn handle(err: natskit::Error) {
    /// if err.jetstream_code() == Some(10_058) {
    ///     // stream name already in use with a different configuration
    /// }
    /// # }
    /// ```
    pub fn jetstream_code(&self) -> Option<u64> {
        use async_nats::jetstream::context::{
            ConsumerInfoError, ConsumerInfoErrorKind, CreateStreamError, CreateStreamErrorKind,
            GetStreamError, GetStreamErrorKind,
        };
        use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
        // async-nats keeps the API error in the error's kind, not always in
        // its sources: look in both.
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(err) = next {
            let api = if let Some(api) = err.downcast_ref::<async_nats::jetstream::Error>() {
                Some(api.clone())
            } else if let Some(e) = err.downcast_ref::<CreateStreamError>() {
                match e.kind() {
                    CreateStreamErrorKind::JetStream(api) => Some(api),
                    _ => None,
                }
            } else if let Some(e) = err.downcast_ref::<GetStreamError>() {
                match e.kind() {
                    GetStreamErrorKind::JetStream(api) => Some(api),
                    _ => None,
                }
            } else if let Some(e) = err.downcast_ref::<ConsumerError>() {
                match e.kind() {
                    ConsumerErrorKind::JetStream(api) => Some(api),
                    _ => None,
                }
            } else if let Some(e) = err.downcast_ref::<ConsumerInfoError>() {
                match e.kind() {
                    ConsumerInfoErrorKind::JetStream(api) => Some(api),
                    _ => None,
                }
            } else {
                None
            };
            if let Some(api) = api {
                return Some(api.error_code().0);
            }
            next = err.source();
        }
        None
    }

    /// The outbox is full, by its limits or because its disk is
    /// (back-pressure; nothing was stored).
    pub fn is_outbox_full(&self) -> bool {
        matches!(
            self,
            Error::OutboxFull { .. } | Error::OutboxDiskFull { .. }
        )
    }

    /// The outbox store is damaged.
    pub fn is_corrupted(&self) -> bool {
        matches!(self, Error::OutboxCorrupted { .. })
    }

    /// Nobody answered a request.
    pub fn is_no_responders(&self) -> bool {
        matches!(self, Error::NoResponders { .. })
    }

    /// Bad input from the caller (subject, payload size, configuration).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::InvalidSubject { .. }
                | Error::InvalidHeader { .. }
                | Error::PayloadTooLarge { .. }
                | Error::InvalidConfig(_)
                | Error::InvalidName { .. }
                | Error::InvalidArgument(_)
                | Error::ZeroDuration { .. }
                | Error::NoReplySubject { .. }
                | Error::InvalidKey { .. }
                | Error::ValueTooLarge { .. }
        )
    }

    /// An outcome that proves nothing about the server, so it never settles
    /// a circuit breaker permit (neither success nor failure): not connected,
    /// closed, the breaker's own rejection, and invalid input (rejected
    /// before any I/O).
    pub fn is_breaker_neutral(&self) -> bool {
        matches!(
            self,
            Error::NotConnected | Error::Closed | Error::CircuitOpen { .. }
        ) || self.is_invalid_input()
    }

    /// Authentication or authorization was refused by the server.
    pub fn is_auth(&self) -> bool {
        matches!(self, Error::Connect(e) if matches!(
            e.kind(),
            async_nats::ConnectErrorKind::AuthorizationViolation
                | async_nats::ConnectErrorKind::Authentication
        ))
    }

    /// Whether this error is an infrastructure failure that counts against
    /// the circuit breaker: connect and I/O errors and timeouts. Answers from
    /// the server (no responders, not found), invalid input, local state
    /// (not connected, closed) and the breaker's own rejection never count.
    pub fn is_infrastructure(&self) -> bool {
        match self {
            Error::ConnectionTimeout(_)
            | Error::Connect(_)
            | Error::Timeout { .. }
            | Error::DrainTimeout(_)
            | Error::JetStreamUnavailable { .. }
            | Error::JetStreamTimeout { .. } => true,
            Error::Publish(e) => matches!(e.kind(), async_nats::client::PublishErrorKind::Send),
            Error::Subscribe(e) => {
                !matches!(e.kind(), async_nats::SubscribeErrorKind::InvalidSubject)
            }
            Error::Request(e) => matches!(e.kind(), async_nats::RequestErrorKind::Other),
            _ => false,
        }
    }
}
