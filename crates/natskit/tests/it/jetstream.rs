//! JetStream streams, publishing and supervised consumers against real servers.

use crate::common::{TestResult, WAIT, memory_stream};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::stream::StorageType;
use async_nats::jetstream::{AckKind, Message};
use natskit::{
    Client, ConsumerHandle, DeliverPolicy, Error, Permanent, Settled, StreamAutoCreateConfig,
    StreamConsumerConfig, StreamPublishOptions, consume_with_heartbeat,
};
use natskit_testing::{TestEnv, eventually};

async fn env() -> Result<TestEnv, natskit_testing::HarnessError> {
    TestEnv::builder().jetstream().start().await
}

/// A handler that acks and counts.
fn counting(
    count: &Arc<AtomicUsize>,
) -> impl Fn(Message) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync + 'static {
    let count = count.clone();
    move |msg: Message| {
        let count = count.clone();
        Box::pin(async move {
            let _ = msg.ack().await;
            count.fetch_add(1, Ordering::SeqCst);
        })
    }
}

async fn wait_count(count: &AtomicUsize, n: usize, what: &str) {
    eventually(WAIT, what, || async {
        (count.load(Ordering::SeqCst) >= n).then_some(())
    })
    .await;
}

/// Waits until the consumer has nothing pending or unacknowledged, so no
/// further delivery can come.
async fn wait_settled(client: &Client, handle: &ConsumerHandle) {
    eventually(WAIT, "consumer to settle", || async {
        let stream = client.get_stream(handle.stream()).await.ok()?;
        let info = stream.consumer_info(handle.name()).await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn streams_create_get_ensure_delete() -> TestResult {
    let env = env().await?;
    let client = env.client();
    let err = client.get_stream("MISSING").await.unwrap_err();
    assert!(
        matches!(err, Error::StreamNotFound { .. }) && err.is_not_found(),
        "{err}"
    );
    assert_eq!(
        client.status_info().total_failures,
        0,
        "not found is an answer"
    );

    let mut first = client
        .ensure_stream(memory_stream("ORDERS", &["orders.>"]))
        .await?;
    let mut second = client
        .ensure_stream(memory_stream("ORDERS", &["orders.>"]))
        .await?;
    assert_eq!(
        first.info().await?.created,
        second.info().await?.created,
        "ensure twice returns the same stream"
    );

    // An updatable difference is applied, never ignored.
    let mut wider = memory_stream("ORDERS", &["orders.>", "refunds.>"]);
    wider.max_messages = 1000;
    let mut updated = client.ensure_stream(wider).await?;
    let info = updated.info().await?;
    assert_eq!(info.config.max_messages, 1000);
    assert!(info.config.subjects.contains(&"refunds.>".to_owned()));

    // One the server cannot change is reported by name.
    let mut on_disk = memory_stream("ORDERS", &["orders.>", "refunds.>"]);
    on_disk.storage = StorageType::File;
    on_disk.max_messages = 1000;
    match client.ensure_stream(on_disk).await {
        Err(Error::StreamConfigConflict { fields, .. }) => assert_eq!(fields, vec!["storage"]),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(
        client
            .get_stream("ORDERS")
            .await?
            .cached_info()
            .config
            .storage,
        StorageType::Memory
    );

    for bad in ["", "has.dot", "has space", "star*"] {
        assert!(
            matches!(
                client.ensure_stream(memory_stream(bad, &["x.>"])).await,
                Err(Error::InvalidName { .. })
            ),
            "{bad:?}"
        );
    }
    // A creation the server refuses (subjects taken by another stream) is an
    // error, not an endless get/create loop.
    let overlapping = tokio::time::timeout(
        WAIT,
        client.ensure_stream(memory_stream("OTHER", &["orders.>"])),
    )
    .await?;
    assert!(
        matches!(overlapping, Err(Error::JetStream { .. })),
        "{overlapping:?}"
    );
    assert!(client.delete_stream("ORDERS").await?);
    assert!(!client.delete_stream("ORDERS").await?);
    Ok(())
}

#[tokio::test]
async fn publish_with_ack_dedup_and_preconditions() -> TestResult {
    let env = env().await?;
    let client = env.client();
    client
        .create_stream(memory_stream("EVENTS", &["events.>"]))
        .await?;
    let ack = client
        .publish_to_stream("events.user.created", "{}")
        .await?;
    assert_eq!(ack.stream, "EVENTS");
    assert!(ack.sequence >= 1);
    client
        .publish_to_stream("events.user.deleted", "{}")
        .await?;

    let once = StreamPublishOptions::new().message_id("order-42");
    let a = client
        .publish_to_stream_with("events.order", "x", once.clone())
        .await?;
    let b = client
        .publish_to_stream_with("events.order", "x", once)
        .await?;
    assert!(!a.duplicate && b.duplicate);
    assert_eq!(a.sequence, b.sequence);
    let mut stream = client.get_stream("EVENTS").await?;
    assert_eq!(
        stream.info().await?.state.messages,
        3,
        "a message id is stored once"
    );

    let err = client
        .publish_to_stream_with(
            "events.x",
            "y",
            StreamPublishOptions::new().expected_last_sequence(1),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PublishRejected { .. }), "{err}");
    assert_eq!(
        stream.info().await?.state.messages,
        3,
        "a rejected publish stores nothing"
    );

    let err = client
        .publish_to_stream_with(
            "nowhere.x",
            "y",
            StreamPublishOptions::new().retry(natskit::RetryConfig {
                max_retries: 1,
                backoff: natskit::Backoff::new(
                    Duration::from_millis(10),
                    Duration::from_millis(10),
                ),
            }),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StreamNotFound { .. }), "{err}");

    let offline = Client::new(env.url())?;
    assert!(
        offline
            .publish_to_stream("events.x", "y")
            .await
            .unwrap_err()
            .is_not_connected()
    );
    Ok(())
}

#[tokio::test]
async fn pipelined_publisher_stores_every_message() -> TestResult {
    let env = env().await?;
    let client = env.client();
    client
        .create_stream(memory_stream("BULK", &["bulk.>"]))
        .await?;
    let publisher = client.stream_publisher(256)?;
    const N: u64 = 100_000;
    for i in 0..N {
        publisher
            .publish(if i % 2 == 0 { "bulk.even" } else { "bulk.odd" }, "payload")
            .await?;
    }
    let report = publisher.flush().await;
    assert_eq!((report.acked, report.failed), (N, 0));
    assert_eq!(
        client
            .get_stream("BULK")
            .await?
            .info()
            .await?
            .state
            .messages,
        N
    );

    let report = publisher
        .publish_batch((0..10).map(|i| (format!("bulk.b{i}"), "x")))
        .await?;
    assert_eq!(report.acked, N + 10);
    assert!(matches!(
        client.stream_publisher(0),
        Err(Error::InvalidArgument(_))
    ));
    Ok(())
}

/// The pipelined publisher reads each first ack itself (from its own
/// inbox): a duplicate is an ack, a refused precondition is a failure
/// reported once and not sent again, no stream is a failure once the
/// server confirms it, and two publishers on one client keep their acks
/// apart.
#[tokio::test]
async fn pipelined_acks_are_read_as_the_server_meant_them() -> TestResult {
    let env = env().await?;
    let client = env.client();
    client
        .create_stream(memory_stream("READ", &["read.>"]))
        .await?;
    let (first, second) = (client.stream_publisher(16)?, client.stream_publisher(4)?);
    for round in 0..2 {
        for i in 0..10 {
            let options = StreamPublishOptions::new().message_id(format!("id-{i}"));
            let publisher = if round == 0 { &first } else { &second };
            publisher.publish_with("read.x", "v", options).await?;
        }
    }
    let (a, b) = (first.flush().await, second.flush().await);
    assert_eq!((a.acked, a.failed, b.acked, b.failed), (10, 0, 10, 0));
    let stored = || async {
        let mut stream = client.get_stream("READ").await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(stream.info().await?.state.messages)
    };
    assert_eq!(stored().await?, 10, "the second ten were duplicates");

    // The stream holds 10 messages, not 1: refused, and not sent again
    // (publish 10 of this publisher: each numbers its own).
    let refused = StreamPublishOptions::new().expected_last_sequence(1);
    first.publish_with("read.y", "v", refused).await?;
    let report = first.flush().await;
    assert_eq!((report.acked, report.failed), (10, 1));
    assert!(
        matches!(&report.errors[..], [(10, Error::PublishRejected { .. })]),
        "{:?}",
        report.errors
    );
    assert_eq!(stored().await?, 10);

    // No stream captures the subject: the server's no-responders reply,
    // confirmed by a stream lookup, after the one resend allowed.
    let once = natskit::RetryConfig {
        max_retries: 1,
        ..Default::default()
    };
    let options = StreamPublishOptions::new().retry(once);
    second.publish_with("elsewhere.z", "v", options).await?;
    let report = second.flush().await;
    assert_eq!((report.acked, report.failed), (10, 1));
    assert!(
        matches!(&report.errors[..], [(10, e)] if e.is_not_found()),
        "{:?}",
        report.errors
    );
    Ok(())
}

#[tokio::test]
async fn deliver_policies_all_new_last() -> TestResult {
    let env = env().await?;
    let client = env.client();
    client
        .create_stream(memory_stream("POLICY", &["policy.>"]))
        .await?;
    for i in 0..3 {
        client
            .publish_to_stream(format!("policy.{i}"), "before")
            .await?;
    }
    let mut runs = Vec::new();
    for (policy, expected) in [
        (DeliverPolicy::All, 5),
        (DeliverPolicy::New, 2),
        (DeliverPolicy::Last, 3),
    ] {
        let count = Arc::new(AtomicUsize::new(0));
        let handle = client
            .consume_with(
                StreamConsumerConfig::new("POLICY").deliver_policy(policy),
                counting(&count),
            )
            .await?;
        runs.push((policy, expected, count, handle));
    }
    for i in 3..5 {
        client
            .publish_to_stream(format!("policy.{i}"), "after")
            .await?;
    }
    for (policy, expected, count, handle) in &runs {
        wait_count(count, *expected, &format!("{policy:?}")).await;
        wait_settled(client, handle).await;
        assert_eq!(count.load(Ordering::SeqCst), *expected, "{policy:?}");
    }
    Ok(())
}

#[tokio::test]
async fn nak_redelivers_and_max_deliver_is_honoured() -> TestResult {
    let env = env().await?;
    let client = env.client();
    client
        .create_stream(memory_stream("REDO", &["redo.>"]))
        .await?;

    // nak once, then ack: at least two deliveries.
    let deliveries = Arc::new(AtomicUsize::new(0));
    let seen = deliveries.clone();
    let nak_then_ack = client
        .consume_with(
            StreamConsumerConfig::new("REDO").filter_subject("redo.once"),
            move |msg: Message| {
                let seen = seen.clone();
                async move {
                    if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                        msg.ack_with(AckKind::Nak(None)).await
                    } else {
                        msg.ack().await
                    }
                }
            },
        )
        .await?;
    client.publish_to_stream("redo.once", "x").await?;
    wait_count(&deliveries, 2, "a redelivery after nak").await;
    wait_settled(client, &nak_then_ack).await;
    assert_eq!(nak_then_ack.stats().redelivered, 1);

    // Always nak, max_deliver 3: exactly three deliveries.
    let attempts = Arc::new(AtomicUsize::new(0));
    let seen = attempts.clone();
    let capped = client
        .consume_with(
            StreamConsumerConfig::new("REDO")
                .filter_subject("redo.capped")
                .max_deliver(3),
            move |msg: Message| {
                let seen = seen.clone();
                async move {
                    seen.fetch_add(1, Ordering::SeqCst);
                    msg.ack_with(AckKind::Nak(None)).await
                }
            },
        )
        .await?;
    client.publish_to_stream("redo.capped", "x").await?;
    wait_count(&attempts, 3, "three deliveries").await;
    wait_settled(client, &capped).await;
    assert_eq!(attempts.load(Ordering::SeqCst), 3);

    // No ack at all: the ack wait redelivers.
    let waits = Arc::new(AtomicUsize::new(0));
    let seen = waits.clone();
    let _lazy = client
        .consume_with(
            StreamConsumerConfig::new("REDO")
                .filter_subject("redo.lazy")
                .ack_wait(Duration::from_millis(300)),
            move |msg: Message| {
                let seen = seen.clone();
                async move {
                    if seen.fetch_add(1, Ordering::SeqCst) > 0 {
                        let _ = msg.ack().await;
                    }
                }
            },
        )
        .await?;
    client.publish_to_stream("redo.lazy", "x").await?;
    wait_count(&waits, 2, "a redelivery after the ack wait").await;

    capped.stop().await;
    capped.stop().await; // twice is harmless
    client.stop_consumer("REDO", capped.name()).await;
    assert!(capped.is_stopped());
    Ok(())
}

#[tokio::test]
async fn handler_panic_naks_and_the_consumer_keeps_running() -> TestResult {
    let env = env().await?;
    let client = env.client();
    client
        .create_stream(memory_stream("PANIC", &["panic.>"]))
        .await?;
    let ok = Arc::new(AtomicUsize::new(0));
    let seen = ok.clone();
    let handle = client
        .consume("PANIC", Some("panic.>"), move |msg: Message| {
            let seen = seen.clone();
            async move {
                if msg.payload.as_ref() == b"boom"
                    && msg.info().map(|i| i.delivered).unwrap_or(1) == 1
                {
                    panic!("handler bug");
                }
                let _ = msg.ack().await;
                seen.fetch_add(1, Ordering::SeqCst);
            }
        })
        .await?;
    client.publish_to_stream("panic.a", "boom").await?;
    client.publish_to_stream("panic.b", "fine").await?;
    wait_count(&ok, 2, "both messages, the panicked one redelivered").await;
    assert_eq!(handle.stats().panics, 1);
    assert!(handle.stats().redelivered >= 1);
    Ok(())
}

#[tokio::test]
async fn bad_consumer_input_is_typed() -> TestResult {
    let env = env().await?;
    let client = env.client();
    client
        .create_stream(memory_stream("SHAPE", &["shape.>"]))
        .await?;
    let noop = |_m: Message| async {};
    let cases = [
        StreamConsumerConfig::new(""),
        StreamConsumerConfig::new("SHAPE").durable("bad.name"),
        StreamConsumerConfig::new("SHAPE").filter_subject("other.>"),
        StreamConsumerConfig::new("SHAPE").ack_wait(Duration::ZERO),
        StreamConsumerConfig::new("SHAPE").backoff(vec![Duration::from_secs(1)]),
    ];
    for config in cases {
        let err = client.consume_with(config.clone(), noop).await.unwrap_err();
        assert!(err.is_invalid_input(), "{config:?}: {err}");
    }
    let mut stream = client.get_stream("SHAPE").await?;
    assert_eq!(
        stream.info().await?.state.consumer_count,
        0,
        "nothing was created"
    );
    let err = client
        .consume_with(StreamConsumerConfig::new("NOPE"), noop)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StreamNotFound { .. }), "{err}");
    Ok(())
}

