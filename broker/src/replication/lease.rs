//! The leader's lease: the timing of a broker group in one place, and the handle every
//! request, delivery and check-back asks before it serves from this node's state.
//!
//! A follower stands for election when it has heard nothing from the leader for
//! openraft's leader lease (the maximum election timeout) plus a random election timeout:
//! [`FOLLOWER_PATIENCE_MIN`] at the soonest. A leader serves only while a majority of
//! the voters acknowledged it within [`QUORUM_SILENCE`], which is shorter by
//! [`LEASE_MARGIN`] at least: whatever a leader answers from its state, no other node can
//! have been elected yet.
//!
//! The check is on a monotonic clock and made when it matters: a leader that was paused
//! (SIGSTOP, a long GC-like stall, a VM frozen) finds on waking that its last majority
//! contact is too old, and answers `NOT_LEADER` to the first request it reads, before
//! any watcher had a chance to run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often a leader sends heartbeats, in ms.
pub const HEARTBEAT_MS: u64 = 200;

/// openraft's election timeout range, in ms (its leader lease is the maximum).
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 1000;
/// See [`ELECTION_TIMEOUT_MIN_MS`].
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 1400;

/// The soonest a follower stands for election after the last heartbeat it heard.
pub const FOLLOWER_PATIENCE_MIN: Duration =
    Duration::from_millis(ELECTION_TIMEOUT_MAX_MS + ELECTION_TIMEOUT_MIN_MS);

/// How long a leader may go without hearing from a majority before it stops serving.
pub const QUORUM_SILENCE: Duration = Duration::from_millis(1200);

/// What the lease leaves between its end and the soonest election: room for clocks that
/// run at slightly different rates and for the time an answer takes to leave.
pub const LEASE_MARGIN: Duration = Duration::from_millis(500);

// The same, checked when the crate compiles: no build can get the timing wrong.
const _: () = assert!(
    QUORUM_SILENCE.as_millis() + LEASE_MARGIN.as_millis() <= FOLLOWER_PATIENCE_MIN.as_millis()
);

/// A leader's lease: until when (on this process's monotonic clock) it may serve.
///
/// Read on every request with one atomic load; changed under a lock, so that a renewal
/// computed just before a resignation cannot bring the lease back after it.
#[derive(Debug)]
pub struct Lease {
    base: Instant,
    /// Milliseconds from `base`; 0: no lease.
    until_ms: AtomicU64,
    /// Milliseconds from `base` until which no renewal is taken (see [`Lease::resign`]).
    resigned_until_ms: std::sync::Mutex<u64>,
}

impl Default for Lease {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            until_ms: AtomicU64::new(0),
            resigned_until_ms: std::sync::Mutex::new(0),
        }
    }
}

impl Lease {
    /// Whether the lease holds now.
    pub fn holds(&self) -> bool {
        self.now_ms() < self.until_ms.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// A majority acknowledged this leader `ago`: the lease runs [`QUORUM_SILENCE`] from
    /// then. It only grows (a contact computed late does not shorten a fresher one),
    /// until [`Lease::end`]; while resigned, it is not taken.
    pub fn renew(&self, ago: Duration) {
        let Some(from_base) = self.base.elapsed().checked_sub(ago) else {
            return;
        };
        let until = (from_base + QUORUM_SILENCE).as_millis() as u64;
        let resigned = self.resigned_until_ms.lock().expect("lease lock");
        if self.now_ms() < *resigned {
            return;
        }
        self.until_ms.fetch_max(until.max(1), Ordering::AcqRel);
    }

    /// The leadership ended: nothing is served from this node's state any more.
    pub fn end(&self) {
        let _resigned = self.resigned_until_ms.lock().expect("lease lock");
        self.until_ms.store(0, Ordering::Release);
    }

    /// This leader hands its leadership over: the lease ends now and takes no renewal
    /// for `for_` (unless [`Lease::resume`] comes first).
    pub fn resign(&self, for_: Duration) {
        let mut resigned = self.resigned_until_ms.lock().expect("lease lock");
        *resigned = self.now_ms() + for_.as_millis() as u64;
        self.until_ms.store(0, Ordering::Release);
    }

    /// A new leadership began (this node was elected again): renewals count again.
    pub fn resume(&self) {
        *self.resigned_until_ms.lock().expect("lease lock") = 0;
    }
}

/// Whether this broker may serve from its state now: always for a single broker; for a
/// group's leader, while its [`Lease`] holds.
#[derive(Debug, Clone, Default)]
pub struct Serving(Option<Arc<Lease>>);

impl Serving {
    /// A single broker's: always.
    pub fn always() -> Self {
        Self(None)
    }

    /// A group leader's, under `lease`.
    pub fn under(lease: Arc<Lease>) -> Self {
        Self(Some(lease))
    }

    /// Whether it may serve now.
    pub fn holds(&self) -> bool {
        self.0.as_ref().is_none_or(|l| l.holds())
    }

    /// Whether this is a broker group's leader (whose writes a lost leadership leaves
    /// undecided), not a single broker.
    pub fn replicated(&self) -> bool {
        self.0.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lease ends before any follower can stand for election, with a margin, and
    /// heartbeats come several times within it.
    #[test]
    fn the_lease_ends_well_before_an_election_can_start() {
        assert!(QUORUM_SILENCE + LEASE_MARGIN <= FOLLOWER_PATIENCE_MIN);
        const { assert!(ELECTION_TIMEOUT_MIN_MS < ELECTION_TIMEOUT_MAX_MS) };
        assert!(Duration::from_millis(3 * HEARTBEAT_MS) < QUORUM_SILENCE);
    }

    #[test]
    fn a_lease_holds_from_its_contact_and_ends() {
        let lease = Lease::default();
        assert!(!lease.holds(), "no lease before a contact");
        lease.renew(Duration::ZERO);
        assert!(lease.holds());
        // A contact longer ago than the silence allows gives no lease, and does not
        // shorten one that holds.
        lease.renew(QUORUM_SILENCE * 2);
        assert!(lease.holds());
        lease.end();
        assert!(!lease.holds());
        lease.renew(QUORUM_SILENCE * 2);
        assert!(!lease.holds(), "a stale contact made a lease");
        assert!(Serving::always().holds());
        assert!(!Serving::under(Arc::new(Lease::default())).holds());
    }

    /// A resignation ends the lease and refuses renewals until it runs out or a new
    /// leadership resumes them.
    #[test]
    fn a_resigned_lease_takes_no_renewal() {
        let lease = Lease::default();
        lease.renew(Duration::ZERO);
        lease.resign(Duration::from_secs(60));
        assert!(!lease.holds());
        lease.renew(Duration::ZERO);
        assert!(!lease.holds(), "renewed while resigned");
        lease.resume();
        lease.renew(Duration::ZERO);
        assert!(lease.holds());
        lease.resign(Duration::ZERO);
        lease.renew(Duration::ZERO);
        assert!(
            lease.holds(),
            "a resignation that ran out still refused renewals"
        );
    }
}
