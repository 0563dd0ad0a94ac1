//! Subjects: pure checks over strings (no I/O), and typed subjects
//! ([`Subject`]) that bind a pattern to a payload type and a [`Codec`].
//!
//! A subject is a non-empty list of `.`-separated tokens with no empty
//! tokens and no whitespace. `*` (one token) and `>` (the rest, last token
//! only) are wildcards, allowed when subscribing, never when publishing.

use crate::error::Error;

mod typed;
#[cfg(feature = "msgpack")]
pub use typed::MsgPackCodec;
pub use typed::{Codec, ErrorHook, JsonCodec, Subject};

fn invalid(subject: &str, reason: &'static str) -> Error {
    Error::InvalidSubject {
        subject: subject.to_owned(),
        reason,
    }
}

/// One pass over the bytes; allocates only to report an error.
fn check_tokens(subject: &str, wildcards: bool) -> Result<(), Error> {
    let bytes = subject.as_bytes();
    if bytes.is_empty() {
        return Err(invalid(subject, "empty subject"));
    }
    // Length and first byte of the current token.
    let mut len = 0usize;
    let mut first = 0u8;
    let mut after_full_wildcard = false;
    for &b in bytes {
        match b {
            b'.' => {
                if len == 0 {
                    return Err(invalid(
                        subject,
                        "empty token (leading, trailing or double '.')",
                    ));
                }
                if len == 1 && (first == b'*' || first == b'>') {
                    if !wildcards {
                        return Err(invalid(
                            subject,
                            "wildcards are not allowed when publishing",
                        ));
                    }
                    after_full_wildcard = first == b'>';
                }
                if after_full_wildcard && !(len == 1 && first == b'>') {
                    return Err(invalid(subject, "'>' must be the last token"));
                }
                len = 0;
            }
            b' ' | b'\t' | b'\r' | b'\n' | 0x0b | 0x0c => {
                return Err(invalid(subject, "contains whitespace"));
            }
            _ => {
                if after_full_wildcard {
                    return Err(invalid(subject, "'>' must be the last token"));
                }
                if len == 0 {
                    first = b;
                }
                len += 1;
            }
        }
    }
    if len == 0 {
        return Err(invalid(
            subject,
            "empty token (leading, trailing or double '.')",
        ));
    }
    if !wildcards && len == 1 && (first == b'*' || first == b'>') {
        return Err(invalid(
            subject,
            "wildcards are not allowed when publishing",
        ));
    }
    Ok(())
}

/// Checks a subject to publish or request on: no wildcards.
///
/// ```
/// use natskit::subject::validate_publish;
/// assert!(validate_publish("orders.eu.created").is_ok());
/// assert!(validate_publish("orders.*").unwrap_err().is_invalid_input());
/// assert!(validate_publish("orders..x").is_err());
/// assert!(validate_publish("with space").is_err());
/// ```
///
/// # Errors
/// [`Error::InvalidSubject`] naming the reason.
#[inline]
pub fn validate_publish(subject: &str) -> Result<(), Error> {
    check_tokens(subject, false)
}

/// Checks a subject to subscribe to: wildcards allowed, `>` only last.
///
/// ```
/// use natskit::subject::validate_subscribe;
/// assert!(validate_subscribe("orders.*.created").is_ok());
/// assert!(validate_subscribe("orders.>").is_ok());
/// assert!(validate_subscribe("orders.>.x").is_err());
/// ```
///
/// # Errors
/// [`Error::InvalidSubject`] naming the reason.
pub fn validate_subscribe(subject: &str) -> Result<(), Error> {
    check_tokens(subject, true)
}

/// Checks a queue group name: non-empty, no whitespace.
///
/// # Errors
/// [`Error::InvalidSubject`] naming the reason.
pub fn validate_queue(queue: &str) -> Result<(), Error> {
    if queue.is_empty() || queue.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(invalid(
            queue,
            "queue group must be non-empty without whitespace",
        ));
    }
    Ok(())
}