#[tokio::test]
async fn auto_create_derives_subjects() -> TestResult {
    let env = env().await?;
    let client = env.client();
    let count = Arc::new(AtomicUsize::new(0));
    let _h = client
        .consume_with(
            StreamConsumerConfig::new("AUTO")
                .filter_subject("auto.*")
                .auto_create(StreamAutoCreateConfig {
                    storage: StorageType::Memory,
                    ..Default::default()
                }),
            counting(&count),
        )
        .await?;
    let info = client.get_stream("AUTO").await?.cached_info().clone();
    assert_eq!(info.config.subjects, vec!["auto.>"]);
    assert_eq!(info.config.max_age, Duration::from_secs(7 * 24 * 3600));
    client.publish_to_stream("auto.x", "1").await?;
    wait_count(&count, 1, "a message on the auto-created stream").await;
    Ok(())
}

#[tokio::test]
async fn durable_consumer_resumes_after_a_client_restart() -> TestResult {
    let env = env().await?;
    env.client()
        .create_stream(memory_stream("DUR", &["dur.>"]))
        .await?;
    let first = Client::builder(env.url()).connect().await?;
    for i in 0..5 {
        first.publish_to_stream(format!("dur.{i}"), "x").await?;
    }
    let count = Arc::new(AtomicUsize::new(0));
    let handle = first
        .consume_with(
            StreamConsumerConfig::new("DUR").durable("worker"),
            counting(&count),
        )
        .await?;
    wait_count(&count, 5, "the first five").await;
    wait_settled(&first, &handle).await;
    first.close().await?;

    for i in 5..8 {
        env.client()
            .publish_to_stream(format!("dur.{i}"), "x")
            .await?;
    }
    let second = Client::builder(env.url()).connect().await?;
    let seqs = Arc::new(Mutex::new(Vec::new()));
    let record = seqs.clone();
    let handle = second
        .consume_with(
            StreamConsumerConfig::new("DUR").durable("worker"),
            move |msg: Message| {
                let record = record.clone();
                async move {
                    record
                        .lock()
                        .unwrap()
                        .push(msg.info().map(|i| i.stream_sequence).unwrap_or(0));
                    msg.ack().await
                }
            },
        )
        .await?;
    eventually(WAIT, "the three new messages", || async {
        (seqs.lock().unwrap().len() >= 3).then_some(())
    })
    .await;
    wait_settled(&second, &handle).await;
    assert_eq!(*seqs.lock().unwrap(), vec![6, 7, 8]);
    second.stop_and_delete_consumer("DUR", "worker").await?;
    let mut stream = second.get_stream("DUR").await?;
    assert_eq!(stream.info().await?.state.consumer_count, 0);
    Ok(())
}

