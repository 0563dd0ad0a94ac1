//! NATS micro services against a real server: discovery through `$SRV.*`
//! with counts, natskit's error handling, panic capture and deadline.

use std::time::Duration;

use bytes::Bytes;
use natskit::{Client, Error, Message, ServiceConfig, ServiceError};
use natskit_testing::NatsServer;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_is_discoverable_with_its_counts() -> TestResult {
    let server = NatsServer::start()?;
    let client = Client::builder(server.url()).connect().await?;
    let service = client
        .add_service(
            ServiceConfig::new("orders", "1.2.0")
                .description("order book")
                .deadline(Duration::from_millis(300)),
        )
        .await?;
    service
        .endpoint("orders.count", |_msg: Message| async {
            Ok::<_, ServiceError>(Bytes::from("42"))
        })
        .await?;
    service
        .endpoint("orders.check", |msg: Message| async move {
            match &msg.payload[..] {
                b"bad" => Err(ServiceError::new(400, "no such\norder")),
                b"panic" => panic!("handler bug"),
                b"slow" => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok(Bytes::new())
                }
                _ => Ok(Bytes::from("ok")),
            }
        })
        .await?;

    for _ in 0..3 {
        let reply = client
            .request_timeout("orders.count", "", Duration::from_secs(2))
            .await?;
        assert_eq!(&reply[..], b"42");
    }
    let codes = async |payload: &'static str| match client
        .request_timeout("orders.check", payload, Duration::from_secs(2))
        .await
    {
        Err(Error::Service(err)) => Some(err.code),
        _ => None,
    };
    assert_eq!(codes("bad").await, Some(400));
    assert_eq!(codes("panic").await, Some(500), "a panic is a 500 reply");
    assert_eq!(codes("slow").await, Some(504), "an overrun is a 504 reply");
    assert_eq!(codes("fine").await, None);

    // What `nats micro info/stats` sees, through a raw client.
    let raw = async_nats::connect(server.url()).await?;
    let info: serde_json::Value =
        serde_json::from_slice(&raw.request("$SRV.INFO.orders", "".into()).await?.payload)?;
    assert_eq!(info["name"], "orders");
    assert_eq!(info["version"], "1.2.0");
    assert_eq!(info["description"], "order book");
    let subjects: Vec<&str> = info["endpoints"]
        .as_array()
        .map(|e| e.iter().filter_map(|e| e["subject"].as_str()).collect())
        .unwrap_or_default();
    assert!(subjects.contains(&"orders.count") && subjects.contains(&"orders.check"));

    let stats: serde_json::Value =
        serde_json::from_slice(&raw.request("$SRV.STATS.orders", "".into()).await?.payload)?;
    let endpoint = |subject: &str| {
        stats["endpoints"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["subject"] == subject))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(endpoint("orders.count")["num_requests"], 3);
    assert_eq!(endpoint("orders.count")["num_errors"], 0);
    assert_eq!(endpoint("orders.check")["num_requests"], 4);
    assert_eq!(endpoint("orders.check")["num_errors"], 3);
    let ping = raw.request("$SRV.PING.orders", "".into()).await?;
    assert!(!ping.payload.is_empty());

    service.stop().await;
    assert!(service.info().await.is_err());
    client.close().await?;
    Ok(())
}
