//! The lanes of a (group, topic): what each queue a Remoting consumer pulls has handed
//! out, numbered in the queue's own sequence, and which connection holds it (see
//! `pull` and docs/remoting.md). Only bookkeeping: the leases are the group's.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use txmq_protocol::pb as native;

/// Most deliveries one connection may have been handed of a (group, topic) and not
/// committed: beyond, its pulls get nothing until it commits (I9).
pub const MAX_HELD: usize = 16_384;

/// A handed-out delivery of a lane.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    pub offset: u64,
    pub lease_id: u64,
    /// Which delivery of the message it is (1: the first).
    pub attempt: u32,
}

/// One queue of a (group, topic) as the clients see it.
#[derive(Debug, Default)]
struct Lane {
    /// The next sequence number to hand out.
    next: u64,
    /// The connection that pulled it last (0: none). A connection, not a client id:
    /// a client names itself, and another claiming its id must not commit its lanes.
    owner: u64,
    /// Sequence number → what it names.
    held: BTreeMap<u64, Held>,
}

#[derive(Debug, Default)]
struct Lanes {
    lanes: HashMap<i32, Lane>,
    /// Log offset → (lane, sequence number) of what is held.
    by_offset: HashMap<u64, (i32, u64)>,
}

/// Every (group, topic)'s lanes.
#[derive(Debug, Default)]
pub struct Pulls {
    inner: Mutex<HashMap<(String, String), Lanes>>,
    /// Each topic's queue count when last looked at (one entry per topic pulled or
    /// routed): a shrink is looked for only when it changes.
    counts: Mutex<HashMap<String, usize>>,
}

impl Pulls {
    /// The deliveries lane `queue` handed connection `conn` below `upto` (its client
    /// consumed them), taken out. A connection that no longer owns the lane commits
    /// nothing: what it held was let go when the lane moved, and what the lane holds now
    /// is another's.
    pub fn below(&self, group: &str, topic: &str, queue: i32, upto: u64, conn: u64) -> Vec<Held> {
        let mut inner = self.inner.lock().expect("pulls lock");
        let Some(lanes) = inner.get_mut(&(group.to_string(), topic.to_string())) else {
            return Vec::new();
        };
        let Some(lane) = lanes.lanes.get_mut(&queue) else {
            return Vec::new();
        };
        if lane.owner != conn {
            return Vec::new();
        }
        let rest = lane.held.split_off(&upto);
        let done = std::mem::replace(&mut lane.held, rest);
        done.into_values()
            .inspect(|h| {
                lanes.by_offset.remove(&h.offset);
            })
            .collect()
    }

    /// The delivery of `offset`, taken out, when connection `conn` holds it (a
    /// send-back, or a record that cannot be written for it).
    pub fn take(&self, group: &str, topic: &str, offset: u64, conn: u64) -> Option<Held> {
        let mut inner = self.inner.lock().expect("pulls lock");
        let lanes = inner.get_mut(&(group.to_string(), topic.to_string()))?;
        let (queue, seq) = *lanes.by_offset.get(&offset)?;
        let lane = lanes.lanes.get_mut(&queue).filter(|l| l.owner == conn)?;
        let held = lane.held.remove(&seq)?;
        lanes.by_offset.remove(&offset);
        Some(held)
    }

    /// The delivery numbered `seq` in lane `queue`, taken out, when connection `conn`
    /// holds it (a POP consumer's ack or change of invisible time).
    pub fn take_seq(
        &self,
        group: &str,
        topic: &str,
        queue: i32,
        seq: u64,
        conn: u64,
    ) -> Option<Held> {
        let mut inner = self.inner.lock().expect("pulls lock");
        let lanes = inner.get_mut(&(group.to_string(), topic.to_string()))?;
        let lane = lanes.lanes.get_mut(&queue).filter(|l| l.owner == conn)?;
        let held = lane.held.remove(&seq)?;
        lanes.by_offset.remove(&held.offset);
        Some(held)
    }

    /// Lane `queue`'s next number: where a client that asks continues.
    pub fn next(&self, group: &str, topic: &str, queue: i32) -> u64 {
        let inner = self.inner.lock().expect("pulls lock");
        inner
            .get(&(group.to_string(), topic.to_string()))
            .and_then(|l| l.lanes.get(&queue))
            .map_or(0, |l| l.next)
    }

    /// Whether connection `conn` may be handed more of (group, topic): one consumer
    /// that never commits stops only itself.
    pub fn has_room(&self, group: &str, topic: &str, conn: u64) -> bool {
        let inner = self.inner.lock().expect("pulls lock");
        inner
            .get(&(group.to_string(), topic.to_string()))
            .is_none_or(|l| {
                let mine: usize = l
                    .lanes
                    .values()
                    .filter(|lane| lane.owner == conn)
                    .map(|lane| lane.held.len())
                    .sum();
                mine < MAX_HELD
            })
    }

