//! Pure checks and clean-up of message headers: no I/O.
//!
//! async-nats panics when a header value holding `\r` or `\n`, or a name
//! holding a control character, a space or `:`, is inserted, and a peer's
//! parser drops the connection on a malformed header line. natskit checks
//! the headers a caller hands it ([`Error::InvalidHeader`]) and cleans the
//! values it writes itself ([`sanitize_value`]).

use std::borrow::Cow;

use async_nats::HeaderMap;

use crate::core::error::Error;
use crate::core::subject::shorten;

/// Header naming a service error in a reply (NATS micro convention).
pub const SERVICE_ERROR_HEADER: &str = "Nats-Service-Error";
/// Header carrying a service error code in a reply.
pub const SERVICE_ERROR_CODE_HEADER: &str = "Nats-Service-Error-Code";

/// Longest header name accepted, in bytes.
pub const MAX_HEADER_NAME_LEN: usize = 256;

fn invalid(name: &str, reason: &'static str) -> Error {
    Error::InvalidHeader {
        name: shorten(name),
        reason,
    }
}

/// Checks one header name: non-empty, at most [`MAX_HEADER_NAME_LEN`]
/// bytes, printable ASCII without spaces or `:`.
///
/// ```
/// use natskit::header::validate_name;
/// assert!(validate_name("X-Order-Id").is_ok());
/// assert!(validate_name("").is_err());
/// assert!(validate_name("bad name").is_err());
/// assert!(validate_name("a:b").is_err());
/// ```
///
/// # Errors
/// [`Error::InvalidHeader`] naming the reason.
pub fn validate_name(name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(invalid(name, "empty header name"));
    }
    if name.len() > MAX_HEADER_NAME_LEN {
        return Err(invalid(name, "header name longer than 256 bytes"));
    }
    if name.bytes().any(|b| !b.is_ascii_graphic() || b == b':') {
        return Err(invalid(
            name,
            "header names are printable ASCII without spaces or ':'",
        ));
    }
    Ok(())
}

/// Checks one header value a caller supplies: no `\r`, `\n` or other
/// control character (a tab is allowed).
///
/// ```
/// use natskit::header::validate_value;
/// assert!(validate_value("Nats-Msg-Id", "order-42").is_ok());
/// assert!(validate_value("Nats-Msg-Id", "a\r\nb").is_err());
/// ```
///
/// # Errors
/// [`Error::InvalidHeader`] naming the header.
pub fn validate_value(name: &str, value: &str) -> Result<(), Error> {
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(invalid(
            name,
            "header value contains a line break or control character",
        ));
    }
    Ok(())
}

/// Checks every header of a map a caller supplies.
///
/// # Errors
/// [`Error::InvalidHeader`] for the first bad name or value.
pub fn validate(headers: &HeaderMap) -> Result<(), Error> {
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        validate_name(name)?;
        for value in values {
            validate_value(name, value.as_str())?;
        }
    }
    Ok(())
}

/// A header value natskit writes itself (a service error message, say):
/// line breaks and other control characters become spaces, so the value
/// can never break the header block.
///
/// ```
/// use natskit::header::sanitize_value;
/// assert_eq!(sanitize_value("line one\r\nline two"), "line one  line two");
/// assert_eq!(sanitize_value("fine"), "fine");
/// ```
pub fn sanitize_value(value: &str) -> Cow<'_, str> {
    if value.chars().any(|c| c.is_control() && c != '\t') {
        Cow::Owned(
            value
                .chars()
                .map(|c| if c.is_control() && c != '\t' { ' ' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_with_bad_names_are_rejected() {
        let mut headers = HeaderMap::new();
        headers.insert("Good", "value");
        assert!(validate(&headers).is_ok());
        let empty: async_nats::header::HeaderName = "".parse().expect("async-nats accepts it");
        headers.insert(empty, "value");
        let err = validate(&headers).unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
    }

    #[test]
    fn sanitized_values_are_always_valid() {
        for text in ["a\rb", "\n", "x\u{0}y", "tab\tkept", "\u{85}next line"] {
            let clean = sanitize_value(text);
            assert!(validate_value("n", &clean).is_ok(), "{clean:?}");
            assert_eq!(clean.chars().count(), text.chars().count());
        }
    }
}
