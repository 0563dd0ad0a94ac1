//! Typed subjects: a subject pattern bound to a payload type and a codec.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::Message;
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::Client;
use crate::client::handler::{Handler, HandlerFuture, HandlerOutcome};
use crate::core::error::ServiceError;
use crate::core::error::{BoxError, Error, Result};
use crate::jetstream::consumer::{ConsumerHandle, StreamConsumerConfig};
use crate::jetstream::{PublishAck, StreamPublishOptions};
use crate::messaging::pubsub::{SubscribeOptions, Subscription};

/// Encodes and decodes payloads of type `T`.
pub trait Codec<T>: Send + Sync + 'static {
    /// Name used in errors and logs.
    const NAME: &'static str;
    /// Encodes a value.
    ///
    /// # Errors
    /// The value cannot be represented.
    fn encode(&self, value: &T) -> std::result::Result<Bytes, BoxError>;
    /// Decodes a value.
    ///
    /// # Errors
    /// The bytes are not a valid `T`.
    fn decode(&self, bytes: &[u8]) -> std::result::Result<T, BoxError>;
}

/// Deepest nesting a codec decodes (serde_json's own limit): deeper input
/// is a decode error, never a stack overflow.
pub const MAX_DECODE_DEPTH: usize = 128;

/// JSON through `serde_json` (the default codec); nesting is limited to
/// [`MAX_DECODE_DEPTH`] levels.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl<T: Serialize + DeserializeOwned> Codec<T> for JsonCodec {
    const NAME: &'static str = "json";

    fn encode(&self, value: &T) -> std::result::Result<Bytes, BoxError> {
        Ok(serde_json::to_vec(value)?.into())
    }

    fn decode(&self, bytes: &[u8]) -> std::result::Result<T, BoxError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// MessagePack through `rmp-serde` (cargo feature `msgpack`), with field
/// names, so it decodes like JSON would.
#[cfg(feature = "msgpack")]
#[derive(Debug, Clone, Copy, Default)]
pub struct MsgPackCodec;

#[cfg(feature = "msgpack")]
impl<T: Serialize + DeserializeOwned> Codec<T> for MsgPackCodec {
    const NAME: &'static str = "msgpack";

    fn encode(&self, value: &T) -> std::result::Result<Bytes, BoxError> {
        Ok(rmp_serde::to_vec_named(value)?.into())
    }

    fn decode(&self, bytes: &[u8]) -> std::result::Result<T, BoxError> {
        // rmp-serde allows 1,024 levels, which overflows a 2 MiB tokio
        // worker stack in a debug build; use serde_json's limit instead.
        let mut decoder = rmp_serde::Deserializer::from_read_ref(bytes);
        decoder.set_max_depth(MAX_DECODE_DEPTH);
        Ok(serde::Deserialize::deserialize(&mut decoder)?)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Token(String),
}

/// A parsed subject template such as `orders.{region}.created`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template {
    pattern: String,
    parts: Vec<Part>,
    wildcard: String,
}

impl Template {
    fn parse(pattern: &str) -> Result<Self> {
        let mut parts = Vec::new();
        let mut wildcard = Vec::new();
        for token in pattern.split('.') {
            if let Some(name) = token.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(Error::InvalidSubject {
                        subject: pattern.to_owned(),
                        reason: "template token names are letters, digits and _",
                    });
                }
                parts.push(Part::Token(name.to_owned()));
                wildcard.push("*");
            } else {
                if token.contains(['{', '}']) {
                    return Err(Error::InvalidSubject {
                        subject: pattern.to_owned(),
                        reason: "a template token must be a whole token, like {name}",
                    });
                }
                parts.push(Part::Literal(token.to_owned()));
                wildcard.push(token);
            }
        }
        let wildcard = wildcard.join(".");
        crate::core::subject::validate_subscribe(&wildcard)?;
        Ok(Self {
            pattern: pattern.to_owned(),
            parts,
            wildcard,
        })
    }

    fn has_tokens(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Token(_)))
    }

    fn fill(&self, values: &[(&str, &str)]) -> Result<String> {
        let mut out = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            match part {
                Part::Literal(literal) => out.push(literal.as_str()),
                Part::Token(name) => {
                    let value = values
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| *v)
                        .ok_or_else(|| {
                            Error::InvalidArgument(format!(
                                "template token {{{name}}} has no value"
                            ))
                        })?;
                    if value.is_empty()
                        || value.contains(['.', '*', '>'])
                        || value.bytes().any(|b| b.is_ascii_whitespace())
                    {
                        return Err(Error::InvalidArgument(format!(
                            "value {value:?} for template token {{{name}}} must be one non-empty token without wildcards"
                        )));
                    }
                    out.push(value);
                }
            }
        }
        let subject = out.join(".");
        crate::core::subject::validate_publish(&subject)?;
        Ok(subject)
    }
}

