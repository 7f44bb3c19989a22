//! Reads a topic's deletion needs: what still refers to it outside its log. Operators'
//! work, rare: each is one scan of a column family.

use rocksdb::IteratorMode;
use txmq_protocol::pb::TxnState;

use super::records::{SchedRecord, SchedState, TxnRecord};
use super::{Cf, Storage, decode, keys};
use crate::error::Result;
use crate::ids::Id;

impl Storage {
    /// Open transactions (prepared or discarded) with a message for topic `name`.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn open_txns_on(&self, name: &str) -> Result<Vec<Id>> {
        self.open_txns_on_from(name, None)
    }

    /// [`Storage::open_txns_on`] among the transactions made from `from` on (ids are
    /// ordered by creation), or all of them.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn open_txns_on_from(&self, name: &str, from: Option<Id>) -> Result<Vec<Id>> {
        let mut out = Vec::new();
        let start = from.map(|id| id.to_bytes());
        let mode = match &start {
            Some(key) => IteratorMode::From(key, rocksdb::Direction::Forward),
            None => IteratorMode::Start,
        };
        for item in self.db.iterator_cf(self.cf(Cf::Txn), mode) {
            let (k, v) = item?;
            let rec: TxnRecord = decode(&v)?;
            let open =
                rec.state == TxnState::Prepared as i32 || rec.state == TxnState::Discarded as i32;
            if open
                && rec.topics.iter().any(|t| t == name)
                && let Some(id) = Id::from_bytes(&k)
            {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Scheduled messages for topic `name` still waiting, among those made before
    /// `fence`.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn waiting_scheduled_on(&self, name: &str, fence: Id) -> Result<Vec<Id>> {
        let mut out = Vec::new();
        let end = fence.to_bytes();
        for item in self.db.iterator_cf(self.cf(Cf::Sched), IteratorMode::Start) {
            let (k, v) = item?;
            if k.as_ref() >= end.as_slice() {
                break;
            }
            let rec: SchedRecord = decode(&v)?;
            if rec.topic == name
                && rec.state() == SchedState::Waiting
                && let Some(id) = Id::from_bytes(&k)
            {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Groups with a cursor on topic `topic_id`.
    ///
    /// # Errors
    /// Storage failure.
    pub fn groups_on(&self, topic_id: u32) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(Cf::Cursor), IteratorMode::Start)
        {
            let (k, _) = item?;
            if let Some((group, id)) = keys::parse_cursor(&k)
                && id == topic_id
            {
                out.push(group);
            }
        }
        Ok(out)
    }
}
