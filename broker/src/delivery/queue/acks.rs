//! Acks: the ack floor, acked offsets above it, and the writes that make them durable.

use super::*;

impl Queue {
    pub(super) fn is_acked(&self, offset: u64) -> bool {
        offset < self.floor() || self.acked.contains(&offset)
    }

    /// Whether an ack whose lease is gone finds its message acked, so that answering
    /// it OK tells the truth. The floor also passes messages that are not acked: one
    /// waiting to be delivered again (a retry record), one leased again (its old lease
    /// expired and it went out anew), one dead-lettered (its last lease expired while
    /// this ack was on its way). An ack of those is refused: the lease it names is gone.
    fn was_acked(&self, offset: u64) -> bool {
        if !self.is_acked(offset)
            || self.retry.contains_key(&offset)
            || self.leases.contains_key(&offset)
            || self.dead_recent.contains(&offset)
        {
            return false;
        }
        // Dead-lettered longer ago (or by an earlier run): the stored dead letters say.
        !matches!(
            self.storage
                .is_dead_letter(&self.group, self.topic.id, offset),
            Ok(true) | Err(_)
        )
    }

    /// Starts writing the acks collected so far, in one write, unless a write of acks is
    /// already on its way: at most one is, so an ack repeated while the first one's write
    /// is pending waits for its outcome (and is answered from it) instead of being called
    /// "already acked" for an ack that may never reach the disk (I6). The acks are applied
    /// to memory now, with an undo log that [`Queue::finish_acks`] uses if the write
    /// fails; deliveries go on meanwhile.
    pub(super) async fn start_acks(&mut self) {
        if self.ack_flight.is_some()
            || (self.pending_acks.is_empty() && self.dead_unreleased.is_empty())
        {
            return;
        }
        let requests = std::mem::take(&mut self.pending_acks);
        let dead = std::mem::take(&mut self.dead_unreleased);
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
                        // What it took, for `message show` (one attempt goes unsaid).
                        if lease.attempt > 1 {
                            ops.push(Op::Put(
                                Cf::Attempts,
                                keys::group_offset(&self.group, self.topic.id, r.offset),
                                lease.attempt.to_be_bytes().to_vec(),
                            ));
                        }
                        ops.extend(self.mark_acked_undoably(r.offset, &mut undo));
                    }
                    // An ack repeated after it was recorded is a success, not an error.
                    Err(_) if self.was_acked(r.offset) => {}
                    Err(e) => refused = Some(e),
                }
            }
            answers.push((refused, reply));
        }
        ops.extend(self.advance_floor_noting(&mut undo));
        // Submitted even when empty: a repeated ack's answer must not overtake the write
        // of the ack it repeats.
        let (tx, rx) = oneshot::channel();
        self.writer
            .submit_to(Command::Raw(cancel_out(ops)), tx)
            .await;
        self.ack_flight = Some(AckFlight {
            rx,
            undo,
            answers,
            acked,
            dead,
        });
    }

    /// The outcome of the acks' write: answers them, and puts memory back if it failed.
    pub(super) fn finish_acks(&mut self, written: Result<Outcome>) {
        let Some(flight) = self.ack_flight.take() else {
            return;
        };
        match &written {
            Ok(_) => {
                self.metrics.acks.inc_by(flight.acked);
                // Durable now: the next message of each acked head's group may go (not
                // before: a failed write would put the head back out).
                if let Some(fifo) = self.fifo.as_mut() {
                    for (offset, _) in &flight.undo.leases {
                        fifo.done(*offset);
                    }
                    // Dead letters written before this flight are durable too.
                    for offset in &flight.dead {
                        fifo.done(*offset);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(group = %self.group, topic = %self.topic.name, "acks not recorded, undone: {e}");
                self.undo(flight.undo);
            }
        }
        for (refused, reply) in flight.answers {
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
            undo.retries.push((offset, *rec));
        }
        if offset >= self.floor() && !self.acked.contains(&offset) {
            undo.acked.push(offset);
        }
        self.mark_acked(offset)
    }

    /// Puts back what a batch of acks changed: leases, retries, acked offsets and floor.
    fn undo(&mut self, undo: Undo) {
        for o in undo.passed {
            self.acked.insert(o);
        }
        for o in undo.new_retries {
            if let Some(rec) = self.retry.remove(&o) {
                self.retry_due.remove(&(rec.due_ms, o));
            }
        }
        for (o, rec) in undo.stored {
            if let Some(now) = self.retry.insert(o, rec) {
                self.retry_due.remove(&(now.due_ms, o));
            }
            self.retry_due.insert((rec.due_ms, o));
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
            if rec.is_stored() {
                ops.push(Op::Delete(
                    Cf::Retry,
                    keys::group_offset(&self.group, self.topic.id, offset),
                ));
            }
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

    /// Moves the floor over every contiguous offset that is done (acked) or whose fate is
    /// recorded elsewhere (a stored retry record), dropping their ack records. It never
    /// passes what only memory knows (an in-memory redelivery, a lease): a restart reads
    /// the log from the floor, and that is how such a message is found again. When
    /// the acks above the floor pile up behind a message held a long time (a poison
    /// message, a long lease), leased offsets get a retry record and are passed too: one
    /// message can then no longer pin the floor and make memory, the `acked` column
    /// family and the restart's log scan grow without bound.
    pub(super) fn advance_floor(&mut self) -> Vec<Op> {
        self.advance_floor_noting(&mut Undo::default())
    }

    /// [`Queue::advance_floor`], noting in `undo` what it changed besides the floor.
    fn advance_floor_noting(&mut self, undo: &mut Undo) -> Vec<Op> {
        let Some(start) = self.cursor.as_ref().map(|c| c.ack_floor) else {
            return Vec::new();
        };
        let crowded = self.acked.len() > MAX_ACKED_ABOVE_FLOOR;
        let mut ops = Vec::new();
        let mut floor = start;
        while floor < self.next {
            if self.acked.remove(&floor) {
                undo.passed.push(floor);
                ops.push(Op::Delete(
                    Cf::Acked,
                    keys::group_offset(&self.group, self.topic.id, floor),
                ));
            } else if self.retry.get(&floor).is_some_and(Redelivery::is_stored) {
                // Redelivered from the retry index whatever the floor.
            } else if crowded && let Some(&rec) = self.retry.get(&floor) {
                // Due again, known to memory only: stored now, so that one message no
                // consumer could take does not pin the floor either.
                ops.push(self.store_redelivery(floor, rec.attempts));
                undo.stored.push((floor, rec));
            } else if crowded && self.fifo.as_ref().is_some_and(|f| f.is_held(floor)) {
                // Held behind its group's head: passed with a record of it, so that a
                // restart holds it again (see `Queue::new`); due when its head is done.
                ops.push(self.store_redelivery(floor, 0));
                self.retry_due.remove(&(self.retry[&floor].due_ms, floor));
                undo.new_retries.push(floor);
            } else if crowded && let Some(lease) = self.leases.get(&floor) {
                // Due at once if the broker restarts; while the lease lives, its expiry
                // (or ack, or nack) decides, and pump skips it.
                let attempts = lease.attempt.saturating_sub(1);
                ops.push(self.store_redelivery(floor, attempts));
                undo.new_retries.push(floor);
            } else {
                break;
            }
            floor += 1;
        }
        if floor != start {
            let cursor = self.cursor.as_mut().expect("checked above");
            cursor.ack_floor = floor;
            ops.push(Op::Put(
                Cf::Cursor,
                keys::cursor(&self.group, self.topic.id),
                cursor.encode_to_vec(),
            ));
        }
        ops
    }
}

impl Queue {
    /// A stored redelivery of `offset`, due now, in memory (in the due index); returns
    /// the write of its record.
    fn store_redelivery(&mut self, offset: u64, attempts: u32) -> Op {
        let rec = Redelivery::stored(attempts, now_ms());
        if let Some(old) = self.retry.insert(offset, rec) {
            self.retry_due.remove(&(old.due_ms, offset));
        }
        self.retry_due.insert((rec.due_ms, offset));
        Op::Put(
            Cf::Retry,
            keys::group_offset(&self.group, self.topic.id, offset),
            rec.record().encode_to_vec(),
        )
    }
}

/// Dead-lettered offsets a queue remembers (see `Queue::was_acked`); older ones are
/// looked up in storage.
pub(super) const RECENT_DEAD: usize = 4096;

/// Acks above the floor a queue keeps before the floor passes leased messages (see
/// [`Queue::advance_floor`]).
pub(super) const MAX_ACKED_ABOVE_FLOOR: usize = 4096;

/// A write of acks on its way, with what is needed to answer them or undo them.
pub(super) struct AckFlight {
    pub(super) rx: oneshot::Receiver<Result<Outcome>>,
    undo: Undo,
    answers: Vec<(Option<Error>, oneshot::Sender<Result<Outcome>>)>,
    acked: u64,
    /// Dead-lettered heads released when this flight is written.
    dead: Vec<u64>,
}

impl std::fmt::Debug for AckFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckFlight")
            .field("acked", &self.acked)
            .finish()
    }
}

/// What a batch of acks changed, to put back if its write fails.
#[derive(Default)]
pub(super) struct Undo {
    floor: u64,
    /// Offsets this batch made acked.
    acked: Vec<u64>,
    /// Acked offsets the floor passed (and dropped from the acked set).
    passed: Vec<u64>,
    /// Retry records written for leased or held offsets the floor passed.
    new_retries: Vec<u64>,
    /// In-memory redeliveries the floor passed by storing them, as they were.
    stored: Vec<(u64, Redelivery)>,
    leases: Vec<(u64, Lease)>,
    retries: Vec<(u64, Redelivery)>,
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
