//! The resilient [`Client`]: configuration, connection lifecycle, status,
//! health and callbacks.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zeroize::Zeroizing;

use crate::backoff::Backoff;
use crate::breaker::{BreakerConfig, BreakerState, CircuitBreaker, FailurePredicate, SystemClock};
use crate::error::{Error, Result};
use crate::registry::Registry;
pub use crate::status::{Status, StatusInfo};
use crate::status::{StatusCore, StatusEffect, StatusInput};

type Callback0 = Arc<dyn Fn() + Send + Sync>;
type CallbackStr = Arc<dyn Fn(Option<&str>) + Send + Sync>;
type CallbackBool = Arc<dyn Fn(bool) + Send + Sync>;
type CallbackStatus = Arc<dyn Fn(Status) + Send + Sync>;

#[derive(Clone, Default)]
struct Callbacks {
    on_disconnect: Option<CallbackStr>,
    on_reconnect: Option<Callback0>,
    on_connection_lost: Option<CallbackStr>,
    on_health_change: Option<CallbackBool>,
    on_status_change: Option<CallbackStatus>,
}

/// Credentials, zeroized when dropped, and dropped by [`Client::close`].
#[derive(Clone, Default)]
struct Secrets {
    user: Option<Zeroizing<String>>,
    password: Option<Zeroizing<String>>,
    token: Option<Zeroizing<String>>,
    nkey_seed: Option<Zeroizing<String>>,
    credentials_file: Option<PathBuf>,
    /// `user:password` or `token` found in the URLs (removed from them).
    url_userinfo: Vec<Zeroizing<String>>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |present: bool| if present { Some("<redacted>") } else { None };
        f.debug_struct("Secrets")
            .field("user", &self.user.as_deref())
            .field("password", &redact(self.password.is_some()))
            .field("token", &redact(self.token.is_some()))
            .field("nkey_seed", &redact(self.nkey_seed.is_some()))
            .field("credentials_file", &self.credentials_file)
            .field("url_userinfo", &redact(!self.url_userinfo.is_empty()))
            .finish()
    }
}

#[derive(Debug, Clone, Default)]
struct TlsConfig {
    required: bool,
    ca: Vec<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
}

