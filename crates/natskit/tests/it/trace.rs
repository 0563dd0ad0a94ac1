//! Trace context propagation through a real server.

use crate::common::{TestResult, WAIT};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::stream;
use futures_util::StreamExt;
use natskit::trace::{self, TraceContext, TraceMode};
use natskit::{Client, HeaderMap, Message, ServiceError, SubscribeOptions};
use natskit_testing::{TestEnv, eventually};

#[tokio::test]
async fn a_trace_crosses_a_publish_and_continues_from_the_handler() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let client = env.client().clone();
    let handler_span = Arc::new(Mutex::new(None::<TraceContext>));
    let seen = handler_span.clone();
    let forwarder = client.clone();
    let _sub = client
        .subscribe("trace.in", move |_msg: Message| {
            let (seen, forwarder) = (seen.clone(), forwarder.clone());
            async move {
                *seen.lock().unwrap() = trace::current();
                forwarder.publish("trace.out", "forwarded").await
            }
        })
        .await?;
    let mut out = env.nats().subscribe("trace.out").await?;
    env.nats().flush().await?;

    let origin = TraceContext::new();
    trace::scope(origin.clone(), client.publish("trace.in", "hello")).await?;

    let forwarded = tokio::time::timeout(WAIT, out.next())
        .await?
        .expect("forwarded message");
    let span = handler_span
        .lock()
        .unwrap()
        .clone()
        .expect("the handler ran in a span");
    assert_eq!(
        span.trace_id(),
        origin.trace_id(),
        "same trace in the handler"
    );
    assert_eq!(
        span.parent_span_id(),
        Some(origin.span_id()),
        "a child of the publisher's span"
    );

    let headers = forwarded.headers.expect("trace headers");
    let carried = TraceContext::extract(&headers).expect("a trace on the forwarded message");
    assert_eq!(
        carried.trace_id(),
        origin.trace_id(),
        "the handler's publish continues the trace"
    );
    assert_eq!(
        carried.span_id(),
        span.span_id(),
        "with the handler's span as parent"
    );
    assert_eq!(
        headers
            .get(trace::TRACE_ID_HEADER)
            .map(|v| v.as_str().to_owned()),
        Some(origin.trace_id_hex())
    );
    Ok(())
}

#[tokio::test]
async fn capitalised_traceparent_from_another_client_is_extracted() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let client = env.client().clone();
    let seen = Arc::new(Mutex::new(None::<TraceContext>));
    let record = seen.clone();
    let _sub = client
        .subscribe("trace.foreign", move |_msg: Message| {
            let record = record.clone();
            async move {
                *record.lock().unwrap() = trace::current();
            }
        })
        .await?;
    env.nats().flush().await?;
    let mut headers = HeaderMap::new();
    headers.insert(
        "Traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    env.nats()
        .publish_with_headers("trace.foreign", headers, "from go".into())
        .await?;
    let span = eventually(WAIT, "the handler", || async {
        seen.lock().unwrap().clone()
    })
    .await;
    assert_eq!(span.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        span.parent_span_id().map(|p| p.to_vec()),
        Some(vec![0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
    );
    Ok(())
}

#[tokio::test]
async fn requests_and_stream_consumers_carry_the_trace() -> TestResult {
    let env = TestEnv::builder().jetstream().start().await?;
    let client = env.client().clone();
    let _service = client
        .serve(
            "trace.svc",
            SubscribeOptions::new(),
            |_msg: Message| async move {
                let tc = trace::current().ok_or_else(|| ServiceError::new(500, "no trace"))?;
                Ok::<_, ServiceError>(tc.trace_id_hex().into())
            },
        )
        .await?;
    env.nats().flush().await?;
    let origin = TraceContext::new();
    let reply = trace::scope(
        origin.clone(),
        client.request_timeout("trace.svc", "", WAIT),
    )
    .await?;
    assert_eq!(std::str::from_utf8(&reply)?, origin.trace_id_hex());

    client
        .create_stream(stream::Config {
            name: "TRACED".into(),
            subjects: vec!["traced.>".into()],
            storage: stream::StorageType::Memory,
            ..Default::default()
        })
        .await?;
    let seen = Arc::new(Mutex::new(None::<TraceContext>));
    let record = seen.clone();
    let _consumer = client
        .consume(
            "TRACED",
            None,
            move |msg: async_nats::jetstream::Message| {
                let record = record.clone();
                async move {
                    *record.lock().unwrap() = trace::current();
                    msg.ack().await
                }
            },
        )
        .await?;
    trace::scope(origin.clone(), client.publish_to_stream("traced.a", "x")).await?;
    let span = eventually(WAIT, "the consumer handler", || async {
        seen.lock().unwrap().clone()
    })
    .await;
    assert_eq!(span.trace_id(), origin.trace_id());
    Ok(())
}

#[tokio::test]
async fn trace_modes_control_the_headers() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let mut sub = env.nats().subscribe("trace.modes").await?;
    env.nats().flush().await?;
    for (mode, expect_traceparent, expect_x) in [
        (TraceMode::Off, false, false),
        (TraceMode::W3c, true, false),
        (TraceMode::Full, true, true),
    ] {
        let client = Client::builder(env.url())
            .trace_mode(mode)
            .connect()
            .await?;
        client.publish("trace.modes", "x").await?;
        let msg = tokio::time::timeout(WAIT, sub.next())
            .await?
            .expect("message");
        let has = |name: &str| msg.headers.as_ref().is_some_and(|h| h.get(name).is_some());
        assert_eq!(
            has(trace::TRACEPARENT_HEADER),
            expect_traceparent,
            "{mode:?}"
        );
        assert_eq!(has(trace::TRACE_ID_HEADER), expect_x, "{mode:?}");
    }
    Ok(())
}
