//! natskit: a resilient NATS client for Rust (work in progress).
#![warn(missing_docs)]
