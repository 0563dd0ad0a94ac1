//! `make chaos`: natskit's own fault suite against real nats-server
//! processes. Each scenario prints one line with its figures; the suite ends
//! with `N passed, M failed` and exits non-zero when a scenario failed.
//!
//! Counts are checked through a raw async-nats client reading the stream,
//! never through natskit's own view. Timings are printed; only generous
//! bounds are asserted, so a loaded machine cannot fail a correct build.
//!
//! Run one scenario with `make chaos SCENARIO=<name>` (a substring).

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::{self, StorageType};
use futures_util::StreamExt;
use natskit::{
    Client, Error, KvOptions, Outbox, OutboxConfig, RetryConfig, Settled, StreamConsumerConfig,
    StreamPublishOptions, WatchEvent, consume_with_heartbeat,
};
use natskit_testing::{Cluster, Edge, HUB_DOMAIN, NatsServer, Proxy};

type Outcome = Result<String, String>;
type Scenario = fn() -> Pin<Box<dyn Future<Output = Outcome> + Send>>;

const SCENARIO_TIMEOUT: Duration = Duration::from_secs(150);

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("cannot start a runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run())
}

async fn run() -> ExitCode {
    let scenarios: [(&str, Scenario); 10] = [
        ("single-server-kills", || Box::pin(single_server_kills())),
        ("r3-stream-leader-kills", || {
            Box::pin(r3_stream_leader_kills())
        }),
        ("r3-kv-counter-leader-kill", || {
            Box::pin(r3_kv_counter_leader_kill())
        }),
        ("breaker-freeze-partition-kill", || {
            Box::pin(breaker_faults())
        }),
        ("consumer-kill-delete-naks", || {
            Box::pin(consumer_kill_delete_naks())
        }),
        ("kv-watch-across-restart", || {
            Box::pin(kv_watch_across_restart())
        }),
        ("outbox-partition-and-kill", || {
            Box::pin(outbox_partition_and_kill())
        }),
        ("edge-uplink-stall-and-cut", || {
            Box::pin(edge_uplink_stall_and_cut())
        }),
        ("outbox-strict-through-the-uplink", || {
            Box::pin(outbox_strict_through_the_uplink())
        }),
        ("consumer-repeats-after-recreation", || {
            Box::pin(consumer_repeats_after_recreation())
        }),
    ];
    let only = std::env::var("SCENARIO").unwrap_or_default();
    let (mut passed, mut failed) = (0, 0);
    let suite = Instant::now();
    for (name, scenario) in scenarios {
        if !name.contains(only.as_str()) {
            continue;
        }
        let started = Instant::now();
        let outcome = match tokio::time::timeout(SCENARIO_TIMEOUT, scenario()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("did not finish within {SCENARIO_TIMEOUT:?}")),
        };
        let took = started.elapsed().as_secs_f64();
        match outcome {
            Ok(figures) => {
                passed += 1;
                println!("PASS {name} ({took:.1} s): {figures}");
            }
            Err(reason) => {
                failed += 1;
                println!("FAIL {name} ({took:.1} s): {reason}");
            }
        }
    }
    println!(
        "{passed} passed, {failed} failed ({:.0} s)",
        suite.elapsed().as_secs_f64()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn fail(what: impl std::fmt::Display) -> String {
    what.to_string()
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

/// Polls `probe` every 10 ms until it yields or `timeout` passes.
async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn file_stream(name: &str, subject: &str, replicas: usize) -> stream::Config {
    stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        storage: StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// A `sync_interval: always` server, a client, and a file stream on it.
async fn durable_server_with_stream(
    name: &str,
    subject: &str,
) -> Result<(NatsServer, Client), String> {
    let server = NatsServer::builder().sync_always().start().map_err(fail)?;
    let client = Client::builder(server.url())
        .connect()
        .await
        .map_err(fail)?;
    client
        .create_stream(file_stream(name, subject, 1))
        .await
        .map_err(fail)?;
    Ok((server, client))
}

/// Reads every message of `stream` through a raw async-nats client and
/// returns how many there are and the distinct `Nats-Msg-Id`s. Retried for
/// a while: right after a restart the stream may still be electing.
async fn stored_ids(urls: &str, stream: &str) -> Result<(u64, HashSet<String>), String> {
    let mut last = String::new();
    for _ in 0..10 {
        match read_ids(urls, stream).await {
            Ok(found) => return Ok(found),
            Err(err) => last = err,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(last)
}

async fn read_ids(urls: &str, stream: &str) -> Result<(u64, HashSet<String>), String> {
    let addrs: Vec<async_nats::ServerAddr> = urls
        .split(',')
        .map(|u| u.parse().map_err(fail))
        .collect::<Result<_, _>>()?;
    let raw = async_nats::connect(addrs)
        .await
        .map_err(|e| format!("raw connect: {e}"))?;
    let js = async_nats::jetstream::new(raw);
    let (read, ids) = read_stream_ids(&js, stream).await?;
    Ok((read, ids.into_iter().collect()))
}

/// Every `Nats-Msg-Id` of `stream`, in stream order, and how many messages
/// were read.
async fn read_stream_ids(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> Result<(u64, Vec<String>), String> {
    let mut stream = js
        .get_stream(stream)
        .await
        .map_err(|e| format!("raw get stream: {e}"))?;
    let total = stream
        .info()
        .await
        .map_err(|e| format!("raw stream info: {e}"))?
        .state
        .messages;
    let consumer = stream
        .create_consumer(pull::Config {
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("raw consumer: {e}"))?;
    let mut ids = Vec::new();
    let mut read = 0u64;
    while read < total {
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .map_err(fail)?;
        let mut got = 0;
        while let Some(message) = batch.next().await {
            let message = message.map_err(fail)?;
            got += 1;
            if let Some(id) = message
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            {
                ids.push(id.to_string());
            }
        }
        if got == 0 {
            return Err(format!("read {read} of {total} messages, then nothing"));
        }
        read += got;
    }
    Ok((read, ids))
}

/// An awaited publisher: message ids `{prefix}-{n}`, each resent with the
/// same id until acknowledged. Records acked ids and the longest wait for
/// one ack.
#[derive(Default)]
struct AwaitedStats {
    acked: Mutex<Vec<String>>,
    longest: Mutex<Duration>,
    last_ack: Mutex<Option<Instant>>,
}

fn spawn_awaited_publisher(
    client: Client,
    subject: &'static str,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> (Arc<AwaitedStats>, tokio::task::JoinHandle<()>) {
    let stats = Arc::new(AwaitedStats::default());
    let shared = stats.clone();
    let task = tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let id = format!("{prefix}-{n}");
            let started = Instant::now();
            loop {
                let options = StreamPublishOptions::new().message_id(id.clone());
                match client
                    .publish_to_stream_with(subject, "payload", options)
                    .await
                {
                    Ok(_) => break,
                    Err(_) if stop.load(Ordering::SeqCst) => return,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            let took = started.elapsed();
            if let Ok(mut longest) = shared.longest.lock() {
                *longest = (*longest).max(took);
            }
            if let Ok(mut acked) = shared.acked.lock() {
                acked.push(id);
            }
            if let Ok(mut last) = shared.last_ack.lock() {
                *last = Some(Instant::now());
            }
            n += 1;
        }
    });
    (stats, task)
}

/// Waits for the publisher's next ack after `since` and returns the delay.
async fn first_ack_after(stats: &AwaitedStats, since: Instant) -> Result<Duration, String> {
    wait_for(
        Duration::from_secs(30),
        "an ack after the restart",
        || async {
            stats
                .last_ack
                .lock()
                .ok()
                .and_then(|l| *l)
                .filter(|at| *at > since)
                .map(|at| at - since)
        },
    )
    .await
}

fn lost_and_duplicates(acked: &[String], stored: u64, ids: &HashSet<String>) -> (usize, u64) {
    let lost = acked.iter().filter(|id| !ids.contains(*id)).count();
    let duplicates = stored - ids.len() as u64;
    (lost, duplicates)
}

/// Three SIGKILLs of a `sync_interval: always` server during awaited and
/// pipelined publishing.
async fn single_server_kills() -> Outcome {
    let (mut server, client) = durable_server_with_stream("KILLS", "kills.>").await?;
    let stop = Arc::new(AtomicBool::new(false));
    let (awaited, awaited_task) =
        spawn_awaited_publisher(client.clone(), "kills.awaited", "a", stop.clone());

    // Pipelined: 256 acks in flight; a failure is resent with its id.
    let pipelined_acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let pipelined = {
        let (client, stop, acked) = (client.clone(), stop.clone(), pipelined_acked.clone());
        tokio::spawn(async move {
            let Ok(publisher) = client.stream_publisher(256) else {
                return;
            };
            let mut next = 0u64;
            let mut resend: Vec<String> = Vec::new();
            while !stop.load(Ordering::SeqCst) || !resend.is_empty() {
                let mut sent: Vec<String> = Vec::new();
                let mut batch: Vec<String> = std::mem::take(&mut resend);
                if !stop.load(Ordering::SeqCst) {
                    while batch.len() < 500 {
                        batch.push(format!("p-{next}"));
                        next += 1;
                    }
                }
                for id in batch {
                    let options = StreamPublishOptions::new().message_id(id.clone());
                    match publisher
                        .publish_with("kills.pipelined", "payload", options)
                        .await
                    {
                        Ok(()) => sent.push(id),
                        Err(_) => {
                            resend.push(id);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                let report = publisher.flush().await;
                let failed: HashSet<u64> = report.errors.iter().map(|(i, _)| *i).collect();
                let base = report.acked + report.failed - sent.len() as u64;
                if let Ok(mut acked) = acked.lock() {
                    for (offset, id) in sent.into_iter().enumerate() {
                        if failed.contains(&(base + offset as u64)) {
                            resend.push(id);
                        } else {
                            acked.push(id);
                        }
                    }
                }
            }
        })
    };

    let mut first_acks = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        server.kill_async().await.map_err(fail)?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.restart_async().await.map_err(fail)?;
        first_acks.push(first_ack_after(&awaited, Instant::now()).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    awaited_task.await.map_err(fail)?;
    pipelined.await.map_err(fail)?;

    let (stored, ids) = stored_ids(&server.url(), "KILLS").await?;
    let mut acked = awaited.acked.lock().map_err(fail)?.clone();
    let awaited_count = acked.len();
    acked.extend(pipelined_acked.lock().map_err(fail)?.iter().cloned());
    let (lost, duplicates) = lost_and_duplicates(&acked, stored, &ids);
    let worst_first_ack = first_acks.iter().max().copied().unwrap_or_default();
    let line = format!(
        "{awaited_count} awaited + {} pipelined acked, {stored} stored, lost {lost}, duplicates {duplicates}, first ack after each restart {first_acks:?} (target 1 s)",
        acked.len() - awaited_count
    );
    check(lost == 0 && duplicates == 0, || line.clone())?;
    check(worst_first_ack < Duration::from_secs(3), || line.clone())?;
    check(acked.len() > 1000, || format!("too few acks: {line}"))?;
    client.close().await.map_err(fail)?;
    Ok(line)
}

/// Two kills of the stream leader of an R3 stream (`sync_interval: always`)
/// during awaited publishing.
async fn r3_stream_leader_kills() -> Outcome {
    let mut cluster = Cluster::builder(3)
        .configure(|_, builder| builder.sync_always())
        .start()
        .map_err(fail)?;
    let client = Client::builder(cluster.urls())
        .connect()
        .await
        .map_err(fail)?;
    wait_for(Duration::from_secs(30), "an R3 stream", || async {
        client
            .create_stream(file_stream("LEADER", "leader.>", 3))
            .await
            .ok()
    })
    .await?;
    cluster
        .wait_for_stream_current_async("LEADER", Duration::from_secs(30))
        .await
        .map_err(fail)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (stats, task) = spawn_awaited_publisher(client.clone(), "leader.x", "l", stop.clone());
    let mut killed = Vec::new();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let leader = cluster
            .wait_for_stream_current_async("LEADER", Duration::from_secs(30))
            .await
            .map_err(fail)?;
        cluster.node_mut(leader).kill_async().await.map_err(fail)?;
        let killed_at = Instant::now();
        let acked_at_kill = stats.acked.lock().map_err(fail)?.len();
        let new_leader = loop {
            if let Some(l) = cluster.stream_leader("LEADER").filter(|l| *l != leader) {
                break l;
            }
            if killed_at.elapsed() > Duration::from_secs(30) {
                return Err("no new stream leader within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Seen in the monitoring endpoint: what natskit adds is the time
        // from here to the first acks under the new leader.
        let elected = killed_at.elapsed();
        // Publishing goes on under the new leader before the old one returns.
        wait_for(
            Duration::from_secs(30),
            "acks under the new leader",
            || async { (stats.acked.lock().ok()?.len() > acked_at_kill + 10).then_some(()) },
        )
        .await?;
        killed.push((leader, new_leader, elected, killed_at.elapsed()));
        cluster
            .node_mut(leader)
            .restart_async()
            .await
            .map_err(fail)?;
    }
    cluster
        .wait_for_stream_current_async("LEADER", Duration::from_secs(30))
        .await
        .map_err(fail)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    task.await.map_err(fail)?;
    let (stored, ids) = stored_ids(&cluster.urls(), "LEADER").await?;
    let acked = stats.acked.lock().map_err(fail)?.clone();
    let (lost, duplicates) = lost_and_duplicates(&acked, stored, &ids);
    let longest = *stats.longest.lock().map_err(fail)?;
    let line = format!(
        "leader kills (old, new, leader seen after, publishing again after) {killed:?}: {} acked, {stored} stored, lost {lost}, duplicates {duplicates}, longest wait for one ack {longest:?}",
        acked.len()
    );
    check(lost == 0 && duplicates == 0 && !acked.is_empty(), || {
        line.clone()
    })?;
    client.close().await.map_err(fail)?;
    Ok(line)
}

/// Counts of one CAS counter run.
#[derive(Default)]
struct CounterRun {
    ok: AtomicU64,
    waits: AtomicU64,
    done: AtomicUsize,
    errors: Mutex<BTreeMap<String, usize>>,
}

/// `tasks` tasks each increment `key` `each` times by CAS.
fn spawn_counter(
    store: &natskit::KvStore,
    key: &'static str,
    tasks: usize,
    each: usize,
) -> (Arc<CounterRun>, Vec<tokio::task::JoinHandle<()>>) {
    let run = Arc::new(CounterRun::default());
    let handles = (0..tasks)
        .map(|_| {
            let (store, run) = (store.clone(), run.clone());
            tokio::spawn(async move {
                let mut increments = 0;
                while increments < each {
                    increments += 1;
                    let result = store
                        .update_with_retry(key, |current| {
                            let n: u64 = match current {
                                Some(v) => std::str::from_utf8(v)?.parse()?,
                                None => 0,
                            };
                            Ok::<_, natskit::BoxError>((n + 1).to_string().into_bytes())
                        })
                        .await;
                    match result {
                        Ok(_) => {
                            run.ok.fetch_add(1, Ordering::SeqCst);
                        }
                        // Failed fast without touching the server: wait for
                        // the reconnect, as an application would.
                        Err(err) if err.is_not_connected() || err.is_circuit_open() => {
                            increments -= 1;
                            run.waits.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        Err(err) => {
                            let kind = if err.is_conflict() {
                                "conflict"
                            } else if matches!(err, Error::NoResponders { .. }) {
                                "no-responders"
                            } else if err.is_timeout() {
                                "timeout"
                            } else {
                                "other"
                            };
                            if let Ok(mut errors) = run.errors.lock() {
                                *errors.entry(format!("{kind}: {err}")).or_default() += 1;
                            }
                        }
                    }
                    run.done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    (run, handles)
}

async fn counter_value(store: &natskit::KvStore, key: &str) -> Result<u64, String> {
    let entry = store.get(key).await.map_err(fail)?;
    std::str::from_utf8(&entry.value)
        .map_err(fail)?
        .parse()
        .map_err(fail)
}

/// One key of an R3 bucket incremented by CAS from 8 tasks with the
/// default `KvOptions`: first without faults (8 x 500 must end at exactly
/// 4,000 with no error), then while the bucket's stream leader is killed and
/// restarted (the final value equals the number of `Ok` returns, and no call
/// returns a conflict or no-responders).
async fn r3_kv_counter_leader_kill() -> Outcome {
    const TASKS: usize = 8;
    let mut cluster = Cluster::start(3).map_err(fail)?;
    let client = Client::builder(cluster.urls())
        .connect()
        .await
        .map_err(fail)?;
    let bucket = wait_for(Duration::from_secs(30), "an R3 bucket", || async {
        client
            .ensure_key_value_bucket(kv::Config {
                bucket: "counter".into(),
                num_replicas: 3,
                storage: StorageType::File,
                ..Default::default()
            })
            .await
            .ok()
    })
    .await?;
    cluster
        .wait_for_stream_current_async("KV_counter", Duration::from_secs(30))
        .await
        .map_err(fail)?;
    let store = client.kv_store(bucket, KvOptions::default());

    let calm_started = Instant::now();
    let (calm, tasks) = spawn_counter(&store, "calm", TASKS, 500);
    for task in tasks {
        task.await.map_err(fail)?;
    }
    let calm_value = counter_value(&store, "calm").await?;
    let calm_errors = calm.errors.lock().map_err(fail)?.clone();
    let calm_line = format!(
        "no fault: 8 x 500 -> {calm_value} with {} errors in {:.1?}",
        calm_errors.values().sum::<usize>(),
        calm_started.elapsed()
    );
    check(calm_value == 4000 && calm_errors.is_empty(), || {
        format!("{calm_line} {calm_errors:?}")
    })?;

    const EACH: usize = 150;
    let (run, tasks) = spawn_counter(&store, "n", TASKS, EACH);
    wait_for(
        Duration::from_secs(60),
        "a third of the increments",
        || async { (run.done.load(Ordering::SeqCst) >= TASKS * EACH / 3).then_some(()) },
    )
    .await?;
    let leader = cluster
        .stream_leader("KV_counter")
        .ok_or("no leader for the bucket")?;
    cluster.node_mut(leader).kill_async().await.map_err(fail)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster
        .node_mut(leader)
        .restart_async()
        .await
        .map_err(fail)?;
    for task in tasks {
        task.await.map_err(fail)?;
    }
    let value = counter_value(&store, "n").await?;
    let ok = run.ok.load(Ordering::SeqCst);
    let errors = run.errors.lock().map_err(fail)?.clone();
    let bad = errors
        .keys()
        .filter(|k| k.starts_with("conflict") || k.starts_with("no-responders"))
        .count();
    let line = format!(
        "{calm_line}; leader n{leader} killed: {ok} Ok of {}, final value {value}, {} fast failures while reconnecting (retried), errors {errors:?}",
        TASKS * EACH,
        run.waits.load(Ordering::SeqCst)
    );
    check(value == ok && bad == 0, || line.clone())?;
    client.close().await.map_err(fail)?;
    Ok(line)
}

/// The breaker under a frozen server (SIGSTOP), a network partition (proxy
/// blackhole) and a killed server, with mixed traffic every 10 ms.
async fn breaker_faults() -> Outcome {
    let mut server = NatsServer::start_jetstream().map_err(fail)?;
    let proxy = Proxy::start(server.client_port()).await.map_err(fail)?;
    let client = Client::builder(proxy.url())
        .breaker_threshold(3)
        .initial_backoff(Duration::from_millis(500))
        .max_backoff(Duration::from_secs(4))
        .ping_interval(Duration::from_secs(2))
        .connect()
        .await
        .map_err(fail)?;
    client
        .create_stream(stream::Config {
            name: "MIX".into(),
            subjects: vec!["mix.>".into()],
            storage: StorageType::Memory,
            ..Default::default()
        })
        .await
        .map_err(fail)?;
    let service = client
        .serve("mix.svc", natskit::SubscribeOptions::new(), |_msg| async {
            Ok::<_, natskit::ServiceError>("ok".into())
        })
        .await
        .map_err(fail)?;
    let mut lines = Vec::new();
    for fault in ["freeze", "partition", "kill"] {
        let attempts_before = proxy.connections();
        let started = Instant::now();
        match fault {
            "freeze" => server.pause_async().await.map_err(fail)?,
            "partition" => proxy.blackhole(),
            _ => server.kill_async().await.map_err(fail)?,
        }
        let (mut open_at, mut rejections, mut probes_after_open) = (None, Vec::new(), 0u32);
        let mut i = 0u64;
        while started.elapsed() < Duration::from_secs(5) {
            i += 1;
            let at = Instant::now();
            let outcome = match i % 3 {
                0 => client.publish("mix.core", "x").await.map(drop),
                1 => client
                    .request_timeout("mix.svc", "x", Duration::from_millis(200))
                    .await
                    .map(drop),
                _ => client
                    .publish_to_stream_with(
                        "mix.js",
                        "x",
                        StreamPublishOptions::new()
                            .timeout(Duration::from_millis(200))
                            .retry(RetryConfig {
                                max_retries: 0,
                                ..RetryConfig::default()
                            }),
                    )
                    .await
                    .map(drop),
            };
            match outcome {
                Err(err) if err.is_circuit_open() => {
                    open_at.get_or_insert(started.elapsed());
                    rejections.push(at.elapsed());
                }
                Err(err) if open_at.is_some() && err.is_infrastructure() => probes_after_open += 1,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let open_for = open_at.map_or(Duration::ZERO, |at| started.elapsed().saturating_sub(at));
        let attempts = proxy.connections() - attempts_before;
        let healed = Instant::now();
        match fault {
            "freeze" => server.resume_async().await.map_err(fail)?,
            "partition" => proxy.heal(),
            _ => server.restart_async().await.map_err(fail)?,
        }
        let recovered = wait_for(
            Duration::from_secs(30),
            "a request after healing",
            || async {
                client
                    .request_timeout("mix.svc", "x", Duration::from_millis(500))
                    .await
                    .ok()
                    .map(|_| healed.elapsed())
            },
        )
        .await?;
        rejections.sort();
        let p99 = rejections
            .get(rejections.len() * 99 / 100)
            .copied()
            .unwrap_or_default();
        let open_at = open_at.ok_or_else(|| format!("{fault}: the breaker never opened"))?;
        lines.push(format!(
            "{fault}: open after {open_at:.2?}, {} rejections (p99 {p99:.2?}), {probes_after_open} user calls risked in {open_for:.1?} open, {attempts} connects, recovered {recovered:.2?} after healing",
            rejections.len()
        ));
        check(recovered < Duration::from_secs(3), || lines.join("; "))?;
        // At most one user call per initial back-off (500 ms) while open.
        let allowed = open_for.as_millis() / 500 + 1;
        check(u128::from(probes_after_open) <= allowed, || {
            format!("too many probes: {}", lines.join("; "))
        })?;
    }
    service.unsubscribe().await;
    client.close().await.map_err(fail)?;
    Ok(lines.join("; "))
}

/// A supervised durable consumer across a server kill, an outside delete
/// and naks: every message handled at least once, no orphan consumers.
async fn consumer_kill_delete_naks() -> Outcome {
    const TOTAL: u64 = 2000;
    const NAKS: usize = 10;
    let (mut server, client) = durable_server_with_stream("WORK", "work.>").await?;
    // Half the messages before the kill, half after it.
    let publish_half = |from: u64| {
        let client = client.clone();
        async move {
            let publisher = client.stream_publisher(256).map_err(fail)?;
            for i in from..from + TOTAL / 2 {
                publisher
                    .publish(format!("work.{i}"), "job")
                    .await
                    .map_err(fail)?;
            }
            let report = publisher.flush().await;
            check(report.acked == TOTAL / 2, || {
                format!("published {report:?}")
            })
        }
    };
    publish_half(0).await?;

    let handled = Arc::new(Mutex::new(HashSet::new()));
    let failed_once = Arc::new(Mutex::new(HashSet::new()));
    let deliveries = Arc::new(AtomicU64::new(0));
    let nak_phase = Arc::new(AtomicBool::new(false));
    let (seen, failed, count, naking) = (
        handled.clone(),
        failed_once.clone(),
        deliveries.clone(),
        nak_phase.clone(),
    );
    let handle = client
        .consume_with(
            StreamConsumerConfig::new("WORK")
                .durable("worker")
                .heartbeat(Duration::from_millis(500)),
            move |msg: async_nats::jetstream::Message| {
                let (seen, failed, count, naking) =
                    (seen.clone(), failed.clone(), count.clone(), naking.clone());
                async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    let seq = msg.info().map_or(0, |i| i.stream_sequence);
                    // After the restart, the first delivery of ten 50th
                    // messages not handled yet fails (nak'd for 30 s): only
                    // the recreated consumer can deliver them again in time.
                    let fail = naking.load(Ordering::SeqCst)
                        && seq.is_multiple_of(50)
                        && seen.lock().is_ok_and(|s| !s.contains(&seq))
                        && failed
                            .lock()
                            .is_ok_and(|mut f| f.len() < NAKS && f.insert(seq));
                    let settled = consume_with_heartbeat(&msg, Duration::from_secs(5), async {
                        if fail { Err("transient") } else { Ok(()) }
                    })
                    .await;
                    if matches!(settled, Ok(Settled::Acked))
                        && let Ok(mut seen) = seen.lock()
                    {
                        seen.insert(seq);
                    }
                }
            },
        )
        .await
        .map_err(fail)?;
    let started = Instant::now();
    wait_for(
        Duration::from_secs(60),
        "the first half handled",
        || async { (handled.lock().ok()?.len() as u64 == TOTAL / 2).then_some(()) },
    )
    .await?;
    server.kill_async().await.map_err(fail)?;
    server.restart_async().await.map_err(fail)?;
    nak_phase.store(true, Ordering::SeqCst);
    wait_for(
        Duration::from_secs(30),
        "publishing after the restart",
        || async { publish_half(TOTAL / 2).await.ok() },
    )
    .await?;
    wait_for(
        Duration::from_secs(60),
        "every message but the nak'd ones handled",
        || async {
            let naked = failed_once.lock().ok()?.len();
            let handled = handled.lock().ok()?.len();
            (naked == NAKS && handled as u64 == TOTAL - NAKS as u64).then_some(())
        },
    )
    .await
    .map_err(|e| {
        format!(
            "{e}: {} handled, {} nak'd, {} deliveries",
            handled.lock().map(|h| h.len()).unwrap_or(0),
            failed_once.lock().map(|f| f.len()).unwrap_or(0),
            deliveries.load(Ordering::SeqCst)
        )
    })?;
    let raw = async_nats::connect(server.url()).await.map_err(fail)?;
    async_nats::jetstream::new(raw)
        .delete_consumer_from_stream("worker", "WORK")
        .await
        .map_err(fail)?;
    wait_for(Duration::from_secs(60), "every message handled", || async {
        (handled.lock().ok()?.len() as u64 == TOTAL).then_some(())
    })
    .await
    .map_err(|e| {
        format!(
            "{e}: {} of {TOTAL} handled",
            handled.lock().map(|h| h.len()).unwrap_or(0)
        )
    })?;
    let took = started.elapsed();
    let consumers = wait_for(
        Duration::from_secs(30),
        "one consumer on the server",
        || async {
            let mut stream = client.get_stream("WORK").await.ok()?;
            let count = stream.info().await.ok()?.state.consumer_count;
            (count == 1).then_some(count)
        },
    )
    .await?;
    let stats = handle.stats();
    let line = format!(
        "{TOTAL} handled at least once in {took:.1?} across a kill and an outside delete; {} deliveries, {} naks, {} recreations, {consumers} consumer(s) on the server",
        deliveries.load(Ordering::SeqCst),
        failed_once.lock().map(|f| f.len()).unwrap_or(0),
        stats.recreations
    );
    check(consumers == 1 && stats.recreations >= 1, || line.clone())?;
    handle.stop().await;
    client.close().await.map_err(fail)?;
    Ok(line)
}

/// A KV watch keeps delivering across a server restart: the last value of
/// every key written before, during and after the restart is seen.
async fn kv_watch_across_restart() -> Outcome {
    const KEYS: u64 = 300;
    let mut server = NatsServer::builder().sync_always().start().map_err(fail)?;
    let client = Client::builder(server.url())
        .connect()
        .await
        .map_err(fail)?;
    let bucket = client
        .ensure_key_value_bucket(kv::Config {
            bucket: "watched".into(),
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(fail)?;
    let store = client.kv_store(bucket, KvOptions::default());
    let mut watch = store.watch("k.>").await.map_err(fail)?;
    let latest = Arc::new(Mutex::new(BTreeMap::<String, String>::new()));
    let collected = latest.clone();
    let watcher = tokio::spawn(async move {
        while let Some(event) = watch.next().await {
            if let WatchEvent::Entry(entry) = event
                && let Ok(mut latest) = collected.lock()
            {
                latest.insert(
                    entry.key.clone(),
                    String::from_utf8_lossy(&entry.value).into_owned(),
                );
            }
        }
    });
    let mut restart_at = None;
    for i in 0..KEYS {
        if i == KEYS / 2 {
            server.kill_async().await.map_err(fail)?;
            server.restart_async().await.map_err(fail)?;
            restart_at = Some(Instant::now());
        }
        let value = format!("v{i}");
        wait_for(Duration::from_secs(30), "a put", || async {
            store.put(&format!("k.{i}"), value.clone()).await.ok()
        })
        .await?;
    }
    let restarted = restart_at.ok_or("no restart happened")?;
    let caught_up = wait_for(
        Duration::from_secs(30),
        "the watch to see every key",
        || async {
            let latest = latest.lock().ok()?;
            (0..KEYS)
                .all(|i| latest.get(&format!("k.{i}")) == Some(&format!("v{i}")))
                .then(|| restarted.elapsed())
        },
    )
    .await?;
    watcher.abort();
    client.close().await.map_err(fail)?;
    Ok(format!(
        "all {KEYS} keys seen by the watch across a kill and restart; caught up {caught_up:.1?} after the restart"
    ))
}

/// `publishers` tasks store `each` messages durably (subject per task);
/// returns the message ids of every `Ok`.
async fn durable_publish(
    outbox: &Outbox,
    prefix: &str,
    publishers: usize,
    each: usize,
) -> Result<Vec<String>, String> {
    let mut tasks = Vec::new();
    for t in 0..publishers {
        let outbox = outbox.clone();
        let subject = format!("{prefix}.{t}");
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(each);
            for i in 0..each {
                let receipt = outbox
                    .publish_durable(subject.clone(), format!("{i}"))
                    .await
                    .map_err(fail)?;
                ids.push(receipt.message_id);
            }
            Ok::<_, String>(ids)
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.extend(task.await.map_err(fail)??);
    }
    Ok(ids)
}

/// The durable outbox across a 10 s partition (a blackholing proxy) while
/// 32,000 messages are stored, then a SIGKILL and restart of the server
/// (`sync_interval: always`) while another 16,000 are forwarded. Every
/// stored message must be in the stream exactly once.
async fn outbox_partition_and_kill() -> Outcome {
    let mut server = NatsServer::builder().sync_always().start().map_err(fail)?;
    let proxy = Proxy::start(server.client_port()).await.map_err(fail)?;
    let client = Client::builder(proxy.url())
        .reconnect_wait(Duration::from_millis(100))
        .connect()
        .await
        .map_err(fail)?;
    client
        .create_stream(file_stream("OUTBOX", "outbox.>", 1))
        .await
        .map_err(fail)?;
    let dir = tempfile::tempdir().map_err(fail)?;
    let outbox = Outbox::open(
        &client,
        OutboxConfig::new(dir.path().join("outbox.redb")).ack_timeout(Duration::from_secs(2)),
    )
    .await
    .map_err(fail)?;

    proxy.blackhole();
    let cut = Instant::now();
    let mut ids = durable_publish(&outbox, "outbox.p", 16, 2000).await?;
    let stored_in = cut.elapsed();
    let pending_at_heal = outbox.stats().pending_messages;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(cut.elapsed())).await;
    proxy.heal();
    let healed = Instant::now();
    outbox
        .flush_outbox(Duration::from_secs(60))
        .await
        .map_err(fail)?;
    let drained_in = healed.elapsed();

    let second = {
        let outbox = outbox.clone();
        tokio::spawn(async move { durable_publish(&outbox, "outbox.k", 8, 2000).await })
    };
    let forwarded = outbox.stats().forwarded;
    wait_for(Duration::from_secs(30), "forwarding under way", || async {
        (outbox.stats().forwarded > forwarded + 2000).then_some(())
    })
    .await?;
    server.kill_async().await.map_err(fail)?;
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart_async().await.map_err(fail)?;
    ids.extend(second.await.map_err(fail)??);
    outbox
        .flush_outbox(Duration::from_secs(60))
        .await
        .map_err(fail)?;
    let recovered_in = killed.elapsed();
    let stats = outbox.stats();
    let (stored, found) = stored_ids(&server.url(), "OUTBOX").await?;
    let lost = ids.iter().filter(|id| !found.contains(*id)).count();
    let duplicates = stored - found.len() as u64;
    let line = format!(
        "{} stored durably ({:.0} msg/s during the partition, {pending_at_heal} pending at the heal), \
         drained {drained_in:?} after the heal, all acknowledged {recovered_in:?} after the server kill; \
         {stored} in the stream, lost {lost}, duplicates {duplicates}, resent {}, reordered {}",
        ids.len(),
        32_000.0 / stored_in.as_secs_f64(),
        stats.resent,
        stats.reordered,
    );
    check(
        lost == 0 && duplicates == 0 && stored == ids.len() as u64,
        || line.clone(),
    )?;
    check(drained_in < Duration::from_secs(60), || {
        format!("slow drain: {line}")
    })?;
    outbox.close().await.map_err(fail)?;
    client.close().await.map_err(fail)?;
    Ok(line)
}

/// The outbox at the edge: a client on a leaf (with JetStream of its own)
/// stores 16,000 messages durably for a hub stream in strict order while
/// the uplink is blackholed for 4 s and then refused for 4 s. Nothing may
/// become a dead letter, every message must be in the hub stream once, and
/// the stream order must be the store order (default message ids are the
/// outbox id and the sequence in fixed-width hex, so store order is their
/// text order).
async fn outbox_strict_through_the_uplink() -> Outcome {
    let edge = Edge::builder().leaf("leaf").start().await.map_err(fail)?;
    let leaf = edge.leaf(0);
    let client = Client::builder(leaf.url())
        .jetstream_domain(HUB_DOMAIN)
        .reconnect_wait(Duration::from_millis(100))
        .connect()
        .await
        .map_err(fail)?;
    client
        .ensure_stream(file_stream("STRICTEDGE", "strictedge.>", 1))
        .await
        .map_err(fail)?;
    let dir = tempfile::tempdir().map_err(fail)?;
    let outbox = Outbox::open(
        &client,
        OutboxConfig::new(dir.path().join("outbox.redb"))
            .strict_order(true)
            .expect_stream("STRICTEDGE")
            .ack_timeout(Duration::from_secs(2)),
    )
    .await
    .map_err(fail)?;
    let publishing = {
        let outbox = outbox.clone();
        tokio::spawn(async move { durable_publish(&outbox, "strictedge.p", 8, 2000).await })
    };
    wait_for(Duration::from_secs(30), "forwarding under way", || async {
        (outbox.stats().forwarded > 1000).then_some(())
    })
    .await?;
    leaf.blackhole_uplink();
    let outage = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    leaf.cut_uplink();
    tokio::time::sleep(Duration::from_secs(4)).await;
    leaf.heal_uplink();
    let healed = Instant::now();
    let ids = publishing.await.map_err(fail)??;
    let report = outbox
        .flush_outbox(Duration::from_secs(60))
        .await
        .map_err(fail)?;
    let drained_in = healed.elapsed();
    let stats = outbox.stats();
    let js = async_nats::jetstream::with_domain(client.nats().map_err(fail)?.clone(), HUB_DOMAIN);
    let (stored, order) = read_stream_ids(&js, "STRICTEDGE").await?;
    let found: HashSet<&String> = order.iter().collect();
    let lost = ids.iter().filter(|id| !found.contains(id)).count();
    let duplicates = stored - found.len() as u64;
    let behind = order.windows(2).filter(|w| w[1] < w[0]).count();
    let line = format!(
        "{} stored in strict order across an {:?} uplink outage; {stored} in the hub stream, lost {lost}, \
         duplicates {duplicates}, out of store order {behind}, dead letters {}, reordered {}; \
         all acknowledged {drained_in:?} after the heal; resent {}",
        ids.len(),
        healed.duration_since(outage),
        report.dead_lettered,
        stats.reordered,
        stats.resent,
    );
    check(
        lost == 0
            && duplicates == 0
            && behind == 0
            && report.dead_lettered == 0
            && stats.reordered == 0
            && stored == ids.len() as u64,
        || line.clone(),
    )?;
    check(drained_in < Duration::from_secs(30), || {
        format!("slow drain: {line}")
    })?;
    outbox.close().await.map_err(fail)?;
    client.close().await.map_err(fail)?;
    Ok(line)
}

/// A client on a leaf node publishes 1,000 acknowledged messages to a hub
/// stream (each with its own message id, retried until acknowledged) while a
/// supervised consumer on the hub stream handles them through the leaf; at
/// message 300 the uplink is blackholed for 2 s, then refused and cut for
/// 2 s, then healed. Every message must be in the hub stream once and
/// handled, and the uplink's health must flip to unreachable and back while
/// the client's own link stays up.
async fn edge_uplink_stall_and_cut() -> Outcome {
    const MESSAGES: usize = 1_000;
    let edge = Edge::builder().leaf("leaf").start().await.map_err(fail)?;
    let leaf = edge.leaf(0);
    let flips = Arc::new(Mutex::new(Vec::new()));
    let record = flips.clone();
    let client = Client::builder(leaf.url())
        .jetstream_domain(HUB_DOMAIN)
        .health_interval(Duration::from_millis(250))
        .on_jetstream_reachability(move |reach| {
            if let Ok(mut flips) = record.lock() {
                flips.push((Instant::now(), reach.reachable));
            }
        })
        .connect()
        .await
        .map_err(fail)?;
    client
        .ensure_stream(file_stream("EDGE", "edge.>", 1))
        .await
        .map_err(fail)?;
    let handled = Arc::new(Mutex::new(std::collections::BTreeSet::<String>::new()));
    let seen = handled.clone();
    let consumer = client
        .consume_with(
            StreamConsumerConfig::new("EDGE")
                .durable("edge-workers")
                .ack_wait(Duration::from_secs(2))
                .heartbeat(Duration::from_millis(500)),
            move |msg: async_nats::jetstream::Message| {
                let seen = seen.clone();
                async move {
                    if let Ok(mut seen) = seen.lock() {
                        seen.insert(String::from_utf8_lossy(&msg.payload).into_owned());
                    }
                    msg.ack().await
                }
            },
        )
        .await
        .map_err(fail)?;
    let mut healed_at = None;
    let mut first_ack_after_heal = None;
    let mut retries = 0u64;
    for i in 0..MESSAGES {
        if i == 300 {
            leaf.uplink().blackhole();
            let uplink = leaf.uplink();
            let stall = async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                uplink.refuse();
                uplink.cut();
                tokio::time::sleep(Duration::from_secs(2)).await;
                uplink.heal();
            };
            // Publishing goes on (and fails, and is retried) meanwhile.
            let (_, published) = tokio::join!(stall, async {
                publish_until_acked(&client, i, &mut retries).await
            });
            published?;
            healed_at = Some(Instant::now());
            continue;
        }
        publish_until_acked(&client, i, &mut retries).await?;
        if let Some(at) = healed_at
            && first_ack_after_heal.is_none()
        {
            first_ack_after_heal = Some(at.elapsed());
        }
    }
    let healed = healed_at.ok_or("the uplink never healed")?;
    let all_handled = wait_for(Duration::from_secs(60), "every message handled", || async {
        (handled.lock().ok()?.len() == MESSAGES).then(|| healed.elapsed())
    })
    .await?;
    check(client.status() == natskit::Status::Connected, || {
        format!("the client's own link: {:?}", client.status())
    })?;
    let hub = async_nats::ConnectOptions::with_user_and_password(
        natskit_testing::EDGE_USER.into(),
        natskit_testing::EDGE_USER.into(),
    )
    .connect(edge.hub().url())
    .await
    .map_err(fail)?;
    let mut stream = async_nats::jetstream::new(hub)
        .get_stream("EDGE")
        .await
        .map_err(fail)?;
    let stored = stream.info().await.map_err(fail)?.state.messages;
    check(stored == MESSAGES as u64, || {
        format!("{stored} messages in the hub stream, {MESSAGES} published (duplicates or losses)")
    })?;
    let flips = flips.lock().map_err(fail)?.clone();
    let unreachable = flips.iter().any(|(_, r)| *r == Some(false));
    let back = flips.last().map(|(_, r)| *r) == Some(Some(true));
    check(unreachable && back, || {
        format!(
            "uplink health flips: {:?}",
            flips.iter().map(|(_, r)| r).collect::<Vec<_>>()
        )
    })?;
    let stats = consumer.stats();
    consumer.stop().await;
    client.close().await.map_err(fail)?;
    Ok(format!(
        "{MESSAGES} acknowledged through the leaf ({retries} sends retried), {stored} in the hub stream, \
         {MESSAGES} handled ({} deliveries, {} redelivered); first ack {:.2?} after the heal, all handled \
         {all_handled:.2?} after it; uplink health flips {:?}",
        stats.delivered,
        stats.redelivered,
        first_ack_after_heal.unwrap_or_default(),
        flips.iter().map(|(_, r)| *r).collect::<Vec<_>>()
    ))
}

/// Publishes message `i` to the hub stream with its own message id until it
/// is acknowledged (a resend of a stored message is a duplicate the stream
/// absorbs).
async fn publish_until_acked(client: &Client, i: usize, retries: &mut u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let options = StreamPublishOptions::new().message_id(format!("edge-{i}"));
        match client
            .publish_to_stream_with(format!("edge.{}", i % 4), format!("{i}"), options)
            .await
        {
            Ok(_) => return Ok(()),
            Err(_) if Instant::now() < deadline => {
                *retries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => return Err(format!("message {i}: {err}")),
        }
    }
}

/// 10,000 messages to an `auto_ack` consumer; 200 of them (sequences
/// 101-300) fail until released, so the ack floor stays at 100 while the
/// rest is handled; the server is SIGKILLed and restarted, then the
/// consumer is deleted from outside and recreated at the floor. Nothing may
/// be lost, and the repeats that reach the handler must stay under 1,000
/// (without `auto_ack` every message acknowledged above the floor would
/// come again: thousands).
async fn consumer_repeats_after_recreation() -> Outcome {
    const TOTAL: u64 = 10_000;
    let (mut server, client) = durable_server_with_stream("REPEATS", "repeats.>").await?;
    let publisher = client.stream_publisher(256).map_err(fail)?;
    for i in 0..TOTAL {
        publisher
            .publish(format!("repeats.{i}"), "job")
            .await
            .map_err(fail)?;
    }
    let report = publisher.flush().await;
    check(report.acked == TOTAL, || format!("published {report:?}"))?;

    let calls = Arc::new(Mutex::new(BTreeMap::<u64, u64>::new()));
    let release = Arc::new(AtomicBool::new(false));
    let (record, released) = (calls.clone(), release.clone());
    let handle = client
        .consume_with(
            StreamConsumerConfig::new("REPEATS")
                .durable("repeats")
                .auto_ack(true)
                .heartbeat(Duration::from_millis(500)),
            move |msg: async_nats::jetstream::Message| {
                let (record, released) = (record.clone(), released.clone());
                async move {
                    let seq = msg.info().map_or(0, |i| i.stream_sequence);
                    if (101..=300).contains(&seq) && !released.load(Ordering::SeqCst) {
                        return Err("held");
                    }
                    if let Ok(mut calls) = record.lock() {
                        *calls.entry(seq).or_default() += 1;
                    }
                    Ok(())
                }
            },
        )
        .await
        .map_err(fail)?;
    // Everything but the held 200 handled.
    wait_for(Duration::from_secs(60), "the first pass", || async {
        (calls.lock().ok()?.len() as u64 == TOTAL - 200).then_some(())
    })
    .await?;
    server.kill_async().await.map_err(fail)?;
    server.restart_async().await.map_err(fail)?;
    wait_for(
        Duration::from_secs(30),
        "the consumer back after the restart",
        || async { handle.is_healthy().then_some(()) },
    )
    .await?;
    let raw = async_nats::connect(server.url()).await.map_err(fail)?;
    wait_for(Duration::from_secs(30), "the outside delete", || async {
        async_nats::jetstream::new(raw.clone())
            .get_stream("REPEATS")
            .await
            .ok()?
            .delete_consumer("repeats")
            .await
            .ok()
    })
    .await?;
    let deleted = Instant::now();
    wait_for(Duration::from_secs(30), "the recreation", || async {
        (handle.stats().recreations >= 1).then_some(())
    })
    .await?;
    release.store(true, Ordering::SeqCst);
    let settled = wait_for(
        Duration::from_secs(60),
        "every message handled and acknowledged",
        || async {
            let all = calls.lock().ok()?.len() as u64 == TOTAL;
            (all && handle.stats().ack_floor >= TOTAL).then(|| deleted.elapsed())
        },
    )
    .await?;
    let calls = calls.lock().map_err(fail)?.clone();
    let repeats: u64 = calls.values().map(|n| n - 1).sum();
    let lost = (1..=TOTAL).filter(|s| !calls.contains_key(s)).count();
    let stats = handle.stats();
    handle.stop().await;
    client.close().await.map_err(fail)?;
    check(lost == 0, || format!("{lost} messages never handled"))?;
    check(repeats < 1_000, || {
        format!("{repeats} repeats reached the handler ({stats:?})")
    })?;
    Ok(format!(
        "{TOTAL} handled, lost 0, {repeats} repeats reached the handler, {} acknowledged again without it, \
         across a kill, a restart and an outside delete ({} recreations); settled {settled:.2?} after the delete",
        stats.repeats_skipped, stats.recreations
    ))
}