/// Settings of a [`Client`] (defaults in [`ClientBuilder`]'s setters).
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) urls: Vec<String>,
    pub(crate) name: Option<String>,
    pub(crate) max_reconnects: Option<usize>,
    pub(crate) reconnect_wait: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) ping_interval: Duration,
    pub(crate) health_interval: Option<Duration>,
    pub(crate) connection_lost_after: Duration,
    pub(crate) breaker: BreakerConfig,
    pub(crate) is_failure: Option<FailurePredicate>,
    pub(crate) subscription_capacity: usize,
    pub(crate) handler_deadline: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) buffer_when_disconnected: bool,
    pub(crate) retry_initial_connect: bool,
    pub(crate) trace_mode: crate::trace::TraceMode,
    tls: TlsConfig,
    callbacks: Callbacks,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("urls", &self.urls)
            .field("name", &self.name)
            .field("max_reconnects", &self.max_reconnects)
            .field("reconnect_wait", &self.reconnect_wait)
            .field("connect_timeout", &self.connect_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("ping_interval", &self.ping_interval)
            .field("health_interval", &self.health_interval)
            .field("breaker", &self.breaker)
            .field("subscription_capacity", &self.subscription_capacity)
            .field("handler_deadline", &self.handler_deadline)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Client`]. Every setting has a default, named in its setter's docs.
///
/// ```no_run
/// use std::time::Duration;
/// # async fn demo() -> natskit::Result<()> {
/// let client = natskit::Client::builder("nats://a:4222,nats://b:4222")
///     .name("orders-service")
///     .breaker_threshold(10)
///     .max_backoff(Duration::from_secs(30))
///     .user_password("orders", "s3cret")
///     .on_disconnect(|reason| eprintln!("disconnected: {reason:?}"))
///     .on_reconnect(|| eprintln!("reconnected"))
///     .build()?;
/// client.connect().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use]
pub struct ClientBuilder {
    config: Config,
    secrets: Secrets,
}

impl ClientBuilder {
    fn new(urls: &str) -> Self {
        // Credentials written in a URL (`nats://user:pass@host`) are taken
        // out at once, so no Debug output, log line or error can show them.
        let mut url_userinfo = Vec::new();
        let urls = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                let (clean, userinfo) = split_userinfo(u);
                url_userinfo.extend(userinfo);
                clean
            })
            .collect();
        Self {
            config: Config {
                urls,
                name: None,
                max_reconnects: None,
                reconnect_wait: Duration::from_secs(1),
                connect_timeout: Duration::from_secs(5),
                drain_timeout: Duration::from_secs(30),
                ping_interval: Duration::from_secs(30),
                health_interval: Some(Duration::from_secs(10)),
                connection_lost_after: Duration::from_secs(30),
                breaker: BreakerConfig::default(),
                is_failure: None,
                subscription_capacity: 65_536,
                handler_deadline: Duration::from_secs(30),
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
                buffer_when_disconnected: false,
                retry_initial_connect: false,
                trace_mode: crate::trace::TraceMode::Full,
                tls: TlsConfig::default(),
                callbacks: Callbacks::default(),
            },
            secrets: Secrets {
                url_userinfo,
                ..Secrets::default()
            },
        }
    }

    /// Maximum reconnection attempts after a disconnect: `Some(n)`, or
    /// `None` to keep trying forever (the default).
    pub fn max_reconnects(mut self, max: Option<usize>) -> Self {
        self.config.max_reconnects = max;
        self
    }

    setter!(
        /// Longest wait between reconnection attempts (default 1 s). After a
        /// drop the first attempt goes at once, the next ones after 100 ms,
        /// 200 ms, 400 ms... up to this wait, with 20% jitter, so a
        /// restarted server is found again within about this wait. Failed
        /// attempts still feed the breaker, which keeps failing user calls
        /// fast meanwhile.
        reconnect_wait: Duration => config.reconnect_wait);
    setter!(
        /// Timeout of a connection attempt (default 5 s).
        connect_timeout: Duration => config.connect_timeout);
    setter!(
        /// Upper bound on [`Client::close`] draining (default 30 s).
        drain_timeout: Duration => config.drain_timeout);
    setter!(
        /// Interval of protocol pings that detect dead connections (default 30 s).
        ping_interval: Duration => config.ping_interval);
    /// Interval of health checks, a round trip through the server (default
    /// 10 s; must be above zero). See also
    /// [`disable_health_checks`](Self::disable_health_checks).
    pub fn health_interval(mut self, interval: Duration) -> Self {
        self.config.health_interval = Some(interval);
        self
    }

    /// No periodic health checks: [`Client::is_healthy`] then follows the
    /// connection alone.
    pub fn disable_health_checks(mut self) -> Self {
        self.config.health_interval = None;
        self
    }
    setter!(
        /// How long the connection must stay down before the
        /// connection-lost callback fires (default 30 s).
        connection_lost_after: Duration => config.connection_lost_after);
    setter!(
        /// Consecutive failures that open the circuit breaker (default 5).
        breaker_threshold: u32 => config.breaker.threshold);
    setter!(
        /// First open time of the breaker (default 1 s).
        initial_backoff: Duration => config.breaker.backoff.initial);
    setter!(
        /// Cap on the breaker's open time (default 60 s).
        max_backoff: Duration => config.breaker.backoff.max);
    setter!(
        /// Jitter fraction of the breaker's open time, `0.0..=1.0` (default 0).
        backoff_jitter: f64 => config.breaker.backoff.jitter);
    setter!(
        /// Messages a handler subscription buffers while its handlers are
        /// busy; beyond it messages are dropped and every drop is counted
        /// exactly (`SubscriptionStats::dropped`, `StatusInfo::dropped_messages`,
        /// `natskit_messages_dropped_total`). Default 65,536. natskit reads
        /// the subscription without pause into this buffer; async-nats' own
        /// buffer behind it holds at least 262,144 messages, so it overflows
        /// only when natskit's reader is starved of CPU for that long.
        subscription_capacity: usize => config.subscription_capacity);
    setter!(
        /// Deadline for one message handler invocation (default 30 s).
        handler_deadline: Duration => config.handler_deadline);
    setter!(
        /// Timeout of [`Client::request`] (default 5 s); see also
        /// [`Client::request_timeout`].
        request_timeout: Duration => config.request_timeout);
    setter!(
        /// While disconnected, let async-nats buffer publishes for the next
        /// connection instead of failing with [`Error::NotConnected`]
        /// (default false).
        buffer_when_disconnected: bool => config.buffer_when_disconnected);
    setter!(
        /// Which trace headers outgoing messages carry (default
        /// [`TraceMode::Full`](crate::trace::TraceMode::Full): `traceparent`
        /// and the three `X-*` headers; `W3c` for `traceparent` alone, `Off`
        /// for none).
        trace_mode: crate::trace::TraceMode => config.trace_mode);
    setter!(
        /// Make [`Client::connect`] return at once and keep connecting in the
        /// background through the breaker, for services that must start while
        /// the network is down (default false).
        retry_initial_connect: bool => config.retry_initial_connect);

    /// Client name shown by the server.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = Some(name.into());
        self
    }

    /// Replaces the breaker's failure classification
    /// ([`Error::is_infrastructure`] by default).
    pub fn failure_predicate(mut self, f: impl Fn(&Error) -> bool + Send + Sync + 'static) -> Self {
        self.config.is_failure = Some(Arc::new(f));
        self
    }

    /// Authenticates with user name and password.
    pub fn user_password(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.secrets.user = Some(Zeroizing::new(user.into()));
        self.secrets.password = Some(Zeroizing::new(password.into()));
        self
    }

    /// Authenticates with a token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.secrets.token = Some(Zeroizing::new(token.into()));
        self
    }

    /// Authenticates with an nkey seed.
    pub fn nkey(mut self, seed: impl Into<String>) -> Self {
        self.secrets.nkey_seed = Some(Zeroizing::new(seed.into()));
        self
    }

    /// Authenticates with a NATS credentials file (JWT + nkey seed), read at connect.
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.secrets.credentials_file = Some(path.into());
        self
    }

    /// Requires TLS.
    pub fn require_tls(mut self, required: bool) -> Self {
        self.config.tls.required = required;
        self
    }

    /// Trusts this CA certificate (PEM) for the server's certificate; implies TLS.
    pub fn tls_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.tls.ca.push(path.into());
        self.config.tls.required = true;
        self
    }

    /// Presents this client certificate and key (PEM); implies TLS.
    pub fn tls_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.config.tls.client_cert = Some((cert.into(), key.into()));
        self.config.tls.required = true;
        self
    }

    /// Called when the connection drops, with the last error the client saw.
    pub fn on_disconnect(mut self, f: impl Fn(Option<&str>) + Send + Sync + 'static) -> Self {
        self.config.callbacks.on_disconnect = Some(Arc::new(f));
        self
    }

    /// Called when the connection is re-established.
    pub fn on_reconnect(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.config.callbacks.on_reconnect = Some(Arc::new(f));
        self
    }

    /// Called once per outage when the connection has been down for
    /// [`connection_lost_after`](Self::connection_lost_after).
    pub fn on_connection_lost(mut self, f: impl Fn(Option<&str>) + Send + Sync + 'static) -> Self {
        self.config.callbacks.on_connection_lost = Some(Arc::new(f));
        self
    }

    /// Called when the health check result changes.
    pub fn on_health_change(mut self, f: impl Fn(bool) + Send + Sync + 'static) -> Self {
        self.config.callbacks.on_health_change = Some(Arc::new(f));
        self
    }

    /// Called on every status change, in order, from one task.
    pub fn on_status_change(mut self, f: impl Fn(Status) + Send + Sync + 'static) -> Self {
        self.config.callbacks.on_status_change = Some(Arc::new(f));
        self
    }

    /// Validates the settings and builds a client (not yet connected). Needs
    /// a Tokio runtime: it starts the task that delivers status and callbacks.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] outside a Tokio runtime, for no URL, an
    /// unparsable URL, URLs carrying different credentials, or a zero
    /// timeout.
    pub fn build(mut self) -> Result<Client> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::InvalidConfig(
                "a Client needs a Tokio runtime: build it inside one".into(),
            ));
        }
        let config = self.config;
        if config.urls.is_empty() {
            return Err(Error::InvalidConfig("no server URL given".into()));
        }
        apply_url_credentials(&mut self.secrets)?;
        for url in &config.urls {
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| Error::InvalidConfig(format!("bad server URL {url:?}: {e}")))?;
        }
        if config.connect_timeout.is_zero()
            || config.drain_timeout.is_zero()
            || config.request_timeout.is_zero()
            || config.handler_deadline.is_zero()
            || config.health_interval.is_some_and(|d| d.is_zero())
        {
            return Err(Error::InvalidConfig(
                "timeouts, deadlines and intervals must be above zero".into(),
            ));
        }
        if config.subscription_capacity == 0 {
            return Err(Error::InvalidConfig(
                "subscription capacity must be above zero".into(),
            ));
        }
        if !(0.0..=1.0).contains(&config.breaker.backoff.jitter) {
            return Err(Error::InvalidConfig(
                "backoff jitter must be within 0..=1".into(),
            ));
        }
        let (signals, signal_rx) = mpsc::unbounded_channel();
        let listener_tx = signals.clone();
        let metrics =
            crate::metrics::ClientMetrics::new(config.name.as_deref().unwrap_or("default"));
        let breaker_metrics = metrics.clone();
        let breaker = Arc::new(CircuitBreaker::with_parts(
            config.breaker,
            Arc::new(SystemClock),
            config.is_failure.clone(),
            Some(Arc::new(move |t| {
                breaker_metrics.breaker_changed(t.to);
                let _ = listener_tx.send(Signal::Breaker(t.to));
            })),
        ));
        let (status_tx, status_rx) = watch::channel(Status::Disconnected);
        let shutdown = CancellationToken::new();
        let inner = Arc::new(Inner {
            config,
            secrets: Mutex::new(Some(self.secrets)),
            breaker,
            conn: OnceLock::new(),
            jetstream: OnceLock::new(),
            connect_lock: tokio::sync::Mutex::new(()),
            lifecycle: AtomicU64::new(OPEN),
            connected: Arc::new(AtomicBool::new(false)),
            ever_connected: Arc::new(AtomicBool::new(false)),
            status: status_rx,
            signals,
            epoch: Arc::new(watch::Sender::new(0)),
            shutdown: shutdown.clone(),
            counters: Counters::default(),
            registry: Arc::new(Registry::default()),
            consumers: Default::default(),
            metrics,
            tasks: TaskTracker::new(),
            outbox_stats: Mutex::new(None),
        });
        tokio::spawn(supervise(
            Arc::downgrade(&inner),
            signal_rx,
            status_tx,
            shutdown,
        ));
        Ok(Client { inner })
    }

    /// Builds the client and connects it.
    ///
    /// # Errors
    /// See [`build`](Self::build) and [`Client::connect`].
    pub async fn connect(self) -> Result<Client> {
        let client = self.build()?;
        client.connect().await?;
        Ok(client)
    }
}

