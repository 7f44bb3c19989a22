//! Consumers: joining and leaving a group's queue, and acknowledging, refusing,
//! extending and dead-lettering deliveries, for every face.
//!
//! A face joins a queue with a [`Sink`] (where deliveries go, and whether its socket
//! takes them) and keeps the [`Membership`] it gets back until it leaves: a native
//! subscription for as long as the client wants, a gRPC receive for one long poll.
//! Deliveries are named by a [`Handle`]: the group, the topic and the lease.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use txmq_protocol::Frame;

use super::access::{Operation, Resource, permit};
use super::{Answer, Principal, Shared, later, now, validate};
use crate::delivery::{ConsumerSpec, QueueMsg};
use crate::error::{Error, Result};
use crate::topics::Topic;

pub use crate::delivery::{LeaseRef, Stall, SubscribeOptions};

/// The error for an answer that never came (the queue stopped with the request in
/// hand, its write perhaps done): in a broker group the leadership ended, and the next
/// leader may or may not have what was asked (`NOT_LEADER` says so); a single broker is
/// shutting down.
fn gone(shared: &Shared) -> Error {
    if shared.node.is_some() {
        Error::NotLeader(None)
    } else {
        Error::ShuttingDown
    }
}

/// Where a member's deliveries go.
#[derive(Debug, Clone)]
pub struct Sink {
    /// The face's channel of delivery frames.
    pub outbound: mpsc::Sender<Frame>,
    /// Whether the face's socket takes what is written to it.
    pub stall: Arc<Stall>,
}

/// What a consumer asks for when it joins a group's queue.
#[derive(Debug, Clone)]
pub struct Join {
    /// The consumer group.
    pub group: String,
    /// The topic (created on demand when the broker creates topics so).
    pub topic: String,
    /// Unacknowledged deliveries it may hold (0: the broker's default).
    pub window: u32,
    /// How long each delivery is leased (`None`: the broker's default).
    pub lease: Option<Duration>,
    /// Filter, start, attempts and order.
    pub options: SubscribeOptions,
}

/// A place in a group's queue, kept by the face until it leaves.
#[derive(Debug, Clone)]
pub struct Membership {
    /// The broker-wide subscription id its deliveries carry.
    pub subscription_id: u64,
    /// The consumer group.
    pub group: String,
    /// The topic.
    pub topic: Arc<Topic>,
}

/// One delivery's lease, as a face names it.
#[derive(Debug, Clone)]
pub struct Handle {
    /// The consumer group.
    pub group: String,
    /// The topic.
    pub topic: String,
    /// The lease.
    pub lease: LeaseRef,
}

/// Joins (group, topic) as a consumer: deliveries follow through `sink`, tagged with the
/// membership's subscription id. The membership is returned at once, so a face that
/// loses its client before the answer still leaves; the answer says whether the queue
/// took it (a filter or order that conflicts with the group's is refused there).
///
/// # Errors
/// Names, the lease, the topic.
pub async fn join(
    shared: &Arc<Shared>,
    who: &Principal,
    join: Join,
    sink: Sink,
) -> Result<(Membership, Answer<()>)> {
    super::name("group", &join.group)?;
    super::name("topic", &join.topic)?;
    let on = [Resource::Topic(&join.topic), Resource::Group(&join.group)];
    permit(shared, who, Operation::Subscribe, &on)?;
    super::access::may_create(shared, who, &join.topic)?;
    let lease = match join.lease {
        None => shared.config.lease,
        Some(d) => validate::lease_ms("lease", d.as_millis().try_into().unwrap_or(u64::MAX))?,
    };
    let topic = shared.groups.topic(&join.topic).await?;
    let subscription_id = shared.subscription_ids.fetch_add(1, Ordering::Relaxed);
    let consumer = ConsumerSpec {
        subscription_id,
        outbound: sink.outbound,
        window: if join.window == 0 {
            shared.config.window
        } else {
            join.window
        },
        lease,
        stall: sink.stall,
        connection_id: who.connection_id,
    };
    let (reply, rx) = oneshot::channel();
    let msg = QueueMsg::Subscribe {
        consumer,
        options: join.options,
        reply,
    };
    shared.groups.send(&join.group, topic.clone(), msg).await?;
    let lost = gone(shared);
    let membership = Membership {
        subscription_id,
        group: join.group,
        topic,
    };
    Ok((
        membership,
        later(async move { rx.await.map_err(|_| lost)? }),
    ))
}

/// Leaves a group's queue. `graceful`: the client said so (its unfinished deliveries
/// go back at once without counting an attempt) rather than vanished. The leases at
/// the offsets in `keep` stay the client's (a gRPC receive hands them out as it
/// leaves).
///
/// # Errors
/// The queue is gone (shutdown, deposed leader).
pub async fn leave(
    shared: &Shared,
    membership: &Membership,
    graceful: bool,
    keep: Vec<u64>,
) -> Result<()> {
    let msg = QueueMsg::Unsubscribe {
        subscription_id: membership.subscription_id,
        graceful,
        keep,
    };
    shared
        .groups
        .send(&membership.group, membership.topic.clone(), msg)
        .await
}

