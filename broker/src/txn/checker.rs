//! The check-back scheduler: the one owner of due checks (I4, I5).
//!
//! Every `check-interval` it reads the due index up to the broker's clock — a range scan
//! that stops at the first entry not yet due — and for each due transaction:
//!
//! - `check-max` counted attempts already made: discard it (kept, listed, re-armable);
//! - else send a `CheckRequest` to a live producer connection of its group, round-robin,
//!   skipping dead and busy ones. Sent: the attempt counts and the next check moves out by
//!   the backoff. Nobody to send to: the attempt does not count, the check moves out.
//!
//! A reply resolves the transaction through the writer exactly as an EndTxn would;
//! `unknown` or no reply within `check-reply-timeout` leaves the backoff in place.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use txmq_protocol::pb::{self, TxnOutcome};
use txmq_protocol::{Frame, now_ms};

use super::producers::{Picked, Producers};
use super::state::{self, Resolver};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::ids::{Id, Scramble};
use crate::metrics::Metrics;
use crate::replication::lease::Serving;
use crate::storage::StorageHandle;
use crate::storage::keys::DueKind;
use crate::storage::records::TxnRecord;
use crate::storage::writer::{Command, WriterHandle};

/// Most due entries handled per pass; the rest wait for the next tick.
const PASS_LIMIT: usize = 4096;

/// A producer's answer, routed from its connection.
#[derive(Debug)]
pub struct CheckAnswer {
    /// The connection it came from: only the one the check was sent to may answer it.
    pub connection_id: u64,
    /// The check's frame id.
    pub check_id: u64,
    /// The answer.
    pub reply: pb::CheckReply,
    /// The face proved that this connection was sent the check (a gRPC stream keeps
    /// the checks it was sent): a commit or rollback that comes after the scheduler
    /// stopped waiting for it still ends the transaction, as a check-back.
    pub proven: bool,
}

struct Pending {
    txn: Id,
    connection_id: u64,
    deadline_ms: u64,
    counter: Arc<AtomicUsize>,
}

/// The scheduler task's state.
pub struct Checker {
    storage: StorageHandle,
    writer: WriterHandle,
    producers: Arc<Producers>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    pending: HashMap<u64, Pending>,
    in_check: HashSet<Id>,
    next_check_id: u64,
    /// Check ids go out scrambled: an answer must name its check, and no client can
    /// guess the ids of checks sent to others.
    check_ids: Scramble,
    /// Whether this node may act as the leader now: no check starts once its lease
    /// lapsed.
    serving: Serving,
}