    /// What lane `queue` holds for connection `conn` from number `from` on, taken out:
    /// the client asks again from there, so it never received those (an answer lost,
    /// a buffer dropped, a seek back), and no commit may ack them. `from` `None`: all.
    pub fn let_go(
        &self,
        group: &str,
        topic: &str,
        queue: i32,
        conn: u64,
        from: Option<u64>,
    ) -> Vec<Held> {
        let mut inner = self.inner.lock().expect("pulls lock");
        let Some(lanes) = inner.get_mut(&(group.to_string(), topic.to_string())) else {
            return Vec::new();
        };
        let Some(lane) = lanes.lanes.get_mut(&queue).filter(|l| l.owner == conn) else {
            return Vec::new();
        };
        let gone = lane.held.split_off(&from.unwrap_or(0));
        let gone: Vec<Held> = gone.into_values().collect();
        for g in &gone {
            lanes.by_offset.remove(&g.offset);
        }
        gone
    }

    /// Topic `topic` shows `queues` queues now: what lanes beyond them held is let go
    /// (no client pulls or commits them any more), and those lanes are gone.
    pub fn shrunk(&self, topic: &str, queues: usize) -> Vec<(String, Held)> {
        {
            let mut counts = self.counts.lock().expect("counts lock");
            match counts.get_mut(topic) {
                Some(c) if *c == queues => return Vec::new(),
                Some(c) => *c = queues,
                None => {
                    // Topics that exist only (the callers check), but deleted ones
                    // stay: start again past a bound.
                    if counts.len() >= 100_000 {
                        counts.clear();
                    }
                    counts.insert(topic.to_string(), queues);
                }
            }
        }
        let queues = i32::try_from(queues).unwrap_or(i32::MAX);
        let mut inner = self.inner.lock().expect("pulls lock");
        let mut out = Vec::new();
        for ((group, _), lanes) in inner.iter_mut().filter(|((_, t), _)| t == topic) {
            let beyond: Vec<i32> = lanes
                .lanes
                .keys()
                .copied()
                .filter(|q| *q >= queues)
                .collect();
            for q in beyond {
                if let Some(lane) = lanes.lanes.remove(&q) {
                    for h in lane.held.into_values() {
                        lanes.by_offset.remove(&h.offset);
                        out.push((group.clone(), h));
                    }
                }
            }
        }
        out
    }

    /// Connection `conn` closed: what its lanes held is let go (its leases end and the
    /// messages come again), and the lanes are no one's.
    pub fn closed(&self, conn: u64) -> Vec<(String, String, Held)> {
        let mut inner = self.inner.lock().expect("pulls lock");
        let mut out = Vec::new();
        for ((group, topic), lanes) in inner.iter_mut() {
            for lane in lanes.lanes.values_mut().filter(|l| l.owner == conn) {
                lane.owner = 0;
                for h in std::mem::take(&mut lane.held).into_values() {
                    lanes.by_offset.remove(&h.offset);
                    out.push((group.clone(), topic.clone(), h));
                }
            }
            // A connection's own lanes (POP: negative ids) go with it.
            lanes.lanes.retain(|q, l| *q >= 0 || l.owner != 0);
        }
        inner
            .retain(|_, l| !l.by_offset.is_empty() || l.lanes.values().any(|lane| lane.owner != 0));
        out
    }

