//! What `mqadmin` asks a broker: runtime info, topic create / delete / stats / config,
//! subscription groups, consume progress, a group's connections, and messages by id
//! or key. Each is a call of the same service the CLI uses, with its permissions.
//!
//! Stats of a topic and of a group are per queue in RocketMQ; a queue being a lane of
//! the group's delivery here (`docs/remoting.md`), a topic's log and a group's ack
//! floor show as queue 0, and the other queues as empty, so the sums mqadmin prints
//! (messages, lag) are txmq's own.

use serde_json::json;
use txmq_protocol::pb as native;

use super::frame::Command;
use super::record::{self, Record};
use super::{Endpoint, codes, invalid, number_or, refusal, required, route, send};
use crate::service::access::{Operation, Resource, permit};
use crate::service::{Principal, admin, delete, messages};

/// A RocketMQ `MessageQueue` as fastjson writes one as a map key: an object.
fn queue_key(topic: &str, queue: usize) -> String {
    format!(
        "{{\"brokerName\":{},\"queueId\":{queue},\"topic\":{}}}",
        json!(route::BROKER_NAME),
        json!(topic)
    )
}

/// A fastjson map keyed by message queues: `{{mq}:value,...}`.
fn queue_map(entries: impl IntoIterator<Item = (String, serde_json::Value)>) -> String {
    let parts: Vec<String> = entries
        .into_iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// GET_BROKER_RUNTIME_INFO: what `clusterList` prints.
pub fn runtime_info(ep: &Endpoint, who: &Principal, req: &Command) -> Command {
    if let Err(e) = ep
        .shared()
        .and_then(|s| permit(&s, who, Operation::Stats, &[Resource::Cluster]))
    {
        return refusal(req, &e);
    }
    let now = txmq_protocol::now_ms().to_string();
    let table = json!({"table": {
        "brokerVersionDesc": format!("txmq {}", env!("CARGO_PKG_VERSION")),
        "brokerVersion": super::frame::VERSION.to_string(),
        "brokerActive": "true",
        "putTps": "0.0 0.0 0.0",
        "getTransferredTps": "0.0 0.0 0.0",
        "msgPutTotalTodayNow": "0",
        "msgGetTotalTodayNow": "0",
        "msgPutTotalYesterdayMorning": "0",
        "msgPutTotalTodayMorning": "0",
        "msgGetTotalYesterdayMorning": "0",
        "msgGetTotalTodayMorning": "0",
        "earliestMessageTimeStamp": now,
        "commitLogDiskRatio": "0.0",
        "sendThreadPoolQueueSize": "0",
        "sendThreadPoolQueueCapacity": "10000",
        "pullThreadPoolQueueSize": "0",
        "pullThreadPoolQueueCapacity": "100000",
        "bootTimestamp": now,
        "runtime": "txmq",
    }});
    Command::answer(req, codes::SUCCESS, None)
        .with_body(serde_json::to_vec(&table).unwrap_or_default())
}

/// UPDATE_AND_CREATE_TOPIC (`mqadmin updateTopic -r/-w`): creates the topic with its
/// queue count, or sets an existing one's. One count serves both: a queue is a lane of
/// the group's one delivery, so only how many lanes consumers share means anything
/// (the read count; the write count where it is missing). Creating, or asking for the
/// count a topic has, needs `create`; changing an existing topic's count, `alter`. A
/// refusal says the same either way: it does not tell whether the topic exists.
pub async fn create_topic(ep: &Endpoint, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let topic = match required(req, "topic") {
        Ok(t) => t.to_string(),
        Err(a) => return a,
    };
    let (read, write) = match (
        number_or::<u32>(req, "readQueueNums", 0),
        number_or::<u32>(req, "writeQueueNums", 0),
    ) {
        (Ok(r), Ok(w)) => (r, w),
        (Err(a), _) | (_, Err(a)) => return a,
    };
    let queues = if read > 0 { read } else { write };
    let default = u32::try_from(ep.config.remoting_queues).unwrap_or(u32::MAX);
    let changes = admin::topic_id(&shared, &topic).is_some()
        && queues > 0
        && queues != admin::topic_queues(&shared, &topic, default);
    let done = if changes {
        let change = native::ChangeTopicRequest {
            topic,
            queues: (queues > 0).then_some(queues),
            ..Default::default()
        };
        admin::alter_topic(&shared, who, change).await
    } else {
        let ask = native::CreateTopicRequest {
            topic,
            fail_if_exists: false,
            queues,
            ..Default::default()
        };
        admin::create_topic(&shared, who, ask).await
    };
    match done {
        Ok(_) => Command::answer(req, codes::SUCCESS, None),
        Err(crate::error::Error::PermissionDenied(_)) => Command::answer(
            req,
            codes::NO_PERMISSION,
            Some(format!(
                "may not create or change topic {}",
                req.field("topic").unwrap_or_default()
            )),
        ),
        Err(e) => refusal(req, &e),
    }
}

/// DELETE_TOPIC_IN_BROKER: deletes the topic, its log and its groups' positions.
pub async fn delete_topic(ep: &Endpoint, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let topic = match required(req, "topic") {
        Ok(t) => t.to_string(),
        Err(a) => return a,
    };
    let ask = native::DeleteTopicRequest { topic, force: true };
    match delete::delete_topic(&shared, who, ask).await {
        Ok(_) | Err(crate::error::Error::TopicNotFound(_)) => {
            Command::answer(req, codes::SUCCESS, None)
        }
        Err(e) => refusal(req, &e),
    }
}

/// GET_TOPIC_STATS_INFO: the topic's offsets, per queue.
pub fn topic_stats(ep: &Endpoint, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let topic = match required(req, "topic") {
        Ok(t) => t,
        Err(a) => return a,
    };
    if let Err(e) = permit(
        &shared,
        who,
        Operation::ListTopics,
        &[Resource::Topic(topic)],
    ) {
        return refusal(req, &e);
    }
    if admin::topic_id(&shared, topic).is_none() {
        return Command::answer(
            req,
            codes::TOPIC_NOT_EXIST,
            Some(format!("topic {topic} does not exist")),
        );
    }
    let end = admin::topic_end(&shared, topic);
    let rows = (0..ep.queues(&shared, topic)).map(|q| {
        let max = if q == 0 { end } else { 0 };
        (
            queue_key(topic, q),
            json!({"lastUpdateTimestamp": 0, "maxOffset": max, "minOffset": 0}),
        )
    });
    let body = format!(
        "{{\"offsetTable\":{},\"topicPutTps\":0.0}}",
        queue_map(rows)
    );
    Command::answer(req, codes::SUCCESS, None).with_body(body)
}

/// GET_TOPIC_CONFIG: the topic's queues and permission.
pub fn topic_config(ep: &Endpoint, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let topic = match required(req, "topic") {
        Ok(t) => t,
        Err(a) => return a,
    };
    if let Err(e) = permit(
        &shared,
        who,
        Operation::ListTopics,
        &[Resource::Topic(topic)],
    ) {
        return refusal(req, &e);
    }
    if admin::topic_id(&shared, topic).is_none() {
        return Command::answer(
            req,
            codes::TOPIC_NOT_EXIST,
            Some(format!("topic {topic} does not exist")),
        );
    }
    let n = ep.queues(&shared, topic);
    let body = json!({
        "topicName": topic, "readQueueNums": n, "writeQueueNums": n, "perm": 6,
        "topicFilterType": "SINGLE_TAG", "topicSysFlag": 0, "order": false, "attributes": {},
    });
    Command::answer(req, codes::SUCCESS, None)
        .with_body(serde_json::to_vec(&body).unwrap_or_default())
}

/// UPDATE_AND_CREATE_SUBSCRIPTIONGROUP: a txmq group is made by its first consumer;
/// the request is checked and taken.
pub fn update_group(req: &Command) -> Command {
    let body: serde_json::Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => return invalid(req, format!("the body does not parse: {e}")),
    };
    let group = body
        .get("groupName")
        .and_then(|g| g.as_str())
        .unwrap_or_default();
    if let Err(e) = crate::service::name("group", group) {
        return refusal(req, &e);
    }
    Command::answer(req, codes::SUCCESS, None)
}

