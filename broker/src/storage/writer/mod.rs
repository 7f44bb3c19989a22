//! The one writer: a dedicated thread that owns the RocksDB write path.
//!
//! Requests arrive as [`Command`]s on a bounded channel. The writer takes every command
//! waiting (up to a batch limit), stages all of them into one `WriteBatch` and writes it
//! to the WAL and memtable without a sync. A second thread, the syncer, then fsyncs the WAL
//! once for every batch written meanwhile (flush `sync`) and only then answers each request
//! and makes the new messages visible to consumers: group commit, pipelined, so the writer
//! stages the next batch while the disk syncs the last. Because one thread assigns offsets
//! and checks transaction states, two requests can never race: a commit and a rollback of
//! the same transaction in one batch see each other through the batch's overlay, and the
//! loser is refused. Answers leave in batch order, so no answer (even "already committed")
//! can overtake the fsync of the write it depends on.
//!
//! ```text
//!  connections ──Command──▶ [ channel ] ──▶ writer: stage → write ──▶ syncer: fsync → reply
//!                                                                          └─▶ topic ends move
//! ```

mod clock;
mod command;
mod handle;
mod recent;
mod replicate;
mod scheduled;
mod sync;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_dedup;
mod topics;
mod txns;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rocksdb::{WriteBatch, WriteOptions};
use rustc_hash::FxHashMap;
use tokio::sync::mpsc;
use txmq_protocol::pb;

use super::records::{SchedRecord, TxnRecord};
use super::{StorageHandle, dedup};
use crate::config::{Config, FlushMode};
use crate::error::{Error, Result};
use crate::ids::{Id, IdGen};
use crate::metrics::Metrics;
use crate::topics::{Topic, Topics};
use crate::txn::state;

pub use command::{Command, Op, Outcome, txn_state_name};
use handle::Job;
pub use handle::{WriterHandle, WriterThread};
use recent::Recent;
pub use replicate::Replicator;
use sync::{Tally, Written, sync_loop};

/// Most commands folded into one write batch.
const MAX_BATCH: usize = 4096;
/// Most bytes (bodies and raw values, roughly) folded into one write batch; a single
/// larger command still makes a batch of its own.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// The writer thread's state.
pub struct Writer {
    storage: StorageHandle,
    topics: Arc<Topics>,
    ids: Arc<IdGen>,
    config: Arc<Config>,
    /// Next offset per topic id, including writes not yet published.
    next_offset: FxHashMap<u32, u64>,
    next_topic_id: u32,
    write_opts: WriteOptions,
    metrics: Arc<Metrics>,
    /// Batches written but not yet synced, in order, to the syncer thread.
    syncer: std::sync::mpsc::Sender<Written>,
    /// Open transactions as last written, so resolving one reads nothing.
    recent: Recent,
    /// Topics deleted whose cleanup is not done, by name, with their fences and whether
    /// the deletion was forced. What was made before the fence belongs to the deleted
    /// topic: a scheduled message of it that comes due meanwhile is cancelled, not
    /// delivered into a new topic of that name; and (forced) a commit of one of its
    /// transactions is refused while the cleanup rolls them back.
    doomed: FxHashMap<String, (Id, bool)>,
    /// A broker group's leader sends its batches here instead of writing them.
    replicator: Option<Replicator>,
    /// Every time the writer stores; it never goes backwards.
    clock: clock::WallClock,
}

impl Writer {
    /// Starts the writer thread. It runs until every [`WriterHandle`] is dropped, then
    /// flushes the write-ahead log and exits; [`WriterThread::join`] waits for that.
    pub fn spawn(
        storage: StorageHandle,
        topics: Arc<Topics>,
        ids: Arc<IdGen>,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
    ) -> (WriterHandle, WriterThread) {
        Self::spawn_with(storage, topics, ids, config, metrics, None)
    }

