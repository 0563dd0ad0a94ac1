//! The cost of a core publish or of a subscription handler, natskit
//! against raw async-nats, for an instruction count: run each side under
//! callgrind and compare the totals (the difference over `N` is natskit's
//! extra instructions per message; see BENCHMARKS.md). Throughput on a
//! busy 2-core machine moves by ±10% between runs; instructions do not.
//!
//! ```text
//! nats-server -p 14222 &
//! export NATS_URL=nats://127.0.0.1:14222 N=30000
//! PATH_=publish SIDE=raw valgrind --tool=callgrind target/release/examples/instruction_cost
//! PATH_=publish SIDE=wrapped valgrind --tool=callgrind target/release/examples/instruction_cost
//! PATH_=publish SIDE=kit valgrind --tool=callgrind target/release/examples/instruction_cost
//! PATH_=subscribe SIDE=raw valgrind --tool=callgrind target/release/examples/instruction_cost
//! PATH_=subscribe SIDE=kit valgrind --tool=callgrind target/release/examples/instruction_cost
//! nats-server -js -p 14223 &   # PATH_=stream: 256 acks in flight, raw with ids
//! NATS_URL=nats://127.0.0.1:14223 PATH_=stream SIDE=raw valgrind --tool=callgrind target/release/examples/instruction_cost
//! NATS_URL=nats://127.0.0.1:14223 PATH_=stream SIDE=kit valgrind --tool=callgrind target/release/examples/instruction_cost
//! NATS_URL=nats://127.0.0.1:14223 PATH_=kv SIDE=raw valgrind --tool=callgrind target/release/examples/instruction_cost
//! NATS_URL=nats://127.0.0.1:14223 PATH_=kv SIDE=kit valgrind --tool=callgrind target/release/examples/instruction_cost
//! PATH_=traced SIDE=raw valgrind --tool=callgrind target/release/examples/instruction_cost
//! PATH_=traced SIDE=kit valgrind --tool=callgrind target/release/examples/instruction_cost
//! PATH_=create SIDE=raw valgrind --tool=callgrind target/release/examples/instruction_cost
//! PATH_=create SIDE=kit valgrind --tool=callgrind target/release/examples/instruction_cost
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

async fn kit(url: &str) -> Result<natskit::Client, BoxError> {
    Ok(natskit::Client::builder(url)
        .trace_mode(natskit::trace::TraceMode::Off)
        .disable_health_checks()
        .connect()
        .await?)
}

/// `n` core publishes and a flush.
async fn publish(url: &str, raw: bool, n: u64, payload: Bytes) -> Result<(), BoxError> {
    if raw && env("SIDE", "kit") == "wrapped" {
        // Raw async-nats behind one async fn that only awaits it: the cost
        // of any wrapper's nesting alone.
        async fn wrapped(
            client: &async_nats::Client,
            payload: Bytes,
        ) -> Result<(), async_nats::PublishError> {
            client.publish("cost.publish", payload).await
        }
        let client = async_nats::connect(url).await?;
        for _ in 0..n {
            wrapped(&client, payload.clone()).await?;
        }
        client.flush().await?;
    } else if raw {
        let client = async_nats::connect(url).await?;
        for _ in 0..n {
            client.publish("cost.publish", payload.clone()).await?;
        }
        client.flush().await?;
    } else {
        let client = kit(url).await?;
        for _ in 0..n {
            client.publish("cost.publish", payload.clone()).await?;
        }
        client.nats()?.flush().await?;
        client.close().await?;
    }
    Ok(())
}

