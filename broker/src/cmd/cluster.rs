//! A broker group's membership: status, adding or removing a node, handing the
//! leadership over (served by the leader; a single broker refuses).

use std::sync::Arc;

use txmq_protocol::pb;

use super::{Pending, Shared, later};
use crate::error::Error;
use crate::replication::node::Node;

fn node(shared: &Shared) -> Result<Arc<Node>, Error> {
    shared.node.clone().ok_or_else(|| {
        Error::Invalid("this broker is not part of a group (started without --peers)".into())
    })
}

/// The group's members, progress and lag.
pub fn status(id: u64, shared: &Arc<Shared>) -> Pending {
    let node = node(shared);
    later(id, async move {
        Ok(pb::response::Result::Cluster(node?.status().await))
    })
}

/// Adds or removes a node, then answers the group's status.
pub fn change(id: u64, req: pb::ClusterChangeRequest, shared: &Arc<Shared>) -> Pending {
    let node = node(shared);
    later(id, async move {
        let node = node?;
        if req.node_id == 0 {
            return Err(Error::Invalid("node ids start at 1".into()));
        }
        match pb::cluster_change_request::Action::try_from(req.action) {
            Ok(pb::cluster_change_request::Action::Add) => {
                let peer = req.peer_addr.trim().to_string();
                if peer
                    .rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
                {
                    return Err(Error::Invalid(format!(
                        "peer address {peer:?} is not HOST:PORT"
                    )));
                }
                node.add(req.node_id, peer).await?;
            }
            Ok(pb::cluster_change_request::Action::Remove) => node.remove(req.node_id).await?,
            Ok(pb::cluster_change_request::Action::Transfer) => {
                node.transfer(req.node_id).await?;
            }
            _ => {
                return Err(Error::Invalid(
                    "cluster change: ADD, REMOVE or TRANSFER".into(),
                ));
            }
        }
        Ok(pb::response::Result::Cluster(node.status().await))
    })
}
