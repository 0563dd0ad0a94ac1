//! Bad input and hostile peers, against real servers: every
//! mistake is a typed error before any I/O, never counted against the
//! breaker, never reaching the server, and nothing stored is lost.

use crate::common::{TestResult, WAIT};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::kv;
use async_nats::jetstream::stream::{self, StorageType};
use bytes::Bytes;
use natskit::{
    Client, Error, HeaderMap, KvOptions, Message, ServiceError, StreamConsumerConfig,
    StreamPublishOptions, SubscribeOptions,
};
use natskit_testing::{NatsServer, eventually};

/// One row of the table: what was tried and its outcome.
type Row = (&'static str, natskit::Result<()>);

fn expect_invalid(rows: Vec<Row>) {
    for (what, outcome) in rows {
        match outcome {
            Err(err) => assert!(
                err.is_invalid_input(),
                "{what}: expected an input error, got {err}"
            ),
            Ok(()) => panic!("{what}: accepted"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_typed_uncounted_and_loses_nothing() -> TestResult {
    let server = NatsServer::start_jetstream()?;
    let client = Client::builder(server.url())
        .breaker_threshold(2)
        .connect()
        .await?;
    client
        .create_stream(stream::Config {
            name: "KEEP".into(),
            subjects: vec!["keep.>".into()],
            storage: StorageType::Memory,
            ..Default::default()
        })
        .await?;
    client.publish_to_stream("keep.a", "stored").await?;
    let bucket = client
        .ensure_key_value_bucket(kv::Config {
            bucket: "keep".into(),
            storage: StorageType::Memory,
            ..Default::default()
        })
        .await?;
    // A store limit above the server's: the server's max payload decides.
    let store = client.kv_store(
        bucket,
        KvOptions {
            max_value_size: 64 * 1024 * 1024,
            ..KvOptions::default()
        },
    );
    store.put("k", "v1").await?;
    let max_payload = client.nats()?.max_payload();
    let connections_before = server.monitor("/varz")?["connections"].as_u64();

    let long = |n: usize| "a".repeat(n);
    let mut bad_header = HeaderMap::new();
    let empty: async_nats::header::HeaderName = "".parse().expect("async-nats accepts it");
    bad_header.insert(empty, "v");
    let rows: Vec<Row> = vec![
        ("5 KB subject", client.publish(long(5_000), "x").await),
        ("100 KB subject", client.publish(long(100_000), "x").await),
        (
            "100 KB subscribe",
            client
                .subscribe(long(100_000), |_m: Message| async {})
                .await
                .map(drop),
        ),
        (
            "100 KB queue",
            client
                .queue_subscribe("q.x", long(100_000), |_m: Message| async {})
                .await
                .map(drop),
        ),
        ("NUL in subject", client.publish("a\0b", "x").await),
        ("DEL in subject", client.publish("a\x7fb", "x").await),
        ("NBSP in subject", client.publish("a\u{a0}b", "x").await),
        (
            "LINE SEPARATOR in subject",
            client.publish("a\u{2028}b", "x").await,
        ),
        (
            "control char in request",
            client
                .request_timeout("a\0b", "x", Duration::from_secs(1))
                .await
                .map(drop),
        ),
        (
            "control char in stream publish",
            client.publish_to_stream("keep.\0", "x").await.map(drop),
        ),
        ("4 KB key", store.put(&long(4_096), "x").await.map(drop)),
        ("key with space", store.put("a b", "x").await.map(drop)),
        (
            "value over the server's max payload",
            store
                .put("k", Bytes::from(vec![b'x'; max_payload + 1]))
                .await
                .map(drop),
        ),
        (
            "empty header name",
            client
                .publish_with_headers("h.x", bad_header.clone(), "x")
                .await,
        ),
        (
            "message id with a line break",
            client
                .publish_to_stream_with(
                    "keep.b",
                    "x",
                    StreamPublishOptions::new().message_id("a\r\nb"),
                )
                .await
                .map(drop),
        ),
        (
            "message id pushing a payload over the max",
            client
                .publish_to_stream_with(
                    "keep.b",
                    Bytes::from(vec![b'x'; max_payload - 8]),
                    StreamPublishOptions::new().message_id("id-that-takes-space"),
                )
                .await
                .map(drop),
        ),
        (
            "empty durable name",
            client
                .consume_with(
                    StreamConsumerConfig::new("KEEP").durable(""),
                    |m: async_nats::jetstream::Message| async move { m.ack().await },
                )
                .await
                .map(drop),
        ),
        ("bad stream name", client.get_stream("a.b").await.map(drop)),
        (
            "bad bucket name",
            client.get_key_value_bucket("a b").await.map(drop),
        ),
    ];
    let oversize = rows
        .iter()
        .find(|(what, _)| *what == "message id pushing a payload over the max")
        .map(|(_, outcome)| matches!(outcome, Err(Error::PayloadTooLarge { .. })));
    assert_eq!(
        oversize,
        Some(true),
        "the id's header counts toward the size"
    );
    expect_invalid(rows);

    // Never counted, never reached the server: the breaker is closed, the
    // connection was never dropped, and what was stored is intact.
    assert_eq!(client.status_info().total_failures, 0);
    assert_eq!(client.status(), natskit::Status::Connected);
    assert_eq!(
        server.monitor("/varz")?["connections"].as_u64(),
        connections_before
    );
    assert_eq!(client.status_info().reconnects, 0);
    client.publish("still.works", "x").await?;
    let raw = async_nats::connect(server.url()).await?;
    let js = async_nats::jetstream::new(raw);
    let mut stream = js.get_stream("KEEP").await?;
    assert_eq!(stream.info().await?.state.messages, 1);
    let kept = js.get_key_value("keep").await?.get("k").await?;
    assert_eq!(kept.as_deref(), Some(&b"v1"[..]));
    Ok(())
}

/// A handler returning a multi-line error: the requester gets the error
/// (cleaned), the service keeps running.
#[tokio::test]
async fn serve_survives_multi_line_errors() -> TestResult {
    let server = NatsServer::start()?;
    let client = Client::builder(server.url()).connect().await?;
    let service = client
        .serve("svc.fail", SubscribeOptions::new(), |_msg: Message| async {
            Err::<Bytes, _>(ServiceError::new(400, "line one\r\nline two\nthree"))
        })
        .await?;
    for _ in 0..3 {
        let err = client
            .request_timeout("svc.fail", "x", Duration::from_secs(2))
            .await
            .expect_err("a service error");
        match err {
            Error::Service(error) => {
                assert_eq!(
                    (error.code, error.message.as_str()),
                    (400, "line one  line two three")
                );
            }
            other => panic!("expected a service error, got {other}"),
        }
    }
    assert!(!service.is_finished());
    assert_eq!(service.stats().panics, 0);
    Ok(())
}

/// A password in the URL is used and never printed.
#[tokio::test]
async fn credentials_in_urls_are_used_and_never_printed() -> TestResult {
    let server = NatsServer::builder()
        .user_password("alice", "pa:ss@S3cr3t")
        .start()?;
    let url = format!(
        "nats://alice:pa%3Ass%40S3cr3t@127.0.0.1:{}",
        server.client_port()
    );
    let builder = Client::builder(&url);
    assert!(!format!("{builder:?}").contains("S3cr3t"));
    let client = builder.connect().await?;
    assert!(!format!("{client:?}").contains("S3cr3t"));
    assert!(!client.urls().contains("S3cr3t"));
    client.publish("auth.ok", "x").await?;
    let err = Client::builder("nats://alice:s3cret@bad host:1")
        .build()
        .expect_err("unparsable");
    assert!(!err.to_string().contains("s3cret"), "{err}");
    Ok(())
}

/// Drops by a slow handler are counted exactly: what reached the handler
/// plus what was dropped is what was published, within 1%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_drops_match_the_truth() -> TestResult {
    const TOTAL: usize = 200_000;
    let server = NatsServer::start()?;
    let client = Client::builder(server.url())
        .subscription_capacity(1_000)
        .connect()
        .await?;
    let handled = Arc::new(AtomicUsize::new(0));
    let count = handled.clone();
    let sub = client
        .subscribe("flood.x", move |_msg: Message| {
            let count = count.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                count.fetch_add(1, Ordering::SeqCst);
            }
        })
        .await?;
    let publisher = async_nats::connect(server.url()).await?;
    let payload = Bytes::from_static(b"0123456789");
    for _ in 0..TOTAL {
        publisher.publish("flood.x", payload.clone()).await?;
    }
    publisher.flush().await?;
    // natskit reads every message from async-nats (none is lost in its
    // buffer); those that do not fit natskit's queue are dropped, counted.
    // Wait until the flood is over: the counts stop moving.
    let mut last = (0, 0);
    let mut still = 0;
    eventually(WAIT, "the flood to be read", || {
        let stats = sub.stats();
        let now = (stats.received, stats.dropped);
        still = if now == last && stats.received > 0 {
            still + 1
        } else {
            0
        };
        last = now;
        async move { (still >= 50).then_some(()) }
    })
    .await;
    sub.drain().await;
    let stats = sub.stats();
    let handled = handled.load(Ordering::SeqCst) as u64;
    let server_drops = server.monitor("/varz")?["slow_consumers"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(server_drops, 0, "the server dropped nothing");
    let accounted = handled + stats.dropped;
    let total = TOTAL as u64;
    println!(
        "slow consumer: {handled} handled + {} dropped = {accounted} of {total} published",
        stats.dropped
    );
    assert!(
        accounted.abs_diff(total) * 100 <= total,
        "{accounted} accounted for {total}"
    );
    assert_eq!(client.status_info().dropped_messages, stats.dropped);
    Ok(())
}

/// A peer that answers with a 64 MiB `INFO` line: `connect()` still returns
/// within (three times) its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_info_line_cannot_stretch_the_connect_timeout() -> TestResult {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut peer, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = peer.write_all(b"INFO {\"server_id\":\"").await;
                let chunk = vec![b'x'; 1024 * 1024];
                for _ in 0..64 {
                    if peer.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                let _ = peer.write_all(b"\"}\r\n").await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    let timeout = Duration::from_secs(2);
    let client = Client::builder(format!("nats://127.0.0.1:{port}"))
        .connect_timeout(timeout)
        .build()?;
    let started = std::time::Instant::now();
    let err = client.connect().await.expect_err("no real server");
    let took = started.elapsed();
    println!("connect to a 64 MiB INFO peer failed after {took:?}: {err}");
    assert!(took < timeout * 3, "{took:?}");
    Ok(())
}

/// Building a client outside a Tokio runtime is an error, not a panic.
#[test]
fn building_outside_a_runtime_is_an_error() {
    let err = Client::builder("nats://127.0.0.1:4222")
        .build()
        .expect_err("no runtime");
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
}
