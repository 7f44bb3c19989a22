//! POP consumers: a 5.x Java `DefaultMQPushConsumer` with `setClientRebalance(false)`
//! asks the broker for its assignment (QUERY_ASSIGNMENT: "pop from any queue") and then
//! pops: each POP_MESSAGE takes what the group has for anyone, each message leased for
//! the request's invisible time (not renewed: a POP consumer acks or changes the time
//! itself); ACK_MESSAGE acks one; CHANGE_MESSAGE_INVISIBLETIME, which the client sends
//! when it failed one, is a nack with that delay (a redelivery that counts towards the
//! group's attempts and its dead letters). This is txmq's own model, lease for lease.
//!
//! The client names a popped message by the queue and queue offset of its record: the
//! face numbers a connection's pops in a lane of their own (a negative queue id, one
//! per connection), so an ack finds its lease, and only the connection that popped a
//! message acks it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::connection::Conn;
use super::frame::Command;
use super::record::{self, Record};
use super::{Endpoint, codes, number, number_or, refusal, required, route, send};
use crate::faces::poll;
use crate::service::Principal;
use crate::service::consume::{self, Join, LeaseRef, SubscribeOptions};

pub const POP_MESSAGE: i32 = 200_050;
pub const ACK_MESSAGE: i32 = 200_051;
pub const CHANGE_MESSAGE_INVISIBLETIME: i32 = 200_053;

/// Shortest and longest invisible time a pop may ask (the broker's lease bounds).
const MIN_INVISIBLE: Duration = Duration::from_secs(1);
const MAX_INVISIBLE: Duration = Duration::from_secs(12 * 3600);
/// Longest a pop waits for a message.
const MAX_POLL: Duration = Duration::from_secs(20);

/// The lane a connection's pops are numbered in: negative, so no queue of a topic
/// (0 to 63) is one.
fn lane(conn: &Conn) -> i32 {
    lane_of(conn.id)
}

fn lane_of(conn_id: u64) -> i32 {
    -1 - i32::try_from(conn_id % (i32::MAX as u64)).unwrap_or(0)
}

/// QUERY_ASSIGNMENT: a POP consumer pops from any queue of a topic (queue -1); a retry
/// topic is pulled (it has nothing of its own: redeliveries come on the topic).
pub fn assignment(ep: &Endpoint, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let body: serde_json::Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => return super::invalid(req, format!("the body does not parse: {e}")),
    };
    let text = |k: &str| body.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    let (topic, group) = (text("topic"), text("consumerGroup"));
    if let Err(e) = crate::service::name("group", group) {
        return refusal(req, &e);
    }
    let (queue, mode) = if route::group_topic(topic).is_some() {
        (0, "PULL")
    } else {
        if let Err(e) = consume::may_consume(&shared, who, group, topic) {
            return refusal(req, &e);
        }
        (-1, "POP")
    };
    let answer = json!({"messageQueueAssignments": [{
        "messageQueue": {"brokerName": route::BROKER_NAME, "queueId": queue, "topic": topic},
        "mode": mode,
        "attachments": {},
    }]});
    Command::answer(req, codes::SUCCESS, None)
        .with_body(serde_json::to_vec(&answer).unwrap_or_default())
}

/// The fields every POP answer carries (the client reads them whatever the code).
fn popped(req: &Command, code: i32, invisible: Duration) -> Command {
    Command::answer(req, code, None)
        .with("popTime", txmq_protocol::now_ms())
        .with("invisibleTime", invisible.as_millis() as u64)
        .with("reviveQid", 0)
        .with("restNum", 0)
}

