//! JetStream: streams ([`stream`]), acknowledged publishing with message
//! ids and resends ([`publish`]), the pipelined publisher ([`publisher`]),
//! supervised consumers ([`consumer`]) and the stream monitor
//! ([`monitor`]).

pub(crate) mod consumer;
pub(crate) mod monitor;
pub(crate) mod pipeline;
pub(crate) mod publish;
pub(crate) mod publisher;
pub(crate) mod stream;

pub use async_nats::jetstream::publish::PublishAck;
pub use publish::StreamPublishOptions;
pub use publisher::{PublishReport, StreamPublisher};
pub use stream::StreamAutoCreateConfig;
