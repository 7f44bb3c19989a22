//! Failed deliveries: the retry schedule, the dead-letter queue, and redrive.
//!
//! An offset in the queue's `retry` map is to be delivered again. What a restart knows of
//! it is the one thing the ack floor cares about, so each entry says it
//! ([`Redelivery::kept`]):
//!
//! - [`Kept::Stored`]: a retry record in `Cf::Retry` (after a nack, an expired lease, a
//!   consumer that left, a redrive, or a crowded floor passing a leased or held offset).
//!   After a restart the record brings it back, so the floor may pass it. While it is
//!   leased again (see `pump`) the entry stays: its lease decides what comes next, and
//!   the record still covers a crash meanwhile. While it is held behind its message
//!   group's head (an ordered group) it is not in the due index: it is due when the head
//!   is done.
//! - [`Kept::InMemory`]: due again at once because no consumer could take it when it was
//!   read (a closed or stalled connection, a receive that returned meanwhile). Nothing is
//!   written for it, so the floor stops at it: passing it would lose it at the next
//!   restart. Once it is delivered the entry goes; its lease stops the floor in turn.

use super::*;

/// A message to deliver again, and whether a stored record says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Redelivery {
    /// Deliveries that counted so far.
    pub(super) attempts: u32,
    /// When it is due (broker clock, ms).
    pub(super) due_ms: u64,
    /// What a restart knows of it.
    pub(super) kept: Kept,
}

/// Whether a redelivery survives a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kept {
    /// A retry record is stored (or in the same write as the change that made it).
    Stored,
    /// Known to this run only: the ack floor must not pass it.
    InMemory,
}

impl Redelivery {
    /// A stored one: what its record says.
    pub(super) fn stored(attempts: u32, due_ms: u64) -> Self {
        Self {
            attempts,
            due_ms,
            kept: Kept::Stored,
        }
    }

    /// Read back from its record.
    pub(super) fn from_record(rec: &RetryRecord) -> Self {
        Self::stored(rec.attempts, rec.due_ms)
    }

    /// Its record, to store.
    pub(super) fn record(&self) -> RetryRecord {
        RetryRecord {
            attempts: self.attempts,
            due_ms: self.due_ms,
        }
    }

    /// Whether the ack floor may pass it.
    pub(super) fn is_stored(&self) -> bool {
        self.kept == Kept::Stored
    }
}

impl Queue {
    /// A delivery returned unprocessed by a consumer that unsubscribed: due again at once,
    /// and this attempt does not count.
    pub(super) fn give_back(&mut self, offset: u64, lease: Lease) -> Vec<Op> {
        let rec = Redelivery::stored(lease.attempt.saturating_sub(1), now_ms());
        self.schedule(offset, rec)
    }

    /// A delivery failed (nack, expiry, disconnect): schedule it again, or dead-letter it
    /// once it has been delivered `max_attempts` times.
    pub(super) fn fail(
        &mut self,
        offset: u64,
        lease: Lease,
        delay: Option<Duration>,
        why: &str,
    ) -> Vec<Op> {
        if lease.attempt >= self.max_attempts() {
            let reason = format!("{why} on attempt {}", lease.attempt);
            return self.dead_letter(offset, lease, &reason);
        }
        let delay = delay.unwrap_or_else(|| self.config.nack_wait(lease.attempt));
        let rec = Redelivery::stored(
            lease.attempt,
            now_ms().saturating_add(delay.as_millis() as u64),
        );
        self.schedule(offset, rec)
    }

    /// Puts `offset` in the retry schedule (replacing what was there); returns the write
    /// of its record when it is to be stored.
    pub(super) fn schedule(&mut self, offset: u64, rec: Redelivery) -> Vec<Op> {
        if let Some(old) = self.retry.insert(offset, rec) {
            self.retry_due.remove(&(old.due_ms, offset));
        }
        self.retry_due.insert((rec.due_ms, offset));
        match rec.kept {
            Kept::Stored => vec![Op::Put(
                Cf::Retry,
                keys::group_offset(&self.group, self.topic.id, offset),
                rec.record().encode_to_vec(),
            )],
            Kept::InMemory => Vec::new(),
        }
    }

