//! [`ClientBuilder`]: every setting of a client, with its default.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zeroize::Zeroizing;

use super::status_task::{Signal, supervise};
use super::url::{apply_url_credentials, split_userinfo};
use super::{Client, Counters, Inner, JsScope, OPEN};
use crate::client::breaker::{BreakerConfig, CircuitBreaker, FailurePredicate, SystemClock};
use crate::client::registry::Registry;
use crate::core::error::{Error, Result, check_nonzero};
use crate::core::status::{DisconnectReason, JetStreamReach, Status};

pub(crate) type Callback0 = Arc<dyn Fn() + Send + Sync>;
pub(crate) type CallbackReach = Arc<dyn Fn(&JetStreamReach) + Send + Sync>;
pub(crate) type CallbackReason = Arc<dyn Fn(&DisconnectReason) + Send + Sync>;
pub(crate) type CallbackBool = Arc<dyn Fn(bool) + Send + Sync>;
pub(crate) type CallbackStatus = Arc<dyn Fn(Status) + Send + Sync>;

#[derive(Clone, Default)]
pub(crate) struct Callbacks {
    pub(crate) on_disconnect: Option<CallbackReason>,
    pub(crate) on_reconnect: Option<Callback0>,
    pub(crate) on_connection_lost: Option<CallbackReason>,
    pub(crate) on_health_change: Option<CallbackBool>,
    pub(crate) on_jetstream_reachability: Option<CallbackReach>,
    pub(crate) on_status_change: Option<CallbackStatus>,
}

/// Credentials, zeroized when dropped, and dropped by [`Client::close`].
#[derive(Clone, Default)]
pub(crate) struct Secrets {
    pub(crate) user: Option<Zeroizing<String>>,
    pub(crate) password: Option<Zeroizing<String>>,
    pub(crate) token: Option<Zeroizing<String>>,
    pub(crate) nkey_seed: Option<Zeroizing<String>>,
    pub(crate) credentials_file: Option<PathBuf>,
    /// `user:password` or `token` found in the URLs (removed from them).
    pub(crate) url_userinfo: Vec<Zeroizing<String>>,
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
pub(crate) struct TlsConfig {
    pub(crate) required: bool,
    pub(crate) ca: Vec<PathBuf>,
    pub(crate) client_cert: Option<(PathBuf, PathBuf)>,
}

/// The JetStream API a client targets by default.
#[derive(Debug, Clone, Default)]
pub(crate) enum JetStreamTarget {
    /// `$JS.API`: the connected server's own domain.
    #[default]
    Default,
    /// `$JS.<domain>.API`.
    Domain(String),
    /// Any API prefix.
    Prefix(String),
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
    pub(crate) trace_mode: crate::client::trace::TraceMode,
    /// The JetStream target as given (checked in `build`).
    pub(crate) jetstream: JetStreamTarget,
    pub(crate) tls: TlsConfig,
    pub(crate) callbacks: Callbacks,
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
    pub(crate) config: Config,
    pub(crate) secrets: Secrets,
}

impl ClientBuilder {
    pub(crate) fn new(urls: &str) -> Self {
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
                trace_mode: crate::client::trace::TraceMode::Full,
                jetstream: JetStreamTarget::Default,
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
        /// Deadline for one message handler invocation (default 30 s),
        /// counted from the moment the handler first waits: a handler
        /// cannot be interrupted while it runs, so the deadline bounds its
        /// waiting, and a handler that never waits is never cancelled.
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
        /// [`TraceMode::Full`](crate::client::trace::TraceMode::Full): `traceparent`
        /// and the three `X-*` headers; `W3c` for `traceparent` alone, `Off`
        /// for none).
        trace_mode: crate::client::trace::TraceMode => config.trace_mode);
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

