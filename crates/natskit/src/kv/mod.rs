//! Key-value buckets and [`KvStore`]: typed errors, compare-and-swap with
//! retry, JSON helpers, server-side key filtering and resilient watches.

mod cas;
mod store;
#[cfg(feature = "temporal")]
pub(crate) mod temporal;
mod watch;
mod write;

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::client::Client;
use crate::client::jetstream_errors::{Lookup, failed, unavailable};
use crate::core::backoff::Backoff;
use crate::core::error::{Error, Result};

/// What a KV entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KvOperation {
    /// A value was written.
    Put,
    /// The key was deleted (a delete marker).
    Delete,
    /// The key was purged (its history removed, a purge marker).
    Purge,
}

/// One revision of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    /// The key.
    pub key: String,
    /// The value (empty for delete and purge markers).
    pub value: Bytes,
    /// The revision (the stream sequence).
    pub revision: u64,
    /// When it was written.
    pub created: SystemTime,
    /// Put, delete or purge.
    pub operation: KvOperation,
}

impl KvEntry {
    /// Whether the entry is a live value (not a delete or purge marker).
    pub fn is_value(&self) -> bool {
        self.operation == KvOperation::Put
    }
}

fn system_time(t: time::OffsetDateTime) -> SystemTime {
    let nanos = t.unix_timestamp_nanos();
    match u64::try_from(nanos) {
        Ok(n) => SystemTime::UNIX_EPOCH + Duration::from_nanos(n),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

impl From<kv::Entry> for KvEntry {
    fn from(entry: kv::Entry) -> Self {
        Self {
            key: entry.key,
            value: entry.value,
            revision: entry.revision,
            created: system_time(entry.created),
            operation: match entry.operation {
                Operation::Put => KvOperation::Put,
                Operation::Delete => KvOperation::Delete,
                Operation::Purge => KvOperation::Purge,
            },
        }
    }
}

/// Behaviour of a [`KvStore`]; `Default` gives 20 CAS retries from 10 ms to
/// 1 s with jitter, a 5 s timeout per operation and 1 MiB values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvOptions {
    /// CAS retries after the first attempt (default 20: with 8 writers
    /// contending for one key on an R3 bucket, about one update in 2,000
    /// still lost 11 attempts in a row, so 10 was not enough for zero
    /// errors).
    pub max_retries: u32,
    /// Delay before the first retry (default 10 ms).
    pub retry_delay: Duration,
    /// Grow the delay exponentially with jitter (default true); otherwise a
    /// fixed delay.
    pub exponential_backoff: bool,
    /// Cap on the retry delay (default 1 s).
    pub max_retry_delay: Duration,
    /// Timeout of each KV operation (default 5 s). It bounds one operation,
    /// never a whole CAS loop, so back-off can never eat the loop's time.
    pub timeout: Duration,
    /// Largest value accepted (default 1 MiB).
    pub max_value_size: usize,
}

impl Default for KvOptions {
    fn default() -> Self {
        Self {
            max_retries: 20,
            retry_delay: Duration::from_millis(10),
            exponential_backoff: true,
            max_retry_delay: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            max_value_size: 1024 * 1024,
        }
    }
}

impl KvOptions {
    fn backoff(&self) -> Backoff {
        if self.exponential_backoff {
            Backoff::new(self.retry_delay, self.max_retry_delay)
        } else {
            Backoff::new(self.retry_delay, self.retry_delay).without_jitter()
        }
    }
}

/// Something to tell when a key changes through a [`KvStore`] (the
/// temporal resolver's cache).
pub(crate) trait Invalidate: Send + Sync {
    fn invalidate(&self, key: &str);
}

/// A KV bucket with CAS retry, JSON helpers and typed errors. Cheap to clone.
///
/// ```no_run
/// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
/// use async_nats::jetstream::kv;
/// let bucket = client
///     .ensure_key_value_bucket(kv::Config { bucket: "config".into(), history: 5, ..Default::default() })
///     .await?;
/// let store = client.kv_store(bucket, natskit::KvOptions::default());
/// store.update_json("service.config", |config| {
///     config.insert("workers".into(), 10.into());
///     Ok::<_, std::convert::Infallible>(())
/// })
/// .await?;
/// let workers: serde_json::Value = store.get_json("service.config").await?;
/// # let _ = workers; Ok(()) }
/// ```
#[derive(Clone)]
pub struct KvStore {
    client: Client,
    bucket: kv::Store,
    options: KvOptions,
    listeners: Arc<Mutex<Vec<Weak<dyn Invalidate>>>>,
    conflicts: metrics::Counter,
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore")
            .field("bucket", &self.bucket.name)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Gets the bucket, creating it when missing. When it exists with a
    /// different history, max age, max bytes or max value size, those are
    /// updated; a different storage type is [`Error::BucketConfigConflict`].
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::BucketConfigConflict`],
    /// [`Error::JetStreamUnavailable`], [`Error::JetStream`].
    pub async fn ensure_key_value_bucket(&self, config: kv::Config) -> Result<kv::Store> {
        self.ensure_open()?;
        check_bucket_name(&config.bucket)?;
        match self.get_key_value_bucket(&config.bucket).await {
            Ok(existing) => {
                // Fetched by get_key_value just now.
                let have = existing.stream.cached_info().config.clone();
                if have.storage != config.storage {
                    return Err(Error::BucketConfigConflict {
                        bucket: config.bucket,
                        fields: vec!["storage"],
                    });
                }
                let history = config.history.max(1);
                let differs = have.max_messages_per_subject != history
                    || have.max_age != config.max_age
                    || (config.max_bytes > 0 && have.max_bytes != config.max_bytes)
                    || (config.max_value_size > 0
                        && have.max_message_size != config.max_value_size);
                if !differs {
                    return Ok(existing);
                }
                tracing::info!(bucket = %config.bucket, "updating KV bucket configuration");
                let (permit, js) = self.js_call()?;
                let result = js
                    .update_key_value(config)
                    .await
                    .map_err(|e| failed("update bucket", e));
                permit.record(result)
            }
            Err(Error::BucketNotFound { .. }) => {
                let (permit, js) = self.js_call()?;
                let result = js
                    .create_key_value(config)
                    .await
                    .map_err(|e| match e.kind() {
                        async_nats::jetstream::context::CreateKeyValueErrorKind::TimedOut => {
                            unavailable("create bucket", e)
                        }
                        _ => failed("create bucket", e),
                    });
                permit.record(result)
            }
            Err(err) => Err(err),
        }
    }

    /// Opens an existing bucket.
    ///
    /// # Errors
    /// [`Error::BucketNotFound`] (an answer, not a breaker failure),
    /// [`Error::InvalidName`], [`Error::JetStreamUnavailable`].
    pub async fn get_key_value_bucket(&self, name: &str) -> Result<kv::Store> {
        self.ensure_open()?;
        check_bucket_name(name)?;
        let (permit, js) = self.js_call()?;
        let result = js.get_key_value(name).await.map_err(|err| {
            // async-nats wraps the stream lookup's error: classify by its kind.
            let lookup = std::error::Error::source(&err)
                .and_then(|s| s.downcast_ref::<async_nats::jetstream::context::GetStreamError>())
                .map(|e| crate::client::jetstream_errors::classify_get_stream(&e.kind()));
            match lookup {
                Some(Lookup::NotFound) => Error::BucketNotFound {
                    bucket: name.to_owned(),
                },
                Some(Lookup::Unavailable) => unavailable("get bucket", err),
                _ => failed("get bucket", err),
            }
        });
        permit.record(result)
    }

    /// Deletes a bucket; `Ok(false)` when it did not exist.
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::JetStreamUnavailable`], [`Error::JetStream`].
    pub async fn delete_key_value_bucket(&self, name: &str) -> Result<bool> {
        self.ensure_open()?;
        check_bucket_name(name)?;
        self.delete_stream(&format!("KV_{name}")).await
    }

    /// Names of all buckets.
    ///
    /// # Errors
    /// [`Error::JetStreamUnavailable`].
    pub async fn list_key_value_buckets(&self) -> Result<Vec<String>> {
        self.ensure_open()?;
        let (permit, js) = self.js_call()?;
        let result = async {
            let mut names = js.stream_names();
            let mut buckets = Vec::new();
            while let Some(name) = names.next().await {
                let name = name.map_err(|e| unavailable("list buckets", e))?;
                if let Some(bucket) = name.strip_prefix("KV_") {
                    buckets.push(bucket.to_owned());
                }
            }
            buckets.sort();
            Ok(buckets)
        }
        .await;
        permit.record(result)
    }

    /// Wraps a bucket in a [`KvStore`].
    pub fn kv_store(&self, bucket: kv::Store, options: KvOptions) -> KvStore {
        KvStore {
            conflicts: self.metrics().kv_conflicts(&bucket.name),
            client: self.clone(),
            bucket,
            options,
            listeners: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

fn check_bucket_name(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::InvalidName {
            what: "bucket",
            name: name.to_owned(),
            reason: "only A-Z a-z 0-9 - _ are allowed",
        });
    }
    Ok(())
}

pub use watch::{KvWatch, WatchEvent};
