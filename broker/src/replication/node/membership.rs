//! Membership: the group as the leader sees it, and adding or removing a node.

use std::sync::Arc;

use openraft::BasicNode;
use openraft::async_runtime::watch::WatchReceiver;

use super::Node;
use crate::error::{Error, Result};
use crate::replication::TypeConfig;
use txmq_protocol::pb;

impl Node {
    /// The group as this node (its leader) sees it: members, progress, lag.
    pub async fn status(&self) -> pb::ClusterStatusOk {
        let m = self.raft.metrics().borrow_watched().clone();
        let last = m.last_log_index.unwrap_or(0);
        let membership = m.membership_config.membership().clone();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let mut nodes = Vec::new();
        for (id, node) in membership.nodes() {
            let matched = if *id == self.peers.me {
                Some(last)
            } else {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|l| l.index)
            };
            let client = self.client_address(*id, &node.addr).await;
            nodes.push(pb::ClusterNode {
                id: *id,
                peer_addr: node.addr.clone(),
                reachable: client.is_some(),
                client_addr: client.unwrap_or_default(),
                voter: voters.contains(id),
                matched_index: matched.unwrap_or(0),
                lag: last.saturating_sub(matched.unwrap_or(0)),
                clock_skew_ms: if *id == self.peers.me {
                    self.clocks.own_skew(true)
                } else {
                    self.clocks.skew_of(*id)
                },
            });
        }
        pb::ClusterStatusOk {
            leader: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_log_index: last,
            committed_index: m.local_committed.map_or(0, |l| l.index),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            nodes,
            purged_index: m.purged.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
        }
    }

    /// Adds node `id`, reached at `peer`: a learner at once, then (in the background,
    /// once it has caught up from a snapshot and the log) a voter.
    ///
    /// # Errors
    /// The node is already a member, this node does not lead, or Raft refused.
    pub async fn add(self: &Arc<Self>, id: u64, peer: String) -> Result<()> {
        let membership = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        if membership.membership().get_node(&id).is_some() {
            return Err(Error::Invalid(format!("node {id} is already a member")));
        }
        self.raft
            .add_learner(id, BasicNode { addr: peer.clone() }, false)
            .await
            .map_err(raft_error)?;
        tracing::info!(node = id, %peer, "node added as a learner; it becomes a voter once caught up");
        let node = self.clone();
        self.tasks.spawn(async move {
            let promote = async {
                // Blocking: returns once the learner's log is up to date.
                node.raft
                    .add_learner(id, BasicNode { addr: peer }, true)
                    .await
                    .map_err(raft_error)?;
                let ids = std::collections::BTreeSet::from([id]);
                node.raft
                    .change_membership(openraft::ChangeMembers::AddVoterIds(ids), false)
                    .await
                    .map_err(raft_error)
            };
            tokio::select! {
                () = node.stop.cancelled() => {}
                r = promote => match r {
                    Ok(_) => tracing::info!(node = id, "node caught up: now a voter"),
                    Err(e) => tracing::warn!(node = id, "node not made a voter: {e}"),
                },
            }
        });
        Ok(())
    }

    /// Removes node `id` from the group (voter or learner).
    ///
    /// # Errors
    /// It is not a member, it is the last voter, or Raft refused.
    pub async fn remove(&self, id: u64) -> Result<()> {
        let membership = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        let membership = membership.membership();
        let ids = std::collections::BTreeSet::from([id]);
        let change = if membership.voter_ids().any(|v| v == id) {
            if membership.voter_ids().count() == 1 {
                return Err(Error::Invalid(format!(
                    "node {id} is the group's last voter"
                )));
            }
            openraft::ChangeMembers::RemoveVoters(ids)
        } else if membership.get_node(&id).is_some() {
            openraft::ChangeMembers::RemoveNodes(ids)
        } else {
            return Err(Error::Invalid(format!("node {id} is not a member")));
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(raft_error)?;
        tracing::info!(node = id, "node removed from the group");
        Ok(())
    }
}

/// A Raft refusal as the broker's error.
fn raft_error<E>(e: openraft::errors::RaftError<TypeConfig, E>) -> Error
where
    E: std::error::Error
        + openraft::TryAsRef<openraft::errors::ForwardToLeader<TypeConfig>>
        + 'static,
{
    match e.forward_to_leader() {
        Some(_) => Error::NotLeader(None),
        None => Error::Invalid(e.to_string()),
    }
}