/// Default of [`ClientBuilder::request_timeout`](crate::ClientBuilder::request_timeout).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Smallest buffer async-nats gets per subscription: 4x its default, so
/// that a burst never overflows it while natskit's reader catches up on a
/// loaded machine (measured: with 65,536, a 200,000-message flood on 2
/// busy cores lost up to 3% there, reported only by lossy events). Memory
/// is taken only while messages wait in it.
const STAGING_CAPACITY: usize = 262_144;

const OPEN: u64 = 0;
const CLOSING: u64 = 1;
const CLOSED: u64 = 2;

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) reconnects: AtomicU64,
    /// Shared with every subscription's counters.
    pub(crate) dropped: Arc<AtomicU64>,
    /// Last RTT in nanoseconds; 0 = never measured.
    pub(crate) rtt_nanos: AtomicU64,
    pub(crate) healthy: AtomicBool,
    pub(crate) callback_panics: AtomicU64,
}

pub(crate) struct Inner {
    config: Config,
    secrets: Mutex<Option<Secrets>>,
    breaker: Arc<CircuitBreaker>,
    conn: OnceLock<async_nats::Client>,
    /// JetStream context on `conn`, made on first use (not per call).
    jetstream: OnceLock<async_nats::jetstream::Context>,
    connect_lock: tokio::sync::Mutex<()>,
    lifecycle: AtomicU64,
    /// Mirrors the connection state for the hot path (async-nats' own state
    /// sits behind a lock); set at connect and by connection events.
    connected: Arc<AtomicBool>,
    ever_connected: Arc<AtomicBool>,
    status: watch::Receiver<Status>,
    signals: mpsc::UnboundedSender<Signal>,
    /// Bumped on every (re)connection, so waits that a drop would strand
    /// (a JetStream ack) can resend at once.
    epoch: Arc<watch::Sender<u64>>,
    /// Cancelled when the last `Client` handle is dropped (or at close):
    /// every task the client started ends, so nothing keeps the connection
    /// alive.
    shutdown: CancellationToken,
    counters: Counters,
    registry: Arc<Registry>,
    consumers: crate::registry::Consumers,
    metrics: crate::metrics::ClientMetrics,
    /// Subscription and handler tasks, awaited by `close`.
    tasks: TaskTracker,
    /// Reads the figures of the outbox attached to this client, if any.
    outbox_stats: Mutex<Option<OutboxStatsSource>>,
}

/// What an attached outbox gives `status_info` (the outbox lives in a layer
/// above the connection, so the client only holds this reader).
pub(crate) type OutboxStatsSource = Arc<dyn Fn() -> crate::status::OutboxStats + Send + Sync>;

/// An outgoing message that passed [`Client::prologue`].
pub(crate) struct Outgoing<'a> {
    /// Its breaker permit, to settle with the outcome.
    pub(crate) permit: crate::breaker::Permit<'a>,
    /// The live connection.
    pub(crate) conn: &'a async_nats::Client,
    /// Every header the message carries.
    pub(crate) headers: Option<async_nats::HeaderMap>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropped without `close()`: end every task, which releases the
        // subscriptions and, with them, the connection.
        self.shutdown.cancel();
    }
}

/// A handle that does not keep the client alive, for the client's own
/// tasks: they upgrade it while they work and end when it is gone.
#[derive(Clone)]
pub(crate) struct WeakClient(Weak<Inner>);

impl WeakClient {
    pub(crate) fn upgrade(&self) -> Option<Client> {
        self.0.upgrade().map(|inner| Client { inner })
    }
}

