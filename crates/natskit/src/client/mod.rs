//! The resilient [`Client`]: configuration, connection lifecycle, status,
//! health and callbacks.

pub(crate) mod ack_inbox;
pub mod breaker;
mod builder;
pub(crate) mod handler;
pub(crate) mod jetstream_errors;
pub mod metrics;
pub(crate) mod registry;
pub(crate) mod retry;
mod status_task;
pub mod trace;
mod url;

pub(crate) use builder::Config;
use builder::Secrets;
pub use builder::{ClientBuilder, DEFAULT_REQUEST_TIMEOUT};
use status_task::Probe;
pub(crate) use status_task::Signal;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::breaker::{BreakerState, CircuitBreaker};
use crate::client::registry::Registry;
use crate::core::backoff::Backoff;
use crate::core::error::{Error, Result};
pub use crate::core::status::{JetStreamReach, Status, StatusInfo};
use crate::core::sync::lock;

/// Smallest buffer async-nats gets per subscription: 4x its default, so
/// that a burst never overflows it while natskit's reader catches up on a
/// loaded machine (the measurement is in `BENCHMARKS.md`). Memory is taken
/// only while messages wait in it.
const STAGING_CAPACITY: usize = 262_144;

const OPEN: u64 = 0;
const CLOSING: u64 = 1;
const CLOSED: u64 = 2;

#[derive(Debug, Default)]
pub(crate) struct Counters {
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
    /// The JetStream API the client targets by default (its builder's
    /// domain or prefix).
    pub(crate) default_js: Arc<JsScope>,
    /// Every JetStream API other than `$JS.API` a handle of this client
    /// targets, with whether it answered at the last check.
    pub(crate) uplinks: Mutex<BTreeMap<String, Option<bool>>>,
    connect_lock: tokio::sync::Mutex<()>,
    lifecycle: AtomicU64,
    /// Mirrors the connection state for the hot path (async-nats' own state
    /// sits behind a lock); set at connect and by connection events.
    connected: Arc<AtomicBool>,
    ever_connected: Arc<AtomicBool>,
    status: watch::Receiver<Status>,
    signals: mpsc::UnboundedSender<Signal>,
    /// Bumped on every (re)connection, and whenever another JetStream API
    /// this client targets answers again (a healed uplink): waits that a
    /// lost path would strand (a JetStream ack, a consumer's recreation, the
    /// outbox's window) resend or retry at once.
    pub(crate) epoch: Arc<watch::Sender<u64>>,
    /// Cancelled when the last `Client` handle is dropped (or at close):
    /// every task the client started ends, so nothing keeps the connection
    /// alive.
    shutdown: CancellationToken,
    counters: Counters,
    registry: Arc<Registry>,
    consumers: crate::client::registry::Consumers,
    metrics: crate::client::metrics::ClientMetrics,
    /// Subscription and handler tasks, awaited by `close`.
    tasks: TaskTracker,
    /// Reads the figures of the outbox attached to this client, if any.
    outbox_stats: Mutex<Option<OutboxStatsSource>>,
    /// Message ids for stream publishes that are not given one.
    message_ids: crate::core::message_id::MessageIds,
}

/// What an attached outbox gives `status_info` (the outbox lives in a layer
/// above the connection, so the client only holds this reader).
pub(crate) type OutboxStatsSource = Arc<dyn Fn() -> crate::core::status::OutboxStats + Send + Sync>;

/// An outgoing message that passed [`Client::prologue`].
pub(crate) struct Outgoing<'a> {
    /// Its breaker permit, to settle with the outcome.
    pub(crate) permit: crate::client::breaker::Permit<'a>,
    /// The live connection.
    pub(crate) conn: &'a async_nats::Client,
    /// Every header the message carries.
    pub(crate) headers: Option<async_nats::HeaderMap>,
}

impl Inner {
    /// The async-nats connection, once made.
    pub(crate) fn connection(&self) -> Option<&async_nats::Client> {
        self.conn.get()
    }

    /// How long a round trip to sync with the server may take.
    pub(crate) fn sync_timeout(&self) -> Duration {
        self.config.connect_timeout
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropped without `close()`: end every task, which releases the
        // subscriptions and, with them, the connection.
        self.shutdown.cancel();
    }
}

