//! Consuming over Remoting: PULL_MESSAGE and LITE_PULL_MESSAGE, the offsets
//! (QUERY/UPDATE_CONSUMER_OFFSET, GET_MAX/MIN_OFFSET, SEARCH_OFFSET_BY_TIMESTAMP) and
//! CONSUMER_SEND_MSG_BACK, on txmq's consumer groups and leases (`docs/remoting.md`).
//!
//! A topic shows N queues, and a group's push consumers share them out among
//! themselves. A queue here is a *lane* of the group's one queue, not a slice of the
//! log: a pull on any lane takes the next messages the group has for anyone (as a gRPC
//! receive does), leased to the puller, and numbers them in that lane's own sequence
//! (the QUEUEOFFSET the client sees). The client commits a lane's offset when it has
//! consumed everything below it: that acks, durably, the leases it was handed below
//! that offset. So a committed offset means "what this lane handed out below it is
//! done", the group's ack floor stays the one truth, and no offset a client sends can
//! skip or rewind a message: a rebalance, a restarted client or a stale offset changes
//! only the numbering. What a client was handed and has not committed stays leased to
//! it while its connection is open (the broker renews the lease), and is delivered
//! again once it is gone. CONSUMER_SEND_MSG_BACK is a nack with the delay level's
//! delay, or a dead letter after the client's max reconsume times.

use std::sync::Arc;
use std::time::Duration;

use super::clients::Model;
use super::connection::Conn;
use super::frame::Command;
use super::lanes::{Held, MAX_HELD};
use super::record::{self, Record};
use super::{Endpoint, codes, invalid, number, number_or, refusal, required, route, send};
use crate::faces::poll;
use crate::service::consume::{self, Handle, Join, LeaseRef, SubscribeOptions};
use crate::service::{Principal, Shared};

/// pull sysFlag bits (`PullSysFlag`).
const COMMIT_OFFSET: i32 = 0x1;
const SUSPEND: i32 = 0x2;
const SUBSCRIPTION: i32 = 0x4;

/// Longest a pull is held (clients wait 30 s for the answer: Java's push 15 s, lite
/// and Go 20 s).
const MAX_SUSPEND: Duration = Duration::from_secs(20);
/// Most messages one pull returns.
const MAX_PULL: u32 = 1024;
/// Largest offset a pull may ask from (2^53, what any client's numbers stay below).
const MAX_OFFSET: u64 = 1 << 53;

/// The tag filter of a RocketMQ subscription expression (`*`, `""`, `a || b`).
pub(super) fn tag_filter(expression: &str) -> String {
    let tags: Vec<&str> = expression
        .split("||")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if tags.is_empty() || tags.contains(&"*") {
        return String::new();
    }
    tags.join("||")
}

pub(super) fn handles(group: &str, topic: &str, held: &[Held]) -> Vec<Handle> {
    held.iter()
        .map(|h| Handle {
            group: group.to_string(),
            topic: topic.to_string(),
            lease: LeaseRef::new(h.offset, h.lease_id),
        })
        .collect()
}

/// Commits lane `queue` of (group, topic) up to `upto` for connection `conn`: acks
/// what the lane handed it below.
#[allow(clippy::too_many_arguments)]
async fn commit(
    ep: &Endpoint,
    shared: &Arc<Shared>,
    who: &Principal,
    conn: u64,
    group: &str,
    topic: &str,
    queue: i32,
    upto: u64,
) {
    let done = ep.pulls.below(group, topic, queue, upto, conn);
    if done.is_empty() {
        return;
    }
    let handles = handles(group, topic, &done);
    for h in &handles {
        ep.renewals.release(group, topic, h.lease);
    }
    for chunk in handles.chunks(4096) {
        if let Err(e) = consume::ack(shared, who, chunk.to_vec()).await.await {
            // Leases that ended meanwhile are delivered again: at least once.
            tracing::debug!(group, topic, "a committed offset acked not all: {e}");
        }
    }
}

/// The header of a pull.
struct PullHeader {
    group: String,
    topic: String,
    queue: i32,
    offset: u64,
    max: u32,
    sys_flag: i32,
    commit: u64,
    suspend: Duration,
    max_bytes: usize,
}