/// A resilient NATS client: a cheap, cloneable handle (`Clone + Send +
/// Sync`) over shared state.
///
/// Every operation goes through the circuit breaker, validates its input
/// before touching the network, and returns a typed [`Error`].
///
/// ```no_run
/// # async fn demo() -> natskit::Result<()> {
/// let client = natskit::Client::new("nats://127.0.0.1:4222")?;
/// client.connect().await?;
/// client.publish("sensors.t1", "21.5").await?;
/// println!("{:?}", client.status_info());
/// client.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("urls", &self.inner.config.urls)
            .field("status", &self.status())
            .field("secrets", &self.inner.secrets.lock().ok().as_deref())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A builder for `urls`: one URL or a comma-separated list.
    pub fn builder(urls: impl AsRef<str>) -> ClientBuilder {
        ClientBuilder::new(urls.as_ref())
    }

    /// A client with default settings for `urls` (not yet connected).
    ///
    /// # Errors
    /// See [`ClientBuilder::build`].
    pub fn new(urls: impl AsRef<str>) -> Result<Self> {
        Self::builder(urls).build()
    }

    /// Connects. Goes through the circuit breaker: each failed attempt counts,
    /// and once the breaker is open the call fails fast with
    /// [`Error::CircuitOpen`] without touching the network. A failed attempt
    /// returns the real cause ([`Error::Connect`] or
    /// [`Error::ConnectionTimeout`]). Connecting a connected client does
    /// nothing. Once connected, the client reconnects by itself.
    ///
    /// With [`ClientBuilder::retry_initial_connect`], returns at once and
    /// keeps trying in the background; see [`wait_for_connection`](Self::wait_for_connection).
    ///
    /// # Errors
    /// As above, or [`Error::Closed`] after [`close`](Self::close).
    pub async fn connect(&self) -> Result<()> {
        if self.inner.config.retry_initial_connect {
            self.ensure_open()?;
            // The task holds the client only while an attempt runs, so a
            // client dropped without `close()` is freed and the task ends.
            let weak = Arc::downgrade(&self.inner);
            tokio::spawn(async move {
                loop {
                    let Some(inner) = weak.upgrade() else { break };
                    let client = Client { inner };
                    let pause = match client.connect_once().await {
                        Ok(()) | Err(Error::Closed) => break,
                        Err(Error::CircuitOpen { retry_after }) => retry_after,
                        Err(err) => {
                            tracing::debug!(%err, "initial connect failed; retrying");
                            client.inner.config.reconnect_wait
                        }
                    };
                    drop(client);
                    tokio::time::sleep(pause).await;
                }
            });
            return Ok(());
        }
        self.connect_once().await
    }

    async fn connect_once(&self) -> Result<()> {
        self.ensure_open()?;
        let _guard = self.inner.connect_lock.lock().await;
        if self.inner.conn.get().is_some() {
            return Ok(());
        }
        let permit = self.guard()?;
        let _ = self.inner.signals.send(Signal::Connecting);
        let options = self.connect_options().await?;
        let timeout = self.inner.config.connect_timeout;
        let urls = self.server_addrs()?;
        // The whole connect, handshake included, runs in its own task under
        // the timeout: a peer that makes async-nats work hard inside one poll
        // (a huge INFO line) cannot hold this call past the timeout, and the
        // task is aborted at its next await.
        let attempt = tokio::spawn(options.connect(urls));
        let abort = attempt.abort_handle();
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(Ok(conn))) => Ok(conn),
            Ok(Ok(Err(err))) => Err(Error::Connect(err)),
            Ok(Err(join)) => Err(Error::InvalidConfig(format!("connect task failed: {join}"))),
            Err(_) => {
                abort.abort();
                Err(Error::ConnectionTimeout(timeout))
            }
        };
        match permit.record(result) {
            Ok(conn) => {
                self.inner.connected.store(
                    conn.connection_state() == async_nats::connection::State::Connected,
                    Ordering::Release,
                );
                let _ = self.inner.conn.set(conn);
                tracing::info!(urls = ?self.inner.config.urls, "connected to NATS");
                // `Ok` means connected and healthy at once: let the status
                // task take the connection in before returning.
                let _ = self.inner.signals.send(Signal::Established);
                let mut status = self.status_watch();
                let ready = status.wait_for(|s| matches!(s, Status::Connected | Status::Closed));
                let _ = tokio::time::timeout(self.inner.config.connect_timeout, ready).await;
                Ok(())
            }
            Err(err) => {
                tracing::warn!(%err, "connect failed");
                let _ = self
                    .inner
                    .signals
                    .send(Signal::ConnectFailed(err.to_string()));
                Err(err)
            }
        }
    }

    fn server_addrs(&self) -> Result<Vec<async_nats::ServerAddr>> {
        self.inner
            .config
            .urls
            .iter()
            .map(|u| {
                u.parse()
                    .map_err(|e| Error::InvalidConfig(format!("bad server URL {u:?}: {e}")))
            })
            .collect()
    }

    async fn connect_options(&self) -> Result<async_nats::ConnectOptions> {
        let config = &self.inner.config;
        let secrets = self
            .inner
            .secrets
            .lock()
            .map_err(|_| Error::InvalidConfig("credentials lock poisoned".into()))?
            .clone()
            .ok_or(Error::Closed)?;
        let mut options = match &secrets.credentials_file {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|source| Error::Io {
                    path: path.display().to_string(),
                    source,
                })?,
            None => async_nats::ConnectOptions::new(),
        };
        if let (Some(user), Some(password)) = (&secrets.user, &secrets.password) {
            options = options.user_and_password(user.to_string(), password.to_string());
        }
        if let Some(token) = &secrets.token {
            options = options.token(token.to_string());
        }
        if let Some(seed) = &secrets.nkey_seed {
            options = options.nkey(seed.to_string());
        }
        drop(secrets);
        for ca in &config.tls.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &config.tls.client_cert {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if let Some(name) = &config.name {
            options = options.name(name);
        }
        let signals = self.inner.signals.clone();
        let connected = self.inner.connected.clone();
        let breaker = self.inner.breaker.clone();
        let ever_connected = self.inner.ever_connected.clone();
        let epoch = self.inner.epoch.clone();
        let wait = Backoff {
            jitter: 0.2,
            ..Backoff::new(
                Duration::from_millis(100).min(config.reconnect_wait),
                config.reconnect_wait,
            )
        };
        Ok(options
            .require_tls(config.tls.required)
            .connection_timeout(config.connect_timeout)
            .ping_interval(config.ping_interval)
            // async-nats' buffer only stages messages for natskit's reader,
            // which counts its own drops exactly; keep it roomy so bursts
            // never overflow it (its drops are reported by lossy events).
            .subscription_capacity(config.subscription_capacity.max(STAGING_CAPACITY))
            // natskit checks every subject it publishes to more strictly
            // (tokens, control characters, length) before async-nats sees
            // it; async-nats' second scan cost about 10% of core publish
            // throughput. Subscribe subjects are still checked by both.
            .skip_subject_validation(true)
            .max_reconnects(config.max_reconnects)
            .event_callback(move |event| {
                match event {
                    async_nats::Event::Connected => {
                        connected.store(true, Ordering::Release);
                        epoch.send_modify(|e| *e += 1);
                    }
                    async_nats::Event::Disconnected | async_nats::Event::Closed => {
                        connected.store(false, Ordering::Release);
                    }
                    _ => {}
                }
                let _ = signals.send(Signal::Nats(event));
                std::future::ready(())
            })
            .reconnect_delay_callback(move |attempts| {
                // The first attempt after a drop goes at once; later ones
                // back off from 100 ms to the reconnect wait, so a restarted
                // server is found quickly and a dead one is not hammered.
                // Each call after the first means the previous attempt
                // failed: that feeds the breaker, which fails user calls
                // fast meanwhile.
                if attempts <= 1 || !ever_connected.load(Ordering::Acquire) {
                    return Duration::ZERO;
                }
                breaker.connection_failed();
                let step = u32::try_from(attempts - 2).unwrap_or(u32::MAX);
                wait.delay_random(step)
            }))
    }

    /// The one prologue of every outgoing message, in the order every
    /// operation checks: closed; invalid input (the subject, the caller's
    /// headers, whatever `extra` checks and adds to the traced headers, then
    /// payload plus every header against the server's maximum); the
    /// circuit; the connection.
    #[inline]
    pub(crate) fn prologue(
        &self,
        subject: &str,
        headers: Option<async_nats::HeaderMap>,
        payload: usize,
        extra: impl FnOnce(Option<async_nats::HeaderMap>) -> Result<Option<async_nats::HeaderMap>>,
    ) -> Result<Outgoing<'_>> {
        self.ensure_open()?;
        crate::subject::validate_publish(subject)?;
        if let Some(headers) = &headers {
            crate::header::validate(headers)?;
        }
        let headers = extra(crate::trace::outgoing(
            headers,
            self.inner.config.trace_mode,
        ))?;
        let conn = self.inner.conn.get();
        if let Some(conn) = conn {
            crate::handler::check_payload(conn, payload, headers.as_ref())?;
        }
        let permit = self.guard()?;
        let conn = self.usable(conn.ok_or(Error::NotConnected)?)?;
        Ok(Outgoing {
            permit,
            conn,
            headers,
        })
    }

    /// Admits a call through the breaker, counting rejections.
    #[inline]
    pub(crate) fn guard(&self) -> Result<crate::breaker::Permit<'_>> {
        self.inner
            .breaker
            .acquire()
            .inspect_err(|_| self.inner.metrics.breaker_rejections.increment(1))
    }

    /// The settings (for feature modules; `Inner` stays private here).
    pub(crate) fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Where the shared JetStream context is kept once made.
    pub(crate) fn jetstream_cell(&self) -> &OnceLock<async_nats::jetstream::Context> {
        &self.inner.jetstream
    }

    /// The client's metric handles.
    pub(crate) fn metrics(&self) -> &crate::metrics::ClientMetrics {
        &self.inner.metrics
    }

    /// Subscription bookkeeping.
    pub(crate) fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The consumers this client runs.
    pub(crate) fn consumers(&self) -> &crate::registry::Consumers {
        &self.inner.consumers
    }

    /// Tasks `close` waits for.
    pub(crate) fn tasks(&self) -> &TaskTracker {
        &self.inner.tasks
    }

    /// Cancelled when the client is dropped or closed.
    pub(crate) fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The client-wide count of dropped messages, shared with subscriptions.
    pub(crate) fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.inner.counters.dropped.clone()
    }

    /// A handle for the client's own tasks that does not keep it alive.
    pub(crate) fn downgrade(&self) -> WeakClient {
        WeakClient(Arc::downgrade(&self.inner))
    }

    /// A receiver of the connection epoch, bumped on every (re)connection.
    pub(crate) fn connection_epoch(&self) -> watch::Receiver<u64> {
        self.inner.epoch.subscribe()
    }

    pub(crate) fn ensure_open(&self) -> Result<()> {
        if self.inner.lifecycle.load(Ordering::Acquire) == OPEN {
            Ok(())
        } else {
            Err(Error::Closed)
        }
    }

    /// The underlying async-nats client, for what natskit does not wrap.
    ///
    /// natskit checks every subject it publishes to before async-nats sees
    /// it, so this connection skips async-nats' own publish-subject check
    /// (`skip_subject_validation`): publish through it only to subjects
    /// checked with [`subject::validate_publish`](crate::subject::validate_publish).
    ///
    /// # Errors
    /// [`Error::NotConnected`] before the first connection, [`Error::Closed`]
    /// after close.
    pub fn nats(&self) -> Result<&async_nats::Client> {
        if self.inner.lifecycle.load(Ordering::Acquire) == CLOSED {
            return Err(Error::Closed);
        }
        self.inner.conn.get().ok_or(Error::NotConnected)
    }

    /// The connection, checked for use by an operation: open, connected
    /// (unless buffering while disconnected is on).
    #[inline]
    pub(crate) fn live_conn(&self) -> Result<&async_nats::Client> {
        self.usable(self.nats()?)
    }

    /// `conn` if it may be used now: connected, or buffering while
    /// disconnected is on.
    #[inline]
    fn usable<'a>(&self, conn: &'a async_nats::Client) -> Result<&'a async_nats::Client> {
        if !self.inner.config.buffer_when_disconnected
            && !self.inner.connected.load(Ordering::Acquire)
        {
            // async-nats drops events when its event queue is full: ask the
            // authoritative state before refusing, and repair the mirror.
            if conn.connection_state() != async_nats::connection::State::Connected {
                return Err(Error::NotConnected);
            }
            self.inner.connected.store(true, Ordering::Release);
        }
        Ok(conn)
    }

    /// Current status. Closing and the circuit breaker are reflected at
    /// once; connection changes as soon as the client's event task has seen
    /// them (see [`status_watch`](Self::status_watch)).
    pub fn status(&self) -> Status {
        if self.inner.lifecycle.load(Ordering::Acquire) == CLOSED {
            return Status::Closed;
        }
        if self.inner.breaker.state() != BreakerState::Closed {
            return Status::CircuitOpen;
        }
        *self.inner.status.borrow()
    }

    /// A receiver that sees every status change.
    pub fn status_watch(&self) -> watch::Receiver<Status> {
        self.inner.status.clone()
    }

    /// Detailed status: breaker counts, reconnects, RTT, health, drops.
    pub fn status_info(&self) -> StatusInfo {
        let breaker = self.inner.breaker.snapshot();
        let counters = &self.inner.counters;
        let rtt = counters.rtt_nanos.load(Ordering::Relaxed);
        StatusInfo {
            status: self.status(),
            breaker: breaker.state,
            consecutive_failures: breaker.consecutive_failures,
            total_failures: breaker.total_failures,
            last_failure: breaker
                .last_failure
                .and_then(|at| SystemTime::now().checked_sub(at.elapsed())),
            reconnects: counters.reconnects.load(Ordering::Relaxed),
            rtt: (rtt > 0).then(|| Duration::from_nanos(rtt)),
            healthy: counters.healthy.load(Ordering::Relaxed),
            dropped_messages: counters.dropped.load(Ordering::Relaxed),
            callback_panics: counters.callback_panics.load(Ordering::Relaxed),
            outbox: self
                .inner
                .outbox_stats
                .lock()
                .ok()
                .and_then(|source| source.as_ref().map(|read| read())),
        }
    }

    /// Attaches an outbox's figures to [`status_info`](Self::status_info);
    /// `false` when another outbox is attached already.
    pub(crate) fn attach_outbox_stats(&self, source: OutboxStatsSource) -> bool {
        match self.inner.outbox_stats.lock() {
            Ok(mut slot) if slot.is_none() => {
                *slot = Some(source);
                true
            }
            _ => false,
        }
    }

    /// Whether an outbox is attached.
    pub(crate) fn has_outbox(&self) -> bool {
        self.inner
            .outbox_stats
            .lock()
            .map_or(true, |slot| slot.is_some())
    }

    /// Detaches `source` if it is the one attached (an outbox closed long
    /// ago must not detach its successor).
    pub(crate) fn detach_outbox_stats(&self, source: &OutboxStatsSource) {
        if let Ok(mut slot) = self.inner.outbox_stats.lock()
            && slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, source))
        {
            *slot = None;
        }
    }

    /// Whether the last health check passed (connected, ping answered).
    pub fn is_healthy(&self) -> bool {
        self.inner.counters.healthy.load(Ordering::Relaxed)
    }

    /// Consecutive failures counted by the breaker.
    pub fn failures(&self) -> u32 {
        self.inner.breaker.snapshot().consecutive_failures
    }

    /// The breaker's current open time (or the next one, while closed).
    pub fn backoff(&self) -> Duration {
        self.inner.breaker.snapshot().backoff
    }

    /// The circuit breaker, for [`trip`](CircuitBreaker::trip),
    /// [`reset`](CircuitBreaker::reset) and inspection.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.inner.breaker
    }

    /// The server URLs, comma separated.
    pub fn urls(&self) -> String {
        self.inner.config.urls.join(",")
    }

    /// Measures the round-trip time: a message to a fresh inbox of this
    /// client, through the server and back.
    ///
    /// # Errors
    /// Not connected, or no echo within the connect timeout.
    pub async fn rtt(&self) -> Result<Duration> {
        let conn = self.live_conn()?;
        let rtt = sync_with_server(conn, self.inner.config.connect_timeout).await?;
        self.inner
            .counters
            .rtt_nanos
            .store(duration_nanos(rtt), Ordering::Relaxed);
        Ok(rtt)
    }

    /// Returns once the server has processed everything this client sent
    /// before the call: a round trip through the server (async-nats'
    /// `flush` only writes the socket, which a frozen server does not
    /// stop). Bounded by the connect timeout.
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// client.publish("audit.login", "alice").await?;
    /// client.flush().await?; // the server has it
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Closed`], [`Error::NotConnected`], or
    /// [`Error::ConnectionTimeout`] when the server did not answer in time.
    pub async fn flush(&self) -> Result<()> {
        self.ensure_open()?;
        let conn = self.live_conn()?;
        sync_with_server(conn, self.inner.config.connect_timeout)
            .await
            .map(drop)
    }

    /// Waits until the status is [`Status::Connected`].
    ///
    /// # Errors
    /// [`Error::ConnectionTimeout`] after `timeout`; [`Error::Closed`] if the
    /// client is closed meanwhile.
    pub async fn wait_for_connection(&self, timeout: Duration) -> Result<()> {
        self.ensure_open()?;
        let mut status = self.status_watch();
        let wait = status.wait_for(|s| matches!(s, Status::Connected | Status::Closed));
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(s)) if *s == Status::Connected => Ok(()),
            Ok(_) => Err(Error::Closed),
            Err(_) => Err(Error::ConnectionTimeout(timeout)),
        }
    }

    /// Closes the client gracefully: stops JetStream consumers and new
    /// subscriptions, drains every subscription so the messages already
    /// received are handled, flushes what was published, and closes the
    /// connection, all within the drain timeout.
    /// Credentials held by natskit are wiped. Idempotent: a second call
    /// returns `Ok(())` at once. Afterwards every call returns
    /// [`Error::Closed`].
    ///
    /// # Errors
    /// [`Error::DrainTimeout`] when handlers did not finish in time (the
    /// client is closed anyway).
    pub async fn close(&self) -> Result<()> {
        if self
            .inner
            .lifecycle
            .compare_exchange(OPEN, CLOSING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Ok(());
        }
        let timeout = self.inner.config.drain_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut result = Ok(());
        let conn = self.inner.conn.get();
        // JetStream consumers stop pulling first; a handler already running
        // finishes (its ack still goes out).
        if tokio::time::timeout_at(deadline, self.inner.consumers.stop_all())
            .await
            .is_err()
        {
            result = Err(Error::DrainTimeout(timeout));
        }
        // async-nats' own drain drops messages still in flight from the
        // server, so natskit drains itself: one round trip through the server
        // (every message sent to us before it is then in a subscription's
        // buffer), then each subscription handles its buffer and unsubscribes.
        if let Some(conn) = conn
            && conn.connection_state() == async_nats::connection::State::Connected
        {
            let bound = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Err(err) = sync_with_server(conn, bound).await {
                tracing::warn!(%err, "could not sync with the server before draining");
            }
        }
        self.inner.registry.drain_all();
        self.inner.tasks.close();
        if tokio::time::timeout_at(deadline, self.inner.tasks.wait())
            .await
            .is_err()
        {
            result = Err(Error::DrainTimeout(timeout));
        }
        if let Some(conn) = conn {
            // Flushes what handlers published, then closes the connection.
            if let Err(err) = conn.drain().await {
                tracing::debug!(%err, "closing the connection failed");
            }
        }
        self.inner.lifecycle.store(CLOSED, Ordering::Release);
        // `Closed` is queued before the shutdown token fires, and the status
        // task treats the token as `Closed` too: every watcher and callback
        // sees `Closed` exactly once, last, whichever it takes first.
        let _ = self.inner.signals.send(Signal::Closed);
        self.inner.shutdown.cancel();
        if let Ok(mut secrets) = self.inner.secrets.lock() {
            // Dropping Zeroizing values overwrites them.
            *secrets = None;
        }
        tracing::info!("NATS client closed");
        result
    }
}

/// Splits `scheme://userinfo@host...` into the URL without the userinfo and
/// the userinfo. Pure; never fails.
fn split_userinfo(url: &str) -> (String, Option<Zeroizing<String>>) {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = Zeroizing::new(rest[..at].to_owned());
            let clean = format!("{}{}", &url[..start], &rest[at + 1..]);
            (clean, Some(userinfo))
        }
        None => (url.to_owned(), None),
    }
}

