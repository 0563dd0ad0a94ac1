//! Property tests of the trace parser and header extraction: no input makes
//! them panic, and format/parse round-trips.

use natskit::HeaderMap;
use natskit::trace::{TraceContext, TraceMode};
use proptest::prelude::*;

proptest! {
    #[test]
    fn parse_never_panics(input in ".{0,80}") {
        let _ = TraceContext::parse_traceparent(&input);
    }

    #[test]
    fn parse_never_panics_on_near_misses(
        version in "[0-9a-fA-F]{2}",
        trace in "[0-9a-fA-F]{30,34}",
        span in "[0-9a-fA-F]{14,18}",
        flags in "[0-9a-fA-F]{1,3}",
        sep in "[-_ ]",
        tail in ".{0,8}",
    ) {
        let input = format!("{version}{sep}{trace}-{span}-{flags}{tail}");
        if let Ok(tc) = TraceContext::parse_traceparent(&input) {
            // Whatever parses formats back to a canonical version-00 value.
            prop_assert_eq!(tc.format_traceparent().len(), 55);
        }
    }

    #[test]
    fn format_then_parse_round_trips(trace in any::<[u8; 16]>(), span in any::<[u8; 8]>(), sampled in any::<bool>()) {
        prop_assume!(trace != [0; 16] && span != [0; 8]);
        let tc = TraceContext::from_parts(trace, span, None, sampled).expect("non-zero ids");
        let back = TraceContext::parse_traceparent(&tc.format_traceparent()).expect("own output parses");
        prop_assert_eq!(back.trace_id(), trace);
        prop_assert_eq!(back.span_id(), span);
        prop_assert_eq!(back.sampled(), sampled);
    }

    #[test]
    fn extraction_never_panics(headers in proptest::collection::vec(("[A-Za-z-]{1,20}", ".{0,70}"), 0..6)) {
        let mut map = HeaderMap::new();
        for (name, value) in &headers {
            if let (Ok(name), Ok(value)) = (
                name.parse::<async_nats::header::HeaderName>(),
                value.parse::<async_nats::header::HeaderValue>(),
            ) {
                map.insert(name, value);
            }
        }
        let _ = TraceContext::extract(&map);
    }

    #[test]
    fn inject_then_extract_keeps_ids(trace in any::<[u8; 16]>(), span in any::<[u8; 8]>(), parent in any::<[u8; 8]>()) {
        prop_assume!(trace != [0; 16] && span != [0; 8] && parent != [0; 8]);
        let tc = TraceContext::from_parts(trace, span, Some(parent), true).expect("non-zero ids");
        let mut headers = HeaderMap::new();
        tc.inject(&mut headers, TraceMode::Full);
        let back = TraceContext::extract(&headers).expect("extracts");
        prop_assert_eq!((back.trace_id(), back.span_id(), back.parent_span_id()), (trace, span, Some(parent)));
    }
}
