//! The name-server part: routes, cluster info and topic lists, all naming this broker
//! (in a broker group, the node that leads) as broker id 0 (the master) of one broker
//! name in one cluster.
//!
//! Each topic shows its own queue count, else [`Config::remoting_queues`], as readable
//! and writable queues, so that
//! a group's push consumers each get some in their rebalance (one queue would leave
//! all but one idle); what a queue is, here, is in `docs/remoting.md`. A consumer
//! group's retry topic `%RETRY%<group>` has one queue, its dead letters `%DLQ%<group>`
//! one readable queue. `TBW102`, the topic producers fall back to for a topic they do
//! not know, is answered when the broker creates topics on demand.
//!
//! [`Config::remoting_queues`]: crate::config::Config::remoting_queues

use serde_json::json;

use super::codes;
use super::frame::Command;
use super::{Endpoint, refusal, required};
use crate::error::Error;
use crate::service::consume::LeaseRef;
use crate::service::{Principal, admin, cluster};

/// The broker name every route and answer names.
pub const BROKER_NAME: &str = "txmq";
/// The cluster name.
pub const CLUSTER: &str = "DefaultCluster";
/// The topic producers fall back to (`AUTO_CREATE_TOPIC_KEY_TOPIC`).
pub const AUTO_CREATE_TOPIC: &str = "TBW102";

/// Read and write permission (`PermName`).
const PERM_RW: u32 = 6;
const PERM_READ: u32 = 4;
/// Read, write and inherit: a topic others are made from.
const PERM_INHERIT: u32 = 7;

/// The broker data naming the node at `addr` (this broker, or a group's leader).
fn broker_data(addr: &str) -> serde_json::Value {
    json!({
        "brokerAddrs": {"0": addr},
        "brokerName": BROKER_NAME,
        "cluster": CLUSTER,
        "enableActingMaster": false,
    })
}

