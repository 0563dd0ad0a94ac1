//! The durable outbox against real servers: delivery exactly once and in
//! order, limits, restart, dead letters, a damaged file, partitions, a
//! crashed process, a killed server and a cluster leader kill.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use natskit::{Client, Error, Outbox, OutboxConfig, Receipt};
use natskit_testing::{Cluster, NatsServer, Proxy, eventually};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn stream_config(name: &str, subjects: &[&str]) -> stream::Config {
    stream::Config {
        name: name.into(),
        subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// Every message of `stream`, read through a raw async-nats consumer:
/// `(subject, Nats-Msg-Id, payload)` in stream order.
async fn stream_contents(
    js: &jetstream::Context,
    name: &str,
) -> Result<Vec<(String, String, Vec<u8>)>, Box<dyn std::error::Error + Send + Sync>> {
    let stream = js.get_stream(name).await?;
    let count = stream.get_info().await?.state.messages as usize;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await?
            .ok_or("consumer ended")??;
        let id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        out.push((msg.subject.to_string(), id, msg.payload.to_vec()));
    }
    Ok(out)
}

/// Asserts that every receipt's message is in `contents` exactly once, that
/// nothing else is, and that per subject the stream order is the receipt
/// order.
fn assert_exactly_once_in_order(
    contents: &[(String, String, Vec<u8>)],
    receipts: &[(String, Receipt)],
) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (_, id, _) in contents {
        *seen.entry(id.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    for (_, receipt) in receipts {
        assert_eq!(
            seen.get(receipt.message_id.as_str()),
            Some(&1),
            "message {} ({}) missing",
            receipt.sequence,
            receipt.message_id
        );
    }
    assert_eq!(contents.len(), receipts.len(), "nothing else is stored");
    // Order per subject: the stream's order of ids equals the order of
    // local sequences.
    let sequence: HashMap<&str, u64> = receipts
        .iter()
        .map(|(_, r)| (r.message_id.as_str(), r.sequence))
        .collect();
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    for (subject, id, _) in contents {
        let seq = sequence[id.as_str()];
        if let Some(prev) = last.insert(subject.as_str(), seq) {
            assert!(prev < seq, "{subject}: #{seq} stored after #{prev}");
        }
    }
}

async fn connect(url: &str) -> Result<Client, Error> {
    Client::builder(url)
        .reconnect_wait(Duration::from_millis(100))
        .disable_health_checks()
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_publishes_reach_the_stream_once_in_order() -> TestResult {
    let server = NatsServer::start_jetstream()?;
    let client = connect(&server.url()).await?;
    client
        .create_stream(stream_config("EVENTS", &["events.>"]))
        .await?;
    let dir = tempfile::tempdir()?;
    let outbox = Outbox::open(&client, OutboxConfig::new(dir.path().join("o.redb"))).await?;

    let mut receipts = Vec::new();
    for i in 0..300u32 {
        let subject = format!("events.{}", i % 3);
        let r = outbox
            .publish_durable(subject.clone(), format!("m{i}"))
            .await?;
        receipts.push((subject, r));
    }
    // A batch in one commit, and concurrent callers sharing commits.
    let batch: Vec<(String, String)> = (0..200)
        .map(|i| (format!("events.{}", i % 3), format!("b{i}")))
        .collect();
    for (r, (s, _)) in outbox
        .publish_durable_batch(batch.clone())
        .await?
        .into_iter()
        .zip(batch)
    {
        receipts.push((s, r));
    }
    let mut headers = natskit::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "my-own-id");
    headers.insert("X-Kind", "custom");
    let own = outbox
        .publish_durable_with_headers("events.h", headers, "with headers")
        .await?;
    assert_eq!(own.message_id, "my-own-id");
    receipts.push(("events.h".into(), own));

    outbox.flush_outbox(Duration::from_secs(30)).await?;
    let stats = outbox.stats();
    println!("stats after flush: {stats:?}");
    assert_eq!(stats.pending_messages, 0);
    assert_eq!(stats.pending_bytes, 0, "byte accounting returns to zero");
    assert_eq!(stats.forwarded, 501);
    assert_eq!(stats.enqueued, 501);
    assert_eq!(stats.dead_letters, 0);
    assert_eq!(
        client.status_info().outbox.map(|o| o.forwarded),
        Some(501),
        "status_info carries the outbox figures"
    );

    let contents = stream_contents(&jetstream::new(client.nats()?.clone()), "EVENTS").await?;
    assert_exactly_once_in_order(&contents, &receipts);
    let last = contents.last().ok_or("empty")?;
    assert_eq!(last.2, b"with headers");
    outbox.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_refuses_and_what_it_accepted_arrives_after_reopen() -> TestResult {
    let server = NatsServer::start_jetstream()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("o.redb");
    // Offline: a client that never connected.
    let offline = Client::builder(server.url()).build()?;
    let config = OutboxConfig::new(&path).max_messages(100);
    let outbox = Outbox::open(&offline, config.clone()).await?;
    let mut receipts = Vec::new();
    for i in 0..100 {
        receipts.push((
            "jobs.a".to_owned(),
            outbox.publish_durable("jobs.a", format!("{i}")).await?,
        ));
    }
    let err = outbox
        .publish_durable("jobs.a", "one too many")
        .await
        .unwrap_err();
    assert!(err.is_outbox_full(), "{err}");
    assert!(matches!(
        err,
        Error::OutboxFull {
            messages: 100,
            max_messages: 100,
            ..
        }
    ));
    let err = outbox
        .publish_durable_batch([("jobs.a", "x"), ("jobs.a", "y")])
        .await
        .unwrap_err();
    assert!(err.is_outbox_full(), "a batch is all or nothing: {err}");
    let stats = outbox.stats();
    assert_eq!(stats.pending_messages, 100);
    assert!(stats.oldest_age.is_none() || stats.oldest_age < Some(Duration::from_secs(60)));
    // Bad input is refused before it is stored.
    assert!(
        outbox
            .publish_durable("bad subject", "x")
            .await
            .unwrap_err()
            .is_invalid_input()
    );
    outbox.close().await?;
    assert!(
        outbox
            .publish_durable("jobs.a", "after close")
            .await
            .unwrap_err()
            .is_closed()
    );

    // Reopen on a connected client: what was stored is forwarded.
    let client = connect(&server.url()).await?;
    client
        .create_stream(stream_config("JOBS", &["jobs.>"]))
        .await?;
    let outbox = Outbox::open(&client, config).await?;
    assert_eq!(
        outbox.stats().pending_messages,
        100,
        "depth survives a reopen"
    );
    outbox.flush_outbox(Duration::from_secs(30)).await?;
    let next = outbox.publish_durable("jobs.a", "after reopen").await?;
    assert!(
        next.sequence > 100,
        "sequences are never reused: {}",
        next.sequence
    );
    receipts.push(("jobs.a".into(), next));
    outbox.flush_outbox(Duration::from_secs(30)).await?;
    let contents = stream_contents(&jetstream::new(client.nats()?.clone()), "JOBS").await?;
    assert_exactly_once_in_order(&contents, &receipts);
    outbox.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_messages_become_dead_letters_and_can_be_requeued() -> TestResult {
    let server = NatsServer::start_jetstream()?;
    let client = connect(&server.url()).await?;
    client.create_stream(stream_config("OK", &["ok.>"])).await?;
    let dir = tempfile::tempdir()?;
    let outbox = Outbox::open(&client, OutboxConfig::new(dir.path().join("o.redb"))).await?;
    let mut receipts = Vec::new();
    receipts.push((
        "ok.1".to_owned(),
        outbox.publish_durable("ok.1", "a").await?,
    ));
    let orphan = outbox.publish_durable("nowhere.1", "no stream").await?;
    receipts.push((
        "ok.1".to_owned(),
        outbox.publish_durable("ok.1", "b").await?,
    ));
    outbox.flush_outbox(Duration::from_secs(30)).await?;
    let stats = outbox.stats();
    assert_eq!((stats.forwarded, stats.dead_letters), (2, 1), "{stats:?}");

    let dead = outbox.dead_letters(10).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].sequence, orphan.sequence);
    assert!(dead[0].reason.contains("no stream"), "{}", dead[0].reason);
    let message = dead[0].message.as_ref().map_err(|e| e.clone())?;
    assert_eq!(message.subject, "nowhere.1");
    assert_eq!(message.message_id, orphan.message_id);
    assert_eq!(&message.payload[..], b"no stream");

    // Once a stream exists, requeueing delivers it with its id.
    client
        .create_stream(stream_config("LATE", &["nowhere.>"]))
        .await?;
    assert_eq!(outbox.requeue_dead_letters(None).await?, 1);
    outbox.flush_outbox(Duration::from_secs(30)).await?;
    assert_eq!(outbox.stats().dead_letters, 0);
    let js = jetstream::new(client.nats()?.clone());
    let late = stream_contents(&js, "LATE").await?;
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].1, orphan.message_id);
    assert_exactly_once_in_order(&stream_contents(&js, "OK").await?, &receipts);
    assert_eq!(outbox.purge_dead_letters(None).await?, 0);
    outbox.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_damaged_file_is_a_typed_error_and_a_second_open_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let client = Client::builder("nats://127.0.0.1:1").build()?;
    let path = dir.path().join("o.redb");
    let outbox = Outbox::open(&client, OutboxConfig::new(&path)).await?;
    for i in 0..50 {
        outbox.publish_durable("x.y", vec![b'a'; 100 + i]).await?;
    }
    let other = Client::builder("nats://127.0.0.1:1").build()?;
    let err = Outbox::open(&other, OutboxConfig::new(&path))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Outbox { .. }),
        "the file is in use: {err}"
    );
    let err = Outbox::open(&client, OutboxConfig::new(dir.path().join("b.redb")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Outbox { .. }),
        "one outbox per client: {err}"
    );
    outbox.close().await?;

    // Garbage over the whole file.
    let len = std::fs::metadata(&path)?.len() as usize;
    std::fs::write(&path, vec![0x5a; len])?;
    let err = Outbox::open(&client, OutboxConfig::new(&path))
        .await
        .unwrap_err();
    println!("garbage: {err}");
    assert!(err.is_corrupted(), "a clear error: {err}");
    // A truncated file.
    let path = dir.path().join("t.redb");
    let outbox = Outbox::open(&client, OutboxConfig::new(&path)).await?;
    for i in 0..50 {
        outbox.publish_durable("x.y", vec![b'a'; 100 + i]).await?;
    }
    outbox.close().await?;
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, &bytes[..bytes.len() / 3])?;
    match Outbox::open(&client, OutboxConfig::new(&path)).await {
        Err(err) => {
            println!("truncated: {err}");
            assert!(err.is_corrupted(), "{err}");
        }
        // Repaired to its last complete commit: what it holds is readable.
        Ok(outbox) => {
            println!("truncated file repaired: {:?}", outbox.stats());
            assert!(outbox.stats().pending_messages <= 50);
            outbox.close().await?;
        }
    }
    Ok(())
}
