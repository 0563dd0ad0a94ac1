//! What every integration test shares: the result type, the one wait
//! bound for polling, and stream configurations.

use std::time::Duration;

use natskit::async_nats::jetstream::stream;

/// A test's result: any error fails it with its message.
pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// How long a test polls for something that should happen (generous: the
/// suite runs on two busy cores); never slept.
pub const WAIT: Duration = Duration::from_secs(20);

/// A stream in memory on `subjects`, with the server's defaults otherwise.
pub fn memory_stream(name: &str, subjects: &[&str]) -> stream::Config {
    stream::Config {
        name: name.into(),
        subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        storage: stream::StorageType::Memory,
        ..Default::default()
    }
}

/// A stream on disk on `subjects`, with the server's defaults otherwise.
pub fn file_stream(name: &str, subjects: &[&str]) -> stream::Config {
    stream::Config {
        storage: stream::StorageType::File,
        ..memory_stream(name, subjects)
    }
}
