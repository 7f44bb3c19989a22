//! Delivery: due retries first, then new messages from the cursor, round-robin over
//! the consumers with room.

use super::*;

impl Queue {
    /// Some live consumer has room. A consumer whose connection closed (its Unsubscribe
    /// still on the way) has none: counting it made `pump` retry forever.
    pub(super) fn has_credit(&self) -> bool {
        self.consumers
            .iter()
            .any(|c| c.in_flight < c.spec.window && c.takes_deliveries())
    }

    pub(super) fn credit(&self) -> usize {
        self.consumers
            .iter()
            .filter(|c| c.takes_deliveries())
            .map(|c| c.spec.window.saturating_sub(c.in_flight) as usize)
            .sum()
    }

    /// Delivers while some consumer has room and something is deliverable.
    pub(super) async fn pump(&mut self) -> Result<()> {
        if self.cursor.is_none() || !self.serving.holds() {
            // No group yet; or a group leader whose lease lapsed (paused, cut off):
            // another node may deliver by now, so this one hands out nothing.
            return Ok(());
        }
        while self.has_credit() {
            let now = now_ms();
            if let Some(&(due, offset)) = self.retry_due.first()
                && due <= now
            {
                self.retry_due.pop_first();
                if self.leases.contains_key(&offset) {
                    // Passed by the floor while leased: its lease decides what comes next.
                    continue;
                }
                if self.fifo.as_ref().is_some_and(|f| f.is_held(offset)) {
                    // Held behind its group's head: due when that one is done.
                    continue;
                }
                let attempts = self.retry.get(&offset).map_or(0, |r| r.attempts);
                let storage = self.storage.clone();
                let topic = self.topic.id;
                let read = tokio::task::spawn_blocking(move || storage.read_message(topic, offset))
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))
                    .and_then(|r| r);
                let msg = match read {
                    Ok(msg) => msg,
                    Err(e) => {
                        // Still due: tried again on the next pump.
                        self.retry_due.insert((due, offset));
                        return Err(e);
                    }
                };
                match msg {
                    Some(m) => {
                        if let Some(fifo) = self.fifo.as_mut()
                            && !fifo.is_head(offset)
                            && !fifo.admit(&m.message_group, offset)
                        {
                            // Behind its group's head (a redrive): its turn comes when
                            // the head is done; its retry record keeps its attempts.
                            continue;
                        }
                        if !self.deliver(m, attempts + 1) {
                            // Back in the retry schedule; let the run loop take requests
                            // (an Unsubscribe, say) before trying again.
                            return Ok(());
                        }
                        if self.retry.get(&offset).is_some_and(|r| !r.is_stored()) {
                            // Nothing stored to keep: its lease holds the floor now.
                            self.retry.remove(&offset);
                        }
                    }
                    None => {
                        // Gone from the log (retention): nothing to deliver, and nothing
                        // to keep a record of.
                        self.retry.remove(&offset);
                        if let Some(fifo) = self.fifo.as_mut() {
                            fifo.done(offset);
                        }
                        let key = keys::group_offset(&self.group, self.topic.id, offset);
                        self.write_quietly(vec![Op::Delete(Cf::Retry, key)]).await;
                    }
                }
                continue;
            }
            let credit = self.credit().min(READ_BATCH);
            let ready = self
                .fifo
                .as_mut()
                .map(|f| f.take_ready(credit))
                .unwrap_or_default();
            if !ready.is_empty() {
                // The heads after ones that were just done: before anything new, read
                // together (acks release many groups' next messages at once).
                if !self.deliver_ready(ready).await? {
                    return Ok(());
                }
                continue;
            }
            if self.fifo.as_ref().is_some_and(Fifo::full) {
                // Held offsets are bounded: read on once heads are done.
                return Ok(());
            }
            let end = self.topic.end();
            if self.next >= end {
                return Ok(());
            }
            let (storage, topic, from) = (self.storage.clone(), self.topic.id, self.next);
            let max = self.credit().min(READ_BATCH);
            let batch =
                tokio::task::spawn_blocking(move || storage.read_log(topic, from, end, max))
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))??;
            if batch.is_empty() {
                self.next = end;
                return Ok(());
            }
            let mut filtered = false;
            let mut stalled = false;
            for m in batch {
                self.next = m.offset + 1;
                let o = m.offset;
                if self.is_acked(o) || self.retry.contains_key(&o) || self.leases.contains_key(&o) {
                    continue;
                }
                if !self.matches(&m.tag) {
                    // Not for this group: done for it, like RocketMQ's tag filtering.
                    self.acked.insert(o);
                    filtered = true;
                    continue;
                }
                if let Some(fifo) = self.fifo.as_mut()
                    && !fifo.admit(&m.message_group, o)
                {
                    // Held behind its message group's head, in log order.
                    continue;
                }
                if !self.deliver(m, 1) {
                    stalled = true;
                }
            }
            if filtered {
                let ops = self.advance_floor();
                self.write_quietly(ops).await;
            }
            if stalled {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Delivers heads released by the end of the ones before them; `false` when some
    /// could not be taken (they then wait in the retry schedule, due at once, still
    /// heads).
    async fn deliver_ready(&mut self, offsets: Vec<u64>) -> Result<bool> {
        let mut to_read = Vec::with_capacity(offsets.len());
        for offset in offsets {
            if self.leases.contains_key(&offset) {
                continue;
            }
            if let Some(rec) = self.retry.get_mut(&offset) {
                // Held with a retry record (a redrive, or passed by the floor): the retry
                // schedule delivers it, now. Checked before "acked": a redriven dead
                // letter is below the floor or acked, and still to be delivered.
                self.retry_due.remove(&(rec.due_ms, offset));
                rec.due_ms = now_ms();
                self.retry_due.insert((rec.due_ms, offset));
                continue;
            }
            if self.is_acked(offset) {
                // Below the floor (retention passed it): done, and its group moves on.
                if let Some(fifo) = self.fifo.as_mut() {
                    fifo.done(offset);
                }
                continue;
            }
            to_read.push(offset);
        }
        if to_read.is_empty() {
            return Ok(true);
        }
        let storage = self.storage.clone();
        let topic = self.topic.id;
        let wanted = to_read.clone();
        let read = tokio::task::spawn_blocking(move || storage.read_messages(topic, &to_read))
            .await
            .map_err(|e| Error::Internal(e.to_string()))
            .and_then(|r| r);
        let messages = match read {
            Ok(messages) => messages,
            Err(e) => {
                // Still the heads: delivered on the next pump.
                if let Some(fifo) = self.fifo.as_mut() {
                    fifo.unready(wanted);
                }
                return Err(e);
            }
        };
        if messages.len() < wanted.len()
            && let Some(fifo) = self.fifo.as_mut()
        {
            // Gone from the log: done, so its group moves on.
            let found: HashSet<u64> = messages.iter().map(|m| m.offset).collect();
            for offset in wanted.into_iter().filter(|o| !found.contains(o)) {
                fifo.done(offset);
            }
        }
        let mut all_taken = true;
        for m in messages {
            all_taken &= self.deliver(m, 1);
        }
        Ok(all_taken)
    }

    pub(super) fn matches(&self, tag: &str) -> bool {
        self.tags.as_ref().is_none_or(|set| set.contains(tag))
    }

    /// Leases a message to the next consumer with room, round-robin. Returns `false` when
    /// nobody could take it (it then waits in the retry schedule, due at once).
    pub(super) fn deliver(&mut self, message: pb::StoredMessage, attempt: u32) -> bool {
        let offset = message.offset;
        // Checked at each delivery: a pause can land in the middle of a pump.
        let n = if self.serving.holds() {
            self.consumers.len()
        } else {
            0
        };
        for step in 0..n {
            let i = (self.round_robin + step) % n;
            let c = &mut self.consumers[i];
            if c.in_flight >= c.spec.window || !c.takes_deliveries() {
                continue;
            }
            let lease_id = self.lease_ids.next();
            let deadline_ms = now_ms().saturating_add(c.spec.lease.as_millis() as u64);
            let frame = Frame {
                id: 0,
                body: Some(pb::frame::Body::Delivery(pb::Delivery {
                    subscription_id: c.spec.subscription_id,
                    handle: Some(pb::DeliveryHandle {
                        group: self.group.clone(),
                        topic: self.topic.name.clone(),
                        offset,
                        lease_id,
                    }),
                    message: Some(message.clone()),
                    attempt,
                    lease_deadline_ms: deadline_ms,
                })),
            };
            // The outbound channel is larger than any window, so it is never full here;
            // a closed one means the consumer is gone and its Unsubscribe is on the way.
            if c.spec.outbound.try_send(frame).is_err() {
                continue;
            }
            self.round_robin = (i + 1) % n;
            self.metrics.deliveries.inc();
            if attempt > 1 {
                self.metrics.redeliveries.inc();
            }
            let lease = Lease {
                lease_id,
                subscription_id: c.spec.subscription_id,
                holder: c.spec.connection_id,
                deadline_ms,
                attempt,
                acking: false,
            };
            self.restore_lease(offset, lease);
            return true;
        }
        // Nobody could take it: deliver it again as soon as someone can, uncounted. A
        // stored record of it stays as it is; otherwise only memory knows, and the floor
        // stops here (see `retry`).
        let rec = match self.retry.get(&offset) {
            Some(stored) if stored.is_stored() => Redelivery {
                due_ms: now_ms(),
                ..*stored
            },
            _ => Redelivery {
                attempts: attempt - 1,
                due_ms: now_ms(),
                kept: Kept::InMemory,
            },
        };
        self.schedule(offset, rec);
        false
    }
}

/// Whether a group with tag filter `filter` receives messages tagged `tag`.
pub fn tag_matches(filter: &str, tag: &str) -> bool {
    parse_tags(filter).is_none_or(|set| set.contains(tag))
}

/// `A||B` into a set; `None` (everything) for empty or `*`.
pub(super) fn parse_tags(filter: &str) -> Option<HashSet<String>> {
    let filter = filter.trim();
    if filter.is_empty() || filter == "*" {
        return None;
    }
    Some(
        filter
            .split("||")
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect(),
    )
}
