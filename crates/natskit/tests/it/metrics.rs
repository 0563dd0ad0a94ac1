//! Metrics recorded through the facade, read back with a debugging recorder.

use crate::common::{TestResult, WAIT};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{kv, stream};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use natskit::{Client, KvOptions, StreamConsumerConfig};
use natskit_testing::{TestEnv, eventually};

/// A recorder whose values can be read without resetting them (the
/// debugging recorder of metrics-util swaps values to zero on every
/// snapshot, which breaks tests running side by side).
struct TestRecorder {
    registry: Arc<Registry<Key, AtomicStorage>>,
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.registry
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.registry
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.registry
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

/// One recorder for the whole test binary (the facade allows one global).
fn registry() -> &'static Registry<Key, AtomicStorage> {
    static REGISTRY: OnceLock<Arc<Registry<Key, AtomicStorage>>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let registry = Arc::new(Registry::atomic());
        metrics::set_global_recorder(TestRecorder {
            registry: registry.clone(),
        })
        .expect("install the recorder");
        registry
    })
}

fn matches(key: &Key, name: &str, labels: &[(&str, &str)]) -> bool {
    key.name() == name
        && labels
            .iter()
            .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
}

fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    registry()
        .get_counter_handles()
        .into_iter()
        .find(|(key, _)| matches(key, name, labels))
        .map_or(0, |(_, c)| c.load(std::sync::atomic::Ordering::Relaxed))
}

fn gauge(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    registry()
        .get_gauge_handles()
        .into_iter()
        .find(|(key, _)| matches(key, name, labels))
        .map(|(_, g)| f64::from_bits(g.load(std::sync::atomic::Ordering::Relaxed)))
}

fn histogram_len(name: &str, labels: &[(&str, &str)]) -> usize {
    registry()
        .get_histogram_handles()
        .into_iter()
        .find(|(key, _)| matches(key, name, labels))
        .map_or(0, |(_, h)| h.data().len())
}

async fn client(env: &TestEnv, name: &str) -> natskit::Result<Client> {
    registry();
    Client::builder(env.url()).name(name).connect().await
}

