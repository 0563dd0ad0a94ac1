//! What an auto-acknowledging consumer remembers it acknowledged above the
//! server's ack floor, so that a recreated consumer's repeats of those
//! messages are acknowledged again without the handler. Pure: sequences in,
//! answers out.

use std::collections::BTreeSet;

/// How many acknowledged sequences above the floor a consumer remembers.
pub(crate) const REMEMBERED_ACKS: usize = 65_536;

/// Stream sequences this process acknowledged above the ack floor, at most
/// `limit` of them (the oldest are forgotten first: their repeats reach the
/// handler again, which at-least-once allows).
#[derive(Debug)]
pub(crate) struct AckMemory {
    acked: BTreeSet<u64>,
    limit: usize,
}

impl Default for AckMemory {
    fn default() -> Self {
        Self::new(REMEMBERED_ACKS)
    }
}

impl AckMemory {
    /// Remembers at most `limit` sequences.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            acked: BTreeSet::new(),
            limit: limit.max(1),
        }
    }

    /// `seq` was acknowledged by this process.
    pub(crate) fn acked(&mut self, seq: u64) {
        if seq == 0 {
            return;
        }
        self.acked.insert(seq);
        if self.acked.len() > self.limit {
            self.acked.pop_first();
        }
    }

    /// Whether a delivery of `seq` repeats a message this process
    /// acknowledged.
    pub(crate) fn is_repeat(&self, seq: u64) -> bool {
        self.acked.contains(&seq)
    }

    /// The server's ack floor moved to `floor`: everything at or below it
    /// is settled there, nothing to remember.
    pub(crate) fn floor(&mut self, floor: u64) {
        self.acked = self.acked.split_off(&floor.saturating_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledged_sequences_are_repeats_until_the_floor_passes_them() {
        let mut memory = AckMemory::default();
        for seq in [3, 5, 7] {
            memory.acked(seq);
        }
        assert!(memory.is_repeat(5));
        assert!(!memory.is_repeat(4), "never acknowledged");
        memory.floor(5);
        assert!(!memory.is_repeat(3) && !memory.is_repeat(5), "settled");
        assert!(memory.is_repeat(7));
        memory.floor(u64::MAX);
        assert!(!memory.is_repeat(7));
    }

    #[test]
    fn the_oldest_are_forgotten_beyond_the_limit() {
        let mut memory = AckMemory::new(3);
        for seq in 1..=5 {
            memory.acked(seq);
        }
        assert_eq!(
            (1..=5).filter(|s| memory.is_repeat(*s)).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
    }

    #[test]
    fn an_unknown_sequence_is_never_remembered() {
        let mut memory = AckMemory::default();
        memory.acked(0);
        assert!(!memory.is_repeat(0));
    }
}