    /// Targets the JetStream of `domain` (`$JS.<domain>.API`) with every
    /// JetStream call of this client: a service connected to its leaf node
    /// that works with the hub's streams, say (default: the connected
    /// server's own domain). [`Client::with_jetstream_domain`] gives a handle
    /// with another target on the same connection. An empty domain, or one
    /// with anything but letters, digits, `-` and `_`, is
    /// [`Error::InvalidConfig`] from [`build`](Self::build).
    pub fn jetstream_domain(mut self, domain: impl Into<String>) -> Self {
        self.config.jetstream = JetStreamTarget::Domain(domain.into());
        self
    }

    /// Targets the JetStream API at `prefix` (an account's imported API,
    /// for example `JS.acc@hub.API`); see
    /// [`jetstream_domain`](Self::jetstream_domain). A prefix that is not a
    /// subject without wildcards is [`Error::InvalidConfig`].
    pub fn jetstream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.jetstream = JetStreamTarget::Prefix(prefix.into());
        self
    }

    /// Called when the connection drops, with the last error the client saw.
    pub fn on_disconnect(mut self, f: impl Fn(&DisconnectReason) + Send + Sync + 'static) -> Self {
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
    pub fn on_connection_lost(
        mut self,
        f: impl Fn(&DisconnectReason) + Send + Sync + 'static,
    ) -> Self {
        self.config.callbacks.on_connection_lost = Some(Arc::new(f));
        self
    }

    /// Called when the health check result changes.
    pub fn on_health_change(mut self, f: impl Fn(bool) + Send + Sync + 'static) -> Self {
        self.config.callbacks.on_health_change = Some(Arc::new(f));
        self
    }

    /// Called when another JetStream domain or API this client targets
    /// ([`jetstream_domain`](Self::jetstream_domain),
    /// [`Client::with_jetstream_domain`]) starts or stops answering its
    /// `INFO` request, checked on the health schedule while the connection
    /// is up: on a leaf node, the uplink to the hub failing or healing.
    ///
    /// ```no_run
    /// # async fn demo() -> natskit::Result<()> {
    /// let client = natskit::Client::builder("nats://127.0.0.1:4222")
    ///     .jetstream_domain("hub")
    ///     .on_jetstream_reachability(|reach| {
    ///         println!("{} answers: {:?}", reach.api_prefix, reach.reachable)
    ///     })
    ///     .connect()
    ///     .await?;
    /// # let _ = client; Ok(()) }
    /// ```
    pub fn on_jetstream_reachability(
        mut self,
        f: impl Fn(&JetStreamReach) + Send + Sync + 'static,
    ) -> Self {
        self.config.callbacks.on_jetstream_reachability = Some(Arc::new(f));
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
        for (what, duration) in [
            ("connect_timeout", config.connect_timeout),
            ("drain_timeout", config.drain_timeout),
            ("request_timeout", config.request_timeout),
            ("handler_deadline", config.handler_deadline),
            (
                "health_interval",
                config.health_interval.unwrap_or(Duration::MAX),
            ),
        ] {
            check_nonzero(what, duration)?;
        }
        let js_prefix = match &config.jetstream {
            JetStreamTarget::Default => None,
            JetStreamTarget::Domain(domain) => {
                Some(crate::core::subject::domain_api_prefix(domain)?)
            }
            JetStreamTarget::Prefix(prefix) => {
                Some(crate::core::subject::check_api_prefix(prefix)?)
            }
        };
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
            crate::client::metrics::ClientMetrics::new(config.name.as_deref().unwrap_or("default"));
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
            uplinks: Mutex::new(
                js_prefix
                    .iter()
                    .map(|prefix| (prefix.clone(), None))
                    .collect(),
            ),
            default_js: Arc::new(JsScope::new(js_prefix)),
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
            message_ids: crate::core::message_id::MessageIds::new(nuid::next().as_str()),
        });
        tokio::spawn(supervise(
            Arc::downgrade(&inner),
            signal_rx,
            status_tx,
            shutdown,
        ));
        Ok(Client {
            js: inner.default_js.clone(),
            inner,
        })
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
