//! Wall clocks across a broker group: how far each node's is from the group's, and the
//! bound beyond which a node refuses to lead.
//!
//! A message's `store_ms`, a scheduled message's time and `group reset --to TIME` are
//! read on the leader's wall clock. After a failover to a node whose clock is behind,
//! newer offsets would carry smaller times; one whose clock is ahead would deliver
//! scheduled messages early. So the skew is bounded, not trusted away:
//!
//! - Every append (heartbeats too) is an exchange with four timestamps, as NTP takes
//!   them: the leader sends at `t1` (its clock), the follower receives at `t2` and replies
//!   at `t3` (its clock), the leader reads the reply at `t4` (`t1` plus the round trip on
//!   its monotonic clock, so a step of its own clock meanwhile does not enter). The
//!   follower's offset is `((t2 - t1) + (t3 - t4)) / 2`, wrong by at most half the round
//!   trip minus the follower's time, so of recent exchanges the one with the shortest
//!   round trip counts. A clock that steps (either side's) makes the exchanges before the
//!   step worthless: they are dropped as soon as the step shows.
//! - The group's clock is the median of the voters' (the leader's own is 0 on its
//!   scale): one node far off cannot move it. With an even number of clocks whose two
//!   middle ones disagree beyond the bound, what the last leader said decides; without
//!   that, nothing is decided (a new leader waits a moment for more clocks). Each append
//!   tells the follower how far it is from the median; the leader computes its own.
//! - A node more than [`MAX_SKEW_MS`] from the group's clock raises an alarm (a log line,
//!   the `txmq_clock_skew_ms` gauge, `/health` answers `clock_skewed`) and refuses to
//!   lead: elected, it hands the leadership to a member whose clock agrees before serving
//!   anything (see `Node::leading`), and a leader whose clock drifts off hands over too.
//! - Within the bound, the writer's `store_ms` never goes backwards (see the writer's
//!   clock): times are at most [`MAX_SKEW_MS`] early, never out of order.
//!
//! NTP (or chrony) on every node is a requirement: this is an alarm and a fence, not a
//! clock discipline.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most a node's wall clock may differ from the group's and the node still lead.
pub const MAX_SKEW_MS: i64 = 500;

/// Exchanges kept per peer (the best of them counts).
const SAMPLES: usize = 8;
/// An exchange older than this tells nothing about the clock now.
const FRESH: Duration = Duration::from_secs(5);
/// How long what the leader told this node of its skew is believed without news.
const TOLD_FOR: Duration = Duration::from_secs(60);
/// A clock that moved this much against the monotonic clock (or a peer's offset that
/// moved this much beyond its round trips) stepped: earlier exchanges are dropped.
const STEP_MS: i64 = 50;

/// One exchange with a peer.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Its clock minus this node's, in ms.
    offset_ms: i64,
    /// The round trip without the peer's own time, in ms.
    delay_ms: i64,
    at: Instant,
}

/// What this node knows of the group's clocks.
#[derive(Debug, Default)]
pub struct Clocks {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// As a leader: recent exchanges with each peer.
    peers: HashMap<u64, VecDeque<Sample>>,
    /// The group's voters (learners' clocks do not count); empty: not known yet, all.
    voters: Vec<u64>,
    /// This node's wall clock and monotonic clock read together, to see its own steps.
    anchor: Option<(i64, Instant)>,
    /// As a follower: this node's skew from the group's clock, as the leader last told
    /// it, and when.
    told: Option<(i64, Instant)>,
    /// The alarm is raised (logged once when it is raised and once when it clears).
    alarmed: bool,
}

