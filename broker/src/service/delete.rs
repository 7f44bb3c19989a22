//! Deleting a topic or a consumer group, with everything that refers to it.

use std::sync::Arc;

use tokio::sync::oneshot;
use txmq_protocol::pb::{self, TxnOutcome};

use super::Shared;
use super::access::{Operation, Resource};
use super::{Answer, Principal, blocking, later, now};
use crate::delivery::QueueMsg;
use crate::error::{Error, Result};
use crate::ids::Id;
use crate::storage::records::DeletedTopicRecord;
use crate::storage::writer::{Command, Op, Outcome};
use crate::storage::{Cf, keys};
use crate::txn::state::Resolver;

/// Deletes a topic: its log, every group's state on it, its scheduled messages not yet
/// due; with `force`, also while transactions on it are open (they are rolled back) or
/// consumers are subscribed (they are dropped).
///
/// The writer deletes the topic in one write: its record and log go, it is marked
/// deleted (no queue starts for it again; a send under its name makes a new topic), and
/// a record of the deletion says its cleanup is pending. The cleanup ([`clean_up`]) then
/// runs as a task of its own, which a client going away does not stop, and which every
/// start of the broker runs again until the record says it is done.
pub fn delete_topic(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::DeleteTopicRequest,
) -> Answer<pb::DeleteTopicOk> {
    if let Err(e) = super::access::permit(
        shared,
        who,
        Operation::DeleteTopic,
        &[Resource::Topic(&req.topic)],
    ) {
        return now(Err(e));
    }
    if let Err(e) = super::name("topic", &req.topic) {
        return now(Err(e));
    }
    let Some(topic) = shared.topics.get(&req.topic) else {
        return now(Err(Error::TopicNotFound(req.topic)));
    };
    let shared = shared.clone();
    later(async move {
        let name = topic.name.clone();
        let mut checked_below = None;
        if !req.force {
            // Every transaction made before `mark` is written once the barrier (an empty
            // write, answered after every write before it) returns: the scan below sees
            // them all, and the deletion's own step looks only at later ones.
            // (Transactions have secret ids: the mark is of the same kind.)
            let mark = shared.ids.secret_mark();
            shared.writer.submit(Command::Raw(Vec::new())).await?;
            checked_below = Some(mark);
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
                force: req.force,
                checked_below,
            })
            .await?
        {
            Outcome::TopicDeleted { messages, fence } => (messages, fence),
            other => return Err(Error::Internal(format!("delete topic gave {other:?}"))),
        };
        // A fault point of debug builds: the broker stops here as if killed, the topic
        // deleted and its cleanup not begun (what a test kills it at).
        #[cfg(debug_assertions)]
        if std::env::var_os("TXMQ_FAULT_HALT_AFTER_TOPIC_DELETE").is_some() {
            tracing::warn!("fault point: halting after the deletion of {name:?}");
            std::future::pending::<()>().await;
        }
        let record = DeletedTopicRecord {
            name: name.clone(),
            fence: fence.to_bytes().to_vec(),
            force: req.force,
            ..Default::default()
        };
        let cleanup = shared
            .tasks
            .spawn(clean_up(shared.clone(), topic.id, record));
        let done = cleanup
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        tracing::info!(topic = %name, messages, groups = done.groups, rolled_back = done.rolled_back, scheduled_cancelled = done.cancelled, "topic deleted");
        Ok(pb::DeleteTopicOk {
            messages,
            groups: done.groups,
            rolled_back: done.rolled_back,
            scheduled_cancelled: done.cancelled,
        })
    })
}

/// Runs the cleanups of deleted topics that a stop of the broker interrupted.
pub async fn resume_cleanups(shared: &Arc<Shared>) {
    let pending = match blocking(&shared.storage, |s| s.deleted_topic_records()).await {
        Ok(all) => all.into_iter().filter(|(_, r)| !r.cleaned),
        Err(e) => {
            tracing::error!("could not read the deleted topics: {e}");
            return;
        }
    };
    for (id, record) in pending {
        tracing::info!(topic = %record.name, "resuming the cleanup of a deleted topic");
        let shared2 = shared.clone();
        shared.tasks.spawn(async move {
            let name = record.name.clone();
            if let Err(e) = clean_up(shared2, id, record).await {
                tracing::warn!(topic = %name, "cleanup of a deleted topic failed (retried at the next start): {e}");
            }
        });
    }
}

/// What a deleted topic's cleanup did.
#[derive(Debug, Default)]
pub struct Cleaned {
    /// Groups whose state on it went.
    pub groups: u32,
    /// Open transactions rolled back.
    pub rolled_back: u32,
    /// Scheduled messages cancelled.
    pub cancelled: u32,
}

