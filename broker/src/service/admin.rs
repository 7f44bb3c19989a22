//! Topics, group descriptions and dead letters.

use std::sync::Arc;

use prost::Message as _;
use tokio::sync::oneshot;
use txmq_protocol::pb;

use super::Shared;
use super::access::{Action, Operation, Resource};
use super::{Answer, Principal, later, now};
use crate::delivery::QueueMsg;
use crate::error::{Error, Result};
use crate::storage::writer::{Command, Outcome};
use crate::topics::Topic;

fn topic_info(t: &Topic) -> pb::TopicInfo {
    let (retention_ms, retention_bytes) = t.retention();
    pb::TopicInfo {
        name: t.name.clone(),
        next_offset: t.end(),
        created_ms: t.created_ms,
        start_offset: t.start(),
        retention_ms,
        retention_bytes,
        queues: t.queues(),
        ..Default::default()
    }
}

/// The most queues a topic shows RocketMQ clients.
pub const MAX_QUEUES: u32 = 64;

fn valid_queues(queues: u32) -> Result<()> {
    if queues > MAX_QUEUES {
        return Err(Error::Invalid(format!(
            "a topic has 1 to {MAX_QUEUES} queues (0: the broker's remoting-queues); not {queues}"
        )));
    }
    Ok(())
}

/// The queues topic `name` shows RocketMQ clients: its own count, else `default`.
pub fn topic_queues(shared: &Shared, name: &str, default: u32) -> u32 {
    match shared.topics.get(name).map(|t| t.queues()) {
        Some(q) if q > 0 => q,
        _ => default,
    }
}

/// Whether `who` may see where topic `name` is and how far it goes (a route, a
/// queue's offsets): `pub`, or `sub` instead.
///
/// # Errors
/// Not permitted.
pub fn may_route(shared: &Shared, who: &Principal, name: &str) -> Result<()> {
    let peer = who.peer.map(|p| p.ip());
    if shared
        .auth
        .check(&who.identity, Action::Sub, &Resource::Topic(name), peer)
        .is_ok()
    {
        return Ok(());
    }
    super::access::permit(shared, who, Operation::Route, &[Resource::Topic(name)])
}

/// The topic a client's route names: found, or created on demand when the broker
/// creates topics so.
///
/// # Errors
/// No such topic (and none made on demand), the topic cap, a bad name.
pub async fn route_topic(shared: &Arc<Shared>, who: &Principal, name: &str) -> Result<()> {
    // `sub` on the topic serves as well as the table's `pub`: consumers route too.
    let peer = who.peer.map(|p| p.ip());
    let subscribes = shared
        .auth
        .check(&who.identity, Action::Sub, &Resource::Topic(name), peer)
        .is_ok();
    if !subscribes {
        super::access::permit(shared, who, Operation::Route, &[Resource::Topic(name)])?;
    }
    super::access::may_create(shared, who, name)?;
    super::name("topic", name)?;
    shared.groups.topic(name).await.map(|_| ())
}

/// The storage id of topic `name`, if it exists (faces make message handles of it).
pub fn topic_id(shared: &Shared, name: &str) -> Option<u32> {
    shared.topics.get(name).map(|t| t.id)
}

/// The name of the topic with storage id `id`, if it exists.
pub fn topic_name(shared: &Shared, id: u32) -> Option<String> {
    shared.topics.by_id(id).map(|t| t.name.clone())
}

/// The offset topic `name`'s next message gets (0 for no such topic).
pub fn topic_end(shared: &Shared, name: &str) -> u64 {
    shared.topics.get(name).map_or(0, |t| t.end())
}

/// A topic's first kept offset and its end (None: no such topic).
pub fn topic_span(shared: &Shared, name: &str) -> Option<(u64, u64)> {
    shared.topics.get(name).map(|t| (t.start(), t.end()))
}

/// The names of every topic, sorted (RocketMQ's topic list: no sizes).
///
/// # Errors
/// Not permitted.
pub fn topic_names(shared: &Arc<Shared>, who: &Principal) -> Result<Vec<String>> {
    super::access::permit(shared, who, Operation::ListTopics, &[Resource::Topic("")])?;
    let mut names: Vec<String> = shared.topics.all().iter().map(|t| t.name.clone()).collect();
    names.sort_unstable();
    Ok(names)
}

