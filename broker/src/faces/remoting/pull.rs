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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use txmq_protocol::pb as native;

use super::clients::Model;
use super::connection::Conn;
use super::frame::Command;
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
/// Most deliveries one connection may have been handed of a (group, topic) and not
/// committed: beyond, its pulls get nothing until it commits (I9).
pub const MAX_HELD: usize = 16_384;

/// Largest offset a pull may ask from (2^53, what any client's numbers stay below).
const MAX_OFFSET: u64 = 1 << 53;

/// A handed-out delivery of a lane.
#[derive(Debug, Clone, Copy)]
struct Held {
    offset: u64,
    lease_id: u64,
    /// Which delivery of the message it is (1: the first).
    attempt: u32,
}

/// One queue of a (group, topic) as the clients see it.
#[derive(Debug, Default)]
struct Lane {
    /// The next sequence number to hand out.
    next: u64,
    /// The connection that pulled it last (0: none). A connection, not a client id:
    /// a client names itself, and another claiming its id must not commit its lanes.
    owner: u64,
    /// Sequence number → what it names.
    held: BTreeMap<u64, Held>,
}

#[derive(Debug, Default)]
struct Lanes {
    lanes: HashMap<i32, Lane>,
    /// Log offset → (lane, sequence number) of what is held.
    by_offset: HashMap<u64, (i32, u64)>,
}

/// Every (group, topic)'s lanes.
#[derive(Debug, Default)]
pub struct Pulls {
    inner: Mutex<HashMap<(String, String), Lanes>>,
}

impl Pulls {
    /// The deliveries lane `queue` handed connection `conn` below `upto` (its client
    /// consumed them), taken out. A connection that no longer owns the lane commits
    /// nothing: what it held was let go when the lane moved, and what the lane holds now
    /// is another's.
    fn below(&self, group: &str, topic: &str, queue: i32, upto: u64, conn: u64) -> Vec<Held> {
        let mut inner = self.inner.lock().expect("pulls lock");
        let Some(lanes) = inner.get_mut(&(group.to_string(), topic.to_string())) else {
            return Vec::new();
        };
        let Some(lane) = lanes.lanes.get_mut(&queue) else {
            return Vec::new();
        };
        if lane.owner != conn {
            return Vec::new();
        }
        let rest = lane.held.split_off(&upto);
        let done = std::mem::replace(&mut lane.held, rest);
        done.into_values()
            .inspect(|h| {
                lanes.by_offset.remove(&h.offset);
            })
            .collect()
    }

    /// The delivery of `offset`, taken out, when connection `conn` holds it (a
    /// send-back, or a record that cannot be written for it).
    fn take(&self, group: &str, topic: &str, offset: u64, conn: u64) -> Option<Held> {
        let mut inner = self.inner.lock().expect("pulls lock");
        let lanes = inner.get_mut(&(group.to_string(), topic.to_string()))?;
        let (queue, seq) = *lanes.by_offset.get(&offset)?;
        let lane = lanes.lanes.get_mut(&queue).filter(|l| l.owner == conn)?;
        let held = lane.held.remove(&seq)?;
        lanes.by_offset.remove(&offset);
        Some(held)
    }

    /// Lane `queue`'s next number: where a client that asks continues.
    fn next(&self, group: &str, topic: &str, queue: i32) -> u64 {
        let inner = self.inner.lock().expect("pulls lock");
        inner
            .get(&(group.to_string(), topic.to_string()))
            .and_then(|l| l.lanes.get(&queue))
            .map_or(0, |l| l.next)
    }

    /// Whether connection `conn` may be handed more of (group, topic): one consumer
    /// that never commits stops only itself.
    fn has_room(&self, group: &str, topic: &str, conn: u64) -> bool {
        let inner = self.inner.lock().expect("pulls lock");
        inner
            .get(&(group.to_string(), topic.to_string()))
            .is_none_or(|l| {
                let mine: usize = l
                    .lanes
                    .values()
                    .filter(|lane| lane.owner == conn)
                    .map(|lane| lane.held.len())
                    .sum();
                mine < MAX_HELD
            })
    }

