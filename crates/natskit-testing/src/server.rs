//! One real `nats-server` process with fault injection.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::operator::OperatorAuth;
use crate::process::{all_threads_stopped, nats_server_bin, scratch_dir, signal, spawn_guarded};
use crate::{HarnessError, TlsFiles};

/// How long [`NatsServerBuilder::start`] waits for readiness by default.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll step used while waiting for a condition.
pub(crate) const POLL: Duration = Duration::from_millis(10);

/// What nats-server logs when a port it should listen on is taken.
pub(crate) const PORT_TAKEN: &str = "address already in use";

/// Authentication a server requires.
#[derive(Clone, PartialEq, Eq)]
enum Auth {
    None,
    UserPassword(String, String),
    Token(String),
    Nkey(String),
    /// Operator-mode configuration text (JWTs only, no secrets).
    Operator(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::UserPassword(user, _) => write!(f, "UserPassword({user:?}, <redacted>)"),
            Auth::Token(_) => f.write_str("Token(<redacted>)"),
            Auth::Nkey(public) => write!(f, "Nkey({public:?})"),
            Auth::Operator(_) => f.write_str("Operator"),
        }
    }
}

/// Cluster membership of a node, set by [`crate::Cluster`].
#[derive(Debug, Clone, Default)]
pub(crate) struct ClusterRole {
    pub(crate) name: String,
    /// Cluster (route) port of this node.
    pub(crate) port: u16,
    /// Route URLs of the other nodes.
    pub(crate) routes: Vec<String>,
    /// Client URLs of the other nodes are not advertised.
    pub(crate) no_advertise: bool,
}

/// Configures and starts a [`NatsServer`].
///
/// ```no_run
/// # fn main() -> Result<(), natskit_testing::HarnessError> {
/// let server = natskit_testing::NatsServer::builder()
///     .jetstream()
///     .user_password("app", "s3cret")
///     .start()?;
/// println!("listening on {}", server.url());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct NatsServerBuilder {
    jetstream: bool,
    auth: Auth,
    tls: bool,
    verify_client_certs: bool,
    extra_config: String,
    /// Lines inside the harness's `jetstream { }` block.
    jetstream_options: Vec<String>,
    port: Option<u16>,
    start_timeout: Duration,
    server_name: Option<String>,
    pub(crate) cluster: Option<ClusterRole>,
}

impl Default for NatsServerBuilder {
    fn default() -> Self {
        Self {
            jetstream: false,
            auth: Auth::None,
            tls: false,
            verify_client_certs: false,
            extra_config: String::new(),
            jetstream_options: Vec::new(),
            port: None,
            start_timeout: DEFAULT_START_TIMEOUT,
            server_name: None,
            cluster: None,
        }
    }
}

impl NatsServerBuilder {
    /// Enables JetStream, stored in the server's temporary directory.
    pub fn jetstream(mut self) -> Self {
        self.jetstream = true;
        self
    }

    /// Requires this user name and password.
    pub fn user_password(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Auth::UserPassword(user.into(), password.into());
        self
    }

