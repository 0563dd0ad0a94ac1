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
//! `traceparent` alone; [`TraceMode::Off`] writes nothing (headers cost
//! throughput: about 3x fewer messages per second on this machine).
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

use std::fmt;
use std::future::Future;

use async_nats::HeaderMap;

/// The W3C header.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// The W3C vendor state header, passed through untouched.
pub const TRACESTATE_HEADER: &str = "tracestate";
/// Simplified trace id header (reference name).
pub const TRACE_ID_HEADER: &str = "X-Trace-ID";
/// Simplified span id header (reference name).
pub const SPAN_ID_HEADER: &str = "X-Span-ID";
/// Parent span id header (reference name).
pub const PARENT_SPAN_HEADER: &str = "X-Parent-Span-ID";

/// Which trace headers a client writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TraceMode {
    /// `traceparent` plus the `X-Trace-ID`, `X-Span-ID`,
    /// `X-Parent-Span-ID` (default).
    #[default]
    Full,
    /// `traceparent` (and `tracestate`) only.
    W3c,
    /// No trace headers.
    Off,
}

/// Why a `traceparent` value was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TraceParseError {
    /// Too short, or longer than version 00 allows.
    #[error("traceparent has the wrong length")]
    Length,
    /// A field is not lowercase hex of the right size, or a separator is missing.
    #[error("traceparent is malformed")]
    Format,
    /// Version `ff` is forbidden.
    #[error("traceparent version ff is invalid")]
    Version,
    /// The trace id or the span id is all zeros.
    #[error("traceparent has an all-zero id")]
    ZeroId,
}

/// A position in a distributed trace.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent_span_id: Option<[u8; 8]>,
    sampled: bool,
    tracestate: Option<String>,
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("trace_id", &hex(&self.trace_id))
            .field("span_id", &hex(&self.span_id))
            .field(
                "parent_span_id",
                &self.parent_span_id.as_ref().map(|p| hex(p)),
            )
            .field("sampled", &self.sampled)
            .finish()
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.format_traceparent())
    }
}

fn nonzero<const N: usize>(mut fill: impl FnMut() -> u64) -> [u8; N] {
    let mut out = [0u8; N];
    while out.iter().all(|b| *b == 0) {
        for chunk in out.chunks_mut(8) {
            let bytes = fill().to_be_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
    out
}

fn random_u64() -> u64 {
    fastrand::u64(..)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0x0f)] as char);
    }
    out
}

/// Parses exactly `N` bytes of lowercase hex.
fn unhex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

impl TraceContext {
    /// A new root trace: random trace and span ids, sampled.
    pub fn new() -> Self {
        Self {
            trace_id: nonzero(random_u64),
            span_id: nonzero(random_u64),
            parent_span_id: None,
            sampled: true,
            tracestate: None,
        }
    }

