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
use crate::cluster::{Cluster, free_ports};
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
#[derive(Debug, Clone)]
#[must_use]
pub struct EdgeBuilder {
    leaves: Vec<LeafSpec>,
    uplink_timeout: Option<Duration>,
    /// Nodes of the hub: 1 for a single server.
    hub_nodes: usize,
}

impl Default for EdgeBuilder {
    fn default() -> Self {
        Self {
            leaves: Vec::new(),
            uplink_timeout: None,
            hub_nodes: 1,
        }
    }
}

impl EdgeBuilder {
    /// Runs the hub as a cluster of `nodes` routed JetStream servers (3
    /// for a quorum); each leaf's uplink then lists every node, each
    /// through a proxy of its own.
    pub fn hub_cluster(mut self, nodes: usize) -> Self {
        self.hub_nodes = nodes.max(1);
        self
    }

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
        // Fixed leafnode ports, so a restarted hub node listens where the
        // proxies forward.
        let leaf_ports = free_ports(self.hub_nodes.max(1))?;
        let hub_config = |builder: crate::NatsServerBuilder, port: u16| {
            builder
                .jetstream_option("domain", HUB_DOMAIN)
                .extra_config(format!(
                    "{}leafnodes {{ listen: \"127.0.0.1:{port}\", no_advertise: true }}\n",
                    accounts()
                ))
        };
        let hub = if leaf_ports.len() == 1 {
            Hub::Single(Box::new(
                hub_config(NatsServer::builder().server_name("hub"), leaf_ports[0]).start()?,
            ))
        } else {
            let ports = leaf_ports.clone();
            Hub::Cluster(
                Cluster::builder(ports.len())
                    .configure(move |i, builder| hub_config(builder, ports[i]))
                    .start()?,
            )
        };
        let mut leaves = Vec::with_capacity(self.leaves.len());
        for (i, spec) in self.leaves.into_iter().enumerate() {
            let mut uplinks = Vec::with_capacity(leaf_ports.len());
            for port in &leaf_ports {
                uplinks.push(Proxy::start(*port).await?);
            }
            let mut config = NatsServer::builder().server_name(format!("leaf-{i}"));
            if let Some(domain) = &spec.domain {
                config = config.jetstream_option("domain", domain);
            }
            let urls = uplinks
                .iter()
                .map(|p| {
                    format!(
                        "\"nats-leaf://{EDGE_USER}:{EDGE_USER}@127.0.0.1:{}\"",
                        p.port()
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let mut extra = accounts();
            let _ = writeln!(
                extra,
                "leafnodes {{ remotes = [ {{ urls: [{urls}], account: {EDGE_ACCOUNT} }} ] }}"
            );
            let server = config.extra_config(extra).start()?;
            leaves.push(Leaf {
                server,
                uplinks,
                domain: spec.domain,
            });
        }
        let edge = Edge {
            hub,
            leaves,
            leaf_ports,
        };
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
    hub: Hub,
    leaves: Vec<Leaf>,
    /// The leafnode port of each hub node.
    leaf_ports: Vec<u16>,
}

/// The hub: one server or a cluster.
#[derive(Debug)]
enum Hub {
    Single(Box<NatsServer>),
    Cluster(Cluster),
}

impl Edge {
    /// A builder with no leaves yet.
    pub fn builder() -> EdgeBuilder {
        EdgeBuilder::default()
    }

    /// The hub server (node 0 of a hub cluster).
    pub fn hub(&self) -> &NatsServer {
        match &self.hub {
            Hub::Single(server) => server,
            Hub::Cluster(cluster) => cluster.node(0),
        }
    }

    /// The hub server (node 0 of a hub cluster), to kill or restart it (its
    /// leafnode port stays the same).
    pub fn hub_mut(&mut self) -> &mut NatsServer {
        match &mut self.hub {
            Hub::Single(server) => server,
            Hub::Cluster(cluster) => cluster.node_mut(0),
        }
    }

    /// The leafnode port of each hub node (the proxies forward there; it
    /// stays the same across a restart). nats-server's ports file does not
    /// list it, so it is reserved up front.
    pub fn hub_leafnode_ports(&self) -> &[u16] {
        &self.leaf_ports
    }

    /// The hub cluster, when the hub is one ([`EdgeBuilder::hub_cluster`]).
    pub fn hub_cluster(&self) -> Option<&Cluster> {
        match &self.hub {
            Hub::Single(_) => None,
            Hub::Cluster(cluster) => Some(cluster),
        }
    }

    /// The hub cluster, for fault injection.
    pub fn hub_cluster_mut(&mut self) -> Option<&mut Cluster> {
        match &mut self.hub {
            Hub::Single(_) => None,
            Hub::Cluster(cluster) => Some(cluster),
        }
    }

    /// The client URLs of the hub (comma-separated for a cluster), with
    /// [`EDGE_ACCOUNT`]'s credentials.
    pub fn hub_url(&self) -> String {
        match &self.hub {
            Hub::Single(server) => with_user(&server.url()),
            Hub::Cluster(cluster) => cluster
                .url_list()
                .iter()
                .map(|url| with_user(url))
                .collect::<Vec<_>>()
                .join(","),
        }
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
    /// One proxy per hub node.
    uplinks: Vec<Proxy>,
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

    /// The proxy between the leaf and the hub (hub node 0): blackhole, cut
    /// or refuse it to fail the uplink, heal it to bring it back.
    pub fn uplink(&self) -> &Proxy {
        &self.uplinks[0]
    }

    /// Every proxy of the uplink, one per hub node.
    pub fn uplinks(&self) -> &[Proxy] {
        &self.uplinks
    }

    /// Silences the whole uplink (every proxy blackholed).
    pub fn blackhole_uplink(&self) {
        self.uplinks.iter().for_each(Proxy::blackhole);
    }

    /// Cuts the whole uplink: every proxy refuses new connections and drops
    /// the open ones.
    pub fn cut_uplink(&self) {
        for proxy in &self.uplinks {
            proxy.refuse();
            proxy.cut();
        }
    }

    /// Heals every proxy of the uplink.
    pub fn heal_uplink(&self) {
        self.uplinks.iter().for_each(Proxy::heal);
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
        self.wait_linked(true, timeout).await
    }

    /// Waits until the leaf has no connection to the hub (after the uplink
    /// was cut or refused).
    ///
    /// # Errors
    /// [`HarnessError::Monitor`] when it is still linked after `timeout`.
    pub async fn wait_for_unlinked(&self, timeout: Duration) -> Result<(), HarnessError> {
        self.wait_linked(false, timeout).await
    }

    async fn wait_linked(&self, linked: bool, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        while self.is_linked() != linked {
            if Instant::now() >= deadline {
                let state = if linked { "up" } else { "down" };
                return Err(HarnessError::Monitor(format!(
                    "the uplink of {} was not {state} within {timeout:?}",
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
