//! Broker-assigned identifiers for messages and transactions.
//!
//! An id is 128 bits: the broker's boot number (incremented durably at every start) and a
//! counter within that boot. Unique without coordination or clocks, ordered by creation,
//! and 16 fixed bytes as a storage key.
//!
//! *Secret* ids (transactions, scheduled messages and their recall handles, topic-delete
//! fences) are named by clients that must not guess their neighbours' (issue 26, item 6):
//! their first 64 bits are the boot number (24 bits) and a counter of secret ids within
//! that boot (40 bits), their last 64 bits are random. Still unique (the counter) and
//! ordered by creation (storage keys of transactions stay sequential, which the memtable's
//! skiplist and the txn bench need: fully random ids cost 25 % of txn throughput), but
//! one id gives away nothing of the next. Ids made before this layout (boot in all 64
//! bits, 20 random bits) sort before every new one, since boot numbers only grow. Who may
//! end a transaction is checked anyway ([`crate::txn::state::may_end`]).

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// A message or transaction id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id {
    /// Boot number of the broker that made it (a secret id: the boot number and the
    /// counter, see the module's docs).
    pub boot: u64,
    /// Counter within that boot (a secret id: random).
    pub seq: u64,
}

impl Id {
    /// Width of [`Id::to_bytes`].
    pub const LEN: usize = 16;

    /// Big-endian bytes, so byte order is creation order.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0; 16];
        b[..8].copy_from_slice(&self.boot.to_be_bytes());
        b[8..].copy_from_slice(&self.seq.to_be_bytes());
        b
    }

    /// Reads [`Id::to_bytes`] back; `None` unless exactly 16 bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; 16] = b.try_into().ok()?;
        Some(Self {
            boot: u64::from_be_bytes(b[..8].try_into().ok()?),
            seq: u64::from_be_bytes(b[8..].try_into().ok()?),
        })
    }

    /// Parses the 32-hex-digit form.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 32 || !text.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        Some(Self {
            boot: u64::from_str_radix(&text[..16], 16).ok()?,
            seq: u64::from_str_radix(&text[16..], 16).ok()?,
        })
    }
}

/// 32 upper-case hex digits, boot then counter: what [`Id::parse`] reads. Written by hand
/// rather than with `{:016X}`: the writer formats two ids per message, and the padded
/// formatting machinery was a visible share of its time.
impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
        let mut hex = [0u8; 32];
        for (pair, byte) in hex.chunks_exact_mut(2).zip(self.to_bytes()) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0xF)];
        }
        f.write_str(std::str::from_utf8(&hex).expect("hex digits are ASCII"))
    }
}

/// Random bits of a secret id: its whole second half.
pub const RANDOM_BITS: u32 = 64;

/// Bits of a secret id's first half that count secret ids within a boot (a trillion).
const COUNTER_BITS: u32 = 40;

/// The largest boot number a secret id can hold (24 bits: 16 million starts and
/// leaderships).
pub const MAX_BOOT: u64 = (1 << (64 - COUNTER_BITS)) - 1;

/// Hands out ids for one boot of the broker.
#[derive(Debug)]
pub struct IdGen {
    boot: u64,
    next: AtomicU64,
    next_secret: AtomicU64,
}

impl IdGen {
    /// A generator for boot number `boot`.
    pub fn new(boot: u64) -> Self {
        Self {
            boot,
            next: AtomicU64::new(1),
            next_secret: AtomicU64::new(1),
        }
    }

