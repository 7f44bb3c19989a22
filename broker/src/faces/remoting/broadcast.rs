//! BROADCASTING consumers: every instance of the group receives every message, and each
//! keeps its own position (RocketMQ's clients store a broadcasting consumer's offsets
//! in a local file; the broker keeps none for it). txmq serves them the topic's log
//! itself: **queue 0 carries every message, numbered by its log offset**, and the other
//! queues are empty, so a change of the topic's queue count moves nothing. Nothing is
//! leased or acked: the group's delivery, its ack floor and its dead letters are not
//! touched (a broadcasting consumer that fails a message drops it, as RocketMQ's does).
//! Permissions are a member's: `sub` on the topic and on the group.

use std::time::Duration;

use super::frame::Command;
use super::record::{self, Record};
use super::{Endpoint, codes, refusal, send};
use crate::service::consume;
use crate::service::{Principal, Shared};

/// What a broadcasting pull asks (from the PULL_MESSAGE header).
pub struct Ask<'a> {
    pub group: &'a str,
    pub topic: &'a str,
    pub queue: i32,
    pub offset: u64,
    pub max: u32,
    /// The tag filter (empty: every tag).
    pub filter: &'a str,
    /// Bytes of records one answer may carry.
    pub budget: usize,
    /// How long to wait for a message when there is none.
    pub suspend: Duration,
}

fn empty(req: &Command, offset: u64, max: u64) -> Command {
    Command::answer(req, codes::PULL_NOT_FOUND, Some("no new message".into()))
        .with("suggestWhichBrokerId", 0)
        .with("nextBeginOffset", offset)
        .with("minOffset", 0)
        .with("maxOffset", max.max(offset))
}

/// A broadcasting consumer's PULL_MESSAGE: the log from its offset (queue 0), or
/// nothing after the long poll (the other queues).
pub async fn pull(
    ep: &Endpoint,
    shared: &Shared,
    who: &Principal,
    req: &Command,
    ask: Ask<'_>,
) -> Command {
    if ask.queue != 0 {
        // Empty by design: the client long-polls every queue it was given.
        tokio::select! {
            () = tokio::time::sleep(ask.suspend) => {}
            () = ep.stop.cancelled() => {}
        }
        return empty(req, ask.offset, 0);
    }
    let read = tokio::select! {
        r = consume::read_log(
            shared,
            who,
            (ask.group, ask.topic),
            ask.offset,
            (ask.max as usize, ask.budget, ask.filter),
            ask.suspend,
        ) => r,
        () = ep.stop.cancelled() => return empty(req, ask.offset, ask.offset),
    };
    let read = match read {
        Ok(r) => r,
        Err(e) => return refusal(req, &e),
    };
    let Some(topic_id) = crate::service::admin::topic_id(shared, ask.topic) else {
        return empty(req, ask.offset, read.end);
    };
    let mut body = Vec::new();
    let mut next = read.next;
    for m in &read.messages {
        let props = send::outgoing_properties(m, &[]);
        let mut one = Vec::new();
        let written = Record {
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
        .write(&mut one);
        if let Err(e) = written {
            // A message no RocketMQ record can carry is passed over for this consumer.
            tracing::warn!(topic = %ask.topic, offset = m.offset, "not delivered to a broadcasting consumer: {e}");
            continue;
        }
        if !body.is_empty() && body.len() + one.len() > ask.budget {
            next = m.offset;
            break;
        }
        body.extend_from_slice(&one);
    }
    if body.is_empty() {
        return empty(req, next, read.end);
    }
    Command::answer(req, codes::SUCCESS, None)
        .with("suggestWhichBrokerId", 0)
        .with("nextBeginOffset", next)
        .with("minOffset", 0)
        .with("maxOffset", read.end.max(next))
        .with_body(body)
}
