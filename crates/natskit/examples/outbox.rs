//! The durable outbox: store while offline, forward once connected.
//!
//! `cargo run -p natskit --example outbox` (uses `$NATS_URL`, or starts a
//! local JetStream server through the harness). The outbox file lives in a
//! temporary directory here; a service keeps it somewhere that survives a
//! restart.

use std::time::Duration;

use async_nats::jetstream::stream;
use natskit::{Client, Outbox, OutboxConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (_server, url) = natskit_testing::env_or_local_server(true)?;
    let dir = tempfile::tempdir()?;

    // The stream exists before anything is forwarded (a message whose
    // subject no stream captures becomes a dead letter, re-queueable later).
    let admin = Client::builder(&url).connect().await?;
    admin
        .ensure_stream(stream::Config {
            name: "EXAMPLE_READINGS".into(),
            subjects: vec!["example.readings.>".into()],
            ..Default::default()
        })
        .await?;
    admin.close().await?;

    // Built, not connected: an edge device that starts without a network.
    let client = Client::builder(&url)
        .name("natskit-outbox-example")
        .build()?;
    let outbox = Outbox::open(
        &client,
        OutboxConfig::new(dir.path().join("outbox.redb")).max_messages(100_000),
    )
    .await?;
    for i in 0..1_000 {
        outbox
            .publish_durable(format!("example.readings.{}", i % 4), format!("{i}"))
            .await?;
    }
    println!("stored offline: {:?}", outbox.stats());

    // The network comes back: the forwarder delivers what waited.
    client.connect().await?;
    outbox.flush_outbox(Duration::from_secs(30)).await?;
    let stats = outbox.stats();
    println!(
        "forwarded {} (pending {}, dead letters {})",
        stats.forwarded, stats.pending_messages, stats.dead_letters
    );
    println!("status: {:?}", client.status_info().outbox);

    outbox.close().await?;
    client.close().await?;
    Ok(())
}
