//! A JetStream cluster of real servers routed together on loopback.

use std::time::{Duration, Instant};

use crate::server::{ClusterRole, POLL, PORT_TAKEN};
use crate::{HarnessError, NatsServer, NatsServerBuilder};

/// How long [`Cluster::start`] waits for a JetStream meta leader by default.
pub const DEFAULT_CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// `n` JetStream servers routed together on loopback.
///
/// Ready means every running node reports the same JetStream meta leader.
/// Nodes can be killed, paused and restarted one by one through
/// [`node_mut`](Self::node_mut); a restarted node keeps its ports, routes and
/// storage.
///
/// ```no_run
/// # fn main() -> Result<(), natskit_testing::HarnessError> {
/// let mut cluster = natskit_testing::Cluster::start(3)?;
/// let urls = cluster.urls(); // "nats://127.0.0.1:a,nats://127.0.0.1:b,..."
/// cluster.node_mut(0).kill()?;
/// cluster.node_mut(0).restart()?;
/// cluster.wait_for_leader(std::time::Duration::from_secs(30))?;
/// # let _ = urls; Ok(()) }
/// ```
#[derive(Debug)]
pub struct Cluster {
    name: String,
    nodes: Vec<NatsServer>,
}

/// Per-node settings of a [`Cluster`]: called with the node index and the
/// node's builder (JetStream and clustering already set).
type Configure = Box<dyn Fn(usize, NatsServerBuilder) -> NatsServerBuilder + Send + Sync>;

/// Builds a [`Cluster`] with per-node options.
///
/// ```no_run
/// # fn main() -> Result<(), natskit_testing::HarnessError> {
/// let cluster = natskit_testing::Cluster::builder(3)
///     .configure(|_node, builder| builder.sync_always())
///     .start()?;
/// # let _ = cluster; Ok(()) }
/// ```
pub struct ClusterBuilder {
    n: usize,
    configure: Option<Configure>,
    timeout: Duration,
    no_advertise: bool,
}

impl std::fmt::Debug for ClusterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBuilder")
            .field("n", &self.n)
            .field("timeout", &self.timeout)
            .field("no_advertise", &self.no_advertise)
            .finish_non_exhaustive()
    }
}

impl ClusterBuilder {
    /// Applies `f` to each node's builder (for example
    /// [`NatsServerBuilder::sync_always`] or
    /// [`NatsServerBuilder::jetstream_option`]).
    pub fn configure(
        mut self,
        f: impl Fn(usize, NatsServerBuilder) -> NatsServerBuilder + Send + Sync + 'static,
    ) -> Self {
        self.configure = Some(Box::new(f));
        self
    }

    /// The nodes do not tell clients about each other
    /// (`cluster { no_advertise: true }`): a client connected through a
    /// [`Proxy`](crate::Proxy) to one node reconnects through it, never
    /// around it.
    pub fn no_advertise(mut self) -> Self {
        self.no_advertise = true;
        self
    }

    /// How long to wait for a meta leader (default [`DEFAULT_CLUSTER_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Starts the nodes and waits for a meta leader.
    ///
    /// # Errors
    /// A node did not start, or no leader was elected in time.
    pub fn start(self) -> Result<Cluster, HarnessError> {
        Cluster::start_with(
            self.n,
            self.configure.as_ref(),
            self.timeout,
            self.no_advertise,
        )
    }
}

impl Cluster {
    /// A builder for `n` nodes with per-node options.
    pub fn builder(n: usize) -> ClusterBuilder {
        ClusterBuilder {
            n,
            configure: None,
            timeout: DEFAULT_CLUSTER_TIMEOUT,
            no_advertise: false,
        }
    }

    /// Starts `n` routed JetStream nodes (use 3 for a quorum that survives a
    /// lost node) and waits for a meta leader.
    ///
    /// # Errors
    /// A node did not start, or no leader was elected in time.
    pub fn start(n: usize) -> Result<Self, HarnessError> {
        Self::start_with(n, None, DEFAULT_CLUSTER_TIMEOUT, false)
    }

    fn start_with(
        n: usize,
        configure: Option<&Configure>,
        timeout: Duration,
        no_advertise: bool,
    ) -> Result<Self, HarnessError> {
        let n = n.max(1);
        let name = format!("natskit-{}-{}", std::process::id(), fastrand::u32(..));
        // Route ports are picked up front so every node can list every other
        // from the start; a port taken again between picking and binding (by
        // a server's own random port, say) fails that start, and the whole
        // cluster is started again on fresh ports.
        let mut attempt = 0;
        let nodes = loop {
            attempt += 1;
            match Self::start_nodes(&name, n, configure, no_advertise) {
                Err(HarnessError::Exited { log, .. })
                    if attempt < 5 && log.contains(PORT_TAKEN) =>
                {
                    tracing::debug!(attempt, "route port taken; starting the cluster again");
                }
                other => break other?,
            }
        };
        let mut cluster = Self { name, nodes };
        cluster.wait_for_leader(timeout)?;
        Ok(cluster)
    }

