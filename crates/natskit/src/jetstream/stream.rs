//! Streams: create, get, ensure (creating, updating or refusing a
//! configuration that differs) and delete, and the configuration a
//! consumer's stream is auto-created with.

use std::time::Duration;

use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};

use crate::client::Client;
use crate::client::jetstream_errors::{
    map_create_stream, map_delete_stream, map_get_stream, unavailable,
};
use crate::core::error::{Error, Result};
use crate::core::subject;

/// The stream configuration fields [`Client::ensure_stream`] compares, and
/// whether the server can change each in place.
fn config_differences(
    want: &stream::Config,
    have: &stream::Config,
) -> (Vec<&'static str>, Vec<&'static str>) {
    let mut fixed = Vec::new();
    let mut updatable = Vec::new();
    if want.storage != have.storage {
        fixed.push("storage");
    }
    if want.retention != have.retention {
        fixed.push("retention");
    }
    let mut want_subjects = want.subjects.clone();
    let mut have_subjects = have.subjects.clone();
    want_subjects.sort();
    have_subjects.sort();
    if want_subjects != have_subjects {
        updatable.push("subjects");
    }
    let limit = |v: i64| if v <= 0 { -1 } else { v };
    if limit(want.max_messages) != limit(have.max_messages) {
        updatable.push("max_messages");
    }
    if limit(want.max_bytes) != limit(have.max_bytes) {
        updatable.push("max_bytes");
    }
    if limit(want.max_messages_per_subject) != limit(have.max_messages_per_subject) {
        updatable.push("max_messages_per_subject");
    }
    if want.max_age != have.max_age {
        updatable.push("max_age");
    }
    if want.num_replicas.max(1) != have.num_replicas.max(1) {
        updatable.push("num_replicas");
    }
    if want.description.is_some() && want.description != have.description {
        updatable.push("description");
    }
    if !want.duplicate_window.is_zero() && want.duplicate_window != have.duplicate_window {
        updatable.push("duplicate_window");
    }
    if want.discard != have.discard {
        updatable.push("discard");
    }
    (fixed, updatable)
}

impl Client {
    /// A JetStream context on this client's connection, for the JetStream
    /// API this handle targets ([`jetstream_api_prefix`](Self::jetstream_api_prefix)).
    ///
    /// # Errors
    /// [`Error::NotConnected`] before the first connection, [`Error::Closed`].
    pub fn jetstream(&self) -> Result<&async_nats::jetstream::Context> {
        let conn = self.nats()?;
        Ok(self.jetstream_cell().get_or_init(|| match &self.js.prefix {
            None => async_nats::jetstream::new(conn.clone()),
            Some(prefix) => async_nats::jetstream::with_prefix(conn.clone(), prefix),
        }))
    }

    /// The breaker, then the connection: the checks every JetStream call
    /// makes after its input was validated (see [`Client::publish`] for the
    /// order).
    pub(crate) fn js_call(
        &self,
    ) -> Result<(
        crate::client::breaker::Permit<'_>,
        &async_nats::jetstream::Context,
    )> {
        let permit = self.guard()?;
        self.live_conn()?;
        Ok((permit, self.jetstream()?))
    }

    /// Creates a stream.
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// use async_nats::jetstream::stream;
    /// let stream = client
    ///     .create_stream(stream::Config {
    ///         name: "EVENTS".into(),
    ///         subjects: vec!["events.>".into()],
    ///         ..Default::default()
    ///     })
    ///     .await?;
    /// # let _ = stream; Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::InvalidSubject`] for a bad subject,
    /// [`Error::JetStreamUnavailable`], [`Error::JetStream`] (for example
    /// when a stream with another config exists).
    pub async fn create_stream(&self, config: stream::Config) -> Result<stream::Stream> {
        self.ensure_open()?;
        check_stream_config(&config)?;
        let (permit, js) = self.js_call()?;
        let name = config.name.clone();
        let result = js
            .create_stream(config)
            .await
            .map_err(|e| map_create_stream("create stream", &name, e));
        permit.record(result)
    }

    /// Gets an existing stream.
    ///
    /// # Errors
    /// [`Error::StreamNotFound`] (an answer, not a breaker failure),
    /// [`Error::InvalidName`], [`Error::JetStreamUnavailable`].
    pub async fn get_stream(&self, name: &str) -> Result<stream::Stream> {
        self.ensure_open()?;
        subject::validate_name("stream", name)?;
        let (permit, js) = self.js_call()?;
        let result = js
            .get_stream(name)
            .await
            .map_err(|e| map_get_stream(name, e));
        permit.record(result)
    }