/// Creates a topic (or finds it, unless `fail_if_exists`).
pub fn create_topic(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::CreateTopicRequest,
) -> Answer<pb::TopicInfo> {
    if let Err(e) = super::access::permit(
        shared,
        who,
        Operation::CreateTopic,
        &[Resource::Topic(&req.topic)],
    ) {
        return now(Err(e));
    }
    if let Err(e) = super::name("topic", &req.topic).and(valid_queues(req.queues)) {
        return now(Err(e));
    }
    let writer = shared.writer.clone();
    later(async move {
        match writer
            .submit(Command::CreateTopic {
                name: req.topic,
                fail_if_exists: req.fail_if_exists,
                retention: (req.retention_ms, req.retention_bytes),
                queues: req.queues,
            })
            .await?
        {
            Outcome::Topic(t) => Ok(topic_info(&t)),
            other => Err(Error::Internal(format!("create topic gave {other:?}"))),
        }
    })
}

/// Changes what the request sets of a topic's retention overrides and queues.
pub fn alter_topic(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::ChangeTopicRequest,
) -> Answer<pb::TopicInfo> {
    if let Err(e) = super::access::permit(
        shared,
        who,
        Operation::AlterTopic,
        &[Resource::Topic(&req.topic)],
    ) {
        return now(Err(e));
    }
    if let Err(e) = valid_queues(req.queues.unwrap_or(0)) {
        return now(Err(e));
    }
    let topic = match shared.topics.get(&req.topic) {
        Some(t) => t,
        None => return now(Err(Error::TopicNotFound(req.topic))),
    };
    let writer = shared.writer.clone();
    later(async move {
        match writer
            .submit(Command::AlterTopic {
                topic,
                retention_ms: req.retention_ms,
                retention_bytes: req.retention_bytes,
                queues: req.queues,
            })
            .await?
        {
            Outcome::Topic(t) => Ok(topic_info(&t)),
            other => Err(Error::Internal(format!("alter topic gave {other:?}"))),
        }
    })
}

/// One page of topics, by name, with what each takes on disk and its oldest message.
pub fn list_topics(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::ListTopicsRequest,
) -> Answer<pb::ListTopicsOk> {
    if let Err(e) =
        super::access::permit(shared, who, Operation::ListTopics, &[Resource::Topic("")])
    {
        return now(Err(e));
    }
    let mut all = shared.topics.all();
    all.retain(|t| t.name > req.after);
    all.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    all.truncate(super::page(req.limit));
    let storage = shared.storage.clone();
    later(async move {
        let topics = super::blocking(&storage, move |s| {
            all.iter()
                .map(|t| {
                    let (bytes, oldest_ms) = s.topic_usage(t.id, t.start(), t.end())?;
                    Ok(pb::TopicInfo {
                        bytes,
                        oldest_ms,
                        ..topic_info(t)
                    })
                })
                .collect()
        })
        .await?;
        Ok(pb::ListTopicsOk { topics })
    })
}

/// One page of (group, topic) rows, from the stored cursors (cheap: no group is loaded to
/// answer).
pub fn list_groups(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::ListGroupsRequest,
) -> Answer<pb::ListGroupsOk> {
    if let Err(e) =
        super::access::permit(shared, who, Operation::ListGroups, &[Resource::Group("")])
    {
        return now(Err(e));
    }
    let after = if req.after_group.is_empty() {
        None
    } else {
        match shared.groups.existing_topic(&req.after_topic) {
            Ok(t) => Some((req.after_group, t.id)),
            Err(e) => return now(Err(e)),
        }
    };
    let shared = shared.clone();
    later(async move {
        let groups = group_summaries(&shared, after, super::page(req.limit)).await?;
        Ok(pb::ListGroupsOk { groups })
    })
}

