//! The writer's part for transactions: it applies the state machine of
//! [`crate::txn::state`] to records, half messages and the due index in one batch.

use prost::Message;
use txmq_protocol::pb::{self, TxnOutcome, TxnState};

use super::{Outcome, Stage, Writer};
use crate::error::{Error, Result};
use crate::ids::Id;
use crate::storage::Cf;
use crate::storage::keys::{self, DueKind};
use crate::storage::records::TxnRecord;
use crate::txn::state::{self, Resolution, Resolver};

impl Writer {
    pub(super) fn txn_record(&self, txn: Id, stage: &Stage) -> Result<Option<TxnRecord>> {
        if stage.purged.contains(&txn) {
            return Ok(None);
        }
        match stage
            .txns
            .get(&txn)
            .or_else(|| self.recent.records.get(&txn))
        {
            Some(r) => Ok(Some(r.clone())),
            None => self.storage.txn(txn),
        }
    }

    pub(super) fn put_txn(&self, txn: Id, rec: TxnRecord, stage: &mut Stage) {
        stage.batch.put_cf(
            self.storage.cf(Cf::Txn),
            txn.to_bytes(),
            rec.encode_to_vec(),
        );
        stage.txns.insert(txn, rec);
    }

    pub(super) fn move_check(&self, txn: Id, from_ms: u64, to_ms: u64, stage: &mut Stage) {
        let due = self.storage.cf(Cf::Due);
        if from_ms != 0 {
            stage
                .batch
                .delete_cf(due, keys::due(DueKind::Check, from_ms, txn));
        }
        if to_ms != 0 {
            stage
                .batch
                .put_cf(due, keys::due(DueKind::Check, to_ms, txn), []);
        }
    }

    pub(super) fn prepare(
        &mut self,
        txn: Option<Id>,
        group: String,
        messages: Vec<pb::Message>,
        bytes: u64,
        check_delay_ms: u64,
        stage: &mut Stage,
    ) -> Result<Outcome> {
        let now = self.clock.now();
        // Everything that can refuse the request comes first: a refusal stages nothing (a
        // due entry staged before a refused topic once stayed behind without a record).
        let (txn, mut rec, new) = match txn {
            Some(id) => {
                let rec = self
                    .txn_record(id, stage)?
                    .ok_or_else(|| Error::TxnNotFound(id.to_string()))?;
                crate::txn::state::can_add(id, &rec, &group)?;
                (id, rec, false)
            }
            None => {
                let delay = if check_delay_ms > 0 {
                    check_delay_ms
                } else {
                    self.config.check_timeout.as_millis() as u64
                };
                let rec = TxnRecord {
                    group,
                    state: TxnState::Prepared as i32,
                    created_ms: now,
                    next_check_ms: now.saturating_add(delay),
                    scoped_checks: true,
                    ..Default::default()
                };
                (self.ids.next_secret(), rec, true)
            }
        };
        crate::txn::state::fits(txn, &rec, bytes, self.config.max_txn_bytes)?;
        // Topics are created at prepare time so a commit can never fail on a missing topic.
        self.topics_for(&messages, stage)?;
        if new {
            self.move_check(txn, 0, rec.next_check_ms, stage);
        }
        rec.bytes += bytes;
        let half = self.storage.cf(Cf::Half);
        let mut receipts = Vec::with_capacity(messages.len());
        for m in messages {
            let mut stored = self.stored(m, now);
            stored.txn_id = txn.to_string();
            if !rec.topics.contains(&stored.topic) {
                rec.topics.push(stored.topic.clone());
            }
            receipts.push(pb::MessageReceipt {
                message_id: stored.message_id.clone(),
                topic: stored.topic.clone(),
                offset: 0,
                // Scheduled from the commit on, if its time has not passed by then.
                deliver_ms: stored.deliver_ms,
            });
            stage.batch.put_cf(
                half,
                keys::half(txn, rec.message_count),
                stored.encode_to_vec(),
            );
            stage
                .halves
                .entry(txn)
                .or_default()
                .push((rec.message_count, stored));
            rec.message_count += 1;
        }
        self.put_txn(txn, rec, stage);
        stage.tally.halves_sent += receipts.len() as u64;
        Ok(Outcome::Prepared { txn, receipts })
    }

