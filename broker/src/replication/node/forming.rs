//! Forming the group, the first time.
//!
//! Every node is started with the same `--peers`. A node with an empty log waits to be
//! sent entries. The node with the lowest id forms the group (`initialize` with every
//! peer as a voter) once every other peer answers that it is empty too: so a node whose
//! data directory was lost never forms a second group of its own, it waits for the
//! leader to bring it up to date.

use std::collections::BTreeMap;
use std::time::Duration;

use openraft::BasicNode;
use tokio_util::sync::CancellationToken;

use crate::replication::handshake::Credentials;
use crate::replication::network;
use crate::replication::{Peers, Raft};

/// Forms the group if this node has the lowest id and every peer is as new as it is.
pub(super) async fn form_group(
    raft: Raft,
    peers: Peers,
    creds: Credentials,
    stop: CancellationToken,
) {
    let lowest = peers.nodes.keys().next().copied();
    loop {
        match raft.is_initialized().await {
            Ok(true) | Err(_) => return,
            Ok(false) => {}
        }
        if lowest == Some(peers.me) {
            let mut all_new = true;
            for (id, addr) in peers.nodes.iter().filter(|(id, _)| **id != peers.me) {
                match network::info(addr, &creds, Duration::from_secs(1)).await {
                    Ok(info) if !info.initialized => {}
                    Ok(_) => {
                        tracing::info!(
                            peer = id,
                            "peer already belongs to a group: waiting to be brought up to date"
                        );
                        all_new = false;
                    }
                    Err(e) => {
                        tracing::info!(
                            peer = id,
                            "peer not reachable yet ({e}): the group forms once every peer answers"
                        );
                        all_new = false;
                    }
                }
            }
            if all_new {
                let members: BTreeMap<u64, BasicNode> = peers
                    .nodes
                    .iter()
                    .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                    .collect();
                match raft.initialize(members).await {
                    Ok(()) => {
                        tracing::info!(nodes = peers.nodes.len(), "group formed");
                        return;
                    }
                    Err(e) => tracing::warn!("forming the group failed: {e}"),
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