async fn group_summaries(
    shared: &Arc<Shared>,
    after: Option<(String, u32)>,
    limit: usize,
) -> crate::error::Result<Vec<pb::GroupSummary>> {
    let storage = shared.storage.clone();
    let cursors = tokio::task::spawn_blocking(move || storage.cursors_after(after, limit))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    Ok(cursors
        .into_iter()
        .filter_map(|(group, topic_id, cursor)| {
            let topic = shared.topics.by_id(topic_id)?;
            let next_offset = topic.end();
            Some(pb::GroupSummary {
                group,
                topic: topic.name.clone(),
                next_offset,
                ack_floor: cursor.ack_floor,
                lag: next_offset.saturating_sub(cursor.ack_floor),
            })
        })
        .collect())
}

/// Broker-wide figures.
pub fn stats(shared: &Arc<Shared>, who: &Principal) -> Answer<pb::StatsOk> {
    if let Err(e) = super::access::permit(shared, who, Operation::Stats, &[Resource::Cluster]) {
        return now(Err(e));
    }
    let shared = shared.clone();
    later(async move {
        let storage = shared.storage.clone();
        let groups = tokio::task::spawn_blocking(move || storage.count_groups())
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let topics = shared.topics.all();
        let m = &shared.metrics;
        let resolved = |outcome: &str| m.transactions_resolved.with_label_values(&[outcome]).get();
        Ok(pb::StatsOk {
            broker_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: m.uptime().as_millis() as u64,
            connections: m.connections.get().max(0) as u64,
            topics: topics.len() as u64,
            messages: topics.iter().map(|t| t.end()).sum(),
            groups,
            half_messages_pending: m.half_messages_pending.get().max(0) as u64,
            messages_sent: m.messages_sent.get(),
            commits: resolved("commit"),
            rollbacks: resolved("rollback"),
            discarded: m.transactions_discarded.get(),
            deliveries: m.deliveries.get(),
            acks: m.acks.get(),
            dead_letters: m.dead_letters.get(),
        })
    })
}

/// A group's state on each topic it consumes.
pub fn describe_group(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::DescribeGroupRequest,
) -> Answer<pb::DescribeGroupOk> {
    if let Err(e) = super::access::permit(
        shared,
        who,
        Operation::DescribeGroup,
        &[Resource::Group(&req.group)],
    ) {
        return now(Err(e));
    }
    if let Err(e) = super::name("group", &req.group) {
        return now(Err(e));
    }
    let shared = shared.clone();
    later(async move {
        let mut topics = Vec::new();
        for topic in shared.groups.topics_of(&req.group).await? {
            let (reply, rx) = oneshot::channel();
            shared
                .groups
                .send(&req.group, topic, QueueMsg::Describe { reply })
                .await?;
            topics.push(rx.await.map_err(|_| Error::ShuttingDown)?);
        }
        if topics.is_empty() {
            return Err(Error::Invalid(format!(
                "group {:?} has never subscribed to anything",
                req.group
            )));
        }
        Ok(pb::DescribeGroupOk {
            group: req.group,
            topics,
        })
    })
}