impl Clocks {
    /// An exchange with `peer`: this node sent at `t1` (its wall clock, in ms) and read
    /// the reply `round_trip` later (its monotonic clock); the peer received at `t2` and
    /// replied at `t3` (its wall clock).
    pub fn exchange(&self, peer: u64, t1: u64, t2: u64, t3: u64, round_trip: Duration) {
        let (t1, t2, t3) = (t1 as i64, t2 as i64, t3 as i64);
        let t4 = t1 + round_trip.as_millis() as i64;
        let delay_ms = (t4 - t1) - (t3 - t2);
        let mut inner = self.inner.lock().expect("clocks");
        inner.watch_own_clock();
        if delay_ms < -1 {
            // The peer's clock stepped while it held the request: worthless.
            return;
        }
        let sample = Sample {
            offset_ms: ((t2 - t1) + (t3 - t4)) / 2,
            delay_ms: delay_ms.max(0),
            at: Instant::now(),
        };
        let samples = inner.peers.entry(peer).or_default();
        if let Some(last) = samples.back()
            && (sample.offset_ms - last.offset_ms).abs() > sample.delay_ms + last.delay_ms + STEP_MS
        {
            // The peer's clock stepped (or this node's, between the two): what came
            // before no longer says where it is.
            samples.clear();
        }
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The group's voters: only their clocks count.
    pub fn set_voters(&self, voters: &[u64]) {
        let mut inner = self.inner.lock().expect("clocks");
        if inner.voters != voters {
            inner.voters = voters.to_vec();
        }
    }

    /// As the leader: whether the clocks measured decide where the group's clock is
    /// (false while the two middle ones of an even number disagree and no leader told
    /// this node where it stands: a new leader waits for more clocks then).
    pub fn decided(&self) -> bool {
        let mut inner = self.inner.lock().expect("clocks");
        inner.watch_own_clock();
        inner.fresh_peers() == 0 || inner.group_clock().is_some()
    }

    /// The leader told this node its skew from the group's clock.
    pub fn told(&self, skew_ms: i64) {
        let mut inner = self.inner.lock().expect("clocks");
        inner.told = Some((skew_ms, Instant::now()));
        inner.alarm(skew_ms);
    }

    /// As the leader: how far `peer`'s clock is from the group's (what its next append
    /// tells it); `None` without a recent exchange with it.
    pub fn skew_of(&self, peer: u64) -> Option<i64> {
        let inner = self.inner.lock().expect("clocks");
        let offset = inner.best(peer)?;
        Some(offset - inner.group_clock()?)
    }

    /// This node's skew from the group's clock: measured as the leader (`leading`), else
    /// as the leader last told it; `None` when unknown.
    pub fn own_skew(&self, leading: bool) -> Option<i64> {
        let mut inner = self.inner.lock().expect("clocks");
        inner.watch_own_clock();
        let skew = if leading && inner.fresh_peers() > 0 {
            inner.group_clock().map(|g| -g)
        } else {
            inner.told()
        };
        if let Some(skew) = skew {
            inner.alarm(skew);
        }
        skew
    }

    /// As the leader: the member to hand the leadership to when this node's clock is
    /// off: the one of `voters` (other than `me`) closest to the group's clock, measured;
    /// else the first other voter.
    pub fn best_successor(&self, me: u64, voters: &[u64]) -> Option<u64> {
        let others = voters.iter().copied().filter(|v| *v != me);
        let measured = others
            .clone()
            .filter_map(|v| self.skew_of(v).map(|s| (s.unsigned_abs(), v)))
            .min()
            .map(|(_, v)| v);
        measured.or_else(|| others.min())
    }
}

/// Whether a skew is beyond the bound.
pub fn too_far(skew_ms: i64) -> bool {
    skew_ms.unsigned_abs() > MAX_SKEW_MS as u64
}

impl Inner {
    /// `peer`'s offset from the freshest exchanges: the one with the shortest round trip.
    fn best(&self, peer: u64) -> Option<i64> {
        self.peers
            .get(&peer)?
            .iter()
            .filter(|s| s.at.elapsed() < FRESH)
            .min_by_key(|s| s.delay_ms)
            .map(|s| s.offset_ms)
    }

    /// Whether `peer`'s clock counts: a voter (or the voters are not known yet).
    fn counts(&self, peer: u64) -> bool {
        self.voters.is_empty() || self.voters.contains(&peer)
    }

