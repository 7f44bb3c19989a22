//! Subscribing, and acknowledging, refusing and extending deliveries.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::oneshot;
use txmq_protocol::pb;

use super::Session;
use super::Shared;
use super::{Pending, later, ready, validate};
use crate::delivery::{ConsumerSpec, LeaseRef, QueueMsg, SubscribeOptions};
use crate::error::{Error, Result};

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

/// Adds this connection as a consumer of (group, topic). Deliveries follow on the same
/// connection, tagged with the returned subscription id.
pub async fn subscribe(
    id: u64,
    req: pb::SubscribeRequest,
    session: &mut Session,
    shared: &Arc<Shared>,
) -> Pending {
    if let Err(e) = super::name("group", &req.group).and(super::name("topic", &req.topic)) {
        return ready(id, Err(e));
    }
    let cap = shared.config.max_subscriptions_per_connection;
    if session.subscriptions.len() >= cap {
        shared
            .metrics
            .limit_refusals
            .with_label_values(&["subscriptions"])
            .inc();
        return ready(
            id,
            Err(Error::LimitReached(format!(
                "this connection holds {} subscriptions, its \
                 max-subscriptions-per-connection ({cap}); unsubscribe one, or use another \
                 connection",
                session.subscriptions.len()
            ))),
        );
    }
    let lease = match req.lease_ms {
        0 => shared.config.lease,
        ms => match validate::lease_ms("lease_ms", ms) {
            Ok(d) => d,
            Err(e) => return ready(id, Err(e)),
        },
    };
    let topic = match shared.groups.topic(&req.topic).await {
        Ok(t) => t,
        Err(e) => return ready(id, Err(e)),
    };
    let subscription_id = shared.subscription_ids.fetch_add(1, Ordering::Relaxed);
    let consumer = ConsumerSpec {
        subscription_id,
        outbound: session.outbound.clone(),
        window: if req.window == 0 {
            shared.config.window
        } else {
            req.window
        },
        lease,
        stall: session.stall.clone(),
    };
    let options = SubscribeOptions {
        tag_filter: req.tag_filter,
        from_latest: req.start_from == pb::StartFrom::Latest as i32,
        max_attempts: req.max_attempts,
        replace_filter: req.replace_filter,
        ordered: req.ordered,
    };
    let (reply, rx) = oneshot::channel();
    let msg = QueueMsg::Subscribe {
        consumer,
        options,
        reply,
    };
    if let Err(e) = shared.groups.send(&req.group, topic.clone(), msg).await {
        return ready(id, Err(e));
    }
    // Recorded now, so a disconnect before the answer still releases it.
    session
        .subscriptions
        .insert(subscription_id, (req.group, topic));
    let lost = gone(shared);
    later(id, async move {
        rx.await.map_err(|_| lost)??;
        Ok(pb::response::Result::Subscribe(pb::SubscribeOk {
            subscription_id,
        }))
    })
}

/// Removes one subscription; its leases are released at once.
pub async fn unsubscribe(
    id: u64,
    req: pb::UnsubscribeRequest,
    session: &mut Session,
    shared: &Arc<Shared>,
) -> Pending {
    let Some((group, topic)) = session.subscriptions.remove(&req.subscription_id) else {
        return ready(
            id,
            Err(Error::Invalid(format!(
                "no subscription {} on this connection",
                req.subscription_id
            ))),
        );
    };
    let msg = QueueMsg::Unsubscribe {
        subscription_id: req.subscription_id,
        graceful: true,
        keep: Vec::new(),
    };
    let result = shared.groups.send(&group, topic, msg).await;
    ready(
        id,
        result.map(|()| pb::response::Result::Ack(pb::AckOk { acked: 0 })),
    )
}