/// Called with every decode or handler error of a typed subscription.
pub type ErrorHook = Arc<dyn Fn(&Error) + Send + Sync>;

/// A subject pattern bound to a payload type `T` and a codec.
///
/// Patterns may contain named tokens (`orders.{region}.created`): filled
/// with [`publish_filled`](Self::publish_filled) and turned into `*` wildcards
/// for subscriptions. Decode and handler errors are never dropped silently:
/// they are counted ([`errors`](Self::errors)), logged, and passed to the
/// [`on_error`](Self::on_error) hook.
///
/// ```no_run
/// use natskit::TypedSubject;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct OrderCreated { id: u64 }
///
/// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
/// let created: TypedSubject<OrderCreated> = TypedSubject::new("orders.{region}.created")?;
/// let sub = created
///     .subscribe(&client, |order: OrderCreated| async move { println!("order {}", order.id) })
///     .await?; // subscribes to orders.*.created
/// created.publish_filled(&client, &[("region", "eu")], &OrderCreated { id: 7 }).await?;
/// # sub.drain().await; Ok(()) }
/// ```
pub struct TypedSubject<T, C = JsonCodec> {
    template: Arc<Template>,
    codec: Arc<C>,
    on_error: Option<ErrorHook>,
    terminate_undecodable: bool,
    errors: Arc<AtomicU64>,
    _payload: PhantomData<fn() -> T>,
}

impl<T, C> Clone for TypedSubject<T, C> {
    fn clone(&self) -> Self {
        Self {
            template: self.template.clone(),
            codec: self.codec.clone(),
            on_error: self.on_error.clone(),
            terminate_undecodable: self.terminate_undecodable,
            errors: self.errors.clone(),
            _payload: PhantomData,
        }
    }
}

impl<T, C> std::fmt::Debug for TypedSubject<T, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedSubject")
            .field("pattern", &self.template.pattern)
            .field("type", &std::any::type_name::<T>())
            .field("errors", &self.errors())
            .finish()
    }
}

impl<T> TypedSubject<T, JsonCodec> {
    /// A JSON subject for `pattern`.
    ///
    /// # Errors
    /// [`Error::InvalidSubject`] for a malformed pattern.
    pub fn new(pattern: &str) -> Result<Self> {
        Self::with_codec(pattern, JsonCodec)
    }
}

impl<T, C> TypedSubject<T, C> {
    /// A subject for `pattern` with `codec`.
    ///
    /// # Errors
    /// [`Error::InvalidSubject`] for a malformed pattern.
    pub fn with_codec(pattern: &str, codec: C) -> Result<Self> {
        Ok(Self {
            template: Arc::new(Template::parse(pattern)?),
            codec: Arc::new(codec),
            on_error: None,
            terminate_undecodable: true,
            errors: Arc::new(AtomicU64::new(0)),
            _payload: PhantomData,
        })
    }

    /// Calls `hook` with every decode or handler error.
    pub fn on_error(mut self, hook: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.on_error = Some(Arc::new(hook));
        self
    }

    /// Whether a JetStream message that cannot be decoded is terminated
    /// (default) or naked for redelivery.
    pub fn terminate_undecodable(mut self, terminate: bool) -> Self {
        self.terminate_undecodable = terminate;
        self
    }

    /// The pattern as written.
    pub fn pattern(&self) -> &str {
        &self.template.pattern
    }

    /// The subscription subject: template tokens as `*`.
    pub fn wildcard(&self) -> &str {
        &self.template.wildcard
    }

    /// The concrete subject with template tokens filled.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a missing or invalid token value.
    pub fn fill(&self, tokens: &[(&str, &str)]) -> Result<String> {
        self.template.fill(tokens)
    }

    /// Decode and handler errors so far (shared by clones).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn report(&self, err: &Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(subject = %self.template.pattern, %err, "typed subject error");
        if let Some(hook) = &self.on_error {
            hook(err);
        }
    }

    fn concrete(&self) -> Result<String> {
        if self.template.has_tokens() {
            return Err(Error::InvalidArgument(format!(
                "subject {:?} has template tokens: use publish_filled",
                self.template.pattern
            )));
        }
        Ok(self.template.pattern.clone())
    }
}

