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

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prost::Message;
use rocksdb::{WriteBatch, WriteOptions};
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot};
use txmq_protocol::pb::{self, TxnOutcome, TxnState};

use super::keys::{self, DueKind};
use super::records::{TopicRecord, TxnRecord};
use super::{Cf, Storage};
use crate::config::{Config, FlushMode};
use crate::error::{Error, Result};
use crate::ids::{Id, IdGen};
use crate::metrics::Metrics;
use crate::topics::{Topic, Topics};
use crate::txn::state::{self, Resolution, Resolver};

/// Most commands folded into one write batch.
const MAX_BATCH: usize = 4096;
/// Most bytes (bodies and raw values, roughly) folded into one write batch; a single
/// larger command still makes a batch of its own.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// A write to make.
#[derive(Debug)]
pub enum Command {
    /// Append visible messages to their topics.
    Append {
        /// The messages, already validated for size.
        messages: Vec<pb::Message>,
    },
    /// Store half messages of a new or open transaction.
    Prepare {
        /// Open transaction to add to; `None` starts one.
        txn: Option<Id>,
        /// Producer group that owns it.
        group: String,
        /// The messages.
        messages: Vec<pb::Message>,
        /// First check delay override.
        check_delay_ms: u64,
    },
    /// Commit or roll back.
    End {
        /// Which transaction.
        txn: Id,
        /// Commit or rollback (unknown only records the answer).
        outcome: TxnOutcome,
        /// Who asks: checked against the transaction's group, and recorded.
        by: Resolver,
    },
    /// Record a check attempt and move the check's due time.
    RecordCheck {
        /// Which transaction.
        txn: Id,
        /// A producer received the request: the attempt counts.
        counted: bool,
        /// The answer so far.
        result: TxnOutcome,
        /// For operators.
        note: String,
        /// When to check next (`None`: leave the schedule as it is).
        next_check_ms: Option<u64>,
    },
    /// Give up on a transaction after `check-max` attempts; it stays listed.
    Discard {
        /// Which transaction.
        txn: Id,
    },
    /// Make a discarded (or prepared) transaction due for a check now, with a fresh count.
    Rearm {
        /// Which transaction.
        txn: Id,
    },
    /// Delete a check's due entry that no prepared transaction waits on (its record is
    /// gone, resolved, or due at another time); a live entry is left alone.
    DropDueCheck {
        /// The transaction the entry names.
        txn: Id,
        /// The entry's due time.
        due_ms: u64,
    },
    /// Forget a resolved transaction whose retention ended.
    Purge {
        /// Which transaction.
        txn: Id,
        /// The due entry that triggered it.
        due_ms: u64,
    },
    /// Create a topic.
    CreateTopic {
        /// Its name, validated.
        name: String,
        /// Refuse when it exists.
        fail_if_exists: bool,
    },
    /// Plain puts and deletes prepared by an owner of other state (consumer groups).
    Raw(Vec<Op>),
    /// Several commands from one request, applied in order in the same batch; each has
    /// its own outcome ([`Outcome::Many`]), and a refused one leaves the others be.
    Many(Vec<Command>),
}

impl Command {
    /// Roughly the bytes this command writes: what bounds a write batch.
    pub fn bytes(&self) -> usize {
        let messages = |ms: &[pb::Message]| -> usize {
            ms.iter()
                .map(|m| m.body.len() + m.key.len() + m.tag.len() + 64)
                .sum()
        };
        match self {
            Command::Append { messages: ms } | Command::Prepare { messages: ms, .. } => {
                messages(ms)
            }
            Command::Raw(ops) => ops
                .iter()
                .map(|op| match op {
                    Op::Put(_, k, v) => k.len() + v.len(),
                    Op::Delete(_, k) => k.len(),
                })
                .sum(),
            Command::Many(cmds) => cmds.iter().map(Command::bytes).sum(),
            _ => 64,
        }
    }
}

/// One raw write.
#[derive(Debug)]
pub enum Op {
    /// Put a value.
    Put(Cf, Vec<u8>, Vec<u8>),
    /// Delete a key.
    Delete(Cf, Vec<u8>),
}

/// What a command produced.
#[derive(Debug)]
pub enum Outcome {
    /// Messages are visible at these places.
    Stored(Vec<pb::MessageReceipt>),
    /// Half messages stored.
    Prepared {
        /// The transaction they belong to.
        txn: Id,
        /// Their ids (offset 0).
        receipts: Vec<pb::MessageReceipt>,
    },
    /// A transaction's state after `End`.
    Ended {
        /// Its state now.
        state: TxnState,
        /// It was in that state already.
        repeated: bool,
        /// Where committed messages landed (empty unless this request committed).
        receipts: Vec<pb::MessageReceipt>,
    },
    /// A transaction record after `Rearm`.
    Txn(Box<TxnRecord>),
    /// A topic.
    Topic(Arc<Topic>),
    /// Written; nothing to tell.
    Done,
    /// The outcomes of [`Command::Many`], in its order.
    Many(Vec<Result<Outcome>>),
}

