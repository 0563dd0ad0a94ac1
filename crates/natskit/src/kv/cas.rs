//! Compare-and-swap updates with retry, and the JSON and typed helpers.

use async_nats::jetstream::kv::Operation;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::retry::Retry;
use crate::core::error::{BoxError, Error, Result};

use super::KvStore;

/// The outcome of one CAS attempt.
enum Attempt {
    Done(u64),
    Conflict,
}

impl KvStore {
    /// Reads, transforms and writes `key` atomically: `update` gets the
    /// current value (`None` when the key is missing, deleted or purged) and
    /// returns the new one, which is written with compare-and-swap (create
    /// when missing). On a concurrent write the key is re-read and `update`
    /// called again, after a jittered exponential back-off. Returns the
    /// committed revision.
    ///
    /// Only conflicts are retried. An error from `update`, an oversize value
    /// or an infrastructure error ends the call at once; nothing is written.
    ///
    /// ```no_run
    /// # async fn demo(store: natskit::KvStore) -> natskit::Result<()> {
    /// let revision = store
    ///     .update_with_retry("counter", |current| {
    ///         let n: u64 = match current {
    ///             Some(v) => std::str::from_utf8(v)?.parse()?,
    ///             None => 0,
    ///         };
    ///         Ok::<_, Box<dyn std::error::Error + Send + Sync>>((n + 1).to_string().into_bytes())
    ///     })
    ///     .await?;
    /// # let _ = revision; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::UpdateAborted`] (keeps the closure's error as its source),
    /// [`Error::ValueTooLarge`], [`Error::MaxRetriesExceeded`] with the attempt
    /// count, [`Error::InvalidKey`], [`Error::JetStreamUnavailable`].
    pub async fn update_with_retry<F, E>(&self, key: &str, mut update: F) -> Result<u64>
    where
        F: FnMut(Option<&[u8]>) -> std::result::Result<Vec<u8>, E>,
        E: Into<BoxError>,
    {
        self.cas_loop(key, |current| {
            update(current).map_err(|e| Error::UpdateAborted {
                key: key.to_owned(),
                source: e.into(),
            })
        })
        .await
    }

