//! A ready-to-use test environment: a server, a connected client, KV buckets
//! and streams created up front, bucket-name prefixes for isolation.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream::{self, kv, stream};

use crate::{HarnessError, NatsServer, NatsServerBuilder};

/// A stream to create before the test starts.
#[derive(Debug, Clone)]
pub struct TestStream {
    /// Stream name.
    pub name: String,
    /// Subjects the stream captures.
    pub subjects: Vec<String>,
}

impl TestStream {
    /// A stream named `name` over `subjects`.
    pub fn new(name: impl Into<String>, subjects: &[&str]) -> Self {
        Self {
            name: name.into(),
            subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

/// Configures a [`TestEnv`].
///
/// ```no_run
/// # async fn demo() -> Result<(), natskit_testing::HarnessError> {
/// use natskit_testing::{TestEnv, TestStream};
/// let env = TestEnv::builder()
///     .kv_buckets(&["config"])
///     .streams(vec![TestStream::new("EVENTS", &["events.>"])])
///     .bucket_prefix("orders_test")
///     .start()
///     .await?;
/// let bucket = env.kv_bucket("config").await?; // really "orders_test_config"
/// bucket.put("k", "v".into()).await.unwrap();
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct TestEnvBuilder {
    server: NatsServerBuilder,
    jetstream: bool,
    file_storage: bool,
    shared: bool,
    prefix: Option<String>,
    kv_buckets: Vec<String>,
    streams: Vec<TestStream>,
}

impl TestEnvBuilder {
    /// Enables JetStream (implied by buckets and streams).
    pub fn jetstream(mut self) -> Self {
        self.jetstream = true;
        self
    }

    /// Creates buckets and streams with file storage (default: memory), for
    /// tests that restart the server and expect data to survive.
    pub fn file_storage(mut self) -> Self {
        self.jetstream = true;
        self.file_storage = true;
        self
    }

    /// KV buckets to create before the test starts (names before prefixing).
    pub fn kv_buckets(mut self, names: &[&str]) -> Self {
        self.jetstream = true;
        self.kv_buckets
            .extend(names.iter().map(|name| (*name).to_owned()));
        self
    }

    /// Streams to create before the test starts.
    pub fn streams(mut self, streams: Vec<TestStream>) -> Self {
        self.jetstream = true;
        self.streams.extend(streams);
        self
    }

    /// Prefixes every bucket name this environment creates or opens with
    /// `prefix_`, so tests sharing a server do not collide.
    pub fn bucket_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Customises the server (auth, TLS, extra config). Ignored by
    /// [`shared`](Self::shared) environments.
    pub fn server(
        mut self,
        configure: impl FnOnce(NatsServerBuilder) -> NatsServerBuilder,
    ) -> Self {
        self.server = configure(self.server);
        self
    }

    /// Uses one JetStream server shared by every shared environment in this
    /// test binary instead of starting a new one, and gives this environment
    /// a unique bucket prefix unless one is set. The shared server lives until
    /// the test process exits; fault injection needs an owned server.
    pub fn shared(mut self) -> Self {
        self.shared = true;
        self.jetstream = true;
        self
    }

    /// Starts (or reuses) the server, connects, and creates the buckets and
    /// streams.
    ///
    /// # Errors
    /// Server start, connection or resource creation failed.
    pub async fn start(self) -> Result<TestEnv, HarnessError> {
        let server = if self.shared {
            ServerRef::Shared(shared_server()?)
        } else {
            let mut builder = self.server.clone();
            if self.jetstream {
                builder = builder.jetstream();
            }
            ServerRef::Owned(Box::new(builder.start()?))
        };
        let prefix = match (&self.prefix, self.shared) {
            (Some(p), _) => Some(p.clone()),
            (None, true) => {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                Some(format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed)))
            }
            (None, false) => None,
        };
        let client = natskit::Client::builder(server.get().url())
            .name("natskit-testing")
            .reconnect_wait(std::time::Duration::from_millis(100))
            .connect()
            .await
            .map_err(|e| HarnessError::Client(e.to_string()))?;
        let nats = client
            .nats()
            .map_err(|e| HarnessError::Client(e.to_string()))?
            .clone();
        let env = TestEnv {
            jetstream: jetstream::new(nats.clone()),
            client,
            nats,
            server,
            prefix,
            storage: if self.file_storage {
                stream::StorageType::File
            } else {
                stream::StorageType::Memory
            },
        };
        for bucket in &self.kv_buckets {
            env.create_kv_bucket(bucket).await?;
        }
        for s in &self.streams {
            let subjects: Vec<&str> = s.subjects.iter().map(String::as_str).collect();
            env.create_stream(&s.name, &subjects).await?;
        }
        Ok(env)
    }
}

#[derive(Debug)]
enum ServerRef {
    Owned(Box<NatsServer>),
    Shared(&'static NatsServer),
}

impl ServerRef {
    fn get(&self) -> &NatsServer {
        match self {
            ServerRef::Owned(server) => server,
            ServerRef::Shared(server) => server,
        }
    }
}

/// The JetStream server shared by [`TestEnvBuilder::shared`] environments,
/// started on first use.
///
/// # Errors
/// The server could not be started (the error is repeated on every call).
pub fn shared_server() -> Result<&'static NatsServer, HarnessError> {
    static SHARED: OnceLock<Result<NatsServer, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| NatsServer::start_jetstream().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| HarnessError::Shared(e.clone()))
}