struct Job {
    cmd: Command,
    reply: oneshot::Sender<Result<Outcome>>,
}

/// The sending side of the writer.
#[derive(Debug, Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Job>,
}

impl WriterHandle {
    /// Submits a command and waits until it is durable (or refused).
    ///
    /// # Errors
    /// The command's own refusal, a storage failure, or [`Error::ShuttingDown`].
    pub async fn submit(&self, cmd: Command) -> Result<Outcome> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { cmd, reply })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Submits a command; the answer arrives on `reply`.
    pub async fn submit_to(&self, cmd: Command, reply: oneshot::Sender<Result<Outcome>>) {
        if let Err(mpsc::error::SendError(job)) = self.tx.send(Job { cmd, reply }).await {
            let _ = job.reply.send(Err(Error::ShuttingDown));
        }
    }
}

/// The writer and syncer threads, joined on [`WriterThread::join`] or on drop.
///
/// A writer thread left running while its owner returns keeps using RocksDB while the
/// process tears it down (a test binary's exit aborted with `pthread lock: Invalid
/// argument` and once `double free or corruption`): whoever spawns the writer must drop
/// every [`WriterHandle`] and then join it before the database and the process go.
#[derive(Debug)]
pub struct WriterThread(Option<std::thread::JoinHandle<()>>);

impl WriterThread {
    /// Waits until the writer has answered everything, flushed the WAL and let go of
    /// storage. Every [`WriterHandle`] must be dropped first, or this waits forever.
    pub fn join(mut self) {
        self.join_now();
    }

    fn join_now(&mut self) {
        if let Some(thread) = self.0.take()
            && thread.join().is_err()
        {
            tracing::error!("the writer thread panicked");
        }
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        self.join_now();
    }
}

/// The writer thread's state.
pub struct Writer {
    storage: Arc<Storage>,
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
}

/// Records and half messages of open transactions, as this writer last wrote them: a
/// commit or rollback then needs no read from RocksDB. Only written batches update it, so
/// it always agrees with the database; it is bounded, and a miss reads the database.
#[derive(Default)]
struct Recent {
    records: FxHashMap<Id, TxnRecord>,
    halves: FxHashMap<Id, Vec<(u32, pb::StoredMessage)>>,
    half_bytes: usize,
}

/// Most open transactions [`Recent`] remembers: far more than are open at once when
/// producers resolve within seconds; one held open longer is read back at its commit. At
/// 64 MiB the backlog bench's million never-resolved transactions pinned the whole cache
/// and took the broker past 512 MiB.
const RECENT_TXNS: usize = 16_384;
/// Most half-message bytes [`Recent`] holds.
const RECENT_BYTES: usize = 16 << 20;

impl Recent {
    /// Takes in what a written batch left: records in their new state, halves not yet
    /// resolved.
    fn update(
        &mut self,
        txns: FxHashMap<Id, TxnRecord>,
        halves: FxHashMap<Id, Vec<(u32, pb::StoredMessage)>>,
    ) {
        for (id, rec) in txns {
            if rec.state == TxnState::Prepared as i32 {
                if self.records.len() < RECENT_TXNS || self.records.contains_key(&id) {
                    self.records.insert(id, rec);
                }
            } else {
                self.records.remove(&id);
                self.forget_halves(id);
            }
        }
        for (id, mut staged) in halves {
            if !self.records.contains_key(&id) {
                continue;
            }
            let bytes: usize = staged.iter().map(|(_, m)| m.encoded_len()).sum();
            if self.half_bytes + bytes > RECENT_BYTES {
                // Incomplete from here on: a later resolution reads the database.
                self.forget_halves(id);
                self.records.remove(&id);
                continue;
            }
            self.half_bytes += bytes;
            self.halves.entry(id).or_default().append(&mut staged);
        }
    }

    fn take_halves(&mut self, id: Id) -> Vec<(u32, pb::StoredMessage)> {
        let halves = self.halves.remove(&id).unwrap_or_default();
        let bytes: usize = halves.iter().map(|(_, m)| m.encoded_len()).sum();
        self.half_bytes = self.half_bytes.saturating_sub(bytes);
        halves
    }

    fn forget_halves(&mut self, id: Id) {
        self.take_halves(id);
    }
}

/// A batch on its way to the syncer: written to RocksDB (not yet fsynced) or refused.
struct Written {
    jobs: Vec<Job>,
    results: Vec<Result<Outcome>>,
    /// It wrote something, so its replies wait for an fsync.
    wrote: bool,
    /// Topic ends to publish (make visible to consumers) once durable.
    ends: Vec<(u32, u64)>,
    tally: Tally,
}

