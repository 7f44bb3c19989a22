//! Scheduled messages: cancelling one before its time, and listing what waits.

use std::sync::Arc;

use txmq_protocol::pb;

use super::Shared;
use super::{Pending, later, ready};
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

/// Cancels a scheduled message that is not yet due; again is a no-op success, and one
/// already delivered is refused with where it went.
pub fn cancel(id: u64, req: pb::CancelScheduledRequest, shared: &Arc<Shared>) -> Pending {
    let message = match message_id(&req.message_id) {
        Ok(m) => m,
        Err(e) => return ready(id, Err(e)),
    };
    let writer = shared.writer.clone();
    later(id, async move {
        match writer
            .submit(Command::CancelScheduled { id: message })
            .await?
        {
            Outcome::Cancelled { topic, deliver_ms } => Ok(pb::response::Result::CancelScheduled(
                pb::CancelScheduledOk { topic, deliver_ms },
            )),
            other => Err(Error::Internal(format!("cancel gave {other:?}"))),
        }
    })
}

/// Scheduled messages still waiting, earliest first, a page at a time.
pub fn list(id: u64, req: pb::ListScheduledRequest, shared: &Arc<Shared>) -> Pending {
    if !req.topic.is_empty()
        && let Err(e) = super::name("topic", &req.topic)
    {
        return ready(id, Err(e));
    }
    let after = if req.after_message_id.is_empty() {
        None
    } else {
        match message_id(&req.after_message_id) {
            Ok(m) => Some((req.after_deliver_ms, m)),
            Err(e) => return ready(id, Err(e)),
        }
    };
    let storage = shared.storage.clone();
    let limit = super::page(req.limit);
    // Keys and tags run to 64 KiB each: a page stops at half a frame.
    let max_bytes = shared.config.max_frame_len / 2;
    later(id, async move {
        let page = tokio::task::spawn_blocking(move || {
            storage.scheduled_page(&req.topic, after, limit, max_bytes)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        let (resume_deliver_ms, resume_message_id) = page
            .resume
            .map(|(ms, id)| (ms, id.to_string()))
            .unwrap_or_default();
        Ok(pb::response::Result::Scheduled(pb::ListScheduledOk {
            scheduled: page.scheduled,
            more: page.more,
            resume_deliver_ms,
            resume_message_id,
        }))
    })
}
