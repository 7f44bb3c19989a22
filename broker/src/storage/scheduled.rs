//! Reads of scheduled messages: one by id, the next delivery time, the count at start-up,
//! and the paged listing. Finding what is due is [`Storage::due`] with
//! [`DueKind::Deliver`], like check-backs.

use rocksdb::{Direction, IteratorMode, ReadOptions};
use txmq_protocol::pb;

use super::keys::{self, DueKind};
use super::records::{SchedRecord, SchedState};
use super::{Cf, Storage, decode};
use crate::error::Result;
use crate::ids::Id;

/// Most due-index entries one listing page looks at when it filters by topic: a page of
/// a rare topic among millions of others' stops there and says where to go on.
const LIST_SCAN: usize = 100_000;

/// One page of [`Storage::scheduled_page`].
#[derive(Debug, Default)]
pub struct ScheduledPage {
    /// What it found, earliest first.
    pub scheduled: Vec<pb::ScheduledInfo>,
    /// There may be more after `resume`.
    pub more: bool,
    /// The last entry looked at (delivery time, id), to go on from.
    pub resume: Option<(u64, Id)>,
}

impl Storage {
    /// The record of a scheduled message.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn scheduled(&self, id: Id) -> Result<Option<SchedRecord>> {
        self.db
            .get_pinned_cf(self.cf(Cf::Sched), id.to_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    /// The earliest entry of `kind` in the due index, if any: one seek.
    ///
    /// # Errors
    /// Storage failure.
    pub fn next_due(&self, kind: DueKind) -> Result<Option<u64>> {
        let zero = Id { boot: 0, seq: 0 };
        let mut it = self.db.raw_iterator_cf(self.cf(Cf::Due));
        it.seek(keys::due(kind, 0, zero));
        if it.valid()
            && let Some(k) = it.key()
            && let Some((k_kind, at, _)) = keys::parse_due(k)
            && k_kind == kind as u8
        {
            return Ok(Some(at));
        }
        it.status()?;
        Ok(None)
    }

    /// Scheduled messages waiting, counted through the due index (at start-up, for the
    /// pending gauge): one key per message, no values read.
    ///
    /// # Errors
    /// Storage failure.
    pub fn count_scheduled(&self) -> Result<u64> {
        let zero = Id { boot: 0, seq: 0 };
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::due(DueKind::Deliver, u64::MAX, zero).to_vec());
        let start = keys::due(DueKind::Deliver, 0, zero);
        let it = self.db.iterator_cf_opt(
            self.cf(Cf::Due),
            ro,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut n = 0;
        for item in it {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// Up to `limit` scheduled messages still waiting, earliest first, after `after`
    /// (delivery time and id), of `topic` only when it is not empty, and about
    /// `max_bytes` of them at most (keys and tags run to 64 KiB each).
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn scheduled_page(
        &self,
        topic: &str,
        after: Option<(u64, Id)>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<ScheduledPage> {
        let zero = Id { boot: 0, seq: 0 };
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::due(DueKind::Deliver, u64::MAX, zero).to_vec());
        let mut it = self.db.raw_iterator_cf_opt(self.cf(Cf::Due), ro);
        match after {
            Some((ms, id)) => {
                it.seek(keys::due(DueKind::Deliver, ms, id));
                if it.valid() && it.key() == Some(&keys::due(DueKind::Deliver, ms, id)[..]) {
                    it.next();
                }
            }
            None => it.seek(keys::due(DueKind::Deliver, 0, zero)),
        }
        let mut page = ScheduledPage::default();
        let mut looked = 0;
        let mut bytes = 0;
        while it.valid() {
            let Some((_, at, id)) = it.key().and_then(keys::parse_due) else {
                it.next();
                continue;
            };
            if page.scheduled.len() >= limit || looked >= LIST_SCAN || bytes > max_bytes {
                page.more = true;
                break;
            }
            looked += 1;
            page.resume = Some((at, id));
            if let Some(rec) = self.scheduled(id)?
                && rec.state() == SchedState::Waiting
                && (topic.is_empty() || rec.topic == topic)
                && let Some(m) = rec.message
            {
                let info = pb::ScheduledInfo {
                    message_id: m.message_id,
                    topic: m.topic,
                    deliver_ms: rec.deliver_ms,
                    key: m.key,
                    tag: m.tag,
                    body_len: m.body.len() as u32,
                    txn_id: m.txn_id,
                };
                bytes += prost::Message::encoded_len(&info) + 8;
                page.scheduled.push(info);
            }
            it.next();
        }
        it.status()?;
        Ok(page)
    }
}
