//! JetStream across a leaf node: a client connected to its leaf targets the
//! hub's JetStream domain (streams, publishing, consumers, KV with
//! compare-and-swap, watches) and, through a second handle, the leaf's own,
//! against a real hub and leaf linked through a proxy.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use natskit::{Client, Error, StreamConsumerConfig, WatchEvent};
use natskit_testing::{EDGE_USER, Edge, HUB_DOMAIN, eventually};

use crate::common::{TestResult, WAIT, memory_stream};

/// A raw async-nats client of `server` as the edge account's user
/// (async-nats ignores credentials in a URL).
async fn raw(
    server: &natskit_testing::NatsServer,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::with_user_and_password(EDGE_USER.into(), EDGE_USER.into())
        .connect(server.url())
        .await
}

/// A durable consumer on `stream` that counts and acks what it handles
/// (a delivery lost on a cut link comes again after the 2 s ack wait).
async fn counting_consumer(
    client: &Client,
    stream: &str,
    durable: &str,
) -> natskit::Result<(natskit::ConsumerHandle, Arc<AtomicUsize>)> {
    let handled = Arc::new(AtomicUsize::new(0));
    let count = handled.clone();
    let consumer = client
        .consume_with(
            StreamConsumerConfig::new(stream)
                .durable(durable)
                .ack_wait(Duration::from_secs(2))
                .heartbeat(Duration::from_millis(500)),
            move |msg: jetstream::Message| {
                let count = count.clone();
                async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    msg.ack().await
                }
            },
        )
        .await?;
    Ok((consumer, handled))
}

