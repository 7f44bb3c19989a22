//! The writer's wall clock, which never goes backwards.
//!
//! Every time the writer stores (`store_ms`, a transaction's creation and check times,
//! a dedup entry's age) comes from here. A new leader's clock may be behind the old
//! one's by up to the group's skew bound (`replication::clock`): its first messages
//! then carry the latest time stored, not an earlier one, so times along a topic's
//! offsets never decrease, which the retention's search by time and `group reset --to
//! TIME` rely on. (A clock further behind never leads.)

use std::cell::Cell;

use crate::replication::clock::MAX_SKEW_MS;
use crate::storage::Storage;
use crate::topics::Topics;

/// How far ahead of this machine's clock the writer's may start: two clocks each within
/// the group's bound of its median are at most twice the bound apart.
pub(super) const AHEAD_AT_MOST_MS: u64 = 2 * MAX_SKEW_MS as u64;

/// Milliseconds since the epoch, at least the last time it gave.
#[derive(Debug)]
pub(super) struct WallClock {
    last: Cell<u64>,
}

impl WallClock {
    /// A clock that gives no time before the latest `store_ms` of any topic's last
    /// message, unless that is further ahead of this machine's clock than two clocks
    /// within the group's skew bound can be apart ([`AHEAD_AT_MOST_MS`]: a clock stepped
    /// back, a leader far off that served for a moment). Times pinned that far ahead would
    /// hold back check-backs and purges, so the clock starts at that limit and says so.
    pub(super) fn after_stored(storage: &Storage, topics: &Topics) -> Self {
        let stored = topics
            .all()
            .iter()
            .filter(|t| t.end() > t.start())
            .filter_map(|t| storage.read_message(t.id, t.end() - 1).ok().flatten())
            .map(|m| m.store_ms)
            .max()
            .unwrap_or(0);
        let bound = txmq_protocol::now_ms() + AHEAD_AT_MOST_MS;
        if stored > bound {
            tracing::warn!(
                stored_ms = stored,
                "the latest message was stored {} ms ahead of this machine's clock: times \
                 start {AHEAD_AT_MOST_MS} ms ahead and may go back by the rest",
                stored - bound + AHEAD_AT_MOST_MS
            );
        }
        Self::after(stored.min(bound))
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
