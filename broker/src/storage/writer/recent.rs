//! The writer's memory of open transactions, so a commit reads nothing.

use prost::Message;
use rustc_hash::FxHashMap;
use txmq_protocol::pb::{self, TxnState};

use crate::ids::Id;
use crate::storage::records::TxnRecord;

/// Records and half messages of open transactions, as this writer last wrote them: a
/// commit or rollback then needs no read from RocksDB. Only written batches update it, so
/// it always agrees with the database; it is bounded, and a miss reads the database.
#[derive(Default)]
pub(super) struct Recent {
    pub(super) records: FxHashMap<Id, TxnRecord>,
    pub(super) halves: FxHashMap<Id, Vec<(u32, pb::StoredMessage)>>,
    pub(super) half_bytes: usize,
}

/// Most open transactions [`Recent`] remembers: far more than are open at once when
/// producers resolve within seconds; one held open longer is read back at its commit. At
/// 64 MiB the backlog bench's million never-resolved transactions pinned the whole cache
/// and took the broker past 512 MiB.
const RECENT_TXNS: usize = 16_384;
/// Most half-message bytes [`Recent`] holds.
const RECENT_BYTES: usize = 16 << 20;

impl Recent {
    /// Takes in what a written batch left: records in their new state, halves not yet
    /// resolved.
    pub(super) fn update(
        &mut self,
        txns: FxHashMap<Id, TxnRecord>,
        halves: FxHashMap<Id, Vec<(u32, pb::StoredMessage)>>,
    ) {
        for (id, rec) in txns {
            if rec.state == TxnState::Prepared as i32 {
                if self.records.len() < RECENT_TXNS || self.records.contains_key(&id) {
                    self.records.insert(id, rec);
                }
            } else {
                self.records.remove(&id);
                self.forget_halves(id);
            }
        }
        for (id, mut staged) in halves {
            if !self.records.contains_key(&id) {
                continue;
            }
            let bytes: usize = staged.iter().map(|(_, m)| m.encoded_len()).sum();
            if self.half_bytes + bytes > RECENT_BYTES {
                // Incomplete from here on: a later resolution reads the database.
                self.forget_halves(id);
                self.records.remove(&id);
                continue;
            }
            self.half_bytes += bytes;
            self.halves.entry(id).or_default().append(&mut staged);
        }
    }

    pub(super) fn take_halves(&mut self, id: Id) -> Vec<(u32, pb::StoredMessage)> {
        let halves = self.halves.remove(&id).unwrap_or_default();
        let bytes: usize = halves.iter().map(|(_, m)| m.encoded_len()).sum();
        self.half_bytes = self.half_bytes.saturating_sub(bytes);
        halves
    }

    fn forget_halves(&mut self, id: Id) {
        self.take_halves(id);
    }
}
