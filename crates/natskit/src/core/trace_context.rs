//! W3C Trace Context as data: ids, parsing and formatting, headers in and
//! out. Pure; the task-local scope that carries it is `crate::trace`.

use std::fmt;

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
                crate::core::header::sanitize_value(state).as_ref(),
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
pub(crate) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    if let Some(value) = headers.get(name) {
        return Some(value.as_str());
    }
    headers
        .iter()
        .find(|(key, _)| AsRef::<str>::as_ref(key).eq_ignore_ascii_case(name))
        .and_then(|(_, values)| values.first())
        .map(|v| v.as_str())
}
