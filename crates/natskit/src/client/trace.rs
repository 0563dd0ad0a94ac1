//! W3C Trace Context propagated in NATS headers.
//!
//! Ids are bytes; hex exists only at the edges ([`TraceContext::parse_traceparent`],
//! [`TraceContext::format_traceparent`]). The current trace lives in a
//! task-local [`scope`]; publishes, requests and stream publishes inject it
//! (generating a new trace when none is in scope), and subscription, service
//! and consumer handlers run inside a child span of the trace they received,
//! so a publish from a handler continues the trace.
//!
//! Headers written ([`TraceMode::Full`], the default): `traceparent`,
//! `X-Trace-ID`, `X-Span-ID`, `X-Parent-Span-ID`. [`TraceMode::W3c`] writes
//! `traceparent` alone; [`TraceMode::Off`] writes nothing (any header costs
//! core publish throughput; `BENCHMARKS.md` has the figures).
//!
//! ```
//! use natskit::trace::{self, TraceContext};
//! # async fn demo() {
//! let tc = TraceContext::parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
//! trace::scope(tc.clone(), async {
//!     assert_eq!(trace::current().unwrap().trace_id(), tc.trace_id());
//!     // client.publish(...) here carries trace 0af765...
//! })
//! .await;
//! # }
//! ```

use std::future::Future;

use async_nats::HeaderMap;

pub use crate::core::trace_context::{
    PARENT_SPAN_HEADER, SPAN_ID_HEADER, TRACE_ID_HEADER, TRACEPARENT_HEADER, TRACESTATE_HEADER,
    TraceContext, TraceMode, TraceParseError,
};

/// A trace in scope, with the headers it puts on outgoing messages,
/// encoded once per scope and mode: every publish in the scope carries the
/// same span, so building four header values per message would buy
/// nothing.
struct Scoped {
    trace: TraceContext,
    /// The headers for the mode first asked for (a client's mode is fixed;
    /// a second client with another mode in the same scope builds its own
    /// each time). One slot, since every handler invocation holds a scope.
    headers: std::sync::OnceLock<(TraceMode, HeaderMap)>,
}

impl Scoped {
    fn new(trace: TraceContext) -> Self {
        Self {
            trace,
            headers: std::sync::OnceLock::new(),
        }
    }

    /// The scope's headers for `mode` (not [`TraceMode::Off`]).
    fn headers(&self, mode: TraceMode) -> HeaderMap {
        let build = || {
            let mut headers = HeaderMap::new();
            self.trace.inject(&mut headers, mode);
            headers
        };
        match self.headers.get_or_init(|| (mode, build())) {
            (cached, headers) if *cached == mode => headers.clone(),
            _ => build(),
        }
    }
}

tokio::task_local! {
    static CURRENT: Scoped;
}

/// Runs `future` with `trace` as the current trace context.
pub async fn scope<F: Future>(trace: TraceContext, future: F) -> F::Output {
    CURRENT.scope(Scoped::new(trace), future).await
}

/// The trace context of the current task, if one is in scope.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(|s| s.trace.clone()).ok()
}

/// The current trace context: the natskit scope, else (with the
/// `opentelemetry` feature) the current OpenTelemetry span, else a new root
/// trace.
pub fn current_or_new() -> TraceContext {
    if let Some(tc) = current() {
        return tc;
    }
    #[cfg(feature = "opentelemetry")]
    if let Some(tc) = otel::current_span() {
        return tc;
    }
    TraceContext::new()
}

/// Spawns `future` on its own task carrying the current trace, detached
/// from the caller: the caller's timeouts and cancellation no longer apply,
/// the trace does. Use it, for
/// example, to publish an error reply after the request's deadline passed.
pub fn spawn_detached<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match current() {
        Some(trace) => tokio::spawn(scope(trace, future)),
        None => tokio::spawn(future),
    }
}

/// The span a handler for a message with `headers` runs in: a child of the
/// extracted trace.
pub(crate) fn handler_span(headers: Option<&HeaderMap>) -> Option<TraceContext> {
    headers
        .and_then(TraceContext::extract)
        .map(|tc| tc.new_span())
}