    /// Deletes a stream; `Ok(false)` when it did not exist.
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::JetStreamUnavailable`], [`Error::JetStream`].
    pub async fn delete_stream(&self, name: &str) -> Result<bool> {
        self.ensure_open()?;
        subject::validate_name("stream", name)?;
        let (permit, js) = self.js_call()?;
        let result = match js.delete_stream(name).await {
            Ok(status) => Ok(status.success),
            Err(err) => map_delete_stream(err),
        };
        permit.record(result)
    }

    /// Gets the stream, creating it when missing. When it exists with a
    /// different configuration, fields the server can change in place
    /// (subjects, limits, replicas, description...) are updated; fields it
    /// cannot (storage, retention) give [`Error::StreamConfigConflict`]
    /// naming them. The requested configuration is never silently ignored.
    ///
    /// # Errors
    /// As [`create_stream`](Self::create_stream), plus the conflict above.
    pub async fn ensure_stream(&self, config: stream::Config) -> Result<stream::Stream> {
        self.ensure_open()?;
        check_stream_config(&config)?;
        let mut existing = match self.get_stream(&config.name).await {
            Ok(stream) => stream,
            Err(Error::StreamNotFound { .. }) => match self.create_stream(config.clone()).await {
                // Refused: either another client created it first (compare
                // with the winner's config below) or the server rejects the
                // config (report that).
                Err(err @ Error::JetStream { .. }) => match self.get_stream(&config.name).await {
                    Ok(stream) => stream,
                    Err(_) => return Err(err),
                },
                other => return other,
            },
            Err(err) => return Err(err),
        };
        let have = existing.cached_info().config.clone();
        let (fixed, updatable) = config_differences(&config, &have);
        if !fixed.is_empty() {
            return Err(Error::StreamConfigConflict {
                stream: config.name,
                fields: fixed,
            });
        }
        if updatable.is_empty() {
            return Ok(existing);
        }
        tracing::info!(stream = %config.name, fields = ?updatable, "updating stream configuration");
        let (permit, js) = self.js_call()?;
        let result = js
            .update_stream(&config)
            .await
            .map_err(|e| map_create_stream("update stream", &config.name, e));
        permit.record(result)?;
        existing
            .info()
            .await
            .map_err(|e| unavailable("stream info", e))?;
        Ok(existing)
    }
}

fn check_stream_config(config: &stream::Config) -> Result<()> {
    subject::validate_name("stream", &config.name)?;
    for s in &config.subjects {
        subject::validate_subscribe(s)?;
    }
    Ok(())
}

/// Settings for creating a missing stream:
/// file storage, limits retention, 7 days max age, one replica.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamAutoCreateConfig {
    /// Subjects; empty means derived from the consumer's filter subject.
    pub subjects: Vec<String>,
    /// Storage (default file).
    pub storage: StorageType,
    /// Retention (default limits).
    pub retention: RetentionPolicy,
    /// Maximum message age (default 7 days).
    pub max_age: Duration,
    /// Maximum total bytes (0 = unlimited).
    pub max_bytes: i64,
    /// Maximum messages (0 = unlimited).
    pub max_messages: i64,
    /// Replicas (default 1).
    pub replicas: usize,
}

impl Default for StreamAutoCreateConfig {
    fn default() -> Self {
        Self {
            subjects: Vec::new(),
            storage: StorageType::File,
            retention: RetentionPolicy::Limits,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 0,
            max_messages: 0,
            replicas: 1,
        }
    }
}

impl StreamAutoCreateConfig {
    /// The stream config for stream `name`, deriving subjects from `filter`
    /// when none are set: a trailing `*` becomes `>`, a trailing `>` is
    /// kept, otherwise `.>` is appended.
    ///
    /// ```
    /// use natskit::StreamAutoCreateConfig;
    /// let derive = |f| StreamAutoCreateConfig::default().to_stream_config("S", f).subjects;
    /// assert_eq!(derive("orders.*"), vec!["orders.>"]);
    /// assert_eq!(derive("orders.>"), vec!["orders.>"]);
    /// assert_eq!(derive("orders"), vec!["orders.>"]);
    /// ```
    pub fn to_stream_config(&self, name: &str, filter: &str) -> stream::Config {
        let subjects = if !self.subjects.is_empty() {
            self.subjects.clone()
        } else if filter.is_empty() {
            vec![format!("{name}.>")]
        } else if let Some(prefix) = filter.strip_suffix('*') {
            vec![format!("{prefix}>")]
        } else if filter.ends_with('>') {
            vec![filter.to_owned()]
        } else {
            vec![format!("{filter}.>")]
        };
        stream::Config {
            name: name.to_owned(),
            subjects,
            storage: self.storage,
            retention: self.retention,
            max_age: self.max_age,
            max_bytes: if self.max_bytes > 0 {
                self.max_bytes
            } else {
                -1
            },
            max_messages: if self.max_messages > 0 {
                self.max_messages
            } else {
                -1
            },
            num_replicas: self.replicas.max(1),
            ..Default::default()
        }
    }
}
