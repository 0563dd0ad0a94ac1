//! Edge topologies: a hub server with JetStream domain `hub` and leaf
//! servers linked to it, each uplink through a [`Proxy`] so a test can
//! blackhole, cut and heal it while both servers run.
//!
//! Every server has the account `ACC` (JetStream enabled; user `acc`,
//! password `acc`) and the system account `SYS`; the leaf links bind the
//! leaf's `ACC` to the hub's. The hub does not advertise its leafnode URLs
//! (`no_advertise`), so a leaf reconnects through its proxy, never around
//! it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), natskit_testing::HarnessError> {
//! use std::time::Duration;
//! let edge = natskit_testing::Edge::builder().leaf("leaf").start().await?;
//! let leaf = edge.leaf(0);
//! // A client on the leaf reaches the hub's JetStream through `$JS.hub.API`.
//! println!("connect to {}", leaf.url());
//! leaf.uplink().blackhole(); // the uplink is silent, the leaf stays up
//! leaf.uplink().heal();
//! leaf.wait_for_uplink(Duration::from_secs(10)).await?;
//! # Ok(()) }
//! ```

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::HarnessError;
use crate::proxy::Proxy;
use crate::server::NatsServer;

/// The hub's JetStream domain.
pub const HUB_DOMAIN: &str = "hub";
/// The account every edge server shares.
pub const EDGE_ACCOUNT: &str = "ACC";
/// The user (and password) of [`EDGE_ACCOUNT`].
pub const EDGE_USER: &str = "acc";

/// How long [`EdgeBuilder::start`] waits for every uplink by default.
pub const DEFAULT_UPLINK_TIMEOUT: Duration = Duration::from_secs(15);

/// The accounts block every edge server has.
fn accounts() -> String {
    format!(
        "accounts {{\n  {EDGE_ACCOUNT}: {{ jetstream: enabled, users: [ {{ user: \"{EDGE_USER}\", \
         password: \"{EDGE_USER}\" }} ] }}\n  SYS: {{ users: [ {{ user: \"sys\", password: \"sys\" }} ] }}\n}}\n\
         system_account: SYS\n"
    )
}

/// What one leaf runs.
#[derive(Debug, Clone)]
struct LeafSpec {
    /// Its JetStream domain; `None` for a leaf without JetStream.
    domain: Option<String>,
}

/// Configures an [`Edge`]: a hub and its leaves.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct EdgeBuilder {
    leaves: Vec<LeafSpec>,
    uplink_timeout: Option<Duration>,
}

impl EdgeBuilder {
    /// Adds a leaf with JetStream in its own `domain`.
    pub fn leaf(mut self, domain: &str) -> Self {
        self.leaves.push(LeafSpec {
            domain: Some(domain.to_owned()),
        });
        self
    }

    /// Adds a leaf without JetStream: every JetStream call through it goes
    /// to the hub's domain.
    pub fn leaf_without_jetstream(mut self) -> Self {
        self.leaves.push(LeafSpec { domain: None });
        self
    }

    /// How long [`start`](Self::start) waits for every uplink (default
    /// [`DEFAULT_UPLINK_TIMEOUT`]).
    pub fn uplink_timeout(mut self, timeout: Duration) -> Self {
        self.uplink_timeout = Some(timeout);
        self
    }

    /// Starts the hub, a proxy per leaf in front of the hub's leafnode
    /// port, and the leaves, and waits until every uplink is up.
    ///
    /// # Errors
    /// A server did not start, or an uplink did not come up in time.
    pub async fn start(self) -> Result<Edge, HarnessError> {
        // A fixed leafnode port, so a restarted hub listens where the
        // proxies forward.
        let leaf_port = free_port()?;
        let hub = NatsServer::builder()
            .jetstream()
            .jetstream_option("domain", HUB_DOMAIN)
            .server_name("hub")
            .extra_config(format!(
                "{}leafnodes {{ listen: \"127.0.0.1:{leaf_port}\", no_advertise: true }}\n",
                accounts()
            ))
            .start()?;
        let mut leaves = Vec::with_capacity(self.leaves.len());
        for (i, spec) in self.leaves.into_iter().enumerate() {
            let uplink = Proxy::start(leaf_port).await?;
            let mut config = NatsServer::builder().server_name(format!("leaf-{i}"));
            if let Some(domain) = &spec.domain {
                config = config.jetstream_option("domain", domain);
            }
            let mut extra = accounts();
            let _ = writeln!(
                extra,
                "leafnodes {{ remotes = [ {{ urls: [\"nats-leaf://{EDGE_USER}:{EDGE_USER}@127.0.0.1:{}\"], \
                 account: {EDGE_ACCOUNT} }} ] }}",
                uplink.port()
            );
            let server = config.extra_config(extra).start()?;
            leaves.push(Leaf {
                server,
                uplink,
                domain: spec.domain,
            });
        }
        let edge = Edge { hub, leaves };
        let timeout = self.uplink_timeout.unwrap_or(DEFAULT_UPLINK_TIMEOUT);
        for leaf in &edge.leaves {
            leaf.wait_for_uplink(timeout).await?;
        }
        Ok(edge)
    }
}

