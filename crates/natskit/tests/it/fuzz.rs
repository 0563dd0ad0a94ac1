//! Fuzzing of every parser and validator natskit runs on untrusted input:
//! subject, queue, key, name and header checks, header sanitising,
//! traceparent and X-Trace-ID extraction, subject templates and codec
//! decoding. No input may panic or hang, and what a check accepts must be
//! safe to send (no control character or Unicode whitespace, within the
//! protocol line).
//!
//! Each target runs random inputs for `FUZZ_SECONDS` seconds (default 0.3 s
//! in `make test`; `make fuzz` runs each for 20 s), with proptest's
//! generators and shrinking, so a failure prints its smallest input.

use std::time::{Duration, Instant};

use natskit::subject::{self, MAX_SUBJECT_LEN};
use natskit::trace::TraceContext;
use natskit::{Codec, HeaderMap, JsonCodec, TypedSubject, header};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

fn budget() -> Duration {
    std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(Duration::from_millis(300), Duration::from_secs_f64)
}

/// Runs `check` on inputs from `strategy` until the time budget is spent.
fn fuzz<S: Strategy>(
    name: &str,
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let deadline = Instant::now() + budget();
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::default()
    });
    let mut cases = 0u64;
    while Instant::now() < deadline {
        let tree = strategy
            .new_tree(&mut runner)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Err(TestCaseError::Fail(reason)) = check(tree.current()) {
            // Shrink to the smallest failing input through proptest.
            let outcome = runner.run(&strategy, &check);
            panic!("{name}: {reason}; minimal failing input: {outcome:?}");
        }
        cases += 1;
    }
    println!("{name}: {cases} inputs");
}

/// Text with the characters that break protocols: controls, Unicode
/// whitespace, wildcards, dots, and long runs.
fn hostile_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-z0-9]{1,8}",
        Just(".".to_owned()),
        Just("*".to_owned()),
        Just(">".to_owned()),
        Just("\u{0}".to_owned()),
        Just("\u{7f}".to_owned()),
        Just("\u{a0}".to_owned()),
        Just("\u{2028}".to_owned()),
        Just("\r\n".to_owned()),
        Just(" ".to_owned()),
        Just("\t".to_owned()),
        Just(":".to_owned()),
        "\\PC{1,4}",
        "[a]{100,5000}",
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|parts| parts.concat())
}

fn safe_to_send(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_SUBJECT_LEN
        && !text.chars().any(|c| c.is_control() || c.is_whitespace())
}

#[test]
fn subject_checks_accept_only_safe_subjects() {
    fuzz("subjects", hostile_text(), |text| {
        if subject::validate_publish(&text).is_ok() {
            prop_assert!(safe_to_send(&text), "accepted {text:?}");
            prop_assert!(!text.split('.').any(|t| t == "*" || t == ">"));
            prop_assert!(subject::validate_subscribe(&text).is_ok());
        }
        if subject::validate_subscribe(&text).is_ok() {
            prop_assert!(safe_to_send(&text), "accepted {text:?}");
            prop_assert!(!text.split('.').any(str::is_empty));
        }
        if subject::validate_queue(&text).is_ok() {
            prop_assert!(safe_to_send(&text) && text.len() <= subject::MAX_QUEUE_LEN);
        }
        if subject::validate_key(&text).is_ok() {
            prop_assert!(text.len() <= subject::MAX_KEY_LEN);
            prop_assert!(text.is_ascii() && safe_to_send(&text));
        }
        let _ = subject::validate_name("stream", &text);
        Ok(())
    });
}

#[test]
fn header_checks_and_sanitising() {
    fuzz(
        "headers",
        (hostile_text(), hostile_text()),
        |(name, value)| {
            let clean = header::sanitize_value(&value);
            prop_assert!(header::validate_value("x", &clean).is_ok());
            // What the checks accept, async-nats takes without panicking.
            if header::validate_name(&name).is_ok() && header::validate_value(&name, &value).is_ok()
            {
                let mut headers = HeaderMap::new();
                headers.insert(name.as_str(), value.as_str());
                prop_assert!(header::validate(&headers).is_ok());
            }
            Ok(())
        },
    );
}

#[test]
fn trace_extraction_never_panics() {
    let fields = proptest::collection::vec(
        (
            prop_oneof![
                Just("traceparent".to_owned()),
                Just("tracestate".to_owned()),
                Just("X-Trace-ID".to_owned()),
                Just("X-Span-ID".to_owned()),
                Just("X-Parent-Span-ID".to_owned()),
                "[A-Za-z-]{1,12}",
            ],
            prop_oneof![
                "[0-9a-f-]{0,80}",
                "00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]",
                "\\PC{0,60}",
            ],
        ),
        0..6,
    );
    fuzz("trace", fields, |fields| {
        let mut headers = HeaderMap::new();
        for (name, value) in &fields {
            let _ = TraceContext::parse_traceparent(value);
            if header::validate_name(name).is_ok() && header::validate_value(name, value).is_ok() {
                headers.insert(name.as_str(), value.as_str());
            }
        }
        if let Some(trace) = TraceContext::extract(&headers) {
            // Whatever is extracted can be written back out safely.
            let mut out = HeaderMap::new();
            trace.inject(&mut out, natskit::trace::TraceMode::Full);
            prop_assert!(header::validate(&out).is_ok());
        }
        Ok(())
    });
}

#[test]
fn subject_templates_never_panic() {
    fuzz(
        "templates",
        (hostile_text(), hostile_text(), hostile_text()),
        |(pattern, token, value)| {
            if let Ok(typed) = TypedSubject::<serde_json::Value>::new(&pattern) {
                prop_assert!(subject::validate_subscribe(typed.wildcard()).is_ok());
                if let Ok(filled) = typed.fill(&[(token.as_str(), value.as_str())]) {
                    prop_assert!(subject::validate_publish(&filled).is_ok(), "{filled:?}");
                }
            }
            Ok(())
        },
    );
}

#[test]
fn codecs_decode_anything_without_panicking() {
    let bytes = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        // Deep nesting, the classic stack overflow.
        (1usize..5000).prop_map(|n| {
            let mut b = vec![b'['; n];
            b.extend(std::iter::repeat_n(b']', n));
            b
        }),
        (1usize..5000).prop_map(|n| {
            let mut b = vec![0x91; n];
            b.push(0xc0);
            b
        }),
    ];
    fuzz("codecs", bytes, |bytes| {
        let _ = <JsonCodec as Codec<serde_json::Value>>::decode(&JsonCodec, &bytes);
        #[cfg(feature = "msgpack")]
        let _ = <natskit::MsgPackCodec as Codec<serde_json::Value>>::decode(
            &natskit::MsgPackCodec,
            &bytes,
        );
        Ok(())
    });
}