    /// What lane `queue` holds for connection `conn` from number `from` on, taken out:
    /// the client asks again from there, so it never received those (an answer lost,
    /// a buffer dropped, a seek back), and no commit may ack them. `from` `None`: all.
    fn let_go(
        &self,
        group: &str,
        topic: &str,
        queue: i32,
        conn: u64,
        from: Option<u64>,
    ) -> Vec<Held> {
        let mut inner = self.inner.lock().expect("pulls lock");
        let Some(lanes) = inner.get_mut(&(group.to_string(), topic.to_string())) else {
            return Vec::new();
        };
        let Some(lane) = lanes.lanes.get_mut(&queue).filter(|l| l.owner == conn) else {
            return Vec::new();
        };
        let gone = lane.held.split_off(&from.unwrap_or(0));
        let gone: Vec<Held> = gone.into_values().collect();
        for g in &gone {
            lanes.by_offset.remove(&g.offset);
        }
        gone
    }

    /// Connection `conn` closed: what its lanes held is let go (its leases end and the
    /// messages come again), and the lanes are no one's.
    fn closed(&self, conn: u64) -> Vec<(String, String, Held)> {
        let mut inner = self.inner.lock().expect("pulls lock");
        let mut out = Vec::new();
        for ((group, topic), lanes) in inner.iter_mut() {
            for lane in lanes.lanes.values_mut().filter(|l| l.owner == conn) {
                lane.owner = 0;
                for h in std::mem::take(&mut lane.held).into_values() {
                    lanes.by_offset.remove(&h.offset);
                    out.push((group.clone(), topic.clone(), h));
                }
            }
        }
        inner
            .retain(|_, l| !l.by_offset.is_empty() || l.lanes.values().any(|lane| lane.owner != 0));
        out
    }

    /// Numbers `deliveries` in lane `queue` from `from` (or the lane's next, if
    /// later), for connection `conn`; answers each one's number, and the leases the previous
    /// owner of the lane held, taken out (a rebalance moved the lane: they are no longer
    /// renewed, and come again once their leases end; no commit acks them).
    fn hand_out(
        &self,
        group: &str,
        topic: &str,
        queue: i32,
        from: u64,
        conn: u64,
        deliveries: &[native::Delivery],
    ) -> (Vec<u64>, Vec<Held>) {
        let mut inner = self.inner.lock().expect("pulls lock");
        let lanes = inner
            .entry((group.to_string(), topic.to_string()))
            .or_default();
        let lane = lanes.lanes.entry(queue).or_default();
        let moved: Vec<Held> = if lane.owner == conn {
            Vec::new()
        } else {
            lane.owner = conn;
            std::mem::take(&mut lane.held).into_values().collect()
        };
        for m in &moved {
            lanes.by_offset.remove(&m.offset);
        }
        let lane = lanes.lanes.entry(queue).or_default();
        lane.next = lane.next.max(from);
        let mut numbers = Vec::with_capacity(deliveries.len());
        let mut placed = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            let Some(h) = &d.handle else { continue };
            let seq = lane.next;
            lane.next += 1;
            lane.held.insert(
                seq,
                Held {
                    offset: h.offset,
                    lease_id: h.lease_id,
                    attempt: d.attempt,
                },
            );
            placed.push((h.offset, seq));
            numbers.push(seq);
        }
        for (offset, seq) in placed {
            // A redelivery of a message another lane still names replaces it there.
            if let Some((q, old)) = lanes.by_offset.insert(offset, (queue, seq))
                && (q, old) != (queue, seq)
                && let Some(l) = lanes.lanes.get_mut(&q)
                && l.held.get(&old).is_some_and(|h| h.offset == offset)
            {
                l.held.remove(&old);
            }
        }
        (numbers, moved)
    }
}

