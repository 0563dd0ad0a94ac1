//! `make demo`: connect, publish/subscribe, request/reply, status.
//!
//! Connects to `$NATS_URL` when it is set; otherwise starts a local
//! nats-server through the test harness (and stops it on exit).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use natskit::{Client, Message, ServiceError, SubscribeOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (server, url) = natskit_testing::env_or_local_server(false)?;
    if server.is_some() {
        println!("started a local nats-server at {url}");
    }

    let client = Client::builder(&url)
        .name("natskit-quickstart")
        .health_interval(Duration::from_millis(200))
        .on_status_change(|status| println!("  [status] {status}"))
        .connect()
        .await?;
    println!("connected to {url}");

    // Publish / subscribe.
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    let sub = client
        .subscribe("demo.greetings.*", move |msg: Message| {
            let counter = counter.clone();
            async move {
                println!(
                    "  received on {}: {}",
                    msg.subject,
                    String::from_utf8_lossy(&msg.payload)
                );
                counter.fetch_add(1, Ordering::SeqCst);
            }
        })
        .await?;
    for who in ["world", "edge", "cluster"] {
        client
            .publish(format!("demo.greetings.{who}"), format!("hello, {who}"))
            .await?;
    }
    sub.drain().await;
    println!(
        "publish/subscribe: {} of 3 messages handled",
        received.load(Ordering::SeqCst)
    );

    // Request / reply.
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
        .request("demo.upper", "shout this", Duration::from_secs(2))
        .await?;
    println!("request/reply: {:?}", String::from_utf8_lossy(&reply));
    service.unsubscribe().await;

    println!("rtt: {:?}", client.rtt().await?);
    let info = client.status_info();
    println!(
        "status info: status={} breaker={} failures={} reconnects={} healthy={} dropped={}",
        info.status,
        info.breaker,
        info.total_failures,
        info.reconnects,
        info.healthy,
        info.dropped_messages
    );
    client.close().await?;
    println!("closed: status={}", client.status());
    Ok(())
}
