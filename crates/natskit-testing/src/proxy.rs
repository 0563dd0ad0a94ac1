//! A TCP proxy between a client and a server that can slow, cut and
//! partition the link while both processes stay up.

use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::HarnessError;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Bytes flow (after the configured latency).
    Open,
    /// A network partition: connections stay open, nothing is read or
    /// forwarded (TCP buffers fill, as when packets are dropped), and new
    /// connections are accepted but never reach the server. Healing lets
    /// the held bytes through, as a partition that heals before TCP gives
    /// up would.
    Blackhole,
    /// New connections are accepted and closed at once (a refusing host).
    Refuse,
}

/// A TCP proxy on a free loopback port in front of a server.
///
/// ```no_run
/// # async fn demo() -> Result<(), natskit_testing::HarnessError> {
/// let server = natskit_testing::NatsServer::start()?;
/// let proxy = natskit_testing::Proxy::start(server.client_port()).await?;
/// let url = proxy.url(); // give this to the client
/// proxy.blackhole();     // partition: the client sees a silent server
/// proxy.heal();
/// proxy.set_latency(std::time::Duration::from_millis(50));
/// proxy.cut();           // drop every open connection
/// # let _ = url; Ok(()) }
/// ```
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    target: AtomicU16,
    latency_micros: AtomicU64,
    accepted: AtomicUsize,
    state: watch::Sender<LinkState>,
    conns: Mutex<Vec<JoinHandle<()>>>,
}

impl Proxy {
    /// Starts forwarding a free loopback port to `127.0.0.1:target_port`.
    ///
    /// # Errors
    /// No port could be bound.
    pub async fn start(target_port: u16) -> Result<Self, HarnessError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| HarnessError::io("binding the proxy", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| HarnessError::io("binding the proxy", e))?
            .port();
        let shared = Arc::new(Shared {
            target: AtomicU16::new(target_port),
            latency_micros: AtomicU64::new(0),
            accepted: AtomicUsize::new(0),
            state: watch::Sender::new(LinkState::Open),
            conns: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            port,
            shared,
            accept,
        })
    }

    /// The proxy's URL, for the client.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far (connection attempts of the client).
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// The current link state.
    pub fn state(&self) -> LinkState {
        *self.shared.state.borrow()
    }

    /// Partitions the link (see [`LinkState::Blackhole`]).
    pub fn blackhole(&self) {
        self.shared.state.send_replace(LinkState::Blackhole);
    }

    /// Refuses new connections (see [`LinkState::Refuse`]); open ones keep
    /// flowing unless [`cut`](Self::cut).
    pub fn refuse(&self) {
        self.shared.state.send_replace(LinkState::Refuse);
    }

    /// Lets traffic flow again.
    pub fn heal(&self) {
        self.shared.state.send_replace(LinkState::Open);
    }

    /// Delays every chunk of bytes by `latency` in each direction.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.latency_micros.store(
            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }

    /// Forwards new connections to another port (a restarted server on a
    /// new port, another cluster node).
    pub fn retarget(&self, port: u16) {
        self.shared.target.store(port, Ordering::SeqCst);
    }

    /// Closes every open connection at once (a reset link); new ones are
    /// accepted according to the link state.
    pub fn cut(&self) {
        if let Ok(mut conns) = self.shared.conns.lock() {
            for conn in conns.drain(..) {
                conn.abort();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while let Ok((inbound, _)) = listener.accept().await {
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if *shared.state.borrow() == LinkState::Refuse {
            drop(inbound);
            continue;
        }
        let conn = tokio::spawn(forward(inbound, shared.clone()));
        if let Ok(mut conns) = shared.conns.lock() {
            conns.retain(|c| !c.is_finished());
            conns.push(conn);
        }
    }
}

async fn forward(inbound: TcpStream, shared: Arc<Shared>) {
    // A connection made during a partition waits for it to heal first.
    let mut state = shared.state.subscribe();
    if state.wait_for(|s| *s == LinkState::Open).await.is_err() {
        return;
    }
    let target = shared.target.load(Ordering::SeqCst);
    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    tokio::select! {
        () = pump(in_read, out_write, shared.clone()) => {}
        () = pump(out_read, in_write, shared.clone()) => {}
    }
}

/// Copies one direction, holding bytes while the link is partitioned.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
) {
    let mut state = shared.state.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Partitioned: do not even read, so the sender's buffers fill.
        if state
            .wait_for(|s| *s != LinkState::Blackhole)
            .await
            .is_err()
        {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // The partition starts while waiting for bytes.
            _ = state.wait_for(|s| *s == LinkState::Blackhole) => continue,
        };
        let latency = shared.latency_micros.load(Ordering::SeqCst);
        if latency > 0 {
            tokio::time::sleep(Duration::from_micros(latency)).await;
        }
        // Bytes read just before a partition are held until it heals.
        if state
            .wait_for(|s| *s != LinkState::Blackhole)
            .await
            .is_err()
        {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
