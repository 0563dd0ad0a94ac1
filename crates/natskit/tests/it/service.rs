//! NATS micro services against a real server: discovery through `$SRV.*`
//! with counts, natskit's error handling, panic capture and deadline.

use crate::common::TestResult;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use natskit::{Client, Error, Message, ServiceConfig, ServiceError, SubscribeOptions};
use natskit_testing::NatsServer;

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
    let check = service
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
    // natskit's own counts of the endpoint, as a subscription keeps them.
    let counted = check.stats();
    assert_eq!(check.subject(), "orders.check");
    assert_eq!(
        (
            counted.received,
            counted.handled,
            counted.errors,
            counted.panics,
            counted.timeouts
        ),
        (4, 4, 1, 1, 1),
        "{counted:?}"
    );
    let ping = raw.request("$SRV.PING.orders", "".into()).await?;
    assert!(!ping.payload.is_empty());

    service.stop().await;
    assert!(service.info().await.is_err());
    client.close().await?;
    Ok(())
}

/// Endpoints take the same handler options as subscriptions: with
/// `concurrency(4)` four requests are handled at once (each handler waits
/// until all four are inside; one at a time they would overrun their
/// deadline), and the default is one at a time, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_take_the_subscription_handler_options() -> TestResult {
    let server = NatsServer::start()?;
    let client = Client::builder(server.url()).connect().await?;
    let service = client
        .add_service(ServiceConfig::new("pool", "1.0.0"))
        .await?;
    let inside = Arc::new(AtomicUsize::new(0));
    let seen = inside.clone();
    let endpoint = service
        .endpoint_with(
            "pool.work",
            SubscribeOptions::new()
                .concurrency(4)
                .deadline(Duration::from_secs(10)),
            move |_msg: Message| {
                let inside = seen.clone();
                async move {
                    inside.fetch_add(1, Ordering::SeqCst);
                    while inside.load(Ordering::SeqCst) < 4 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Ok::<_, ServiceError>(Bytes::from("done"))
                }
            },
        )
        .await?;
    let requests = (0..4).map(|_| {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .request_timeout("pool.work", "", Duration::from_secs(15))
                .await
        })
    });
    for request in requests.collect::<Vec<_>>() {
        assert_eq!(&request.await??[..], b"done");
    }
    let stats = endpoint.stats();
    assert_eq!((stats.received, stats.handled, stats.errors), (4, 4, 0));

    // The default: one at a time, in arrival order.
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = order.clone();
    service
        .endpoint("pool.serial", move |msg: Message| {
            let record = record.clone();
            async move {
                if let Ok(mut order) = record.lock() {
                    order.push(msg.payload.clone());
                }
                Ok::<_, ServiceError>(msg.payload)
            }
        })
        .await?;
    let raw = async_nats::connect(server.url()).await?;
    let inbox = raw.new_inbox();
    let mut replies = raw.subscribe(inbox.clone()).await?;
    for i in 0..20 {
        raw.publish_with_reply("pool.serial", inbox.clone(), format!("{i}").into())
            .await?;
    }
    for _ in 0..20 {
        tokio::time::timeout(
            Duration::from_secs(15),
            futures_util::StreamExt::next(&mut replies),
        )
        .await?
        .ok_or("replies ended")?;
    }
    let expected: Vec<Bytes> = (0..20).map(|i| Bytes::from(format!("{i}"))).collect();
    assert_eq!(*order.lock().map_err(|e| e.to_string())?, expected);

    assert!(matches!(
        service
            .endpoint_with(
                "pool.zero",
                SubscribeOptions::new().deadline(Duration::ZERO),
                |m: Message| async move { Ok::<_, ServiceError>(m.payload) }
            )
            .await,
        Err(Error::ZeroDuration { .. })
    ));
    service.stop().await;
    client.close().await?;
    Ok(())
}