    /// Moves a delivery to the group's dead letters, now; returns the writes.
    pub(super) fn dead_letter(&mut self, offset: u64, lease: Lease, reason: &str) -> Vec<Op> {
        self.dead_letters += 1;
        self.metrics.dead_letters.inc();
        let record = DeadLetterRecord {
            topic: self.topic.name.clone(),
            offset,
            reason: reason.to_string(),
            attempts: lease.attempt,
            dead_ms: now_ms(),
        };
        let mut ops = vec![Op::Put(
            Cf::Dlq,
            keys::dead_letter(&self.group, self.topic.id, offset),
            record.encode_to_vec(),
        )];
        ops.extend(self.mark_acked(offset));
        ops.extend(self.advance_floor());
        if self.dead_recent.len() >= super::acks::RECENT_DEAD {
            self.dead_recent.pop_front();
        }
        self.dead_recent.push_back(offset);
        if self.fifo.is_some() {
            // Dead-lettered: the next of its message group may go, once this write
            // is durable (a crash before would bring it back after the next).
            self.dead_unreleased.push(offset);
        }
        ops
    }

    /// Redriven messages sit below the floor yet are not done.
    pub(super) fn redriven_below_floor(&self) -> u64 {
        let floor = self.floor();
        let acked = |o: &u64| *o < floor || self.acked.contains(o);
        self.retry.keys().filter(|o| acked(o)).count() as u64
            + self.leases.keys().filter(|o| acked(o)).count() as u64
    }