/// `n` messages received by a raw subscriber or a natskit handler.
async fn subscribe(url: &str, raw: bool, n: u64, payload: Bytes) -> Result<(), BoxError> {
    let seen = Arc::new(AtomicU64::new(0));
    let counter = seen.clone();
    let mut keep = None;
    if raw {
        let client = async_nats::connect(url).await?;
        let mut sub = client.subscribe("cost.subscribe").await?;
        client.flush().await?;
        tokio::spawn(async move {
            while sub.next().await.is_some() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
    } else {
        let client = kit(url).await?;
        let sub = client
            .subscribe("cost.subscribe", move |_: async_nats::Message| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
            .await?;
        client.nats()?.flush().await?;
        keep = Some((client, sub));
    }
    let publisher = async_nats::connect(url).await?;
    for i in 0..n {
        // At most 50,000 ahead of the reader (as the bench's subscribe
        // row), so neither side's buffers overflow under a profiler.
        if i % 1024 == 0 {
            while i.saturating_sub(seen.load(Ordering::Relaxed)) > 50_000 {
                tokio::task::yield_now().await;
            }
        }
        publisher.publish("cost.subscribe", payload.clone()).await?;
    }
    publisher.flush().await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(keep);
    let seen = seen.load(Ordering::Relaxed);
    if seen < n {
        return Err(format!("received {seen} of {n}").into());
    }
    Ok(())
}

/// `n` stream publishes with 256 acks in flight: raw async-nats with a
/// `Nats-Msg-Id` on each (as the bench's "raw with ids"), or natskit's
/// `stream_publisher(256)`.
async fn stream(url: &str, raw: bool, n: u64, payload: Bytes) -> Result<(), BoxError> {
    use futures_util::stream::FuturesUnordered;
    let setup = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(setup.clone());
    let _ = js.delete_stream("COST").await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "COST".into(),
        subjects: vec!["cost.stream".into()],
        storage: async_nats::jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await?;
    if raw {
        let mut pending = FuturesUnordered::new();
        for _ in 0..n {
            if pending.len() >= 256
                && let Some(ack) = pending.next().await
            {
                ack?;
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, nuid::next().as_str());
            let ack = js
                .publish_with_headers("cost.stream", headers, payload.clone())
                .await?;
            pending.push(ack.into_future());
        }
        while let Some(ack) = pending.next().await {
            ack?;
        }
    } else {
        let client = kit(url).await?;
        let publisher = client.stream_publisher(256)?;
        for _ in 0..n {
            publisher.publish("cost.stream", payload.clone()).await?;
        }
        let report = publisher.flush().await;
        if report.failed > 0 {
            return Err(format!("{report:?}").into());
        }
        client.close().await?;
    }
    js.delete_stream("COST").await?;
    Ok(())
}

/// `n` core publishes carrying trace headers: natskit's default mode in a
/// trace scope (four headers), or raw async-nats cloning the same four
/// prebuilt headers (as the bench's traced row).
async fn traced(url: &str, raw: bool, n: u64, payload: Bytes) -> Result<(), BoxError> {
    let tc = natskit::trace::TraceContext::new().new_span();
    if raw {
        let mut headers = async_nats::HeaderMap::new();
        tc.inject(&mut headers, natskit::trace::TraceMode::Full);
        let client = async_nats::connect(url).await?;
        for _ in 0..n {
            client
                .publish_with_headers("cost.traced", headers.clone(), payload.clone())
                .await?;
        }
        client.flush().await?;
    } else {
        let client = natskit::Client::builder(url)
            .disable_health_checks()
            .connect()
            .await?;
        natskit::trace::scope(tc, async {
            for _ in 0..n {
                client.publish("cost.traced", payload.clone()).await?;
            }
            Ok::<_, natskit::Error>(())
        })
        .await?;
        client.nats()?.flush().await?;
        client.close().await?;
    }
    Ok(())
}

/// `n` sequential KV puts to 100 keys: raw async-nats publishing each with a
/// `Nats-Msg-Id` (as the bench's "raw with ids"), or natskit's `KvStore::put`.
async fn kv(url: &str, raw: bool, n: u64, payload: Bytes) -> Result<(), BoxError> {
    let setup = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(setup.clone());
    let _ = js.delete_key_value("COST").await;
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: "COST".into(),
        storage: async_nats::jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await?;
    if raw {
        for i in 0..n {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, nuid::next().as_str());
            js.publish_with_headers(format!("$KV.COST.k{}", i % 100), headers, payload.clone())
                .await?
                .await?;
        }
    } else {
        let client = kit(url).await?;
        let bucket = client.get_key_value_bucket("COST").await?;
        let store = client.kv_store(bucket, natskit::KvOptions::default());
        for i in 0..n {
            store.put(&format!("k{}", i % 100), payload.clone()).await?;
        }
        client.close().await?;
    }
    js.delete_key_value("COST").await?;
    Ok(())
}

/// `n` subscriptions created (and flushed); with `EXIT=1` the process ends
/// there (creation alone), otherwise they are dropped and the client closed.
async fn create(url: &str, raw: bool, n: u64) -> Result<(), BoxError> {
    if raw {
        let client = async_nats::connect(url).await?;
        let mut subs = Vec::new();
        for i in 0..n {
            subs.push(client.subscribe(format!("cost.create.{i}")).await?);
        }
        client.flush().await?;
        exit_if_asked(n);
        drop(subs);
        client.flush().await?;
    } else {
        let client = kit(url).await?;
        let mut subs = Vec::new();
        for i in 0..n {
            subs.push(
                client
                    .subscribe(format!("cost.create.{i}"), |_: async_nats::Message| {
                        std::future::ready(())
                    })
                    .await?,
            );
        }
        client.nats()?.flush().await?;
        exit_if_asked(n);
        drop(subs);
        client.close().await?;
    }
    Ok(())
}

fn exit_if_asked(n: u64) {
    if env("EXIT", "0") == "1" {
        eprintln!("{n} created; exiting");
        std::process::exit(0);
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let url = env("NATS_URL", "nats://127.0.0.1:4222");
    let n: u64 = env("N", "30000").parse()?;
    let raw = matches!(env("SIDE", "kit").as_str(), "raw" | "wrapped");
    let payload = Bytes::from(vec![b'x'; 128]);
    let start = Instant::now();
    match env("PATH_", "publish").as_str() {
        "subscribe" => subscribe(&url, raw, n, payload).await?,
        "create" => create(&url, raw, n).await?,
        "stream" => stream(&url, raw, n, payload).await?,
        "kv" => kv(&url, raw, n, payload).await?,
        "traced" => traced(&url, raw, n, payload).await?,
        _ => publish(&url, raw, n, payload).await?,
    }
    eprintln!("{n} messages in {:?}", start.elapsed());
    Ok(())
}