/// `tasks` tasks each add one to the number under `key`, `each` times,
/// with compare-and-swap.
async fn cas_increments(
    store: &natskit::KvStore,
    key: &'static str,
    tasks: usize,
    each: usize,
) -> TestResult {
    let mut running = Vec::new();
    for _ in 0..tasks {
        let store = store.clone();
        running.push(tokio::spawn(async move {
            for _ in 0..each {
                store
                    .update_with_retry(key, |current| {
                        let n: u64 = match current {
                            Some(v) => std::str::from_utf8(v)?.parse()?,
                            None => 0,
                        };
                        Ok::<_, natskit::BoxError>((n + 1).to_string().into_bytes())
                    })
                    .await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for task in running {
        task.await??;
    }
    Ok(())
}

/// A hub and one leaf with JetStream domain `leaf`, and a natskit client on
/// the leaf whose JetStream target is the hub.
async fn edge() -> Result<(Edge, Client), Box<dyn std::error::Error + Send + Sync>> {
    let edge = Edge::builder().leaf("leaf").start().await?;
    let client = Client::builder(edge.leaf(0).url())
        .jetstream_domain(HUB_DOMAIN)
        .connect()
        .await?;
    Ok((edge, client))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_publishes_through_a_leaf_go_to_the_hub_domain() -> TestResult {
    let (edge, client) = edge().await?;
    assert_eq!(client.jetstream_api_prefix(), "$JS.hub.API");
    client
        .ensure_stream(memory_stream("ORDERS", &["orders.>"]))
        .await?;
    // On the hub, not on the leaf.
    let on_hub = jetstream::new(raw(edge.hub()).await?);
    assert_eq!(
        on_hub.get_stream("ORDERS").await?.cached_info().config.name,
        "ORDERS"
    );
    let on_leaf = jetstream::new(raw(edge.leaf(0).server()).await?);
    assert!(
        on_leaf.get_stream("ORDERS").await.is_err(),
        "not on the leaf"
    );

    let ack = client.publish_to_stream("orders.1", "one").await?;
    assert_eq!(ack.domain, HUB_DOMAIN);
    assert_eq!(ack.stream, "ORDERS");
    let publisher = client.stream_publisher(64)?;
    for i in 0..200 {
        publisher.publish(format!("orders.{i}"), "x").await?;
    }
    let report = publisher.flush().await;
    assert_eq!(
        (report.acked, report.failed),
        (200, 0),
        "{:?}",
        report.errors
    );
    let mut stream = on_hub.get_stream("ORDERS").await?;
    assert_eq!(stream.info().await?.state.messages, 201);

    // The same connection, another target: the leaf's own domain.
    let local = client.with_jetstream_domain("leaf")?;
    assert_eq!(local.jetstream_api_prefix(), "$JS.leaf.API");
    local
        .ensure_stream(memory_stream("LOCAL", &["local.>"]))
        .await?;
    let ack = local.publish_to_stream("local.1", "here").await?;
    assert_eq!(ack.domain, "leaf");
    assert!(on_hub.get_stream("LOCAL").await.is_err(), "not on the hub");
    assert!(on_leaf.get_stream("LOCAL").await.is_ok());
    // The hub handle still targets the hub.
    assert!(client.get_stream("ORDERS").await.is_ok());
    assert!(
        client
            .get_stream("LOCAL")
            .await
            .is_err_and(|e| e.is_not_found())
    );

    // Bad targets are typed errors before any I/O.
    for bad in ["", "a.b", "two words"] {
        assert!(matches!(
            client.with_jetstream_domain(bad),
            Err(Error::InvalidConfig(_))
        ));
    }
    assert!(matches!(
        client.with_jetstream_prefix("JS.*.API"),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        Client::builder(edge.leaf(0).url())
            .jetstream_domain("a.b")
            .build(),
        Err(Error::InvalidConfig(_))
    ));
    client.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_consumer_through_the_leaf_survives_an_uplink_cut() -> TestResult {
    let (edge, client) = edge().await?;
    client
        .ensure_stream(memory_stream("WORK", &["work.>"]))
        .await?;
    let (consumer, handled) = counting_consumer(&client, "WORK", "workers").await?;
    for i in 0..100 {
        client.publish_to_stream(format!("work.{i}"), "x").await?;
    }
    eventually(WAIT, "the first 100 handled", || async {
        (handled.load(Ordering::SeqCst) >= 100).then_some(())
    })
    .await;

    // Cut the uplink: the leaf and the client's own link stay up.
    let uplink = edge.leaf(0).uplink();
    uplink.refuse();
    uplink.cut();
    edge.leaf(0).wait_for_unlinked(WAIT).await?;
    assert_eq!(client.status(), natskit::Status::Connected);
    uplink.heal();
    edge.leaf(0).wait_for_uplink(WAIT).await?;

    for i in 100..200 {
        // The hub may need a moment after the link is back.
        eventually(WAIT, "a publish after the heal", || async {
            client
                .publish_to_stream(format!("work.{i}"), "x")
                .await
                .ok()
        })
        .await;
    }
    eventually(WAIT, "all 200 handled after the heal", || async {
        let stats = consumer.stats();
        (handled.load(Ordering::SeqCst) >= 200 && stats.ack_floor >= 200).then_some(())
    })
    .await;
    let stats = consumer.stats();
    println!("consumer through the leaf: {stats:?}");
    assert!(stats.handled >= 200, "{stats:?}");
    // The consumer lives on the hub.
    let on_hub = jetstream::new(raw(edge.hub()).await?);
    let stream = on_hub.get_stream("WORK").await?;
    assert!(stream.consumer_info("workers").await.is_ok());
    consumer.stop().await;
    client.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_on_the_hub_through_the_leaf_is_exact_under_contention() -> TestResult {
    let (edge, client) = edge().await?;
    let bucket = client
        .ensure_key_value_bucket(kv::Config {
            bucket: "counters".into(),
            history: 5,
            storage: jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await?;
    let store = client.kv_store(
        bucket,
        natskit::KvOptions {
            max_retries: 1_000,
            ..Default::default()
        },
    );
    let mut watch = store.watch("counter").await?;

    let (tasks, per_task) = (4, 250);
    cas_increments(&store, "counter", tasks, per_task).await?;
    let total = (tasks * per_task).to_string();
    assert_eq!(&store.get("counter").await?.value[..], total.as_bytes());
    // Stored on the hub, read back there by a raw client.
    let on_hub = jetstream::new(raw(edge.hub()).await?);
    let raw = on_hub.get_key_value("counters").await?;
    assert_eq!(raw.get("counter").await?.as_deref(), Some(total.as_bytes()));
    // The watch through the leaf sees the last value.
    let last = tokio::time::timeout(WAIT, async {
        while let Some(event) = watch.next().await {
            if let WatchEvent::Entry(entry) = event
                && entry.value[..] == *total.as_bytes()
            {
                return Some(entry);
            }
        }
        None
    })
    .await?
    .ok_or("the watch ended")?;
    assert_eq!(last.key, "counter");
    client.close().await?;
    Ok(())
}

/// The uplink's health, apart from the local link's: cutting the uplink
/// flips the hub's JetStream to unreachable within about one health
/// interval while the client stays `Connected`, and healing flips it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_health_is_reported_apart_from_the_local_link() -> TestResult {
    let edge = Edge::builder().leaf("leaf").start().await?;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let interval = Duration::from_millis(200);
    let client = Client::builder(edge.leaf(0).url())
        .jetstream_domain(HUB_DOMAIN)
        .health_interval(interval)
        .on_jetstream_reachability(move |reach| {
            if let Ok(mut seen) = record.lock() {
                seen.push(reach.reachable);
            }
        })
        .connect()
        .await?;
    let reach = |client: &Client| {
        client
            .status_info()
            .jetstream_apis
            .iter()
            .find(|r| r.api_prefix == "$JS.hub.API")
            .and_then(|r| r.reachable)
    };
    eventually(WAIT, "the hub reachable", || async {
        (reach(&client) == Some(true)).then_some(())
    })
    .await;

    let uplink = edge.leaf(0).uplink();
    uplink.refuse();
    uplink.cut();
    let cut_at = std::time::Instant::now();
    eventually(WAIT, "the hub unreachable", || async {
        (reach(&client) == Some(false)).then_some(())
    })
    .await;
    let flipped = cut_at.elapsed();
    assert_eq!(client.status(), natskit::Status::Connected);
    assert!(client.is_healthy(), "the local link stays healthy");
    uplink.heal();
    let healed_at = std::time::Instant::now();
    eventually(WAIT, "the hub reachable again", || async {
        (reach(&client) == Some(true)).then_some(())
    })
    .await;
    let back = healed_at.elapsed();
    println!(
        "uplink health: unreachable {flipped:?} after the cut, reachable {back:?} after the heal (interval {interval:?})"
    );
    // Generous bound: three health intervals plus the check's own timeout.
    assert!(
        flipped < interval * 3 + Duration::from_secs(5),
        "{flipped:?}"
    );
    let seen = seen.lock().map_err(|e| e.to_string())?.clone();
    assert_eq!(seen, vec![Some(true), Some(false), Some(true)]);
    // A client that only uses its own server's domain reports nothing.
    let local = Client::builder(edge.leaf(0).url()).connect().await?;
    assert!(local.status_info().jetstream_apis.is_empty());
    local.close().await?;
    client.close().await?;
    Ok(())
}

/// The durable outbox of a client on the leaf forwards to a hub stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_forwards_through_the_leaf_to_a_hub_stream() -> TestResult {
    let (edge, client) = edge().await?;
    client
        .ensure_stream(memory_stream("EVENTS", &["events.>"]))
        .await?;
    let dir = tempfile::tempdir()?;
    let outbox = client
        .outbox(natskit::OutboxConfig::new(dir.path().join("edge.redb")))
        .await?;
    for i in 0..500 {
        outbox
            .publish_durable(format!("events.{}", i % 5), format!("{i}"))
            .await?;
    }
    outbox.flush_outbox(WAIT).await?;
    let stats = outbox.stats();
    assert_eq!((stats.forwarded, stats.dead_letters), (500, 0), "{stats:?}");
    let on_hub = jetstream::new(raw(edge.hub()).await?);
    assert_eq!(
        on_hub
            .get_stream("EVENTS")
            .await?
            .info()
            .await?
            .state
            .messages,
        500
    );
    outbox.close().await?;
    client.close().await?;
    Ok(())
}

/// A hub stream can source a leaf stream through the leaf's domain: what
/// is stored at the edge reaches the hub, set up entirely through natskit
/// handles on the leaf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_stream_sources_a_leaf_stream() -> TestResult {
    let (edge, client) = edge().await?;
    let local = client.with_jetstream_domain("leaf")?;
    local
        .ensure_stream(memory_stream("READINGS", &["readings.>"]))
        .await?;
    let mut aggregate = memory_stream("ALL_READINGS", &[]);
    aggregate.sources = Some(vec![jetstream::stream::Source {
        name: "READINGS".into(),
        external: Some(jetstream::stream::External {
            api_prefix: "$JS.leaf.API".into(),
            delivery_prefix: None,
        }),
        ..Default::default()
    }]);
    client.ensure_stream(aggregate).await?;
    for i in 0..50 {
        local
            .publish_to_stream(format!("readings.{i}"), "21.5")
            .await?;
    }
    let on_hub = jetstream::new(raw(edge.hub()).await?);
    eventually(WAIT, "the hub to hold every reading", || async {
        let mut stream = on_hub.get_stream("ALL_READINGS").await.ok()?;
        (stream.info().await.ok()?.state.messages == 50).then_some(())
    })
    .await;
    client.close().await?;
    Ok(())
}

/// The same paths with a 3-node hub: an R3 stream, a consumer, and CAS
/// increments on an R3 bucket, all through the leaf, across a cut of the
/// whole uplink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_hub_through_the_leaf() -> TestResult {
    let edge = Edge::builder().hub_cluster(3).leaf("leaf").start().await?;
    assert_eq!(edge.leaf(0).uplinks().len(), 3);
    assert_eq!(edge.hub_leafnode_ports().len(), 3);
    let client = Client::builder(edge.leaf(0).url())
        .jetstream_domain(HUB_DOMAIN)
        .connect()
        .await?;
    let mut config = memory_stream("R3", &["r3.>"]);
    config.num_replicas = 3;
    eventually(WAIT, "the R3 stream on the hub", || async {
        client.ensure_stream(config.clone()).await.ok()
    })
    .await;
    let (consumer, handled) = counting_consumer(&client, "R3", "r3-workers").await?;
    for i in 0..50 {
        let ack = client.publish_to_stream(format!("r3.{i}"), "x").await?;
        assert_eq!(ack.domain, HUB_DOMAIN);
    }
    let leaf = edge.leaf(0);
    leaf.cut_uplink();
    leaf.wait_for_unlinked(WAIT).await?;
    leaf.heal_uplink();
    leaf.wait_for_uplink(WAIT).await?;
    for i in 50..100 {
        eventually(WAIT, "a publish after the heal", || async {
            client.publish_to_stream(format!("r3.{i}"), "x").await.ok()
        })
        .await;
    }
    eventually(WAIT, "all 100 handled", || async {
        (handled.load(Ordering::SeqCst) >= 100).then_some(())
    })
    .await;
    consumer.stop().await;

    let bucket = eventually(WAIT, "an R3 bucket on the hub", || async {
        client
            .ensure_key_value_bucket(kv::Config {
                bucket: "r3counters".into(),
                num_replicas: 3,
                storage: jetstream::stream::StorageType::Memory,
                ..Default::default()
            })
            .await
            .ok()
    })
    .await;
    let store = client.kv_store(
        bucket,
        natskit::KvOptions {
            max_retries: 1_000,
            ..Default::default()
        },
    );
    cas_increments(&store, "n", 4, 50).await?;
    assert_eq!(&store.get("n").await?.value[..], b"200");
    client.close().await?;
    Ok(())
}

/// The outbox of a client on the leaf across an uplink that is silent and
/// then closed: the hub's stream cannot be reached, which is a pause, not a
/// dead letter; everything arrives once after the heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_waits_out_a_closed_uplink_without_dead_letters() -> TestResult {
    let (edge, client) = edge().await?;
    client
        .ensure_stream(memory_stream("UPLINKED", &["uplinked.>"]))
        .await?;
    let dir = tempfile::tempdir()?;
    let outbox = client
        .outbox(natskit::OutboxConfig::new(dir.path().join("uplink.redb")))
        .await?;
    let leaf = edge.leaf(0);
    leaf.blackhole_uplink();
    for i in 0..300 {
        outbox
            .publish_durable(format!("uplinked.{}", i % 3), format!("{i}"))
            .await?;
    }
    // Sends into the silent uplink fail (no ack in time) more than once.
    eventually(WAIT, "failed sends into the silent uplink", || async {
        (outbox.stats().failed >= 2).then_some(())
    })
    .await;
    leaf.cut_uplink();
    leaf.wait_for_unlinked(WAIT).await?;
    for i in 300..600 {
        outbox
            .publish_durable(format!("uplinked.{}", i % 3), format!("{i}"))
            .await?;
    }
    // Sends into the closed uplink fail too (no responders, no stream
    // reachable), more than once.
    let failed_before = outbox.stats().failed;
    eventually(WAIT, "failed sends into the closed uplink", || async {
        (outbox.stats().failed >= failed_before + 2).then_some(())
    })
    .await;
    assert_eq!(outbox.stats().dead_letters, 0, "{:?}", outbox.stats());
    leaf.heal_uplink();
    leaf.wait_for_uplink(WAIT).await?;
    outbox.flush_outbox(WAIT).await?;
    let stats = outbox.stats();
    assert_eq!((stats.forwarded, stats.dead_letters), (600, 0), "{stats:?}");
    let on_hub = jetstream::new(raw(edge.hub()).await?);
    assert_eq!(
        on_hub
            .get_stream("UPLINKED")
            .await?
            .info()
            .await?
            .state
            .messages,
        600
    );
    outbox.close().await?;
    client.close().await?;
    Ok(())
}

/// An outbox names its own target domain: the client on the leaf uses the
/// leaf's JetStream, its outbox forwards to the hub's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_targets_its_own_domain() -> TestResult {
    let edge = Edge::builder().leaf("leaf").start().await?;
    let client = Client::builder(edge.leaf(0).url()).connect().await?;
    let hub = client.with_jetstream_domain(HUB_DOMAIN)?;
    hub.ensure_stream(memory_stream("FORHUB", &["forhub.>"]))
        .await?;
    let dir = tempfile::tempdir()?;
    assert!(matches!(
        client
            .outbox(natskit::OutboxConfig::new(dir.path().join("bad.redb")).jetstream_domain("a.b"))
            .await,
        Err(Error::InvalidConfig(_))
    ));
    let outbox = client
        .outbox(
            natskit::OutboxConfig::new(dir.path().join("hub.redb")).jetstream_domain(HUB_DOMAIN),
        )
        .await?;
    for i in 0..100 {
        outbox.publish_durable(format!("forhub.{i}"), "x").await?;
    }
    let report = outbox.flush_outbox(WAIT).await?;
    assert_eq!(report.dead_lettered, 0);
    let on_hub = jetstream::new(raw(edge.hub()).await?);
    assert_eq!(
        on_hub
            .get_stream("FORHUB")
            .await?
            .info()
            .await?
            .state
            .messages,
        100
    );
    // The client itself still targets the leaf's JetStream.
    assert_eq!(client.jetstream_api_prefix(), "$JS.API");
    outbox.close().await?;
    client.close().await?;
    Ok(())
}

/// The edge proof: a client on a leaf (with JetStream of its own)
/// stores 20,000 messages durably for a hub stream while the uplink is
/// silent for 10 s and then closed for 10 s. Nothing is a dead letter; after
/// the heal every message is in the hub's stream exactly once, in store
/// order (strict order), within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20s_uplink_stall_and_close_during_20k_strict_durable_publishes() -> TestResult {
    use crate::outbox::{assert_store_order, join_receipts, spawn_publishers, stream_contents};
    use std::time::Instant;
    const OUTAGE: Duration = Duration::from_secs(20);
    let (edge, client) = edge().await?;
    client
        .ensure_stream(memory_stream("EDGE20", &["edge20.>"]))
        .await?;
    let dir = tempfile::tempdir()?;
    let outbox = client
        .outbox(
            natskit::OutboxConfig::new(dir.path().join("edge20.redb"))
                .strict_order(true)
                .expect_stream("EDGE20")
                .ack_timeout(Duration::from_secs(2)),
        )
        .await?;
    let leaf = edge.leaf(0);
    leaf.blackhole_uplink();
    let outage = Instant::now();
    let receipts = join_receipts(spawn_publishers(&outbox, "edge20", 4, 5000)).await?;
    let stored_in = outage.elapsed();
    // The fault schedule: silent for half the outage, then closed.
    tokio::time::sleep((OUTAGE / 2).saturating_sub(outage.elapsed())).await;
    leaf.cut_uplink();
    leaf.wait_for_unlinked(WAIT).await?;
    tokio::time::sleep(OUTAGE.saturating_sub(outage.elapsed())).await;
    let during = outbox.stats();
    assert_eq!(during.dead_letters, 0, "{during:?}");
    assert!(during.failed > 0, "the outage was felt: {during:?}");
    leaf.heal_uplink();
    let healed = Instant::now();
    leaf.wait_for_uplink(WAIT).await?;
    let linked_in = healed.elapsed();
    let report = outbox.flush_outbox(Duration::from_secs(120)).await?;
    let drained_in = healed.elapsed();
    let stats = outbox.stats();
    println!(
        "edge: 20,000 stored in {stored_in:?} of a {OUTAGE:?} outage; uplink back {linked_in:?} \
         and everything acknowledged {drained_in:?} after the heal; {stats:?}"
    );
    assert_eq!(report.dead_lettered, 0);
    assert_eq!(stats.forwarded, 20_000, "{stats:?}");
    // "Within a few seconds" (5 s), with the 3x margin for a busy machine.
    assert!(drained_in < Duration::from_secs(15), "{drained_in:?}");
    let on_hub = jetstream::new(raw(edge.hub()).await?);
    let contents = stream_contents(&on_hub, "EDGE20").await?;
    assert_store_order(&contents, &receipts, &stats);
    outbox.close().await?;
    client.close().await?;
    Ok(())
}