    /// Requires this token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.auth = Auth::Token(token.into());
        self
    }

    /// Requires an nkey user with this public key (see [`crate::new_user_nkey`]).
    pub fn nkey_user(mut self, public_key: impl Into<String>) -> Self {
        self.auth = Auth::Nkey(public_key.into());
        self
    }

    /// Runs in operator mode: clients authenticate with user JWTs issued by
    /// `auth` (credentials files, see [`OperatorAuth::write_user_creds`]).
    pub fn operator(mut self, auth: &OperatorAuth) -> Self {
        self.auth = Auth::Operator(auth.config_text());
        self
    }

    /// Serves TLS only, with certificates generated for this server
    /// (see [`NatsServer::tls_files`]).
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Serves TLS and also requires a client certificate signed by the same CA.
    pub fn tls_verify_clients(mut self) -> Self {
        self.tls = true;
        self.verify_client_certs = true;
        self
    }

    /// Adds `key: value` to the server's `jetstream { }` block (and enables
    /// JetStream), keeping the harness's own store directory: for example
    /// `jetstream_option("max_memory_store", "64MB")`. See
    /// [`sync_always`](Self::sync_always) for the fsync policy.
    pub fn jetstream_option(mut self, key: &str, value: impl AsRef<str>) -> Self {
        self.jetstream = true;
        self.jetstream_options
            .push(format!("{key}: {}", value.as_ref()));
        self
    }

    /// Makes JetStream fsync every write before acknowledging it
    /// (`sync_interval: always`): acknowledged data then survives even an
    /// OS crash or power loss, not only a process kill. Enables JetStream.
    pub fn sync_always(self) -> Self {
        self.jetstream_option("sync_interval", "always")
    }

    /// Appends raw text to the generated configuration file. A `jetstream`
    /// block here would replace the harness's own (and its store directory):
    /// use [`jetstream_option`](Self::jetstream_option) instead; `start`
    /// refuses such text.
    pub fn extra_config(mut self, text: impl AsRef<str>) -> Self {
        self.extra_config.push_str(text.as_ref());
        self.extra_config.push('\n');
        self
    }

    /// Listens on this client port instead of a free one. While the port is
    /// taken (a client's connect attempt can hold it for a moment), the start
    /// is retried for up to 10 s.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// How long to wait for the server to become ready.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Sets the server name (required for JetStream clusters, set by [`crate::Cluster`]).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Starts the server and waits until it is ready: the ports file is
    /// written, the client port answers `INFO`, and (outside a cluster)
    /// `/healthz` answers 200, which includes JetStream being ready.
    ///
    /// # Errors
    /// The binary is missing, the process exited, or it was not ready in time
    /// (the error carries the tail of the server's log).
    pub fn start(self) -> Result<NatsServer, HarnessError> {
        if self
            .extra_config
            .lines()
            .any(|line| line.trim_start().starts_with("jetstream"))
        {
            return Err(HarnessError::io(
                "building the server config",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "extra_config must not hold a jetstream block (it would replace the \
                     harness's store directory); use jetstream_option() instead",
                ),
            ));
        }
        let binary = nats_server_bin()?;
        let dir = scratch_dir(if self.cluster.is_some() {
            "node"
        } else {
            "server"
        })?;
        let tls = if self.tls {
            Some(TlsFiles::generate(dir.path())?)
        } else {
            None
        };
        let mut server = NatsServer {
            binary,
            config: self,
            tls,
            child: None,
            ports: None,
            paused: false,
            dir,
        };
        if server.config.port.is_some() && server.config.cluster.is_none() {
            server.launch_retrying_taken_port()?;
        } else {
            server.launch()?;
        }
        Ok(server)
    }
}

/// Ports a running server listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// Client port.
    pub client: u16,
    /// HTTP monitoring port.
    pub monitoring: u16,
    /// Cluster (route) port, for cluster nodes.
    pub cluster: Option<u16>,
}

