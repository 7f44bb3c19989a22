//! Scheduled messages: cancelling one before its time, and listing what waits.

use std::sync::Arc;

use txmq_protocol::pb;

use super::Shared;
use super::access::{Operation, Resource};
use super::{Answer, Principal, later, now};
use crate::error::{Error, Result};
use crate::ids::Id;
use crate::storage::writer::{Command, Outcome};

fn message_id(text: &str) -> Result<Id> {
    Id::parse(text).ok_or_else(|| {
        Error::Invalid(format!(
            "{text:?} is not a message id (32 hexadecimal digits)"
        ))
    })
}

/// Recalls the delayed message `id` of `topic` before its time (a gRPC recall handle):
/// answers whether it was one waiting there and is now cancelled. Every refusal is the
/// same `false` (unknown, another topic's, delivered), so the answer says nothing of
/// an id that is not the asker's; a guess that names nothing costs a read, not a
/// write.
///
/// # Errors
/// Not permitted (`pub` on the topic): decided before the id is looked up, so it says
/// nothing of the id either.
pub async fn recall(shared: &Arc<Shared>, who: &Principal, topic: String, id: Id) -> Result<bool> {
    super::access::permit(shared, who, Operation::Recall, &[Resource::Topic(&topic)])?;
    let waiting = super::blocking(&shared.storage, move |s| s.scheduled(id)).await;
    let ours = matches!(&waiting, Ok(Some(rec)) if rec.topic == topic
        && rec.state() == crate::storage::records::SchedState::Waiting);
    Ok(ours
        && shared
            .writer
            .submit(Command::CancelScheduled { id })
            .await
            .is_ok())
}

/// Cancels a scheduled message that is not yet due; again is a no-op success, and one
/// already delivered is refused with where it went.
pub fn cancel(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::CancelScheduledRequest,
) -> Answer<pb::CancelScheduledOk> {
    if let Err(e) = super::access::permit(
        shared,
        who,
        Operation::CancelScheduled,
        &[Resource::Topic("")],
    ) {
        return now(Err(e));
    }
    let message = match message_id(&req.message_id) {
        Ok(m) => m,
        Err(e) => return now(Err(e)),
    };
    let writer = shared.writer.clone();
    later(async move {
        match writer
            .submit(Command::CancelScheduled { id: message })
            .await?
        {
            Outcome::Cancelled { topic, deliver_ms } => {
                Ok(pb::CancelScheduledOk { topic, deliver_ms })
            }
            other => Err(Error::Internal(format!("cancel gave {other:?}"))),
        }
    })
}

/// Scheduled messages still waiting, earliest first, a page at a time.
pub fn list(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::ListScheduledRequest,
) -> Answer<pb::ListScheduledOk> {
    if let Err(e) = super::access::permit(
        shared,
        who,
        Operation::ListScheduled,
        &[Resource::Topic(&req.topic)],
    ) {
        return now(Err(e));
    }
    if !req.topic.is_empty()
        && let Err(e) = super::name("topic", &req.topic)
    {
        return now(Err(e));
    }
    let after = if req.after_message_id.is_empty() {
        None
    } else {
        match message_id(&req.after_message_id) {
            Ok(m) => Some((req.after_deliver_ms, m)),
            Err(e) => return now(Err(e)),
        }
    };
    let storage = shared.storage.clone();
    let limit = super::page(req.limit);
    // Keys and tags run to 64 KiB each: a page stops at half a frame.
    let max_bytes = shared.config.max_frame_len / 2;
    later(async move {
        let page = tokio::task::spawn_blocking(move || {
            storage.scheduled_page(&req.topic, after, limit, max_bytes)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        let (resume_deliver_ms, resume_message_id) = page
            .resume
            .map(|(ms, id)| (ms, id.to_string()))
            .unwrap_or_default();
        Ok(pb::ListScheduledOk {
            scheduled: page.scheduled,
            more: page.more,
            resume_deliver_ms,
            resume_message_id,
        })
    })
}
