//! Configuration management on KV: atomic JSON updates with CAS retry, a
//! watch that sees every change, and the state of a key in the past.
//!
//! `cargo run -p natskit --example config_kv` (uses `$NATS_URL`, or starts a
//! local JetStream server through the harness).

use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use natskit::{Client, KvOptions, TemporalResolver, WatchEvent};

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct ServiceConfig {
    enabled: bool,
    workers: u32,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (_server, url) = natskit_testing::env_or_local_server(true)?;
    let client = Client::builder(&url)
        .name("natskit-config-example")
        .connect()
        .await?;
    let bucket = client
        .ensure_key_value_bucket(kv::Config {
            bucket: "example_config".into(),
            history: 10,
            ..Default::default()
        })
        .await?;
    let store = client.kv_store(bucket, KvOptions::default());

    let mut watch = store.watch("services.>").await?;
    let watcher = tokio::spawn(async move {
        while let Some(event) = watch.next().await {
            match event {
                WatchEvent::InitialDone => println!("  [watch] initial values done"),
                WatchEvent::Entry(e) => {
                    println!(
                        "  [watch] {} rev {} {:?}: {}",
                        e.key,
                        e.revision,
                        e.operation,
                        String::from_utf8_lossy(&e.value)
                    );
                    // The second write is the last one this example makes.
                    if e.revision >= 2 {
                        break;
                    }
                }
                other => println!("  [watch] {other:?}"),
            }
        }
    });

    let before = SystemTime::now();
    store
        .update_typed("services.processor", |c: &mut ServiceConfig| {
            c.enabled = true;
            c.workers = 4;
            Ok::<_, std::convert::Infallible>(())
        })
        .await?;
    let revision = store
        .update_json("services.processor", |config| {
            let workers = config.get("workers").and_then(|w| w.as_u64()).unwrap_or(0);
            config.insert("workers".into(), (workers * 2).into());
            config.insert("timeout".into(), "30s".into());
            Ok::<_, std::convert::Infallible>(())
        })
        .await?;
    println!("committed revision {revision}");
    let current: ServiceConfig = store.get_json("services.processor").await?;
    println!("current: {current:?}");

    let resolver = TemporalResolver::new(&store);
    let history = store.history("services.processor").await?;
    let first = resolver
        .get_at_timestamp("services.processor", history[0].created)
        .await?;
    println!("first version: {}", String::from_utf8_lossy(&first.value));
    let changes = resolver
        .get_in_time_range(
            "services.processor",
            before - Duration::from_secs(1),
            SystemTime::now(),
        )
        .await?;
    println!(
        "{} changes since start; cache {:?}",
        changes.len(),
        resolver.stats()
    );

    // Wait for the watcher to print both writes.
    tokio::time::timeout(Duration::from_secs(5), watcher).await??;
    client.delete_key_value_bucket("example_config").await?;
    client.close().await?;
    Ok(())
}