impl Checker {
    /// A scheduler over the given parts.
    pub fn new(
        storage: StorageHandle,
        writer: WriterHandle,
        producers: Arc<Producers>,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            storage,
            writer,
            producers,
            config,
            metrics,
            pending: HashMap::new(),
            in_check: HashSet::new(),
            next_check_id: 1,
            check_ids: Scramble::new(),
            serving: Serving::always(),
        }
    }

    /// Sends checks only while `serving` holds (a group leader's lease).
    #[must_use]
    pub fn serving(self, serving: Serving) -> Self {
        Self { serving, ..self }
    }

    /// A check id not 0 (frame ids of requests are never 0) and not pending.
    fn new_check_id(&mut self) -> u64 {
        loop {
            let id = self.check_ids.apply(self.next_check_id);
            self.next_check_id += 1;
            if id != 0 && !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    /// Ticks until cancelled.
    pub async fn run(
        mut self,
        mut answers: mpsc::Receiver<CheckAnswer>,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.config.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {
                    // Answers that arrived in time count, however long the last pass took.
                    let early = drain(&mut answers, Vec::new());
                    self.on_answers(early).await;
                    if let Err(e) = self.pass().await {
                        tracing::warn!("check pass failed: {e}");
                    }
                }
                Some(answer) = answers.recv() => {
                    let batch = drain(&mut answers, vec![answer]);
                    self.on_answers(batch).await;
                }
            }
        }
    }

    async fn pass(&mut self) -> Result<()> {
        if !self.serving.holds() {
            // A paused or cut-off leader: another node may lead by now.
            return Ok(());
        }
        let now = now_ms();
        self.time_out(now).await?;
        let storage = self.storage.clone();
        let (checks, purges) = tokio::task::spawn_blocking(move || {
            let checks = storage.due(DueKind::Check, now, PASS_LIMIT)?;
            let mut due = Vec::with_capacity(checks.len());
            for (due_ms, id) in checks {
                due.push((due_ms, id, storage.txn(id)?));
            }
            Ok::<_, Error>((due, storage.due(DueKind::Purge, now, PASS_LIMIT)?))
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        let mut writes = Vec::new();
        for (due_ms, id, rec) in checks {
            // Every entry read is handled, moved or deleted, so entries a pass cannot use
            // never pile up in front of the ones it can (a pass reads a bounded number).
            match rec {
                Some(rec) if state::awaits_check(Some(&rec), due_ms) => {
                    if !self.in_check.contains(&id)
                        && let Some(write) = self.check(id, rec, now).await?
                    {
                        writes.push(write);
                    }
                }
                // Without a record, or for a record that moved on: the writer deletes it
                // after checking against its own (newer) view.
                _ => writes.push(Command::DropDueCheck { txn: id, due_ms }),
            }
        }
        writes.extend(
            purges
                .into_iter()
                .map(|(due_ms, txn)| Command::Purge { txn, due_ms }),
        );
        self.write_all(writes).await;
        Ok(())
    }

    /// Submits every write at once, so they share one group commit instead of paying an
    /// fsync each in turn (a pass or a burst of answers can hold hundreds).
    async fn write_all(&self, writes: Vec<Command>) {
        let results =
            futures::future::join_all(writes.into_iter().map(|cmd| self.writer.submit(cmd))).await;
        for result in results {
            match result {
                // Resolved meanwhile by the producer or an operator: the write is moot.
                Ok(_)
                | Err(Error::TxnCommitted(_) | Error::TxnRolledBack(_) | Error::TxnNotFound(_)) => {
                }
                Err(e) => tracing::warn!("check bookkeeping not recorded: {e}"),
            }
        }
    }

    /// Sends one check (or discards), returning the write that records it; `None` when
    /// there is nothing to ask (resolved since its record was read).
    async fn check(&mut self, txn: Id, rec: TxnRecord, now: u64) -> Result<Option<Command>> {
        if rec.check_count >= self.config.check_max {
            tracing::info!(%txn, group = %rec.group, "discarding after {} checks", rec.check_count);
            return Ok(Some(Command::Discard { txn }));
        }
        let next_check_ms =
            Some(now.saturating_add(self.config.check_wait(rec.check_count).as_millis() as u64));
        if self.producers.count(&rec.group) == 0 {
            // Nobody to ask: do not read the transaction's messages for nothing.
            return Ok(Some(Command::RecordCheck {
                txn,
                counted: self.not_sent("no_producer"),
                result: TxnOutcome::Unspecified,
                note: format!("no producer of group {:?} connected", rec.group),
                next_check_ms,
            }));
        }
        let storage = self.storage.clone();
        let mut messages = tokio::task::spawn_blocking(move || storage.halves(txn))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        if messages.is_empty() {
            // Resolved between reading its record and its halves: nothing to ask.
            return Ok(None);
        }
        // Checked only by the producers that answer for it (its database, say).
        let scope = messages
            .first()
            .and_then(|m| m.properties.get(txmq_protocol::CHECK_SCOPE_PROPERTY))
            .cloned();
        let (bodies_omitted, messages_omitted) =
            fit_in_frame(&mut messages, self.config.max_frame_len);
        let check_id = self.new_check_id();
        let frame = Frame {
            id: check_id,
            body: Some(pb::frame::Body::Check(pb::CheckRequest {
                txn_id: txn.to_string(),
                producer_group: rec.group.clone(),
                messages,
                attempt: rec.check_count + 1,
                bodies_omitted,
                messages_omitted,
            })),
        };
        if !self.serving.holds() {
            // Lapsed while this pass ran: nothing asked, nothing recorded.
            return Ok(None);
        }
        let (counted, note) =
            match self
                .producers
                .send_check(&rec.group, scope.as_deref(), !rec.scoped_checks, frame)
            {
                Picked::Sent {
                    connection_id,
                    pending,
                } => {
                    let deadline_ms = now + self.config.check_reply_timeout.as_millis() as u64;
                    self.pending.insert(
                        check_id,
                        Pending {
                            txn,
                            connection_id,
                            deadline_ms,
                            counter: pending,
                        },
                    );
                    self.in_check.insert(txn);
                    (true, format!("check sent to connection {connection_id}"))
                }
                Picked::NoneConnected => (
                    self.not_sent("no_producer"),
                    match &scope {
                        Some(scope) => format!(
                            "no producer of group {:?} answering for {scope:?} connected",
                            rec.group
                        ),
                        None if rec.scoped_checks && self.producers.count(&rec.group) > 0 => {
                            format!(
                                "no producer of group {:?} without a check scope connected (those \
                             connected answer for their databases only)",
                                rec.group
                            )
                        }
                        None => format!("no producer of group {:?} connected", rec.group),
                    },
                ),
                Picked::AllBusy => (
                    self.not_sent("busy"),
                    format!("every producer of group {:?} was busy", rec.group),
                ),
            };
        Ok(Some(Command::RecordCheck {
            txn,
            counted,
            result: TxnOutcome::Unspecified,
            note,
            next_check_ms,
        }))
    }

    async fn time_out(&mut self, now: u64) -> Result<()> {
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline_ms <= now)
            .map(|(id, _)| *id)
            .collect();
        let note = format!("no answer within {:?}", self.config.check_reply_timeout);
        self.metrics
            .checks
            .with_label_values(&["timeout"])
            .inc_by(late.len() as u64);
        let writes = late
            .into_iter()
            .filter_map(|id| self.finish(id))
            .map(|txn| Command::RecordCheck {
                txn,
                counted: false,
                result: TxnOutcome::Unspecified,
                note: note.clone(),
                next_check_ms: None,
            })
            .collect();
        self.write_all(writes).await;
        Ok(())
    }

    /// A check that could not be sent: shown in the metrics under `result`; returns
    /// `false` because the attempt does not count toward check-max (I4).
    fn not_sent(&self, result: &str) -> bool {
        self.metrics.checks.with_label_values(&[result]).inc();
        false
    }

    fn finish(&mut self, check_id: u64) -> Option<Id> {
        let p = self.pending.remove(&check_id)?;
        p.counter.fetch_sub(1, Ordering::Relaxed);
        self.in_check.remove(&p.txn);
        Some(p.txn)
    }

    async fn on_answers(&mut self, answers: Vec<CheckAnswer>) {
        let writes = answers
            .into_iter()
            .filter_map(|a| self.on_answer(a))
            .collect();
        self.write_all(writes).await;
    }

    /// The write an answer calls for, if it is still awaited. An answer from another
    /// connection than the one asked, or naming another transaction, is refused and
    /// leaves the pending check as it was: nobody can cancel a check they were not sent.
    fn on_answer(&mut self, answer: CheckAnswer) -> Option<Command> {
        let Some(p) = self.pending.get(&answer.check_id) else {
            let outcome = TxnOutcome::try_from(answer.reply.outcome).unwrap_or(TxnOutcome::Unknown);
            if let (true, Some(txn), TxnOutcome::Commit | TxnOutcome::Rollback) =
                (answer.proven, Id::parse(&answer.reply.txn_id), outcome)
            {
                tracing::debug!(check_id = answer.check_id, %txn, "late check answer from the stream asked: it ends the transaction");
                let result = if outcome == TxnOutcome::Commit {
                    "commit"
                } else {
                    "rollback"
                };
                self.metrics.checks.with_label_values(&[result]).inc();
                return Some(Command::End {
                    txn,
                    outcome,
                    by: Resolver::CheckBack,
                });
            }
            tracing::debug!(check_id = answer.check_id, "late or unknown check answer");
            self.metrics.checks.with_label_values(&["refused"]).inc();
            return None;
        };
        if p.connection_id != answer.connection_id || Id::parse(&answer.reply.txn_id) != Some(p.txn)
        {
            tracing::warn!(
                check_id = answer.check_id,
                connection = answer.connection_id,
                asked = p.connection_id,
                txn = %p.txn,
                named = %answer.reply.txn_id,
                "check answer refused: not from the connection asked or not for its transaction"
            );
            self.metrics.checks.with_label_values(&["refused"]).inc();
            return None;
        }
        let txn = self.finish(answer.check_id)?;
        let outcome = TxnOutcome::try_from(answer.reply.outcome).unwrap_or(TxnOutcome::Unknown);
        let result = match outcome {
            TxnOutcome::Commit => "commit",
            TxnOutcome::Rollback => "rollback",
            _ => "unknown",
        };
        self.metrics.checks.with_label_values(&[result]).inc();
        Some(match outcome {
            TxnOutcome::Commit | TxnOutcome::Rollback => Command::End {
                txn,
                outcome,
                by: Resolver::CheckBack,
            },
            _ => Command::RecordCheck {
                txn,
                counted: false,
                result: TxnOutcome::Unknown,
                note: "producer answered unknown".into(),
                next_check_ms: None,
            },
        })
    }
}

