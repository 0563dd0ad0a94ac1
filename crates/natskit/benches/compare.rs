//! natskit against raw async-nats, side by side in one run, on a local
//! nats-server started by the harness. Prints throughput and the ratio
//! (natskit / raw; 1.00 = same speed).
//!
//! `make bench` (release build). Tests never assert on these numbers.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

const CORE_MESSAGES: usize = 500_000;
const JS_MESSAGES: usize = 50_000;
const REQUESTS: usize = 5_000;
const ROUNDS: usize = 4;

type BenchResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// One measured scenario, for `target/bench/bench.json`.
#[derive(serde::Serialize)]
struct Row {
    name: String,
    unit: &'static str,
    raw: f64,
    natskit: f64,
    /// natskit / raw; above 1 is better for rates, worse for times.
    ratio: f64,
}

static ROWS: std::sync::Mutex<Vec<Row>> = std::sync::Mutex::new(Vec::new());

fn record(name: &str, unit: &'static str, raw: f64, natskit: f64) {
    if let Ok(mut rows) = ROWS.lock() {
        rows.push(Row {
            name: name.to_owned(),
            unit,
            raw,
            natskit,
            ratio: natskit / raw,
        });
    }
}

/// Runs both closures `ROUNDS` times, alternating which goes first (the
/// server may still be busy with the previous run), and keeps the best time
/// of each.
async fn compare<R, N, RF, NF>(name: &str, ops: usize, mut raw: R, mut natskit: N) -> BenchResult
where
    R: FnMut() -> RF,
    N: FnMut() -> NF,
    RF: std::future::Future<Output = BenchResult>,
    NF: std::future::Future<Output = BenchResult>,
{
    let (mut best_raw, mut best_kit) = (Duration::MAX, Duration::MAX);
    for round in 0..ROUNDS * 2 {
        if round % 2 == 0 {
            let start = Instant::now();
            raw().await?;
            best_raw = best_raw.min(start.elapsed());
        } else {
            let start = Instant::now();
            natskit().await?;
            best_kit = best_kit.min(start.elapsed());
        }
        // Let the server catch up before the next run.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rate = |d: Duration| ops as f64 / d.as_secs_f64();
    println!(
        "{name:<34} raw {:>12.0}/s   natskit {:>12.0}/s   ratio {:.2}",
        rate(best_raw),
        rate(best_kit),
        rate(best_kit) / rate(best_raw)
    );
    record(name, "ops/s", rate(best_raw), rate(best_kit));
    Ok(())
}

#[tokio::main]
async fn main() -> BenchResult {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return Ok(()); // `cargo test --benches` only checks that it builds
    }
    let server = natskit_testing::NatsServer::start_jetstream()?;
    let url = server.url();
    let raw = async_nats::connect(&url).await?;
    // Like for like: raw async-nats sends no trace headers, so neither does
    // this client; the traced client is compared with hand-built headers.
    let kit = natskit::Client::builder(&url)
        .trace_mode(natskit::trace::TraceMode::Off)
        .connect()
        .await?;
    let traced = natskit::Client::builder(&url).connect().await?;
    let payload = Bytes::from_static(&[b'x'; 128]);
    println!("nats-server at {url}; best of {ROUNDS} rounds, 128-byte payloads\n");

    compare(
        "core publish + flush",
        CORE_MESSAGES,
        || async {
            for _ in 0..CORE_MESSAGES {
                raw.publish("bench.core", payload.clone()).await?;
            }
            raw.flush().await?;
            Ok(())
        },
        || async {
            for _ in 0..CORE_MESSAGES {
                kit.publish("bench.core", payload.clone()).await?;
            }
            kit.nats()?.flush().await?;
            Ok(())
        },
    )
    .await?;

    compare(
        "publish with trace headers (4)",
        CORE_MESSAGES / 5,
        || async {
            let tc = natskit::trace::TraceContext::new();
            for _ in 0..CORE_MESSAGES / 5 {
                // What hand-written code does: build the same four headers.
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("traceparent", tc.format_traceparent().as_str());
                headers.insert("X-Trace-ID", tc.trace_id_hex().as_str());
                headers.insert("X-Span-ID", tc.span_id_hex().as_str());
                headers.insert("X-Parent-Span-ID", tc.span_id_hex().as_str());
                raw.publish_with_headers("bench.traced", headers, payload.clone())
                    .await?;
            }
            raw.flush().await?;
            Ok(())
        },
        || async {
            let tc = natskit::trace::TraceContext::new().new_span();
            natskit::trace::scope(tc, async {
                for _ in 0..CORE_MESSAGES / 5 {
                    traced.publish("bench.traced", payload.clone()).await?;
                }
                Ok::<_, natskit::Error>(())
            })
            .await?;
            traced.nats()?.flush().await?;
            Ok(())
        },
    )
    .await?;

    let mut echo = raw.subscribe("bench.echo").await?;
    let responder = raw.clone();
    tokio::spawn(async move {
        while let Some(msg) = echo.next().await {
            if let Some(reply) = msg.reply {
                let _ = responder.publish(reply, msg.payload).await;
            }
        }
    });
    raw.flush().await?;
    compare(
        "request/reply (sequential)",
        REQUESTS,
        || async {
            for _ in 0..REQUESTS {
                raw.request("bench.echo", payload.clone()).await?;
            }
            Ok(())
        },
        || async {
            for _ in 0..REQUESTS {
                kit.request("bench.echo", payload.clone()).await?;
            }
            Ok(())
        },
    )
    .await?;

    let js = async_nats::jetstream::new(raw.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.js.>".into()],
        storage: async_nats::jetstream::stream::StorageType::Memory,
        max_messages: 100_000,
        ..Default::default()
    })
    .await?;
    compare(
        "JetStream publish, 256 acks in flight",
        JS_MESSAGES,
        || async {
            let mut pending = FuturesUnordered::new();
            for _ in 0..JS_MESSAGES {
                if pending.len() >= 256
                    && let Some(ack) = pending.next().await
                {
                    let _: async_nats::jetstream::publish::PublishAck = ack?;
                }
                pending.push(
                    js.publish("bench.js.raw", payload.clone())
                        .await?
                        .into_future(),
                );
            }
            while let Some(ack) = pending.next().await {
                ack?;
            }
            Ok(())
        },
        || async {
            let publisher = kit.stream_publisher(256)?;
            for _ in 0..JS_MESSAGES {
                publisher.publish("bench.js.kit", payload.clone()).await?;
            }
            let report = publisher.flush().await;
            assert_eq!(report.failed, 0);
            Ok(())
        },
    )
    .await?;

    compare(
        "JetStream publish, ack awaited each",
        JS_MESSAGES / 10,
        || async {
            for _ in 0..JS_MESSAGES / 10 {
                js.publish("bench.js.raw", payload.clone()).await?.await?;
            }
            Ok(())
        },
        || async {
            for _ in 0..JS_MESSAGES / 10 {
                kit.publish_to_stream("bench.js.kit", payload.clone())
                    .await?;
            }
            Ok(())
        },
    )
    .await?;
    const SUBSCRIPTIONS: usize = 10_000;
    compare(
        "create + remove 10,000 subscriptions",
        SUBSCRIPTIONS,
        || async {
            let mut subs = Vec::with_capacity(SUBSCRIPTIONS);
            for i in 0..SUBSCRIPTIONS {
                subs.push(raw.subscribe(format!("bench.subs.{i}")).await?);
            }
            drop(subs);
            raw.flush().await?;
            Ok(())
        },
        || async {
            let mut subs = Vec::with_capacity(SUBSCRIPTIONS);
            for i in 0..SUBSCRIPTIONS {
                subs.push(
                    kit.subscribe(format!("bench.subs.{i}"), |_msg: natskit::Message| async {})
                        .await?,
                );
            }
            for sub in &subs {
                sub.unsubscribe().await;
            }
            kit.nats()?.flush().await?;
            Ok(())
        },
    )
    .await?;

    breaker_micro();
    kit.close().await?;
    write_json()?;
    Ok(())
}