/// What a message handler runs inside: the natskit child span and, with the
/// `opentelemetry` feature, the OpenTelemetry context extracted by the
/// global propagator.
pub(crate) struct HandlerContext {
    span: Option<TraceContext>,
    #[cfg(feature = "opentelemetry")]
    otel: Option<opentelemetry::Context>,
}

impl HandlerContext {
    #[inline(always)]
    pub(crate) fn from_headers(headers: Option<&HeaderMap>) -> Self {
        Self {
            span: handler_span(headers),
            #[cfg(feature = "opentelemetry")]
            otel: headers.map(otel::extract_context),
        }
    }

    /// Not an `async fn`, so the future is not kept twice (see
    /// `handler::invoke`).
    #[inline(always)]
    pub(crate) fn run<F: Future>(self, future: F) -> impl Future<Output = F::Output> {
        use futures_util::future::Either;
        #[cfg(feature = "opentelemetry")]
        let future = {
            use opentelemetry::trace::FutureExt as _;
            match self.otel {
                Some(cx) => Either::Left(future.with_context(cx)),
                None => Either::Right(future),
            }
        };
        match self.span {
            Some(span) => Either::Left(CURRENT.scope(Scoped::new(span), future)),
            None => Either::Right(future),
        }
    }
}

/// Headers for an outgoing message: the given ones (or new) with the
/// current trace injected; `None` when tracing is off and none were given.
#[inline]
pub(crate) fn outgoing(headers: Option<HeaderMap>, mode: TraceMode) -> Option<HeaderMap> {
    if mode == TraceMode::Off {
        return headers;
    }
    traced(headers, mode)
}

fn traced(headers: Option<HeaderMap>, mode: TraceMode) -> Option<HeaderMap> {
    if headers.is_none()
        && let Ok(cached) = CURRENT.try_with(|s| s.headers(mode))
    {
        return Some(cached);
    }
    let mut headers = headers.unwrap_or_default();
    let trace = current().unwrap_or_else(|| {
        #[cfg(feature = "opentelemetry")]
        if let Some(trace) = otel::current_span() {
            // An OpenTelemetry span is current: let the standard propagator
            // write traceparent/tracestate, then add the X-* headers.
            otel::inject_current(&mut headers);
            return trace;
        }
        TraceContext::new()
    });
    trace.inject(&mut headers, mode);
    Some(headers)
}

/// OpenTelemetry bridge (cargo feature `opentelemetry`): header carriers
/// for the global text-map propagator and conversions of the current span.
#[cfg(feature = "opentelemetry")]
pub mod otel {
    use async_nats::HeaderMap;
    use opentelemetry::propagation::{Extractor, Injector};
    use opentelemetry::trace::TraceContextExt;

    use super::TraceContext;