/// Makes a check request's messages fit well inside the frame limit (half of it, leaving
/// room for the envelope): first without their bodies, then, if the metadata alone is too
/// large (64 KiB of properties on each of many messages), without the last messages.
/// Returns whether bodies were left out and how many messages were.
fn fit_in_frame(messages: &mut Vec<pb::StoredMessage>, max_frame_len: usize) -> (bool, u32) {
    use prost::Message;
    let budget = max_frame_len / 2;
    let size = |m: &pb::StoredMessage| m.encoded_len() + 8;
    if messages.iter().map(size).sum::<usize>() <= budget {
        return (false, 0);
    }
    for m in messages.iter_mut() {
        m.body = Default::default();
    }
    let mut total = 0;
    let keep = messages
        .iter()
        .take_while(|m| {
            total += size(m);
            total <= budget
        })
        .count()
        .max(1);
    let omitted = messages.len() - keep;
    messages.truncate(keep);
    (true, omitted as u32)
}

/// Everything already waiting on `rx`, after `batch`.
fn drain(rx: &mut mpsc::Receiver<CheckAnswer>, mut batch: Vec<CheckAnswer>) -> Vec<CheckAnswer> {
    while let Ok(a) = rx.try_recv() {
        batch.push(a);
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::IdGen;
    use crate::storage::Storage;
    use crate::storage::writer::{Outcome, Writer};
    use crate::topics::Topics;

    /// A checker over a fresh database, with one producer connection of group `g`.
    /// Fields drop in order: the checker's writer handle before the writer thread joins,
    /// the thread before the directory goes.
    struct Fixture {
        checker: Checker,
        to_producer: mpsc::Receiver<Frame>,
        _thread: crate::storage::writer::WriterThread,
        _dir: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let storage = StorageHandle::alone(Storage::open(dir.path()).unwrap());
        let config = Arc::new(Config::default());
        let metrics = Arc::new(Metrics::new());
        let (writer, thread) = Writer::spawn(
            storage.clone(),
            Arc::new(Topics::default()),
            Arc::new(IdGen::new(1)),
            config.clone(),
            metrics.clone(),
        );
        let producers = Arc::new(Producers::default());
        let (tx, to_producer) = mpsc::channel(8);
        producers.register("g", 1, tx, Arc::default());
        Fixture {
            checker: Checker::new(storage, writer, producers, config, metrics),
            to_producer,
            _thread: thread,
            _dir: dir,
        }
    }

    fn prepared() -> TxnRecord {
        TxnRecord {
            group: "g".into(),
            state: pb::TxnState::Prepared as i32,
            ..Default::default()
        }
    }

    /// Item 19: a transaction resolved between reading its record and its half messages
    /// (here: a record whose halves are gone) is not asked about with an empty request.
    #[tokio::test]
    async fn a_check_with_no_messages_is_skipped() {
        let mut f = fixture();
        let gone = IdGen::new(7).next();
        let write = f.checker.check(gone, prepared(), now_ms()).await.unwrap();
        assert!(write.is_none(), "{write:?}");
        assert!(f.to_producer.try_recv().is_err(), "an empty check was sent");
        assert!(f.checker.pending.is_empty());

        // The same transaction with its halves stored is asked about.
        let Outcome::Prepared { txn, .. } = f
            .checker
            .writer
            .submit(Command::Prepare {
                txn: None,
                group: "g".into(),
                messages: vec![pb::Message {
                    topic: "t".into(),
                    body: "half".into(),
                    ..Default::default()
                }],
                bytes: 16,
                check_delay_ms: 0,
            })
            .await
            .unwrap()
        else {
            panic!("not prepared")
        };
        let write = f.checker.check(txn, prepared(), now_ms()).await.unwrap();
        assert!(matches!(
            write,
            Some(Command::RecordCheck { counted: true, .. })
        ));
        let frame = f.to_producer.try_recv().expect("no check sent");
        let Some(pb::frame::Body::Check(req)) = frame.body else {
            panic!("{frame:?}")
        };
        assert_eq!(req.messages.len(), 1);
    }

    fn message(body: usize, property: usize) -> pb::StoredMessage {
        pb::StoredMessage {
            body: vec![1u8; body].into(),
            properties: [("p".to_string(), "x".repeat(property))].into(),
            ..Default::default()
        }
    }

    /// Item 5: bodies go first, then the last messages, and the first always stays.
    #[test]
    fn a_check_request_is_fitted_to_half_a_frame() {
        let mut small = vec![message(100, 10); 3];
        assert_eq!(fit_in_frame(&mut small, 1 << 20), (false, 0));
        assert_eq!(small[0].body.len(), 100);

        let mut bodies = vec![message(400_000, 10); 3];
        assert_eq!(fit_in_frame(&mut bodies, 1 << 20), (true, 0));
        assert!(bodies.iter().all(|m| m.body.is_empty()));

        let mut metadata = vec![message(10, 60_000); 24];
        let (omitted_bodies, omitted) = fit_in_frame(&mut metadata, 1 << 20);
        assert!(omitted_bodies);
        assert_eq!(metadata.len() + omitted as usize, 24);
        assert!((1..24).contains(&metadata.len()));
        let size: usize = metadata.iter().map(prost::Message::encoded_len).sum();
        assert!(size <= 1 << 19, "{size}");

        let mut one = vec![message(10, 60_000); 2];
        assert_eq!(fit_in_frame(&mut one, 64 << 10), (true, 1));
        assert_eq!(one.len(), 1);
    }
}
