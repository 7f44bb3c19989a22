//! Reads of consumer-group state: cursors, acks above the floor, retries, dead letters.

use rocksdb::IteratorMode;

use super::records::{CursorRecord, DeadLetterRecord, RetryRecord};
use super::{Cf, Storage, decode, keys};
use crate::error::Result;

impl Storage {
    /// Every consumer-group cursor.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn cursors(&self) -> Result<Vec<(String, u32, CursorRecord)>> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(Cf::Cursor), IteratorMode::Start)
        {
            let (k, v) = item?;
            if let Some((group, topic)) = keys::parse_cursor(&k) {
                out.push((group, topic, decode(&v)?));
            }
        }
        Ok(out)
    }

    /// At most `limit` cursors after `(group, topic id)` (from the first when `None`), in
    /// key order.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn cursors_after(
        &self,
        after: Option<(String, u32)>,
        limit: usize,
    ) -> Result<Vec<(String, u32, CursorRecord)>> {
        let mut out = Vec::new();
        let mut it = self.db.raw_iterator_cf(self.cf(Cf::Cursor));
        match &after {
            Some((group, topic)) => {
                let key = keys::cursor(group, *topic);
                it.seek(&key);
                if it.valid() && it.key() == Some(key.as_slice()) {
                    it.next();
                }
            }
            None => it.seek_to_first(),
        }
        while it.valid() && out.len() < limit {
            if let (Some(k), Some(v)) = (it.key(), it.value())
                && let Some((group, topic)) = keys::parse_cursor(k)
            {
                out.push((group, topic, decode(v)?));
            }
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// The topic ids a group has a cursor on (a prefix scan of that group's keys only).
    ///
    /// # Errors
    /// Storage failure.
    pub fn topics_of_group(&self, group: &str) -> Result<Vec<u32>> {
        let prefix = keys::group_prefix(group);
        let mut out = Vec::new();
        let mut it = self.db.raw_iterator_cf(self.cf(Cf::Cursor));
        it.seek(&prefix);
        while it.valid() {
            let Some(k) = it.key() else { break };
            if !k.starts_with(&prefix) {
                break;
            }
            if let Some((g, topic)) = keys::parse_cursor(k)
                && g == group
            {
                out.push(topic);
            }
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Distinct consumer groups (a scan of the cursors: for operators' stats only).
    ///
    /// # Errors
    /// Storage failure.
    pub fn count_groups(&self) -> Result<u64> {
        let mut n = 0;
        let mut last: Option<String> = None;
        let mut it = self.db.raw_iterator_cf(self.cf(Cf::Cursor));
        it.seek_to_first();
        while it.valid() {
            if let Some((group, _)) = it.key().and_then(keys::parse_cursor)
                && last.as_ref() != Some(&group)
            {
                n += 1;
                last = Some(group);
            }
            it.next();
        }
        it.status()?;
        Ok(n)
    }

    /// One cursor.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn cursor(&self, group: &str, topic_id: u32) -> Result<Option<CursorRecord>> {
        self.db
            .get_pinned_cf(self.cf(Cf::Cursor), keys::cursor(group, topic_id))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Offsets acknowledged above a group's floor.
    ///
    /// # Errors
    /// Storage failure.
    pub fn acked(&self, group: &str, topic_id: u32) -> Result<Vec<u64>> {
        self.group_entries(Cf::Acked, group, topic_id, |off, _| Ok(off))
    }

    /// Messages of a group waiting for redelivery.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn retries(&self, group: &str, topic_id: u32) -> Result<Vec<(u64, RetryRecord)>> {
        self.group_entries(Cf::Retry, group, topic_id, |off, v| Ok((off, decode(v)?)))
    }

    /// Dead letters of a group on one topic.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn dead_letters(&self, group: &str, topic_id: u32) -> Result<Vec<(u64, DeadLetterRecord)>> {
        self.group_entries(Cf::Dlq, group, topic_id, |off, v| Ok((off, decode(v)?)))
    }

    /// Whether the group's dead letters on a topic hold `offset`.
    ///
    /// # Errors
    /// Storage failure.
    pub fn is_dead_letter(&self, group: &str, topic_id: u32, offset: u64) -> Result<bool> {
        Ok(self
            .db()
            .get_pinned_cf(self.cf(Cf::Dlq), keys::dead_letter(group, topic_id, offset))?
            .is_some())
    }

    /// At most `limit` dead letters of a group on a topic, from offset `from` on.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn dead_letters_from(
        &self,
        group: &str,
        topic_id: u32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, DeadLetterRecord)>> {
        let prefix = keys::cursor(group, topic_id);
        let mut out = Vec::new();
        let mut it = self.db.raw_iterator_cf(self.cf(Cf::Dlq));
        it.seek(keys::dead_letter(group, topic_id, from));
        while it.valid() && out.len() < limit {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if !k.starts_with(&prefix) || k.len() != prefix.len() + 8 {
                break;
            }
            if let Some(off) = keys::group_offset_offset(k) {
                out.push((off, decode(v)?));
            }
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    fn group_entries<T>(
        &self,
        cf: Cf,
        group: &str,
        topic_id: u32,
        mut map: impl FnMut(u64, &[u8]) -> Result<T>,
    ) -> Result<Vec<T>> {
        let prefix = keys::cursor(group, topic_id);
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(self.cf(cf), &prefix) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) || k.len() != prefix.len() + 8 {
                break;
            }
            if let Some(off) = keys::group_offset_offset(&k) {
                out.push(map(off, &v)?);
            }
        }
        Ok(out)
    }

    /// A group's entry for one message in `cf` (`Acked`, `Retry` or `Dlq`), if any.
    ///
    /// # Errors
    /// Storage failure.
    pub fn group_entry(
        &self,
        cf: Cf,
        group: &str,
        topic_id: u32,
        offset: u64,
    ) -> Result<Option<Vec<u8>>> {
        Ok(self
            .db
            .get_cf(self.cf(cf), keys::group_offset(group, topic_id, offset))?)
    }
}
