//! The idempotency index: which send a producer-chosen key (`Message.idempotency_key`)
//! was stored as, so a repeat within the dedup window stores nothing and gets the first
//! send's receipt (issue 18).
//!
//! The writer looks a key up and records it in the batch that stores the message, so
//! the index is never behind the log and two sends of one key can never both be stored
//! (one thread decides, and a batch sees its own keys). A repeat is answered through the
//! syncer like any write, so its OK never overtakes the fsync of the first send.
//!
//! Entries expire: a lookup ignores one older than the window, and a compaction filter
//! drops those (and a deleted topic's) whenever RocksDB rewrites their files.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;
use rocksdb::compaction_filter::Decision;
use txmq_protocol::pb;

use super::{Cf, Floors, Storage};
use crate::error::Result;

/// Longest idempotency key taken.
pub const MAX_KEY: usize = 256;

/// `dedup`: topic id, then the key.
pub fn key(topic_id: u32, idempotency_key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + idempotency_key.len());
    k.extend_from_slice(&topic_id.to_be_bytes());
    k.extend_from_slice(idempotency_key.as_bytes());
    k
}

/// An entry's value: when the first send was stored (ms), then its receipt.
pub fn value(stored_ms: u64, receipt: &pb::MessageReceipt) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + receipt.encoded_len());
    v.extend_from_slice(&stored_ms.to_be_bytes());
    receipt.encode(&mut v).expect("a Vec grows");
    v
}

/// When an entry's send was stored, and its receipt.
fn parse(value: &[u8]) -> Option<(u64, pb::MessageReceipt)> {
    let at = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let receipt = pb::MessageReceipt::decode(value.get(8..)?).ok()?;
    Some((at, receipt))
}

/// Whether an entry stored at `stored_ms` is still remembered at `now` under `window_ms`.
pub fn live(stored_ms: u64, now: u64, window_ms: u64) -> bool {
    stored_ms.saturating_add(window_ms) > now
}

/// The compaction filter of the `dedup` family: drops entries past the window and those
/// of deleted topics.
pub(super) fn filter(
    window_ms: Arc<AtomicU64>,
    floors: Arc<Floors>,
) -> impl Fn(u32, &[u8], &[u8]) -> Decision {
    move |_, key, value| {
        let topic = key
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes);
        let expired = parse(value).is_none_or(|(at, _)| {
            !live(
                at,
                txmq_protocol::now_ms(),
                window_ms.load(Ordering::Relaxed),
            )
        });
        if expired || topic.is_none_or(|t| floors.gone(t, u64::MAX - 1)) {
            Decision::Remove
        } else {
            Decision::Keep
        }
    }
}

impl Storage {
    /// How long idempotency keys are remembered from now on (the broker's
    /// `dedup-window`; 24 h until set).
    pub fn set_dedup_window(&self, window: std::time::Duration) {
        self.dedup_window_ms
            .store(window.as_millis() as u64, Ordering::Relaxed);
    }

    /// The window idempotency keys are remembered for, in ms (0: not at all).
    pub fn dedup_window_ms(&self) -> u64 {
        self.dedup_window_ms.load(Ordering::Relaxed)
    }

    /// The receipt of the send stored with `idempotency_key` in topic `topic_id`, if it
    /// is still remembered at `now`.
    ///
    /// # Errors
    /// Storage failure.
    pub fn dedup_lookup(
        &self,
        topic_id: u32,
        idempotency_key: &str,
        now: u64,
    ) -> Result<Option<pb::MessageReceipt>> {
        let Some(v) = self
            .db
            .get_pinned_cf(self.cf(Cf::Dedup), key(topic_id, idempotency_key))?
        else {
            return Ok(None);
        };
        Ok(parse(&v)
            .filter(|(at, _)| live(*at, now, self.dedup_window_ms()))
            .map(|(_, receipt)| receipt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reads_back_and_expires_with_its_window() {
        let r = pb::MessageReceipt {
            message_id: "m".into(),
            topic: "t".into(),
            offset: 7,
            deliver_ms: 0,
        };
        let (at, back) = parse(&value(1000, &r)).unwrap();
        assert_eq!((at, back), (1000, r));
        assert!(live(1000, 1999, 1000));
        assert!(!live(1000, 2000, 1000));
        assert!(!live(1000, 1000, 0), "a zero window remembers nothing");
        assert!(parse(b"short").is_none());
    }
}