    /// [`update_with_retry`](Self::update_with_retry) with an async update
    /// function, for updates that must await something (a lookup, another
    /// service). It gets the current value (`None` when the key is missing,
    /// deleted or purged) and may run again after a conflict.
    ///
    /// ```no_run
    /// # async fn demo(store: natskit::KvStore, client: natskit::Client) -> natskit::Result<()> {
    /// store
    ///     .update_with_retry_async("price", |current| {
    ///         let client = client.clone();
    ///         async move {
    ///             let quote = client.request("pricing.quote", current.unwrap_or_default()).await?;
    ///             Ok::<_, natskit::Error>(quote.to_vec())
    ///         }
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`update_with_retry`](Self::update_with_retry).
    pub async fn update_with_retry_async<F, Fut, E>(&self, key: &str, mut update: F) -> Result<u64>
    where
        F: FnMut(Option<Bytes>) -> Fut,
        Fut: Future<Output = std::result::Result<Vec<u8>, E>>,
        E: Into<BoxError>,
    {
        self.cas_loop_async(key, |current| {
            let pending = update(current);
            async move {
                pending.await.map_err(|e| Error::UpdateAborted {
                    key: key.to_owned(),
                    source: e.into(),
                })
            }
        })
        .await
    }

    /// The CAS loop with a synchronous update; `update` already reports
    /// natskit errors (a JSON helper's decode error stays [`Error::Json`]).
    async fn cas_loop<F>(&self, key: &str, mut update: F) -> Result<u64>
    where
        F: FnMut(Option<&[u8]>) -> Result<Vec<u8>>,
    {
        self.cas_loop_async(key, |current| {
            std::future::ready(update(current.as_deref()))
        })
        .await
    }

    /// The one CAS loop: read, update, write with the read revision, retry
    /// on conflict with back-off.
    async fn cas_loop_async<F, Fut>(&self, key: &str, mut update: F) -> Result<u64>
    where
        F: FnMut(Option<Bytes>) -> Fut,
        Fut: Future<Output = Result<Vec<u8>>>,
    {
        self.check_key(key)?;
        let mut waits = Retry::new(self.options.backoff());
        let attempts = self.options.max_retries.saturating_add(1);
        for attempt in 0..attempts {
            if attempt > 0 {
                waits.wait().await;
            }
            let current = self.entry_raw(key).await?;
            let (value, revision) = match current {
                Some(e) if e.operation == Operation::Put => (Some(e.value), Some(e.revision)),
                _ => (None, None),
            };
            let new = update(value).await?;
            self.check_value(&new)?;
            match self.try_write(key, new.into(), revision).await? {
                Attempt::Done(revision) => return Ok(revision),
                Attempt::Conflict => {
                    self.conflicts.increment(1);
                    self.client.metrics().retry("kv_cas");
                    tracing::debug!(bucket = %self.bucket.name, key, attempt, "kv CAS conflict; retrying");
                }
            }
        }
        Err(Error::MaxRetriesExceeded {
            key: key.to_owned(),
            attempts,
        })
    }

    async fn try_write(&self, key: &str, value: Bytes, revision: Option<u64>) -> Result<Attempt> {
        let result = match revision {
            Some(revision) => self.update(key, value, revision).await,
            None => self.create(key, value).await,
        };
        match result {
            Ok(revision) => Ok(Attempt::Done(revision)),
            Err(err) if err.is_conflict() => Ok(Attempt::Conflict),
            Err(err) => Err(err),
        }
    }

    /// [`update_with_retry`](Self::update_with_retry) on a JSON object:
    /// `update` edits the map in place (an empty map when the key is
    /// missing). Integers stay integers.
    ///
    /// # Errors
    /// [`Error::Json`] when the stored value is not a JSON object,
    /// [`Error::JsonNull`] when it is `null` (in both cases `update` is
    /// never called and nothing is written), and the errors of
    /// [`update_with_retry`](Self::update_with_retry).
    pub async fn update_json<F, E>(&self, key: &str, mut update: F) -> Result<u64>
    where
        F: FnMut(&mut serde_json::Map<String, serde_json::Value>) -> std::result::Result<(), E>,
        E: Into<BoxError>,
    {
        self.cas_loop(key, |current: Option<&[u8]>| {
            let mut map = match current {
                None => serde_json::Map::new(),
                Some(bytes) => match decode::<serde_json::Value>(key, bytes)? {
                    serde_json::Value::Object(map) => map,
                    serde_json::Value::Null => {
                        return Err(Error::JsonNull {
                            key: key.to_owned(),
                        });
                    }
                    other => {
                        return Err(Error::Json {
                            key: key.to_owned(),
                            source: <serde_json::Error as serde::de::Error>::custom(format!(
                                "expected a JSON object, found {}",
                                json_kind(&other)
                            )),
                        });
                    }
                },
            };
            update(&mut map).map_err(|e| Error::UpdateAborted {
                key: key.to_owned(),
                source: e.into(),
            })?;
            serde_json::to_vec(&map).map_err(|source| Error::Json {
                key: key.to_owned(),
                source,
            })
        })
        .await
    }

    /// [`update_with_retry`](Self::update_with_retry) on a typed JSON value:
    /// `update` edits `T` in place (`T::default()` when the key is missing).
    ///
    /// ```no_run
    /// # async fn demo(store: natskit::KvStore) -> natskit::Result<()> {
    /// #[derive(Default, serde::Serialize, serde::Deserialize)]
    /// struct Counter { n: u64 }
    /// store.update_typed("visits", |c: &mut Counter| { c.n += 1; Ok::<_, std::convert::Infallible>(()) }).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Json`] for a stored value that does not decode as `T`
    /// (`update` is not called), and the errors of
    /// [`update_with_retry`](Self::update_with_retry).
    pub async fn update_typed<T, F, E>(&self, key: &str, mut update: F) -> Result<u64>
    where
        T: Serialize + DeserializeOwned + Default,
        F: FnMut(&mut T) -> std::result::Result<(), E>,
        E: Into<BoxError>,
    {
        self.cas_loop(key, |current: Option<&[u8]>| {
            let mut value = match current {
                None => T::default(),
                Some(bytes) => decode::<T>(key, bytes)?,
            };
            update(&mut value).map_err(|e| Error::UpdateAborted {
                key: key.to_owned(),
                source: e.into(),
            })?;
            serde_json::to_vec(&value).map_err(|source| Error::Json {
                key: key.to_owned(),
                source,
            })
        })
        .await
    }

    /// Reads `key` as JSON into `T`.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`], [`Error::Json`] (invalid JSON or a type
    /// mismatch), [`Error::InvalidKey`], [`Error::JetStreamUnavailable`].
    pub async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        let entry = self.get(key).await?;
        decode(key, &entry.value)
    }

    /// Writes `value` as JSON.
    ///
    /// # Errors
    /// As [`put`](Self::put), plus [`Error::Json`] if `value` cannot be serialized.
    pub async fn put_json<T: Serialize>(&self, key: &str, value: &T) -> Result<u64> {
        let bytes = serde_json::to_vec(value).map_err(|source| Error::Json {
            key: key.to_owned(),
            source,
        })?;
        self.put(key, bytes).await
    }
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| Error::Json {
        key: key.to_owned(),
        source,
    })
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