fn pull_header(req: &Command) -> Result<PullHeader, Command> {
    let millis = |v: i64| Duration::from_millis(v.max(0) as u64);
    Ok(PullHeader {
        group: required(req, "consumerGroup")?.to_string(),
        topic: required(req, "topic")?.to_string(),
        queue: number(req, "queueId")?,
        offset: number::<i64>(req, "queueOffset")?.max(0) as u64,
        max: number_or::<i64>(req, "maxMsgNums", 32)?.clamp(1, i64::from(MAX_PULL)) as u32,
        sys_flag: number_or(req, "sysFlag", 0)?,
        commit: number_or::<i64>(req, "commitOffset", 0)?.max(0) as u64,
        suspend: millis(number_or(req, "suspendTimeoutMillis", 15_000)?),
        max_bytes: number_or::<i64>(req, "maxMsgBytes", 0)?.max(0) as usize,
    })
}

/// The answer of a pull that found nothing: the client asks again from where it
/// asked (19; a wrong next offset would move its committed one).
fn not_found(req: &Command, offset: u64, max: u64) -> Command {
    Command::answer(req, codes::PULL_NOT_FOUND, Some("no new message".into()))
        .with("suggestWhichBrokerId", 0)
        .with("nextBeginOffset", offset)
        .with("minOffset", 0)
        .with("maxOffset", max.max(offset))
}