/// The JetStream API one client handle targets: `$JS.API` (the connected
/// server's own domain), `$JS.<domain>.API`, or a prefix of an account
/// import; with the context on the shared connection, made on first use.
#[derive(Debug, Default)]
pub(crate) struct JsScope {
    /// `None`: the default `$JS.API`.
    pub(crate) prefix: Option<String>,
    context: OnceLock<async_nats::jetstream::Context>,
}

impl JsScope {
    pub(crate) fn new(prefix: Option<String>) -> Self {
        Self {
            prefix,
            context: OnceLock::new(),
        }
    }

    /// The API prefix, `$JS.API` unless another was set.
    pub(crate) fn api_prefix(&self) -> &str {
        self.prefix.as_deref().unwrap_or(DEFAULT_API_PREFIX)
    }
}

/// The JetStream API prefix of the connected server's own domain.
pub(crate) const DEFAULT_API_PREFIX: &str = "$JS.API";

/// A handle that does not keep the client alive, for the client's own
/// tasks: they upgrade it while they work and end when it is gone. It keeps
/// the JetStream API its handle targeted.
#[derive(Clone)]
pub(crate) struct WeakClient(Weak<Inner>, Arc<JsScope>);

impl WeakClient {
    pub(crate) fn upgrade(&self) -> Option<Client> {
        self.0.upgrade().map(|inner| Client {
            inner,
            js: self.1.clone(),
        })
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
    /// The JetStream API this handle targets (see
    /// [`with_jetstream_domain`](Client::with_jetstream_domain)).
    pub(crate) js: Arc<JsScope>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("urls", &self.inner.config.urls)
            .field("status", &self.status())
            .field("secrets", &*lock(&self.inner.secrets))
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
                    let client = Client {
                        js: inner.default_js.clone(),
                        inner,
                    };
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
        let secrets = lock(&self.inner.secrets).clone().ok_or(Error::Closed)?;
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
        crate::core::subject::validate_publish(subject)?;
        if let Some(headers) = &headers {
            crate::core::header::validate(headers)?;
        }
        let headers = extra(crate::client::trace::outgoing(
            headers,
            self.inner.config.trace_mode,
        ))?;
        let conn = self.inner.conn.get();
        if let Some(conn) = conn {
            crate::client::handler::check_payload(conn, payload, headers.as_ref())?;
        }
        let permit = self.guard()?;
        // Not `ok_or(Error::NotConnected)`: that builds and drops an error
        // on every publish (about 25 instructions).
        let Some(conn) = conn else {
            return Err(Error::NotConnected);
        };
        let conn = self.usable(conn)?;
        Ok(Outgoing {
            permit,
            conn,
            headers,
        })
    }

