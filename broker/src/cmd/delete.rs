//! Deleting a topic or a consumer group, with everything that refers to it.

use std::sync::Arc;

use tokio::sync::oneshot;
use txmq_protocol::pb::{self, TxnOutcome};

use super::Shared;
use super::{Pending, blocking, later, ready};
use crate::delivery::QueueMsg;
use crate::error::{Error, Result};
use crate::ids::Id;
use crate::storage::writer::{Command, Op, Outcome};
use crate::storage::{Cf, keys};
use crate::txn::state::Resolver;

/// Deletes a topic: its log, every group's state on it, its scheduled messages not yet
/// due; with `force`, also while transactions on it are open (they are rolled back) or
/// consumers are subscribed (they are dropped).
///
/// The order makes it whole: once the writer has deleted the topic it is marked deleted,
/// no queue starts for it again and a send under its name makes a new topic; then the
/// queues that ran for it are stopped and every cursor still under its id is removed.
pub fn delete_topic(id: u64, req: pb::DeleteTopicRequest, shared: &Arc<Shared>) -> Pending {
    if let Err(e) = super::name("topic", &req.topic) {
        return ready(id, Err(e));
    }
    let Some(topic) = shared.topics.get(&req.topic) else {
        return ready(id, Err(Error::TopicNotFound(req.topic)));
    };
    let shared = shared.clone();
    later(id, async move {
        let name = topic.name.clone();
        if !req.force {
            let n = name.clone();
            let open = blocking(&shared.storage, move |s| s.open_txns_on(&n)).await?;
            if let Some(first) = open.first() {
                return Err(Error::Invalid(format!(
                    "{} open transaction(s) have messages for topic {name:?} (the first: \
                     {first}): resolve them (txmq txn commit|rollback), or delete with \
                     --force to roll them back",
                    open.len()
                )));
            }
            for (group, queue) in shared.groups.running_on(topic.id) {
                let (reply, rx) = oneshot::channel();
                if queue.send(QueueMsg::Describe { reply }).await.is_err() {
                    continue;
                }
                let Ok(info) = rx.await else { continue };
                if info.consumers > 0 {
                    return Err(Error::Invalid(format!(
                        "group {group:?} has {} consumer(s) on topic {name:?}: stop them, or \
                         delete with --force to drop them",
                        info.consumers
                    )));
                }
            }
        }
        let (messages, fence) = match shared
            .writer
            .submit(Command::DeleteTopic {
                topic: topic.clone(),
            })
            .await?
        {
            Outcome::TopicDeleted { messages, fence } => (messages, fence),
            other => return Err(Error::Internal(format!("delete topic gave {other:?}"))),
        };
        // No queue starts for it any more: stop those that ran, then remove what any
        // group still kept under its id.
        let running = shared.groups.running_on(topic.id);
        let mut names: Vec<String> = running.iter().map(|(g, _)| g.clone()).collect();
        for (_, queue) in running {
            let (reply, rx) = oneshot::channel();
            if queue
                .send(QueueMsg::Delete { force: true, reply })
                .await
                .is_ok()
            {
                let _ = rx.await;
            }
        }
        let tid = topic.id;
        let groups = blocking(&shared.storage, move |s| s.groups_on(tid)).await?;
        if !groups.is_empty() {
            let mut ops = Vec::new();
            for group in &groups {
                let prefix = keys::cursor(group, tid);
                let end = keys::prefix_end(&prefix).expect("a group name is not all 0xff");
                ops.push(Op::Delete(Cf::Cursor, prefix.clone()));
                for cf in [Cf::Acked, Cf::Retry, Cf::Dlq] {
                    ops.push(Op::DeleteRange(cf, prefix.clone(), end.clone()));
                }
            }
            shared.writer.submit(Command::Raw(ops)).await?;
        }
        names.extend(groups);
        names.sort_unstable();
        names.dedup();
        let scheduled_cancelled = cancel_scheduled(&shared, &name, fence).await?;
        let rolled_back = if req.force {
            roll_back_open(&shared, &name, fence).await?
        } else {
            0
        };
        let _ = shared
            .metrics
            .topic_bytes
            .remove_label_values(&[name.as_str()]);
        let _ = shared
            .metrics
            .topic_oldest_age_seconds
            .remove_label_values(&[name.as_str()]);
        // The space comes back once the files that held the log are rewritten.
        let storage = shared.storage.clone();
        tokio::task::spawn_blocking(move || storage.compact_log(tid, u64::MAX));
        tracing::info!(topic = %name, messages, groups = names.len(), rolled_back, scheduled_cancelled, "topic deleted");
        Ok(pb::response::Result::DeleteTopic(pb::DeleteTopicOk {
            messages,
            groups: names.len() as u32,
            rolled_back,
            scheduled_cancelled,
        }))
    })
}

