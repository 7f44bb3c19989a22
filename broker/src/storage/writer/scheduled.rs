//! The writer's part for scheduled messages: holding one back until its time, delivering
//! it into its topic then, cancelling it before, and forgetting what became of it.
//!
//! A scheduled message is stored whole under its id (`sched`) and found by time through
//! the due index, like a check-back (I5). Delivery appends it to its topic log, keeping
//! its id, in the same batch that deletes its due entry and marks it delivered: however
//! the broker stops, it is delivered once, and never before its time (I8).

use prost::Message;
use txmq_protocol::pb;

use super::{Outcome, Stage, Writer};
use crate::error::{Error, Result};
use crate::ids::Id;
use crate::storage::Cf;
use crate::storage::keys::{self, DueKind};
use crate::storage::records::{SchedRecord, SchedState};
use crate::topics::Topic;

/// How long the record of a delivered or cancelled message is kept, so that a late
/// cancel can tell "delivered" from "never scheduled".
const REMEMBER_MS: u64 = 24 * 3600 * 1000;

/// When a due message's topic is missing (it cannot be, while topics are never
/// deleted), its delivery is tried again this much later rather than lost.
const RETRY_MS: u64 = 60_000;

impl Writer {
    fn sched_record(&self, id: Id, stage: &Stage) -> Result<Option<SchedRecord>> {
        match stage.sched.get(&id) {
            Some(staged) => Ok(staged.clone()),
            None => self.storage.scheduled(id),
        }
    }

    fn put_sched(&self, id: Id, rec: SchedRecord, stage: &mut Stage) {
        stage.batch.put_cf(
            self.storage.cf(Cf::Sched),
            id.to_bytes(),
            rec.encode_to_vec(),
        );
        stage.sched.insert(id, Some(rec));
    }

    fn set_due(&self, kind: DueKind, at: u64, id: Id, stage: &mut Stage) {
        stage
            .batch
            .put_cf(self.storage.cf(Cf::Due), keys::due(kind, at, id), []);
    }

    fn clear_due(&self, kind: DueKind, at: u64, id: Id, stage: &mut Stage) {
        stage
            .batch
            .delete_cf(self.storage.cf(Cf::Due), keys::due(kind, at, id));
    }

    /// Appends `msg` to its topic now, or holds it back when its delivery time is still
    /// ahead of `now`.
    pub(super) fn append_or_schedule(
        &self,
        topic: &Topic,
        msg: pb::StoredMessage,
        now: u64,
        stage: &mut Stage,
    ) -> pb::MessageReceipt {
        let id = Id::parse(&msg.message_id);
        if msg.deliver_ms <= now || id.is_none() {
            // Due already (its time passed, or its transaction committed late): it goes
            // now, and a cancel can still tell it was delivered. (An unparsable id, which
            // this writer never makes, is better delivered now than lost.)
            let (deliver_ms, topic_name) = (msg.deliver_ms, msg.topic.clone());
            let receipt = self.append_one(topic, msg, stage);
            if deliver_ms > 0
                && let Some(id) = id
            {
                let rec = SchedRecord {
                    message: None,
                    deliver_ms,
                    topic: topic_name,
                    state: SchedState::Delivered as i32,
                    offset: receipt.offset,
                    forget_ms: 0,
                };
                self.remember(id, rec, now, stage);
            }
            return receipt;
        }
        let id = id.expect("checked above");
        let deliver_ms = msg.deliver_ms;
        let receipt = pb::MessageReceipt {
            message_id: msg.message_id.clone(),
            topic: msg.topic.clone(),
            offset: 0,
            deliver_ms,
        };
        self.set_due(DueKind::Deliver, deliver_ms, id, stage);
        let rec = SchedRecord {
            topic: msg.topic.clone(),
            message: Some(msg),
            deliver_ms,
            state: SchedState::Waiting as i32,
            offset: 0,
            forget_ms: 0,
        };
        self.put_sched(id, rec, stage);
        stage.tally.scheduled += 1;
        receipt
    }