    /// [`Writer::spawn`] for a broker group's leader: every batch goes through
    /// `replicator` (the Raft log, fsynced by a majority) and is applied by the state
    /// machine; the syncer then only publishes and replies.
    pub fn spawn_with(
        storage: StorageHandle,
        topics: Arc<Topics>,
        ids: Arc<IdGen>,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        replicator: Option<Replicator>,
    ) -> (WriterHandle, WriterThread) {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 2);
        let next_offset = topics.all().iter().map(|t| (t.id, t.end())).collect();
        // Writes go to the WAL without a sync; the syncer thread fsyncs once for every
        // batch written meanwhile, while this thread already applies the next batch.
        let write_opts = WriteOptions::default();
        let (syncer, synced) = std::sync::mpsc::channel();
        let syncer_thread = {
            let (storage, topics, metrics) = (storage.clone(), topics.clone(), metrics.clone());
            // Replicated, the Raft log is the durable copy (fsynced by a majority before
            // the batch is applied here).
            let fsync = config.flush == FlushMode::Sync && replicator.is_none();
            std::thread::Builder::new()
                .name("txmq-syncer".into())
                .spawn(move || sync_loop(&synced, &storage, &topics, &metrics, fsync))
                .expect("spawn syncer thread")
        };
        let doomed = storage
            .deleted_topic_records()
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, r)| !r.cleaned)
            .filter_map(|(_, r)| Some((r.name, (Id::from_bytes(&r.fence)?, r.force))))
            .collect();
        let mut writer = Writer {
            // Set on the writer's thread (it reads a message per topic).
            clock: clock::WallClock::after(0),
            next_topic_id: (topics.max_id() + 1).max(storage.next_topic_id()),
            storage,
            topics,
            ids,
            config,
            next_offset,
            write_opts,
            metrics,
            syncer,
            recent: Recent::default(),
            doomed,
            replicator,
        };
        let thread = std::thread::Builder::new()
            .name("txmq-writer".into())
            .spawn(move || {
                let storage = writer.storage.clone();
                writer.clock = clock::WallClock::after_stored(&writer.storage, &writer.topics);
                writer.run(rx);
                // The writer is gone, so its sender is: the syncer answers what is left.
                let _ = syncer_thread.join();
                if let Err(e) = storage.db().flush_wal(true) {
                    tracing::error!("final WAL flush failed: {e}");
                }
                tracing::debug!("writer stopped");
            })
            .expect("spawn writer thread");
        (WriterHandle { tx }, WriterThread(Some(thread)))
    }

    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut jobs = Vec::with_capacity(MAX_BATCH);
        // A job taken that did not fit in the last batch's bytes: it opens the next one.
        let mut carried: Option<Job> = None;
        loop {
            if jobs.is_empty() {
                let first = match carried.take() {
                    Some(job) => job,
                    None => match rx.blocking_recv() {
                        Some(job) => job,
                        None => return,
                    },
                };
                jobs.push(first);
            }
            let mut bytes: usize = jobs.iter().map(Job::bytes).sum();
            while carried.is_none() && jobs.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(job) => {
                        bytes += job.bytes();
                        if bytes > MAX_BATCH_BYTES {
                            carried = Some(job);
                            break;
                        }
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
            // What did not fit in the batch once staged (commits copy their halves into
            // it) opens the next one.
            self.commit(&mut jobs);
        }
    }

    /// One batch. Every job taken leaves in exactly one of three ways (see [`Job`]):
    /// - refused before anything is staged (a sticky storage failure, or a deposed
    ///   leader's writer), answered at once: it wrote nothing and reads nothing;
    /// - staged, then handed with its result to the syncer, which answers it once the
    ///   batch is durable (or with the failure that made it not);
    /// - not staged (the batch reached its byte cap first; or the rest of a `Many` cut
    ///   short), left in `jobs` to open the next batch.
    fn commit(&mut self, jobs: &mut Vec<Job>) {
        if let Some(refusal) = self.refusal() {
            for job in jobs.drain(..) {
                job.answer(Err(refusal.clone()));
            }
            return;
        }
        // (Drained, not taken: the vector keeps its capacity for the next batch.)
        let (staged, rest) = self.stage(jobs.drain(..));
        let written = self.write(staged);
        // Every batch goes through the syncer, even one that wrote nothing: its answers
        // may depend on an earlier batch (a repeated commit), which must be durable first.
        if let Err(std::sync::mpsc::SendError(w)) = self.syncer.send(written) {
            for (job, _) in w.answers {
                job.answer(Err(Error::ShuttingDown));
            }
        }
        jobs.extend(rest);
    }

    /// Why no job may be staged now, if one may not: both are sticky.
    fn refusal(&self) -> Option<Error> {
        if let Some(why) = self.storage.failure() {
            // After a failed sync this database's memory may be ahead of its disk.
            return Some(Error::StorageFailed(why));
        }
        if self
            .replicator
            .as_ref()
            .is_some_and(|r| r.deposed.is_cancelled())
        {
            // What this writer holds in memory may be behind the new leader.
            return Some(Error::NotLeader(None));
        }
        None
    }

    /// Stages `jobs` in order into one batch until it holds [`MAX_BATCH_BYTES`]: the
    /// staged jobs with their results, and the jobs left for the next batch (first the
    /// rest of a `Many` cut short, carrying its outcomes and its reply).
    fn stage(&mut self, mut jobs: impl ExactSizeIterator<Item = Job>) -> (Staged, Vec<Job>) {
        let mut stage = Stage::default();
        let mut answers = Vec::with_capacity(jobs.len());
        let mut rest = Vec::new();
        for mut job in jobs.by_ref() {
            let result = match job.take() {
                (Command::Many(cmds), mut outcomes) => {
                    let unstaged = self.apply_many(cmds, &mut outcomes, &mut stage);
                    if !unstaged.is_empty() {
                        rest.push(job.continued(unstaged, outcomes));
                        break;
                    }
                    Ok(Outcome::Many(outcomes))
                }
                (cmd, _) => {
                    let before = stage.batch.len();
                    let result = self.apply(cmd, &mut stage);
                    debug_assert!(result.is_ok() || stage.batch.len() == before);
                    result
                }
            };
            answers.push((job, result));
            // The cap holds for what was staged, not only for what was asked: a commit
            // copies all its half messages into the batch.
            if stage.batch.size_in_bytes() > MAX_BATCH_BYTES {
                break;
            }
        }
        rest.extend(jobs);
        (Staged { stage, answers }, rest)
    }

    /// Writes a staged batch once (no sync): on success its effects on memory are kept
    /// (published by the syncer once durable); on failure memory stays as before the
    /// batch and every result that wrote becomes the failure.
    fn write(&mut self, staged: Staged) -> Written {
        let Staged { mut stage, answers } = staged;
        let wrote = !stage.batch.is_empty();
        let write = if wrote {
            let started = std::time::Instant::now();
            let w = match &self.replicator {
                None => self
                    .storage
                    .db()
                    .write_opt(std::mem::take(&mut stage.batch), &self.write_opts)
                    .map_err(Error::Storage),
                Some(r) => r
                    .replicate(&stage.batch)
                    .map_err(|_| Error::NotLeader(None)),
            };
            if w.is_ok() {
                self.metrics
                    .write_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.batch_requests.observe(answers.len() as f64);
                let c = &self.storage.counters;
                c.batches.fetch_add(1, Ordering::Relaxed);
                c.jobs.fetch_add(answers.len() as u64, Ordering::Relaxed);
            }
            w
        } else {
            Ok(())
        };
        match write {
            Ok(()) => {
                for topic in stage.new_topics {
                    self.topics.insert(topic);
                }
                for topic in &stage.deleted {
                    self.topics.remove(topic);
                }
                // The indexes' floors move once this is durable (the syncer): a
                // compaction before that must not drop what a crash would bring back.
                let mut floors = Vec::new();
                for (topic, start) in stage.starts {
                    topic.set_start(start);
                    floors.push((topic.id, start));
                }
                floors.extend(stage.deleted.iter().map(|t| (t.id, u64::MAX)));
                self.recent.update(stage.txns, stage.halves);
                let ends: Vec<(u32, u64)> = stage.next_offset.into_iter().collect();
                for &(id, next) in &ends {
                    self.next_offset.insert(id, next);
                }
                for topic in stage.deleted {
                    self.next_offset.remove(&topic.id);
                }
                Written {
                    answers,
                    wrote,
                    ends,
                    floors,
                    removed: stage.removed,
                    tally: stage.tally,
                }
            }
            Err(e) => {
                tracing::error!(
                    "write batch failed, {} requests refused: {e}",
                    answers.len()
                );
                self.next_topic_id = stage.first_topic_id.unwrap_or(self.next_topic_id);
                // Sticky, like a failed sync: owners of state in memory (consumer groups)
                // may have moved ahead of this write, and a later write that succeeded
                // could build on it (a floor passing a retry that was never stored). The
                // server reopens storage and everything reloads from what is on disk. (A
                // group's leader that lost its leadership stops serving instead: the
                // replicator marked it deposed.)
                if self.replicator.is_none() {
                    self.storage.fail(format!("a write failed: {e}"));
                }
                Written {
                    answers: answers
                        .into_iter()
                        .map(|(job, r)| (job, lost_in_write(r, &e)))
                        .collect(),
                    wrote: false,
                    ends: Vec::new(),
                    floors: Vec::new(),
                    removed: 0,
                    tally: Tally::default(),
                }
            }
        }
    }

    /// Stages the commands of a [`Command::Many`] in order, pushing each outcome, until the
    /// batch holds [`MAX_BATCH_BYTES`]; returns the commands left for the next batch.
    ///
    /// Ends of a coalesced batch are a few bytes each on the wire but copy whole
    /// transactions into the batch: 512 commits of 32 MiB transactions would otherwise
    /// make one write of 16 GiB.
    fn apply_many(
        &mut self,
        cmds: Vec<Command>,
        outcomes: &mut Vec<Result<Outcome>>,
        stage: &mut Stage,
    ) -> Vec<Command> {
        let mut cmds = cmds.into_iter();
        while let Some(cmd) = cmds.next() {
            let before = stage.batch.len();
            let result = self.apply(cmd, stage);
            debug_assert!(result.is_ok() || stage.batch.len() == before);
            outcomes.push(result);
            if stage.batch.size_in_bytes() > MAX_BATCH_BYTES {
                return cmds.collect();
            }
        }
        Vec::new()
    }

    fn apply(&mut self, cmd: Command, stage: &mut Stage) -> Result<Outcome> {
        match cmd {
            Command::Many(cmds) => {
                let mut outcomes = Vec::with_capacity(cmds.len());
                // Nested only by mistake: staged whole, whatever its size.
                for c in cmds {
                    outcomes.push(self.apply(c, stage));
                }
                Ok(Outcome::Many(outcomes))
            }
            Command::Append { messages, keys } => self.append(messages, &keys, stage),
            Command::Prepare {
                txn,
                group,
                messages,
                bytes,
                check_delay_ms,
            } => self.prepare(txn, group, messages, bytes, check_delay_ms, stage),
            Command::End { txn, outcome, by } => self.end(txn, outcome, by, stage),
            Command::RecordCheck {
                txn,
                counted,
                result,
                note,
                next_check_ms,
            } => self.record_check(txn, counted, result, note, next_check_ms, stage),
            Command::NoteRefusedEnd { txn, note } => {
                if let Some(mut rec) = self.txn_record(txn, stage)? {
                    rec.refused_ends = rec.refused_ends.saturating_add(1);
                    rec.refused_note = note;
                    self.put_txn(txn, rec, stage);
                }
                Ok(Outcome::Done)
            }
            Command::Discard { txn } => self.discard(txn, stage),
            Command::Deliver { id, due_ms } => self.deliver(id, due_ms, stage),
            Command::CancelScheduled { id } => self.cancel_scheduled(id, stage),
            Command::ForgetScheduled { id, due_ms } => self.forget_scheduled(id, due_ms, stage),
            Command::Rearm { txn } => self.rearm(txn, stage),
            Command::Purge { txn, due_ms } => self.purge(txn, due_ms, stage),
            Command::DropDueCheck { txn, due_ms } => {
                if !state::awaits_check(self.txn_record(txn, stage)?.as_ref(), due_ms) {
                    self.move_check(txn, due_ms, 0, stage);
                }
                Ok(Outcome::Done)
            }
            Command::CreateTopic {
                name,
                fail_if_exists,
                retention,
                queues,
            } => {
                if let Some(t) = self.topic(&name, stage) {
                    return if fail_if_exists {
                        Err(Error::TopicExists(name))
                    } else {
                        Ok(Outcome::Topic(t))
                    };
                }
                let topic = self.create_topic_capped(name, stage)?;
                if retention != (0, 0) || queues != 0 {
                    topic.set_retention(retention.0, retention.1);
                    topic.set_queues(queues);
                    self.put_topic(&topic, topic.start(), stage);
                }
                Ok(Outcome::Topic(topic))
            }
            Command::AlterTopic {
                topic,
                retention_ms,
                retention_bytes,
                queues,
            } => {
                Self::alive(&topic)?;
                // Set now (a setting is not a message: nothing waits on it); stored
                // with the batch.
                let (ms, bytes) = topic.retention();
                topic.set_retention(retention_ms.unwrap_or(ms), retention_bytes.unwrap_or(bytes));
                if let Some(q) = queues {
                    topic.set_queues(q);
                }
                self.put_topic(&topic, topic.start(), stage);
                Ok(Outcome::Topic(topic))
            }
            Command::Retain { topic, to } => self.retain(&topic, to, stage),
            Command::DeleteTopic {
                topic,
                force,
                checked_below,
            } => self.delete_topic(&topic, force, checked_below, stage),
            Command::FinishDeletion { id, record } => {
                if let Some(fence) = Id::from_bytes(&record.fence)
                    && self.doomed.get(&record.name).map(|(f, _)| f) == Some(&fence)
                {
                    self.doomed.remove(&record.name);
                }
                let done = super::records::DeletedTopicRecord {
                    cleaned: true,
                    ..record
                };
                stage.batch.put_cf(
                    self.storage.cf(super::Cf::Meta),
                    super::keys::deleted_topic(id),
                    prost::Message::encode_to_vec(&done),
                );
                Ok(Outcome::Done)
            }
            Command::Raw(ops) => {
                for op in ops {
                    match op {
                        Op::Put(cf, k, v) => stage.batch.put_cf(self.storage.cf(cf), k, v),
                        Op::Delete(cf, k) => stage.batch.delete_cf(self.storage.cf(cf), k),
                        Op::DeleteRange(cf, a, b) => {
                            stage.batch.delete_range_cf(self.storage.cf(cf), a, b);
                        }
                    }
                }
                Ok(Outcome::Done)
            }
        }
    }
}