/// A server (owned or shared), a connected natskit client and helpers for
/// buckets and streams. Dropping an owned environment stops its server.
///
/// The client connects without credentials: for auth or TLS servers, use
/// [`NatsServer`] and build the client yourself.
#[derive(Debug)]
pub struct TestEnv {
    server: ServerRef,
    client: natskit::Client,
    nats: async_nats::Client,
    jetstream: jetstream::Context,
    prefix: Option<String>,
    storage: stream::StorageType,
}

impl TestEnv {
    /// A builder; see [`TestEnvBuilder`].
    pub fn builder() -> TestEnvBuilder {
        TestEnvBuilder::default()
    }

    /// The server's client URL.
    pub fn url(&self) -> String {
        self.server.get().url()
    }

    /// The server.
    pub fn server(&self) -> &NatsServer {
        self.server.get()
    }

    /// The server for fault injection; `None` for a shared server.
    pub fn server_mut(&mut self) -> Option<&mut NatsServer> {
        match &mut self.server {
            ServerRef::Owned(server) => Some(server),
            ServerRef::Shared(_) => None,
        }
    }

    /// The connected natskit client.
    pub fn client(&self) -> &natskit::Client {
        &self.client
    }

    /// The raw async-nats client underneath [`client`](Self::client).
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// A JetStream context on [`nats`](Self::nats).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// The bucket prefix, if any.
    pub fn bucket_prefix(&self) -> Option<&str> {
        self.prefix.as_deref()
    }

    /// `name` with the bucket prefix applied (`prefix_name`).
    pub fn prefixed_bucket_name(&self, name: &str) -> String {
        match &self.prefix {
            Some(prefix) => format!("{prefix}_{name}"),
            None => name.to_owned(),
        }
    }

    /// Creates (or opens, if it exists) the KV bucket `name` (prefixed),
    /// keeping 64 revisions per key.
    ///
    /// # Errors
    /// JetStream refused.
    pub async fn create_kv_bucket(&self, name: &str) -> Result<kv::Store, HarnessError> {
        self.jetstream
            .create_or_update_key_value(kv::Config {
                bucket: self.prefixed_bucket_name(name),
                history: 64,
                storage: self.storage,
                ..Default::default()
            })
            .await
            .map_err(|e| HarnessError::Client(e.to_string()))
    }

    /// Opens the existing KV bucket `name` (prefixed).
    ///
    /// # Errors
    /// The bucket does not exist or JetStream refused.
    pub async fn kv_bucket(&self, name: &str) -> Result<kv::Store, HarnessError> {
        self.jetstream
            .get_key_value(self.prefixed_bucket_name(name))
            .await
            .map_err(|e| HarnessError::Client(e.to_string()))
    }

    /// Creates the stream `name` over `subjects`, or opens it if it exists.
    ///
    /// # Errors
    /// JetStream refused.
    pub async fn create_stream(
        &self,
        name: &str,
        subjects: &[&str],
    ) -> Result<stream::Stream, HarnessError> {
        self.jetstream
            .get_or_create_stream(stream::Config {
                name: name.to_owned(),
                subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
                storage: self.storage,
                ..Default::default()
            })
            .await
            .map_err(|e| HarnessError::Client(e.to_string()))
    }

    /// Opens the existing stream `name`.
    ///
    /// # Errors
    /// The stream does not exist or JetStream refused.
    pub async fn stream(&self, name: &str) -> Result<stream::Stream, HarnessError> {
        self.jetstream
            .get_stream(name)
            .await
            .map_err(|e| HarnessError::Client(e.to_string()))
    }
}