/// A running `nats-server` process on loopback, with its own temporary
/// directory for configuration, logs and JetStream storage.
///
/// Dropping it kills the process and removes the directory. If the test
/// process dies without dropping it, the kernel kills the server anyway
/// (`PR_SET_PDEATHSIG`).
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    config: NatsServerBuilder,
    tls: Option<TlsFiles>,
    child: Option<Child>,
    ports: Option<Ports>,
    paused: bool,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// A builder with defaults: no JetStream, no auth, plain TCP, free port.
    pub fn builder() -> NatsServerBuilder {
        NatsServerBuilder::default()
    }

    /// Starts a plain server (core NATS only).
    ///
    /// # Errors
    /// See [`NatsServerBuilder::start`].
    pub fn start() -> Result<Self, HarnessError> {
        Self::builder().start()
    }

    /// Starts a server with JetStream enabled.
    ///
    /// # Errors
    /// See [`NatsServerBuilder::start`].
    pub fn start_jetstream() -> Result<Self, HarnessError> {
        Self::builder().jetstream().start()
    }

    /// The client URL, `nats://127.0.0.1:PORT` (`tls://` for TLS servers).
    /// It stays the same across [`restart`](Self::restart).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "tls" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.client_port())
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.ports.map_or(0, |p| p.client)
    }

    /// All ports this server listens on.
    pub fn ports(&self) -> Option<Ports> {
        self.ports
    }

    /// The generated certificates of a TLS server.
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Whether JetStream is enabled.
    pub fn has_jetstream(&self) -> bool {
        self.config.jetstream
    }

    /// Process id of the running server, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's temporary directory (config, log, JetStream store).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the process is running (a paused process counts as running).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server with `SIGKILL`, as a crash would. Storage stays in
    /// place for [`restart`](Self::restart).
    ///
    /// # Errors
    /// The signal could not be delivered.
    pub fn kill(&mut self) -> Result<(), HarnessError> {
        if let Some(mut child) = self.child.take() {
            self.paused = false;
            child
                .kill()
                .map_err(|e| HarnessError::io("killing nats-server", e))?;
            child
                .wait()
                .map_err(|e| HarnessError::io("reaping nats-server", e))?;
        }
        Ok(())
    }

    /// Stops the server gracefully (`SIGTERM`), killing it if it has not
    /// exited within ten seconds.
    ///
    /// # Errors
    /// The signal could not be delivered.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        if self.paused {
            signal(child.id(), libc::SIGCONT).map_err(|e| HarnessError::io("resuming", e))?;
            self.paused = false;
        }
        signal(child.id(), libc::SIGTERM).map_err(|e| HarnessError::io("stopping", e))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return Ok(());
            }
            std::thread::sleep(POLL);
        }
        self.kill()
    }

    /// Starts the server again on the same ports with the same storage
    /// directory, so JetStream data written before survives. Kills the
    /// running process first if there is one.
    ///
    /// # Errors
    /// See [`NatsServerBuilder::start`].
    ///
    /// A fixed port can be taken for a moment while the server is down (a
    /// client's reconnect attempt may be handed it as its local port), so a
    /// start that fails with "address already in use" is retried for up to
    /// 10 s.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill()?;
        self.launch_retrying_taken_port()
    }

    /// [`launch`](Self::launch) on fixed ports, retried for up to 10 s while
    /// a port is taken.
    fn launch_retrying_taken_port(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log_len = self.log_len();
            match self.launch() {
                Err(HarnessError::Exited { .. })
                    if Instant::now() < deadline
                        && self.log_since(log_len).contains(PORT_TAKEN) =>
                {
                    tracing::debug!("a fixed port of the server is taken; retrying");
                    std::thread::sleep(POLL * 10);
                }
                other => return other,
            }
        }
    }

    /// Freezes the server with `SIGSTOP`: connections stay open but nothing
    /// is answered, like a hung process or a partitioned host.
    ///
    /// Returns once every thread of the server has stopped, not merely once
    /// the signal was sent: a thread that has not yet handled the signal
    /// could still answer a request.
    ///
    /// # Errors
    /// The server is not running, the signal failed, or the threads did not
    /// all stop within 5 s.
    pub fn pause(&mut self) -> Result<(), HarnessError> {
        let pid = self.pid().ok_or(HarnessError::NotRunning)?;
        signal(pid, libc::SIGSTOP).map_err(|e| HarnessError::io("pausing", e))?;
        self.paused = true;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match all_threads_stopped(pid) {
                Some(true) => return Ok(()),
                None => return Err(HarnessError::NotRunning),
                Some(false) if Instant::now() >= deadline => {
                    return Err(HarnessError::io(
                        "pausing",
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "not every server thread stopped within 5 s of SIGSTOP",
                        ),
                    ));
                }
                Some(false) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// Thaws a server frozen by [`pause`](Self::pause) (`SIGCONT`).
    ///
    /// # Errors
    /// The server is not running or the signal failed.
    pub fn resume(&mut self) -> Result<(), HarnessError> {
        let pid = self.pid().ok_or(HarnessError::NotRunning)?;
        signal(pid, libc::SIGCONT).map_err(|e| HarnessError::io("resuming", e))?;
        self.paused = false;
        Ok(())
    }

    /// Puts the server in lame-duck mode (`SIGUSR2`): it stops accepting
    /// connections and evicts its clients gradually before shutting down.
    ///
    /// # Errors
    /// The server is not running or the signal failed.
    pub fn lame_duck(&mut self) -> Result<(), HarnessError> {
        let pid = self.pid().ok_or(HarnessError::NotRunning)?;
        signal(pid, libc::SIGUSR2).map_err(|e| HarnessError::io("entering lame-duck mode", e))
    }

    /// [`kill`](Self::kill) for async tests (it never blocks for long).
    ///
    /// # Errors
    /// See [`kill`](Self::kill).
    pub async fn kill_async(&mut self) -> Result<(), HarnessError> {
        off_runtime(|| self.kill())
    }

    /// [`restart`](Self::restart) for async tests: on a multi-thread runtime
    /// the wait for readiness (up to the start timeout) does not block the
    /// other tasks of the test; on a current-thread runtime it blocks.
    ///
    /// # Errors
    /// See [`restart`](Self::restart).
    pub async fn restart_async(&mut self) -> Result<(), HarnessError> {
        off_runtime(|| self.restart())
    }

    /// [`pause`](Self::pause) for async tests (see
    /// [`restart_async`](Self::restart_async) for the runtime caveat).
    ///
    /// # Errors
    /// See [`pause`](Self::pause).
    pub async fn pause_async(&mut self) -> Result<(), HarnessError> {
        off_runtime(|| self.pause())
    }

    /// [`resume`](Self::resume) for async tests.
    ///
    /// # Errors
    /// See [`resume`](Self::resume).
    pub async fn resume_async(&mut self) -> Result<(), HarnessError> {
        self.resume()
    }

    /// [`stop`](Self::stop) for async tests (see
    /// [`restart_async`](Self::restart_async) for the runtime caveat).
    ///
    /// # Errors
    /// See [`stop`](Self::stop).
    pub async fn stop_async(&mut self) -> Result<(), HarnessError> {
        off_runtime(|| self.stop())
    }

    /// The last `max_bytes` of the server's log.
    pub fn log_tail(&self, max_bytes: usize) -> String {
        let log = std::fs::read(self.log_path()).unwrap_or_default();
        let start = log.len().saturating_sub(max_bytes);
        String::from_utf8_lossy(&log[start..]).into_owned()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    fn log_len(&self) -> usize {
        std::fs::metadata(self.log_path()).map_or(0, |m| usize::try_from(m.len()).unwrap_or(0))
    }

    /// The log written after it was `offset` bytes long.
    fn log_since(&self, offset: usize) -> String {
        let log = std::fs::read(self.log_path()).unwrap_or_default();
        String::from_utf8_lossy(log.get(offset..).unwrap_or_default()).into_owned()
    }

    /// Fetches a monitoring endpoint such as `/varz` or `/jsz` and returns
    /// the parsed JSON.
    ///
    /// # Errors
    /// The server is not running, did not answer, or answered non-JSON.
    pub fn monitor(&self, path: &str) -> Result<serde_json::Value, HarnessError> {
        let ports = self.ports.ok_or(HarnessError::NotRunning)?;
        let (status, body) = http_get(ports.monitoring, path)?;
        if status != 200 {
            return Err(HarnessError::Monitor(format!(
                "{path} answered {status}: {body}"
            )));
        }
        serde_json::from_str(&body).map_err(|e| HarnessError::Monitor(format!("{path}: {e}")))
    }

    fn config_text(&self) -> String {
        let cfg = &self.config;
        let dir = self.dir.path();
        let port = |fixed: Option<u16>| fixed.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        let mut text = String::new();
        let _ = writeln!(
            text,
            "listen: \"127.0.0.1:{}\"",
            port(self.ports.map(|p| p.client).or(cfg.port))
        );
        let _ = writeln!(
            text,
            "http: \"127.0.0.1:{}\"",
            port(self.ports.map(|p| p.monitoring))
        );
        let _ = writeln!(text, "ports_file_dir: {}", quote(&dir.join("ports")));
        if let Some(name) = &cfg.server_name {
            let _ = writeln!(text, "server_name: {}", json_str(name));
        }
        if cfg.jetstream {
            let mut options = String::new();
            for option in &cfg.jetstream_options {
                let _ = write!(options, ", {option}");
            }
            let _ = writeln!(
                text,
                "jetstream {{ store_dir: {}{options} }}",
                quote(&dir.join("jetstream"))
            );
        }
        match &cfg.auth {
            Auth::None => {}
            Auth::UserPassword(user, password) => {
                let _ = writeln!(
                    text,
                    "authorization {{ user: {}, password: {} }}",
                    json_str(user),
                    json_str(password)
                );
            }
            Auth::Token(token) => {
                let _ = writeln!(text, "authorization {{ token: {} }}", json_str(token));
            }
            Auth::Nkey(public) => {
                let _ = writeln!(
                    text,
                    "authorization {{ users: [ {{ nkey: {} }} ] }}",
                    json_str(public)
                );
            }
            Auth::Operator(config) => text.push_str(config),
        }
        if let Some(tls) = &self.tls {
            let _ = writeln!(
                text,
                "tls {{ cert_file: {}, key_file: {}, ca_file: {}, verify: {}, timeout: 2 }}",
                quote(&tls.server_cert),
                quote(&tls.server_key),
                quote(&tls.ca),
                cfg.verify_client_certs
            );
        }
        if let Some(cluster) = &cfg.cluster {
            let routes = cluster
                .routes
                .iter()
                .map(|r| json_str(r))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                text,
                "cluster {{ name: {}, listen: \"127.0.0.1:{}\", routes: [{routes}], no_advertise: {} }}",
                json_str(&cluster.name),
                cluster.port,
                cluster.no_advertise
            );
        }
        text.push_str(&cfg.extra_config);
        text
    }

    fn launch(&mut self) -> Result<(), HarnessError> {
        let dir = self.dir.path().to_owned();
        let ports_dir = dir.join("ports");
        // A killed server leaves its ports file behind; start from a clean slate.
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir)
            .map_err(|e| HarnessError::io("creating the ports dir", e))?;
        let config_path = dir.join("nats.conf");
        std::fs::write(&config_path, self.config_text())
            .map_err(|e| HarnessError::io("writing nats.conf", e))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| HarnessError::io("opening the server log", e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| HarnessError::io("opening the server log", e))?;
        let mut command = Command::new(&self.binary);
        command
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let child =
            spawn_guarded(command).map_err(|e| HarnessError::io("spawning nats-server", e))?;
        let pid = child.id();
        self.child = Some(child);
        self.paused = false;

        let deadline = Instant::now() + self.config.start_timeout;
        self.wait_until(deadline, "the ports file was not written", |server| {
            read_ports_file(&ports_dir, pid)
                .map(|ports| {
                    server.ports = Some(ports);
                    true
                })
                .unwrap_or(false)
        })?;
        self.wait_until(deadline, "the client port did not answer INFO", |server| {
            answers_info(server.client_port())
        })?;
        if self.config.cluster.is_none() {
            self.wait_until(deadline, "/healthz did not answer 200", |server| {
                server.ports.is_some_and(|p| {
                    http_get(p.monitoring, "/healthz").is_ok_and(|(s, _)| s == 200)
                })
            })?;
        }
        tracing::debug!(url = %self.url(), pid, "nats-server ready");
        Ok(())
    }

    /// Polls `ready` until it holds, the process exits, or the deadline passes.
    fn wait_until(
        &mut self,
        deadline: Instant,
        what: &str,
        mut ready: impl FnMut(&mut Self) -> bool,
    ) -> Result<(), HarnessError> {
        loop {
            if ready(self) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(HarnessError::Exited {
                    status: status.to_string(),
                    log: self.log_tail(4096),
                });
            }
            if Instant::now() >= deadline {
                let log = self.log_tail(4096);
                let _ = self.kill();
                return Err(HarnessError::NotReady {
                    timeout: self.config.start_timeout,
                    reason: what.to_owned(),
                    log,
                });
            }
            std::thread::sleep(POLL);
        }
    }
}

