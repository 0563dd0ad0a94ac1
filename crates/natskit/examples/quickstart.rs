//! `make demo`: what natskit is for, in under 30 seconds.
//!
//! Publishes and consumes through JetStream and KV, then kills the server
//! and shows, with timings, the status changes, the breaker failing fast,
//! the restart, recovery, the supervised consumer resuming, and the count
//! of messages lost.
//!
//! Connects to `$NATS_URL` when it is set (and then kills nothing);
//! otherwise starts a local nats-server with JetStream through the test
//! harness and stops it on exit.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{kv, stream};
use natskit::{
    Client, KvOptions, Message, ServiceError, StreamConsumerConfig, StreamPublishOptions,
    SubscribeOptions,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Prints a line with the time since the demo started.
fn say(start: Instant, line: impl std::fmt::Display) {
    println!("[{:>6.2} s] {line}", start.elapsed().as_secs_f64());
}

#[tokio::main]
async fn main() -> Result<()> {
    let start = Instant::now();
    let (mut server, url) = natskit_testing::env_or_local_server(true)?;
    match &server {
        Some(_) => say(start, format!("started a local nats-server at {url}")),
        None => say(
            start,
            format!("using $NATS_URL={url} (nothing will be killed)"),
        ),
    }

    let client = Client::builder(&url)
        .name("natskit-demo")
        .breaker_threshold(3)
        .initial_backoff(Duration::from_millis(500))
        .max_backoff(Duration::from_secs(2))
        .health_interval(Duration::from_millis(500))
        .on_status_change(move |status| say(start, format!("  status -> {status}")))
        .connect()
        .await?;
    say(start, format!("connected: {}", client.status()));

    // Request/reply with a service; pub/sub underneath.
    let service = client
        .serve(
            "demo.upper",
            SubscribeOptions::new(),
            |msg: Message| async move {
                let text = std::str::from_utf8(&msg.payload)
                    .map_err(|e| ServiceError::new(400, e.to_string()))?;
                Ok::<_, ServiceError>(text.to_uppercase().into())
            },
        )
        .await?;
    let reply = client
        .request_timeout("demo.upper", "hello, edge", Duration::from_secs(2))
        .await?;
    say(
        start,
        format!("request/reply: {:?}", String::from_utf8_lossy(&reply)),
    );

    // JetStream: a stream, a supervised consumer, acknowledged publishes.
    client
        .ensure_stream(stream::Config {
            name: "DEMO_ORDERS".into(),
            subjects: vec!["demo.orders.>".into()],
            ..Default::default()
        })
        .await?;
    // Orders of this run only (a durable on a shared server may hold others).
    let run = nuid::next().to_string();
    let prefix = format!("demo.orders.{run}.");
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let handled = seen.clone();
    let consumer = client
        .consume_with(
            StreamConsumerConfig::new("DEMO_ORDERS")
                .durable("demo-billing")
                .heartbeat(Duration::from_millis(500)),
            move |msg: async_nats::jetstream::Message| {
                let (handled, prefix) = (handled.clone(), prefix.clone());
                async move {
                    if msg.subject.starts_with(prefix.as_str())
                        && let Ok(mut seen) = handled.lock()
                    {
                        seen.insert(msg.subject.to_string());
                    }
                    msg.ack().await
                }
            },
        )
        .await?;
    let mut published = 0;
    for _ in 0..100 {
        publish_order(&client, &run, published).await?;
        published += 1;
    }
    say(start, "JetStream: 100 orders published, each acknowledged");

    // KV: compare-and-swap counter.
    let bucket = client
        .ensure_key_value_bucket(kv::Config {
            bucket: "demo_state".into(),
            ..Default::default()
        })
        .await?;
    let store = client.kv_store(bucket, KvOptions::default());
    let revision = store
        .update_with_retry("orders.total", |current| {
            let n: u64 = match current {
                Some(v) => std::str::from_utf8(v)?.parse()?,
                None => 0,
            };
            Ok::<_, natskit::BoxError>((n + 100).to_string().into_bytes())
        })
        .await?;
    say(
        start,
        format!("KV: orders.total updated by CAS (revision {revision})"),
    );
    wait_until(Duration::from_secs(10), || count(&seen) == 100).await;
    say(
        start,
        format!("consumer: {} of 100 orders handled", count(&seen)),
    );

    if let Some(server) = server.as_mut() {
        say(start, "--- killing the server (SIGKILL) ---");
        server.kill_async().await?;
        let killed = Instant::now();
        let mut shown = (false, false);
        while killed.elapsed() < Duration::from_millis(2500) {
            let at = Instant::now();
            match client
                .request_timeout("demo.upper", "x", Duration::from_millis(300))
                .await
            {
                Ok(_) => say(start, "  request answered (unexpected)"),
                Err(err) if err.is_circuit_open() && !shown.1 => {
                    shown.1 = true;
                    say(
                        start,
                        format!("  request failed fast in {:?}: {err}", at.elapsed()),
                    );
                }
                Err(err) if err.is_not_connected() && !shown.0 => {
                    shown.0 = true;
                    say(
                        start,
                        format!("  request failed at once ({:?}): {err}", at.elapsed()),
                    );
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let info = client.status_info();
        say(
            start,
            format!(
                "  while down: breaker {}, {} failed reconnect attempts counted",
                info.breaker, info.total_failures
            ),
        );
        say(start, "--- restarting the server ---");
        server.restart_async().await?;
        let restarted = Instant::now();
        loop {
            if client
                .request_timeout("demo.upper", "x", Duration::from_millis(500))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            if restarted.elapsed() > Duration::from_secs(15) {
                return Err("no recovery within 15 s".into());
            }
        }
        say(
            start,
            format!(
                "  requests work again {:?} after the restart; breaker {}",
                restarted.elapsed(),
                client.breaker().state()
            ),
        );
    }

    for _ in 0..100 {
        publish_order(&client, &run, published).await?;
        published += 1;
    }
    say(start, "JetStream: 100 more orders published");
    wait_until(Duration::from_secs(15), || count(&seen) == 200).await;
    let stats = consumer.stats();
    say(
        start,
        format!(
            "consumer: {} of {published} orders handled, {} recreations; messages lost: {}",
            count(&seen),
            stats.recreations,
            published - count(&seen)
        ),
    );
    service.unsubscribe().await;
    client.close().await?;
    say(start, format!("closed: status {}", client.status()));
    Ok(())
}

/// One acknowledged publish with an id of its own, retried while the
/// client reconnects.
async fn publish_order(client: &Client, run: &str, n: usize) -> Result<()> {
    let options = StreamPublishOptions::new().message_id(format!("{run}-{n}"));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match client
            .publish_to_stream_with(format!("demo.orders.{run}.{n}"), "{}", options.clone())
            .await
        {
            Ok(_) => return Ok(()),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => return Err(err.into()),
        }
    }
}

fn count(seen: &Mutex<HashSet<String>>) -> usize {
    seen.lock().map_or(0, |s| s.len())
}

async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