    /// Delivers a message whose due entry came up; an entry that no longer matches a
    /// waiting message (cancelled, delivered, moved) is removed and nothing else happens.
    pub(super) fn deliver(&mut self, id: Id, due_ms: u64, stage: &mut Stage) -> Result<Outcome> {
        let now = self.clock.now();
        let rec = match self.sched_record(id, stage) {
            Ok(rec) => rec,
            Err(e) => {
                // Unreadable: tried again later, so one bad record cannot make every
                // pass full of it (the timer would spin and deliver nothing after it).
                tracing::error!(%id, "scheduled message unreadable, retried in a minute: {e}");
                self.clear_due(DueKind::Deliver, due_ms, id, stage);
                self.set_due(DueKind::Deliver, now.saturating_add(RETRY_MS), id, stage);
                return Ok(Outcome::Done);
            }
        };
        self.clear_due(DueKind::Deliver, due_ms, id, stage);
        let Some(mut rec) = rec else {
            return Ok(Outcome::Done);
        };
        if rec.state() != SchedState::Waiting || rec.deliver_ms != due_ms {
            return Ok(Outcome::Done);
        }
        let Some(mut msg) = rec.message.take() else {
            tracing::error!(%id, "scheduled message waits without its message: dropped");
            rec.state = SchedState::Cancelled as i32;
            stage.tally.cancelled += 1;
            self.remember(id, rec, now, stage);
            return Ok(Outcome::Done);
        };
        if self
            .doomed
            .get(&msg.topic)
            .is_some_and(|(fence, _)| id < *fence)
        {
            // Scheduled for a topic deleted since, whose cleanup has not cancelled it
            // yet: it goes with its topic, not into a new topic of that name.
            rec.message = Some(msg);
            rec.state = SchedState::Cancelled as i32;
            stage.tally.cancelled += 1;
            self.remember(id, rec, now, stage);
            return Ok(Outcome::Done);
        }
        // Its topic was created when it was scheduled; one deleted since is created again
        // where sends may create topics (a deletion cancels what was scheduled before it).
        let topic = match self.topic(&msg.topic, stage) {
            Some(t) => Some(t),
            None if self.config.auto_create_topics => {
                Some(self.create_topic(msg.topic.clone(), stage))
            }
            None => None,
        };
        let Some(topic) = topic else {
            tracing::error!(%id, topic = %msg.topic, "scheduled message's topic is missing");
            let later = now.saturating_add(RETRY_MS);
            rec.message = Some(msg);
            rec.deliver_ms = later;
            self.set_due(DueKind::Deliver, later, id, stage);
            self.put_sched(id, rec, stage);
            return Ok(Outcome::Done);
        };
        msg.store_ms = now;
        let receipt = self.append_one(&topic, msg, stage);
        stage.tally.delivered += 1;
        stage.tally.lateness_ms.push(now.saturating_sub(due_ms));
        rec.state = SchedState::Delivered as i32;
        rec.offset = receipt.offset;
        self.remember(id, rec, now, stage);
        Ok(Outcome::Done)
    }

    /// Cancels a waiting message. Cancelling it again is a no-op success; a delivered one
    /// is refused with where it went.
    pub(super) fn cancel_scheduled(&mut self, id: Id, stage: &mut Stage) -> Result<Outcome> {
        let mut rec = self
            .sched_record(id, stage)?
            .ok_or_else(|| Error::ScheduledNotFound(id.to_string()))?;
        match rec.state() {
            SchedState::Delivered => {
                return Err(Error::AlreadyDelivered(
                    id.to_string(),
                    rec.topic,
                    rec.offset,
                ));
            }
            SchedState::Cancelled => {}
            SchedState::Waiting => {
                self.clear_due(DueKind::Deliver, rec.deliver_ms, id, stage);
                rec.message = None;
                rec.state = SchedState::Cancelled as i32;
                stage.tally.cancelled += 1;
                let now = self.clock.now();
                self.remember(id, rec.clone(), now, stage);
            }
        }
        Ok(Outcome::Cancelled {
            topic: rec.topic,
            deliver_ms: rec.deliver_ms,
        })
    }

    /// Keeps the record of what became of a message (without the message) for a while.
    fn remember(&self, id: Id, mut rec: SchedRecord, now: u64, stage: &mut Stage) {
        rec.message = None;
        rec.forget_ms = now.saturating_add(REMEMBER_MS);
        self.set_due(DueKind::Forget, rec.forget_ms, id, stage);
        self.put_sched(id, rec, stage);
    }

    /// Removes a delivered or cancelled message's record once its time is up.
    pub(super) fn forget_scheduled(
        &mut self,
        id: Id,
        due_ms: u64,
        stage: &mut Stage,
    ) -> Result<Outcome> {
        self.clear_due(DueKind::Forget, due_ms, id, stage);
        if let Some(rec) = self.sched_record(id, stage)?
            && rec.state() != SchedState::Waiting
            && rec.forget_ms == due_ms
        {
            stage
                .batch
                .delete_cf(self.storage.cf(Cf::Sched), id.to_bytes());
            stage.sched.insert(id, None);
        }
        Ok(Outcome::Done)
    }
}
