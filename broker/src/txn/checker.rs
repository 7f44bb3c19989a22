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
use txmq_protocol::pb::{self, TxnOutcome, TxnState};
use txmq_protocol::{Frame, now_ms};

use super::producers::{Picked, Producers};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::ids::Id;
use crate::metrics::Metrics;
use crate::storage::Storage;
use crate::storage::keys::DueKind;
use crate::storage::records::TxnRecord;
use crate::storage::writer::{Command, WriterHandle};

/// Most due entries handled per pass; the rest wait for the next tick.
const PASS_LIMIT: usize = 4096;

/// A producer's answer, routed from its connection.
#[derive(Debug)]
pub struct CheckAnswer {
    /// The check's frame id.
    pub check_id: u64,
    /// The answer.
    pub reply: pb::CheckReply,
}

struct Pending {
    txn: Id,
    deadline_ms: u64,
    counter: Arc<AtomicUsize>,
}

/// The scheduler task's state.
pub struct Checker {
    storage: Arc<Storage>,
    writer: WriterHandle,
    producers: Arc<Producers>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    pending: HashMap<u64, Pending>,
    in_check: HashSet<Id>,
    next_check_id: u64,
}

impl Checker {
    /// A scheduler over the given parts.
    pub fn new(
        storage: Arc<Storage>,
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
        let now = now_ms();
        self.time_out(now).await?;
        let storage = self.storage.clone();
        let (checks, purges) = tokio::task::spawn_blocking(move || {
            let checks = storage.due(DueKind::Check, now, PASS_LIMIT)?;
            let mut due = Vec::with_capacity(checks.len());
            for (_, id) in checks {
                if let Some(rec) = storage.txn(id)? {
                    due.push((id, rec));
                }
            }
            Ok::<_, Error>((due, storage.due(DueKind::Purge, now, PASS_LIMIT)?))
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        let mut writes = Vec::new();
        for (id, rec) in checks {
            if !self.in_check.contains(&id) && rec.state == TxnState::Prepared as i32 {
                writes.push(self.check(id, rec, now).await?);
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

    /// Sends one check (or discards), returning the write that records it.
    async fn check(&mut self, txn: Id, rec: TxnRecord, now: u64) -> Result<Command> {
        if rec.check_count >= self.config.check_max {
            tracing::info!(%txn, group = %rec.group, "discarding after {} checks", rec.check_count);
            return Ok(Command::Discard { txn });
        }
        let storage = self.storage.clone();
        let messages = tokio::task::spawn_blocking(move || storage.halves(txn))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let check_id = self.next_check_id;
        self.next_check_id += 1;
        let frame = Frame {
            id: check_id,
            body: Some(pb::frame::Body::Check(pb::CheckRequest {
                txn_id: txn.to_string(),
                producer_group: rec.group.clone(),
                messages,
                attempt: rec.check_count + 1,
            })),
        };
        let next_check_ms = Some(now + self.config.check_wait(rec.check_count).as_millis() as u64);
        let (counted, note) = match self.producers.send_check(&rec.group, frame) {
            Picked::Sent {
                connection_id,
                pending,
            } => {
                let deadline_ms = now + self.config.check_reply_timeout.as_millis() as u64;
                self.pending.insert(
                    check_id,
                    Pending {
                        txn,
                        deadline_ms,
                        counter: pending,
                    },
                );
                self.in_check.insert(txn);
                (true, format!("check sent to connection {connection_id}"))
            }
            Picked::NoneConnected => (
                self.not_sent("no_producer"),
                format!("no producer of group {:?} connected", rec.group),
            ),
            Picked::AllBusy => (
                self.not_sent("busy"),
                format!("every producer of group {:?} was busy", rec.group),
            ),
        };
        Ok(Command::RecordCheck {
            txn,
            counted,
            result: TxnOutcome::Unspecified,
            note,
            next_check_ms,
        })
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

    /// The write an answer calls for, if it is still awaited.
    fn on_answer(&mut self, answer: CheckAnswer) -> Option<Command> {
        let Some(txn) = self.finish(answer.check_id) else {
            tracing::debug!(check_id = answer.check_id, "late or unknown check answer");
            return None;
        };
        if Id::parse(&answer.reply.txn_id) != Some(txn) {
            tracing::warn!(%txn, got = %answer.reply.txn_id, "check answer names another transaction");
            return None;
        }
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
                note: "resolved by check-back".into(),
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

/// Everything already waiting on `rx`, after `batch`.
fn drain(rx: &mut mpsc::Receiver<CheckAnswer>, mut batch: Vec<CheckAnswer>) -> Vec<CheckAnswer> {
    while let Ok(a) = rx.try_recv() {
        batch.push(a);
    }
    batch
}
