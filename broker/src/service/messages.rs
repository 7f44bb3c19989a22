//! Finding messages: one by id with its life, or a topic's by key and stored time.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message as _;
use tokio::sync::oneshot;
use txmq_protocol::pb;

use super::Shared;
use super::access::{Operation, Resource};
use super::{Answer, Principal, blocking, later, now};
use crate::delivery::QueueMsg;
use crate::delivery::queue::tag_matches;
use crate::error::{Error, Result};
use crate::ids::Id;
use crate::storage::records::{CursorRecord, DeadLetterRecord, RetryRecord, SchedState, TxnRecord};
use crate::storage::writer::txn_state_name;
use crate::storage::{Cf, decode};

fn found(mut message: pb::StoredMessage, body: bool) -> pb::FoundMessage {
    let body_len = message.body.len() as u32;
    if !body {
        message.body = Default::default();
    }
    pb::FoundMessage {
        message: Some(message),
        body_len,
    }
}

/// A message by id and its life.
pub fn show_message(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::ShowMessageRequest,
) -> Answer<pb::ShowMessageOk> {
    if let Err(e) =
        super::access::permit(shared, who, Operation::ShowMessage, &[Resource::Topic("")])
    {
        return now(Err(e));
    }
    let Some(msg_id) = Id::parse(&req.message_id) else {
        return now(Err(Error::Invalid(format!(
            "{:?} is not a message id (32 hex digits)",
            req.message_id
        ))));
    };
    let shared = shared.clone();
    later(async move {
        let text = req.message_id.clone();
        let located = blocking(&shared.storage, move |s| {
            let Some((topic_id, offset)) = s.locate(msg_id)? else {
                return Ok(None);
            };
            Ok(s.read_message(topic_id, offset)?.map(|m| (topic_id, m)))
        })
        .await?;
        let Some((topic_id, message)) = located else {
            return scheduled(&shared, msg_id, &text, req.body).await;
        };
        let txn_state = if message.txn_id.is_empty() {
            String::new()
        } else {
            let txn = Id::parse(&message.txn_id);
            let rec = match txn {
                Some(t) => blocking(&shared.storage, move |s| s.txn(t)).await?,
                None => None,
            };
            rec.map_or(
                "purged (resolved; its record's retention ended)".into(),
                |r: TxnRecord| {
                    txn_state_name(pb::TxnState::try_from(r.state).unwrap_or_default()).into()
                },
            )
        };
        let (groups, groups_omitted) = fates(&shared, topic_id, &message).await?;
        let mut shown = pb::ShowMessageOk {
            message: Some(found(message, req.body)),
            state: "visible".into(),
            txn_state,
            groups,
            groups_omitted,
        };
        // The body fits in a frame on its own; with a thousand groups' reasons beside it
        // perhaps not: the last groups give way.
        let budget = shared.config.max_frame_len.saturating_sub(4096);
        while shown.encoded_len() > budget && shown.groups.pop().is_some() {
            shown.groups_omitted += 1;
        }
        Ok(shown)
    })
}

/// A message not in any log: perhaps scheduled, waiting or cancelled.
async fn scheduled(
    shared: &Arc<Shared>,
    msg_id: Id,
    text: &str,
    body: bool,
) -> Result<pb::ShowMessageOk> {
    let rec = blocking(&shared.storage, move |s| s.scheduled(msg_id)).await?;
    let Some(rec) = rec else {
        return Err(Error::MessageNotFound(text.to_string()));
    };
    let state = match rec.state() {
        SchedState::Waiting => "scheduled",
        SchedState::Cancelled => "cancelled",
        // Delivered, and since removed from its log (else it was found there).
        SchedState::Delivered => return Err(Error::MessageNotFound(text.to_string())),
    };
    let message = rec.message.clone().unwrap_or_else(|| pb::StoredMessage {
        topic: rec.topic.clone(),
        message_id: text.to_string(),
        deliver_ms: rec.deliver_ms,
        ..Default::default()
    });
    Ok(pb::ShowMessageOk {
        message: Some(found(message, body)),
        state: state.into(),
        txn_state: String::new(),
        groups: Vec::new(),
        groups_omitted: 0,
    })
}

/// Most groups one `show` reports (the rest are counted).
const MAX_GROUPS_SHOWN: usize = 1000;

