//! The message ids natskit assigns to stream publishes (`Nats-Msg-Id`):
//! a random prefix per client or publisher and a counter, fixed length,
//! built without the formatting machinery.

use std::sync::atomic::{AtomicU64, Ordering};

/// Digits of the counter: base 64 (shifts, not divisions), so 8 of them
/// count to 2.8e14 (nine years at a million messages a second) before an
/// id repeats.
const DIGITS: usize = 8;

/// In ASCII order, so ids of one prefix sort by number.
const ALPHABET: &[u8; 64] = b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz";

/// Assigns ids: `prefix` followed by a counter in [`DIGITS`] base-64
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

    /// The next id: the one kept for resends, and its text for the first
    /// send's header (made once, moved into the header).
    pub(crate) fn next_id(&self) -> (MessageId, String) {
        self.id(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Id number `n` (see [`next_id`](Self::next_id)).
    pub(crate) fn id(&self, mut n: u64) -> (MessageId, String) {
        let mut digits = [b'-'; DIGITS];
        for digit in digits.iter_mut().rev() {
            // Six bits: the index is in range.
            *digit = ALPHABET[(n & 63) as usize];
            n >>= 6;
        }
        let mut text = String::with_capacity(self.prefix.len() + DIGITS);
        text.push_str(&self.prefix);
        text.extend(digits.iter().map(|&b| char::from(b)));
        (MessageId::kept(&text), text)
    }
}

/// How long an id can be and still be kept inline.
const INLINE: usize = 38;

/// One message id (`Nats-Msg-Id`), given or assigned, as kept for resends.
/// An assigned one (a 22-character NUID prefix and 8 digits) is kept
/// inline: a pipelined publish keeps its id until its ack comes, and a
/// heap string made on the publishing task and freed on the collecting one
/// cost an allocation a message and the allocator's cross-thread free
/// path. The first send's header gets the text made with it.
///
/// Not `tinystr::TinyAsciiStr` (already in the lock through `url`): its
/// checked constructor cost 343 instructions an id more (callgrind,
/// `PATH_=stream`), on every pipelined publish.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum MessageId {
    /// `bytes[..len]`, copied whole from a `&str`, so valid UTF-8.
    Inline { len: u8, bytes: [u8; INLINE] },
    /// Given by the caller, or assigned with a long prefix.
    Heap(String),
}

impl MessageId {
    /// `text`, inline when it fits.
    fn kept(text: &str) -> Self {
        let len = text.len();
        if len > INLINE {
            return Self::Heap(text.to_owned());
        }
        let mut bytes = [0; INLINE];
        bytes[..len].copy_from_slice(text.as_bytes());
        // At most `INLINE` (38): it fits a `u8`.
        Self::Inline {
            len: len as u8,
            bytes,
        }
    }

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
        let text = |n: u64| ids.id(n).1;
        assert_eq!(text(0), "P--------");
        assert_eq!(text(63), "P-------z");
        assert_eq!(text(64), "P------0-");
        assert_eq!(text(64u64.pow(8) - 1), "Pzzzzzzzz");
        let mut sorted: Vec<String> = (0..5_000).map(|n| text(n * 7919)).collect();
        assert!(sorted.windows(2).all(|w| w[0] < w[1]), "in number order");
        sorted.dedup();
        assert_eq!(sorted.len(), 5_000);
        let (first, first_text) = ids.next_id();
        let (second, _) = ids.next_id();
        assert_ne!(first, second);
        assert_eq!(first.as_str(), first_text, "kept as sent");
        assert_eq!((first.as_str().len(), second.as_str().len()), (9, 9));
    }

    /// A NUID prefix (22 characters) gives an inline id; a prefix too long
    /// to fit gives the same text on the heap.
    #[test]
    fn ids_are_inline_when_they_fit_and_the_same_text_otherwise() {
        let nuid = MessageIds::new("ABCDEFGHIJKLMNOPQRSTUV");
        let (id, text) = nuid.id(65);
        assert!(matches!(id, MessageId::Inline { .. }), "{id:?}");
        assert_eq!(text, "ABCDEFGHIJKLMNOPQRSTUV------00");
        assert_eq!(id.as_str(), text);
        let exactly = MessageIds::new("x".repeat(INLINE - DIGITS));
        assert!(matches!(exactly.id(0).0, MessageId::Inline { .. }));
        assert_eq!(exactly.id(0).0.as_str().len(), INLINE);
        let long = MessageIds::new("y".repeat(INLINE - DIGITS + 1));
        let (id, text) = long.id(65);
        assert!(matches!(id, MessageId::Heap(_)), "{id:?}");
        assert_eq!(text, format!("{}------00", "y".repeat(INLINE - DIGITS + 1)));
        assert_eq!(id.as_str(), text);
        assert_eq!(
            format!("{:?}", nuid.id(0).0),
            "\"ABCDEFGHIJKLMNOPQRSTUV--------\""
        );
    }
}