impl Writer {
    /// Starts the writer thread. It runs until every [`WriterHandle`] is dropped, then
    /// flushes the write-ahead log and exits; [`WriterThread::join`] waits for that.
    pub fn spawn(
        storage: Arc<Storage>,
        topics: Arc<Topics>,
        ids: Arc<IdGen>,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
    ) -> (WriterHandle, WriterThread) {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 2);
        let next_offset = topics.all().iter().map(|t| (t.id, t.end())).collect();
        // Writes go to the WAL without a sync; the syncer thread fsyncs once for every
        // batch written meanwhile, while this thread already applies the next batch.
        let write_opts = WriteOptions::default();
        let (syncer, synced) = std::sync::mpsc::channel();
        let syncer_thread = {
            let (storage, topics, metrics) = (storage.clone(), topics.clone(), metrics.clone());
            let fsync = config.flush == FlushMode::Sync;
            std::thread::Builder::new()
                .name("txmq-syncer".into())
                .spawn(move || sync_loop(&synced, &storage, &topics, &metrics, fsync))
                .expect("spawn syncer thread")
        };
        let writer = Writer {
            next_topic_id: topics.max_id() + 1,
            storage,
            topics,
            ids,
            config,
            next_offset,
            write_opts,
            metrics,
            syncer,
            recent: Recent::default(),
        };
        let thread = std::thread::Builder::new()
            .name("txmq-writer".into())
            .spawn(move || {
                let storage = writer.storage.clone();
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
            let first = match carried.take() {
                Some(job) => job,
                None => match rx.blocking_recv() {
                    Some(job) => job,
                    None => return,
                },
            };
            let mut bytes = first.cmd.bytes();
            jobs.push(first);
            while jobs.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(job) => {
                        bytes += job.cmd.bytes();
                        if bytes > MAX_BATCH_BYTES {
                            carried = Some(job);
                            break;
                        }
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
            self.commit(&mut jobs);
        }
    }

    /// Stages every job and writes once (no sync), then hands the batch to the syncer,
    /// which replies once it is durable. A write failure fails every job that wrote
    /// something and leaves in-memory state as it was before the batch.
    fn commit(&mut self, jobs: &mut Vec<Job>) {
        if let Some(why) = self.storage.failure() {
            // Sticky: after a failed sync this database's memory may be ahead of its disk.
            for job in jobs.drain(..) {
                let _ = job.reply.send(Err(Error::StorageFailed(why.clone())));
            }
            return;
        }
        let mut stage = Stage::default();
        let mut results = Vec::with_capacity(jobs.len());
        for job in jobs.iter_mut() {
            let cmd = std::mem::replace(&mut job.cmd, Command::Raw(Vec::new()));
            let before = stage.batch.len();
            let result = self.apply(cmd, &mut stage);
            debug_assert!(result.is_ok() || stage.batch.len() == before);
            results.push(result);
        }
        let wrote = !stage.batch.is_empty();
        let write = if wrote {
            let started = std::time::Instant::now();
            let w = self
                .storage
                .db()
                .write_opt(std::mem::take(&mut stage.batch), &self.write_opts);
            if w.is_ok() {
                self.metrics
                    .write_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.batch_requests.observe(jobs.len() as f64);
                let c = &self.storage.counters;
                c.batches.fetch_add(1, Ordering::Relaxed);
                c.jobs.fetch_add(jobs.len() as u64, Ordering::Relaxed);
            }
            w
        } else {
            Ok(())
        };
        let written = match write {
            Ok(()) => {
                for topic in stage.new_topics {
                    self.topics.insert(topic);
                }
                self.recent.update(stage.txns, stage.halves);
                let ends: Vec<(u32, u64)> = stage.next_offset.into_iter().collect();
                for &(id, next) in &ends {
                    self.next_offset.insert(id, next);
                }
                Written {
                    jobs: std::mem::take(jobs),
                    results,
                    wrote,
                    ends,
                    tally: stage.tally,
                }
            }
            Err(e) => {
                tracing::error!("write batch failed, {} requests refused: {e}", jobs.len());
                self.next_topic_id = stage.first_topic_id.unwrap_or(self.next_topic_id);
                let e = Error::Storage(e);
                let results = results.into_iter().map(|r| lost_in_write(r, &e)).collect();
                Written {
                    jobs: std::mem::take(jobs),
                    results,
                    wrote: false,
                    ends: Vec::new(),
                    tally: Tally::default(),
                }
            }
        };
        // Every batch goes through the syncer, even one that wrote nothing: its answers
        // may depend on an earlier batch (a repeated commit), which must be durable first.
        if let Err(std::sync::mpsc::SendError(w)) = self.syncer.send(written) {
            for job in w.jobs {
                let _ = job.reply.send(Err(Error::ShuttingDown));
            }
        }
    }

    fn apply(&mut self, cmd: Command, stage: &mut Stage) -> Result<Outcome> {
        match cmd {
            Command::Many(cmds) => Ok(Outcome::Many(
                cmds.into_iter().map(|c| self.apply(c, stage)).collect(),
            )),
            Command::Append { messages } => self.append(messages, stage),
            Command::Prepare {
                txn,
                group,
                messages,
                check_delay_ms,
            } => self.prepare(txn, group, messages, check_delay_ms, stage),
            Command::End { txn, outcome, by } => self.end(txn, outcome, by, stage),
            Command::RecordCheck {
                txn,
                counted,
                result,
                note,
                next_check_ms,
            } => self.record_check(txn, counted, result, note, next_check_ms, stage),
            Command::Discard { txn } => self.discard(txn, stage),
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
            } => {
                if let Some(t) = self.topic(&name, stage) {
                    return if fail_if_exists {
                        Err(Error::TopicExists(name))
                    } else {
                        Ok(Outcome::Topic(t))
                    };
                }
                Ok(Outcome::Topic(self.create_topic(name, stage)))
            }
            Command::Raw(ops) => {
                for op in ops {
                    match op {
                        Op::Put(cf, k, v) => stage.batch.put_cf(self.storage.cf(cf), k, v),
                        Op::Delete(cf, k) => stage.batch.delete_cf(self.storage.cf(cf), k),
                    }
                }
                Ok(Outcome::Done)
            }
        }
    }