/// `%XX` escapes decoded (a URL's userinfo may escape `:` `@` `/`).
fn percent_decode(text: &str) -> Zeroizing<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Zeroizing::new(String::from_utf8_lossy(&out).into_owned())
}

/// Uses credentials from the URLs as user/password (`user:pass@`) or token
/// (`token@`) when none were set on the builder.
fn apply_url_credentials(secrets: &mut Secrets) -> Result<()> {
    let Some(first) = secrets.url_userinfo.first() else {
        return Ok(());
    };
    if secrets.url_userinfo.iter().any(|u| **u != **first) {
        return Err(Error::InvalidConfig(
            "the server URLs carry different credentials; give them once with \
             user_password() or token()"
                .into(),
        ));
    }
    if secrets.user.is_some() || secrets.token.is_some() {
        return Ok(()); // explicit credentials win
    }
    match first.split_once(':') {
        Some((user, password)) => {
            secrets.user = Some(percent_decode(user));
            secrets.password = Some(percent_decode(password));
        }
        None => secrets.token = Some(percent_decode(first)),
    }
    Ok(())
}

pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

/// One round trip through the server on a fresh inbox. When it returns,
/// every message the server sent this connection before has been handed to
/// its subscription.
pub(crate) async fn sync_with_server(
    conn: &async_nats::Client,
    timeout: Duration,
) -> Result<Duration> {
    let mut probe = Probe::new(conn).await?;
    probe.round_trip(conn, timeout).await
}

