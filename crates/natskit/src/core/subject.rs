//! Subjects: pure checks over strings (no I/O). Typed subjects, which bind
//! a pattern to a payload type and a codec, are [`crate::TypedSubject`].
//!
//! A subject is a non-empty list of `.`-separated tokens with no empty
//! tokens, no whitespace (ASCII or Unicode) and no control characters, at
//! most [`MAX_SUBJECT_LEN`] bytes. `*` (one token) and `>` (the rest, last
//! token only) are wildcards, allowed when subscribing, never when
//! publishing.
//!
//! The lengths keep every protocol line natskit sends within the server's
//! 4,096-byte control-line limit (a longer line makes the server drop the
//! connection, with the messages in flight): a subject with a reply inbox
//! (`HPUB`), or with a queue group (`SUB`), plus the rest of the line.

use crate::core::error::Error;

/// What natskit accepts as a subject: string literals (used without a
/// copy), `String`, `&String`, [`async_nats::Subject`] and `&Subject`.
///
/// A borrowed `&str` that is not `'static` needs `.to_owned()`: accepting
/// every `&str` would copy string literals too, on every publish (the hot
/// path raw async-nats keeps copy-free for them).
///
/// ```
/// use natskit::subject::IntoSubject;
/// let name = String::from("orders.created");
/// assert_eq!(&*(&name).into_subject(), "orders.created"); // no clone needed
/// assert_eq!(&*"orders.created".into_subject(), "orders.created");
/// ```
pub trait IntoSubject {
    /// The subject.
    fn into_subject(self) -> async_nats::Subject;
}

impl IntoSubject for &'static str {
    #[inline]
    fn into_subject(self) -> async_nats::Subject {
        async_nats::Subject::from_static(self)
    }
}

impl IntoSubject for String {
    #[inline]
    fn into_subject(self) -> async_nats::Subject {
        async_nats::Subject::from(self)
    }
}

impl IntoSubject for &String {
    #[inline]
    fn into_subject(self) -> async_nats::Subject {
        async_nats::Subject::from(self.as_str())
    }
}

impl IntoSubject for async_nats::Subject {
    #[inline]
    fn into_subject(self) -> async_nats::Subject {
        self
    }
}

impl IntoSubject for &async_nats::Subject {
    #[inline]
    fn into_subject(self) -> async_nats::Subject {
        self.clone()
    }
}

/// Longest subject accepted, in bytes.
pub const MAX_SUBJECT_LEN: usize = 3072;
/// Longest queue group name accepted, in bytes.
pub const MAX_QUEUE_LEN: usize = 512;
/// Longest KV key accepted, in bytes (the key goes into a subject after the
/// bucket's prefix).
pub const MAX_KEY_LEN: usize = 2048;

// The longest lines natskit can send fit in the server's 4,096 bytes,
// checked at compile time: "SUB <subject> <queue> <sid>\r\n" and
// "HPUB <subject> <inbox up to 128> <header bytes> <total bytes>\r\n".
const _: () = assert!(4 + MAX_SUBJECT_LEN + 1 + MAX_QUEUE_LEN + 1 + 20 + 2 <= 4096);
const _: () = assert!(5 + MAX_SUBJECT_LEN + 1 + 128 + 1 + 10 + 1 + 10 + 2 <= 4096);
const _: () = assert!(4 + 256 + 1 + MAX_KEY_LEN <= MAX_SUBJECT_LEN);

/// `text` for an error message: at most 128 bytes of it, cut on a character
/// boundary, with the full length when cut.
pub(crate) fn shorten(text: &str) -> String {
    const KEEP: usize = 128;
    if text.len() <= KEEP {
        return text.to_owned();
    }
    let mut end = KEEP;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}

fn invalid(subject: &str, reason: &'static str) -> Error {
    Error::InvalidSubject {
        subject: shorten(subject),
        reason,
    }
}

/// Whether `text` holds a character no subject, queue or header may hold:
/// an ASCII or Unicode control character or Unicode whitespace (ASCII
/// whitespace is checked by the callers, with its own message).
fn has_forbidden_char(text: &str) -> bool {
    text.bytes().any(|b| b < 0x20 || b == 0x7f)
        || (!text.is_ascii() && text.chars().any(|c| c.is_control() || c.is_whitespace()))
}