    // ---------------------------------------------------------------- topics

    fn topic(&self, name: &str, stage: &Stage) -> Option<Arc<Topic>> {
        self.topics
            .get(name)
            .or_else(|| stage.new_topics.iter().find(|t| t.name == name).cloned())
    }

    fn create_topic(&mut self, name: String, stage: &mut Stage) -> Arc<Topic> {
        stage.first_topic_id.get_or_insert(self.next_topic_id);
        let record = TopicRecord {
            id: self.next_topic_id,
            created_ms: txmq_protocol::now_ms(),
        };
        self.next_topic_id += 1;
        stage.batch.put_cf(
            self.storage.cf(Cf::Meta),
            keys::topic(&name),
            record.encode_to_vec(),
        );
        let topic = Arc::new(Topic::new(name, record.id, record.created_ms, 0));
        stage.new_topics.push(topic.clone());
        topic
    }

    /// Resolves every message's topic first, so a refusal stages nothing.
    fn topics_for(
        &mut self,
        messages: &[pb::Message],
        stage: &mut Stage,
    ) -> Result<Vec<Arc<Topic>>> {
        let mut missing = Vec::new();
        for m in messages {
            if self.topic(&m.topic, stage).is_none() && !missing.contains(&m.topic) {
                if !self.config.auto_create_topics {
                    return Err(Error::TopicNotFound(m.topic.clone()));
                }
                missing.push(m.topic.clone());
            }
        }
        for name in missing {
            self.create_topic(name, stage);
        }
        Ok(messages
            .iter()
            .map(|m| self.topic(&m.topic, stage).expect("resolved above"))
            .collect())
    }

    fn next_offset(&self, topic: u32, stage: &mut Stage) -> u64 {
        let slot = stage
            .next_offset
            .entry(topic)
            .or_insert_with(|| self.next_offset.get(&topic).copied().unwrap_or(0));
        let offset = *slot;
        *slot += 1;
        offset
    }

    fn append_one(
        &self,
        topic: &Topic,
        mut msg: pb::StoredMessage,
        stage: &mut Stage,
    ) -> pb::MessageReceipt {
        msg.offset = self.next_offset(topic.id, stage);
        stage.batch.put_cf(
            self.storage.cf(Cf::Log),
            keys::log(topic.id, msg.offset),
            msg.encode_to_vec(),
        );
        pb::MessageReceipt {
            message_id: msg.message_id,
            topic: msg.topic,
            offset: msg.offset,
        }
    }

    fn stored(&self, m: pb::Message, now: u64) -> pb::StoredMessage {
        pb::StoredMessage {
            topic: m.topic,
            offset: 0,
            message_id: self.ids.next().to_string(),
            key: m.key,
            tag: m.tag,
            properties: m.properties,
            body: m.body,
            born_ms: m.born_ms,
            store_ms: now,
            txn_id: String::new(),
        }
    }

