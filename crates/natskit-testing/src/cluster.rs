//! A JetStream cluster of real servers routed together on loopback.

use std::time::{Duration, Instant};

use crate::server::{ClusterRole, POLL, PORT_TAKEN};
use crate::{HarnessError, NatsServer};

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

impl Cluster {
    /// Starts `n` routed JetStream nodes (use 3 for a quorum that survives a
    /// lost node) and waits for a meta leader.
    ///
    /// # Errors
    /// A node did not start, or no leader was elected in time.
    pub fn start(n: usize) -> Result<Self, HarnessError> {
        let n = n.max(1);
        let name = format!("natskit-{}-{}", std::process::id(), fastrand::u32(..));
        // Route ports are picked up front so every node can list every other
        // from the start; a port taken again between picking and binding (by
        // a server's own random port, say) fails that start, and the whole
        // cluster is started again on fresh ports.
        let mut attempt = 0;
        let nodes = loop {
            attempt += 1;
            match Self::start_nodes(&name, n) {
                Err(HarnessError::Exited { log, .. })
                    if attempt < 5 && log.contains(PORT_TAKEN) =>
                {
                    tracing::debug!(attempt, "route port taken; starting the cluster again");
                }
                other => break other?,
            }
        };
        let mut cluster = Self { name, nodes };
        cluster.wait_for_leader(DEFAULT_CLUSTER_TIMEOUT)?;
        Ok(cluster)
    }

    fn start_nodes(name: &str, n: usize) -> Result<Vec<NatsServer>, HarnessError> {
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
            });
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

fn free_ports(n: usize) -> Result<Vec<u16>, HarnessError> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| HarnessError::io("reserving route ports", e))?;
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
