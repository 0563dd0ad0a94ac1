//! The message ids natskit assigns to stream publishes (`Nats-Msg-Id`):
//! a random prefix per client or publisher and a counter, fixed length,
//! built without the formatting machinery.

use std::sync::atomic::{AtomicU64, Ordering};

/// Digits of the counter: base 62, so 8 of them count to 2.18e14 (seven
/// years at a million messages a second) before an id repeats.
const DIGITS: usize = 8;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Assigns ids: `prefix` followed by a counter in [`DIGITS`] base-62
/// digits. With a 22-character NUID prefix an id is 30 characters; the
/// previous `{prefix}-{counter:016x}` took 39, and formatting it cost about
/// 1,500 instructions a message (callgrind), more than the rest of a
/// pipelined publish on natskit's side.
#[derive(Debug)]
pub(crate) struct MessageIds {
    prefix: String,
    next: AtomicU64,
}

impl MessageIds {
    /// Ids starting with `prefix` (unique per client or publisher: a NUID).
    pub(crate) fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            next: AtomicU64::new(0),
        }
    }

    /// The next id.
    pub(crate) fn next_id(&self) -> MessageId {
        self.id(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Id number `n`: inline (no allocation) when the prefix is short, as
    /// every prefix natskit makes is.
    pub(crate) fn id(&self, mut n: u64) -> MessageId {
        let mut digits = [b'0'; DIGITS];
        for digit in digits.iter_mut().rev() {
            // `n % 62` is below 62: the index is in range.
            *digit = ALPHABET[(n % 62) as usize];
            n /= 62;
        }
        let prefix = self.prefix.as_bytes();
        let len = prefix.len() + DIGITS;
        if len <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..prefix.len()].copy_from_slice(prefix);
            bytes[prefix.len()..len].copy_from_slice(&digits);
            // `len` is at most `INLINE` (38): it fits a `u8`.
            return MessageId::Inline {
                len: len as u8,
                bytes,
            };
        }
        let mut id = String::with_capacity(len);
        id.push_str(&self.prefix);
        id.extend(digits.iter().map(|&b| char::from(b)));
        MessageId::Heap(id)
    }
}

/// How long an id can be and still be kept inline.
const INLINE: usize = 38;

/// One message id (`Nats-Msg-Id`), given or assigned. An assigned one (a
/// 22-character NUID prefix and 8 digits) is kept inline: a pipelined
/// publish keeps its id for resends until its ack comes, and a heap string
/// made on the publishing task and freed on the collecting one cost an
/// allocation a message and the allocator's cross-thread free path.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum MessageId {
    /// `bytes[..len]`: ASCII digits after a `&str` prefix, so valid UTF-8.
    Inline { len: u8, bytes: [u8; INLINE] },
    /// Given by the caller, or assigned with a long prefix.
    Heap(String),
}

impl MessageId {
    /// The id as text.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            // Always valid UTF-8 (see `Inline`): the fallback is unreachable.
            Self::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            Self::Heap(id) => id,
        }
    }
}

impl From<String> for MessageId {
    fn from(id: String) -> Self {
        Self::Heap(id)
    }
}

impl std::fmt::Debug for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fixed_length_distinct_and_ordered_by_number() {
        let ids = MessageIds::new("P");
        assert_eq!(ids.id(0).as_str(), "P00000000");
        assert_eq!(ids.id(61).as_str(), "P0000000z");
        assert_eq!(ids.id(62).as_str(), "P00000010");
        assert_eq!(ids.id(62u64.pow(8) - 1).as_str(), "Pzzzzzzzz");
        let first = ids.next_id();
        let second = ids.next_id();
        assert_ne!(first, second);
        assert_eq!((first.as_str().len(), second.as_str().len()), (9, 9));
        let many: std::collections::HashSet<_> = (0..10_000)
            .map(|n| ids.id(n * 7919).as_str().to_owned())
            .collect();
        assert_eq!(many.len(), 10_000);
    }

    /// A NUID prefix (22 characters) gives an inline id; a prefix too long
    /// to fit gives the same text on the heap.
    #[test]
    fn ids_are_inline_when_they_fit_and_the_same_text_otherwise() {
        let nuid = MessageIds::new("ABCDEFGHIJKLMNOPQRSTUV");
        let id = nuid.id(63);
        assert!(matches!(id, MessageId::Inline { .. }), "{id:?}");
        assert_eq!(id.as_str(), "ABCDEFGHIJKLMNOPQRSTUV00000011");
        let exactly = MessageIds::new("x".repeat(INLINE - DIGITS));
        assert!(matches!(exactly.id(0), MessageId::Inline { .. }));
        assert_eq!(exactly.id(0).as_str().len(), INLINE);
        let long = MessageIds::new("y".repeat(INLINE - DIGITS + 1));
        let id = long.id(63);
        assert!(matches!(id, MessageId::Heap(_)), "{id:?}");
        assert_eq!(
            id.as_str(),
            format!("{}00000011", "y".repeat(INLINE - DIGITS + 1))
        );
        assert_eq!(
            format!("{:?}", nuid.id(0)),
            "\"ABCDEFGHIJKLMNOPQRSTUV00000000\""
        );
    }
}