    fn append(&mut self, messages: Vec<pb::Message>, stage: &mut Stage) -> Result<Outcome> {
        let topics = self.topics_for(&messages, stage)?;
        let now = txmq_protocol::now_ms();
        let receipts: Vec<_> = messages
            .into_iter()
            .zip(topics)
            .map(|(m, t)| {
                let stored = self.stored(m, now);
                self.append_one(&t, stored, stage)
            })
            .collect();
        stage.tally.sent += receipts.len() as u64;
        Ok(Outcome::Stored(receipts))
    }

    // ---------------------------------------------------------- transactions

    fn txn_record(&self, txn: Id, stage: &Stage) -> Result<Option<TxnRecord>> {
        match stage
            .txns
            .get(&txn)
            .or_else(|| self.recent.records.get(&txn))
        {
            Some(r) => Ok(Some(r.clone())),
            None => self.storage.txn(txn),
        }
    }

    fn put_txn(&self, txn: Id, rec: TxnRecord, stage: &mut Stage) {
        stage.batch.put_cf(
            self.storage.cf(Cf::Txn),
            txn.to_bytes(),
            rec.encode_to_vec(),
        );
        stage.txns.insert(txn, rec);
    }

    fn move_check(&self, txn: Id, from_ms: u64, to_ms: u64, stage: &mut Stage) {
        let due = self.storage.cf(Cf::Due);
        if from_ms != 0 {
            stage
                .batch
                .delete_cf(due, keys::due(DueKind::Check, from_ms, txn));
        }
        if to_ms != 0 {
            stage
                .batch
                .put_cf(due, keys::due(DueKind::Check, to_ms, txn), []);
        }
    }

    fn prepare(
        &mut self,
        txn: Option<Id>,
        group: String,
        messages: Vec<pb::Message>,
        check_delay_ms: u64,
        stage: &mut Stage,
    ) -> Result<Outcome> {
        let now = txmq_protocol::now_ms();
        // Everything that can refuse the request comes first: a refusal stages nothing (a
        // due entry staged before a refused topic once stayed behind without a record).
        let (txn, mut rec, new) = match txn {
            Some(id) => {
                let rec = self
                    .txn_record(id, stage)?
                    .ok_or_else(|| Error::TxnNotFound(id.to_string()))?;
                crate::txn::state::can_add(id, &rec, &group)?;
                (id, rec, false)
            }
            None => {
                let delay = if check_delay_ms > 0 {
                    check_delay_ms
                } else {
                    self.config.check_timeout.as_millis() as u64
                };
                let rec = TxnRecord {
                    group,
                    state: TxnState::Prepared as i32,
                    created_ms: now,
                    next_check_ms: now.saturating_add(delay),
                    ..Default::default()
                };
                (self.ids.next_secret(), rec, true)
            }
        };
        let bytes: u64 = messages.iter().map(|m| m.encoded_len() as u64).sum();
        crate::txn::state::fits(txn, &rec, bytes, self.config.max_txn_bytes)?;
        // Topics are created at prepare time so a commit can never fail on a missing topic.
        self.topics_for(&messages, stage)?;
        if new {
            self.move_check(txn, 0, rec.next_check_ms, stage);
        }
        rec.bytes += bytes;
        let half = self.storage.cf(Cf::Half);
        let mut receipts = Vec::with_capacity(messages.len());
        for m in messages {
            let mut stored = self.stored(m, now);
            stored.txn_id = txn.to_string();
            if !rec.topics.contains(&stored.topic) {
                rec.topics.push(stored.topic.clone());
            }
            receipts.push(pb::MessageReceipt {
                message_id: stored.message_id.clone(),
                topic: stored.topic.clone(),
                offset: 0,
            });
            stage.batch.put_cf(
                half,
                keys::half(txn, rec.message_count),
                stored.encode_to_vec(),
            );
            stage
                .halves
                .entry(txn)
                .or_default()
                .push((rec.message_count, stored));
            rec.message_count += 1;
        }
        self.put_txn(txn, rec, stage);
        stage.tally.halves_sent += receipts.len() as u64;
        Ok(Outcome::Prepared { txn, receipts })
    }

