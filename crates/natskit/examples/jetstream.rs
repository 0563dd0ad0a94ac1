//! JetStream with natskit: ensure a stream, publish with acks (one by one and
//! pipelined), and run a supervised durable consumer.
//!
//! `cargo run -p natskit --example jetstream` (uses `$NATS_URL`, or starts a
//! local JetStream server through the harness).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{Message, stream};
use natskit::{Client, StreamConsumerConfig, StreamPublishOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (_server, url) = natskit_testing::env_or_local_server(true)?;
    let client = Client::builder(&url)
        .name("natskit-jetstream-example")
        .connect()
        .await?;

    client
        .ensure_stream(stream::Config {
            name: "EXAMPLE_ORDERS".into(),
            subjects: vec!["example.orders.>".into()],
            ..Default::default()
        })
        .await?;

    let ack = client
        .publish_to_stream_with(
            "example.orders.created",
            r#"{"id":1}"#,
            StreamPublishOptions::new().message_id("order-1"),
        )
        .await?;
    println!(
        "stored in {} at sequence {} (duplicate: {})",
        ack.stream, ack.sequence, ack.duplicate
    );

    let publisher = client.stream_publisher(256)?;
    for i in 2..=1000 {
        publisher
            .publish("example.orders.created", format!(r#"{{"id":{i}}}"#))
            .await?;
    }
    let report = publisher.flush().await;
    println!(
        "pipelined: {} acked, {} failed",
        report.acked, report.failed
    );

    let handled = Arc::new(AtomicUsize::new(0));
    let counter = handled.clone();
    let consumer = client
        .consume_with(
            StreamConsumerConfig::new("EXAMPLE_ORDERS")
                .durable("example-billing")
                .filter_subject("example.orders.created")
                .ack_wait(Duration::from_secs(10)),
            move |msg: Message| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::Relaxed);
                    msg.ack().await
                }
            },
        )
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while handled.load(Ordering::Relaxed) < 1000 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "consumer {} handled {:?}",
        consumer.name(),
        consumer.stats()
    );
    client
        .stop_and_delete_consumer("EXAMPLE_ORDERS", "example-billing")
        .await?;
    client.delete_stream("EXAMPLE_ORDERS").await?;
    client.close().await?;
    Ok(())
}
