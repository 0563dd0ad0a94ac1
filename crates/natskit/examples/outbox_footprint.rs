//! How large the outbox file is on flash: stores messages offline, prints
//! the file size against the logical bytes pending, drains them, prints the
//! size again, and times a reopen with many messages pending.
//!
//! `cargo run --release -p natskit --example outbox_footprint [N] [REOPEN_N]`
//! (defaults 200,000 and 1,000,000 messages of 128 bytes; uses `$NATS_URL`
//! or starts a local JetStream server through the harness).

use std::time::{Duration, Instant};

use async_nats::jetstream::stream;
use natskit::{Client, Outbox, OutboxConfig};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const TASKS: usize = 16;

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|a| a.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// An outbox at `path` with room for the largest run.
async fn open(client: &Client, path: &std::path::Path) -> natskit::Result<Outbox> {
    let config = OutboxConfig::new(path)
        .max_messages(2_000_000)
        .max_bytes(1 << 30);
    Outbox::open(client, config).await
}

/// Stores `n` messages of 128 bytes from `TASKS` tasks.
async fn store(outbox: &Outbox, n: usize) -> Result<Duration, BoxError> {
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                for _ in 0..n / TASKS {
                    outbox
                        .publish_durable("footprint.readings", vec![b'x'; 128])
                        .await?;
                }
                Ok::<_, natskit::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(start.elapsed())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (n, reopen_n) = (arg(1, 200_000), arg(2, 1_000_000));
    let (_server, url) = natskit_testing::env_or_local_server(true)?;
    let admin = Client::builder(&url).connect().await?;
    admin
        .ensure_stream(stream::Config {
            name: "FOOTPRINT".into(),
            subjects: vec!["footprint.>".into()],
            storage: stream::StorageType::Memory,
            ..Default::default()
        })
        .await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("outbox.redb");
    let file = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);

    let offline = Client::builder(&url).build()?;
    let outbox = open(&offline, &path).await?;
    let took = store(&outbox, n).await?;
    let logical = outbox.stats().pending_bytes;
    println!(
        "{n} pending: file {} for {} logical ({:.2}x, {:.0} bytes per message); stored in {took:?}",
        mib(file()),
        mib(logical),
        file() as f64 / logical as f64,
        file() as f64 / n as f64,
    );
    offline.connect().await?;
    let start = Instant::now();
    outbox.flush_outbox(Duration::from_secs(600)).await?;
    let drained = start.elapsed();
    // The acknowledged messages are deleted within a second, and an empty
    // outbox compacts its file.
    let deadline = Instant::now() + Duration::from_secs(10);
    while file() > 4 << 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "drained in {drained:?}: file {} while open, {:?} after the drain",
        mib(file()),
        start.elapsed()
    );
    outbox.close().await?;
    println!("closed: file {}", mib(file()));
    offline.close().await?;
    admin.delete_stream("FOOTPRINT").await?;

    let path = dir.path().join("reopen.redb");
    let offline = Client::builder(&url).build()?;
    let outbox = open(&offline, &path).await?;
    store(&outbox, reopen_n).await?;
    outbox.close().await?;
    let start = Instant::now();
    let outbox = open(&offline, &path).await?;
    println!(
        "reopened with {} pending in {:?} (file {})",
        outbox.stats().pending_messages,
        start.elapsed(),
        mib(std::fs::metadata(&path)?.len())
    );
    outbox.close().await?;
    Ok(())
}