    /// A child span: same trace, new span id, this span as parent.
    pub fn new_span(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            span_id: nonzero(random_u64),
            parent_span_id: Some(self.span_id),
            sampled: self.sampled,
            tracestate: self.tracestate.clone(),
        }
    }

    /// The trace id.
    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The span id.
    pub fn span_id(&self) -> [u8; 8] {
        self.span_id
    }

    /// The parent span id, for a child span.
    pub fn parent_span_id(&self) -> Option<[u8; 8]> {
        self.parent_span_id
    }

    /// Whether the trace is sampled.
    pub fn sampled(&self) -> bool {
        self.sampled
    }

    /// The `tracestate` received with this trace, untouched.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }

    /// The parent span id as 16 lowercase hex digits, if there is one.
    pub fn parent_span_id_hex(&self) -> Option<String> {
        self.parent_span_id.as_ref().map(|p| hex(p))
    }

    /// Builds a context from raw parts; `None` if an id is all zeros.
    pub fn from_parts(
        trace_id: [u8; 16],
        span_id: [u8; 8],
        parent_span_id: Option<[u8; 8]>,
        sampled: bool,
    ) -> Option<Self> {
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            parent_span_id: parent_span_id.filter(|p| *p != [0; 8]),
            sampled,
            tracestate: None,
        })
    }

    /// Parses a W3C `traceparent` header value
    /// (`version-traceid-parentid-flags`). Version 00 must be exactly 55
    /// characters; a higher version may carry more fields after the flags,
    /// which are ignored, as the specification requires.
    ///
    /// ```
    /// use natskit::trace::TraceContext;
    /// let tc = TraceContext::parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
    /// assert!(tc.sampled());
    /// assert!(TraceContext::parse_traceparent("00-00000000000000000000000000000000-b7ad6b7169203331-01").is_err());
    /// ```
    ///
    /// # Errors
    /// [`TraceParseError`] naming what is wrong; never panics.
    pub fn parse_traceparent(value: &str) -> Result<Self, TraceParseError> {
        let b = value.trim().as_bytes();
        if b.len() < 55 {
            return Err(TraceParseError::Length);
        }
        let version = unhex::<1>(&b[0..2]).ok_or(TraceParseError::Format)?[0];
        if version == 0xff {
            return Err(TraceParseError::Version);
        }
        if (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
            return Err(TraceParseError::Length);
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return Err(TraceParseError::Format);
        }
        let trace_id = unhex::<16>(&b[3..35]).ok_or(TraceParseError::Format)?;
        let span_id = unhex::<8>(&b[36..52]).ok_or(TraceParseError::Format)?;
        let flags = unhex::<1>(&b[53..55]).ok_or(TraceParseError::Format)?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return Err(TraceParseError::ZeroId);
        }
        Ok(Self {
            trace_id,
            span_id,
            parent_span_id: None,
            sampled: flags & 1 == 1,
            tracestate: None,
        })
    }

    /// Formats the `traceparent` value (version 00).
    pub fn format_traceparent(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        out.push_str(&hex(&self.trace_id));
        out.push('-');
        out.push_str(&hex(&self.span_id));
        out.push_str(if self.sampled { "-01" } else { "-00" });
        out
    }

    /// Writes this context into `headers` in `mode`. A `traceparent`
    /// already present (an explicit per-call trace) is left alone.
    pub fn inject(&self, headers: &mut HeaderMap, mode: TraceMode) {
        if mode == TraceMode::Off || header(headers, TRACEPARENT_HEADER).is_some() {
            return;
        }
        headers.insert(TRACEPARENT_HEADER, self.format_traceparent().as_str());
        if let Some(state) = &self.tracestate {
            headers.insert(
                TRACESTATE_HEADER,
                crate::header::sanitize_value(state).as_ref(),
            );
        }
        if mode == TraceMode::Full {
            headers.insert(TRACE_ID_HEADER, hex(&self.trace_id).as_str());
            headers.insert(SPAN_ID_HEADER, hex(&self.span_id).as_str());
            if let Some(parent) = &self.parent_span_id {
                headers.insert(PARENT_SPAN_HEADER, hex(parent).as_str());
            }
        }
    }

    /// Reads a context from message headers, matching names without regard
    /// to case. A valid `traceparent` wins (its parent comes from
    /// `X-Parent-Span-ID`); otherwise `X-Trace-ID` with `X-Span-ID` (a
    /// random span id when that is missing). `tracestate` is kept as is.
    pub fn extract(headers: &HeaderMap) -> Option<Self> {
        let parent =
            header(headers, PARENT_SPAN_HEADER).and_then(|p| unhex::<8>(p.trim().as_bytes()));
        let mut tc = match header(headers, TRACEPARENT_HEADER)
            .and_then(|v| Self::parse_traceparent(v).ok())
        {
            Some(tc) => tc,
            None => {
                let trace_id = unhex::<16>(header(headers, TRACE_ID_HEADER)?.trim().as_bytes())?;
                let span_id = header(headers, SPAN_ID_HEADER)
                    .and_then(|s| unhex::<8>(s.trim().as_bytes()))
                    .unwrap_or_else(|| nonzero(random_u64));
                Self::from_parts(trace_id, span_id, None, true)?
            }
        };
        tc.parent_span_id = parent.filter(|p| *p != [0; 8]);
        tc.tracestate = header(headers, TRACESTATE_HEADER).map(str::to_owned);
        Some(tc)
    }
}

impl Default for TraceContext {
    fn default() -> Self {
        Self::new()
    }
}

/// A header value by case-insensitive name.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    if let Some(value) = headers.get(name) {
        return Some(value.as_str());
    }
    headers
        .iter()
        .find(|(key, _)| AsRef::<str>::as_ref(key).eq_ignore_ascii_case(name))
        .and_then(|(_, values)| values.first())
        .map(|v| v.as_str())
}

/// A trace in scope, with the headers it puts on outgoing messages,
/// encoded once per scope and mode: every publish in the scope carries the
/// same span, so building four header values per message bought nothing
/// (it cost 1.9x the allocations of cloning a prebuilt map).
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
    pub(crate) fn from_headers(headers: Option<&HeaderMap>) -> Self {
        Self {
            span: handler_span(headers),
            #[cfg(feature = "opentelemetry")]
            otel: headers.map(otel::extract_context),
        }
    }

    /// Not an `async fn`, so the future is not kept twice (see
    /// `handler::invoke`).
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
            if crate::header::validate_name(key).is_ok() {
                self.0
                    .insert(key, crate::header::sanitize_value(&value).as_ref());
            }
        }
    }

    /// Reads propagator fields from NATS headers (names matched without case).
    #[derive(Debug)]
    pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

    impl Extractor for HeaderExtractor<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            super::header(self.0, key)
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