    /// The next id, in creation order (messages).
    pub fn next(&self) -> Id {
        Id {
            boot: self.boot,
            seq: self.next.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The next secret id (see the module's docs): ordered by creation, with
    /// [`RANDOM_BITS`] random bits, so a client that saw its own ids cannot name its
    /// neighbours'.
    ///
    /// # Panics
    /// The boot number is above [`MAX_BOOT`] (the server refuses to start then).
    pub fn next_secret(&self) -> Id {
        let counter = self.next_secret.fetch_add(1, Ordering::Relaxed);
        Id {
            boot: self.secret_head(counter),
            seq: rand::random::<u64>(),
        }
    }

    /// Where the secret ids made from now on start: every secret id made after this
    /// call is at or above it, every one made before is below (a topic deletion scans the
    /// transactions made since a mark).
    pub fn secret_mark(&self) -> Id {
        Id {
            boot: self.secret_head(self.next_secret.load(Ordering::Relaxed)),
            seq: 0,
        }
    }

    fn secret_head(&self, counter: u64) -> u64 {
        assert!(
            self.boot <= MAX_BOOT,
            "boot number {} above {MAX_BOOT}",
            self.boot
        );
        (self.boot << COUNTER_BITS) | (counter & ((1 << COUNTER_BITS) - 1))
    }
}

/// A keyed permutation of `u64`: a four-round Feistel network over 32-bit halves whose
/// round function is SipHash under random keys drawn at start (Luby–Rackoff: a pseudo-
/// random permutation). A permutation, so distinct inputs give distinct outputs.
#[derive(Debug)]
pub struct Scramble {
    keys: std::collections::hash_map::RandomState,
}

impl Default for Scramble {
    fn default() -> Self {
        Self::new()
    }
}

impl Scramble {
    const ROUNDS: u64 = 4;

    /// A permutation under fresh random keys.
    pub fn new() -> Self {
        Self {
            keys: std::collections::hash_map::RandomState::new(),
        }
    }

    fn round(&self, round: u64, half: u32) -> u32 {
        let mut h = self.keys.build_hasher();
        h.write_u64((round << 32) | u64::from(half));
        h.finish() as u32
    }

    /// The image of `x`.
    pub fn apply(&self, x: u64) -> u64 {
        let (mut left, mut right) = ((x >> 32) as u32, x as u32);
        for round in 0..Self::ROUNDS {
            (left, right) = (right, left ^ self.round(round, right));
        }
        (u64::from(left) << 32) | u64::from(right)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn text_and_bytes_round_trip_and_keep_order(a in any::<(u64, u64)>(), b in any::<(u64, u64)>()) {
            let a = Id { boot: a.0, seq: a.1 };
            let b = Id { boot: b.0, seq: b.1 };
            prop_assert_eq!(a.to_string(), format!("{:016X}{:016X}", a.boot, a.seq));
            prop_assert_eq!(Id::parse(&a.to_string()), Some(a));
            prop_assert_eq!(Id::from_bytes(&a.to_bytes()), Some(a));
            prop_assert_eq!(a.cmp(&b), a.to_bytes().cmp(&b.to_bytes()));
        }
    }

    /// Secret ids: distinct, in creation order, 64 random bits each, after every id of
    /// the old layout and of earlier boots; a mark splits before from after.
    #[test]
    fn secret_ids_are_ordered_but_not_guessable() {
        let g = IdGen::new(7);
        let first = g.next_secret();
        let mark = g.secret_mark();
        let ids: Vec<Id> = (0..100_000).map(|_| g.next_secret()).collect();
        assert!(first < mark && mark <= ids[0]);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "not in creation order");
        assert!(ids.iter().all(|id| id.boot >> COUNTER_BITS == 7));
        let random: std::collections::HashSet<u64> = ids.iter().map(|id| id.seq).collect();
        assert_eq!(random.len(), ids.len(), "random halves repeat");
        // The high bits of the random half vary too: all 64 are random.
        let high: std::collections::HashSet<u64> = ids.iter().map(|id| id.seq >> 44).collect();
        assert!(high.len() > 1000, "only {} distinct high parts", high.len());
        // Older layouts and earlier boots sort first.
        let old_layout = Id {
            boot: 7,
            seq: (5 << 20) | 99,
        };
        assert!(old_layout < ids[0]);
        assert!(IdGen::new(6).next_secret() < ids[0]);
        assert!(IdGen::new(MAX_BOOT).next_secret() > ids[0]);
    }

    #[test]
    #[should_panic(expected = "above")]
    fn a_boot_number_past_the_layout_is_refused() {
        IdGen::new(MAX_BOOT + 1).next_secret();
    }

    /// The check scheduler's ids: a permutation, so distinct, and not in order.
    #[test]
    fn scrambled_ids_are_unique_and_unordered() {
        let s = Scramble::new();
        let ids: Vec<u64> = (0..100_000).map(|i| s.apply(i)).collect();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        let ascending = ids.windows(2).filter(|w| w[0] < w[1]).count();
        assert!(
            (40_000..60_000).contains(&ascending),
            "{ascending} of 99,999 neighbours ascend: the order shows through"
        );
        assert_ne!(s.apply(1), Scramble::new().apply(1));
    }

    #[test]
    fn bad_text_is_refused() {
        assert_eq!(Id::parse("xyz"), None);
        assert_eq!(Id::parse(&"g".repeat(32)), None);
    }
}