/// GET_CONSUME_STATS: a group's progress on each topic it consumes (or `topic`).
pub async fn consume_stats(ep: &Endpoint, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let group = match required(req, "consumerGroup") {
        Ok(g) => g.to_string(),
        Err(a) => return a,
    };
    let only = req
        .field("topic")
        .filter(|t| !t.is_empty())
        .map(String::from);
    let described = match admin::describe_group(
        &shared,
        who,
        native::DescribeGroupRequest {
            group: group.clone(),
        },
    )
    .await
    {
        Ok(d) => d,
        Err(e) => return refusal(req, &e),
    };
    let mut rows = Vec::new();
    for t in described.topics {
        if only.as_ref().is_some_and(|o| *o != t.topic) {
            continue;
        }
        for q in 0..ep.queues(&shared, &t.topic) {
            let (broker, consumer) = if q == 0 {
                (t.next_offset, t.ack_floor)
            } else {
                (0, 0)
            };
            rows.push((
                queue_key(&t.topic, q),
                json!({"brokerOffset": broker, "consumerOffset": consumer,
                       "lastTimestamp": 0, "pullOffset": broker}),
            ));
        }
    }
    let body = format!("{{\"consumeTps\":0.0,\"offsetTable\":{}}}", queue_map(rows));
    Command::answer(req, codes::SUCCESS, None).with_body(body)
}