    /// Writes propagator fields into NATS headers.
    #[derive(Debug)]
    pub struct HeaderInjector<'a>(pub &'a mut HeaderMap);

    impl Injector for HeaderInjector<'_> {
        fn set(&mut self, key: &str, value: String) {
            // A propagator's field that is not a valid header is skipped:
            // async-nats would panic on it.
            if crate::core::header::validate_name(key).is_ok() {
                self.0
                    .insert(key, crate::core::header::sanitize_value(&value).as_ref());
            }
        }
    }

    /// Reads propagator fields from NATS headers (names matched without case).
    #[derive(Debug)]
    pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

    impl Extractor for HeaderExtractor<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            crate::core::trace_context::header(self.0, key)
        }

        fn keys(&self) -> Vec<&str> {
            self.0
                .iter()
                .map(|(k, _)| AsRef::<str>::as_ref(k))
                .collect()
        }
    }

    /// The current OpenTelemetry span as a [`TraceContext`], if valid.
    pub fn current_span() -> Option<TraceContext> {
        let cx = opentelemetry::Context::current();
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return None;
        }
        TraceContext::from_parts(
            sc.trace_id().to_bytes(),
            sc.span_id().to_bytes(),
            None,
            sc.is_sampled(),
        )
    }

    /// Injects the current OpenTelemetry context with the global propagator.
    pub fn inject_current(headers: &mut HeaderMap) {
        let cx = opentelemetry::Context::current();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut HeaderInjector(headers))
        });
    }

    /// Extracts an OpenTelemetry context with the global propagator.
    pub fn extract_context(headers: &HeaderMap) -> opentelemetry::Context {
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn parses_and_formats_round_trip() {
        let tc = TraceContext::parse_traceparent(VALID).unwrap();
        assert_eq!(tc.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(tc.span_id_hex(), "b7ad6b7169203331");
        assert!(tc.sampled());
        assert_eq!(tc.format_traceparent(), VALID);
        let unsampled = TraceContext::parse_traceparent(&VALID.replace("-01", "-00")).unwrap();
        assert!(!unsampled.sampled());
    }

    #[test]
    fn rejects_what_the_spec_rejects() {
        let cases = [
            ("", TraceParseError::Length),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0",
                TraceParseError::Length,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
                TraceParseError::Length,
            ),
            (
                "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                TraceParseError::Version,
            ),
            (
                "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
                TraceParseError::Format,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331-01",
                TraceParseError::Format,
            ),
            (
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                TraceParseError::ZeroId,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
                TraceParseError::ZeroId,
            ),
            (
                "0g-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                TraceParseError::Format,
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                TraceContext::parse_traceparent(input),
                Err(expected),
                "{input:?}"
            );
        }
    }

    #[test]
    fn future_versions_ignore_extra_fields() {
        let tc = TraceContext::parse_traceparent(&format!("01{}-what-ever", &VALID[2..])).unwrap();
        assert_eq!(tc.span_id_hex(), "b7ad6b7169203331");
        assert!(TraceContext::parse_traceparent(&format!("01{}x", &VALID[2..])).is_err());
    }

    #[test]
    fn multibyte_input_does_not_panic() {
        let weird = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333é-01";
        assert!(TraceContext::parse_traceparent(weird).is_err());
    }

    #[test]
    fn child_spans_keep_the_trace() {
        let root = TraceContext::new();
        let child = root.new_span();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.span_id(), root.span_id());
        assert_eq!(child.parent_span_id(), Some(root.span_id()));
    }

    #[test]
    fn inject_and_extract_case_insensitively() {
        let tc = TraceContext::parse_traceparent(VALID).unwrap().new_span();
        let mut headers = HeaderMap::new();
        tc.inject(&mut headers, TraceMode::Full);
        let back = TraceContext::extract(&headers).unwrap();
        assert_eq!(
            (back.trace_id(), back.span_id(), back.parent_span_id()),
            (tc.trace_id(), tc.span_id(), tc.parent_span_id())
        );

        let mut foreign = HeaderMap::new();
        foreign.insert("Traceparent", VALID);
        foreign.insert("TraceState", "vendor=1");
        let back = TraceContext::extract(&foreign).unwrap();
        assert_eq!(back.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(back.tracestate(), Some("vendor=1"));

        let mut fallback = HeaderMap::new();
        fallback.insert(TRACE_ID_HEADER, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(
            TraceContext::extract(&fallback).unwrap().trace_id_hex(),
            "0af7651916cd43dd8448eb211c80319c"
        );

        let mut w3c = HeaderMap::new();
        tc.inject(&mut w3c, TraceMode::W3c);
        assert!(w3c.get(TRACE_ID_HEADER).is_none() && w3c.get(TRACEPARENT_HEADER).is_some());
    }

    #[test]
    fn an_explicit_traceparent_is_not_overwritten() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT_HEADER, VALID);
        TraceContext::new().inject(&mut headers, TraceMode::Full);
        assert_eq!(
            headers.get(TRACEPARENT_HEADER).map(|v| v.as_str()),
            Some(VALID)
        );
    }

    #[tokio::test]
    async fn scope_sets_current() {
        assert!(current().is_none());
        let tc = TraceContext::new();
        let seen = scope(tc.clone(), async { current() }).await;
        assert_eq!(seen, Some(tc.clone()));
        // The spawned task outlives the scope and still sees the trace.
        let detached = scope(tc.clone(), async {
            spawn_detached(async { current() }).await
        })
        .await;
        assert_eq!(detached.unwrap(), Some(tc));
    }
}