/// Runs blocking harness work without stalling the other tasks of a
/// multi-thread runtime (`block_in_place`); elsewhere it just runs.
pub(crate) fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn quote(path: &Path) -> String {
    json_str(&path.to_string_lossy())
}

/// A double-quoted string literal the NATS config parser accepts (it follows JSON escaping).
fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn read_ports_file(dir: &Path, pid: u32) -> Option<Ports> {
    let suffix = format!("_{pid}.ports");
    let entry = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(&suffix))?;
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(entry.path()).ok()?).ok()?;
    let port_of = |key: &str| -> Option<u16> {
        let url = json.get(key)?.get(0)?.as_str()?;
        url.rsplit(':').next()?.trim_end_matches('/').parse().ok()
    };
    Some(Ports {
        client: port_of("nats")?,
        monitoring: port_of("monitoring")?,
        cluster: port_of("cluster"),
    })
}

fn answers_info(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 5];
    stream.read_exact(&mut buf).is_ok() && &buf == b"INFO "
}

/// A minimal HTTP/1.0 GET against the monitoring port (no HTTP client
/// dependency for two endpoints).
pub(crate) fn http_get(port: u16, path: &str) -> Result<(u16, String), HarnessError> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let io = |e| HarnessError::io("querying the monitoring port", e);
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(io)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(io)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(io)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HarnessError::Monitor(format!("malformed HTTP response to {path}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