/// POP_MESSAGE.
pub async fn pop(ep: &Endpoint, conn: &Arc<Conn>, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let (group, topic) = match (required(req, "consumerGroup"), required(req, "topic")) {
        (Ok(g), Ok(t)) => (g.to_string(), t.to_string()),
        (Err(a), _) | (_, Err(a)) => return a,
    };
    let millis = |v: i64| Duration::from_millis(v.max(0) as u64);
    let (max, invisible, wait, init_mode) = match (
        number_or::<i64>(req, "maxMsgNums", 32),
        number::<i64>(req, "invisibleTime"),
        number_or::<i64>(req, "pollTime", 15_000),
        number_or::<i64>(req, "initMode", 0),
    ) {
        (Ok(m), Ok(i), Ok(p), Ok(n)) => (m.clamp(1, 32) as u32, millis(i), millis(p), n),
        (Err(a), ..) | (_, Err(a), ..) | (_, _, Err(a), _) | (.., Err(a)) => return a,
    };
    if !(MIN_INVISIBLE..=MAX_INVISIBLE).contains(&invisible) {
        return super::invalid(
            req,
            format!(
                "invisibleTime {} ms is outside 1 s..12 h",
                invisible.as_millis()
            ),
        );
    }
    if let Err(e) = crate::service::name("group", &group) {
        return refusal(req, &e);
    }
    if route::group_topic(&topic).is_some() {
        // Redeliveries come on the topic they were sent to.
        tokio::select! {
            () = tokio::time::sleep(wait.min(MAX_POLL)) => {}
            () = ep.stop.cancelled() => {}
        }
        return popped(req, codes::PULL_NOT_FOUND, invisible);
    }
    let kind = req.field("expType").unwrap_or("TAG");
    if !kind.eq_ignore_ascii_case("TAG") {
        return Command::answer(
            req,
            codes::SUBSCRIPTION_PARSE_FAILED,
            Some(format!(
                "{kind} subscriptions are not supported by txmq: subscribe by tag"
            )),
        );
    }
    if !ep.pulls.has_room(&group, &topic, conn.id) {
        // Pops not acked pile up: this consumer gets nothing more until it acks.
        tokio::time::sleep(Duration::from_secs(1)).await;
        return popped(req, codes::PULL_NOT_FOUND, invisible);
    }
    let filter = super::pull::tag_filter(req.field("exp").unwrap_or("*"));
    let from_latest = init_mode == 1 && !consume::has_cursor(&shared, &group, &topic).await;
    let join = Join {
        group: group.clone(),
        topic: topic.clone(),
        window: max,
        lease: Some(invisible),
        options: SubscribeOptions {
            tag_filter: filter,
            from_latest,
            ordered: consume::is_ordered(&shared, &group, &topic).await,
            ..SubscribeOptions::default()
        },
    };
    let budget = shared
        .config
        .max_frame_len
        .min(super::frame::MAX_FRAME - 64 * 1024);
    let polled = tokio::select! {
        p = poll::poll(&shared, who, join, wait.min(MAX_POLL), budget) => p,
        () = ep.stop.cancelled() => return popped(req, codes::PULL_NOT_FOUND, invisible),
    };
    let polled = match polled {
        Ok(p) => p,
        Err(e) => return refusal(req, &e),
    };
    if polled.deliveries.is_empty() {
        return popped(req, codes::PULL_NOT_FOUND, invisible);
    }
    let lane = lane(conn);
    let (numbers, _) = ep.pulls.hand_out(
        &polled.group,
        &polled.topic,
        lane,
        0,
        conn.id,
        &polled.deliveries,
    );
    let mut body = Vec::new();
    for (d, seq) in polled.deliveries.iter().zip(&numbers) {
        let Some(m) = &d.message else { continue };
        let props = send::outgoing_properties(m, &[]);
        let written = Record {
            queue_id: lane,
            flag: send::user_flag(m),
            queue_offset: *seq as i64,
            handle: record::handle(polled.topic_id, m.offset),
            sys_flag: 0,
            born_ms: m.born_ms as i64,
            born_host: ep.advertised,
            store_ms: m.store_ms as i64,
            store_host: ep.advertised,
            reconsume_times: d.attempt.saturating_sub(1) as i32,
            body: &m.body,
            topic: &m.topic,
            properties: &props,
        }
        .write(&mut body);
        if let Err(e) = written {
            // No RocketMQ record can carry it: back to the group at once.
            tracing::warn!(%group, %topic, offset = m.offset, "not popped over Remoting: {e}");
            if let Some(h) = ep.pulls.take_seq(&group, &topic, lane, *seq, conn.id) {
                let handle = super::pull::handles(&group, &topic, &[h]).remove(0);
                let _ = consume::nack(&shared, who, handle, None).await.await;
            }
        }
    }
    popped(req, codes::SUCCESS, invisible).with_body(body)
}

/// The popped delivery an ACK or CHANGE names (its queue and offset), taken out; or
/// the answer when this connection holds none such.
fn named(
    ep: &Endpoint,
    conn: &Conn,
    req: &Command,
) -> Result<(String, String, super::lanes::Held), Command> {
    let group = required(req, "consumerGroup")?.to_string();
    let topic = required(req, "topic")?.to_string();
    let queue: i32 = number(req, "queueId")?;
    let offset: i64 = number(req, "offset")?;
    let held = u64::try_from(offset)
        .ok()
        .and_then(|seq| ep.pulls.take_seq(&group, &topic, queue, seq, conn.id));
    match held {
        Some(h) => Ok((group, topic, h)),
        None => Err(Command::answer(
            req,
            codes::SYSTEM_ERROR,
            Some(format!(
                "this connection holds no popped message at queue {queue} offset {offset} of \
                 {topic} (acked already, or its invisible time ran out and it comes again)"
            )),
        )),
    }
}

/// ACK_MESSAGE: the client consumed one popped message.
pub async fn ack(ep: &Endpoint, conn: &Conn, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let (group, topic, held) = match named(ep, conn, req) {
        Ok(n) => n,
        Err(answer) => return answer,
    };
    let handles = super::pull::handles(&group, &topic, &[held]);
    match consume::ack(&shared, who, handles).await.await {
        Ok(_) => Command::answer(req, codes::SUCCESS, None),
        Err(e) => refusal(req, &e),
    }
}

/// CHANGE_MESSAGE_INVISIBLETIME: the client failed one popped message and asks for it
/// again after `invisibleTime`: a nack with that delay.
pub async fn change_invisible(
    ep: &Endpoint,
    conn: &Conn,
    who: &Principal,
    req: &Command,
) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let delay = match number::<i64>(req, "invisibleTime") {
        Ok(ms) => Duration::from_millis(ms.max(0) as u64),
        Err(a) => return a,
    };
    let (group, topic, held) = match named(ep, conn, req) {
        Ok(n) => n,
        Err(answer) => return answer,
    };
    let handle = consume::Handle {
        group,
        topic,
        lease: LeaseRef::new(held.offset, held.lease_id),
    };
    match consume::nack(&shared, who, handle, Some(delay)).await.await {
        Ok(()) => Command::answer(req, codes::SUCCESS, None)
            .with("popTime", txmq_protocol::now_ms())
            .with("invisibleTime", delay.as_millis() as u64)
            .with("reviveQid", 0),
        Err(e) => refusal(req, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pop_lanes_are_negative_and_never_a_topic_queue() {
        for id in [0u64, 1, 63, i32::MAX as u64 - 1, i32::MAX as u64, u64::MAX] {
            assert!(lane_of(id) < 0, "{id}: {}", lane_of(id));
        }
        assert_ne!(lane_of(1), lane_of(2));
    }
}