/// The tag filter of a RocketMQ subscription expression (`*`, `""`, `a || b`).
fn tag_filter(expression: &str) -> String {
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

fn handles(group: &str, topic: &str, held: &[Held]) -> Vec<Handle> {
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
    let queues = i32::try_from(ep.config.remoting_queues).unwrap_or(i32::MAX);
    let suspend = if h.sys_flag & SUSPEND != 0 {
        h.suspend.min(MAX_SUSPEND)
    } else {
        Duration::ZERO
    };
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
    if member
        .as_ref()
        .is_some_and(|(m, _)| m.model == Model::Broadcasting)
    {
        return Command::answer(
            req,
            codes::SYSTEM_ERROR,
            Some(
                "BROADCASTING consumers are not served by txmq's Remoting face yet: consume \
                 in CLUSTERING mode (a group per consumer receives every message)"
                    .into(),
            ),
        );
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
    // A frame of at most 16 MiB, and what the client asked.
    let mut budget = shared
        .config
        .max_frame_len
        .min(super::frame::MAX_FRAME - 64 * 1024);
    if h.max_bytes > 0 {
        budget = budget.min(h.max_bytes);
    }
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

/// QUERY_CONSUMER_OFFSET: where the lane continues. It never moves what the group
/// receives (its ack floor does), so a client that starts anywhere loses nothing. A
/// group that has not consumed the topic yet has none (22): the client then resolves
/// its `consumeFromWhere` (0, or GET_MAX_OFFSET) and its first pull says which.
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

    fn delivery(offset: u64, lease_id: u64) -> native::Delivery {
        native::Delivery {
            attempt: 1,
            handle: Some(native::DeliveryHandle {
                offset,
                lease_id,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn subscription_expressions_become_tag_filters() {
        assert_eq!(tag_filter("*"), "");
        assert_eq!(tag_filter(""), "");
        assert_eq!(tag_filter("TagA || TagB"), "TagA||TagB");
        assert_eq!(tag_filter(" a "), "a");
    }

    /// A lane numbers what it hands out from where the client asked (or on), and a
    /// commit takes out exactly what is below it.
    #[test]
    fn lanes_number_and_commit() {
        let p = Pulls::default();
        let (n, moved) = p.hand_out("g", "t", 0, 5, 1, &[delivery(10, 1), delivery(11, 2)]);
        assert_eq!((n, moved.len()), (vec![5, 6], 0));
        // Asked from behind: numbering goes on.
        let (n, _) = p.hand_out("g", "t", 0, 0, 1, &[delivery(12, 3)]);
        assert_eq!(n, [7]);
        assert_eq!(p.next("g", "t", 0), 8);
        assert!(p.below("g", "t", 0, 7, 2).is_empty(), "not c2's lane");
        let done: Vec<u64> = p
            .below("g", "t", 0, 7, 1)
            .iter()
            .map(|h| h.offset)
            .collect();
        assert_eq!(done, [10, 11]);
        assert!(p.below("g", "t", 0, 7, 1).is_empty());
        // Another client takes the lane: what the first held is let go, and neither's
        // commit acks it (a rebalance must not ack what no one consumed).
        let (_, moved) = p.hand_out("g", "t", 0, 8, 2, &[delivery(13, 4)]);
        assert_eq!(moved.iter().map(|h| h.offset).collect::<Vec<_>>(), [12]);
        assert!(p.below("g", "t", 0, 8, 1).is_empty());
        assert!(p.below("g", "t", 0, 8, 2).is_empty());
        // A send-back finds its delivery by log offset, once.
        assert!(p.take("g", "t", 13, 1).is_none(), "not 1's to send back");
        assert_eq!(p.take("g", "t", 13, 2).map(|h| h.lease_id), Some(4));
        assert!(p.take("g", "t", 13, 2).is_none());
        // A redelivery of a message another lane names replaces it there.
        p.hand_out("g", "t", 0, 9, 2, &[delivery(14, 5)]);
        p.hand_out("g", "t", 1, 0, 2, &[delivery(14, 9)]);
        assert!(p.below("g", "t", 0, 100, 2).is_empty());
        assert_eq!(p.below("g", "t", 1, 100, 2)[0].lease_id, 9);
    }
}
