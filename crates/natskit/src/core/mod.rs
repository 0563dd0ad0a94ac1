//! The pure core: decisions and checks with no I/O and no clock reads
//! (time comes in as an argument). Everything above builds on it; nothing
//! here imports from above.

pub(crate) mod backoff;
pub(crate) mod breaker;
pub(crate) mod error;
pub mod header;
pub(crate) mod message_id;
pub(crate) mod status;
pub mod subject;
pub(crate) mod sync;
pub(crate) mod trace_context;
