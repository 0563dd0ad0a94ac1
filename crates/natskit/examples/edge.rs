//! A service on a leaf node that uses the hub's JetStream and its own.
//!
//! `cargo run -p natskit --example edge` starts a hub (JetStream domain
//! `hub`) and a leaf (domain `leaf`) linked through a proxy with
//! `natskit-testing`; a real deployment points the client at its leaf.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use natskit::{Client, StreamConsumerConfig};
use natskit_testing::{Edge, HUB_DOMAIN};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let edge = Edge::builder().leaf("leaf").start().await?;
    let leaf = edge.leaf(0);

    // The client's JetStream calls go to the hub by default; its uplink's
    // health is checked on the health schedule.
    let client = Client::builder(leaf.url())
        .name("edge-example")
        .jetstream_domain(HUB_DOMAIN)
        .health_interval(Duration::from_millis(250))
        .on_jetstream_reachability(|reach| {
            println!("{} reachable: {:?}", reach.api_prefix, reach.reachable)
        })
        .connect()
        .await?;
    // The same connection, the leaf's own JetStream.
    let local = client.with_jetstream_domain("leaf")?;

    client
        .ensure_stream(stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await?;
    local
        .ensure_stream(stream::Config {
            name: "READINGS".into(),
            subjects: vec!["readings.>".into()],
            ..Default::default()
        })
        .await?;

    let consumer = client
        .consume_with(
            StreamConsumerConfig::new("ORDERS").durable("billing"),
            |msg: jetstream::Message| async move {
                println!("hub order: {:?}", msg.payload);
                msg.ack().await
            },
        )
        .await?;
    let ack = client
        .publish_to_stream("orders.created", "{\"id\":1}")
        .await?;
    println!(
        "stored on the hub: stream {} seq {} domain {}",
        ack.stream, ack.sequence, ack.domain
    );
    let ack = local.publish_to_stream("readings.t1", "21.5").await?;
    println!(
        "stored on the leaf: stream {} seq {} domain {}",
        ack.stream, ack.sequence, ack.domain
    );

    // The uplink fails: the local link stays up, the hub stops answering.
    leaf.uplink().refuse();
    leaf.uplink().cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "status {:?}, JetStream APIs {:?}",
        client.status(),
        client.status_info().jetstream_apis
    );
    leaf.uplink().heal();
    leaf.wait_for_uplink(Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!("after the heal: {:?}", client.status_info().jetstream_apis);

    consumer.stop().await;
    client.close().await?;
    Ok(())
}