/// A group's dead letters, with their messages.
pub fn list_dead_letters(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::ListDeadLettersRequest,
) -> Answer<pb::ListDeadLettersOk> {
    if let Err(e) = super::access::permit(
        shared,
        who,
        Operation::ListDeadLetters,
        &[Resource::Group(&req.group), Resource::Topic("")],
    ) {
        return now(Err(e));
    }
    if let Err(e) = super::name("group", &req.group) {
        return now(Err(e));
    }
    let shared = shared.clone();
    later(async move {
        let limit = super::page(req.limit);
        let mut topics = shared.groups.topics_of(&req.group).await?;
        topics.sort_unstable_by_key(|t| t.id);
        let after = if req.after_topic.is_empty() {
            None
        } else {
            let t = shared.groups.existing_topic(&req.after_topic)?;
            Some((t.id, req.after_offset))
        };
        let storage = shared.storage.clone();
        let group = req.group.clone();
        // Each carries its body: a page of 1,000 of 4 MiB would be 4 GiB in one frame.
        let budget = shared.config.max_frame_len / 2;
        let page = tokio::task::spawn_blocking(move || -> Result<pb::ListDeadLettersOk> {
            let mut out = Vec::new();
            let mut bytes = 0;
            for t in topics {
                let from = match after {
                    Some((id, _)) if t.id < id => continue,
                    Some((id, offset)) if t.id == id => offset.checked_add(1),
                    _ => Some(0),
                };
                let Some(from) = from else { continue };
                let page = storage.dead_letters_from(&group, t.id, from, limit - out.len())?;
                for (offset, rec) in page {
                    let dead_letter = pb::DeadLetter {
                        group: group.clone(),
                        message: storage.read_message(t.id, offset)?,
                        reason: rec.reason,
                        attempts: rec.attempts,
                        dead_ms: rec.dead_ms,
                        topic: t.name.clone(),
                        offset,
                    };
                    bytes += dead_letter.encoded_len() + 8;
                    // One always goes, whatever its size: a message fits in a frame.
                    if bytes > budget && !out.is_empty() {
                        return Ok(pb::ListDeadLettersOk {
                            dead_letters: out,
                            more: true,
                        });
                    }
                    out.push(dead_letter);
                }
                if out.len() >= limit {
                    return Ok(pb::ListDeadLettersOk {
                        dead_letters: out,
                        more: true,
                    });
                }
            }
            Ok(pb::ListDeadLettersOk {
                dead_letters: out,
                more: false,
            })
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        Ok(page)
    })
}

/// Moves a group's position on a topic to the earliest or latest message, an offset, or
/// the first message stored at or after a time (a binary search over the time-ordered
/// log, not a scan).
pub fn reset_group(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::ResetGroupRequest,
) -> Answer<pb::ResetGroupOk> {
    if let Err(e) = super::access::permit(
        shared,
        who,
        Operation::ResetGroup,
        &[Resource::Group(&req.group)],
    ) {
        return now(Err(e));
    }
    if let Err(e) = super::name("group", &req.group) {
        return now(Err(e));
    }
    let topic = match shared.groups.existing_topic(&req.topic) {
        Ok(t) => t,
        Err(e) => return now(Err(e)),
    };
    let shared = shared.clone();
    later(async move {
        use pb::reset_group_request::To;
        let to = match req.to {
            Some(To::Earliest(_)) => topic.start(),
            Some(To::Latest(_)) => topic.end(),
            Some(To::Offset(o)) => o,
            Some(To::TimeMs(at)) => {
                let (storage, tid, start, end) =
                    (shared.storage.clone(), topic.id, topic.start(), topic.end());
                tokio::task::spawn_blocking(move || {
                    storage.first_stored_at_or_after(tid, start, end, at)
                })
                .await
                .map_err(|e| Error::Internal(e.to_string()))??
            }
            None => {
                return Err(Error::Invalid(
                    "a reset needs a target: earliest, latest, an offset or a time".into(),
                ));
            }
        };
        let (reply, rx) = oneshot::channel();
        let msg = QueueMsg::Reset { to, reply };
        shared.groups.send_existing(&req.group, topic, msg).await?;
        let offset = rx.await.map_err(|_| Error::ShuttingDown)??;
        Ok(pb::ResetGroupOk { offset })
    })
}

/// Puts a group's dead letters (or one of them) back for delivery.
pub fn redrive(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::RedriveRequest,
) -> Answer<pb::RedriveOk> {
    if let Err(e) = super::access::permit(
        shared,
        who,
        Operation::Redrive,
        &[Resource::Group(&req.group)],
    ) {
        return now(Err(e));
    }
    if let Err(e) = super::name("group", &req.group) {
        return now(Err(e));
    }
    let shared = shared.clone();
    later(async move {
        let mut redriven = 0;
        let message_id = (!req.message_id.is_empty()).then_some(req.message_id);
        for topic in shared.groups.topics_of(&req.group).await? {
            let (reply, rx) = oneshot::channel();
            let msg = QueueMsg::Redrive {
                message_id: message_id.clone(),
                reply,
            };
            shared.groups.send(&req.group, topic, msg).await?;
            redriven += rx.await.map_err(|_| Error::ShuttingDown)??;
        }
        Ok(pb::RedriveOk { redriven })
    })
}
