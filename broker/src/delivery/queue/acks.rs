//! Acks: the ack floor, acked offsets above it, and the writes that make them durable.

use super::*;

impl Queue {
    pub(super) fn is_acked(&self, offset: u64) -> bool {
        offset < self.floor() || self.acked.contains(&offset)
    }

    pub(super) async fn ack(
        &mut self,
        leases: Vec<LeaseRef>,
        reply: oneshot::Sender<Result<Outcome>>,
    ) {
        let mut ops = Vec::new();
        let mut refused = None;
        for r in leases {
            match self.take_lease(r) {
                Ok(_) => {
                    self.metrics.acks.inc();
                    ops.extend(self.mark_acked(r.offset));
                }
                // An ack repeated after it was recorded is a success, not an error.
                Err(_) if self.is_acked(r.offset) && !self.retry.contains_key(&r.offset) => {}
                Err(e) => refused = Some(e),
            }
        }
        ops.extend(self.advance_floor());
        let ops = cancel_out(ops);
        if let Some(e) = refused {
            self.write_quietly(ops).await;
            let _ = reply.send(Err(e));
        } else {
            self.writer.submit_to(Command::Raw(ops), reply).await;
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
