//! Leases: who holds which message until when. Deadlines sit in a `BTreeSet` ordered
//! by time, so an expiry pass visits only what is due (I5).

use super::*;

impl Lease {
    /// Whether `r` names this lease: its id, and the connection it was given to when
    /// `r` comes from a connection (another connection's handle names nothing).
    fn named_by(&self, r: LeaseRef) -> bool {
        self.lease_id == r.lease_id && r.holder.is_none_or(|h| h == self.holder)
    }
}

impl Queue {
    pub(super) fn take_lease(&mut self, r: LeaseRef) -> Result<Lease> {
        match self.leases.get(&r.offset) {
            Some(l) if l.named_by(r) => {
                let l = *l;
                self.leases.remove(&r.offset);
                self.deadlines.remove(&(l.deadline_ms, r.offset));
                if !l.acking {
                    self.give_credit(l.subscription_id);
                }
                Ok(Lease { acking: false, ..l })
            }
            _ => Err(Error::LeaseNotFound(format!(
                "{}/{} offset {} lease {}",
                self.group, self.topic.name, r.offset, r.lease_id
            ))),
        }
    }

    /// An ack for `r` arrived: its consumer may take another delivery at once, although
    /// the ack is written (and the lease released) only with the next batch of acks.
    pub(super) fn mark_acking(&mut self, r: LeaseRef) {
        let subscription_id = match self.leases.get_mut(&r.offset) {
            Some(l) if l.named_by(r) && !l.acking => {
                l.acking = true;
                l.subscription_id
            }
            _ => return,
        };
        self.give_credit(subscription_id);
    }

    fn give_credit(&mut self, subscription_id: u64) {
        if let Some(c) = self
            .consumers
            .iter_mut()
            .find(|c| c.spec.subscription_id == subscription_id)
        {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }

    pub(super) async fn expire(&mut self, now: u64) {
        let mut ops = Vec::new();
        while let Some(&(at, offset)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.expiry_visits += 1;
            let Some(lease) = self.leases.get(&offset).copied() else {
                self.deadlines.pop_first();
                continue;
            };
            if lease.acking {
                // Its ack's write decides; if that fails, the lease comes back with a
                // deadline of its own.
                self.deadlines.pop_first();
                continue;
            }
            let taken = self.take_lease(LeaseRef::new(offset, lease.lease_id));
            if let Ok(lease) = taken {
                let stalled = self
                    .consumers
                    .iter()
                    .find(|c| c.spec.subscription_id == lease.subscription_id)
                    .is_some_and(|c| c.spec.stall.is_stalled());
                if stalled {
                    // Stuck behind a connection that stopped reading: most likely never
                    // seen by the client, so it goes back without counting an attempt.
                    ops.extend(self.give_back(offset, lease));
                } else {
                    ops.extend(self.fail(offset, lease, Some(Duration::ZERO), "lease expired"));
                }
            }
        }
        self.write_quietly(ops).await;
    }

    pub(super) fn extend(&mut self, r: LeaseRef, lease_for: Duration) -> Result<u64> {
        // One being acked is the ack's: taking it here would clear its acking mark.
        if self
            .leases
            .get(&r.offset)
            .is_some_and(|l| l.named_by(r) && l.acking)
        {
            return Err(Error::LeaseNotFound(format!(
                "{}/{} offset {} lease {} is being acked",
                self.group, self.topic.name, r.offset, r.lease_id
            )));
        }
        let lease = self.take_lease(r)?;
        let deadline_ms = now_ms().saturating_add(lease_for.as_millis() as u64);
        self.restore_lease(
            r.offset,
            Lease {
                deadline_ms,
                ..lease
            },
        );
        Ok(deadline_ms)
    }

    pub(super) fn restore_lease(&mut self, offset: u64, lease: Lease) {
        if let Some(c) = self
            .consumers
            .iter_mut()
            .find(|c| c.spec.subscription_id == lease.subscription_id)
        {
            c.in_flight += 1;
        }
        self.deadlines.insert((lease.deadline_ms, offset));
        self.leases.insert(offset, lease);
    }
}
