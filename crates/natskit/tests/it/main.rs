//! natskit's integration tests, in one binary (one link of redb and
//! async-nats instead of one per file). Every test that touches I/O runs
//! against real nats-server processes from `natskit-testing`.
//!
//! One module per area; `cargo test --test it -- kv::` runs one of them.

mod common;

mod architecture;
mod bad_input;
mod client;
mod edge;
mod faults;
mod fuzz;
mod jetstream;
mod kv;
mod metrics;
mod otel;
mod outbox;
mod service;
mod trace;
mod trace_props;
mod typed;
