//! The message indexes: by id (where a visible message is) and by key (a topic's
//! messages with that key). The writer puts both in the batch that appends the message,
//! so they are never behind the log.
//!
//! Retention and topic deletion remove messages with range deletes and leave their index
//! entries behind: a compaction filter that knows each topic's first kept offset
//! ([`Floors`]) drops them whenever RocksDB rewrites their files, and lookups skip any
//! not yet dropped. Index keys by id only grow (ids are ordered by creation), so their
//! old files would never be rewritten on their own: the retention sweep compacts both
//! indexes once the entries removed since the last time are as many as the messages
//! kept ([`Storage::index_garbage`]), so each entry rewritten is paid for by one removed.

use std::sync::RwLock;
use std::sync::atomic::Ordering;

use rocksdb::compaction_filter::Decision;
use rustc_hash::FxHashMap;

use super::{Cf, Storage, keys};
use crate::error::Result;
use crate::ids::Id;

/// Each topic's first kept offset, as far as the indexes are concerned (`u64::MAX` for a
/// deleted topic: nothing of it is kept).
#[derive(Debug, Default)]
pub struct Floors(RwLock<FxHashMap<u32, u64>>);

impl Floors {
    /// Everything of `topic_id` below `start` is gone.
    pub fn set(&self, topic_id: u32, start: u64) {
        let mut floors = self.0.write().expect("floors lock");
        let floor = floors.entry(topic_id).or_insert(0);
        *floor = (*floor).max(start);
    }

    /// Whether the message at `offset` of `topic_id` is gone.
    pub fn gone(&self, topic_id: u32, offset: u64) -> bool {
        self.0
            .read()
            .expect("floors lock")
            .get(&topic_id)
            .is_some_and(|floor| offset < *floor)
    }
}

/// The compaction filter of the `msgid` family: drops entries of messages that are gone.
pub(super) fn id_filter(floors: std::sync::Arc<Floors>) -> impl Fn(u32, &[u8], &[u8]) -> Decision {
    move |_, _, value| match keys::parse_location(value) {
        Some((topic, offset)) if floors.gone(topic, offset) => Decision::Remove,
        _ => Decision::Keep,
    }
}

/// The compaction filter of the `msgkey` family.
pub(super) fn key_filter(floors: std::sync::Arc<Floors>) -> impl Fn(u32, &[u8], &[u8]) -> Decision {
    move |_, key, _| match keys::parse_msgkey(key) {
        Some((topic, offset)) if floors.gone(topic, offset) => Decision::Remove,
        _ => Decision::Keep,
    }
}

impl Storage {
    /// Reloads every floor from what is stored, for a broker group's follower, which
    /// applies the leader's retention without a syncer of its own: its indexes'
    /// compaction filters follow.
    ///
    /// # Errors
    /// Storage failure.
    pub fn refresh_floors(&self) -> Result<()> {
        self.load_floors()
    }

    /// Sets every topic's floor from what is stored, and estimates the garbage in the
    /// indexes: the entries RocksDB counts beyond the messages kept (at open: the count
    /// in memory is gone with the last run, the garbage is not).
    pub(super) fn load_floors(&self) -> Result<()> {
        let mut kept = 0;
        for t in self.topics()? {
            self.floors.set(t.record.id, t.record.start);
            kept += t.end.saturating_sub(t.record.start);
        }
        for id in self.deleted_topics()? {
            self.floors.set(id, u64::MAX);
        }
        let entries = self
            .db
            .property_int_value_cf(self.cf(Cf::MsgId), "rocksdb.estimate-num-keys")?
            .unwrap_or(0);
        self.index_garbage
            .store(entries.saturating_sub(kept), Ordering::Relaxed);
        Ok(())
    }

    /// Where the visible message `id` is: topic id and offset, unless it is gone (or
    /// was never visible: a half or waiting scheduled message is not indexed yet).
    ///
    /// # Errors
    /// Storage failure.
    pub fn locate(&self, id: Id) -> Result<Option<(u32, u64)>> {
        let Some(value) = self.db.get_pinned_cf(self.cf(Cf::MsgId), id.to_bytes())? else {
            return Ok(None);
        };
        Ok(keys::parse_location(&value).filter(|(t, o)| !self.floors.gone(*t, *o)))
    }

    /// Offsets of a topic's messages with `key`, from `from` on, at most `limit`, in
    /// offset order.
    ///
    /// # Errors
    /// Storage failure.
    pub fn offsets_by_key(
        &self,
        topic_id: u32,
        key: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<u64>> {
        let prefix = keys::msgkey_prefix(topic_id, key);
        let mut it = self.db.raw_iterator_cf(self.cf(Cf::MsgKey));
        it.seek(keys::msgkey(topic_id, key, from));
        let mut out = Vec::new();
        while it.valid() && out.len() < limit {
            let Some(k) = it.key() else { break };
            if !k.starts_with(&prefix) || k.len() != prefix.len() + 8 {
                break;
            }
            if let Some(offset) = keys::group_offset_offset(k)
                && !self.floors.gone(topic_id, offset)
            {
                out.push(offset);
            }
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Index entries of removed messages not yet compacted away (an upper bound).
    pub fn index_garbage(&self) -> u64 {
        self.index_garbage.load(Ordering::Relaxed)
    }

    /// `n` more messages were removed (their index entries are garbage now).
    pub fn add_index_garbage(&self, n: u64) {
        self.index_garbage.fetch_add(n, Ordering::Relaxed);
    }

    /// Rewrites both indexes whole, dropping the entries of removed messages; alongside
    /// the automatic compactions, not instead of them.
    pub fn compact_indexes(&self) {
        let garbage = self.index_garbage.swap(0, Ordering::Relaxed);
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_exclusive_manual_compaction(false);
        for cf in [Cf::MsgId, Cf::MsgKey] {
            self.db
                .compact_range_cf_opt(self.cf(cf), None::<&[u8]>, None::<&[u8]>, &opts);
        }
        tracing::debug!(garbage, "message indexes compacted");
    }
}