    pub(super) async fn redrive(&mut self, message_id: Option<String>) -> Result<u32> {
        let storage = self.storage.clone();
        let (group, topic) = (self.group.clone(), self.topic.id);
        let letters = tokio::task::spawn_blocking(move || storage.dead_letters(&group, topic))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let mut ops = Vec::new();
        let mut moved = Vec::new();
        for (offset, _) in letters {
            if let Some(id) = &message_id {
                let storage = self.storage.clone();
                let m = tokio::task::spawn_blocking(move || storage.read_message(topic, offset))
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))??;
                if m.is_none_or(|m| &m.message_id != id) {
                    continue;
                }
            }
            let rec = Redelivery::stored(0, now_ms());
            let key = keys::group_offset(&self.group, topic, offset);
            ops.push(Op::Delete(Cf::Dlq, key.clone()));
            ops.push(Op::Put(Cf::Retry, key, rec.record().encode_to_vec()));
            // Out of the dead letters: an ack of its new lease, repeated, may be OK.
            self.dead_recent.retain(|o| *o != offset);
            moved.push((offset, rec));
        }
        if ops.is_empty() {
            return Ok(0);
        }
        self.writer.submit(Command::Raw(ops)).await?;
        let n = moved.len() as u32;
        for (offset, rec) in moved {
            self.retry_due.insert((rec.due_ms, offset));
            self.retry.insert(offset, rec);
        }
        self.dead_letters = self.dead_letters.saturating_sub(u64::from(n));
        Ok(n)
    }

    /// Retention removed the topic's messages below its start: a group behind it moves
    /// on to the oldest message kept, counting what it had neither acked nor had out
    /// (durably, in its cursor; and in the log and the metrics). It never stalls on a
    /// gap.
    pub(super) async fn follow_retention(&mut self) {
        let start = self.topic.start();
        let Some(floor) = self.cursor.as_ref().map(|c| c.ack_floor) else {
            return;
        };
        if start <= floor {
            return;
        }
        let mut ops = Vec::new();
        let acked: Vec<u64> = self.acked.range(floor..start).copied().collect();
        for o in &acked {
            self.acked.remove(o);
            ops.push(Op::Delete(
                Cf::Acked,
                keys::group_offset(&self.group, self.topic.id, *o),
            ));
        }
        let gone: Vec<u64> = self.retry.keys().filter(|o| **o < start).copied().collect();
        for o in gone {
            if let Some(rec) = self.retry.remove(&o) {
                self.retry_due.remove(&(rec.due_ms, o));
            }
            if let Some(fifo) = self.fifo.as_mut() {
                // A head waiting for redelivery is gone: its group moves on (what was
                // held behind it below the start goes the same way, see the pump).
                fifo.done(o);
            }
            ops.push(Op::Delete(
                Cf::Retry,
                keys::group_offset(&self.group, self.topic.id, o),
            ));
        }
        // Dead letters of messages that are gone: listed without their message and
        // redriven to nowhere, they would only pile up.
        let storage = self.storage.clone();
        let (group, id) = (self.group.clone(), self.topic.id);
        let dead = tokio::task::spawn_blocking(move || {
            storage
                .dead_letters_from(&group, id, 0, usize::MAX)
                .map(|all| all.into_iter().filter(|(o, _)| *o < start).count() as u64)
        })
        .await;
        if let Ok(Ok(dead)) = dead
            && dead > 0
        {
            ops.push(Op::DeleteRange(
                Cf::Dlq,
                keys::dead_letter(&self.group, self.topic.id, 0),
                keys::dead_letter(&self.group, self.topic.id, start),
            ));
            self.dead_letters = self.dead_letters.saturating_sub(dead);
        }
        ops.push(Op::DeleteRange(
            Cf::Attempts,
            keys::group_offset(&self.group, self.topic.id, 0),
            keys::group_offset(&self.group, self.topic.id, start),
        ));
        let out = self
            .leases
            .keys()
            .filter(|o| (floor..start).contains(*o))
            .count() as u64;
        let skipped = (start - floor).saturating_sub(acked.len() as u64 + out);
        let cursor = self.cursor.as_mut().expect("checked above");
        cursor.ack_floor = start;
        cursor.skipped += skipped;
        ops.push(Op::Put(
            Cf::Cursor,
            keys::cursor(&self.group, self.topic.id),
            cursor.encode_to_vec(),
        ));
        self.next = self.next.max(start);
        if skipped > 0 {
            self.metrics
                .retention_skipped
                .with_label_values(&[self.group.as_str()])
                .inc_by(skipped);
            tracing::warn!(
                group = %self.group,
                topic = %self.topic.name,
                skipped,
                "retention removed messages this group had not acked; it moves on to offset {start}"
            );
        }
        self.write_quietly(ops).await;
    }

    /// Moves the group's position to `to` (clamped to the topic's start and end) while
    /// no consumer is connected: acks, retries and leases of the group on this topic
    /// start over from there, durably, before the answer.
    pub(super) async fn reset(&mut self, to: u64) -> Result<u64> {
        if !self.consumers.is_empty() {
            return Err(Error::Invalid(format!(
                "group {:?} has {} consumer(s) on topic {:?}: stop them before a reset",
                self.group,
                self.consumers.len(),
                self.topic.name
            )));
        }
        let Some(mut cursor) = self.cursor.clone() else {
            return Err(Error::GroupNotFound(
                self.group.clone(),
                self.topic.name.clone(),
            ));
        };
        let to = to.max(self.topic.start()).min(self.topic.end());
        let mut ops = Vec::new();
        for o in &self.acked {
            ops.push(Op::Delete(
                Cf::Acked,
                keys::group_offset(&self.group, self.topic.id, *o),
            ));
        }
        for (o, _) in self.retry.iter().filter(|(_, r)| r.is_stored()) {
            ops.push(Op::Delete(
                Cf::Retry,
                keys::group_offset(&self.group, self.topic.id, *o),
            ));
        }
        cursor.ack_floor = to;
        cursor.first_offset = to;
        // What messages from `to` on took is history of a past that is delivered again.
        let prefix = keys::cursor(&self.group, self.topic.id);
        ops.push(Op::DeleteRange(
            Cf::Attempts,
            keys::group_offset(&self.group, self.topic.id, to),
            keys::prefix_end(&prefix).expect("a group name is not all 0xff"),
        ));
        ops.push(Op::Put(
            Cf::Cursor,
            keys::cursor(&self.group, self.topic.id),
            cursor.encode_to_vec(),
        ));
        // Durable first: a failed write changes nothing here.
        self.writer.submit(Command::Raw(ops)).await?;
        self.acked.clear();
        self.retry.clear();
        self.retry_due.clear();
        self.leases.clear();
        self.deadlines.clear();
        self.dead_unreleased.clear();
        self.dead_recent.clear();
        if self.fifo.is_some() {
            self.fifo = Some(Fifo::default());
        }
        self.next = to;
        self.cursor = Some(cursor);
        tracing::info!(group = %self.group, topic = %self.topic.name, to, "group reset");
        Ok(to)
    }

    /// Deletes the group's state on this topic while no consumer is connected (with
    /// `force`, the topic goes: they are dropped): its cursor, acks, retries and dead
    /// letters, in one durable write.
    pub(super) async fn delete(&mut self, force: bool) -> Result<()> {
        if !self.consumers.is_empty() && !force {
            return Err(Error::Invalid(format!(
                "group {:?} has {} consumer(s) on topic {:?}: stop them before deleting it",
                self.group,
                self.consumers.len(),
                self.topic.name
            )));
        }
        let prefix = keys::cursor(&self.group, self.topic.id);
        let end = keys::prefix_end(&prefix).expect("a group name is not all 0xff");
        let mut ops = vec![Op::Delete(Cf::Cursor, prefix.clone())];
        for cf in [Cf::Acked, Cf::Retry, Cf::Dlq, Cf::Attempts] {
            ops.push(Op::DeleteRange(cf, prefix.clone(), end.clone()));
        }
        self.writer.submit(Command::Raw(ops)).await?;
        self.metrics
            .ordered_blocked_groups
            .sub(std::mem::take(&mut self.reported_blocked));
        tracing::info!(group = %self.group, topic = %self.topic.name, "group deleted");
        Ok(())
    }
}