/// The breaker's closed path, open rejection, and open rejection with four
/// threads hammering it, against a minimal atomic breaker (one load and a
/// compare), in nanoseconds per call (lower is better).
fn breaker_micro() {
    use natskit::breaker::{BreakerConfig, CircuitBreaker};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    const CALLS: u64 = 2_000_000;

    struct Minimal {
        open_until: AtomicU64,
        epoch: std::time::Instant,
    }
    impl Minimal {
        fn admit(&self) -> bool {
            let until = self.open_until.load(Ordering::Acquire);
            until == 0 || (self.epoch.elapsed().as_nanos() as u64) >= until
        }
    }
    let per_call = |threads: u64, f: &(dyn Fn() -> bool + Sync)| {
        let start = std::time::Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    let mut admitted = 0u64;
                    for _ in 0..CALLS {
                        admitted += u64::from(std::hint::black_box(f()));
                    }
                    std::hint::black_box(admitted);
                });
            }
        });
        start.elapsed().as_nanos() as f64 / CALLS as f64
    };
    let closed = Arc::new(CircuitBreaker::new(BreakerConfig::default()));
    let open = Arc::new(CircuitBreaker::new(BreakerConfig::default()));
    open.trip();
    let minimal_closed = Minimal {
        open_until: AtomicU64::new(0),
        epoch: std::time::Instant::now(),
    };
    let minimal_open = Minimal {
        open_until: AtomicU64::new(u64::MAX),
        epoch: std::time::Instant::now(),
    };
    type Call<'a> = &'a (dyn Fn() -> bool + Sync);
    let scenarios: [(&str, u64, Call<'_>, Call<'_>); 3] = [
        (
            "breaker closed path (ns/call)",
            1,
            &|| minimal_closed.admit(),
            &|| closed.acquire().map(|p| p.success()).is_ok(),
        ),
        (
            "breaker open rejection (ns/call)",
            1,
            &|| minimal_open.admit(),
            &|| open.acquire().is_ok(),
        ),
        (
            "breaker open, 4 threads (ns/call)",
            4,
            &|| minimal_open.admit(),
            &|| open.acquire().is_ok(),
        ),
    ];
    for (name, threads, minimal, natskit) in scenarios {
        let (raw, kit) = (per_call(threads, minimal), per_call(threads, natskit));
        println!(
            "{name:<34} minimal {raw:>9.1}      natskit {kit:>9.1}      ratio {:.2}",
            kit / raw
        );
        record(name, "ns/call", raw, kit);
    }
}

/// Writes every row to `target/bench/bench.json`.
fn write_json() -> BenchResult {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    std::fs::create_dir_all(&dir)?;
    let rows = ROWS.lock().map_err(|_| "rows lock poisoned")?;
    let path = dir.join("bench.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&*rows)?)?;
    println!("\nwrote {}", path.display());
    Ok(())
}