/// What a staged result becomes when its batch could not be written or synced: whatever
/// would have been stored fails with the storage error; a refusal stays the refusal it was.
///
/// A [`Command::Many`] split over batches is answered with its last batch, and its earlier
/// outcomes go through here too if that one fails: they may be durable already, but an
/// error for a durable write is only "unknown", while an OK for a lost one would be a lie.
fn lost_in_write(result: Result<Outcome>, e: &Error) -> Result<Outcome> {
    match result {
        Ok(Outcome::Many(results)) => Ok(Outcome::Many(
            results.into_iter().map(|r| lost_in_write(r, e)).collect(),
        )),
        Ok(_) => Err(e.clone()),
        Err(refusal) => Err(refusal),
    }
}

/// A batch staged and not yet written: the jobs in it, each with its result.
struct Staged {
    stage: Stage,
    answers: Vec<(Job, Result<Outcome>)>,
}

/// One batch in the making, with an overlay of what it already changed.
#[derive(Default)]
struct Stage {
    batch: WriteBatch,
    txns: FxHashMap<Id, TxnRecord>,
    /// Transaction records this batch deletes: no later command of the batch may read
    /// them back from the database (and write them again).
    purged: rustc_hash::FxHashSet<Id>,
    halves: FxHashMap<Id, Vec<(u32, pb::StoredMessage)>>,
    /// Scheduled-message records staged (`None`: removed).
    sched: FxHashMap<Id, Option<SchedRecord>>,
    new_topics: Vec<Arc<Topic>>,
    /// Topics deleted.
    deleted: Vec<Arc<Topic>>,
    /// Messages removed (retention, deletion): their index entries are garbage.
    removed: u64,
    /// Topics whose start retention moves, once written.
    starts: Vec<(Arc<Topic>, u64)>,
    first_topic_id: Option<u32>,
    next_offset: FxHashMap<u32, u64>,
    tally: Tally,
    /// Idempotency keys stored by this batch, by topic id: a repeat within the batch
    /// (or the request) is answered with the first receipt.
    dedup: FxHashMap<Vec<u8>, (pb::MessageReceipt, dedup::Digest)>,
}