/// A subscription on a private inbox that measures round trips through the
/// server. (`flush` only waits for the socket, so it cannot tell a frozen
/// server from a live one.)
struct Probe {
    subject: async_nats::Subject,
    subscriber: async_nats::Subscriber,
    seq: u64,
}

impl Probe {
    async fn new(conn: &async_nats::Client) -> Result<Self> {
        let subject = async_nats::Subject::from(conn.new_inbox());
        let subscriber = conn
            .subscribe(subject.clone())
            .await
            .map_err(Error::Subscribe)?;
        Ok(Self {
            subject,
            subscriber,
            seq: 0,
        })
    }

    async fn round_trip(
        &mut self,
        conn: &async_nats::Client,
        timeout: Duration,
    ) -> Result<Duration> {
        use futures_util::StreamExt;
        self.seq += 1;
        let token = bytes::Bytes::from(self.seq.to_string());
        let start = Instant::now();
        conn.publish(self.subject.clone(), token.clone())
            .await
            .map_err(Error::Publish)?;
        let echo = async {
            // Skip echoes of earlier probes that timed out.
            while let Some(msg) = self.subscriber.next().await {
                if msg.payload == token {
                    return true;
                }
            }
            false
        };
        match tokio::time::timeout(timeout, echo).await {
            Ok(true) => Ok(start.elapsed()),
            Ok(false) => Err(Error::NotConnected),
            Err(_) => Err(Error::ConnectionTimeout(timeout)),
        }
    }
}

