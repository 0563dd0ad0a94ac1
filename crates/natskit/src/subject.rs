//! Subject checks: pure functions over strings, no I/O.
//!
//! A subject is a non-empty list of `.`-separated tokens with no empty
//! tokens and no whitespace. `*` (one token) and `>` (the rest, last token
//! only) are wildcards, allowed when subscribing, never when publishing.

use crate::error::Error;

fn invalid(subject: &str, reason: &'static str) -> Error {
    Error::InvalidSubject {
        subject: subject.to_owned(),
        reason,
    }
}

fn check_tokens(subject: &str, wildcards: bool) -> Result<(), Error> {
    if subject.is_empty() {
        return Err(invalid(subject, "empty subject"));
    }
    if subject.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(invalid(subject, "contains whitespace"));
    }
    let mut tokens = subject.split('.').peekable();
    while let Some(token) = tokens.next() {
        match token {
            "" => {
                return Err(invalid(
                    subject,
                    "empty token (leading, trailing or double '.')",
                ));
            }
            "*" | ">" if !wildcards => {
                return Err(invalid(
                    subject,
                    "wildcards are not allowed when publishing",
                ));
            }
            ">" if tokens.peek().is_some() => {
                return Err(invalid(subject, "'>' must be the last token"));
            }
            _ => {}
        }
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
    fn queue_rules() {
        assert!(validate_queue("workers").is_ok());
        assert!(validate_queue("").is_err());
        assert!(validate_queue("a b").is_err());
    }
}
