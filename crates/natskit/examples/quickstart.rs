//! `make demo`: connect, publish/subscribe, request/reply.
//!
//! Connects to `$NATS_URL` when it is set; otherwise starts a local
//! nats-server through the test harness.

use std::time::Duration;

use futures_util::StreamExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (_server, url) = match std::env::var("NATS_URL") {
        Ok(url) if !url.is_empty() => (None, url),
        _ => {
            let server = natskit_testing::NatsServer::start()?;
            let url = server.url();
            println!("started a local nats-server at {url}");
            (Some(server), url)
        }
    };
    let client = async_nats::connect(&url).await?;
    println!("connected to {url}");

    let mut sub = client.subscribe("demo.greetings").await?;
    client.publish("demo.greetings", "hello".into()).await?;
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await?
        .ok_or("subscription closed")?;
    println!(
        "received on {}: {}",
        msg.subject,
        String::from_utf8_lossy(&msg.payload)
    );
    Ok(())
}