/// What the supervisor task reacts to.
pub(crate) enum Signal {
    Nats(async_nats::Event),
    Breaker(BreakerState),
    Connecting,
    /// `connect()` succeeded (in case async-nats' event was dropped).
    Established,
    ConnectFailed(String),
    Closed,
}

/// Why a round trip through the server was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeKind {
    Health,
    Breaker,
}

/// How often the client probes the server itself while the breaker is open
/// and the connection is up (a frozen or overloaded server).
const BREAKER_PROBE_INTERVAL: Duration = Duration::from_millis(250);

type ProbeFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = (ProbeKind, Option<Probe>, Result<Duration>)> + Send>,
>;

/// Runs a user callback, catching and counting a panic so that the status
/// task survives it.
fn fire(inner: &Weak<Inner>, what: &'static str, callback: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(callback)).is_err() {
        tracing::error!(callback = what, "client callback panicked; ignored");
        if let Some(inner) = inner.upgrade() {
            inner
                .counters
                .callback_panics
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The status task: a thin async shell around [`StatusCore`], which decides
/// what status, health and callbacks follow from each input. The shell
/// turns signals, timers and probe results into inputs and carries out the
/// effects in order. Round trips (health checks, and probes while the
/// breaker is open) run beside it, so a frozen server never delays a status
/// change.
async fn supervise(
    inner: Weak<Inner>,
    mut signals: mpsc::UnboundedReceiver<Signal>,
    status_tx: watch::Sender<Status>,
    shutdown: CancellationToken,
) {
    let Some(strong) = inner.upgrade() else {
        return;
    };
    let config = strong.config.clone();
    let registry = strong.registry.clone();
    let metrics = strong.metrics.clone();
    drop(strong);
    let callbacks = config.callbacks.clone();
    let mut core = StatusCore::new(config.connection_lost_after);
    let mut probe: Option<Probe> = None;
    let mut probing: Option<ProbeFuture> = None;
    let mut health = config.health_interval.map(|every| {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    let mut breaker_ticker = tokio::time::interval(BREAKER_PROBE_INTERVAL);
    breaker_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Carries out the effects of one input, in order.
    let apply = |effects: Vec<StatusEffect>| {
        for effect in effects {
            match effect {
                StatusEffect::ConnectionSucceeded => {
                    if let Some(inner) = inner.upgrade() {
                        inner.ever_connected.store(true, Ordering::Release);
                        inner.breaker.connection_succeeded();
                    }
                }
                StatusEffect::CountReconnect => {
                    if let Some(inner) = inner.upgrade() {
                        inner.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    metrics.reconnects.increment(1);
                }
                StatusEffect::Disconnected(reason) => {
                    tracing::warn!(?reason, "disconnected from NATS");
                    if let Some(cb) = &callbacks.on_disconnect {
                        fire(&inner, "on_disconnect", || cb(reason.as_deref()));
                    }
                }
                StatusEffect::Reconnected => {
                    tracing::info!("reconnected to NATS");
                    if let Some(cb) = &callbacks.on_reconnect {
                        fire(&inner, "on_reconnect", || cb());
                    }
                }
                StatusEffect::ConnectionLost(reason) => {
                    tracing::error!(after = ?config.connection_lost_after, ?reason, "NATS connection lost");
                    if let Some(cb) = &callbacks.on_connection_lost {
                        fire(&inner, "on_connection_lost", || cb(reason.as_deref()));
                    }
                }
                StatusEffect::HealthChanged(healthy) => {
                    if let Some(inner) = inner.upgrade() {
                        inner.counters.healthy.store(healthy, Ordering::Relaxed);
                    }
                    tracing::info!(healthy, "NATS health changed");
                    if let Some(cb) = &callbacks.on_health_change {
                        fire(&inner, "on_health_change", || cb(healthy));
                    }
                }
                StatusEffect::StatusChanged(status) => {
                    tracing::debug!(%status, "status changed");
                    status_tx.send_replace(status);
                    metrics.status.set(crate::metrics::status_code(status));
                    if let Some(cb) = &callbacks.on_status_change {
                        fire(&inner, "on_status_change", || cb(status));
                    }
                }
            }
        }
    };
    // Starts a round trip unless one is running; the probe subscription is
    // kept between round trips.
    let start_probe =
        |kind: ProbeKind, probe: &mut Option<Probe>, probing: &mut Option<ProbeFuture>| {
            if probing.is_some() {
                return;
            }
            let Some(conn) = inner.upgrade().and_then(|i| i.conn.get().cloned()) else {
                return;
            };
            let bound = match kind {
                ProbeKind::Health => config
                    .health_interval
                    .unwrap_or(config.connect_timeout)
                    .min(config.connect_timeout),
                ProbeKind::Breaker => Duration::from_secs(1),
            };
            let existing = probe.take();
            *probing = Some(Box::pin(async move {
                let mut p = match existing {
                    Some(p) => p,
                    None => match Probe::new(&conn).await {
                        Ok(p) => p,
                        Err(err) => return (kind, None, Err(err)),
                    },
                };
                let result = p.round_trip(&conn, bound).await;
                (kind, Some(p), result)
            }));
        };

    while !core.is_closed() {
        let lost_at = core.lost_deadline();
        let lost_sleep = async {
            match lost_at {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        let health_tick = async {
            match health.as_mut() {
                Some(interval) => interval.tick().await,
                None => std::future::pending().await,
            }
        };
        let probe_done = async {
            match probing.as_mut() {
                Some(fut) => fut.await,
                None => std::future::pending().await,
            }
        };
        let probe_breaker = core.should_probe_breaker();
        let input = tokio::select! {
            () = shutdown.cancelled() => {
                probe = None;
                probing = None;
                health = None;
                StatusInput::Closed
            }
            signal = signals.recv() => {
                let Some(signal) = signal else { break };
                match signal {
                    Signal::Nats(async_nats::Event::Connected) | Signal::Established => StatusInput::Connected,
                    Signal::Nats(async_nats::Event::Disconnected) => StatusInput::Disconnected,
                    Signal::Nats(async_nats::Event::SlowConsumer(sid)) => {
                        // Counted client-wide by the subscription's cell
                        // (or here when the id is unknown).
                        if !registry.record_drop(sid)
                            && let Some(inner) = inner.upgrade()
                        {
                            inner.counters.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    Signal::Nats(async_nats::Event::ServerError(err)) => {
                        tracing::warn!(%err, "NATS server error");
                        StatusInput::ServerError(err.to_string())
                    }
                    Signal::Nats(async_nats::Event::ClientError(err)) => {
                        tracing::warn!(%err, "NATS client error");
                        StatusInput::ClientError {
                            gave_up: matches!(err, async_nats::ClientError::MaxReconnects),
                            message: err.to_string(),
                        }
                    }
                    Signal::Nats(event) => {
                        tracing::debug!(%event, "NATS event");
                        continue;
                    }
                    Signal::Breaker(state) => {
                        tracing::info!(%state, "circuit breaker changed");
                        StatusInput::Breaker(state)
                    }
                    Signal::Connecting => StatusInput::Connecting,
                    Signal::ConnectFailed(err) => StatusInput::ConnectFailed(err),
                    Signal::Closed => {
                        probe = None;
                        probing = None;
                        health = None;
                        StatusInput::Closed
                    }
                }
            }
            () = lost_sleep => StatusInput::LostTimerFired,
            _ = breaker_ticker.tick(), if probe_breaker => {
                start_probe(ProbeKind::Breaker, &mut probe, &mut probing);
                continue;
            }
            (kind, kept, measured) = probe_done => {
                probing = None;
                probe = kept;
                match (&measured, kind) {
                    (Ok(rtt), _) => {
                        if let Some(inner) = inner.upgrade() {
                            inner.counters.rtt_nanos.store(duration_nanos(*rtt), Ordering::Relaxed);
                            // The server answers: let the half-open probe through now.
                            if inner.breaker.server_reachable() {
                                tracing::info!(?rtt, "server reachable again; admitting the breaker's probe");
                            }
                        }
                    }
                    (Err(err), ProbeKind::Health) => tracing::warn!(%err, "health check failed"),
                    (Err(_), ProbeKind::Breaker) => {}
                }
                if kind == ProbeKind::Breaker {
                    continue;
                }
                StatusInput::HealthChecked(measured.is_ok())
            }
            _ = health_tick => {
                let Some(conn) = inner.upgrade().and_then(|i| i.conn.get().cloned()) else {
                    continue;
                };
                // Events can be dropped by async-nats when its queue is full:
                // reconcile with the authoritative state, then check health.
                let up = conn.connection_state() == async_nats::connection::State::Connected;
                let effects = core.handle(StatusInput::LinkObserved { up }, std::time::Instant::now());
                apply(effects);
                if core.is_up() {
                    start_probe(ProbeKind::Health, &mut probe, &mut probing);
                    continue;
                }
                StatusInput::HealthChecked(false)
            }
        };
        let effects = core.handle(input, std::time::Instant::now());
        apply(effects);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_userinfo_is_taken_out() {
        let (clean, info) = split_userinfo("nats://alice:s3cret@host:4222/x");
        assert_eq!(clean, "nats://host:4222/x");
        assert_eq!(info.as_deref().map(String::as_str), Some("alice:s3cret"));
        let (clean, info) = split_userinfo("tls://tok@host");
        assert_eq!((clean.as_str(), info.is_some()), ("tls://host", true));
        let (clean, info) = split_userinfo("host:4222");
        assert_eq!((clean.as_str(), info.is_none()), ("host:4222", true));
        // An '@' after the authority is not userinfo.
        let (clean, info) = split_userinfo("nats://host/a@b");
        assert_eq!((clean.as_str(), info.is_none()), ("nats://host/a@b", true));
    }

    #[test]
    fn url_credentials_become_user_password_or_token() {
        let builder = ClientBuilder::new("nats://al%40ice:p%3Ass@a:1, nats://al%40ice:p%3Ass@b:2");
        let mut secrets = builder.secrets.clone();
        apply_url_credentials(&mut secrets).expect("same credentials");
        assert_eq!(secrets.user.as_deref().map(String::as_str), Some("al@ice"));
        assert_eq!(
            secrets.password.as_deref().map(String::as_str),
            Some("p:ss")
        );
        assert_eq!(builder.config.urls, vec!["nats://a:1", "nats://b:2"]);
        let debug = format!("{builder:?}");
        assert!(
            !debug.contains("p%3Ass") && !debug.contains("ice"),
            "{debug}"
        );

        let mut token = ClientBuilder::new("nats://t0ken@a:1").secrets;
        apply_url_credentials(&mut token).expect("a token");
        assert_eq!(token.token.as_deref().map(String::as_str), Some("t0ken"));

        let mut mixed = ClientBuilder::new("nats://u:p@a:1,nats://v:q@b:2").secrets;
        let err = apply_url_credentials(&mut mixed).expect_err("different credentials");
        let text = err.to_string();
        assert!(!text.contains("u:p") && !text.contains("v:q"), "{text}");
    }
}