/// A running hub and its leaves. Dropping it stops every server and proxy.
#[derive(Debug)]
pub struct Edge {
    hub: NatsServer,
    leaves: Vec<Leaf>,
}

impl Edge {
    /// A builder with no leaves yet.
    pub fn builder() -> EdgeBuilder {
        EdgeBuilder::default()
    }

    /// The hub.
    pub fn hub(&self) -> &NatsServer {
        &self.hub
    }

    /// The hub, to kill or restart it (its leafnode port stays the same).
    pub fn hub_mut(&mut self) -> &mut NatsServer {
        &mut self.hub
    }

    /// A client URL of the hub, with [`EDGE_ACCOUNT`]'s credentials.
    pub fn hub_url(&self) -> String {
        with_user(&self.hub.url())
    }

    /// Leaf `i`, in the order they were added.
    ///
    /// # Panics
    /// When there is no leaf `i` (a mistake in the test).
    pub fn leaf(&self, i: usize) -> &Leaf {
        &self.leaves[i]
    }

    /// Leaf `i`, to kill or restart its server.
    ///
    /// # Panics
    /// When there is no leaf `i`.
    pub fn leaf_mut(&mut self, i: usize) -> &mut Leaf {
        &mut self.leaves[i]
    }

    /// How many leaves there are.
    pub fn leaves(&self) -> usize {
        self.leaves.len()
    }
}

/// One leaf server and the proxy its uplink goes through.
#[derive(Debug)]
pub struct Leaf {
    server: NatsServer,
    uplink: Proxy,
    domain: Option<String>,
}

impl Leaf {
    /// The leaf server.
    pub fn server(&self) -> &NatsServer {
        &self.server
    }

    /// The leaf server, to kill or restart it.
    pub fn server_mut(&mut self) -> &mut NatsServer {
        &mut self.server
    }

    /// A client URL of the leaf, with [`EDGE_ACCOUNT`]'s credentials.
    pub fn url(&self) -> String {
        with_user(&self.server.url())
    }

    /// The proxy between the leaf and the hub: blackhole, cut or refuse it
    /// to fail the uplink, heal it to bring it back.
    pub fn uplink(&self) -> &Proxy {
        &self.uplink
    }

    /// The leaf's JetStream domain; `None` without JetStream.
    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    /// Whether the leaf has a leafnode connection to the hub (`/leafz`).
    pub fn is_linked(&self) -> bool {
        self.server
            .monitor("/leafz")
            .ok()
            .and_then(|v| v.get("leafnodes").and_then(serde_json::Value::as_u64))
            .is_some_and(|n| n > 0)
    }

    /// Waits until the uplink is up.
    ///
    /// # Errors
    /// [`HarnessError::Monitor`] when it is not up within `timeout`.
    pub async fn wait_for_uplink(&self, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        while !self.is_linked() {
            if Instant::now() >= deadline {
                return Err(HarnessError::Monitor(format!(
                    "the uplink of {} was not up within {timeout:?}",
                    self.server.url()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until the leaf has no connection to the hub (after the uplink
    /// was cut or refused).
    ///
    /// # Errors
    /// [`HarnessError::Monitor`] when it is still linked after `timeout`.
    pub async fn wait_for_unlinked(&self, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        while self.is_linked() {
            if Instant::now() >= deadline {
                return Err(HarnessError::Monitor(format!(
                    "the uplink of {} was still up after {timeout:?}",
                    self.server.url()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

/// `url` with the edge account's user and password.
fn with_user(url: &str) -> String {
    url.replacen("://", &format!("://{EDGE_USER}:{EDGE_USER}@"), 1)
}

fn free_port() -> Result<u16, HarnessError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| HarnessError::io("reserving the leafnode port", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| HarnessError::io("reserving the leafnode port", e))
}