    fn end(
        &mut self,
        txn: Id,
        outcome: TxnOutcome,
        by: Resolver,
        stage: &mut Stage,
    ) -> Result<Outcome> {
        let mut rec = self
            .txn_record(txn, stage)?
            .ok_or_else(|| Error::TxnNotFound(txn.to_string()))?;
        state::may_end(txn, &rec, &by)?;
        let state = TxnState::try_from(rec.state).unwrap_or(TxnState::Prepared);
        let wanted = match state::resolve(txn, state, outcome)? {
            Resolution::Apply(wanted) => wanted,
            Resolution::Repeat(state) => {
                return Ok(Outcome::Ended {
                    state,
                    repeated: true,
                    receipts: Vec::new(),
                });
            }
            Resolution::RecordUnknown => {
                if state == TxnState::Prepared || state == TxnState::Discarded {
                    rec.last_result = TxnOutcome::Unknown as i32;
                    rec.last_note = format!("{} answered unknown", by.note());
                    self.put_txn(txn, rec, stage);
                }
                return Ok(Outcome::Ended {
                    state,
                    repeated: false,
                    receipts: Vec::new(),
                });
            }
        };
        let note = by.note().to_string();
        // Staged in this very batch (the database does not have them yet), or remembered
        // from an earlier one; whatever is missing is read.
        let mut known = self.recent.take_halves(txn);
        known.extend(stage.halves.remove(&txn).unwrap_or_default());
        let halves = if known.len() == rec.message_count as usize {
            known.sort_unstable_by_key(|(seq, _)| *seq);
            known.into_iter().map(|(_, m)| m).collect()
        } else {
            self.storage.halves_by_seq(txn, rec.message_count, known)?
        };
        let mut receipts = Vec::new();
        if wanted == TxnState::Committed {
            let topics = halves
                .iter()
                .map(|m| {
                    self.topic(&m.topic, stage)
                        .ok_or_else(|| Error::Internal(format!("topic {} vanished", m.topic)))
                })
                .collect::<Result<Vec<_>>>()?;
            let now = txmq_protocol::now_ms();
            for (mut m, topic) in halves.into_iter().zip(topics) {
                m.store_ms = now;
                receipts.push(self.append_one(&topic, m, stage));
            }
        }
        // Point deletes, not a range delete: every read of the memtable pays for each
        // range tombstone in it, which made commits cost more the more there had been.
        let half = self.storage.cf(Cf::Half);
        for seq in 0..rec.message_count {
            stage.batch.delete_cf(half, keys::half(txn, seq));
        }
        let now = txmq_protocol::now_ms();
        self.move_check(txn, rec.next_check_ms, 0, stage);
        rec.state = wanted as i32;
        rec.next_check_ms = 0;
        rec.resolved_ms = now;
        rec.purge_ms = now + self.config.txn_retention.as_millis() as u64;
        rec.last_note = note;
        stage.batch.put_cf(
            self.storage.cf(Cf::Due),
            keys::due(DueKind::Purge, rec.purge_ms, txn),
            [],
        );
        stage.tally.halves_removed += u64::from(rec.message_count);
        if wanted == TxnState::Committed {
            stage.tally.committed += 1;
        } else {
            stage.tally.rolled_back += 1;
        }
        self.put_txn(txn, rec, stage);
        Ok(Outcome::Ended {
            state: wanted,
            repeated: false,
            receipts,
        })
    }

    fn record_check(
        &mut self,
        txn: Id,
        counted: bool,
        result: TxnOutcome,
        note: String,
        next_check_ms: Option<u64>,
        stage: &mut Stage,
    ) -> Result<Outcome> {
        let Some(mut rec) = self.txn_record(txn, stage)? else {
            return Ok(Outcome::Done);
        };
        if rec.state != TxnState::Prepared as i32 {
            return Ok(Outcome::Done);
        }
        if counted {
            rec.check_count += 1;
        }
        if result != TxnOutcome::Unspecified {
            rec.last_result = result as i32;
        }
        rec.last_note = note;
        if let Some(next) = next_check_ms {
            self.move_check(txn, rec.next_check_ms, next, stage);
            rec.next_check_ms = next;
        }
        self.put_txn(txn, rec, stage);
        Ok(Outcome::Done)
    }

    fn discard(&mut self, txn: Id, stage: &mut Stage) -> Result<Outcome> {
        let Some(mut rec) = self.txn_record(txn, stage)? else {
            return Ok(Outcome::Done);
        };
        if rec.state != TxnState::Prepared as i32 {
            return Ok(Outcome::Done);
        }
        self.move_check(txn, rec.next_check_ms, 0, stage);
        rec.state = TxnState::Discarded as i32;
        rec.next_check_ms = 0;
        rec.last_note = format!(
            "discarded after {} checks without an answer; txn rearm|commit|rollback",
            rec.check_count
        );
        stage.tally.discarded += 1;
        self.put_txn(txn, rec, stage);
        Ok(Outcome::Done)
    }

    fn rearm(&mut self, txn: Id, stage: &mut Stage) -> Result<Outcome> {
        let mut rec = self
            .txn_record(txn, stage)?
            .ok_or_else(|| Error::TxnNotFound(txn.to_string()))?;
        match TxnState::try_from(rec.state) {
            Ok(TxnState::Prepared | TxnState::Discarded) => {}
            Ok(TxnState::Committed) => {
                return Err(Error::TxnNotRearmable(txn.to_string(), "committed"));
            }
            _ => return Err(Error::TxnNotRearmable(txn.to_string(), "rolled back")),
        }
        let now = txmq_protocol::now_ms();
        self.move_check(txn, rec.next_check_ms, now, stage);
        rec.state = TxnState::Prepared as i32;
        rec.check_count = 0;
        rec.next_check_ms = now;
        rec.last_note = "re-armed by an operator".into();
        self.put_txn(txn, rec.clone(), stage);
        Ok(Outcome::Txn(Box::new(rec)))
    }

