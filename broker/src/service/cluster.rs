//! A broker group's membership: status, adding or removing a node, handing the
//! leadership over (served by the leader; a single broker refuses).

use std::sync::Arc;

use txmq_protocol::pb;

use super::access::{Operation, Resource};
use super::{Answer, Principal, Shared, later};
use crate::error::Error;
use crate::replication::node::Node;

fn node(shared: &Shared) -> Result<Arc<Node>, Error> {
    shared.node.clone().ok_or_else(|| {
        Error::Invalid("this broker is not part of a group (started without --peers)".into())
    })
}

/// The group's members, progress and lag.
pub fn status(shared: &Arc<Shared>, who: &Principal) -> Answer<pb::ClusterStatusOk> {
    if let Err(e) =
        super::access::permit(shared, who, Operation::ClusterStatus, &[Resource::Cluster])
    {
        return Box::pin(std::future::ready(Err(e)));
    }
    let node = node(shared);
    later(async move { Ok(node?.status().await) })
}

/// Adds or removes a node, then answers the group's status.
pub fn change(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::ClusterChangeRequest,
) -> Answer<pb::ClusterStatusOk> {
    if let Err(e) =
        super::access::permit(shared, who, Operation::ClusterChange, &[Resource::Cluster])
    {
        return Box::pin(std::future::ready(Err(e)));
    }
    let node = node(shared);
    later(async move {
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
        Ok(node.status().await)
    })
}

/// The queues topic `name` shows RocketMQ clients as a follower's replicated state has
/// it (0: the broker's; `Ok(None)`: no such topic; `None`: the node holds no state now),
/// for a route it points to the leader.
pub async fn follower_topic_queues(
    node: &Node,
    name: String,
) -> Option<crate::error::Result<Option<u32>>> {
    let slot = node.slot.clone();
    tokio::task::spawn_blocking(move || {
        slot.get()
            .map(|storage| Ok(storage.topic_record(&name)?.map(|r| r.queues)))
    })
    .await
    .unwrap_or_else(|e| Some(Err(crate::error::Error::Internal(e.to_string()))))
}

/// Whether a follower's replicated state holds topic `name`, for a route it points to
/// the leader (`None`: the node holds no state now).
pub async fn follower_has_topic(node: &Node, name: String) -> Option<crate::error::Result<bool>> {
    let slot = node.slot.clone();
    tokio::task::spawn_blocking(move || slot.get().map(|storage| storage.topic_exists(&name)))
        .await
        .unwrap_or_else(|e| Some(Err(crate::error::Error::Internal(e.to_string()))))
}