/// Whether (group, topic) is an ordered group (its stored cursor says so); `false`
/// for a group or topic that has none yet.
pub async fn is_ordered(shared: &Shared, group: &str, topic: &str) -> bool {
    let Some(topic) = shared.topics.get(topic) else {
        return false;
    };
    let (g, tid) = (group.to_string(), topic.id);
    super::blocking(&shared.storage, move |s| s.cursor(&g, tid))
        .await
        .ok()
        .flatten()
        .is_some_and(|c| c.ordered)
}

/// Whether `who` may consume `topic` as a member of `group` (what a face asks before
/// it counts a client as a member: a Remoting heartbeat, a queue lock).
///
/// # Errors
/// Not permitted.
pub fn may_consume(shared: &Shared, who: &Principal, group: &str, topic: &str) -> Result<()> {
    permit(
        shared,
        who,
        Operation::Subscribe,
        &[Resource::Topic(topic), Resource::Group(group)],
    )
}

/// What a read of a topic's log found: messages in offset order, and where the next
/// read goes on.
#[derive(Debug, Default)]
pub struct Read {
    /// Matching messages (tag filter), at most what was asked.
    pub messages: Vec<txmq_protocol::pb::StoredMessage>,
    /// The offset after the last one looked at (the filter may have passed some by).
    pub next: u64,
    /// The topic's end when read.
    pub end: u64,
}

/// Reads topic `topic`'s log from `from` on, as a member of `group` that keeps its own
/// position (RocketMQ's BROADCASTING consumers): no lease, no ack, nothing of the
/// group's delivery. Up to `max` messages matching `tag_filter` and `budget` bytes of
/// bodies; waits up to `wait` for one when there is nothing yet. What retention
/// removed is passed over: the read starts at the topic's first kept offset.
///
/// # Errors
/// Not permitted, no such topic, storage failure.
pub async fn read_log(
    shared: &Shared,
    who: &Principal,
    (group, topic): (&str, &str),
    from: u64,
    (max, budget, tag_filter): (usize, usize, &str),
    wait: Duration,
) -> Result<Read> {
    may_consume(shared, who, group, topic)?;
    let Some(t) = shared.topics.get(topic) else {
        return Err(Error::TopicNotFound(topic.to_string()));
    };
    let mut end = t.watch_end();
    if *end.borrow() <= from {
        // Nothing yet: wait for the end to pass `from` (or the wait to run out).
        let _ = tokio::time::timeout(wait, end.wait_for(|e| *e > from)).await;
    }
    let mut at = from.max(t.start());
    let stop = t.end();
    let mut out = Read {
        next: at,
        end: stop,
        ..Read::default()
    };
    let mut bytes = 0usize;
    // Reads in chunks: a filter may pass over many, but one call looks at no more than
    // MAX_CHUNKS of them (the caller asks again from `next`).
    const CHUNK: usize = 256;
    const MAX_CHUNKS: usize = 16;
    let mut chunks = 0;
    while at < stop && out.messages.len() < max && chunks < MAX_CHUNKS {
        chunks += 1;
        let (id, chunk_from) = (t.id, at);
        let chunk = super::blocking(&shared.storage, move |s| {
            s.read_log(id, chunk_from, stop, CHUNK)
        })
        .await?;
        if chunk.is_empty() {
            at = stop;
            break;
        }
        for m in chunk {
            if out.messages.len() >= max
                || (!out.messages.is_empty() && bytes + m.body.len() > budget)
            {
                out.next = at;
                return Ok(out);
            }
            at = m.offset + 1;
            if crate::delivery::queue::tag_matches(tag_filter, &m.tag) {
                bytes += m.body.len();
                out.messages.push(m);
            }
        }
    }
    out.next = at;
    Ok(out)
}

/// Whether (group, topic) has a stored cursor: the group has consumed the topic (a
/// first join makes it, where the group starts).
pub async fn has_cursor(shared: &Shared, group: &str, topic: &str) -> bool {
    let Some(topic) = shared.topics.get(topic) else {
        return false;
    };
    let (g, tid) = (group.to_string(), topic.id);
    super::blocking(&shared.storage, move |s| s.cursor(&g, tid))
        .await
        .ok()
        .flatten()
        .is_some()
}

/// Most distinct (group, topic) queues one ack may name: a consumer acks its own
/// subscriptions' deliveries, never hundreds of groups'.
pub const MAX_QUEUES_PER_ACK: usize = 64;