/// What each group with a position on the message's topic did with it: the leases from
/// the running queues first, then what is stored (acks, retries, dead letters), so an
/// ack that lands in between reads as acked, not as pending. At most
/// [`MAX_GROUPS_SHOWN`]; returns how many more there were.
async fn fates(
    shared: &Arc<Shared>,
    topic_id: u32,
    message: &pb::StoredMessage,
) -> Result<(Vec<pb::GroupMessageState>, u32)> {
    let offset = message.offset;
    let peeks = shared
        .groups
        .running_on(topic_id)
        .into_iter()
        .map(|(group, queue)| async move {
            let (reply, rx) = oneshot::channel();
            let _ = queue.send(QueueMsg::Peek { offset, reply }).await;
            (group, rx.await.ok().flatten())
        });
    let leases: HashMap<String, (u32, u64)> = futures::future::join_all(peeks)
        .await
        .into_iter()
        .filter_map(|(g, lease)| Some((g, lease?)))
        .collect();
    let (stored, omitted) = blocking(&shared.storage, move |s| {
        let mut groups = s.groups_on(topic_id)?;
        groups.sort_unstable();
        let omitted = groups.len().saturating_sub(MAX_GROUPS_SHOWN) as u32;
        groups.truncate(MAX_GROUPS_SHOWN);
        let mut out = Vec::new();
        for group in groups {
            let Some(cursor) = s.cursor(&group, topic_id)? else {
                continue;
            };
            let dead = s.group_entry(Cf::Dlq, &group, topic_id, offset)?;
            let acked = s
                .group_entry(Cf::Acked, &group, topic_id, offset)?
                .is_some();
            let retry = s.group_entry(Cf::Retry, &group, topic_id, offset)?;
            let attempts = s
                .group_entry(Cf::Attempts, &group, topic_id, offset)?
                .and_then(|v| Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?)));
            out.push((group, cursor, dead, acked, retry, attempts));
        }
        Ok((out, omitted))
    })
    .await?;
    let mut out = Vec::with_capacity(stored.len());
    for (group, cursor, dead, acked, retry, attempts) in stored {
        let cursor: CursorRecord = cursor;
        let mut state = pb::GroupMessageState {
            group,
            ..Default::default()
        };
        if !tag_matches(&cursor.tag_filter, &message.tag) {
            state.state = "filtered out".into();
        } else if let Some(dead) = dead {
            let dead: DeadLetterRecord = decode(&dead)?;
            state.state = "dead-lettered".into();
            state.attempts = dead.attempts;
            state.at_ms = dead.dead_ms;
            state.reason = dead.reason;
        } else if let Some(&(attempt, deadline_ms)) = leases.get(&state.group) {
            // The floor passes messages waiting for redelivery (and, when acks pile up,
            // leased ones): a lease or a retry record decides before the floor does.
            state.state = "in flight".into();
            state.attempts = attempt;
            state.at_ms = deadline_ms;
        } else if let Some(retry) = retry {
            let retry: RetryRecord = decode(&retry)?;
            state.state = "waiting".into();
            state.attempts = retry.attempts;
            state.at_ms = retry.due_ms;
        } else if offset < cursor.first_offset {
            // Below where the group started (from the latest, or a reset past it).
            state.state = "before start".into();
        } else if offset < cursor.ack_floor || acked {
            state.state = "acked".into();
            // Recorded when it took more than one.
            state.attempts = attempts.unwrap_or(1);
        } else {
            state.state = "pending".into();
        }
        out.push(state);
    }
    Ok((out, omitted))
}

/// A topic's messages by key and stored time, a page at a time.
pub fn find_messages(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::FindMessagesRequest,
) -> Answer<pb::FindMessagesOk> {
    if let Err(e) = super::access::permit(
        shared,
        who,
        Operation::FindMessages,
        &[Resource::Topic(&req.topic)],
    ) {
        return now(Err(e));
    }
    let topic = match shared.groups.existing_topic(&req.topic) {
        Ok(t) => t,
        Err(e) => return now(Err(e)),
    };
    if req.until_ms != 0 && req.until_ms <= req.since_ms {
        return now(Err(Error::Invalid(format!(
            "until ({}) must be after since ({})",
            req.until_ms, req.since_ms
        ))));
    }
    let limit = super::page(req.limit);
    // Bodies travel in the reply: a page stops at half a frame.
    let budget = shared.config.max_frame_len / 2;
    let shared = shared.clone();
    later(async move {
        let (tid, start, end) = (topic.id, topic.start(), topic.end());
        let page = blocking(&shared.storage, move |s| {
            let mut from = req.from_offset.max(start);
            if req.since_ms > 0 {
                from = from.max(s.first_stored_at_or_after(tid, from, end, req.since_ms)?);
            }
            let until = if req.until_ms > 0 {
                s.first_stored_at_or_after(tid, from, end, req.until_ms)?
            } else {
                end
            };
            let mut out = pb::FindMessagesOk {
                next_offset: from,
                ..Default::default()
            };
            let mut bytes = 0;
            let mut take = |m: pb::StoredMessage, out: &mut pb::FindMessagesOk| -> bool {
                let f = found(m, req.body);
                bytes += f.encoded_len() + 8;
                if (bytes > budget && !out.messages.is_empty()) || out.messages.len() >= limit {
                    out.more = true;
                    return false;
                }
                out.next_offset = f.message.as_ref().map_or(0, |m| m.offset + 1);
                out.messages.push(f);
                true
            };
            if req.key.is_empty() {
                let mut at = from;
                while at < until {
                    let batch = s.read_log(tid, at, until, 256)?;
                    let Some(last) = batch.last().map(|m| m.offset) else {
                        break;
                    };
                    for m in batch {
                        if !take(m, &mut out) {
                            return Ok(out);
                        }
                    }
                    at = last + 1;
                }
            } else {
                let mut at = from;
                loop {
                    let offsets = s.offsets_by_key(tid, &req.key, at, 256)?;
                    let Some(&last) = offsets.last() else { break };
                    for offset in offsets.into_iter().take_while(|o| *o < until) {
                        if let Some(m) = s.read_message(tid, offset)?
                            && !take(m, &mut out)
                        {
                            return Ok(out);
                        }
                    }
                    if last >= until {
                        break;
                    }
                    at = last + 1;
                }
            }
            out.next_offset = until.max(out.next_offset);
            Ok(out)
        })
        .await?;
        Ok(page)
    })
}
