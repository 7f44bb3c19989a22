//! Retention: the sweep that removes old messages, so the log does not grow forever (I9).
//!
//! Every `retention-interval` it looks at each topic: the first offset to keep is the
//! first message stored within `retention` (a binary search over the log: offsets are
//! stored in time order, since one writer stamps them as it appends), or later when the
//! topic's log is over `retention-bytes` (RocksDB's estimate of its files). Everything
//! below goes in one range delete through the writer; then that key range is compacted,
//! so the disk space comes back. Groups behind the new start move on by themselves (see
//! the queue's `follow_retention`).
//!
//! In a broker group the leader sweeps, and its range deletes reach every node through
//! the log. Compaction is each node's own business, though: a follower runs
//! [`follower_compaction`] so the space comes back on its disk too.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use txmq_protocol::now_ms;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::storage::writer::{Command, WriterHandle};
use crate::storage::{Storage, StorageHandle};
use crate::topics::{Topic, Topics};

/// Index garbage below which the indexes are left to RocksDB's own compactions.
const INDEX_GARBAGE_MIN: u64 = 100_000;

/// The sweep task's state.
pub struct Sweeper {
    storage: StorageHandle,
    writer: WriterHandle,
    topics: Arc<Topics>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
}

impl Sweeper {
    /// A sweeper over the given parts.
    pub fn new(
        storage: StorageHandle,
        writer: WriterHandle,
        topics: Arc<Topics>,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            storage,
            writer,
            topics,
            config,
            metrics,
        }
    }

    /// Sweeps every `retention-interval` until cancelled.
    pub async fn run(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.retention_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let topics = self.topics.all();
            let by_size =
                self.config.retention_bytes > 0 || topics.iter().any(|t| t.retention().1 > 0);
            if by_size {
                // Sizes are known for what is in files: the newest writes go there first.
                let storage = self.storage.clone();
                let flushed = tokio::task::spawn_blocking(move || storage.flush_logs()).await;
                if let Ok(Err(e)) = flushed {
                    tracing::warn!("retention could not flush the logs to measure them: {e}");
                }
            }
            for topic in &topics {
                if cancel.is_cancelled() {
                    return;
                }
                if let Err(e) = self.sweep(topic).await {
                    tracing::warn!(topic = %topic.name, "retention sweep failed: {e}");
                }
            }
            self.publish_usage(&topics).await;
            // The indexes once their garbage is as large as what they keep (see
            // `storage::index`): each entry rewritten is paid for by one removed.
            let kept: u64 = topics
                .iter()
                .map(|t| t.end().saturating_sub(t.start()))
                .sum();
            if self.storage.index_garbage() >= kept.max(INDEX_GARBAGE_MIN) {
                let storage = self.storage.clone();
                let _ = tokio::task::spawn_blocking(move || storage.compact_indexes()).await;
            }
        }
    }

    /// Each topic's bytes on disk and oldest message age, for the metrics.
    async fn publish_usage(&self, topics: &[Arc<Topic>]) {
        let storage = self.storage.clone();
        let live: Vec<_> = topics.iter().filter(|t| !t.is_deleted()).cloned().collect();
        let usage = tokio::task::spawn_blocking(move || {
            live.into_iter()
                .filter_map(|t| {
                    let usage = storage.topic_usage(t.id, t.start(), t.end()).ok()?;
                    Some((t, usage))
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let now = now_ms();
        for (topic, (bytes, oldest_ms)) in usage {
            if topic.is_deleted() {
                // Deleted meanwhile: its series went with it.
                continue;
            }
            let labels = [topic.name.as_str()];
            self.metrics
                .topic_bytes
                .with_label_values(&labels)
                .set(bytes as i64);
            let age = if oldest_ms == 0 {
                0
            } else {
                now.saturating_sub(oldest_ms)
            };
            self.metrics
                .topic_oldest_age_seconds
                .with_label_values(&labels)
                .set(age as f64 / 1000.0);
        }
    }

    /// Removes what `topic` no longer keeps.
    async fn sweep(&self, topic: &Arc<Topic>) -> Result<()> {
        let (start, end) = (topic.start(), topic.end());
        if start >= end || topic.is_deleted() {
            return Ok(());
        }
        let (own_ms, own_bytes) = topic.retention();
        let keep_ms = if own_ms > 0 {
            own_ms
        } else {
            self.config.retention.as_millis() as u64
        };
        let keep_bytes = if own_bytes > 0 {
            own_bytes
        } else {
            self.config.retention_bytes
        };
        let storage = self.storage.clone();
        let id = topic.id;
        let cutoff = now_ms().saturating_sub(keep_ms);
        let to = tokio::task::spawn_blocking(move || -> Result<u64> {
            let by_age = storage.first_stored_at_or_after(id, start, end, cutoff)?;
            let by_size = if keep_bytes > 0 {
                storage.first_within_bytes(id, start, end, keep_bytes)
            } else {
                start
            };
            Ok(by_age.max(by_size))
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        if to <= start {
            return Ok(());
        }
        self.writer
            .submit(Command::Retain {
                topic: topic.clone(),
                to,
            })
            .await?;
        let removed = topic.start().saturating_sub(start);
        self.metrics
            .retention_removed
            .with_label_values(&[topic.name.as_str()])
            .inc_by(removed);
        tracing::info!(topic = %topic.name, from = start, to = topic.start(), "retention removed {removed} messages");
        // The range delete hides them; compaction gives the space back.
        let storage = self.storage.clone();
        let to = topic.start();
        tokio::task::spawn_blocking(move || storage.compact_log(id, to))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(())
    }
}

/// A broker group follower's share of retention: the leader's range deletes came
/// through the log, so this compacts what they removed, on this node's disk. Reads
/// every topic's floor from storage, compacts each log that moved (and each deleted
/// topic's, once) since the last call, whose progress `compacted` keeps, and rewrites
/// the indexes when their garbage outweighs what they keep. Stops between steps once
/// `stop` is cancelled.
///
/// # Errors
/// Storage failure.
pub fn follower_compaction(
    storage: &Storage,
    compacted: &mut HashMap<u32, u64>,
    stop: &CancellationToken,
) -> Result<()> {
    storage.refresh_floors()?;
    let topics = storage.topics()?;
    let deleted = storage.deleted_topics()?;
    // Only topics that still have a record are remembered.
    let known: std::collections::HashSet<u32> = topics
        .iter()
        .map(|t| t.record.id)
        .chain(deleted.iter().copied())
        .collect();
    compacted.retain(|id, _| known.contains(id));
    let mut kept = 0;
    for t in &topics {
        if stop.is_cancelled() {
            return Ok(());
        }
        let (id, to) = (t.record.id, t.record.start);
        kept += t.end.saturating_sub(to);
        if to > compacted.get(&id).copied().unwrap_or(0) {
            storage.compact_log(id, to);
            compacted.insert(id, to);
        }
    }
    for id in deleted {
        if stop.is_cancelled() {
            return Ok(());
        }
        if compacted.get(&id) != Some(&u64::MAX) {
            storage.compact_log(id, u64::MAX);
            compacted.insert(id, u64::MAX);
        }
    }
    if !stop.is_cancelled() && storage.index_garbage() >= kept.max(INDEX_GARBAGE_MIN) {
        storage.compact_indexes();
    }
    Ok(())
}