/// Acknowledges deliveries, durably; answers how many.
pub async fn ack(shared: &Arc<Shared>, who: &Principal, handles: Vec<Handle>) -> Answer<u32> {
    if handles.is_empty() {
        return now(Err(Error::Invalid("ack carries no handles".into())));
    }
    let count = handles.len() as u32;
    let mut by_queue: HashMap<(String, String), Vec<LeaseRef>> = HashMap::new();
    for h in handles {
        if !by_queue.contains_key(&(h.group.clone(), h.topic.clone())) {
            let checked = super::name("group", &h.group)
                .and(super::name("topic", &h.topic))
                .and_then(|()| {
                    let on = [Resource::Topic(&h.topic), Resource::Group(&h.group)];
                    permit(shared, who, Operation::Ack, &on)
                });
            if let Err(e) = checked {
                return now(Err(e));
            }
            if by_queue.len() >= MAX_QUEUES_PER_ACK {
                return now(Err(Error::Invalid(format!(
                    "an ack names more than {MAX_QUEUES_PER_ACK} (group, topic) pairs"
                ))));
            }
        }
        by_queue
            .entry((h.group, h.topic))
            .or_default()
            .push(held(who, h.lease));
    }
    let mut replies = Vec::new();
    for ((group, topic), leases) in by_queue {
        let topic = match shared.groups.existing_topic(&topic) {
            Ok(t) => t,
            Err(e) => return now(Err(e)),
        };
        let (reply, rx) = oneshot::channel();
        if let Err(e) = shared
            .groups
            .send_existing(&group, topic, QueueMsg::Ack { leases, reply })
            .await
        {
            return now(Err(e));
        }
        replies.push(rx);
    }
    let lost = gone(shared);
    later(async move {
        for rx in replies {
            rx.await.map_err(|_| lost.clone())??;
        }
        Ok(count)
    })
}

/// `lease` as `who` names it: a native connection names only its own leases.
fn held(who: &Principal, lease: LeaseRef) -> LeaseRef {
    LeaseRef {
        holder: (who.connection_id != 0).then_some(who.connection_id),
        ..lease
    }
}

/// Sends one message to a delivery's queue and answers with the queue's reply.
async fn to_queue<T: Send + 'static>(
    shared: &Arc<Shared>,
    who: &Principal,
    op: Operation,
    handle: &Handle,
    msg: impl FnOnce(oneshot::Sender<Result<T>>) -> QueueMsg,
) -> Answer<T> {
    let checked = super::name("group", &handle.group)
        .and(super::name("topic", &handle.topic))
        .and_then(|()| {
            let on = [
                Resource::Topic(&handle.topic),
                Resource::Group(&handle.group),
            ];
            permit(shared, who, op, &on)
        });
    if let Err(e) = checked {
        return now(Err(e));
    }
    let topic = match shared.groups.existing_topic(&handle.topic) {
        Ok(t) => t,
        Err(e) => return now(Err(e)),
    };
    let (reply, rx) = oneshot::channel();
    if let Err(e) = shared
        .groups
        .send_existing(&handle.group, topic, msg(reply))
        .await
    {
        return now(Err(e));
    }
    let lost = gone(shared);
    later(async move { rx.await.map_err(|_| lost)? })
}

/// Refuses a delivery: it comes back after `delay` (`None`: the backoff schedule), or
/// goes to the dead-letter queue once out of attempts.
pub async fn nack(
    shared: &Arc<Shared>,
    who: &Principal,
    handle: Handle,
    delay: Option<Duration>,
) -> Answer<()> {
    if let Some(d) = delay
        && d > validate::MAX_NACK_DELAY
    {
        return now(Err(Error::Invalid(format!(
            "a nack's delay is {} ms; the longest is {} ms",
            d.as_millis(),
            validate::MAX_NACK_DELAY.as_millis()
        ))));
    }
    let lease = held(who, handle.lease);
    let stored = to_queue(shared, who, Operation::Nack, &handle, |reply| {
        QueueMsg::Nack {
            lease,
            delay,
            reply,
        }
    })
    .await;
    later(async move { stored.await.map(|_| ()) })
}

/// Moves a lease's end to `lease_for` from now; answers the new end (ms since the
/// epoch).
pub async fn extend(
    shared: &Arc<Shared>,
    who: &Principal,
    handle: Handle,
    lease_for: Duration,
) -> Answer<u64> {
    if lease_for > validate::MAX_LEASE {
        return now(Err(Error::Invalid(format!(
            "a lease of {} ms is longer than the longest, {} ms",
            lease_for.as_millis(),
            validate::MAX_LEASE.as_millis()
        ))));
    }
    let lease = held(who, handle.lease);
    to_queue(shared, who, Operation::Extend, &handle, |reply| {
        QueueMsg::Extend {
            lease,
            lease_for,
            reply,
        }
    })
    .await
}

/// The consumer gives up on a delivery: it goes to the group's dead letters now, with
/// `reason`.
pub async fn dead_letter(
    shared: &Arc<Shared>,
    who: &Principal,
    handle: Handle,
    reason: String,
) -> Answer<()> {
    let lease = held(who, handle.lease);
    let stored = to_queue(shared, who, Operation::DeadLetter, &handle, |reply| {
        QueueMsg::DeadLetter {
            lease,
            reason,
            reply,
        }
    })
    .await;
    later(async move { stored.await.map(|_| ()) })
}
