//! Consumers: ReceiveMessage (long polling), AckMessage and ChangeInvisibleDuration, on
//! txmq's consumer groups and leases.
//!
//! A receive joins the group's queue as a consumer for as long as it waits, with a
//! window of its batch size and a lease of its invisible duration; what it hands to the
//! client stays leased when it leaves (the client acks it, or it becomes visible again
//! when the lease ends and is delivered anew with one more attempt), and anything pushed
//! to it but not handed out goes back without counting an attempt.
//!
//! A receipt handle names the lease and is bound to its client (see [`super::receipts`]):
//! a redelivery makes a new lease, so the handle of an earlier delivery is stale
//! (INVALID_RECEIPT_HANDLE).

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Status};
use txmq_protocol::pb as native;

use super::convert::outgoing;
use super::{BoxStream, Endpoint, pb, status};
use crate::service::consume::{self, Handle, Join, LeaseRef, SubscribeOptions};
use crate::service::{Principal, Shared};

/// Longest a receive waits for a message.
const MAX_POLL: Duration = Duration::from_secs(20);
/// Shortest and longest invisible duration a receive or a change may ask for.
const MIN_INVISIBLE: Duration = Duration::from_secs(1);
const MAX_INVISIBLE: Duration = Duration::from_secs(12 * 3600);
/// Most messages one receive returns.
const MAX_BATCH: i32 = 1024;

fn duration_of(d: &prost_types::Duration) -> Option<Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    Some(Duration::new(secs, nanos))
}

/// The `grpc-timeout` a client set (tonic does not apply it to response streams).
fn grpc_timeout<T>(request: &Request<T>) -> Option<Duration> {
    let text = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = text.split_at(text.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The tag filter of a filter expression (`*`, or `a||b`); SQL filters are not taken.
fn tag_filter(f: Option<pb::FilterExpression>) -> Result<String, pb::Status> {
    match f {
        None => Ok(String::new()),
        Some(f) if f.r#type == pb::FilterType::Sql as i32 => Err(status::of(
            pb::Code::Unsupported,
            "SQL filters are not supported: filter by tag",
        )),
        Some(f) => Ok(f.expression),
    }
}

/// The message type a stored message had when it was sent.
fn kind(m: &native::StoredMessage) -> pb::MessageType {
    if !m.txn_id.is_empty() {
        pb::MessageType::Transaction
    } else if !m.message_group.is_empty() {
        pb::MessageType::Fifo
    } else if m.deliver_ms > 0 {
        pb::MessageType::Delay
    } else {
        pb::MessageType::Normal
    }
}

fn name_of(r: Option<pb::Resource>) -> String {
    r.map(|r| r.name).unwrap_or_default()
}

/// One receive: the status first (OK, or MESSAGE_NOT_FOUND when nothing came within
/// the long-polling time), then the messages, then the delivery timestamp.
pub async fn receive(
    endpoint: &Endpoint,
    request: Request<pb::ReceiveMessageRequest>,
) -> Result<BoxStream<pb::ReceiveMessageResponse>, Status> {
    let deadline = grpc_timeout(&request);
    let who = super::principal(&request);
    let req = request.into_inner();
    let answer = match endpoint.shared() {
        Ok(shared) => receive_from(endpoint, &shared, &who, req, deadline).await,
        Err(s) => vec![pb::ReceiveMessageResponse {
            content: Some(pb::receive_message_response::Content::Status(s)),
        }],
    };
    Ok(Box::pin(futures::stream::iter(answer.into_iter().map(Ok))))
}