fn route(addr: &str, queues: usize, perm: u32) -> Vec<u8> {
    let body = json!({
        "brokerDatas": [broker_data(addr)],
        "filterServerTable": {},
        "queueDatas": [{
            "brokerName": BROKER_NAME,
            "perm": perm,
            "readQueueNums": queues,
            "topicSysFlag": 0,
            "writeQueueNums": queues,
        }],
    });
    // Go splits `brokerAddrs` by hand: compact, no spaces.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Where routes send clients: this broker; in a broker group, the node that leads (this
/// one's advertised Remoting address while it serves, else the leader's as it tells it),
/// so a client that knows any node as its name server reaches the one that serves.
///
/// # Errors
/// No leader now (an election), or a leader without a Remoting face.
async fn serving_at(ep: &Endpoint) -> Result<String, Error> {
    let Some(node) = ep.live.group.get() else {
        return Ok(ep.advertised.to_string());
    };
    let addr = if ep.live.get().is_some_and(|s| s.serving.holds()) {
        node.addresses().remoting.clone()
    } else {
        node.leader_info()
            .await
            .ok_or(Error::NotLeader(None))?
            .remoting_addr
    };
    addr.ok_or_else(|| {
        Error::Invalid(
            "the broker group's leader serves no Remoting face (start it with \
             --remoting-listen)"
                .into(),
        )
    })
}

/// The group of a retry (`%RETRY%`) or dead-letter (`%DLQ%`) topic.
pub fn group_topic(topic: &str) -> Option<(&'static str, &str)> {
    if let Some(g) = topic.strip_prefix("%RETRY%") {
        return Some(("%RETRY%", g));
    }
    topic.strip_prefix("%DLQ%").map(|g| ("%DLQ%", g))
}

/// GET_ROUTEINFO_BY_TOPIC. In a broker group any node answers, naming the leader: a
/// follower answers anyone (it cannot check users) and so says nothing of whether the
/// topic exists: the leader refuses what may not be done or names no topic. It reads
/// the topic's queue count from its replicated state, where there is one.
pub async fn topic(ep: &Endpoint, who: &Principal, req: &Command) -> Command {
    let topic = match required(req, "topic") {
        Ok(t) => t.to_string(),
        Err(answer) => return answer,
    };
    let at = match serving_at(ep).await {
        Ok(at) => at,
        Err(e) => return refusal(req, &e),
    };
    let ok = |body: Vec<u8>| Command::answer(req, codes::SUCCESS, None).with_body(body);
    let default_queues = ep.config.remoting_queues;
    if let Some((kind, group)) = group_topic(&topic) {
        if let Err(e) = crate::service::name("group", group) {
            return Command::answer(req, codes::TOPIC_NOT_EXIST, Some(e.to_string()));
        }
        let perm = if kind == "%DLQ%" { PERM_READ } else { PERM_RW };
        return ok(route(&at, 1, perm));
    }
    if topic == AUTO_CREATE_TOPIC {
        if !ep.config.auto_create_topics {
            return Command::answer(
                req,
                codes::TOPIC_NOT_EXIST,
                Some("this broker creates no topic on demand: create it first".into()),
            );
        }
        return ok(route(&at, default_queues, PERM_INHERIT));
    }
    if topic.len() > 127 {
        return Command::answer(
            req,
            codes::TOPIC_NOT_EXIST,
            Some(format!(
                "a RocketMQ record carries topic names of at most 127 bytes; this one has {}",
                topic.len()
            )),
        );
    }
    let not_found = |e: Error| Command::answer(req, codes::TOPIC_NOT_EXIST, Some(e.to_string()));
    let serving = ep.live.get().filter(|s| s.serving.holds());
    match (serving, ep.live.group.get()) {
        (Some(shared), _) => match admin::route_topic(&shared, who, &topic).await {
            Ok(()) => {
                let queues = ep.queues(&shared, &topic);
                // Its count may have shrunk since the clients last asked: what the
                // queues beyond held is let go (they come again once their leases end).
                for (group, h) in ep.pulls.shrunk(&topic, queues) {
                    ep.renewals
                        .release(&group, &topic, LeaseRef::new(h.offset, h.lease_id));
                }
                ok(route(&at, queues, PERM_RW))
            }
            Err(e @ (Error::TopicNotFound(_) | Error::InvalidName(_))) => not_found(e),
            Err(e) => refusal(req, &e),
        },
        (None, Some(node)) => {
            if let Err(e) = crate::service::name("topic", &topic) {
                return not_found(e);
            }
            match cluster::follower_topic_queues(node, topic.clone()).await {
                Some(Ok(Some(q))) if q > 0 => ok(route(&at, q as usize, PERM_RW)),
                // No such topic, or the broker's count: the same answer.
                Some(Ok(_)) => ok(route(&at, default_queues, PERM_RW)),
                Some(Err(e)) => refusal(req, &e),
                None => refusal(req, &Error::NotLeader(None)),
            }
        }
        (None, None) => refusal(req, &Error::Opening),
    }
}

/// GET_BROKER_CLUSTER_INFO: the broker (in a group, its leader).
pub async fn cluster(ep: &Endpoint, req: &Command) -> Command {
    let at = match serving_at(ep).await {
        Ok(at) => at,
        Err(e) => return refusal(req, &e),
    };
    let body = json!({
        "brokerAddrTable": {BROKER_NAME: broker_data(&at)},
        "clusterAddrTable": {CLUSTER: [BROKER_NAME]},
    });
    Command::answer(req, codes::SUCCESS, None)
        .with_body(serde_json::to_vec(&body).unwrap_or_default())
}

/// GET_ALL_TOPIC_LIST_FROM_NAMESERVER.
pub fn topics(ep: &Endpoint, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    match admin::topic_names(&shared, who) {
        Ok(names) => Command::answer(req, codes::SUCCESS, None).with_body(
            serde_json::to_vec(
                &json!({"brokerAddr": ep.advertised.to_string(), "topicList": names}),
            )
            .unwrap_or_default(),
        ),
        Err(e) => refusal(req, &e),
    }
}