/// GET_CONSUMER_CONNECTION_LIST: a group's members (CONSUMER_NOT_ONLINE for none).
pub fn connections(ep: &Endpoint, who: &Principal, req: &Command) -> Command {
    let group = match required(req, "consumerGroup") {
        Ok(g) => g,
        Err(a) => return a,
    };
    if let Err(e) = ep
        .shared()
        .and_then(|s| permit(&s, who, Operation::DescribeGroup, &[Resource::Group(group)]))
    {
        return refusal(req, &e);
    }
    let members = ep.clients.group(group);
    let Some(any) = members.values().next() else {
        return Command::answer(
            req,
            codes::CONSUMER_NOT_ONLINE,
            Some(format!("the consumer group {group} is not online")),
        );
    };
    let set: Vec<serde_json::Value> = members
        .iter()
        .map(|(id, m)| {
            json!({"clientAddr": m.addr.to_string(), "clientId": id,
                   "language": m.language, "version": m.version})
        })
        .collect();
    let subs: serde_json::Map<String, serde_json::Value> = any
        .subscriptions
        .iter()
        .map(|(topic, s)| {
            (
                topic.clone(),
                json!({"classFilterMode": false, "codeSet": [], "expressionType": s.kind,
                       "subString": s.expression, "subVersion": 0, "tagsSet": [],
                       "topic": topic}),
            )
        })
        .collect();
    let body = json!({
        "connectionSet": set,
        "consumeFromWhere": any.from_where,
        "consumeType": any.consume_type,
        "messageModel": match any.model {
            super::clients::Model::Clustering => "CLUSTERING",
            super::clients::Model::Broadcasting => "BROADCASTING",
        },
        "subscriptionTable": subs,
    });
    Command::answer(req, codes::SUCCESS, None)
        .with_body(serde_json::to_vec(&body).unwrap_or_default())
}

/// A stored message as one record (a look-up's answer).
fn write(ep: &Endpoint, topic_id: u32, m: &native::StoredMessage, out: &mut Vec<u8>) {
    let props = send::outgoing_properties(m, &[]);
    let _ = Record {
        queue_id: 0,
        flag: send::user_flag(m),
        queue_offset: m.offset as i64,
        handle: record::handle(topic_id, m.offset),
        sys_flag: 0,
        born_ms: m.born_ms as i64,
        born_host: ep.advertised,
        store_ms: m.store_ms as i64,
        store_host: ep.advertised,
        reconsume_times: 0,
        body: &m.body,
        topic: &m.topic,
        properties: &props,
    }
    .write(out);
}

