//! Acks: the ack floor, acked offsets above it, and the writes that make them durable.

use super::*;

impl Queue {
    pub(super) fn is_acked(&self, offset: u64) -> bool {
        offset < self.floor() || self.acked.contains(&offset)
    }

    /// Acknowledges the acks collected since the last call, in one write. Memory changes
    /// only for good: the acks are applied with an undo log, the write is awaited, and if
    /// it fails everything is put back as it was, so a retried ack is not answered
    /// "already acked" for an ack that never reached the disk (I6).
    pub(super) async fn flush_acks(&mut self) {
        if self.pending_acks.is_empty() {
            return;
        }
        let requests = std::mem::take(&mut self.pending_acks);
        let mut undo = Undo {
            floor: self.floor(),
            ..Undo::default()
        };
        let mut ops = Vec::new();
        let mut answers = Vec::with_capacity(requests.len());
        let mut acked = 0;
        for (leases, reply) in requests {
            let mut refused = None;
            for r in leases {
                match self.take_lease(r) {
                    Ok(lease) => {
                        undo.leases.push((r.offset, lease));
                        acked += 1;
                        ops.extend(self.mark_acked_undoably(r.offset, &mut undo));
                    }
                    // An ack repeated after it was recorded is a success, not an error.
                    Err(_) if self.is_acked(r.offset) && !self.retry.contains_key(&r.offset) => {}
                    Err(e) => refused = Some(e),
                }
            }
            answers.push((refused, reply));
        }
        ops.extend(self.advance_floor());
        // Submitted even when empty: a repeated ack's answer must not overtake the write
        // of the ack it repeats.
        let written = self.writer.submit(Command::Raw(cancel_out(ops))).await;
        match &written {
            Ok(_) => self.metrics.acks.inc_by(acked),
            Err(e) => {
                tracing::warn!(group = %self.group, topic = %self.topic.name, "acks not recorded, undone: {e}");
                self.undo(undo);
            }
        }
        for (refused, reply) in answers {
            let answer = match (&written, refused) {
                (_, Some(refusal)) => Err(refusal),
                (Ok(_), None) => Ok(Outcome::Done),
                (Err(e), None) => Err(e.clone()),
            };
            let _ = reply.send(answer);
        }
    }

    /// [`Queue::mark_acked`], noting what it changed in `undo`.
    fn mark_acked_undoably(&mut self, offset: u64, undo: &mut Undo) -> Vec<Op> {
        if let Some(rec) = self.retry.get(&offset) {
            undo.retries.push((offset, rec.clone()));
        }
        if offset >= self.floor() && !self.acked.contains(&offset) {
            undo.acked.push(offset);
        }
        self.mark_acked(offset)
    }

    /// Puts back what a batch of acks changed: leases, retries, acked offsets and floor.
    fn undo(&mut self, undo: Undo) {
        let floor = self.floor();
        for o in undo.floor..floor {
            self.acked.insert(o);
        }
        for o in &undo.acked {
            self.acked.remove(o);
        }
        if let Some(c) = self.cursor.as_mut() {
            c.ack_floor = undo.floor;
        }
        for (offset, rec) in undo.retries {
            self.retry_due.insert((rec.due_ms, offset));
            self.retry.insert(offset, rec);
        }
        for (offset, lease) in undo.leases {
            self.restore_lease(offset, lease);
        }
    }

    /// Records `offset` as done for this group; returns the writes that make it durable
    /// (the floor itself moves in [`Queue::advance_floor`]).
    pub(super) fn mark_acked(&mut self, offset: u64) -> Vec<Op> {
        let mut ops = Vec::new();
        if let Some(rec) = self.retry.remove(&offset) {
            self.retry_due.remove(&(rec.due_ms, offset));
            ops.push(Op::Delete(
                Cf::Retry,
                keys::group_offset(&self.group, self.topic.id, offset),
            ));
        }
        if offset >= self.floor() && self.acked.insert(offset) {
            ops.push(Op::Put(
                Cf::Acked,
                keys::group_offset(&self.group, self.topic.id, offset),
                Vec::new(),
            ));
        }
        ops
    }

    /// Moves the floor over every contiguous acked offset and drops their ack records.
    pub(super) fn advance_floor(&mut self) -> Vec<Op> {
        let Some(cursor) = self.cursor.as_mut() else {
            return Vec::new();
        };
        let mut ops = Vec::new();
        let start = cursor.ack_floor;
        while self.acked.remove(&cursor.ack_floor) {
            ops.push(Op::Delete(
                Cf::Acked,
                keys::group_offset(&self.group, self.topic.id, cursor.ack_floor),
            ));
            cursor.ack_floor += 1;
        }
        if cursor.ack_floor != start {
            ops.push(Op::Put(
                Cf::Cursor,
                keys::cursor(&self.group, self.topic.id),
                cursor.encode_to_vec(),
            ));
        }
        ops
    }
}

/// What a batch of acks changed, to put back if its write fails.
#[derive(Default)]
pub(super) struct Undo {
    floor: u64,
    acked: Vec<u64>,
    leases: Vec<(u64, Lease)>,
    retries: Vec<(u64, RetryRecord)>,
}

/// Drops an ack record's put together with its delete in the same batch: the common case
/// of an in-order ack moves the floor over the offset it just acked, and neither write
/// needs to reach RocksDB.
pub(super) fn cancel_out(ops: Vec<Op>) -> Vec<Op> {
    let put_keys: HashSet<Vec<u8>> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Put(Cf::Acked, k, _) => Some(k.clone()),
            _ => None,
        })
        .collect();
    if put_keys.is_empty() {
        return ops;
    }
    let deleted: HashSet<Vec<u8>> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Delete(Cf::Acked, k) if put_keys.contains(k) => Some(k.clone()),
            _ => None,
        })
        .collect();
    ops.into_iter()
        .filter(|op| match op {
            Op::Put(Cf::Acked, k, _) | Op::Delete(Cf::Acked, k) => !deleted.contains(k),
            _ => true,
        })
        .collect()
}