    fn fresh_peers(&self) -> usize {
        self.peers
            .keys()
            .filter(|p| self.counts(**p) && self.best(**p).is_some())
            .count()
    }

    /// Drops every exchange, and what a leader told, when this node's own wall clock
    /// stepped since it last looked: they were all measured against the old clock.
    fn watch_own_clock(&mut self) {
        let now = (txmq_protocol::now_ms() as i64, Instant::now());
        if let Some((wall, at)) = self.anchor {
            let moved = (now.0 - wall) - at.elapsed().as_millis() as i64;
            if moved.abs() > STEP_MS {
                tracing::warn!(
                    step_ms = moved,
                    "this node's wall clock stepped: its measurements start again"
                );
                self.peers.clear();
                self.told = None;
            }
        }
        self.anchor = Some(now);
    }

    fn told(&self) -> Option<i64> {
        self.told
            .filter(|(_, at)| at.elapsed() < TOLD_FOR)
            .map(|(s, _)| s)
    }

    /// The group's clock on this node's scale (ms ahead of this node's); `None` when
    /// the clocks measured do not decide it.
    fn group_clock(&self) -> Option<i64> {
        let mut clocks: Vec<i64> = vec![0];
        clocks.extend(
            self.peers
                .keys()
                .filter(|p| self.counts(**p))
                .filter_map(|p| self.best(*p)),
        );
        median(clocks, self.told().map(|s| -s))
    }

