//! The writer's wall clock, which never goes backwards.
//!
//! Every time the writer stores (`store_ms`, a transaction's creation and check times,
//! a dedup entry's age) comes from here. A new leader's clock may be behind the old
//! one's by up to the group's skew bound (`replication::clock`): its first messages
//! then carry the latest time stored, not an earlier one, so times along a topic's
//! offsets never decrease, which the retention's search by time and `group reset --to
//! TIME` rely on. (A clock further behind never leads.)

use std::cell::Cell;

use crate::storage::Storage;
use crate::topics::Topics;

/// Milliseconds since the epoch, at least the last time it gave.
#[derive(Debug)]
pub(super) struct WallClock {
    last: Cell<u64>,
}

impl WallClock {
    /// A clock that gives no time before the latest `store_ms` of any topic's last
    /// message.
    pub(super) fn after_stored(storage: &Storage, topics: &Topics) -> Self {
        let last = topics
            .all()
            .iter()
            .filter(|t| t.end() > t.start())
            .filter_map(|t| storage.read_message(t.id, t.end() - 1).ok().flatten())
            .map(|m| m.store_ms)
            .max()
            .unwrap_or(0);
        Self::after(last)
    }

    /// A clock that gives no time before `last`.
    pub(super) fn after(last: u64) -> Self {
        Self {
            last: Cell::new(last),
        }
    }

    /// Now, or the last time given if the machine's clock is behind it.
    pub(super) fn now(&self) -> u64 {
        let now = txmq_protocol::now_ms().max(self.last.get());
        self.last.set(now);
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_never_goes_backwards() {
        let ahead = txmq_protocol::now_ms() + 60_000;
        let clock = WallClock::after(ahead);
        assert_eq!(clock.now(), ahead);
        assert_eq!(clock.now(), ahead);
        let clock = WallClock::after(0);
        let a = clock.now();
        assert!(a > 0 && clock.now() >= a);
    }
}