/// Checks a stream, consumer or bucket name: non-empty, at most 255 bytes,
/// none of whitespace, `.`, `*`, `>`, `/`, `\\`.
///
/// ```
/// use natskit::subject::validate_name;
/// assert!(validate_name("stream", "ORDERS_v2").is_ok());
/// assert!(validate_name("stream", "orders.v2").is_err());
/// ```
///
/// # Errors
/// [`Error::InvalidName`] naming the reason.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > 255 {
        "longer than 255 bytes"
    } else if name.bytes().any(|b| {
        b.is_ascii_whitespace()
            || b.is_ascii_control()
            || matches!(b, b'.' | b'*' | b'>' | b'/' | b'\\')
    }) {
        "contains whitespace or one of . * > / \\"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        what,
        name: name.to_owned(),
        reason,
    })
}

/// Checks a KV key: non-empty, only `A-Z a-z 0-9 - _ / = .`, no empty
/// `.`-separated token, not starting with `_kv`.
///
/// ```
/// use natskit::subject::validate_key;
/// assert!(validate_key("entity.sensor.t1").is_ok());
/// assert!(validate_key("bad key").is_err());
/// assert!(validate_key("a..b").is_err());
/// ```
///
/// # Errors
/// [`Error::InvalidKey`] naming the reason.
pub fn validate_key(key: &str) -> Result<(), Error> {
    let reason = if key.is_empty() {
        "empty"
    } else if key.starts_with('.') || key.ends_with('.') || key.contains("..") {
        "empty token (leading, trailing or double '.')"
    } else if key.starts_with("_kv") {
        "keys starting with _kv are reserved"
    } else if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/' | b'=' | b'.'))
    {
        "only A-Z a-z 0-9 - _ / = . are allowed"
    } else {
        return Ok(());
    };
    Err(Error::InvalidKey {
        key: key.to_owned(),
        reason,
    })
}

/// Whether subject `subject` (possibly with wildcards) is matched by
/// `pattern`: every subject `subject` can match is also matched by
/// `pattern`.
///
/// ```
/// use natskit::subject::covers;
/// assert!(covers("orders.>", "orders.eu.created"));
/// assert!(covers("orders.*.created", "orders.eu.created"));
/// assert!(covers("orders.>", "orders.*"));
/// assert!(!covers("orders.*", "orders.eu.created"));
/// assert!(!covers("orders.*", "orders.>"));
/// ```
pub fn covers(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(pt), Some(st)) if pt == st => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_rules() {
        for ok in ["a", "a.b.c", "A-b_c.123", "$JS.API.INFO", "_INBOX.x"] {
            assert!(validate_publish(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", " ", "a b", "a\tb", "a.", ".a", "a..b", "a.*", "a.>", "*", ">", "a.b\n",
        ] {
            assert!(validate_publish(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn subscribe_rules() {
        for ok in ["a.*", "a.>", "*", ">", "*.b.>", "a.b"] {
            assert!(validate_subscribe(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a.>.b", "> .a", "a..b", "a."] {
            assert!(validate_subscribe(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn name_rules() {
        assert!(validate_name("stream", "A-b_1").is_ok());
        for bad in [
            "",
            "a b",
            "a.b",
            "a*",
            "a>",
            "a/b",
            "a\\b",
            &"x".repeat(256),
        ] {
            assert!(validate_name("stream", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn coverage() {
        assert!(covers(">", "a.b.c"));
        assert!(covers("a.b", "a.b"));
        assert!(!covers("a.b", "a.b.c"));
        assert!(!covers("a.b.c", "a.b"));
        assert!(covers("a.*.c", "a.*.c"));
        assert!(!covers("a.b.c", "a.*.c"));
    }

    #[test]
    fn queue_rules() {
        assert!(validate_queue("workers").is_ok());
        assert!(validate_queue("").is_err());
        assert!(validate_queue("a b").is_err());
    }
}