#[tokio::test]
async fn publishes_status_and_breaker_per_client() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let a = client(&env, "metrics-a").await?;
    let b = client(&env, "metrics-b").await?;
    for _ in 0..5 {
        a.publish("m.x", "1").await?;
    }
    b.publish("m.x", "1").await?;
    assert_eq!(
        counter("natskit_publishes_total", &[("client", "metrics-a")]),
        5
    );
    assert_eq!(
        counter("natskit_publishes_total", &[("client", "metrics-b")]),
        1
    );
    eventually(WAIT, "the connected status gauge", || async {
        (gauge("natskit_connection_status", &[("client", "metrics-a")]) == Some(2.0)).then_some(())
    })
    .await;

    a.breaker().trip();
    assert_eq!(
        gauge("natskit_breaker_state", &[("client", "metrics-a")]),
        Some(1.0)
    );
    assert_eq!(
        counter(
            "natskit_breaker_transitions_total",
            &[("client", "metrics-a"), ("to", "open")]
        ),
        1
    );
    assert!(a.publish("m.x", "1").await.unwrap_err().is_circuit_open());
    assert_eq!(
        counter(
            "natskit_breaker_rejections_total",
            &[("client", "metrics-a")]
        ),
        1
    );
    a.breaker().reset();
    assert_eq!(
        gauge("natskit_breaker_state", &[("client", "metrics-a")]),
        Some(0.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_subscriptions_and_kv_conflicts() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let c = client(&env, "metrics-c").await?;
    let _echo = c
        .serve(
            "m.echo",
            natskit::SubscribeOptions::new(),
            |msg: natskit::Message| async move { Ok::<_, natskit::ServiceError>(msg.payload) },
        )
        .await?;
    c.nats()?.flush().await?;
    for _ in 0..3 {
        c.request_timeout("m.echo", "x", WAIT).await?;
    }
    assert_eq!(
        histogram_len(
            "natskit_request_duration_seconds",
            &[("client", "metrics-c")]
        ),
        3
    );
    assert_eq!(
        counter(
            "natskit_messages_received_total",
            &[("client", "metrics-c"), ("subject", "m.echo")]
        ),
        3
    );

    let bucket = c
        .ensure_key_value_bucket(kv::Config {
            bucket: env.prefixed_bucket_name("metrics"),
            storage: stream::StorageType::Memory,
            ..Default::default()
        })
        .await?;
    let store = c.kv_store(bucket, KvOptions::default());
    store.put("k", "0").await?;
    let other = store.clone();
    let mut first = true;
    store
        .update_with_retry("k", |_| {
            if std::mem::take(&mut first) {
                let other = other.clone();
                tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current()
                        .block_on(async move { other.put("k", "9").await })
                })?;
            }
            Ok::<_, natskit::Error>(b"1".to_vec())
        })
        .await?;
    let bucket_name = env.prefixed_bucket_name("metrics");
    assert_eq!(
        counter(
            "natskit_kv_cas_conflicts_total",
            &[("client", "metrics-c"), ("bucket", &bucket_name)]
        ),
        1
    );
    assert_eq!(
        counter(
            "natskit_retries_total",
            &[("client", "metrics-c"), ("op", "kv_cas")]
        ),
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_and_polled_stream_gauges() -> TestResult {
    let env = TestEnv::builder().jetstream().start().await?;
    let d = client(&env, "metrics-d").await?;
    d.create_stream(stream::Config {
        name: "METRICS".into(),
        subjects: vec!["metrics.>".into()],
        storage: stream::StorageType::Memory,
        ..Default::default()
    })
    .await?;
    for i in 0..4 {
        d.publish_to_stream(format!("metrics.{i}"), "x").await?;
    }
    let consumer = d
        .consume_with(
            StreamConsumerConfig::new("METRICS").durable("watcher"),
            |msg: async_nats::jetstream::Message| async move { msg.ack().await },
        )
        .await?;
    let labels = [
        ("client", "metrics-d"),
        ("stream", "METRICS"),
        ("consumer", "watcher"),
    ];
    eventually(WAIT, "four deliveries", || async {
        (counter("natskit_consumer_deliveries_total", &labels) == 4).then_some(())
    })
    .await;

    let monitor = d.monitor_stream("METRICS", Duration::from_millis(50))?;
    let stream_labels = [("client", "metrics-d"), ("stream", "METRICS")];
    eventually(WAIT, "the stream gauges", || async {
        (gauge("natskit_stream_messages", &stream_labels) == Some(4.0)).then_some(())
    })
    .await;
    let bytes = gauge("natskit_stream_bytes", &stream_labels).unwrap_or(0.0);
    assert!(bytes > 0.0);
    eventually(WAIT, "the pending gauge", || async {
        (gauge("natskit_consumer_pending", &labels) == Some(0.0)).then_some(())
    })
    .await;
    // Polled again and again: set from the server, never accumulated. One more
    // message must read 5 (accumulating polls would give 4 + 5 + ...).
    d.publish_to_stream("metrics.4", "x").await?;
    let stream_count = eventually(WAIT, "the gauge to follow the server", || async {
        let count = d
            .get_stream("METRICS")
            .await
            .ok()?
            .info()
            .await
            .ok()?
            .state
            .messages;
        (gauge("natskit_stream_messages", &stream_labels) == Some(5.0)).then_some(count)
    })
    .await;
    #[allow(clippy::cast_precision_loss)]
    let server_value = stream_count as f64;
    assert_eq!(
        gauge("natskit_stream_messages", &stream_labels),
        Some(server_value)
    );
    // Dropping a handle does not stop the poll (the gauge still follows
    // the server); `stop` does.
    let kept = monitor.clone();
    drop(monitor);
    d.publish_to_stream("metrics.5", "x").await?;
    eventually(
        WAIT,
        "the gauge to follow after a handle was dropped",
        || async { (gauge("natskit_stream_messages", &stream_labels) == Some(6.0)).then_some(()) },
    )
    .await;
    assert!(
        !kept.is_stopped(),
        "a dropped handle keeps the monitor running"
    );
    kept.stop();
    eventually(WAIT, "the monitor to stop", || async {
        kept.is_stopped().then_some(())
    })
    .await;
    consumer.stop().await;
    assert!(matches!(
        d.monitor_stream("METRICS", Duration::ZERO),
        Err(natskit::Error::ZeroDuration { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn the_outbox_reports_depth_and_counts() -> TestResult {
    let env = TestEnv::builder().jetstream().start().await?;
    env.create_stream("OUTM", &["outm.>"]).await?;
    let client = client(&env, "metrics-outbox").await?;
    let dir = tempfile::tempdir()?;
    let outbox = client
        .outbox(natskit::OutboxConfig::new(dir.path().join("o.redb")))
        .await?;
    let labels = [("client", "metrics-outbox")];
    for i in 0..20 {
        outbox.publish_durable("outm.a", format!("{i}")).await?;
    }
    outbox.publish_durable("nowhere.a", "no stream").await?;
    outbox.flush_outbox(WAIT).await?;
    assert_eq!(counter("natskit_outbox_enqueued_total", &labels), 21);
    assert_eq!(counter("natskit_outbox_forwarded_total", &labels), 20);
    assert_eq!(counter("natskit_outbox_dead_lettered_total", &labels), 1);
    assert_eq!(gauge("natskit_outbox_pending_messages", &labels), Some(0.0));
    assert_eq!(gauge("natskit_outbox_pending_bytes", &labels), Some(0.0));
    assert_eq!(gauge("natskit_outbox_dead_letters", &labels), Some(1.0));
    outbox.purge_dead_letters(None).await?;
    assert_eq!(gauge("natskit_outbox_dead_letters", &labels), Some(0.0));
    outbox.close().await?;
    Ok(())
}

/// The forwarder goes through the client's breaker: while the circuit is
/// open it is refused (counted like any call) and forwards nothing; it
/// drains by itself once the circuit lets calls through again.
#[tokio::test]
async fn the_outbox_waits_out_an_open_circuit() -> TestResult {
    let env = TestEnv::builder().jetstream().start().await?;
    env.create_stream("OUTB", &["outb.>"]).await?;
    registry();
    let client = Client::builder(env.url())
        .name("metrics-outbox-breaker")
        .initial_backoff(Duration::from_millis(300))
        .disable_health_checks()
        .connect()
        .await?;
    let dir = tempfile::tempdir()?;
    let outbox = client
        .outbox(natskit::OutboxConfig::new(dir.path().join("o.redb")))
        .await?;
    let labels = [("client", "metrics-outbox-breaker")];
    client.breaker().trip();
    outbox.publish_durable("outb.a", "x").await?;
    eventually(
        WAIT,
        "the forwarder refused by the open circuit",
        || async { (counter("natskit_breaker_rejections_total", &labels) > 0).then_some(()) },
    )
    .await;
    assert_eq!(outbox.stats().forwarded, 0, "nothing forwarded while open");
    outbox.flush_outbox(WAIT).await?;
    assert_eq!(outbox.stats().forwarded, 1);
    outbox.close().await?;
    Ok(())
}