    fn alarm(&mut self, skew_ms: i64) {
        let off = too_far(skew_ms);
        if off && !self.alarmed {
            tracing::error!(
                skew_ms,
                "this node's wall clock is {skew_ms} ms from the group's (more than \
                 {MAX_SKEW_MS} ms): it will not lead until its clock is corrected; \
                 check NTP on this machine"
            );
        } else if !off && self.alarmed {
            tracing::info!(
                skew_ms,
                "this node's wall clock agrees with the group's again"
            );
        }
        self.alarmed = off;
    }
}

/// The median of `clocks` (this node's among them, as 0). With an even count the two
/// middle values can disagree and nothing in them says which is right: within the
/// bound of each other either will do (the one closer to this node's); beyond it, the one
/// closer to `hint` (the group's clock as last told, when known), else `None`.
fn median(mut clocks: Vec<i64>, hint: Option<i64>) -> Option<i64> {
    clocks.sort_unstable();
    let n = clocks.len();
    if n == 1 {
        return Some(hint.unwrap_or(0));
    }
    if n % 2 == 1 {
        return Some(clocks[n / 2]);
    }
    let (low, high) = (clocks[n / 2 - 1], clocks[n / 2]);
    let toward = match hint {
        Some(hint) => hint,
        None if too_far(high - low) => return None,
        None => 0,
    };
    Some(if (low - toward).abs() <= (high - toward).abs() {
        low
    } else {
        high
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exchange given its four wall-clock times.
    fn ex(c: &Clocks, peer: u64, t1: u64, t2: u64, t3: u64, t4: u64) {
        c.exchange(peer, t1, t2, t3, Duration::from_millis(t4 - t1));
    }

    #[test]
    fn an_exchange_measures_the_offset_without_the_peers_own_time() {
        let c = Clocks::default();
        // The peer is 3 s ahead; 2 ms each way; it took 50 ms to answer (an fsync).
        ex(&c, 2, 1000, 4002, 4052, 1054);
        let inner = c.inner.lock().unwrap();
        assert_eq!(inner.best(2), Some(3000));
        assert_eq!(inner.peers[&2][0].delay_ms, 4);
    }

    #[test]
    fn the_shortest_round_trip_counts() {
        let c = Clocks::default();
        // A slow exchange (a big append: 400 ms on the way there) reads the offset
        // wrong; a heartbeat right after reads it right.
        ex(&c, 2, 1000, 1400, 1401, 1402);
        ex(&c, 2, 2000, 2001, 2001, 2002);
        assert_eq!(c.inner.lock().unwrap().best(2), Some(0));
    }

    #[test]
    fn one_clock_far_off_does_not_move_the_group() {
        // Leader 1 fine, follower 2 three seconds ahead, follower 3 fine.
        let c = Clocks::default();
        ex(&c, 2, 1000, 4001, 4001, 1002);
        ex(&c, 3, 1000, 1001, 1001, 1002);
        assert_eq!(c.skew_of(2), Some(3000));
        assert_eq!(c.skew_of(3), Some(0));
        assert_eq!(c.own_skew(true), Some(0));
        assert_eq!(c.best_successor(1, &[1, 2, 3]), Some(3));
    }

    #[test]
    fn a_leader_far_off_finds_itself_off() {
        // Leader 1 three seconds ahead of both followers.
        let c = Clocks::default();
        ex(&c, 2, 4000, 1001, 1001, 4002);
        ex(&c, 3, 4000, 1001, 1001, 4002);
        assert_eq!(c.own_skew(true), Some(3000));
        assert!(too_far(c.own_skew(true).unwrap()));
        assert_eq!(c.skew_of(2), Some(0));
    }

    #[test]
    fn with_two_clocks_what_the_leader_told_decides() {
        // A failover: node 2 (3 s ahead) was told so by the old leader, which is gone;
        // elected, it hears from node 3 only.
        let c = Clocks::default();
        c.told(3000);
        ex(&c, 3, 4000, 1001, 1001, 4002);
        assert_eq!(c.own_skew(true), Some(3000));
        assert_eq!(c.skew_of(3), Some(0));
        // Told nothing, nothing says which of the two is off: undecided, and nobody is
        // told anything.
        let c = Clocks::default();
        ex(&c, 3, 4000, 1001, 1001, 4002);
        assert!(!c.decided());
        assert_eq!(c.own_skew(true), None);
        assert_eq!(c.skew_of(3), None);
        // Two clocks within the bound of each other: decided.
        let c = Clocks::default();
        ex(&c, 3, 4000, 4301, 4301, 4002);
        assert!(c.decided());
        assert_eq!(c.own_skew(true), Some(0));
    }

    #[test]
    fn learners_clocks_do_not_count() {
        // Voter 1 (this leader) and voter 2 agree; learners 3 and 4 are far off.
        let c = Clocks::default();
        c.set_voters(&[1, 2]);
        ex(&c, 2, 1000, 1001, 1001, 1002);
        ex(&c, 3, 1000, 9001, 9001, 1002);
        ex(&c, 4, 1000, 9001, 9001, 1002);
        assert_eq!(c.own_skew(true), Some(0));
        assert_eq!(c.skew_of(3), Some(8000));
    }

    #[test]
    fn a_peer_whose_clock_stepped_is_measured_afresh() {
        let c = Clocks::default();
        // Slow exchanges at first (the best of them says 0), then the peer's clock
        // steps 3 s ahead: the old, shorter round trips must not keep saying 0.
        ex(&c, 2, 1000, 1001, 1001, 1002);
        ex(&c, 2, 2000, 5020, 5020, 2040);
        assert_eq!(c.inner.lock().unwrap().best(2), Some(3000));
        // A reply that says the peer held the request longer than the round trip took:
        // its clock stepped meanwhile. Dropped.
        ex(&c, 2, 3000, 6000, 6500, 3010);
        assert_eq!(c.inner.lock().unwrap().peers[&2].len(), 1);
    }

    #[test]
    fn a_follower_knows_what_it_was_told() {
        let c = Clocks::default();
        assert_eq!(c.own_skew(false), None);
        c.told(-700);
        assert_eq!(c.own_skew(false), Some(-700));
        // Not yet measured as a leader: what it was told.
        assert_eq!(c.own_skew(true), Some(-700));
    }

    #[test]
    fn the_bound() {
        assert!(!too_far(MAX_SKEW_MS));
        assert!(!too_far(-MAX_SKEW_MS));
        assert!(too_far(MAX_SKEW_MS + 1));
        assert!(too_far(-MAX_SKEW_MS - 1));
    }
}