#[tokio::test]
async fn consumer_survives_server_kill_and_restart() -> TestResult {
    let mut env = TestEnv::builder().file_storage().start().await?;
    let mut file = memory_stream("SURVIVE", &["survive.>"]);
    file.storage = StorageType::File;
    env.client().create_stream(file).await?;
    let seqs = Arc::new(Mutex::new(BTreeSet::new()));
    let record = seqs.clone();
    let handle = env
        .client()
        .consume_with(
            StreamConsumerConfig::new("SURVIVE").heartbeat(Duration::from_millis(500)),
            move |msg: Message| {
                let record = record.clone();
                async move {
                    record
                        .lock()
                        .unwrap()
                        .insert(msg.info().map(|i| i.stream_sequence).unwrap_or(0));
                    msg.ack().await
                }
            },
        )
        .await?;
    for i in 0..20 {
        env.client()
            .publish_to_stream(format!("survive.{i}"), "x")
            .await?;
    }
    env.server_mut().expect("owned").kill()?;
    env.server_mut().expect("owned").restart()?;
    let client = env.client().clone();
    for i in 20..40 {
        eventually(WAIT, "a publish after the restart", || async {
            client
                .publish_to_stream(format!("survive.{i}"), "x")
                .await
                .ok()
        })
        .await;
    }
    eventually(WAIT, "all 40 sequences", || async {
        (seqs.lock().unwrap().len() == 40).then_some(())
    })
    .await;
    assert_eq!(*seqs.lock().unwrap(), (1..=40).collect::<BTreeSet<u64>>());
    eventually(WAIT, "healthy consumer", || async {
        handle.is_healthy().then_some(())
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn consumers_do_not_pile_up_across_restarts() -> TestResult {
    let mut env = TestEnv::builder().file_storage().start().await?;
    let mut file = memory_stream("PILE", &["pile.>"]);
    file.storage = StorageType::File;
    env.client().create_stream(file).await?;
    let count = Arc::new(AtomicUsize::new(0));
    let handle = env
        .client()
        .consume_with(
            StreamConsumerConfig::new("PILE").heartbeat(Duration::from_millis(300)),
            counting(&count),
        )
        .await?;
    let client = env.client().clone();
    for round in 0..5 {
        env.server_mut().expect("owned").restart()?;
        eventually(WAIT, "a publish after the restart", || async {
            client
                .publish_to_stream(format!("pile.{round}"), "x")
                .await
                .ok()
        })
        .await;
        wait_count(&count, round + 1, "the message of this round").await;
    }
    let mut stream = client.get_stream("PILE").await?;
    assert_eq!(
        stream.info().await?.state.consumer_count,
        1,
        "one consumer, however many reconnects"
    );
    eventually(
        WAIT,
        "the consumer healthy after the last restart",
        || async { handle.is_healthy().then_some(()) },
    )
    .await;
    assert!(!handle.is_stopped(), "a healthy consumer keeps running");
    handle.stop().await;
    assert!(
        handle.is_stopped() && !handle.is_healthy(),
        "stopped: {:?}",
        handle.stats()
    );
    Ok(())
}

#[tokio::test]
async fn consumer_deleted_on_the_server_is_recreated() -> TestResult {
    let env = env().await?;
    let client = env.client();
    client
        .create_stream(memory_stream("GONE", &["gone.>"]))
        .await?;
    let count = Arc::new(AtomicUsize::new(0));
    let handle = client
        .consume_with(
            StreamConsumerConfig::new("GONE")
                .durable("keeper")
                .heartbeat(Duration::from_millis(300)),
            counting(&count),
        )
        .await?;
    client.publish_to_stream("gone.1", "x").await?;
    wait_count(&count, 1, "the first message").await;
    // Recreation resumes after the ack floor last read from the server
    // (read about once a second while messages flow); a message acked after
    // that read would be delivered again, which at-least-once allows.
    eventually(WAIT, "the ack floor to be read", || async {
        (handle.stats().ack_floor >= 1).then_some(())
    })
    .await;
    env.jetstream()
        .get_stream("GONE")
        .await?
        .delete_consumer("keeper")
        .await?;
    eventually(WAIT, "a recreation", || async {
        (handle.stats().recreations >= 1).then_some(())
    })
    .await;
    client.publish_to_stream("gone.2", "x").await?;
    wait_count(&count, 2, "a message after the recreation").await;
    wait_settled(client, &handle).await;
    assert_eq!(
        count.load(Ordering::SeqCst),
        2,
        "resumed after the ack floor, no replay"
    );
    Ok(())
}

#[tokio::test]
async fn heartbeat_helper_keeps_long_work_alive_and_settles() -> TestResult {
    let env = env().await?;
    let client = env.client();
    client
        .create_stream(memory_stream("LONG", &["long.>"]))
        .await?;
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let deliveries = Arc::new(AtomicUsize::new(0));
    let (record, seen) = (outcomes.clone(), deliveries.clone());
    let handle = client
        .consume_with(
            StreamConsumerConfig::new("LONG")
                .ack_wait(Duration::from_millis(500))
                .max_deliver(1),
            move |msg: Message| {
                let (record, seen) = (record.clone(), seen.clone());
                async move {
                    seen.fetch_add(1, Ordering::SeqCst);
                    let kind = msg.payload.clone();
                    let settled =
                        consume_with_heartbeat(&msg, Duration::from_millis(100), async move {
                            match &kind[..] {
                                b"long" => {
                                    tokio::time::sleep(Duration::from_millis(1500)).await;
                                    Ok(())
                                }
                                b"fail" => Err(natskit::BoxError::from("transient")),
                                _ => Err(Permanent("poison".into()).into()),
                            }
                        })
                        .await;
                    record.lock().unwrap().push((
                        String::from_utf8_lossy(&msg.payload).into_owned(),
                        settled.ok(),
                    ));
                }
            },
        )
        .await?;
    for payload in ["long", "fail", "poison"] {
        client.publish_to_stream("long.x", payload).await?;
    }
    eventually(WAIT, "three settled messages", || async {
        (outcomes.lock().unwrap().len() == 3).then_some(())
    })
    .await;
    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(
        outcomes,
        vec![
            ("long".to_owned(), Some(Settled::Acked)),
            ("fail".to_owned(), Some(Settled::Naked)),
            ("poison".to_owned(), Some(Settled::Terminated)),
        ]
    );
    assert_eq!(
        deliveries.load(Ordering::SeqCst),
        3,
        "the long work was never redelivered"
    );
    assert_eq!(handle.stats().redelivered, 0);

    let err = consume_with_heartbeat_zero(client).await;
    assert!(matches!(err, Some(Error::ZeroDuration { .. })));
    Ok(())
}

/// A zero interval is rejected before the message is touched.
async fn consume_with_heartbeat_zero(client: &Client) -> Option<Error> {
    client.publish_to_stream("long.zero", "z").await.ok()?;
    let captured: Arc<Mutex<Option<Error>>> = Arc::new(Mutex::new(None));
    let slot = captured.clone();
    let handle = client
        .consume_with(
            StreamConsumerConfig::new("LONG").filter_subject("long.zero"),
            move |msg: Message| {
                let slot = slot.clone();
                async move {
                    let result = consume_with_heartbeat(&msg, Duration::ZERO, async {
                        Ok::<_, natskit::BoxError>(())
                    })
                    .await;
                    *slot.lock().unwrap() = result.err();
                    let _ = msg.ack().await;
                }
            },
        )
        .await
        .ok()?;
    let err = eventually(WAIT, "the zero-interval call", || async {
        captured.lock().unwrap().take()
    })
    .await;
    handle.stop().await;
    Some(err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_retries_through_a_leader_loss_without_duplicates() -> TestResult {
    let mut cluster = tokio::task::spawn_blocking(|| natskit_testing::Cluster::start(3)).await??;
    let client = Client::builder(cluster.urls())
        .reconnect_wait(Duration::from_millis(50))
        .connect()
        .await?;
    let mut replicated = memory_stream("HA", &["ha.>"]);
    replicated.num_replicas = 3;
    client.create_stream(replicated).await?;
    client.publish_to_stream("ha.0", "x").await?;

    // Kill the stream leader; publishes with a message id keep working.
    let leader = client
        .get_stream("HA")
        .await?
        .cached_info()
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("a stream leader");
    let index = (0..cluster.len())
        .find(|&i| {
            cluster
                .node(i)
                .monitor("/varz")
                .ok()
                .and_then(|v| v["server_name"].as_str().map(str::to_owned))
                == Some(leader.clone())
        })
        .expect("the leader is a node");
    tokio::task::block_in_place(|| cluster.node_mut(index).kill())?;
    let retry = natskit::RetryConfig {
        max_retries: 20,
        backoff: natskit::Backoff::new(Duration::from_millis(100), Duration::from_millis(500)),
    };
    for i in 1..=5 {
        let options = StreamPublishOptions::new()
            .message_id(format!("ha-{i}"))
            .timeout(Duration::from_secs(1))
            .retry(retry);
        eventually(WAIT, "a publish during the election", || {
            let (client, options) = (client.clone(), options.clone());
            async move {
                client
                    .publish_to_stream_with(format!("ha.{i}"), "x", options)
                    .await
                    .ok()
            }
        })
        .await;
    }
    let mut stream = client.get_stream("HA").await?;
    assert_eq!(
        stream.info().await?.state.messages,
        6,
        "every message once, none duplicated"
    );
    Ok(())
}

#[tokio::test]
async fn jetstream_errors_expose_the_server_code() -> TestResult {
    let env = env().await?;
    let client = env.client();
    client
        .create_stream(memory_stream("CODED", &["coded.a.>"]))
        .await?;
    let err = client
        .create_stream(memory_stream("CODED", &["coded.b.>"]))
        .await
        .expect_err("same name, other subjects");
    assert_eq!(err.jetstream_code(), Some(10_058), "{err}");
    Ok(())
}

#[tokio::test]
async fn streams_of_messages_for_subscriptions_and_consumers() -> TestResult {
    use futures_util::StreamExt;
    let env = env().await?;
    let client = env.client();

    // A subscription as a Stream, with stats; dropping it unsubscribes.
    let subscriptions = || env.server().monitor("/subsz").ok()?["num_subscriptions"].as_u64();
    let before = subscriptions();
    let mut messages = client.subscribe_stream("streamed.>").await?;
    client.publish("streamed.a", "1").await?;
    client.publish("streamed.b", "2").await?;
    for expected in ["streamed.a", "streamed.b"] {
        let msg = tokio::time::timeout(WAIT, messages.next())
            .await?
            .expect("a message");
        assert_eq!(msg.subject.as_str(), expected);
    }
    assert_eq!(messages.stats().received, 2);
    assert_ne!(subscriptions(), before);
    drop(messages);
    eventually(WAIT, "the unsubscribe to reach the server", || async {
        (subscriptions() == before).then_some(())
    })
    .await;

    // A supervised consumer as a Stream: survives an outside delete.
    client
        .create_stream(memory_stream("STREAMED", &["sc.>"]))
        .await?;
    for i in 0..10 {
        client.publish_to_stream(format!("sc.{i}"), "x").await?;
    }
    let mut consumer = client
        .consume_messages(
            StreamConsumerConfig::new("STREAMED").heartbeat(Duration::from_millis(300)),
        )
        .await?;
    let name = consumer.handle().name().to_owned();
    let mut seen = BTreeSet::new();
    while seen.len() < 5 {
        let msg = tokio::time::timeout(WAIT, consumer.next())
            .await?
            .expect("a message");
        seen.insert(msg.subject.to_string());
        msg.ack().await.map_err(|e| e.to_string())?;
    }
    env.jetstream()
        .get_stream("STREAMED")
        .await?
        .delete_consumer(&name)
        .await?;
    // Published after the delete: only a recreated consumer delivers these.
    for i in 10..15 {
        client.publish_to_stream(format!("sc.{i}"), "x").await?;
    }
    while seen.len() < 15 {
        let msg = tokio::time::timeout(WAIT, consumer.next())
            .await?
            .expect("a message after the recreation");
        seen.insert(msg.subject.to_string());
        msg.ack().await.map_err(|e| e.to_string())?;
    }
    assert!(consumer.handle().stats().recreations >= 1);
    let handle = consumer.handle().clone();
    drop(consumer);
    eventually(WAIT, "the dropped stream's consumer to stop", || async {
        handle.is_stopped().then_some(())
    })
    .await;
    eventually(WAIT, "the ephemeral consumer deleted", || async {
        let mut stream = client.get_stream("STREAMED").await.ok()?;
        let count = stream.info().await.ok()?.state.consumer_count;
        (count == 0).then_some(())
    })
    .await;
    Ok(())
}

/// With `auto_ack`, natskit knows what it acknowledged: after an outside
/// delete recreates the consumer at an ack floor held low by one message
/// that keeps failing, the 199 messages acknowledged above the floor come
/// again and are acknowledged without reaching the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_ack_skips_repeats_after_a_recreation() -> TestResult {
    let env = env().await?;
    let client = env.client();
    client
        .ensure_stream(memory_stream("REPEAT", &["repeat.>"]))
        .await?;
    for i in 1..=200 {
        client.publish_to_stream(format!("repeat.{i}"), "x").await?;
    }
    let calls = Arc::new(Mutex::new(std::collections::HashMap::<u64, usize>::new()));
    let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (record, released) = (calls.clone(), release.clone());
    let handle = client
        .consume_with(
            StreamConsumerConfig::new("REPEAT")
                .durable("auto")
                .auto_ack(true)
                .heartbeat(Duration::from_millis(500)),
            move |msg: Message| {
                let (record, released) = (record.clone(), released.clone());
                async move {
                    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
                    // The first message fails (and holds the ack floor)
                    // until released.
                    if seq == 1 && !released.load(Ordering::SeqCst) {
                        return Err("not yet");
                    }
                    if let Ok(mut calls) = record.lock() {
                        *calls.entry(seq).or_default() += 1;
                    }
                    Ok(())
                }
            },
        )
        .await?;
    eventually(WAIT, "messages 2..=200 handled", || async {
        let calls = calls.lock().ok()?;
        ((2..=200).all(|s| calls.contains_key(&s))).then_some(())
    })
    .await;
    assert_eq!(handle.stats().ack_floor, 0, "held by message 1");
    env.jetstream()
        .get_stream("REPEAT")
        .await?
        .delete_consumer("auto")
        .await?;
    eventually(WAIT, "a recreation and the repeats skipped", || async {
        let stats = handle.stats();
        (stats.recreations >= 1 && stats.repeats_skipped >= 199).then_some(())
    })
    .await;
    release.store(true, Ordering::SeqCst);
    eventually(WAIT, "message 1 handled and the floor at 200", || async {
        let one = calls.lock().ok()?.get(&1).copied();
        (one == Some(1) && handle.stats().ack_floor >= 200).then_some(())
    })
    .await;
    let calls = calls.lock().map_err(|e| e.to_string())?.clone();
    let repeated: Vec<_> = calls.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "handled twice: {repeated:?}");
    let stats = handle.stats();
    println!("auto_ack after a recreation: {stats:?}");
    handle.stop().await;
    Ok(())
}