    fn purge(&mut self, txn: Id, due_ms: u64, stage: &mut Stage) -> Result<Outcome> {
        let due = self.storage.cf(Cf::Due);
        stage
            .batch
            .delete_cf(due, keys::due(DueKind::Purge, due_ms, txn));
        if let Some(rec) = self.txn_record(txn, stage)?
            && rec.purge_ms == due_ms
            && rec.resolved_ms != 0
        {
            stage
                .batch
                .delete_cf(self.storage.cf(Cf::Txn), txn.to_bytes());
            stage.txns.remove(&txn);
        }
        Ok(Outcome::Done)
    }
}

/// What a staged result becomes when its batch could not be written or synced: whatever
/// would have been stored fails with the storage error; a refusal stays the refusal it was.
fn lost_in_write(result: Result<Outcome>, e: &Error) -> Result<Outcome> {
    match result {
        Ok(Outcome::Many(results)) => Ok(Outcome::Many(
            results.into_iter().map(|r| lost_in_write(r, e)).collect(),
        )),
        Ok(_) => Err(e.clone()),
        Err(refusal) => Err(refusal),
    }
}

/// The syncer thread: one fsync of the WAL for every batch written since the last one,
/// then, in order, makes their messages visible, counts them, and replies. (With
/// `flush = async` it skips the fsync and keeps the order.)
fn sync_loop(
    rx: &std::sync::mpsc::Receiver<Written>,
    storage: &Storage,
    topics: &Topics,
    metrics: &Metrics,
    fsync: bool,
) {
    while let Ok(first) = rx.recv() {
        let mut batches = vec![first];
        batches.extend(rx.try_iter());
        let synced = if let Some(why) = storage.failure() {
            // Written after a failed sync: never synced, never published.
            Err(Error::StorageFailed(why))
        } else if fsync && batches.iter().any(|w| w.wrote) {
            let started = std::time::Instant::now();
            let r = storage.db().flush_wal(true);
            metrics
                .fsync_seconds
                .observe(started.elapsed().as_secs_f64());
            storage.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
            r.map_err(|e| {
                let why = format!("fsync of the write-ahead log failed: {e}");
                storage.fail(why.clone());
                Error::StorageFailed(why)
            })
        } else {
            Ok(())
        };
        if let Err(e) = &synced {
            tracing::error!("{} batches refused: {e}", batches.len());
        }
        for w in batches {
            match &synced {
                Ok(()) => {
                    for (id, next) in w.ends {
                        if let Some(t) = topics.by_id(id) {
                            t.set_end(next);
                        }
                    }
                    w.tally.publish(metrics);
                    for (job, result) in w.jobs.into_iter().zip(w.results) {
                        let _ = job.reply.send(result);
                    }
                }
                // Every batch of the group fails, also one that wrote nothing: its answer
                // (a repeated commit or ack) stood on writes that are not durable now.
                Err(e) => {
                    for (job, result) in w.jobs.into_iter().zip(w.results) {
                        let _ = job.reply.send(lost_in_write(result, e));
                    }
                }
            }
        }
    }
}

/// One batch in the making, with an overlay of what it already changed.
#[derive(Default)]
struct Stage {
    batch: WriteBatch,
    txns: FxHashMap<Id, TxnRecord>,
    halves: FxHashMap<Id, Vec<(u32, pb::StoredMessage)>>,
    new_topics: Vec<Arc<Topic>>,
    first_topic_id: Option<u32>,
    next_offset: FxHashMap<u32, u64>,
    tally: Tally,
}

/// What a batch did, published to the metrics only once it is durable.
#[derive(Default)]
struct Tally {
    sent: u64,
    halves_sent: u64,
    halves_removed: u64,
    committed: u64,
    rolled_back: u64,
    discarded: u64,
}

impl Tally {
    fn publish(&self, m: &Metrics) {
        m.messages_sent.inc_by(self.sent);
        m.half_messages_sent.inc_by(self.halves_sent);
        m.half_messages_pending
            .add(self.halves_sent as i64 - self.halves_removed as i64);
        m.transactions_resolved
            .with_label_values(&["commit"])
            .inc_by(self.committed);
        m.transactions_resolved
            .with_label_values(&["rollback"])
            .inc_by(self.rolled_back);
        m.transactions_discarded.inc_by(self.discarded);
    }
}

