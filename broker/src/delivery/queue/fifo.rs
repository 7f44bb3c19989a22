//! Ordered (FIFO) groups: per message group, one message out at a time, in log order.
//!
//! A message group's *head* is the one message of it that is out: leased, or waiting in
//! the retry index for redelivery (after a nack, an expired lease, a consumer that left).
//! Messages of the group read from the log behind it are *held* (offsets only, in log
//! order) until the head is acked or dead-lettered; then the first held one becomes the
//! head and is delivered next. Messages without a message group are not ordered.
//!
//! Nothing here is stored: after a restart the pump reads the log from the ack floor in
//! order again, and the first message of each group that is not done becomes its head
//! (a head waiting for redelivery is known from the retry index, see [`Fifo::restore`]).
//! Held offsets are at most [`MAX_HELD`]; past that the pump reads no further, which
//! bounds memory whatever one stuck head does.

use std::collections::{HashMap, HashSet, VecDeque};

/// Most offsets held behind heads in one queue: past it the log is not read further.
pub const MAX_HELD: usize = 65_536;

/// The ordering state of an ordered queue.
#[derive(Debug, Default)]
pub struct Fifo {
    /// Message group → its head's offset.
    heads: HashMap<String, u64>,
    /// Head offset → its message group.
    head_group: HashMap<u64, String>,
    /// Message group → offsets read behind its head, in log order.
    held: HashMap<String, VecDeque<u64>>,
    /// Every held offset (the ack floor may pass one only with a record of it).
    held_offsets: HashSet<u64>,
    held_count: usize,
    /// Heads released by the end of the one before them, to deliver before new reads.
    ready: VecDeque<u64>,
}

impl Fifo {
    /// A message of `group` at `offset`, read from the log: `true` when it may go out now
    /// (it is its group's head), `false` when it was held behind the head.
    pub fn admit(&mut self, group: &str, offset: u64) -> bool {
        if group.is_empty() {
            return true;
        }
        if let Some(&head) = self.heads.get(group) {
            if head == offset {
                return true;
            }
            self.hold(group, offset);
            return false;
        }
        self.heads.insert(group.to_string(), offset);
        self.head_group.insert(offset, group.to_string());
        true
    }

    fn hold(&mut self, group: &str, offset: u64) {
        if !self.held_offsets.insert(offset) {
            return;
        }
        let queue = self.held.entry(group.to_string()).or_default();
        // In log order: reads from the log come in order; a redriven one goes where it
        // belongs.
        if queue.back().is_none_or(|&last| last < offset) {
            queue.push_back(offset);
        } else {
            let at = queue.partition_point(|&o| o < offset);
            queue.insert(at, offset);
        }
        self.held_count += 1;
    }

    /// Messages known at start from the retry index (waiting for redelivery, or held and
    /// passed by the floor), in offset order: the first of each group leads it, the
    /// others are held behind it. Returns whether `offset` is held.
    pub fn restore(&mut self, group: &str, offset: u64) -> bool {
        !self.admit(group, offset)
    }

    /// Whether `offset` waits behind its group's head.
    pub fn is_held(&self, offset: u64) -> bool {
        self.held_offsets.contains(&offset)
    }

    /// The message at `offset` is done (acked or dead-lettered): if it was a head, the
    /// next held message of its group becomes the head and is ready to go.
    pub fn done(&mut self, offset: u64) {
        let Some(group) = self.head_group.remove(&offset) else {
            return;
        };
        self.heads.remove(&group);
        let Some(queue) = self.held.get_mut(&group) else {
            return;
        };
        if let Some(next) = queue.pop_front() {
            self.held_count -= 1;
            self.held_offsets.remove(&next);
            self.heads.insert(group.clone(), next);
            self.head_group.insert(next, group.clone());
            self.ready.push_back(next);
        }
        if queue.is_empty() {
            self.held.remove(&group);
        }
    }

    /// Puts released heads back at the front, in order (their read failed).
    pub fn unready(&mut self, offsets: Vec<u64>) {
        for offset in offsets.into_iter().rev() {
            self.ready.push_front(offset);
        }
    }

    /// Up to `n` released heads to deliver, oldest release first.
    pub fn take_ready(&mut self, n: usize) -> Vec<u64> {
        let n = n.min(self.ready.len());
        self.ready.drain(..n).collect()
    }

    /// The next released head to deliver.
    #[cfg(test)]
    pub fn next_ready(&mut self) -> Option<u64> {
        self.ready.pop_front()
    }

    /// Whether `offset` is a head (it may be delivered).
    pub fn is_head(&self, offset: u64) -> bool {
        self.head_group.contains_key(&offset)
    }

    /// No room to hold more: the pump must not read further.
    pub fn full(&self) -> bool {
        self.held_count >= MAX_HELD
    }

    /// Message groups with messages waiting behind their head, and how many wait.
    pub fn blocked(&self) -> (u32, u64) {
        (self.held.len() as u32, self.held_count as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_out_per_group_in_log_order() {
        let mut f = Fifo::default();
        assert!(f.admit("a", 0));
        assert!(f.admit("b", 1));
        assert!(!f.admit("a", 2));
        assert!(!f.admit("a", 3));
        assert!(f.admit("", 4), "no group, no order");
        assert_eq!(f.blocked(), (1, 2));
        f.done(1);
        assert_eq!(f.next_ready(), None, "b had nothing behind it");
        f.done(2);
        assert_eq!(f.next_ready(), None, "2 is not a head: done means nothing");
        f.done(0);
        assert_eq!(f.next_ready(), Some(2));
        assert!(f.is_head(2) && !f.is_head(3));
        assert!(f.admit("a", 2), "a head read again goes");
        f.done(2);
        assert_eq!(f.next_ready(), Some(3));
        f.done(3);
        assert_eq!(f.blocked(), (0, 0));
        assert!(f.admit("a", 9), "a group with nothing out starts again");
    }

    #[test]
    fn restored_heads_lead_their_group() {
        let mut f = Fifo::default();
        assert!(!f.restore("a", 5));
        assert!(f.restore("a", 7), "a later one of the group is held");
        assert!(f.is_head(5) && !f.is_head(7) && f.is_held(7));
        assert!(!f.admit("a", 6), "behind the head waiting for redelivery");
        assert!(!f.admit("a", 6), "held once");
        assert_eq!(f.blocked(), (1, 2));
        f.done(5);
        assert_eq!(f.next_ready(), Some(6), "held in log order");
        f.done(6);
        assert_eq!(f.next_ready(), Some(7));
    }
}
