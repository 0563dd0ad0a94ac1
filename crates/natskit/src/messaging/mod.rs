//! Core NATS messaging on top of the client: publish and subscribe (with
//! the subscription runner), request/reply with retries, and NATS micro
//! services.

pub(crate) mod pubsub;
pub(crate) mod request;
pub(crate) mod service;