/// How [`plain_subject`] sees a byte.
const PLAIN: u8 = 0;
const DOT: u8 = 1;
/// Anything the fast path leaves to the full check: whitespace, control
/// characters, DEL, wildcard characters, non-ASCII.
const OTHER: u8 = 2;

const CLASS: [u8; 256] = {
    let mut class = [PLAIN; 256];
    let mut b = 0;
    while b < 256 {
        if b < 0x21 || b >= 0x7f || b == b'*' as usize || b == b'>' as usize {
            class[b] = OTHER;
        }
        b += 1;
    }
    class[b'.' as usize] = DOT;
    class
};

/// The common case in one tight pass: printable ASCII without wildcard
/// characters, tokens not empty, within the length limit. `false` sends the
/// subject to the full check, which gives the reason (or accepts it).
#[inline]
fn plain_subject(bytes: &[u8]) -> bool {
    if bytes.is_empty() || bytes.len() > MAX_SUBJECT_LEN {
        return false;
    }
    let mut after_dot = true;
    for &b in bytes {
        match CLASS[b as usize] {
            PLAIN => after_dot = false,
            DOT if !after_dot => after_dot = true,
            _ => return false,
        }
    }
    !after_dot
}

/// One pass over the bytes; allocates only to report an error.
#[inline]
fn check_tokens(subject: &str, wildcards: bool) -> Result<(), Error> {
    if plain_subject(subject.as_bytes()) {
        return Ok(());
    }
    check_tokens_fully(subject, wildcards)
}