/// Most commands in one write of a cleanup.
const CLEANUP_CHUNK: usize = 1024;

/// Removes what still refers to a deleted topic: the state of every group on it (queues
/// that ran for it are stopped first; none can start again), its scheduled messages and,
/// when it was forced, its open transactions, both only those made before the deletion
/// (later ones belong to a new topic of that name). Each step may be repeated; once all
/// are done, the deletion's record says so, and the log's range is compacted.
pub async fn clean_up(shared: Arc<Shared>, id: u32, record: DeletedTopicRecord) -> Result<Cleaned> {
    let fence = Id::from_bytes(&record.fence)
        .ok_or_else(|| Error::Internal(format!("deleted topic {id} has no fence")))?;
    let running = shared.groups.running_on(id);
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
    let stored = blocking(&shared.storage, move |s| s.groups_on(id)).await?;
    for chunk in stored.chunks(CLEANUP_CHUNK) {
        let mut ops = Vec::new();
        for group in chunk {
            let prefix = keys::cursor(group, id);
            let end = keys::prefix_end(&prefix).expect("a group name is not all 0xff");
            ops.push(Op::Delete(Cf::Cursor, prefix.clone()));
            for cf in [Cf::Acked, Cf::Retry, Cf::Dlq, Cf::Attempts] {
                ops.push(Op::DeleteRange(cf, prefix.clone(), end.clone()));
            }
        }
        shared.writer.submit(Command::Raw(ops)).await?;
    }
    names.extend(stored);
    names.sort_unstable();
    names.dedup();
    let name = record.name.clone();
    let waiting = blocking(&shared.storage, move |s| {
        s.waiting_scheduled_on(&name, fence)
    })
    .await?;
    let cancels = waiting
        .into_iter()
        .map(|id| Command::CancelScheduled { id });
    let cancelled = submit_chunks(&shared, cancels.collect()).await?;
    let rolled_back = if record.force {
        let name = record.name.clone();
        let open = blocking(&shared.storage, move |s| s.open_txns_on(&name)).await?;
        let ends = open
            .into_iter()
            .filter(|t| *t < fence)
            .map(|txn| Command::End {
                txn,
                outcome: TxnOutcome::Rollback,
                by: Resolver::Operator,
            });
        submit_chunks(&shared, ends.collect()).await?
    } else {
        0
    };
    let labels = [record.name.as_str()];
    let _ = shared.metrics.topic_bytes.remove_label_values(&labels);
    let _ = shared
        .metrics
        .topic_oldest_age_seconds
        .remove_label_values(&labels);
    shared
        .writer
        .submit(Command::FinishDeletion { id, record })
        .await?;
    // The space comes back once the files that held the log are rewritten.
    blocking(&shared.storage, move |s| {
        s.compact_log(id, u64::MAX);
        Ok(())
    })
    .await?;
    Ok(Cleaned {
        groups: names.len() as u32,
        rolled_back,
        cancelled,
    })
}

/// Submits commands in writes of [`CLEANUP_CHUNK`]; returns how many did something (a
/// cancel that cancelled, a rollback that was not already the transaction's state).
async fn submit_chunks(shared: &Arc<Shared>, mut cmds: Vec<Command>) -> Result<u32> {
    let mut done = 0;
    while !cmds.is_empty() {
        let rest = cmds.split_off(cmds.len().min(CLEANUP_CHUNK));
        let chunk = std::mem::replace(&mut cmds, rest);
        if let Outcome::Many(outcomes) = shared.writer.submit(Command::Many(chunk)).await? {
            done += outcomes
                .iter()
                .filter(|o| {
                    matches!(
                        o,
                        Ok(Outcome::Cancelled { .. }
                            | Outcome::Ended {
                                repeated: false,
                                ..
                            })
                    )
                })
                .count() as u32;
        }
    }
    Ok(done)
}

/// Deletes a group on every topic it has a position on, once none of its consumers is
/// connected (checked on all of them first).
pub fn delete_group(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::DeleteGroupRequest,
) -> Answer<pb::DeleteGroupOk> {
    if let Err(e) = super::access::permit(
        shared,
        who,
        Operation::DeleteGroup,
        &[Resource::Group(&req.group)],
    ) {
        return now(Err(e));
    }
    if let Err(e) = super::name("group", &req.group) {
        return now(Err(e));
    }
    let shared = shared.clone();
    later(async move {
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
        Ok(pb::DeleteGroupOk {
            topics: topics.len() as u32,
        })
    })
}