    pub(super) fn end(
        &mut self,
        txn: Id,
        outcome: TxnOutcome,
        by: Resolver,
        stage: &mut Stage,
    ) -> Result<Outcome> {
        let mut rec = self
            .txn_record(txn, stage)?
            .ok_or_else(|| Error::TxnNotFound(txn.to_string()))?;
        state::may_end(txn, &rec, &by)?;
        let state = TxnState::try_from(rec.state).unwrap_or(TxnState::Prepared);
        let wanted = match state::resolve(txn, state, outcome)? {
            Resolution::Apply(wanted) => wanted,
            Resolution::Repeat(state) => {
                return Ok(Outcome::Ended {
                    state,
                    repeated: true,
                    receipts: Vec::new(),
                });
            }
            Resolution::RecordUnknown => {
                if state == TxnState::Prepared || state == TxnState::Discarded {
                    rec.last_result = TxnOutcome::Unknown as i32;
                    rec.last_note = format!("{} answered unknown", by.note());
                    self.put_txn(txn, rec, stage);
                }
                return Ok(Outcome::Ended {
                    state,
                    repeated: false,
                    receipts: Vec::new(),
                });
            }
        };
        let note = by.note().to_string();
        if wanted == TxnState::Committed
            && let Some(name) = rec.topics.iter().find(|t| {
                self.doomed
                    .get(*t)
                    .is_some_and(|(fence, forced)| *forced && txn < *fence)
            })
        {
            return Err(Error::Invalid(format!(
                "topic {name:?} of transaction {txn} was deleted with --force: the \
                 transaction is being rolled back"
            )));
        }
        if wanted == TxnState::Committed {
            // Its topics were created at prepare time; one deleted since is created
            // again where sends may create topics (as a send would), else the commit is
            // refused and the transaction stays prepared (an operator may roll it back).
            let missing: Vec<String> = rec
                .topics
                .iter()
                .filter(|t| self.topic(t, stage).is_none())
                .cloned()
                .collect();
            if let Some(first) = missing.first()
                && !self.config.auto_create_topics
            {
                return Err(Error::TopicNotFound(first.clone()));
            }
            for name in missing {
                self.create_topic(name, stage);
            }
        }
        // Staged in this very batch (the database does not have them yet), or remembered
        // from an earlier one; whatever is missing is read.
        let mut known = self.recent.take_halves(txn);
        known.extend(stage.halves.remove(&txn).unwrap_or_default());
        let halves = if known.len() == rec.message_count as usize {
            known.sort_unstable_by_key(|(seq, _)| *seq);
            known.into_iter().map(|(_, m)| m).collect()
        } else {
            self.storage.halves_by_seq(txn, rec.message_count, known)?
        };
        let mut receipts = Vec::new();
        if wanted == TxnState::Committed {
            let topics = halves
                .iter()
                .map(|m| {
                    self.topic(&m.topic, stage).ok_or_else(|| {
                        Error::Internal(format!("topic {} of a transaction vanished", m.topic))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let now = self.clock.now();
            for (mut m, topic) in halves.into_iter().zip(topics) {
                m.store_ms = now;
                // A scheduled message of the transaction is held back from here (I8).
                receipts.push(self.append_or_schedule(&topic, m, now, stage));
            }
        }
        // Point deletes, not a range delete: every read of the memtable pays for each
        // range tombstone in it, which made commits cost more the more there had been.
        let half = self.storage.cf(Cf::Half);
        for seq in 0..rec.message_count {
            stage.batch.delete_cf(half, keys::half(txn, seq));
        }
        let now = self.clock.now();
        self.move_check(txn, rec.next_check_ms, 0, stage);
        rec.state = wanted as i32;
        rec.next_check_ms = 0;
        rec.resolved_ms = now;
        rec.purge_ms = now + self.config.txn_retention.as_millis() as u64;
        rec.last_note = note;
        stage.batch.put_cf(
            self.storage.cf(Cf::Due),
            keys::due(DueKind::Purge, rec.purge_ms, txn),
            [],
        );
        stage.tally.halves_removed += u64::from(rec.message_count);
        if wanted == TxnState::Committed {
            stage.tally.committed += 1;
        } else {
            stage.tally.rolled_back += 1;
        }
        self.put_txn(txn, rec, stage);
        Ok(Outcome::Ended {
            state: wanted,
            repeated: false,
            receipts,
        })
    }

    pub(super) fn record_check(
        &mut self,
        txn: Id,
        counted: bool,
        result: TxnOutcome,
        note: String,
        next_check_ms: Option<u64>,
        stage: &mut Stage,
    ) -> Result<Outcome> {
        let Some(mut rec) = self.txn_record(txn, stage)? else {
            return Ok(Outcome::Done);
        };
        if rec.state != TxnState::Prepared as i32 {
            return Ok(Outcome::Done);
        }
        if counted {
            rec.check_count += 1;
        }
        if result != TxnOutcome::Unspecified {
            rec.last_result = result as i32;
        }
        rec.last_note = note;
        if let Some(next) = next_check_ms {
            self.move_check(txn, rec.next_check_ms, next, stage);
            rec.next_check_ms = next;
        }
        self.put_txn(txn, rec, stage);
        Ok(Outcome::Done)
    }

    pub(super) fn discard(&mut self, txn: Id, stage: &mut Stage) -> Result<Outcome> {
        let Some(mut rec) = self.txn_record(txn, stage)? else {
            return Ok(Outcome::Done);
        };
        if rec.state != TxnState::Prepared as i32 {
            return Ok(Outcome::Done);
        }
        self.move_check(txn, rec.next_check_ms, 0, stage);
        rec.state = TxnState::Discarded as i32;
        rec.next_check_ms = 0;
        // Kept for operators a while, then purged with its half messages (a re-arm or a
        // resolution before then moves purge_ms, and this entry no longer matches).
        rec.purge_ms = self
            .clock
            .now()
            .saturating_add(self.config.discarded_retention.as_millis() as u64);
        stage.batch.put_cf(
            self.storage.cf(Cf::Due),
            keys::due(DueKind::Purge, rec.purge_ms, txn),
            [],
        );
        rec.last_note = format!(
            "discarded after {} checks without an answer; txn rearm|commit|rollback \
             before it is purged",
            rec.check_count
        );
        stage.tally.discarded += 1;
        self.put_txn(txn, rec, stage);
        Ok(Outcome::Done)
    }

    pub(super) fn rearm(&mut self, txn: Id, stage: &mut Stage) -> Result<Outcome> {
        let mut rec = self
            .txn_record(txn, stage)?
            .ok_or_else(|| Error::TxnNotFound(txn.to_string()))?;
        match TxnState::try_from(rec.state) {
            Ok(TxnState::Prepared | TxnState::Discarded) => {}
            Ok(TxnState::Committed) => {
                return Err(Error::TxnNotRearmable(txn.to_string(), "committed"));
            }
            _ => return Err(Error::TxnNotRearmable(txn.to_string(), "rolled back")),
        }
        let now = self.clock.now();
        self.move_check(txn, rec.next_check_ms, now, stage);
        rec.state = TxnState::Prepared as i32;
        rec.check_count = 0;
        rec.next_check_ms = now;
        // No longer to be purged: a prepared transaction is checked, never purged.
        rec.purge_ms = 0;
        rec.last_note = "re-armed by an operator".into();
        self.put_txn(txn, rec.clone(), stage);
        Ok(Outcome::Txn(Box::new(rec)))
    }

    pub(super) fn purge(&mut self, txn: Id, due_ms: u64, stage: &mut Stage) -> Result<Outcome> {
        let due = self.storage.cf(Cf::Due);
        stage
            .batch
            .delete_cf(due, keys::due(DueKind::Purge, due_ms, txn));
        let Some(rec) = self.txn_record(txn, stage)? else {
            return Ok(Outcome::Done);
        };
        if rec.purge_ms != due_ms {
            return Ok(Outcome::Done);
        }
        if rec.state == TxnState::Discarded as i32 {
            // Kept for operators long enough: its half messages go with it.
            let half = self.storage.cf(Cf::Half);
            for seq in 0..rec.message_count {
                stage.batch.delete_cf(half, keys::half(txn, seq));
            }
            let _ = self.recent.take_halves(txn);
            stage.halves.remove(&txn);
            stage.tally.halves_removed += u64::from(rec.message_count);
            tracing::info!(%txn, group = %rec.group, messages = rec.message_count,
                "discarded transaction purged after discarded-retention");
        } else if rec.resolved_ms == 0 {
            // Prepared: checked, never purged.
            return Ok(Outcome::Done);
        }
        stage
            .batch
            .delete_cf(self.storage.cf(Cf::Txn), txn.to_bytes());
        stage.txns.remove(&txn);
        stage.purged.insert(txn);
        Ok(Outcome::Done)
    }
}