    /// Admits a call through the breaker, counting rejections.
    #[inline]
    pub(crate) fn guard(&self) -> Result<crate::client::breaker::Permit<'_>> {
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
        &self.js.context
    }

    /// The client's metric handles.
    pub(crate) fn metrics(&self) -> &crate::client::metrics::ClientMetrics {
        &self.inner.metrics
    }

    /// Subscription bookkeeping.
    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    /// The consumers this client runs.
    pub(crate) fn consumers(&self) -> &crate::client::registry::Consumers {
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
    /// A handle on the same connection, breaker, status and subscriptions
    /// whose JetStream calls (streams, publishing, consumers, KV, the
    /// outbox, the monitor) go to the JetStream of `domain`, through
    /// `$JS.<domain>.API`: for a service on a leaf node that uses the hub's
    /// streams beside its own. Cheap; this handle keeps its own target.
    ///
    /// ```no_run
    /// # async fn demo(client: natskit::Client) -> natskit::Result<()> {
    /// let hub = client.with_jetstream_domain("hub")?;
    /// let ack = hub.publish_to_stream("orders.created", "{}").await?;
    /// assert_eq!(ack.domain, "hub");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a domain that is empty or holds anything
    /// but letters, digits, `-` and `_`.
    pub fn with_jetstream_domain(&self, domain: &str) -> Result<Client> {
        let prefix = crate::core::subject::domain_api_prefix(domain)?;
        Ok(self.with_js_prefix(Some(prefix)))
    }

    /// A handle like [`with_jetstream_domain`](Self::with_jetstream_domain)
    /// whose JetStream API is `prefix` (an account's imported API, for
    /// example `JS.acc@hub.API`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a prefix that is not a subject without
    /// wildcards.
    pub fn with_jetstream_prefix(&self, prefix: &str) -> Result<Client> {
        let prefix = crate::core::subject::check_api_prefix(prefix)?;
        Ok(self.with_js_prefix(Some(prefix)))
    }

    /// The JetStream API prefix this handle's JetStream calls go to:
    /// `$JS.API` (the connected server's domain) unless a domain or prefix
    /// was set.
    pub fn jetstream_api_prefix(&self) -> &str {
        self.js.api_prefix()
    }

    fn with_js_prefix(&self, prefix: Option<String>) -> Client {
        if let Some(prefix) = &prefix {
            lock(&self.inner.uplinks)
                .entry(prefix.clone())
                .or_insert(None);
        }
        let js = if prefix.as_deref() == self.inner.default_js.prefix.as_deref() {
            self.inner.default_js.clone()
        } else {
            Arc::new(JsScope::new(prefix))
        };
        Client {
            inner: self.inner.clone(),
            js,
        }
    }

    pub(crate) fn downgrade(&self) -> WeakClient {
        WeakClient(Arc::downgrade(&self.inner), self.js.clone())
    }

    /// A receiver of the connection epoch, bumped on every (re)connection
    /// and whenever another JetStream API this client targets answers again.
    pub(crate) fn connection_epoch(&self) -> watch::Receiver<u64> {
        self.inner.epoch.subscribe()
    }

    /// The client's message ids for stream publishes not given one.
    pub(crate) fn message_ids(&self) -> &crate::core::message_id::MessageIds {
        &self.inner.message_ids
    }

    /// The connection epoch now (see [`connection_epoch`](Self::connection_epoch)).
    pub(crate) fn epoch_now(&self) -> u64 {
        *self.inner.epoch.borrow()
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
    /// checked with [`subject::validate_publish`](crate::core::subject::validate_publish).
    ///
    /// # Errors
    /// [`Error::NotConnected`] before the first connection, [`Error::Closed`]
    /// after close.
    pub fn nats(&self) -> Result<&async_nats::Client> {
        if self.inner.lifecycle.load(Ordering::Acquire) == CLOSED {
            return Err(Error::Closed);
        }
        self.inner.conn.get().ok_or_else(not_connected)
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
            reconnects: self.inner.metrics.reconnects.get(),
            rtt: (rtt > 0).then(|| Duration::from_nanos(rtt)),
            healthy: counters.healthy.load(Ordering::Relaxed),
            dropped_messages: counters.dropped.load(Ordering::Relaxed),
            callback_panics: counters.callback_panics.load(Ordering::Relaxed),
            outbox: lock(&self.inner.outbox_stats).as_ref().map(|read| read()),
            jetstream_apis: lock(&self.inner.uplinks)
                .iter()
                .map(|(api_prefix, reachable)| JetStreamReach {
                    api_prefix: api_prefix.clone(),
                    reachable: *reachable,
                })
                .collect(),
        }
    }

    #[cfg_attr(not(feature = "outbox"), allow(dead_code))]
    /// Attaches an outbox's figures to [`status_info`](Self::status_info);
    /// `false` when another outbox is attached already.
    pub(crate) fn attach_outbox_stats(&self, source: OutboxStatsSource) -> bool {
        let mut slot = lock(&self.inner.outbox_stats);
        if slot.is_some() {
            return false;
        }
        *slot = Some(source);
        true
    }

    #[cfg_attr(not(feature = "outbox"), allow(dead_code))]
    /// Whether an outbox is attached.
    pub(crate) fn has_outbox(&self) -> bool {
        lock(&self.inner.outbox_stats).is_some()
    }

    #[cfg_attr(not(feature = "outbox"), allow(dead_code))]
    /// Detaches `source` if it is the one attached (an outbox closed long
    /// ago must not detach its successor).
    pub(crate) fn detach_outbox_stats(&self, source: &OutboxStatsSource) {
        let mut slot = lock(&self.inner.outbox_stats);
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, source)) {
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
        // Dropping Zeroizing values overwrites them.
        *lock(&self.inner.secrets) = None;
        tracing::info!("NATS client closed");
        result
    }
}

/// A lazy [`Error::NotConnected`] (an eager one is built and dropped on
/// every successful call).
fn not_connected() -> Error {
    Error::NotConnected
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