async fn receive_from(
    endpoint: &Endpoint,
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::ReceiveMessageRequest,
    deadline: Option<Duration>,
) -> Vec<pb::ReceiveMessageResponse> {
    use pb::receive_message_response::Content;
    let refuse = |s: pb::Status| {
        vec![pb::ReceiveMessageResponse {
            content: Some(Content::Status(s)),
        }]
    };
    let group = name_of(req.group);
    let topic = name_of(req.message_queue.and_then(|q| q.topic));
    if let Err(e) = crate::service::name("group", &group) {
        return refuse(status::of(pb::Code::IllegalConsumerGroup, e.to_string()));
    }
    if let Err(e) = crate::service::name("topic", &topic) {
        return refuse(status::of_error(&e));
    }
    let filter = match tag_filter(req.filter_expression) {
        Ok(f) => f,
        Err(s) => return refuse(s),
    };
    // A push consumer asks the broker to pick the time (and renew it): the broker's lease.
    let invisible = match req.invisible_duration.as_ref().and_then(duration_of) {
        Some(d) if !req.auto_renew => d,
        _ => shared.config.lease,
    };
    if !(MIN_INVISIBLE..=MAX_INVISIBLE).contains(&invisible) {
        return refuse(status::of(
            pb::Code::IllegalInvisibleTime,
            format!("invisible duration {invisible:?} is outside 1 s..12 h"),
        ));
    }
    // Leave two seconds of the client's own deadline for the answer to reach it.
    let mut poll = req
        .long_polling_timeout
        .as_ref()
        .and_then(duration_of)
        .unwrap_or(MAX_POLL)
        .min(MAX_POLL);
    if let Some(d) = deadline {
        // (Half of a deadline shorter than that.)
        poll = poll.min(d.saturating_sub(Duration::from_secs(2)).max(d / 2));
    }
    let batch = req.batch_size.clamp(1, MAX_BATCH) as u32;
    let auto_renew = req.auto_renew;
    // An ordered group stays ordered: gRPC clients learn it from the broker.
    let ordered = consume::is_ordered(shared, &group, &topic).await;
    let join = Join {
        group,
        topic,
        window: batch,
        lease: Some(invisible),
        options: SubscribeOptions {
            tag_filter: filter,
            ordered,
            ..SubscribeOptions::default()
        },
    };
    // One answer holds at most about a frame's worth of bodies (and always one): the
    // rest goes back uncounted.
    let polled = match crate::faces::poll::poll(
        shared,
        who,
        join,
        poll,
        shared.config.max_frame_len,
    )
    .await
    {
        Ok(p) => p,
        Err(e) => return refuse(status::of_error(&e)),
    };
    let (group, topic) = (&polled.group, &polled.topic);
    let mut out = Vec::with_capacity(polled.deliveries.len() + 2);
    for d in polled.deliveries {
        let (Some(m), Some(h)) = (d.message, d.handle) else {
            continue;
        };
        if auto_renew {
            let lease = LeaseRef::new(h.offset, h.lease_id);
            endpoint
                .renewals
                .hold(group, topic, lease, who, d.lease_deadline_ms);
        }
        let mut message = outgoing(&m, kind(&m));
        if let Some(sys) = message.system_properties.as_mut() {
            sys.receipt_handle = Some(endpoint.receipts.handle(
                group,
                topic,
                LeaseRef::new(h.offset, h.lease_id),
                who,
            ));
            sys.delivery_attempt = Some(i32::try_from(d.attempt).unwrap_or(i32::MAX));
            sys.invisible_duration = Some(prost_types::Duration {
                seconds: invisible.as_secs() as i64,
                nanos: invisible.subsec_nanos() as i32,
            });
        }
        out.push(pb::ReceiveMessageResponse {
            content: Some(Content::Message(message)),
        });
    }
    let first = if out.is_empty() {
        status::of(pb::Code::MessageNotFound, "no new message")
    } else {
        status::ok()
    };
    out.insert(
        0,
        pb::ReceiveMessageResponse {
            content: Some(Content::Status(first)),
        },
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    out.push(pb::ReceiveMessageResponse {
        content: Some(Content::DeliveryTimestamp(prost_types::Timestamp {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos() as i32,
        })),
    });
    out
}

/// Acks, each entry on its own (a stale handle fails that entry only).
pub async fn ack(
    endpoint: &Endpoint,
    who: &Principal,
    req: pb::AckMessageRequest,
) -> pb::AckMessageResponse {
    let shared = match endpoint.shared() {
        Ok(s) => s,
        Err(s) => {
            return pb::AckMessageResponse {
                status: Some(s),
                entries: Vec::new(),
            };
        }
    };
    let group = name_of(req.group);
    let topic = name_of(req.topic);
    let mut entries = Vec::with_capacity(req.entries.len());
    for e in req.entries {
        let outcome = match endpoint
            .receipts
            .lease(&e.receipt_handle, &group, &topic, who)
        {
            None => status::of(
                pb::Code::InvalidReceiptHandle,
                "not a receipt handle of this broker",
            ),
            Some(lease) => {
                endpoint.renewals.release(&group, &topic, lease);
                let handle = Handle {
                    group: group.clone(),
                    topic: topic.clone(),
                    lease,
                };
                match consume::ack(&shared, who, vec![handle]).await.await {
                    Ok(_) => status::ok(),
                    Err(e) => status::of_error(&e),
                }
            }
        };
        entries.push(pb::AckMessageResultEntry {
            message_id: e.message_id,
            receipt_handle: e.receipt_handle,
            status: Some(outcome),
        });
    }
    let status = entries
        .iter()
        .filter_map(|e| e.status.clone())
        .find(|s| !status::is_ok(s))
        .unwrap_or_else(status::ok);
    pb::AckMessageResponse {
        status: Some(status),
        entries,
    }
}

/// Moves a delivery's invisible time (its lease's end) to `invisible_duration` from now.
pub async fn change_invisible(
    endpoint: &Endpoint,
    who: &Principal,
    req: pb::ChangeInvisibleDurationRequest,
) -> pb::ChangeInvisibleDurationResponse {
    let answer = |s, handle: String| pb::ChangeInvisibleDurationResponse {
        status: Some(s),
        receipt_handle: handle,
    };
    let shared = match endpoint.shared() {
        Ok(s) => s,
        Err(s) => return answer(s, String::new()),
    };
    let (group, topic) = (name_of(req.group), name_of(req.topic));
    let Some(lease) = endpoint
        .receipts
        .lease(&req.receipt_handle, &group, &topic, who)
    else {
        return answer(
            status::of(
                pb::Code::InvalidReceiptHandle,
                "not a receipt handle of this broker",
            ),
            String::new(),
        );
    };
    let Some(invisible) = req
        .invisible_duration
        .as_ref()
        .and_then(duration_of)
        .filter(|d| (Duration::ZERO..=MAX_INVISIBLE).contains(d))
    else {
        return answer(
            status::of(
                pb::Code::IllegalInvisibleTime,
                "invisible duration outside 0..12 h",
            ),
            String::new(),
        );
    };
    let handle = Handle {
        group: group.clone(),
        topic: topic.clone(),
        lease,
    };
    match consume::extend(&shared, who, handle, invisible).await.await {
        Ok(_) => {
            // The client set the time (a push consumer's retry delay): no more renewals.
            endpoint.renewals.release(&group, &topic, lease);
            answer(
                status::ok(),
                endpoint.receipts.handle(&group, &topic, lease, who),
            )
        }
        Err(e) => answer(status::of_error(&e), String::new()),
    }
}

/// A consumer gives up on a delivery (a push consumer after its max attempts, or a FIFO
/// one that cannot go on): it goes to the group's dead letters now.
pub async fn forward_to_dead_letters(
    endpoint: &Endpoint,
    who: &Principal,
    req: pb::ForwardMessageToDeadLetterQueueRequest,
) -> pb::ForwardMessageToDeadLetterQueueResponse {
    let answer = |s| pb::ForwardMessageToDeadLetterQueueResponse { status: Some(s) };
    let shared = match endpoint.shared() {
        Ok(s) => s,
        Err(s) => return answer(s),
    };
    let (group, topic) = (name_of(req.group), name_of(req.topic));
    let Some(lease) = endpoint
        .receipts
        .lease(&req.receipt_handle, &group, &topic, who)
    else {
        return answer(status::of(
            pb::Code::InvalidReceiptHandle,
            "not a receipt handle of this broker",
        ));
    };
    let handle = Handle {
        group: group.clone(),
        topic: topic.clone(),
        lease,
    };
    let reason = format!(
        "forwarded by the consumer on attempt {} of {}",
        req.delivery_attempt, req.max_delivery_attempts
    );
    match consume::dead_letter(&shared, who, handle, reason)
        .await
        .await
    {
        Ok(()) => {
            endpoint.renewals.release(&group, &topic, lease);
            answer(status::ok())
        }
        Err(e) => answer(status::of_error(&e)),
    }
}