/// PULL_MESSAGE and LITE_PULL_MESSAGE.
pub async fn pull(ep: &Endpoint, conn: &Arc<Conn>, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let h = match pull_header(req) {
        Ok(h) => h,
        Err(answer) => return answer,
    };
    if let Err(e) = crate::service::name("group", &h.group) {
        return refusal(req, &e);
    }
    let queue_count = ep.queues(&shared, &h.topic);
    if crate::service::admin::topic_id(&shared, &h.topic).is_some() {
        // The topic's count may have shrunk (clients whose name server is a group's
        // follower never route here): what the dropped queues held is let go.
        for (group, g) in ep.pulls.shrunk(&h.topic, queue_count) {
            ep.renewals
                .release(&group, &h.topic, LeaseRef::new(g.offset, g.lease_id));
        }
    }
    let queues = i32::try_from(queue_count).unwrap_or(i32::MAX);
    let suspend = if h.sys_flag & SUSPEND != 0 {
        h.suspend.min(MAX_SUSPEND)
    } else {
        Duration::ZERO
    };
    if let Some(("%DLQ%", dead_of)) = route::group_topic(&h.topic) {
        let budget = shared
            .config
            .max_frame_len
            .min(super::frame::MAX_FRAME - 64 * 1024);
        let dead_of = dead_of.to_string();
        return super::dlq::pull(
            ep,
            &shared,
            who,
            req,
            &h.topic,
            &dead_of,
            (h.offset, h.max, budget),
            suspend,
        )
        .await;
    }
    if route::group_topic(&h.topic).is_some() {
        // Redeliveries come again on the topic they were sent to (the group's queue
        // keeps them): the retry topic push consumers also pull has nothing of its own.
        tokio::select! {
            () = tokio::time::sleep(suspend) => {}
            () = ep.stop.cancelled() => {}
        }
        return not_found(req, h.offset, h.offset);
    }
    if !(0..queues).contains(&h.queue) {
        return invalid(
            req,
            format!("queueId {} is not one of 0..{queues}", h.queue),
        );
    }
    if h.offset > MAX_OFFSET {
        // Numbers are the lane's to give: one client cannot push them out of range for
        // the group.
        let next = ep.pulls.next(&h.group, &h.topic, h.queue);
        return Command::answer(
            req,
            codes::PULL_OFFSET_MOVED,
            Some("offset out of range".into()),
        )
        .with("suggestWhichBrokerId", 0)
        .with("nextBeginOffset", next)
        .with("minOffset", 0)
        .with("maxOffset", next);
    }
    if h.sys_flag & COMMIT_OFFSET != 0 && h.commit > 0 {
        commit(
            ep, &shared, who, conn.id, &h.group, &h.topic, h.queue, h.commit,
        )
        .await;
    }
    // What this lane handed the client from the asked offset on never reached it (or
    // it would ask from past it): let go, never acked by a commit.
    for g in ep
        .pulls
        .let_go(&h.group, &h.topic, h.queue, conn.id, Some(h.offset))
    {
        ep.renewals
            .release(&h.group, &h.topic, LeaseRef::new(g.offset, g.lease_id));
    }
    // The expression the pull carries, else the one the member's heartbeat said.
    let me = conn.client_id.lock().expect("client lock").clone();
    let member = ep.clients.subscription(&h.group, &h.topic, &me);
    let (expression, kind) = if h.sys_flag & SUBSCRIPTION != 0 {
        (
            req.field("subscription").unwrap_or("*").to_string(),
            req.field("expressionType").unwrap_or("TAG").to_string(),
        )
    } else {
        member
            .as_ref()
            .map(|(_, s)| (s.expression.clone(), s.kind.clone()))
            .unwrap_or_else(|| ("*".into(), "TAG".into()))
    };
    if !kind.eq_ignore_ascii_case("TAG") {
        return Command::answer(
            req,
            codes::SUBSCRIPTION_PARSE_FAILED,
            Some(format!(
                "{kind} subscriptions are not supported by txmq: subscribe by tag"
            )),
        );
    }
    // A frame of at most 16 MiB, and what the client asked.
    let mut budget = shared
        .config
        .max_frame_len
        .min(super::frame::MAX_FRAME - 64 * 1024);
    if h.max_bytes > 0 {
        budget = budget.min(h.max_bytes);
    }
    if member
        .as_ref()
        .is_some_and(|(m, _)| m.model == Model::Broadcasting)
    {
        let filter = tag_filter(&expression);
        let ask = super::broadcast::Ask {
            group: &h.group,
            topic: &h.topic,
            queue: h.queue,
            offset: h.offset,
            max: h.max,
            filter: &filter,
            budget,
            suspend,
        };
        return super::broadcast::pull(ep, &shared, who, req, ask).await;
    }
    // A new group starts where its client resolved its start (RocketMQ clients do it
    // themselves, after QUERY_CONSUMER_OFFSET said "none"): at 0 from the first
    // message, at GET_MAX_OFFSET's answer (the topic's end) from the last.
    let from_latest = h.offset > 0 && !consume::has_cursor(&shared, &h.group, &h.topic).await;
    let next = ep.pulls.next(&h.group, &h.topic, h.queue);
    if !ep.pulls.has_room(&h.group, &h.topic, conn.id) {
        tracing::warn!(group = %h.group, topic = %h.topic, "{MAX_HELD} deliveries not committed: pulls wait for commits");
        tokio::time::sleep(Duration::from_secs(1)).await;
        return not_found(req, h.offset, next);
    }
    let ordered = consume::is_ordered(&shared, &h.group, &h.topic).await;
    let join = Join {
        group: h.group.clone(),
        topic: h.topic.clone(),
        window: h.max,
        lease: None,
        options: SubscribeOptions {
            tag_filter: tag_filter(&expression),
            from_latest,
            ordered,
            ..SubscribeOptions::default()
        },
    };
    let polled = tokio::select! {
        p = poll::poll(&shared, who, join, suspend, budget) => p,
        () = ep.stop.cancelled() => return not_found(req, h.offset, next),
    };
    let polled = match polled {
        Ok(p) => p,
        Err(e) => return refusal(req, &e),
    };
    if polled.deliveries.is_empty() {
        return not_found(req, h.offset, next);
    }
    let (numbers, moved) = ep.pulls.hand_out(
        &polled.group,
        &polled.topic,
        h.queue,
        h.offset,
        conn.id,
        &polled.deliveries,
    );
    for m in &moved {
        // The lane moved to another client: what the last one held runs out.
        ep.renewals.release(
            &polled.group,
            &polled.topic,
            LeaseRef::new(m.offset, m.lease_id),
        );
    }
    // Records up to what one frame carries; what does not fit stays numbered but is
    // let go at the client's next pull (it asks from after the last record).
    let room = super::frame::MAX_FRAME - 64 * 1024;
    let mut body = Vec::new();
    let mut last = None;
    for (d, seq) in polled.deliveries.iter().zip(&numbers) {
        let (Some(m), Some(handle)) = (&d.message, &d.handle) else {
            continue;
        };
        let lease = LeaseRef::new(handle.offset, handle.lease_id);
        let props = send::outgoing_properties(m, &[]);
        let mut one = Vec::new();
        let written = Record {
            queue_id: h.queue,
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
        .write(&mut one);
        if let Err(e) = written {
            // Nothing of this message can reach a RocketMQ client: it goes back to the
            // group (another face's member may take it; after the group's attempts, its
            // dead letters), rather than being renewed for nobody.
            tracing::warn!(group = %polled.group, topic = %polled.topic, offset = m.offset, "not delivered over Remoting: {e}");
            let _ = ep
                .pulls
                .take(&polled.group, &polled.topic, m.offset, conn.id);
            continue;
        }
        if !body.is_empty() && body.len() + one.len() > room {
            break;
        }
        body.extend_from_slice(&one);
        ep.renewals.hold(
            &polled.group,
            &polled.topic,
            lease,
            who,
            d.lease_deadline_ms,
        );
        last = Some(*seq);
    }
    let Some(last) = last else {
        return not_found(req, h.offset, numbers.last().map_or(h.offset, |n| n + 1));
    };
    Command::answer(req, codes::SUCCESS, None)
        .with("suggestWhichBrokerId", 0)
        .with("nextBeginOffset", last + 1)
        .with("minOffset", 0)
        .with("maxOffset", last + 1)
        .with_body(body)
}

/// UPDATE_CONSUMER_OFFSET: the client consumed lane `queueId` below `commitOffset`.
pub async fn update_offset(ep: &Endpoint, conn: &Conn, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let (group, topic) = match (required(req, "consumerGroup"), required(req, "topic")) {
        (Ok(g), Ok(t)) => (g.to_string(), t.to_string()),
        (Err(a), _) | (_, Err(a)) => return a,
    };
    let (queue, upto) = match (number(req, "queueId"), number::<i64>(req, "commitOffset")) {
        (Ok(q), Ok(c)) => (q, c.max(0) as u64),
        (Err(a), _) | (_, Err(a)) => return a,
    };
    if route::group_topic(&topic).is_none() {
        commit(ep, &shared, who, conn.id, &group, &topic, queue, upto).await;
    }
    Command::answer(req, codes::SUCCESS, None)
}

/// A topic this young (messages, retention having dropped none) is read from its first
/// message by a new group, whatever its `consumeFromWhere`: Apache RocketMQ's broker
/// answers 0 while a queue's first message is still in memory, and applications that
/// start their consumer beside their producer count on it.
pub const YOUNG_TOPIC: u64 = 100_000;

/// Whether a new group starts at the beginning of a topic that keeps offsets
/// `start..end`.
fn young(span: Option<(u64, u64)>) -> bool {
    matches!(span, Some((0, end)) if end > 0 && end <= YOUNG_TOPIC)
}

/// QUERY_CONSUMER_OFFSET: where the lane continues. It never moves what the group
/// receives (its ack floor does), so a client that starts anywhere loses nothing. A
/// group that has not consumed the topic yet has none: on a young topic ([`young`]) it
/// starts at 0, otherwise the answer is 22 and the client resolves its
/// `consumeFromWhere` (0, or GET_MAX_OFFSET) and its first pull says which.
pub async fn query_offset(ep: &Endpoint, conn: &Conn, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let (group, topic) = match (required(req, "consumerGroup"), required(req, "topic")) {
        (Ok(g), Ok(t)) => (g, t),
        (Err(a), _) | (_, Err(a)) => return a,
    };
    let queue = match number(req, "queueId") {
        Ok(q) => q,
        Err(a) => return a,
    };
    if route::group_topic(topic).is_none()
        && let Err(e) = consume::may_consume(&shared, who, group, topic)
    {
        return refusal(req, &e);
    }
    // The client (re)starts this queue: whatever it was handed before, it no longer has.
    for g in ep.pulls.let_go(group, topic, queue, conn.id, None) {
        ep.renewals
            .release(group, topic, LeaseRef::new(g.offset, g.lease_id));
    }
    let next = ep.pulls.next(group, topic, queue);
    if next == 0
        && route::group_topic(topic).is_none()
        && !consume::has_cursor(&shared, group, topic).await
    {
        if young(crate::service::admin::topic_span(&shared, topic)) {
            return Command::answer(req, codes::SUCCESS, None).with("offset", 0);
        }
        return Command::answer(
            req,
            codes::QUERY_NOT_FOUND,
            Some(format!("group {group} has not consumed {topic} yet")),
        );
    }
    Command::answer(req, codes::SUCCESS, None).with("offset", next)
}

/// GET_MAX_OFFSET (the topic's end: where a new group that starts at the last message
/// begins), GET_MIN_OFFSET and SEARCH_OFFSET_BY_TIMESTAMP (0: a new group from there
/// starts at the beginning of what is kept).
pub fn offset_of(ep: &Endpoint, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let topic = match required(req, "topic") {
        Ok(t) => t,
        Err(a) => return a,
    };
    if route::group_topic(topic).is_none()
        && let Err(e) = crate::service::admin::may_route(&shared, who, topic)
    {
        return refusal(req, &e);
    }
    let offset = if req.code == codes::GET_MAX_OFFSET && route::group_topic(topic).is_none() {
        crate::service::admin::topic_end(&shared, topic)
    } else {
        0
    };
    Command::answer(req, codes::SUCCESS, None).with("offset", offset)
}

/// CONSUMER_SEND_MSG_BACK: the client failed a message. A nack with the delay level's
/// delay (level 0: 3 + its reconsume times, RocketMQ's schedule), or a dead letter
/// once it was consumed `maxReconsumeTimes` times (or the level is negative). Only the
/// connection the message was handed to sends it back.
pub async fn send_back(ep: &Endpoint, conn: &Conn, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let group = match required(req, "group") {
        Ok(g) => g.to_string(),
        Err(a) => return a,
    };
    let handle = match number::<i64>(req, "offset") {
        Ok(h) => h,
        Err(a) => return a,
    };
    let level: i64 = match number_or(req, "delayLevel", 0) {
        Ok(l) => l,
        Err(a) => return a,
    };
    let max_times: i64 = match number_or(req, "maxReconsumeTimes", 16) {
        Ok(m) if m >= 0 => m,
        Ok(_) => 16,
        Err(a) => return a,
    };
    let (topic_id, offset) = record::unhandle(handle);
    let topic = match req.field("originTopic") {
        Some(t) if !t.is_empty() => t.to_string(),
        _ => {
            return invalid(req, "the header field originTopic is missing");
        }
    };
    if crate::service::admin::topic_id(&shared, &topic) != Some(topic_id) {
        return invalid(
            req,
            format!("offset {handle} names no message of topic {topic} on this broker"),
        );
    }
    if let Err(e) = consume::may_consume(&shared, who, &group, &topic) {
        return refusal(req, &e);
    }
    let Some(held) = ep.pulls.take(&group, &topic, offset, conn.id) else {
        // Its lease ended already: it is delivered again anyway.
        return Command::answer(req, codes::SUCCESS, None);
    };
    let lease = LeaseRef::new(held.offset, held.lease_id);
    ep.renewals.release(&group, &topic, lease);
    let h = Handle {
        group: group.clone(),
        topic: topic.clone(),
        lease,
    };
    // Its reconsume times, as its record told the client: the deliveries before this.
    let times = i64::from(held.attempt.saturating_sub(1));
    let result = if level < 0 || times >= max_times {
        consume::dead_letter(&shared, who, h, "the consumer sent it back".into())
            .await
            .await
    } else {
        let level = if level == 0 { 3 + times } else { level };
        let delay = send::delay_of(level).unwrap_or(Duration::from_secs(10));
        consume::nack(&shared, who, h, Some(delay)).await.await
    };
    match result {
        Ok(()) => Command::answer(req, codes::SUCCESS, None),
        // A lease that ended meanwhile: the message comes again anyway.
        Err(crate::error::Error::LeaseNotFound(_)) => Command::answer(req, codes::SUCCESS, None),
        Err(e) => refusal(req, &e),
    }
}

/// Connection `conn` closed: what it was handed and did not commit is no longer renewed
/// (it comes again once its leases end).
pub fn closed(ep: &Endpoint, conn: u64) {
    for (group, topic, h) in ep.pulls.closed(conn) {
        ep.renewals
            .release(&group, &topic, LeaseRef::new(h.offset, h.lease_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_expressions_become_tag_filters() {
        assert_eq!(tag_filter("*"), "");
        assert_eq!(tag_filter(""), "");
        assert_eq!(tag_filter("TagA || TagB"), "TagA||TagB");
        assert_eq!(tag_filter(" a "), "a");
    }

    #[test]
    fn a_new_group_starts_at_the_beginning_of_a_young_topic_only() {
        assert!(young(Some((0, 1))));
        assert!(young(Some((0, YOUNG_TOPIC))));
        assert!(
            !young(Some((0, YOUNG_TOPIC + 1))),
            "an old topic: LAST is the end"
        );
        assert!(
            !young(Some((5, 10))),
            "retention dropped its first messages"
        );
        assert!(!young(Some((0, 0))), "empty: the client's choice");
        assert!(!young(None));
    }
}