fn codec_error<C, T>(subject: &str, op: &'static str, source: BoxError) -> Error
where
    C: Codec<T>,
{
    Error::Codec {
        subject: subject.to_owned(),
        codec: C::NAME,
        op,
        source,
    }
}

impl<T, C> TypedSubject<T, C>
where
    T: Send + 'static,
    C: Codec<T>,
{
    fn encode(&self, subject: &str, value: &T) -> Result<Bytes> {
        self.codec
            .encode(value)
            .map_err(|e| codec_error::<C, T>(subject, "encode", e))
    }

    fn decode(&self, subject: &str, bytes: &[u8]) -> Result<T> {
        self.codec
            .decode(bytes)
            .map_err(|e| codec_error::<C, T>(subject, "decode", e))
    }

    /// Publishes `value` (a subject without template tokens).
    ///
    /// # Errors
    /// [`Error::Codec`] when encoding fails, and the errors of [`Client::publish`].
    pub async fn publish(&self, client: &Client, value: &T) -> Result<()> {
        let subject = self.concrete()?;
        let payload = self.encode(&subject, value)?;
        client.publish(subject, payload).await
    }

    /// Publishes `value` with the template tokens filled from `tokens`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a missing or invalid token value, and
    /// the errors of [`publish`](Self::publish).
    pub async fn publish_filled(
        &self,
        client: &Client,
        tokens: &[(&str, &str)],
        value: &T,
    ) -> Result<()> {
        let subject = self.fill(tokens)?;
        let payload = self.encode(&subject, value)?;
        client.publish(subject, payload).await
    }

    /// Publishes `value` to a stream and waits for the ack.
    ///
    /// # Errors
    /// [`Error::Codec`], and the errors of [`Client::publish_to_stream_with`].
    pub async fn publish_to_stream(&self, client: &Client, value: &T) -> Result<PublishAck> {
        let subject = self.concrete()?;
        let payload = self.encode(&subject, value)?;
        client
            .publish_to_stream_with(subject, payload, StreamPublishOptions::new())
            .await
    }

    /// Subscribes to the pattern (tokens as wildcards); the handler gets
    /// decoded values. Undecodable messages and handler errors are counted,
    /// logged and passed to the error hook.
    ///
    /// # Errors
    /// The errors of [`Client::subscribe`].
    pub async fn subscribe<F, Fut>(&self, client: &Client, handler: F) -> Result<Subscription>
    where
        F: Handler<T, Fut>,
        Fut: HandlerFuture,
    {
        let handler = Arc::new(handler);
        self.subscribe_full(client, move |_msg, value| {
            let handler = handler.clone();
            async move { handler(value).await }
        })
        .await
    }

    /// Like [`subscribe`](Self::subscribe), with the raw message too
    /// (subject, headers, reply).
    ///
    /// # Errors
    /// The errors of [`Client::subscribe`].
    pub async fn subscribe_full<F, Fut>(&self, client: &Client, handler: F) -> Result<Subscription>
    where
        F: Fn(Message, T) -> Fut + Send + Sync + 'static,
        Fut: HandlerFuture,
    {
        let handler = Arc::new(handler);
        let this = self.clone();
        client
            .subscribe_with(
                self.wildcard().to_owned(),
                SubscribeOptions::new(),
                move |msg: Message| {
                    let (handler, this) = (handler.clone(), this.clone());
                    async move {
                        match this.decode(&msg.subject, &msg.payload) {
                            Ok(value) => {
                                if let Err(err) = handler(msg, value).await.into_result() {
                                    this.report(&Error::Handler { source: err });
                                }
                            }
                            Err(err) => this.report(&err),
                        }
                    }
                },
            )
            .await
    }

    /// Sends a typed request and decodes the typed reply.
    ///
    /// # Errors
    /// [`Error::Codec`] (either direction), a service error reply as
    /// [`Error::Service`], and the errors of [`Client::request_timeout`].
    pub async fn request<R>(&self, client: &Client, value: &T, timeout: Duration) -> Result<R>
    where
        C: Codec<R>,
    {
        let subject = self.concrete()?;
        let payload = self.encode(&subject, value)?;
        let reply = client
            .request_timeout(subject.clone(), payload, timeout)
            .await?;
        <C as Codec<R>>::decode(&self.codec, &reply)
            .map_err(|e| codec_error::<C, R>(&subject, "decode", e))
    }

    /// Serves typed requests: the handler's `Ok` value is encoded as the
    /// reply; an undecodable request is answered with a 400 service error.
    ///
    /// # Errors
    /// The errors of [`Client::serve`].
    pub async fn serve<R, F, Fut>(
        &self,
        client: &Client,
        options: SubscribeOptions,
        handler: F,
    ) -> Result<Subscription>
    where
        C: Codec<R>,
        R: Send + 'static,
        F: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, ServiceError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let this = self.clone();
        client
            .serve(self.wildcard().to_owned(), options, move |msg: Message| {
                let (handler, this) = (handler.clone(), this.clone());
                async move {
                    let value = this.decode(&msg.subject, &msg.payload).map_err(|err| {
                        this.report(&err);
                        ServiceError::new(400, err.to_string())
                    })?;
                    let reply = handler(value).await?;
                    <C as Codec<R>>::encode(&this.codec, &reply).map_err(|e| {
                        let err = codec_error::<C, R>(&msg.subject, "encode", e);
                        this.report(&err);
                        ServiceError::new(500, err.to_string())
                    })
                }
            })
            .await
    }

    /// Consumes a stream with decoded values. An undecodable message is
    /// counted, reported, and terminated (or naked, see
    /// [`terminate_undecodable`](Self::terminate_undecodable)) instead of
    /// being redelivered forever. The handler acknowledges decoded messages.
    ///
    /// # Errors
    /// The errors of [`Client::consume_with`].
    pub async fn consume<F, Fut>(
        &self,
        client: &Client,
        config: StreamConsumerConfig,
        handler: F,
    ) -> Result<ConsumerHandle>
    where
        F: Fn(jetstream::Message, T) -> Fut + Send + Sync + 'static,
        Fut: HandlerFuture,
    {
        let handler = Arc::new(handler);
        let this = self.clone();
        client
            .consume_with(config, move |msg: jetstream::Message| {
                let (handler, this) = (handler.clone(), this.clone());
                async move {
                    match this.decode(&msg.subject, &msg.payload) {
                        Ok(value) => handler(msg, value).await.into_result(),
                        Err(err) => {
                            this.report(&err);
                            let kind = if this.terminate_undecodable {
                                AckKind::Term
                            } else {
                                AckKind::Nak(None)
                            };
                            let _ = msg.ack_with(kind).await;
                            Ok(())
                        }
                    }
                }
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_and_wildcard() {
        let t = Template::parse("orders.{region}.{kind}.created").unwrap();
        assert_eq!(t.wildcard, "orders.*.*.created");
        assert_eq!(
            t.fill(&[("region", "eu"), ("kind", "web")]).unwrap(),
            "orders.eu.web.created"
        );
        assert!(t.fill(&[("region", "eu")]).is_err(), "missing token");
        for bad in ["", "a.b", "*", ">", "a b"] {
            assert!(
                t.fill(&[("region", bad), ("kind", "x")]).is_err(),
                "{bad:?}"
            );
        }
        assert!(Template::parse("orders.{}.x").is_err());
        assert!(Template::parse("orders.x{y}").is_err());
        assert!(Template::parse("orders..x").is_err());
        assert!(!Template::parse("a.b").unwrap().has_tokens());
    }

    #[test]
    fn json_codec_round_trip_and_errors() {
        let codec = JsonCodec;
        let bytes = Codec::<Vec<u32>>::encode(&codec, &vec![1, 2]).unwrap();
        assert_eq!(
            Codec::<Vec<u32>>::decode(&codec, &bytes).unwrap(),
            vec![1, 2]
        );
        assert!(Codec::<Vec<u32>>::decode(&codec, b"{").is_err());
    }

    /// Decodes `bytes` on a thread with a tokio worker's 2 MiB stack.
    fn decode_on_small_stack<C: Codec<serde_json::Value> + Send + 'static>(
        codec: C,
        bytes: Vec<u8>,
    ) -> bool {
        std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || codec.decode(&bytes).is_ok())
            .expect("thread")
            .join()
            .expect("no stack overflow")
    }

    #[test]
    fn deep_json_is_an_error_not_a_crash() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes();
        assert!(decode_on_small_stack(JsonCodec, deep(100)));
        assert!(!decode_on_small_stack(JsonCodec, deep(100_000)));
    }

    #[cfg(feature = "msgpack")]
    #[test]
    fn deep_msgpack_is_an_error_not_a_crash() {
        // 0x91 = a one-element array; the innermost element is nil (0xc0).
        let deep = |n: usize| {
            let mut bytes = vec![0x91; n];
            bytes.push(0xc0);
            bytes
        };
        assert!(decode_on_small_stack(MsgPackCodec, deep(100)));
        assert!(!decode_on_small_stack(MsgPackCodec, deep(1_000)));
        assert!(!decode_on_small_stack(MsgPackCodec, deep(100_000)));
    }
}
