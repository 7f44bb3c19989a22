//! Key encodings of every column family. Integers are big-endian so RocksDB's byte order
//! is numeric order: a topic log iterates by offset, a due index by time.

use crate::ids::Id;

/// `log`: topic id, offset.
pub fn log(topic_id: u32, offset: u64) -> [u8; 12] {
    let mut k = [0; 12];
    k[..4].copy_from_slice(&topic_id.to_be_bytes());
    k[4..].copy_from_slice(&offset.to_be_bytes());
    k
}

/// The offset part of a `log` key.
pub fn log_offset(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(4..12)?.try_into().ok()?))
}

/// `msgid` value: topic id, offset.
pub fn location(topic_id: u32, offset: u64) -> [u8; 12] {
    log(topic_id, offset)
}

/// Reads a [`location`] back.
pub fn parse_location(value: &[u8]) -> Option<(u32, u64)> {
    let topic = u32::from_be_bytes(value.get(..4)?.try_into().ok()?);
    Some((topic, log_offset(value)?))
}

/// Prefix of a topic's `msgkey` entries for one key: topic id, key length, key. The
/// length makes the prefix exact (no key is a prefix of another's entries).
pub fn msgkey_prefix(topic_id: u32, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 16);
    k.extend_from_slice(&topic_id.to_be_bytes());
    k.extend_from_slice(&(key.len() as u32).to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

/// `msgkey`: [`msgkey_prefix`], then the offset.
pub fn msgkey(topic_id: u32, key: &str, offset: u64) -> Vec<u8> {
    let mut k = msgkey_prefix(topic_id, key);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

/// Topic id and offset of a `msgkey` key.
pub fn parse_msgkey(key: &[u8]) -> Option<(u32, u64)> {
    let topic = u32::from_be_bytes(key.get(..4)?.try_into().ok()?);
    Some((topic, group_offset_offset(key)?))
}

/// `half`: transaction id, sequence within the transaction.
pub fn half(txn: Id, seq: u32) -> [u8; 20] {
    let mut k = [0; 20];
    k[..16].copy_from_slice(&txn.to_bytes());
    k[16..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// What a due-index entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DueKind {
    /// A prepared transaction's next check-back.
    Check = b'c',
    /// A resolved transaction's end of retention.
    Purge = b'p',
    /// A scheduled message's delivery time (the id is the message's).
    Deliver = b'd',
    /// The end of retention of a delivered or cancelled scheduled message's record.
    Forget = b'f',
}

/// `due`: kind, due time (ms), transaction id (a message id for scheduled messages).
pub fn due(kind: DueKind, due_ms: u64, txn: Id) -> [u8; 25] {
    let mut k = [0; 25];
    k[0] = kind as u8;
    k[1..9].copy_from_slice(&due_ms.to_be_bytes());
    k[9..].copy_from_slice(&txn.to_bytes());
    k
}

/// Reads a `due` key back.
pub fn parse_due(key: &[u8]) -> Option<(u8, u64, Id)> {
    if key.len() != 25 {
        return None;
    }
    let at = u64::from_be_bytes(key[1..9].try_into().ok()?);
    Some((key[0], at, Id::from_bytes(&key[9..])?))
}

/// `cursor`: group, 0, topic id. Names never contain a 0 byte.
pub fn cursor(group: &str, topic_id: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + 5);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(&topic_id.to_be_bytes());
    k
}

/// Splits a `cursor` key into group and topic id.
pub fn parse_cursor(key: &[u8]) -> Option<(String, u32)> {
    let zero = key.iter().position(|b| *b == 0)?;
    let group = String::from_utf8(key[..zero].to_vec()).ok()?;
    let id = u32::from_be_bytes(key.get(zero + 1..zero + 5)?.try_into().ok()?);
    Some((group, id))
}

/// `acked` and `retry`: group, 0, topic id, offset.
pub fn group_offset(group: &str, topic_id: u32, offset: u64) -> Vec<u8> {
    let mut k = cursor(group, topic_id);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

/// The offset at the end of a [`group_offset`] key.
pub fn group_offset_offset(key: &[u8]) -> Option<u64> {
    let at = key.len().checked_sub(8)?;
    Some(u64::from_be_bytes(key[at..].try_into().ok()?))
}

/// `dlq`: group, 0, topic id, offset: one dead letter per message and group.
pub fn dead_letter(group: &str, topic_id: u32, offset: u64) -> Vec<u8> {
    group_offset(group, topic_id, offset)
}

/// Prefix of every `dlq` key of a group.
pub fn group_prefix(group: &str) -> Vec<u8> {
    let mut k = group.as_bytes().to_vec();
    k.push(0);
    k
}

/// `meta` key of a topic record.
pub fn topic(name: &str) -> Vec<u8> {
    let mut k = b"topic/".to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// `meta` key of a deleted topic's id: [`crate::storage::records::DeletedTopicRecord`].
pub fn deleted_topic(id: u32) -> Vec<u8> {
    let mut k = DELETED_TOPIC.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Prefix of [`user`] keys.
pub const USER: &[u8] = b"user/";

/// `meta` key of a user: [`crate::storage::records::UserRecord`].
pub fn user(name: &str) -> Vec<u8> {
    let mut k = USER.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// `meta` key of the next rule id (ids are never reused: `txmq acl revoke-id` must not
/// hit a later rule).
pub const NEXT_RULE_ID: &[u8] = b"next-rule-id";

/// Prefix of [`rule`] keys.
pub const RULE: &[u8] = b"rule/";

/// `meta` key of a permission rule: [`crate::storage::records::RuleRecord`], by id.
pub fn rule(id: u64) -> Vec<u8> {
    let mut k = RULE.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Prefix of [`deleted_topic`] keys.
pub const DELETED_TOPIC: &[u8] = b"deleted-topic/";

/// `meta` key of the next topic id (ids are never reused).
pub const NEXT_TOPIC_ID: &[u8] = b"next-topic-id";

/// `meta` key of the boot counter.
pub const BOOT: &[u8] = b"boot";

/// `meta` key of the last Raft log id applied (a broker group's node).
pub const RAFT_APPLIED: &[u8] = b"raft/applied";

/// `meta` key of the last Raft membership applied (a broker group's node).
pub const RAFT_MEMBERSHIP: &[u8] = b"raft/membership";

/// The smallest key greater than every key starting with `prefix`, for iterator bounds.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn log_keys_sort_by_topic_then_offset(a in any::<(u32, u64)>(), b in any::<(u32, u64)>()) {
            prop_assert_eq!(log(a.0, a.1).cmp(&log(b.0, b.1)), a.cmp(&b));
            prop_assert_eq!(log_offset(&log(a.0, a.1)), Some(a.1));
        }

        #[test]
        fn due_keys_sort_by_time_and_parse_back(t1 in any::<u64>(), t2 in any::<u64>(), s in any::<u64>()) {
            let id = Id { boot: 1, seq: s };
            let (k1, k2) = (due(DueKind::Check, t1, id), due(DueKind::Check, t2, id));
            prop_assert_eq!(k1.cmp(&k2), t1.cmp(&t2));
            prop_assert_eq!(parse_due(&k1), Some((b'c', t1, id)));
            prop_assert!(due(DueKind::Check, u64::MAX, id) < due(DueKind::Purge, 0, id));
        }

        #[test]
        fn key_index_entries_of_one_key_share_a_prefix_no_other_key_has(
            topic in any::<u32>(), a in ".{0,8}", b in ".{0,8}", off in any::<u64>()
        ) {
            let k = msgkey(topic, &a, off);
            prop_assert_eq!(parse_msgkey(&k), Some((topic, off)));
            prop_assert!(k.starts_with(&msgkey_prefix(topic, &a)));
            prop_assert_eq!(k.starts_with(&msgkey_prefix(topic, &b)), a == b);
            prop_assert_eq!(parse_location(&location(topic, off)), Some((topic, off)));
        }

        #[test]
        fn group_keys_round_trip(group in "[a-zA-Z0-9._-]{1,20}", topic in any::<u32>(), off in any::<u64>()) {
            prop_assert_eq!(parse_cursor(&cursor(&group, topic)), Some((group.clone(), topic)));
            let k = group_offset(&group, topic, off);
            prop_assert!(k.starts_with(&cursor(&group, topic)));
            prop_assert_eq!(group_offset_offset(&k), Some(off));
        }
    }

    #[test]
    fn group_prefix_does_not_match_a_longer_group() {
        assert!(!cursor("ab", 1).starts_with(&group_prefix("a")));
        assert!(cursor("a", 1).starts_with(&group_prefix("a")));
    }

    #[test]
    fn prefix_end_bounds_the_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff]), None);
    }
}
