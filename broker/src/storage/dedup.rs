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
use sha1::Digest as _;
use txmq_protocol::pb;

use super::{Cf, Floors, Storage};
use crate::error::Result;

/// Longest idempotency key taken.
pub const MAX_KEY: usize = 256;

/// Whose an idempotency key is, which says what it is unique among and what another
/// message under a key in use means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyScope {
    /// Chosen by the application (the native face's `idempotency_key`): unique in its
    /// topic, whatever the connection (the outbox relay's keys outlive its client's
    /// restarts). Another message under a key in use is the application's mistake and
    /// is refused (`IDEMPOTENCY_CONFLICT`).
    Topic,
    /// A RocketMQ client's message id, made of MAC, PID, time and a counter: two
    /// containerised producers can make the same one. So it is scoped by the client id
    /// (`x-mq-client-id`), and another message under one is a different message: stored,
    /// and counted (`txmq_sends_dedup_conflicts_total`).
    GrpcClient(String),
}

/// What identifies a message's content: body, key, tag, properties, message group and
/// delivery time. A repeat of a send has the same; another message almost surely not.
pub type Digest = [u8; 16];

/// The digest of `m` (its idempotency key excluded: it names the message).
pub fn digest(m: &pb::Message) -> Digest {
    let mut h = sha1::Sha1::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(&m.body);
    field(m.key.as_bytes());
    field(m.tag.as_bytes());
    field(m.message_group.as_bytes());
    field(&m.deliver_at_ms.to_be_bytes());
    let mut properties: Vec<_> = m.properties.iter().collect();
    properties.sort_unstable();
    for (k, v) in properties {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    let full = h.finalize();
    let mut d = [0; 16];
    d.copy_from_slice(&full[..16]);
    d
}

/// `dedup`: topic id, then the key. A face's scoped key starts with a NUL byte, which a
/// native key may not hold, so the two never meet; native keys keep the form they had
/// before scopes, so entries written before stay found.
pub fn key(topic_id: u32, scope: &KeyScope, idempotency_key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + idempotency_key.len());
    k.extend_from_slice(&topic_id.to_be_bytes());
    match scope {
        KeyScope::Topic => {}
        KeyScope::GrpcClient(client) => {
            k.extend_from_slice(b"\0grpc\0");
            k.extend_from_slice(client.as_bytes());
            k.push(0);
        }
    }
    k.extend_from_slice(idempotency_key.as_bytes());
    k
}

/// Marks a value that carries a digest. Before digests, a value was the time and then a
/// receipt whose first byte is a protobuf tag, never 0xff (wire type 7 does not exist).
const WITH_DIGEST: u8 = 0xff;

/// An entry's value: when the first send was stored (ms), its digest, then its receipt.
pub fn value(stored_ms: u64, digest: &Digest, receipt: &pb::MessageReceipt) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 1 + digest.len() + receipt.encoded_len());
    v.extend_from_slice(&stored_ms.to_be_bytes());
    v.push(WITH_DIGEST);
    v.extend_from_slice(digest);
    receipt.encode(&mut v).expect("a Vec grows");
    v
}

/// A remembered send.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// When it was stored (ms).
    pub stored_ms: u64,
    /// Its digest; `None` for an entry written before digests (taken as the same).
    pub digest: Option<Digest>,
    /// Its receipt.
    pub receipt: pb::MessageReceipt,
}

impl Entry {
    /// Whether a send with `digest` repeats this one.
    pub fn same(&self, digest: &Digest) -> bool {
        self.digest.is_none_or(|d| &d == digest)
    }
}

/// An entry's value read back (either form).
fn parse(value: &[u8]) -> Option<Entry> {
    let stored_ms = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let rest = value.get(8..)?;
    let (digest, receipt) = if rest.first() == Some(&WITH_DIGEST) {
        let d: Digest = rest.get(1..17)?.try_into().ok()?;
        (Some(d), rest.get(17..)?)
    } else {
        (None, rest)
    };
    let receipt = pb::MessageReceipt::decode(receipt).ok()?;
    Some(Entry {
        stored_ms,
        digest,
        receipt,
    })
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
        let expired = parse(value).is_none_or(|e| {
            !live(
                e.stored_ms,
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

    /// The send stored with `key` (see [`key`]), if it is still remembered at `now`.
    ///
    /// # Errors
    /// Storage failure.
    pub fn dedup_lookup(&self, key: &[u8], now: u64) -> Result<Option<Entry>> {
        let Some(v) = self.db.get_pinned_cf(self.cf(Cf::Dedup), key)? else {
            return Ok(None);
        };
        Ok(parse(&v).filter(|e| live(e.stored_ms, now, self.dedup_window_ms())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt() -> pb::MessageReceipt {
        pb::MessageReceipt {
            message_id: "m".into(),
            topic: "t".into(),
            offset: 7,
            deliver_ms: 0,
        }
    }

    #[test]
    fn an_entry_reads_back_and_expires_with_its_window() {
        let d = [3; 16];
        let e = parse(&value(1000, &d, &receipt())).unwrap();
        assert_eq!(
            (e.stored_ms, e.digest, e.receipt),
            (1000, Some(d), receipt())
        );
        assert!(live(1000, 1999, 1000));
        assert!(!live(1000, 2000, 1000));
        assert!(!live(1000, 1000, 0), "a zero window remembers nothing");
        assert!(parse(b"short").is_none());
    }

    /// Entries written before digests (time, then the receipt) still read, as "the same
    /// message" whatever the digest.
    #[test]
    fn an_entry_without_a_digest_reads_back() {
        let mut old = 1000u64.to_be_bytes().to_vec();
        receipt().encode(&mut old).unwrap();
        let e = parse(&old).unwrap();
        assert_eq!(
            (e.stored_ms, e.digest, &e.receipt),
            (1000, None, &receipt())
        );
        assert!(e.same(&[9; 16]));
    }

    #[test]
    fn digests_tell_messages_apart_and_scopes_keep_keys_apart() {
        let m = pb::Message {
            topic: "t".into(),
            body: "a".into(),
            properties: [("k".to_string(), "v".to_string())].into(),
            ..Default::default()
        };
        let mut other = m.clone();
        other.body = "b".into();
        assert_ne!(digest(&m), digest(&other));
        let mut other = m.clone();
        other.properties.insert("k".into(), "w".into());
        assert_ne!(digest(&m), digest(&other));
        let mut same = m.clone();
        same.idempotency_key = "x".into();
        assert_eq!(digest(&m), digest(&same));
        // Field boundaries count: ("ab", "") is not ("a", "b").
        let (mut a, mut b) = (m.clone(), m.clone());
        (a.key, a.tag) = ("ab".into(), String::new());
        (b.key, b.tag) = ("a".into(), "b".into());
        assert_ne!(digest(&a), digest(&b));
        let native = key(1, &KeyScope::Topic, "id");
        let grpc = key(1, &KeyScope::GrpcClient("c1".into()), "id");
        let grpc2 = key(1, &KeyScope::GrpcClient("c2".into()), "id");
        assert_eq!(
            native,
            [&1u32.to_be_bytes()[..], b"id"].concat(),
            "native keys kept their form"
        );
        assert!(native != grpc && grpc != grpc2);
    }
}
