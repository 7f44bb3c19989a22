//! Broker-assigned identifiers for messages and transactions.
//!
//! An id is 128 bits: the broker's boot number (incremented durably at every start) and a
//! counter within that boot. Unique without coordination or clocks, ordered by creation,
//! and 16 fixed bytes as a storage key.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// A message or transaction id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id {
    /// Boot number of the broker that made it.
    pub boot: u64,
    /// Counter within that boot.
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

/// Hands out ids for one boot of the broker.
#[derive(Debug)]
pub struct IdGen {
    boot: u64,
    next: AtomicU64,
}

impl IdGen {
    /// A generator for boot number `boot`.
    pub fn new(boot: u64) -> Self {
        Self {
            boot,
            next: AtomicU64::new(1),
        }
    }

    /// The next id.
    pub fn next(&self) -> Id {
        Id {
            boot: self.boot,
            seq: self.next.fetch_add(1, Ordering::Relaxed),
        }
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

    #[test]
    fn bad_text_is_refused() {
        assert_eq!(Id::parse("xyz"), None);
        assert_eq!(Id::parse(&"g".repeat(32)), None);
    }
}
