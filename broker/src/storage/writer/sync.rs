//! The syncer thread: fsync, then publish and reply, in batch order.

use std::sync::atomic::Ordering;

use super::handle::Job;
use super::lost_in_write;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::storage::Storage;
use crate::topics::Topics;

use super::Outcome;

/// A batch on its way to the syncer: written to RocksDB (not yet fsynced) or refused.
pub(super) struct Written {
    /// The batch's jobs, each with the answer it gets once the batch is durable.
    pub(super) answers: Vec<(Job, Result<Outcome>)>,
    /// It wrote something, so its replies wait for an fsync.
    pub(super) wrote: bool,
    /// Topic ends to publish (make visible to consumers) once durable.
    pub(super) ends: Vec<(u32, u64)>,
    /// Topics' new first kept offsets, for the indexes' compaction filters.
    pub(super) floors: Vec<(u32, u64)>,
    /// Messages removed: their index entries become garbage.
    pub(super) removed: u64,
    pub(super) tally: Tally,
}

/// The syncer thread: one fsync of the WAL for every batch written since the last one,
/// then, in order, makes their messages visible, counts them, and replies. (With
/// `flush = async` it skips the fsync and keeps the order.)
pub(super) fn sync_loop(
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
                    for (id, start) in w.floors {
                        storage.floors.set(id, start);
                    }
                    storage.add_index_garbage(w.removed);
                    w.tally.publish(metrics);
                    if w.tally.scheduled > 0 {
                        // Perhaps earlier than the timer planned to wake.
                        storage.scheduled.notify_one();
                    }
                    for (job, result) in w.answers {
                        job.answer(result);
                    }
                }
                // Every batch of the group fails, also one that wrote nothing: its answer
                // (a repeated commit or ack) stood on writes that are not durable now.
                Err(e) => {
                    for (job, result) in w.answers {
                        job.answer(lost_in_write(result, e));
                    }
                }
            }
        }
    }
}

/// What a batch did, published to the metrics only once it is durable.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) sent: u64,
    /// Sends answered with an earlier receipt (idempotency keys seen before).
    pub(super) deduplicated: u64,
    /// gRPC sends under a message id in use for another message (stored).
    pub(super) dedup_conflicts: u64,
    pub(super) halves_sent: u64,
    pub(super) halves_removed: u64,
    pub(super) committed: u64,
    pub(super) rolled_back: u64,
    pub(super) discarded: u64,
    /// Messages held back for later, delivered at their time, and cancelled.
    pub(super) scheduled: u64,
    pub(super) delivered: u64,
    pub(super) cancelled: u64,
    /// How late each delivery was (ms past its time).
    pub(super) lateness_ms: Vec<u64>,
}

impl Tally {
    fn publish(&self, m: &Metrics) {
        m.messages_sent.inc_by(self.sent);
        m.sends_deduplicated.inc_by(self.deduplicated);
        m.sends_dedup_conflicts.inc_by(self.dedup_conflicts);
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
        m.scheduled_pending
            .add(self.scheduled as i64 - self.delivered as i64 - self.cancelled as i64);
        m.scheduled_delivered.inc_by(self.delivered);
        for &ms in &self.lateness_ms {
            m.schedule_lateness_seconds.observe(ms as f64 / 1000.0);
        }
    }
}