    fn start_nodes(
        name: &str,
        n: usize,
        configure: Option<&Configure>,
        no_advertise: bool,
    ) -> Result<Vec<NatsServer>, HarnessError> {
        let route_ports = free_ports(n)?;
        let routes: Vec<String> = route_ports
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect();
        let mut nodes = Vec::with_capacity(n);
        for (i, port) in route_ports.iter().enumerate() {
            let mut builder = NatsServer::builder()
                .jetstream()
                .server_name(node_name(name, i));
            builder.cluster = Some(ClusterRole {
                name: name.to_owned(),
                port: *port,
                routes: routes
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, r)| r.clone())
                    .collect(),
                no_advertise,
            });
            if let Some(configure) = configure {
                builder = configure(i, builder);
            }
            nodes.push(builder.start()?);
        }
        Ok(nodes)
    }

    /// The cluster name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has at least one node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`.
    ///
    /// # Panics
    /// When `i` is out of range (test code).
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// Node `i`, for fault injection.
    ///
    /// # Panics
    /// When `i` is out of range (test code).
    pub fn node_mut(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// Client URLs of all nodes, comma separated (the form `Client::builder` takes).
    pub fn urls(&self) -> String {
        self.url_list().join(",")
    }

    /// Client URLs of all nodes.
    pub fn url_list(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// The server name of the current JetStream meta leader, as seen by the
    /// first running node that knows one.
    pub fn leader(&mut self) -> Option<String> {
        self.nodes.iter_mut().find_map(|node| {
            if !node.is_running() {
                return None;
            }
            let jsz = node.monitor("/jsz").ok()?;
            let leader = jsz.get("meta_cluster")?.get("leader")?.as_str()?;
            (!leader.is_empty()).then(|| leader.to_owned())
        })
    }

    /// Waits until every running node reports the same meta leader and that
    /// leader sees every other running node as a current, online peer.
    ///
    /// Agreeing on a leader is not enough: until the leader has heard from
    /// its peers, creating a replicated stream fails with "no suitable peers
    /// for placement, peer offline".
    ///
    /// # Errors
    /// [`HarnessError::NotReady`] when that does not happen within `timeout`.
    pub fn wait_for_leader(&mut self, timeout: Duration) -> Result<String, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut metas = Vec::new();
            for (i, node) in self.nodes.iter_mut().enumerate() {
                if !node.is_running() {
                    continue;
                }
                let meta = node
                    .monitor("/jsz")
                    .ok()
                    .and_then(|mut jsz| jsz.get_mut("meta_cluster").map(serde_json::Value::take))
                    .unwrap_or_default();
                metas.push((node_name(&self.name, i), meta));
            }
            let leaders: Vec<&str> = metas
                .iter()
                .map(|(_, meta)| meta.get("leader").and_then(|l| l.as_str()).unwrap_or(""))
                .collect();
            if let Some(&first) = leaders.first()
                && !first.is_empty()
                && leaders.iter().all(|l| *l == first)
                && metas
                    .iter()
                    .find(|(name, _)| name == first)
                    .is_some_and(|(_, meta)| current_peers(meta) + 1 >= metas.len())
            {
                return Ok(first.to_owned());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::NotReady {
                    timeout,
                    reason: format!(
                        "no agreed JetStream meta leader with all peers current (nodes report {leaders:?})"
                    ),
                    log: self
                        .nodes
                        .first()
                        .map(|n| n.log_tail(2048))
                        .unwrap_or_default(),
                });
            }
            std::thread::sleep(POLL * 5);
        }
    }
}