#[cold]
fn check_tokens_fully(subject: &str, wildcards: bool) -> Result<(), Error> {
    let bytes = subject.as_bytes();
    if bytes.is_empty() {
        return Err(invalid(subject, "empty subject"));
    }
    if bytes.len() > MAX_SUBJECT_LEN {
        return Err(invalid(
            subject,
            "longer than 3072 bytes (MAX_SUBJECT_LEN; the server's protocol line limit is 4096)",
        ));
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
    if has_forbidden_char(subject) {
        return Err(invalid(
            subject,
            "contains a control character or Unicode whitespace",
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

/// Checks a queue group name: non-empty, at most [`MAX_QUEUE_LEN`] bytes,
/// no whitespace (ASCII or Unicode), no control characters.
///
/// ```
/// use natskit::subject::validate_queue;
/// assert!(validate_queue("workers").is_ok());
/// assert!(validate_queue("two words").is_err());
/// assert!(validate_queue("nbsp\u{a0}inside").is_err());
/// ```
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
    if queue.len() > MAX_QUEUE_LEN {
        return Err(invalid(
            queue,
            "queue group longer than 512 bytes (MAX_QUEUE_LEN)",
        ));
    }
    if has_forbidden_char(queue) {
        return Err(invalid(
            queue,
            "queue group contains a control character or Unicode whitespace",
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
    }) || has_forbidden_char(name)
    {
        "contains whitespace, a control character or one of . * > / \\"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        what,
        name: shorten(name),
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
    } else if key.len() > MAX_KEY_LEN {
        "longer than 2048 bytes (MAX_KEY_LEN)"
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
        key: shorten(key),
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

/// The JetStream API prefix of `domain`: `$JS.<domain>.API`.
///
/// # Errors
/// [`Error::InvalidConfig`] for an empty domain or one with anything but
/// letters, digits, `-` and `_` (it is one token of every API subject).
pub(crate) fn domain_api_prefix(domain: &str) -> Result<String, Error> {
    if domain.is_empty()
        || !domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::InvalidConfig(format!(
            "JetStream domain {:?}: only A-Z a-z 0-9 - _ are allowed",
            shorten(domain)
        )));
    }
    Ok(format!("$JS.{domain}.API"))
}

/// Checks a JetStream API prefix: a subject without wildcards.
///
/// # Errors
/// [`Error::InvalidConfig`] naming the reason.
pub(crate) fn check_api_prefix(prefix: &str) -> Result<String, Error> {
    validate_publish(prefix).map_err(|e| {
        Error::InvalidConfig(format!("JetStream API prefix {:?}: {e}", shorten(prefix)))
    })?;
    Ok(prefix.to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn jetstream_domains_and_prefixes_are_checked() {
        assert_eq!(
            domain_api_prefix("hub").ok().as_deref(),
            Some("$JS.hub.API")
        );
        assert_eq!(
            domain_api_prefix("edge-1_a").ok().as_deref(),
            Some("$JS.edge-1_a.API")
        );
        for bad in ["", "a.b", "a b", "*", ">", "h\u{e9}"] {
            assert!(
                matches!(domain_api_prefix(bad), Err(Error::InvalidConfig(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            check_api_prefix("JS.acc@hub.API").ok().as_deref(),
            Some("JS.acc@hub.API")
        );
        for bad in ["", "JS.*.API", "JS.>", "a..b", "with space"] {
            assert!(
                matches!(check_api_prefix(bad), Err(Error::InvalidConfig(_))),
                "{bad:?}"
            );
        }
    }

    use super::*;

    /// The fast path never accepts what the full check rejects, and
    /// accepts the everyday subjects.
    #[test]
    fn the_fast_path_agrees_with_the_full_check() {
        for good in [
            "a",
            "orders.eu.created",
            "a-b_c.d1",
            "$JS.API.INFO",
            "_INBOX.x.y",
        ] {
            assert!(plain_subject(good.as_bytes()), "{good}");
        }
        let alphabet = b"ab.*> \t\x00\x7f\xc2\xa0-_$";
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..200_000 {
            let len = rng.usize(0..12);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(0..alphabet.len())])
                .collect();
            let Ok(text) = std::str::from_utf8(&bytes) else {
                continue;
            };
            if plain_subject(bytes.as_slice()) {
                assert!(check_tokens_fully(text, false).is_ok(), "{text:?}");
                assert!(check_tokens_fully(text, true).is_ok(), "{text:?}");
            }
        }
        let long = "a".repeat(MAX_SUBJECT_LEN + 1);
        assert!(!plain_subject(long.as_bytes()));
    }

    #[test]
    fn control_characters_and_unicode_whitespace_are_rejected() {
        for bad in [
            "a\0b",
            "a\x7fb",
            "a\u{a0}b",
            "a\u{2028}b",
            "a\u{85}b",
            "a\u{3000}b",
            "a\tb",
            "a\u{1b}b",
        ] {
            assert!(validate_publish(bad).is_err(), "{bad:?}");
            assert!(validate_subscribe(bad).is_err(), "{bad:?}");
            assert!(validate_queue(bad).is_err(), "{bad:?}");
            assert!(validate_key(bad).is_err(), "{bad:?}");
            assert!(validate_name("stream", bad).is_err(), "{bad:?}");
        }
        // Other non-ASCII text is fine in subjects.
        assert!(validate_publish("caf\u{e9}.m\u{fc}nchen").is_ok());
    }

    #[test]
    fn lengths_stay_within_the_protocol_line() {
        let long = |n: usize| "a".repeat(n);
        assert!(validate_publish(&long(MAX_SUBJECT_LEN)).is_ok());
        let err = validate_publish(&long(MAX_SUBJECT_LEN + 1)).unwrap_err();
        assert!(err.to_string().contains("3072"), "{err}");
        assert!(
            err.to_string().len() < 400,
            "the error does not echo it all"
        );
        assert!(validate_subscribe(&long(100_000)).is_err());
        assert!(validate_queue(&long(MAX_QUEUE_LEN)).is_ok());
        assert!(validate_queue(&long(MAX_QUEUE_LEN + 1)).is_err());
        assert!(validate_key(&long(MAX_KEY_LEN)).is_ok());
        assert!(validate_key(&long(MAX_KEY_LEN + 1)).is_err());
        assert_eq!(
            shorten("\u{e9}".repeat(100).as_str()).len(),
            128 + " (200 bytes)".len() + 3
        );
    }

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
