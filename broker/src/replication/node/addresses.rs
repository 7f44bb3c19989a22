//! Where the other members, and the leader above all, take clients: asked of them over
//! the node network and remembered for a while.

use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;

use super::{Addresses, Node};
use crate::replication::network::{self, NodeInfo};

/// How long a member's client address, once asked, is told without asking again (a
/// restarted member may listen elsewhere).
const KNOWN_FOR: Duration = Duration::from_secs(10);

/// How long a leader that did not answer about itself is not asked again.
const UNANSWERED_FOR: Duration = Duration::from_secs(1);

impl Node {
    /// The leader's client address, when another node leads and it can be asked.
    pub async fn leader_address(&self) -> Option<String> {
        self.leader_info().await.map(|info| info.client_addr)
    }

    /// What the leader tells about itself (its client and gRPC addresses), when another
    /// node leads and it can be asked; remembered for a while.
    pub async fn leader_info(&self) -> Option<NodeInfo> {
        let (leader, addr) = {
            let m = self.raft.metrics().borrow_watched().clone();
            let leader = m.current_leader.filter(|&l| l != self.peers.me)?;
            let addr = m
                .membership_config
                .membership()
                .get_node(&leader)
                .map(|n| n.addr.clone())
                .or_else(|| self.peers.nodes.get(&leader).cloned())?;
            (leader, addr)
        };
        let cached = || {
            let known = self.known.lock().expect("known");
            known
                .get(&leader)
                .filter(|(_, at)| at.elapsed() < KNOWN_FOR)
                .map(|(info, _)| info.clone())
        };
        if let Some(info) = cached() {
            return Some(info);
        }
        // One question at a time (every refused client and route asks), and none again
        // for a second after the leader did not answer.
        let mut unanswered = self.asking.lock().await;
        if let Some(info) = cached() {
            return Some(info);
        }
        if let Some((id, at)) = *unanswered
            && id == leader
            && at.elapsed() < UNANSWERED_FOR
        {
            return None;
        }
        let info = self.ask_info(leader, &addr).await;
        *unanswered = info.is_none().then(|| (leader, std::time::Instant::now()));
        info
    }

    /// This node's addresses for clients, as it tells the others.
    pub fn addresses(&self) -> &Addresses {
        &self.addresses
    }

    /// The client address of node `id` reached at `peer`, asked of it now (and
    /// remembered for [`Node::leader_address`]).
    pub(super) async fn client_address(&self, id: u64, peer: &str) -> Option<String> {
        if id == self.peers.me {
            return Some(self.addresses.client.clone());
        }
        self.ask_info(id, peer).await.map(|info| info.client_addr)
    }

    /// What node `id` reached at `peer` tells about itself, asked now and remembered.
    async fn ask_info(&self, id: u64, peer: &str) -> Option<NodeInfo> {
        match network::info(peer, &self.creds, Duration::from_secs(1)).await {
            Ok(info) => {
                self.known
                    .lock()
                    .expect("known")
                    .insert(id, (info.clone(), std::time::Instant::now()));
                Some(info)
            }
            Err(_) => None,
        }
    }
}