impl Cluster {
    /// The index of the node named `server_name` (as the server reports
    /// leaders), if it is one of this cluster's.
    pub fn node_index(&self, server_name: &str) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| node_name(&self.name, i) == server_name)
    }

    /// The stream's `cluster` object (leader and replicas) as the stream
    /// leader reports it (only the leader knows whether the other replicas
    /// are current; a follower lists its fellow followers as not current).
    fn stream_cluster(&mut self, stream: &str) -> Option<serde_json::Value> {
        let path = "/jsz?accounts=true&streams=true";
        let leader = self.nodes.iter_mut().find_map(|node| {
            if !node.is_running() {
                return None;
            }
            let jsz = node.monitor(path).ok()?;
            let cluster = find_stream(&jsz, stream)?.get("cluster")?;
            let leader = cluster.get("leader")?.as_str()?;
            (!leader.is_empty()).then(|| leader.to_owned())
        })?;
        let index = self.node_index(&leader)?;
        let node = &mut self.nodes[index];
        if !node.is_running() {
            return None;
        }
        let jsz = node.monitor(path).ok()?;
        find_stream(&jsz, stream).and_then(|s| s.get("cluster").cloned())
    }

    /// The index of the node leading `stream` (of any account), if one is
    /// elected.
    pub fn stream_leader(&mut self, stream: &str) -> Option<usize> {
        let cluster = self.stream_cluster(stream)?;
        let leader = cluster.get("leader")?.as_str()?;
        self.node_index(leader)
    }

    /// The index of the node leading consumer `consumer` of `stream`.
    pub fn consumer_leader(&mut self, stream: &str, consumer: &str) -> Option<usize> {
        let path = "/jsz?accounts=true&streams=true&consumers=true";
        let leader = self.nodes.iter_mut().find_map(|node| {
            if !node.is_running() {
                return None;
            }
            let jsz = node.monitor(path).ok()?;
            let stream = find_stream(&jsz, stream)?;
            let consumers = stream.get("consumer_detail")?.as_array()?;
            let detail = consumers
                .iter()
                .find(|c| c.get("name").and_then(|n| n.as_str()) == Some(consumer))?;
            let leader = detail.get("cluster")?.get("leader")?.as_str()?;
            (!leader.is_empty()).then(|| leader.to_owned())
        })?;
        self.node_index(&leader)
    }

    /// Waits until `stream` has a leader and every replica is current and
    /// online, so a leader kill loses no acknowledged write. Returns the
    /// leader's index.
    ///
    /// # Errors
    /// [`HarnessError::NotReady`] when that does not happen within `timeout`.
    pub fn wait_for_stream_current(
        &mut self,
        stream: &str,
        timeout: Duration,
    ) -> Result<usize, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(cluster) = self.stream_cluster(stream) {
                let leader = cluster
                    .get("leader")
                    .and_then(|l| l.as_str())
                    .and_then(|l| self.node_index(l));
                let replicas = cluster
                    .get("replicas")
                    .and_then(|r| r.as_array())
                    .map_or(0, Vec::len);
                if let Some(leader) = leader
                    && current_peers(&cluster) == replicas
                {
                    return Ok(leader);
                }
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::NotReady {
                    timeout,
                    reason: format!("stream {stream:?} has no leader with every replica current"),
                    log: String::new(),
                });
            }
            std::thread::sleep(POLL * 5);
        }
    }

    /// [`wait_for_leader`](Self::wait_for_leader) for async tests.
    ///
    /// # Errors
    /// See [`wait_for_leader`](Self::wait_for_leader).
    pub async fn wait_for_leader_async(
        &mut self,
        timeout: Duration,
    ) -> Result<String, HarnessError> {
        crate::server::off_runtime(|| self.wait_for_leader(timeout))
    }

    /// [`wait_for_stream_current`](Self::wait_for_stream_current) for async tests.
    ///
    /// # Errors
    /// See [`wait_for_stream_current`](Self::wait_for_stream_current).
    pub async fn wait_for_stream_current_async(
        &mut self,
        stream: &str,
        timeout: Duration,
    ) -> Result<usize, HarnessError> {
        crate::server::off_runtime(|| self.wait_for_stream_current(stream, timeout))
    }
}

/// The `stream_detail` entry of `stream` in a `/jsz?accounts=true&streams=true` answer.
fn find_stream<'a>(jsz: &'a serde_json::Value, stream: &str) -> Option<&'a serde_json::Value> {
    jsz.get("account_details")?
        .as_array()?
        .iter()
        .filter_map(|a| a.get("stream_detail").and_then(|s| s.as_array()))
        .flatten()
        .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(stream))
}

/// The server name of node `i` of cluster `cluster`.
fn node_name(cluster: &str, i: usize) -> String {
    format!("{cluster}-n{i}")
}

/// How many peers a `/jsz` `meta_cluster` object lists as current and online.
fn current_peers(meta: &serde_json::Value) -> usize {
    meta.get("replicas")
        .and_then(|r| r.as_array())
        .map_or(0, |replicas| {
            replicas
                .iter()
                .filter(|r| {
                    r.get("current").and_then(|c| c.as_bool()) == Some(true)
                        && r.get("offline").and_then(|o| o.as_bool()) != Some(true)
                })
                .count()
        })
}

pub(crate) fn free_ports(n: usize) -> Result<Vec<u16>, HarnessError> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| HarnessError::io("reserving ports", e))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| HarnessError::io("reserving route ports", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_current_online_peers_count() {
        let meta = serde_json::json!({
            "leader": "c-n1",
            "replicas": [
                {"name": "c-n0", "current": true},
                {"name": "c-n2", "current": false},
                {"name": "c-n3", "current": true, "offline": true},
                {"name": "c-n4", "current": true, "offline": false},
            ]
        });
        assert_eq!(current_peers(&meta), 2);
        assert_eq!(current_peers(&serde_json::Value::Null), 0);
        assert_eq!(node_name("c", 1), "c-n1");
    }
}