    /// Numbers `deliveries` in lane `queue` from `from` (or the lane's next, if
    /// later), for connection `conn`; answers each one's number, and the leases the previous
    /// owner of the lane held, taken out (a rebalance moved the lane: they are no longer
    /// renewed, and come again once their leases end; no commit acks them).
    pub fn hand_out(
        &self,
        group: &str,
        topic: &str,
        queue: i32,
        from: u64,
        conn: u64,
        deliveries: &[native::Delivery],
    ) -> (Vec<u64>, Vec<Held>) {
        let mut inner = self.inner.lock().expect("pulls lock");
        let lanes = inner
            .entry((group.to_string(), topic.to_string()))
            .or_default();
        let lane = lanes.lanes.entry(queue).or_default();
        let moved: Vec<Held> = if lane.owner == conn {
            Vec::new()
        } else {
            lane.owner = conn;
            std::mem::take(&mut lane.held).into_values().collect()
        };
        for m in &moved {
            lanes.by_offset.remove(&m.offset);
        }
        let lane = lanes.lanes.entry(queue).or_default();
        lane.next = lane.next.max(from);
        let mut numbers = Vec::with_capacity(deliveries.len());
        let mut placed = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            let Some(h) = &d.handle else { continue };
            let seq = lane.next;
            lane.next += 1;
            lane.held.insert(
                seq,
                Held {
                    offset: h.offset,
                    lease_id: h.lease_id,
                    attempt: d.attempt,
                },
            );
            placed.push((h.offset, seq));
            numbers.push(seq);
        }
        for (offset, seq) in placed {
            // A redelivery of a message another lane still names replaces it there.
            if let Some((q, old)) = lanes.by_offset.insert(offset, (queue, seq))
                && (q, old) != (queue, seq)
                && let Some(l) = lanes.lanes.get_mut(&q)
                && l.held.get(&old).is_some_and(|h| h.offset == offset)
            {
                l.held.remove(&old);
            }
        }
        (numbers, moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(offset: u64, lease_id: u64) -> native::Delivery {
        native::Delivery {
            attempt: 1,
            handle: Some(native::DeliveryHandle {
                offset,
                lease_id,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A POP connection's own lane goes when it closes (each connection has one).
    #[test]
    fn a_closed_connections_pop_lane_is_gone() {
        let p = Pulls::default();
        p.hand_out("g", "t", -5, 0, 5, &[delivery(10, 1)]);
        p.hand_out("g", "t", 0, 0, 6, &[delivery(11, 2)]);
        assert_eq!(p.closed(5).len(), 1);
        assert!(
            p.inner.lock().unwrap()[&("g".into(), "t".into())]
                .lanes
                .contains_key(&-5)
                .eq(&false)
        );
        assert_eq!(
            p.next("g", "t", 0),
            1,
            "another connection's queue lane stays"
        );
    }

    /// A topic whose queue count shrank: the lanes beyond it give up what they held,
    /// the others keep theirs.
    #[test]
    fn lanes_beyond_a_shrunk_count_let_go() {
        let p = Pulls::default();
        p.hand_out("g", "t", 0, 0, 1, &[delivery(10, 1)]);
        p.hand_out("g", "t", 5, 0, 1, &[delivery(11, 2), delivery(12, 3)]);
        p.hand_out("h", "t", 7, 0, 2, &[delivery(13, 4)]);
        p.hand_out("g", "other", 6, 0, 1, &[delivery(14, 5)]);
        let mut gone: Vec<(String, u64)> = p
            .shrunk("t", 4)
            .into_iter()
            .map(|(g, h)| (g, h.offset))
            .collect();
        gone.sort();
        assert_eq!(gone, [("g".into(), 11), ("g".into(), 12), ("h".into(), 13)]);
        assert_eq!(p.next("g", "t", 5), 0, "the lane is gone");
        assert!(p.take("g", "t", 11, 1).is_none());
        assert!(p.take("g", "t", 10, 1).is_some(), "queue 0 stays");
        assert!(p.take("g", "other", 14, 1).is_some(), "another topic stays");
        assert!(p.shrunk("t", 4).is_empty());
    }

    /// A lane numbers what it hands out from where the client asked (or on), and a
    /// commit takes out exactly what is below it.
    #[test]
    fn lanes_number_and_commit() {
        let p = Pulls::default();
        let (n, moved) = p.hand_out("g", "t", 0, 5, 1, &[delivery(10, 1), delivery(11, 2)]);
        assert_eq!((n, moved.len()), (vec![5, 6], 0));
        // Asked from behind: numbering goes on.
        let (n, _) = p.hand_out("g", "t", 0, 0, 1, &[delivery(12, 3)]);
        assert_eq!(n, [7]);
        assert_eq!(p.next("g", "t", 0), 8);
        assert!(p.below("g", "t", 0, 7, 2).is_empty(), "not c2's lane");
        let done: Vec<u64> = p
            .below("g", "t", 0, 7, 1)
            .iter()
            .map(|h| h.offset)
            .collect();
        assert_eq!(done, [10, 11]);
        assert!(p.below("g", "t", 0, 7, 1).is_empty());
        // Another client takes the lane: what the first held is let go, and neither's
        // commit acks it (a rebalance must not ack what no one consumed).
        let (_, moved) = p.hand_out("g", "t", 0, 8, 2, &[delivery(13, 4)]);
        assert_eq!(moved.iter().map(|h| h.offset).collect::<Vec<_>>(), [12]);
        assert!(p.below("g", "t", 0, 8, 1).is_empty());
        assert!(p.below("g", "t", 0, 8, 2).is_empty());
        // A send-back finds its delivery by log offset, once.
        assert!(p.take("g", "t", 13, 1).is_none(), "not 1's to send back");
        assert_eq!(p.take("g", "t", 13, 2).map(|h| h.lease_id), Some(4));
        assert!(p.take("g", "t", 13, 2).is_none());
        // A redelivery of a message another lane names replaces it there.
        p.hand_out("g", "t", 0, 9, 2, &[delivery(14, 5)]);
        p.hand_out("g", "t", 1, 0, 2, &[delivery(14, 9)]);
        assert!(p.below("g", "t", 0, 100, 2).is_empty());
        assert_eq!(p.below("g", "t", 1, 100, 2)[0].lease_id, 9);
    }
}