/// Cancels the scheduled messages for a deleted topic that were made before it was
/// deleted (later ones are for a new topic of that name).
async fn cancel_scheduled(shared: &Arc<Shared>, name: &str, fence: Id) -> Result<u32> {
    let n = name.to_string();
    let waiting = blocking(&shared.storage, move |s| s.waiting_scheduled_on(&n, fence)).await?;
    let mut cancelled = 0;
    for id in waiting {
        // One delivered meanwhile went to a new topic of that name: not ours to undo.
        if shared
            .writer
            .submit(Command::CancelScheduled { id })
            .await
            .is_ok()
        {
            cancelled += 1;
        }
    }
    Ok(cancelled)
}

/// Rolls back the open transactions with messages for a deleted topic, made before it
/// was deleted.
async fn roll_back_open(shared: &Arc<Shared>, name: &str, fence: Id) -> Result<u32> {
    let n = name.to_string();
    let open = blocking(&shared.storage, move |s| s.open_txns_on(&n)).await?;
    let mut rolled_back = 0;
    for txn in open.into_iter().filter(|t| *t < fence) {
        let end = Command::End {
            txn,
            outcome: TxnOutcome::Rollback,
            by: Resolver::Operator,
        };
        // One resolved meanwhile stays as it was resolved.
        if let Ok(Outcome::Ended {
            repeated: false, ..
        }) = shared.writer.submit(end).await
        {
            rolled_back += 1;
        }
    }
    Ok(rolled_back)
}

/// Deletes a group on every topic it has a position on, once none of its consumers is
/// connected (checked on all of them first).
pub fn delete_group(id: u64, req: pb::DeleteGroupRequest, shared: &Arc<Shared>) -> Pending {
    if let Err(e) = super::name("group", &req.group) {
        return ready(id, Err(e));
    }
    let shared = shared.clone();
    later(id, async move {
        let topics = shared.groups.topics_of(&req.group).await?;
        if topics.is_empty() {
            return Err(Error::GroupNotFound(req.group.clone(), "any".into()));
        }
        for topic in &topics {
            let (reply, rx) = oneshot::channel();
            let msg = QueueMsg::Describe { reply };
            shared.groups.send(&req.group, topic.clone(), msg).await?;
            let info = rx.await.map_err(|_| Error::ShuttingDown)?;
            if info.consumers > 0 {
                return Err(Error::Invalid(format!(
                    "group {:?} has {} consumer(s) on topic {:?}: stop them before deleting it",
                    req.group, info.consumers, topic.name
                )));
            }
        }
        for topic in &topics {
            let (reply, rx) = oneshot::channel();
            let msg = QueueMsg::Delete {
                force: false,
                reply,
            };
            shared.groups.send(&req.group, topic.clone(), msg).await?;
            rx.await.map_err(|_| Error::ShuttingDown)??;
        }
        Ok(pb::response::Result::DeleteGroup(pb::DeleteGroupOk {
            topics: topics.len() as u32,
        }))
    })
}
