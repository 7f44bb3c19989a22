//! The name-server part: routes, cluster info and topic lists, all naming this broker
//! as broker id 0 (the master) of one broker name in one cluster.
//!
//! Each topic shows [`Config::remoting_queues`] readable and writable queues, so that
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
use crate::service::{Principal, admin};

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

/// This broker as a route's broker data.
fn broker_data(ep: &Endpoint) -> serde_json::Value {
    json!({
        "brokerAddrs": {"0": ep.advertised.to_string()},
        "brokerName": BROKER_NAME,
        "cluster": CLUSTER,
        "enableActingMaster": false,
    })
}

fn route(ep: &Endpoint, queues: usize, perm: u32) -> Vec<u8> {
    let body = json!({
        "brokerDatas": [broker_data(ep)],
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

/// The group of a retry (`%RETRY%`) or dead-letter (`%DLQ%`) topic.
pub fn group_topic(topic: &str) -> Option<(&'static str, &str)> {
    if let Some(g) = topic.strip_prefix("%RETRY%") {
        return Some(("%RETRY%", g));
    }
    topic.strip_prefix("%DLQ%").map(|g| ("%DLQ%", g))
}

/// GET_ROUTEINFO_BY_TOPIC.
pub async fn topic(ep: &Endpoint, who: &Principal, req: &Command) -> Command {
    let topic = match required(req, "topic") {
        Ok(t) => t.to_string(),
        Err(answer) => return answer,
    };
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let ok = |body: Vec<u8>| Command::answer(req, codes::SUCCESS, None).with_body(body);
    if let Some((kind, group)) = group_topic(&topic) {
        if let Err(e) = crate::service::name("group", group) {
            return Command::answer(req, codes::TOPIC_NOT_EXIST, Some(e.to_string()));
        }
        let perm = if kind == "%DLQ%" { PERM_READ } else { PERM_RW };
        return ok(route(ep, 1, perm));
    }
    if topic == AUTO_CREATE_TOPIC {
        if !shared.config.auto_create_topics {
            return Command::answer(
                req,
                codes::TOPIC_NOT_EXIST,
                Some("this broker creates no topic on demand: create it first".into()),
            );
        }
        return ok(route(ep, ep.config.remoting_queues, PERM_INHERIT));
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
    match admin::route_topic(&shared, who, &topic).await {
        Ok(()) => {
            let queues = ep.queues(&shared, &topic);
            // Its count may have shrunk since the clients last asked: what the queues
            // beyond held is let go (they come again once their leases end).
            for (group, h) in ep.pulls.shrunk(&topic, queues) {
                ep.renewals
                    .release(&group, &topic, LeaseRef::new(h.offset, h.lease_id));
            }
            ok(route(ep, queues, PERM_RW))
        }
        Err(e @ (Error::TopicNotFound(_) | Error::InvalidName(_))) => {
            Command::answer(req, codes::TOPIC_NOT_EXIST, Some(e.to_string()))
        }
        Err(e) => refusal(req, &e),
    }
}

/// GET_BROKER_CLUSTER_INFO.
pub fn cluster(ep: &Endpoint, req: &Command) -> Command {
    let body = json!({
        "brokerAddrTable": {BROKER_NAME: broker_data(ep)},
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