/// Converts `End` outcomes for callers that only care about the receipts.
pub fn txn_state_name(state: TxnState) -> &'static str {
    match state {
        TxnState::Prepared => "prepared",
        TxnState::Committed => "committed",
        TxnState::RolledBack => "rolled back",
        TxnState::Discarded => "discarded",
        TxnState::Unspecified => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer on a fresh database. Tests end with [`stop`], so no thread outlives the
    /// database or the test.
    fn writer(flush: FlushMode) -> (tempfile::TempDir, Arc<Storage>, WriterHandle, WriterThread) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let config = Arc::new(Config {
            flush,
            ..Config::default()
        });
        let (handle, thread) = Writer::spawn(
            storage.clone(),
            Arc::new(Topics::default()),
            Arc::new(IdGen::new(1)),
            config,
            Arc::new(Metrics::new()),
        );
        (dir, storage, handle, thread)
    }

    /// Drops the handle, joins the threads, then closes the database: the order the
    /// broker's own shutdown follows.
    async fn stop(handle: WriterHandle, thread: WriterThread, storage: Arc<Storage>) {
        drop(handle);
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .unwrap();
        assert_eq!(
            Arc::strong_count(&storage),
            1,
            "a thread still holds storage"
        );
        drop(storage);
    }

    fn append(i: usize) -> Command {
        Command::Append {
            messages: vec![pb::Message {
                topic: "t".into(),
                body: format!("m{i}").into(),
                ..Default::default()
            }],
        }
    }

    /// I3's mechanism: with `flush = sync` no reply to a write comes before an fsync that
    /// covers it — one after another, every send needs its own — and concurrent sends
    /// share fsyncs (group commit). With `flush = async` there are none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_replies_wait_for_an_fsync_and_share_it() {
        let (_dir, storage, w, thread) = writer(FlushMode::Sync);
        let fsyncs = || storage.counters.fsyncs.load(Ordering::Relaxed);
        for i in 0..20 {
            let before = fsyncs();
            w.submit(append(i)).await.unwrap();
            assert!(fsyncs() > before, "send {i} was answered before any fsync");
        }
        let before = fsyncs();
        let sends = (0..2000).map(|i| w.submit(append(i)));
        for r in futures::future::join_all(sends).await {
            r.unwrap();
        }
        let shared = fsyncs() - before;
        assert!(
            (1..1000).contains(&shared),
            "2000 concurrent sends took {shared} fsyncs"
        );

        stop(w, thread, storage).await;

        let (_dir, storage, w, thread) = writer(FlushMode::Async);
        for i in 0..20 {
            w.submit(append(i)).await.unwrap();
        }
        assert_eq!(storage.counters.fsyncs.load(Ordering::Relaxed), 0);
        stop(w, thread, storage).await;
    }

    /// A write batch holds at most [`MAX_BATCH_BYTES`]: twelve concurrent 15 MiB sends
    /// make at least three batches (they used to make one of 180 MiB).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_batch_is_capped_in_bytes() {
        let (_dir, storage, w, thread) = writer(FlushMode::Async);
        let big = bytes::Bytes::from(vec![7u8; 15 << 20]);
        // Queue them all before the writer wakes: one request first, so it is busy.
        let sends = (0..12).map(|_| {
            w.submit(Command::Append {
                messages: vec![pb::Message {
                    topic: "t".into(),
                    body: big.clone(),
                    ..Default::default()
                }],
            })
        });
        let before = storage.counters.batches.load(Ordering::Relaxed);
        for r in futures::future::join_all(sends).await {
            r.unwrap();
        }
        let batches = storage.counters.batches.load(Ordering::Relaxed) - before;
        assert!(batches >= 3, "180 MiB went in {batches} batch(es)");
        stop(w, thread, storage).await;
    }

    /// Dropping the last handle with thousands of writes queued: every one is answered
    /// (nothing hangs), the threads end before the database closes, and what was answered
    /// OK is there when the database opens again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_dropped_with_work_in_flight_answers_it_and_stops_first() {
        let (dir, storage, w, thread) = writer(FlushMode::Sync);
        let mut answers = Vec::new();
        for i in 0..3000 {
            let w = w.clone();
            answers.push(tokio::spawn(async move { w.submit(append(i)).await }));
        }
        tokio::task::yield_now().await;
        stop(w, thread, storage).await;
        let mut stored = 0;
        for a in answers {
            if a.await.unwrap().is_ok() {
                stored += 1;
            }
        }
        assert_eq!(stored, 3000, "queued writes were dropped unanswered");
        let storage = Storage::open(dir.path()).unwrap();
        let topic = storage
            .topics()
            .unwrap()
            .into_iter()
            .find(|t| t.name == "t")
            .unwrap();
        assert_eq!(topic.end, 3000);
    }
}
