//! Leadership: when this node serves as the group's leader, and when it stops.
//!
//! [`Node::leading`] completes when this node leads with a committed vote, has heard
//! from a majority lately and has applied everything committed before its term (a blank
//! entry of its own, committed and applied), and its wall clock agrees with the group's;
//! [`Node::lost`] completes when that term's leadership ends, renewing the [`Lease`](crate::replication::lease::Lease)
//! meanwhile. [`Node::transfer`] hands the leadership over without two nodes serving.

use std::time::Duration;

use openraft::Instant as _;
use openraft::ServerState;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::type_config::TypeConfigExt;
use openraft::vote::RaftLeaderId;

use super::{LeaderId, Node};
use crate::error::{Error, Result};
use crate::replication::TypeConfig;
use crate::replication::clock;
use crate::replication::lease::QUORUM_SILENCE;

/// How long a leader that handed its leadership over takes no lease renewal in its term:
/// time for the target, or after its election timeout another node, to be elected.
pub const RESIGN_FOR: Duration = Duration::from_secs(5);

/// One term of this node's leadership.
#[derive(Debug, Clone)]
pub struct Leadership {
    /// The term.
    pub term: u64,
    /// The leader id of the term: the writer's writes carry it.
    pub leader: LeaderId,
}

impl Node {
    /// Waits until this node leads (with a committed vote), has heard from a majority
    /// lately, and has applied everything committed before; `None` if its Raft stopped.
    pub async fn leading(&self) -> Option<Leadership> {
        let mut rx = self.raft.metrics();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            let lead = {
                let m = rx.borrow_watched();
                (m.state == ServerState::Leader
                    && m.current_leader == Some(self.peers.me)
                    && m.vote.is_committed()
                    && self.heard_from_majority(&m)
                    && *self.handed_over.lock().expect("handed over") != Some(m.current_term))
                .then(|| (m.current_term, m.vote.leader_id().to_committed()))
            };
            if let Some((term, leader)) = lead {
                // A blank entry at the end of the log, committed and applied: every
                // entry before it is applied too, those of earlier terms and those this
                // node wrote in this term before it last stopped serving (a write that
                // gave up may still commit). Only then is the state loaded.
                match self.raft.write_blank().await {
                    // Committed, the blank entry measured the clocks of a majority: a
                    // node whose clock is off serves nothing and hands over.
                    Ok(_) if self.hand_over_if_clock_off(term, true).await => {}
                    Ok(_) => {
                        // The blank entry was committed by a majority just now; a
                        // leadership handed over earlier is over.
                        self.lease.resume();
                        self.lease.renew(Duration::ZERO);
                        tracing::info!(term, "leading the group");
                        return Some(Leadership { term, leader });
                    }
                    Err(e) => tracing::info!(term, "elected, but not leading after all: {e}"),
                }
            }
            tokio::select! {
                changed = rx.changed() => changed.ok()?,
                _ = tick.tick() => {}
            }
        }
    }

    /// Completes when `leadership` ended (another term, or this node follows), or when
    /// this leader has not heard from a majority for [`QUORUM_SILENCE`]: cut off from
    /// the others, it can commit nothing, and they elect another leader meanwhile; so it
    /// stops serving rather than keep its clients waiting.
    ///
    /// Meanwhile it renews the [`Lease`](crate::replication::lease::Lease) that requests, deliveries and check-backs ask
    /// before they serve; it ends the lease when it returns.
    pub async fn lost(&self, leadership: &Leadership) {
        self.keep_lease(leadership).await;
        self.lease.end();
    }

    async fn keep_lease(&self, leadership: &Leadership) {
        let mut rx = self.raft.metrics();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            {
                let m = rx.borrow_watched();
                if m.state != ServerState::Leader || m.current_term != leadership.term {
                    return;
                }
                match self.majority_contact(&m) {
                    // (Handing over, the lease takes no renewal: see `transfer`.)
                    Some(ago) if ago < QUORUM_SILENCE => self.lease.renew(ago),
                    _ => {
                        tracing::warn!(
                            term = leadership.term,
                            "no majority of the group heard from for {QUORUM_SILENCE:?}: not serving"
                        );
                        return;
                    }
                }
            }
            if self.hand_over_if_clock_off(leadership.term, false).await {
                return;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() {
                    return;
                },
                _ = tick.tick() => {}
            }
        }
    }

    /// As the leader of `term`: if this node's wall clock is more than
    /// [`clock::MAX_SKEW_MS`] from the group's, stops serving and hands the leadership to
    /// the member whose clock agrees best (see [`crate::replication::clock`]); true if it did. Not
    /// served again in this term; elected again later, it checks again.
    async fn hand_over_if_clock_off(&self, term: u64, newly_elected: bool) -> bool {
        let voters: Vec<u64> = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        self.clocks.set_voters(&voters);
        if newly_elected {
            // With an even number of clocks measured that disagree (one follower answered
            // so far), this node may be the one off: a moment for more heartbeats.
            for _ in 0..10 {
                if self.clocks.decided() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !self.clocks.decided() {
                tracing::warn!(
                    term,
                    "the members' clocks disagree and none decides which is off (two \
                     clocks, and no leader said where this one stands): leading"
                );
            }
        }
        let Some(skew) = self.clocks.own_skew(true).filter(|s| clock::too_far(*s)) else {
            return false;
        };
        let Some(to) = self.clocks.best_successor(self.peers.me, &voters) else {
            // The only voter: no one to hand over to (the alarm is raised).
            return false;
        };
        *self.handed_over.lock().expect("handed over") = Some(term);
        self.lease.resign(RESIGN_FOR);
        tracing::warn!(
            term,
            skew_ms = skew,
            to,
            "this node's wall clock is off: not leading; handing the leadership over"
        );
        if let Err(e) = self.raft.trigger().transfer_leader(to).await {
            tracing::warn!(to, "handing the leadership over failed: {e}");
        }
        true
    }

    /// Whether a majority of the voters (this node among them) acknowledged this
    /// leader within [`QUORUM_SILENCE`]. Not a leader's metrics: true.
    fn heard_from_majority(&self, m: &openraft::RaftMetrics<TypeConfig>) -> bool {
        m.heartbeat.is_none()
            || self
                .majority_contact(m)
                .is_some_and(|ago| ago < QUORUM_SILENCE)
    }

    /// How long ago a majority of the voters (this node among them, now) had all
    /// acknowledged this leader: the time of the majority's oldest acknowledgement.
    /// `None` for metrics that are not a leader's, or with no majority heard from.
    fn majority_contact(&self, m: &openraft::RaftMetrics<TypeConfig>) -> Option<Duration> {
        let heard = m.heartbeat.as_ref()?;
        let now = TypeConfig::now();
        let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
        let mut ages: Vec<Duration> = voters
            .iter()
            .filter_map(|v| {
                if *v == self.peers.me {
                    return Some(Duration::ZERO);
                }
                heard
                    .get(v)
                    .cloned()
                    .flatten()
                    .map(|t| now.saturating_duration_since(t.into_inner()))
            })
            .collect();
        ages.sort_unstable();
        // The freshest majority: its oldest member's age.
        ages.get(voters.len() / 2).copied()
    }

    /// Hands the leadership to voter `to` (planned maintenance): this node stops
    /// leading once `to` has the whole log and was elected.
    ///
    /// # Errors
    /// `to` is not a voter of the group, or is this node.
    pub async fn transfer(&self, to: u64) -> Result<()> {
        let membership = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        if to == self.peers.me {
            return Err(Error::Invalid(format!("node {to} already leads")));
        }
        if !membership.membership().voter_ids().any(|v| v == to) {
            return Err(Error::Invalid(format!(
                "node {to} is not a voter of the group"
            )));
        }
        // The target stands for election at once, not after the followers' patience
        // the lease counts on: this leader stops serving first (requests, deliveries and
        // check-backs all ask the lease), so the two never serve at once. Once asked,
        // openraft's leader sends no more heartbeats in this term: if the target is not
        // elected, the others elect a leader after their election timeout (this node
        // may win again, and then serves). RESIGN_FOR covers that.
        self.lease.resign(RESIGN_FOR);
        if let Err(e) = self.raft.trigger().transfer_leader(to).await {
            self.lease.resume();
            return Err(Error::Internal(e.to_string()));
        }
        tracing::info!(to, "handing the leadership over; serving nothing meanwhile");
        Ok(())
    }
}