/// Acknowledges deliveries, durably.
pub async fn ack(id: u64, req: pb::AckRequest, shared: &Arc<Shared>) -> Pending {
    if req.handles.is_empty() {
        return ready(id, Err(Error::Invalid("ack carries no handles".into())));
    }
    let count = req.handles.len() as u32;
    let mut by_queue: HashMap<(String, String), Vec<LeaseRef>> = HashMap::new();
    for h in req.handles {
        if !by_queue.contains_key(&(h.group.clone(), h.topic.clone())) {
            if let Err(e) = super::name("group", &h.group).and(super::name("topic", &h.topic)) {
                return ready(id, Err(e));
            }
            if by_queue.len() >= MAX_QUEUES_PER_ACK {
                return ready(
                    id,
                    Err(Error::Invalid(format!(
                        "an ack names more than {MAX_QUEUES_PER_ACK} (group, topic) pairs"
                    ))),
                );
            }
        }
        by_queue
            .entry((h.group, h.topic))
            .or_default()
            .push(LeaseRef {
                offset: h.offset,
                lease_id: h.lease_id,
            });
    }
    let mut replies = Vec::new();
    for ((group, topic), leases) in by_queue {
        let topic = match shared.groups.existing_topic(&topic) {
            Ok(t) => t,
            Err(e) => return ready(id, Err(e)),
        };
        let (reply, rx) = oneshot::channel();
        if let Err(e) = shared
            .groups
            .send_existing(&group, topic, QueueMsg::Ack { leases, reply })
            .await
        {
            return ready(id, Err(e));
        }
        replies.push(rx);
    }
    let lost = gone(shared);
    later(id, async move {
        for rx in replies {
            rx.await.map_err(|_| lost.clone())??;
        }
        Ok(pb::response::Result::Ack(pb::AckOk { acked: count }))
    })
}

/// Most distinct (group, topic) queues one ack may name: a consumer acks its own
/// subscriptions' deliveries, never hundreds of groups'.
pub const MAX_QUEUES_PER_ACK: usize = 64;

fn lease_of(handle: Option<pb::DeliveryHandle>) -> Result<(String, String, LeaseRef)> {
    let h = handle.ok_or_else(|| Error::Invalid("missing delivery handle".into()))?;
    super::name("group", &h.group)?;
    super::name("topic", &h.topic)?;
    Ok((
        h.group,
        h.topic,
        LeaseRef {
            offset: h.offset,
            lease_id: h.lease_id,
        },
    ))
}

/// Refuses a delivery: it comes back after the delay (or the backoff schedule), or goes
/// to the dead-letter queue once out of attempts.
pub async fn nack(id: u64, req: pb::NackRequest, shared: &Arc<Shared>) -> Pending {
    let (group, topic, lease) = match lease_of(req.handle) {
        Ok(x) => x,
        Err(e) => return ready(id, Err(e)),
    };
    let topic = match shared.groups.existing_topic(&topic) {
        Ok(t) => t,
        Err(e) => return ready(id, Err(e)),
    };
    let delay = if req.use_backoff {
        None
    } else {
        match validate::duration_ms(
            "delay_ms",
            req.delay_ms,
            Duration::ZERO,
            validate::MAX_NACK_DELAY,
        ) {
            Ok(d) => Some(d),
            Err(e) => return ready(id, Err(e)),
        }
    };
    let (reply, rx) = oneshot::channel();
    let msg = QueueMsg::Nack {
        lease,
        delay,
        reply,
    };
    if let Err(e) = shared.groups.send_existing(&group, topic, msg).await {
        return ready(id, Err(e));
    }
    let lost = gone(shared);
    later(id, async move {
        rx.await.map_err(|_| lost)??;
        Ok(pb::response::Result::Ack(pb::AckOk { acked: 0 }))
    })
}

/// Lengthens a lease in progress.
pub async fn extend(id: u64, req: pb::ExtendRequest, shared: &Arc<Shared>) -> Pending {
    let (group, topic, lease) = match lease_of(req.handle) {
        Ok(x) => x,
        Err(e) => return ready(id, Err(e)),
    };
    let lease_for = match validate::lease_ms("lease_ms", req.lease_ms) {
        Ok(d) => d,
        Err(e) => return ready(id, Err(e)),
    };
    let topic = match shared.groups.existing_topic(&topic) {
        Ok(t) => t,
        Err(e) => return ready(id, Err(e)),
    };
    let (reply, rx) = oneshot::channel();
    let msg = QueueMsg::Extend {
        lease,
        lease_for,
        reply,
    };
    if let Err(e) = shared.groups.send_existing(&group, topic, msg).await {
        return ready(id, Err(e));
    }
    let lost = gone(shared);
    later(id, async move {
        let lease_deadline_ms = rx.await.map_err(|_| lost)??;
        Ok(pb::response::Result::Extend(pb::ExtendOk {
            lease_deadline_ms,
        }))
    })
}
