//! Typed subjects over a real server.

use crate::common::{TestResult, WAIT};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::stream;
use natskit::{Error, ServiceError, StreamConsumerConfig, SubscribeOptions, TypedSubject};
use natskit_testing::{TestEnv, eventually};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u64,
    item: String,
}

#[tokio::test]
async fn typed_round_trip_with_a_template() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let client = env.client();
    let created: TypedSubject<Order> = TypedSubject::new("orders.{region}.created")?;
    assert_eq!(created.wildcard(), "orders.*.created");
    let received = Arc::new(Mutex::new(Vec::new()));
    let record = received.clone();
    let _sub = created
        .subscribe_full(client, move |msg: natskit::Message, order: Order| {
            let record = record.clone();
            async move {
                record
                    .lock()
                    .unwrap()
                    .push((msg.subject.to_string(), order))
            }
        })
        .await?;
    env.nats().flush().await?;
    let order = Order {
        id: 7,
        item: "book".into(),
    };
    created
        .publish_filled(client, &[("region", "eu")], &order)
        .await?;
    eventually(WAIT, "the typed message", || async {
        (!received.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        received.lock().unwrap()[0],
        ("orders.eu.created".to_owned(), order.clone())
    );

    assert!(
        matches!(
            created.publish(client, &order).await,
            Err(Error::InvalidArgument(_))
        ),
        "tokens unfilled"
    );
    assert!(matches!(
        created
            .publish_filled(client, &[("region", "e.u")], &order)
            .await,
        Err(Error::InvalidArgument(_))
    ));
    Ok(())
}

#[tokio::test]
async fn undecodable_payloads_are_counted_and_reported() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let client = env.client();
    let hooked = Arc::new(AtomicUsize::new(0));
    let hook = hooked.clone();
    // Recorded, not asserted in the hook: a panic there is caught and
    // counted, so an assert inside could never fail the test.
    let kinds = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kind = kinds.clone();
    let subject: TypedSubject<Order> = TypedSubject::new("typed.bad")?.on_error(move |err| {
        if let Ok(mut kinds) = kind.lock() {
            kinds.push(matches!(err, Error::Codec { op: "decode", .. }));
        }
        hook.fetch_add(1, Ordering::SeqCst);
    });
    let good = Arc::new(AtomicUsize::new(0));
    let count = good.clone();
    let _sub = subject
        .subscribe(client, move |_order: Order| {
            let count = count.clone();
            async move {
                count.fetch_add(1, Ordering::SeqCst);
            }
        })
        .await?;
    env.nats().flush().await?;
    client.publish("typed.bad", "not json").await?;
    subject
        .publish(
            client,
            &Order {
                id: 1,
                item: "ok".into(),
            },
        )
        .await?;
    eventually(WAIT, "the good message", || async {
        (good.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert_eq!(subject.errors(), 1);
    assert_eq!(hooked.load(Ordering::SeqCst), 1);
    assert_eq!(
        *kinds.lock().expect("not poisoned"),
        vec![true],
        "the hook saw a decode error"
    );
    Ok(())
}

#[tokio::test]
async fn typed_request_and_serve() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let client = env.client();
    #[derive(Serialize, Deserialize)]
    struct Quote {
        total: u64,
    }
    let pricing: TypedSubject<Order> = TypedSubject::new("pricing.quote")?;
    let _service = pricing
        .serve(client, SubscribeOptions::new(), |order: Order| async move {
            if order.item.is_empty() {
                return Err(ServiceError::new(422, "no item"));
            }
            Ok(Quote {
                total: order.id * 10,
            })
        })
        .await?;
    env.nats().flush().await?;
    let quote: Quote = pricing
        .request(
            client,
            &Order {
                id: 4,
                item: "pen".into(),
            },
            WAIT,
        )
        .await?;
    assert_eq!(quote.total, 40);
    let err = pricing
        .request::<Quote>(
            client,
            &Order {
                id: 4,
                item: String::new(),
            },
            WAIT,
        )
        .await
        .err()
        .expect("a service error");
    assert!(matches!(&err, Error::Service(e) if e.code == 422), "{err}");
    Ok(())
}

#[tokio::test]
async fn typed_stream_publish_and_poison_messages_are_terminated() -> TestResult {
    let env = TestEnv::builder().jetstream().start().await?;
    let client = env.client();
    client
        .create_stream(stream::Config {
            name: "TYPED".into(),
            subjects: vec!["typed.orders".into()],
            storage: stream::StorageType::Memory,
            ..Default::default()
        })
        .await?;
    let subject: TypedSubject<Order> = TypedSubject::new("typed.orders")?;
    let ack = subject
        .publish_to_stream(
            client,
            &Order {
                id: 1,
                item: "a".into(),
            },
        )
        .await?;
    assert_eq!(ack.stream, "TYPED");
    client.publish_to_stream("typed.orders", "poison").await?;
    subject
        .publish_to_stream(
            client,
            &Order {
                id: 2,
                item: "b".into(),
            },
        )
        .await?;

    let got = Arc::new(Mutex::new(Vec::new()));
    let record = got.clone();
    let handle = subject
        .consume(
            client,
            StreamConsumerConfig::new("TYPED"),
            move |msg, order: Order| {
                let record = record.clone();
                async move {
                    record.lock().unwrap().push(order.id);
                    msg.ack().await
                }
            },
        )
        .await?;
    eventually(WAIT, "both valid orders", || async {
        (got.lock().unwrap().len() == 2).then_some(())
    })
    .await;
    eventually(WAIT, "the consumer to settle", || async {
        let info = client
            .get_stream("TYPED")
            .await
            .ok()?
            .consumer_info(handle.name())
            .await
            .ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await;
    assert_eq!(*got.lock().unwrap(), vec![1, 2]);
    assert_eq!(subject.errors(), 1);
    assert_eq!(
        handle.stats().redelivered,
        0,
        "the poison message was terminated, not redelivered"
    );
    Ok(())
}

#[cfg(feature = "msgpack")]
#[tokio::test]
async fn msgpack_codec_round_trip() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let client = env.client();
    let subject: TypedSubject<Order, natskit::MsgPackCodec> =
        TypedSubject::with_codec("typed.msgpack", natskit::MsgPackCodec)?;
    let got = Arc::new(Mutex::new(None));
    let record = got.clone();
    let _sub = subject
        .subscribe(client, move |order: Order| {
            let record = record.clone();
            async move { *record.lock().unwrap() = Some(order) }
        })
        .await?;
    env.nats().flush().await?;
    let order = Order {
        id: 9,
        item: "packed".into(),
    };
    subject.publish(client, &order).await?;
    let back = eventually(WAIT, "the msgpack message", || async {
        got.lock().unwrap().clone()
    })
    .await;
    assert_eq!(back, order);
    Ok(())
}
