//! The cost of one core publish, natskit against raw async-nats, for an
//! instruction count: run each side under callgrind and compare the totals
//! (the difference over `N` is natskit's extra instructions per message;
//! see BENCHMARKS.md). Throughput on a busy 2-core machine moves by ±10%
//! between runs; instructions do not.
//!
//! ```text
//! nats-server -p 14222 &
//! NATS_URL=nats://127.0.0.1:14222 N=200000 SIDE=raw \
//!   valgrind --tool=callgrind target/release/examples/publish_cost
//! NATS_URL=nats://127.0.0.1:14222 N=200000 SIDE=kit \
//!   valgrind --tool=callgrind target/release/examples/publish_cost
//! ```

use bytes::Bytes;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let payload = Bytes::from(vec![b'x'; 128]);
    let side = std::env::var("SIDE").unwrap_or_else(|_| "kit".into());
    let start = std::time::Instant::now();
    if side == "raw" {
        let client = async_nats::connect(&url).await?;
        for _ in 0..n {
            client.publish("bench.core", payload.clone()).await?;
        }
        client.flush().await?;
    } else {
        let client = natskit::Client::builder(&url)
            .trace_mode(natskit::trace::TraceMode::Off)
            .disable_health_checks()
            .connect()
            .await?;
        for _ in 0..n {
            client.publish("bench.core", payload.clone()).await?;
        }
        client.nats()?.flush().await?;
        client.close().await?;
    }
    eprintln!("{side}: {n} publishes in {:?}", start.elapsed());
    Ok(())
}