/// Messages of `topic` from `from` on, by `key` (empty: any).
async fn find(
    ep: &Endpoint,
    who: &Principal,
    topic: &str,
    key: &str,
    from: u64,
    limit: u32,
) -> crate::error::Result<Vec<native::StoredMessage>> {
    let shared = ep.shared()?;
    let ask = native::FindMessagesRequest {
        topic: topic.to_string(),
        key: key.to_string(),
        from_offset: from,
        limit,
        body: true,
        ..Default::default()
    };
    let found = messages::find_messages(&shared, who, ask).await?;
    Ok(found
        .messages
        .into_iter()
        .filter_map(|f| f.message)
        .collect())
}

/// VIEW_MESSAGE_BY_ID: the message an offset message id names.
pub async fn view_message(ep: &Endpoint, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let handle = match super::number::<i64>(req, "offset") {
        Ok(h) => h,
        Err(a) => return a,
    };
    let (topic_id, offset) = record::unhandle(handle);
    let not_found = || {
        Command::answer(
            req,
            codes::SYSTEM_ERROR,
            Some(format!("no message at {handle}")),
        )
    };
    let Some(topic) = admin::topic_name(&shared, topic_id) else {
        return not_found();
    };
    match find(ep, who, &topic, "", offset, 1).await {
        Ok(found) => match found.first().filter(|m| m.offset == offset) {
            Some(m) => {
                let mut body = Vec::new();
                write(ep, topic_id, m, &mut body);
                Command::answer(req, codes::SUCCESS, None).with_body(body)
            }
            None => not_found(),
        },
        Err(e) => refusal(req, &e),
    }
}

/// QUERY_MESSAGE: a topic's messages by key (newest kept first found), as records.
pub async fn query_message(ep: &Endpoint, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let (topic, key) = match (required(req, "topic"), required(req, "key")) {
        (Ok(t), Ok(k)) => (t.to_string(), k.to_string()),
        (Err(a), _) | (_, Err(a)) => return a,
    };
    let max = match number_or::<i64>(req, "maxNum", 32) {
        Ok(m) => m.clamp(1, 1000) as u32,
        Err(a) => return a,
    };
    let Some(topic_id) = admin::topic_id(&shared, &topic) else {
        return Command::answer(
            req,
            codes::QUERY_NOT_FOUND,
            Some(format!("topic {topic} does not exist")),
        );
    };
    // The message's key (its KEYS as sent, one key or several joined by spaces).
    let found = match find(ep, who, &topic, &key, 0, max).await {
        Ok(f) => f,
        Err(e) => return refusal(req, &e),
    };
    let mut body = Vec::new();
    for m in &found {
        write(ep, topic_id, m, &mut body);
    }
    if body.is_empty() {
        return Command::answer(
            req,
            codes::QUERY_NOT_FOUND,
            Some(format!("no message of {topic} has key {key}")),
        );
    }
    Command::answer(req, codes::SUCCESS, None)
        .with("indexLastUpdateTimestamp", txmq_protocol::now_ms())
        .with("indexLastUpdatePhyoffset", 0)
        .with_body(body)
}

/// QUERY_TOPIC_CONSUME_BY_WHO: the groups with a position on the topic (the first
/// thousand group rows are looked at).
pub async fn consumed_by(ep: &Endpoint, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let topic = match required(req, "topic") {
        Ok(t) => t.to_string(),
        Err(a) => return a,
    };
    let ask = native::ListGroupsRequest {
        limit: 1000,
        ..Default::default()
    };
    match admin::list_groups(&shared, who, ask).await {
        Ok(rows) => {
            let groups: Vec<String> = rows
                .groups
                .into_iter()
                .filter(|g| g.topic == topic)
                .map(|g| g.group)
                .collect();
            Command::answer(req, codes::SUCCESS, None)
                .with_body(serde_json::to_vec(&json!({ "groupList": groups })).unwrap_or_default())
        }
        Err(e) => refusal(req, &e),
    }
}
