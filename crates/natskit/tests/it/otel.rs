//! The OpenTelemetry bridge (cargo feature `opentelemetry`): a span current
//! in OpenTelemetry is injected through the global propagator, and handlers
//! see the extracted context as their current OpenTelemetry context.
#![cfg(feature = "opentelemetry")]

use crate::common::TestResult;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use natskit::Message;
use natskit::trace;
use natskit_testing::{TestEnv, eventually};
use opentelemetry::trace::{
    FutureExt as _, SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
};

#[tokio::test]
async fn otel_context_round_trips_through_nats() -> TestResult {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let env = TestEnv::builder().shared().start().await?;
    let client = env.client().clone();

    let seen = Arc::new(Mutex::new(None::<(TraceId, SpanId, Option<[u8; 16]>)>));
    let record = seen.clone();
    let _sub = client
        .subscribe("otel.in", move |_msg: Message| {
            let record = record.clone();
            async move {
                let cx = opentelemetry::Context::current();
                let span = cx.span();
                let sc = span.span_context();
                *record.lock().unwrap() = Some((
                    sc.trace_id(),
                    sc.span_id(),
                    trace::current().map(|t| t.trace_id()),
                ));
            }
        })
        .await?;
    env.nats().flush().await?;

    let trace_id = TraceId::from_bytes([7; 16]);
    let span_id = SpanId::from_bytes([9; 8]);
    let parent = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ));
    client.publish("otel.in", "x").with_context(parent).await?;

    let (got_trace, got_span, natskit_trace) =
        eventually(Duration::from_secs(10), "the handler", || async {
            *seen.lock().unwrap()
        })
        .await;
    assert_eq!(
        got_trace, trace_id,
        "the OpenTelemetry context reached the handler"
    );
    assert_eq!(got_span, span_id, "as the remote parent span");
    assert_eq!(natskit_trace, Some([7; 16]), "natskit's own scope agrees");
    Ok(())
}
