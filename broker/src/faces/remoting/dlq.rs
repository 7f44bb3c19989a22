//! `%DLQ%<group>` read as a topic, as RocketMQ operators inspect dead letters: a pull of
//! its one queue answers the group's dead letters (txmq's, of every topic the group
//! consumes), numbered by their handle (`topic id << 40 | offset`), so a consumer that
//! asks from where it left off goes on in handle order. It is a read-only view: nothing
//! is acked or removed (`txmq dlq redrive` puts dead letters back), and no position is
//! kept for the reader. Each record names its topic `%DLQ%<group>`, with the original
//! topic in `RETRY_TOPIC` and the reason in `DEAD_REASON`.

use std::sync::Arc;
use std::time::Duration;

use txmq_protocol::pb as native;

use super::frame::Command;
use super::record::{self, Record};
use super::{Endpoint, codes, refusal, send};
use crate::service::{Principal, Shared, admin};

/// Most dead letters one pull looks through (pages of the group's listing).
const MAX_SCANNED: usize = 10_000;

fn empty(req: &Command, offset: u64) -> Command {
    Command::answer(req, codes::PULL_NOT_FOUND, Some("no new message".into()))
        .with("suggestWhichBrokerId", 0)
        .with("nextBeginOffset", offset)
        .with("minOffset", 0)
        .with("maxOffset", offset)
}

/// The group's dead letters from handle `from` on, in handle order, with their
/// handles: the first `max` of them within `budget` bytes of bodies.
async fn after(
    shared: &Arc<Shared>,
    who: &Principal,
    group: &str,
    from: u64,
    (max, budget): (usize, usize),
) -> crate::error::Result<Vec<(u64, native::DeadLetter)>> {
    // The first `max` by handle, within `budget` bytes of bodies: pruned after each page,
    // so a large dead-letter queue never sits in memory.
    let mut found: std::collections::BTreeMap<u64, native::DeadLetter> = Default::default();
    let mut req = native::ListDeadLettersRequest {
        group: group.to_string(),
        limit: 1000,
        ..Default::default()
    };
    let mut scanned = 0;
    loop {
        let page = admin::list_dead_letters(shared, who, req.clone()).await?;
        scanned += page.dead_letters.len();
        let last = page
            .dead_letters
            .last()
            .map(|d| (d.topic.clone(), d.offset));
        for d in page.dead_letters {
            let Some(id) = admin::topic_id(shared, &d.topic) else {
                continue;
            };
            let handle = record::handle(id, d.offset) as u64;
            if handle >= from {
                found.insert(handle, d);
            }
        }
        let mut bytes = 0usize;
        let mut keep = 0usize;
        for d in found.values() {
            let size = d.message.as_ref().map_or(0, |m| m.body.len());
            if keep >= max || (keep > 0 && bytes + size > budget) {
                break;
            }
            bytes += size;
            keep += 1;
        }
        if let Some(&cut) = found.keys().nth(keep) {
            found.split_off(&cut);
        }
        match last {
            Some((topic, offset)) if page.more && scanned < MAX_SCANNED => {
                req.after_topic = topic;
                req.after_offset = offset;
            }
            _ => break,
        }
    }
    Ok(found.into_iter().collect())
}

/// A pull of `%DLQ%<group>`: its dead letters from `offset` (a handle) on.
#[allow(clippy::too_many_arguments)]
pub async fn pull(
    ep: &Endpoint,
    shared: &Arc<Shared>,
    who: &Principal,
    req: &Command,
    dlq_topic: &str,
    group: &str,
    (offset, max, budget): (u64, u32, usize),
    suspend: Duration,
) -> Command {
    let found = match after(shared, who, group, offset, (max as usize, budget)).await {
        Ok(f) => f,
        Err(e) => return refusal(req, &e),
    };
    if found.is_empty() {
        // Nothing new: a long poll waits (dead letters are rare) and answers nothing.
        tokio::select! {
            () = tokio::time::sleep(suspend) => {}
            () = ep.stop.cancelled() => {}
        }
        return empty(req, offset);
    }
    let mut body = Vec::new();
    let mut next = offset;
    for (handle, d) in found.into_iter().take(max as usize) {
        let Some(m) = &d.message else {
            // Its message is no longer stored (retention): passed over.
            next = handle + 1;
            continue;
        };
        let props = send::outgoing_properties(
            m,
            &[
                ("RETRY_TOPIC", d.topic.as_str()),
                ("DEAD_REASON", d.reason.as_str()),
            ],
        );
        let mut one = Vec::new();
        let written = Record {
            queue_id: 0,
            flag: send::user_flag(m),
            queue_offset: handle as i64,
            handle: handle as i64,
            sys_flag: 0,
            born_ms: m.born_ms as i64,
            born_host: ep.advertised,
            store_ms: d.dead_ms as i64,
            store_host: ep.advertised,
            reconsume_times: d.attempts.saturating_sub(1) as i32,
            body: &m.body,
            topic: dlq_topic,
            properties: &props,
        }
        .write(&mut one);
        if written.is_err() {
            next = handle + 1;
            continue;
        }
        if !body.is_empty() && body.len() + one.len() > budget {
            break;
        }
        body.extend_from_slice(&one);
        next = handle + 1;
    }
    if body.is_empty() {
        return empty(req, next);
    }
    Command::answer(req, codes::SUCCESS, None)
        .with("suggestWhichBrokerId", 0)
        .with("nextBeginOffset", next)
        .with("minOffset", 0)
        .with("maxOffset", next)
        .with_body(body)
}
