//! The timer: the one owner of scheduled deliveries (I5, I8).
//!
//! It sleeps until the earliest delivery time in the due index (one seek), or until the
//! writer rings because a batch scheduled something, or a second at most. Then it reads
//! the due entries up to the broker's clock — a range scan that stops at the first entry
//! not yet due, so the cost is what is due, never what waits — and hands them to the
//! writer, which appends each message to its topic in the batch that takes it off the
//! schedule. Records of delivered and cancelled messages are forgotten the same way.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use txmq_protocol::now_ms;

use crate::error::{Error, Result};
use crate::storage::StorageHandle;
use crate::storage::keys::DueKind;
use crate::storage::writer::{Command, Outcome, WriterHandle};

/// Most due entries handed to the writer at once; more go in the next round at once.
const PASS_LIMIT: usize = 1024;

/// Longest sleep: forgetting records and recovering from a failed pass need no ring.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// The timer task's state.
pub struct Timer {
    storage: StorageHandle,
    writer: WriterHandle,
}

impl Timer {
    /// A timer over the given parts.
    pub fn new(storage: StorageHandle, writer: WriterHandle) -> Self {
        Self { storage, writer }
    }

    /// Delivers until cancelled.
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            let wait = match self.pass().await {
                Ok(Some(wait)) => wait,
                // A full pass: more may be due right now.
                Ok(None) if !cancel.is_cancelled() => continue,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("timer pass failed: {e}");
                    MAX_SLEEP
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
                () = self.storage.scheduled.notified() => {}
            }
        }
    }

    /// Delivers what is due and forgets what has expired; returns how long to sleep, or
    /// `None` when it stopped at [`PASS_LIMIT`].
    async fn pass(&self) -> Result<Option<Duration>> {
        let storage = self.storage.clone();
        let now = now_ms();
        let (deliver, forget) = tokio::task::spawn_blocking(move || {
            Ok::<_, Error>((
                storage.due(DueKind::Deliver, now, PASS_LIMIT)?,
                storage.due(DueKind::Forget, now, PASS_LIMIT)?,
            ))
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        let full = deliver.len() == PASS_LIMIT || forget.len() == PASS_LIMIT;
        let mut commands: Vec<Command> = deliver
            .into_iter()
            .map(|(due_ms, id)| Command::Deliver { id, due_ms })
            .collect();
        commands.extend(
            forget
                .into_iter()
                .map(|(due_ms, id)| Command::ForgetScheduled { id, due_ms }),
        );
        if !commands.is_empty() {
            // One request: the writer stages them in order and splits them across
            // batches at its byte cap (scheduled messages carry their bodies).
            if let Outcome::Many(results) = self.writer.submit(Command::Many(commands)).await? {
                for e in results.into_iter().filter_map(Result::err) {
                    tracing::error!("scheduled delivery failed: {e}");
                }
            }
        }
        if full {
            return Ok(None);
        }
        let storage = self.storage.clone();
        let next = tokio::task::spawn_blocking(move || storage.next_due(DueKind::Deliver))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let wait = match next {
            Some(at) => Duration::from_millis(at.saturating_sub(now_ms())),
            None => MAX_SLEEP,
        };
        Ok(Some(wait.min(MAX_SLEEP)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use txmq_protocol::pb;

    use super::*;
    use crate::config::Config;
    use crate::ids::{Id, IdGen};
    use crate::metrics::Metrics;
    use crate::storage::Cf;
    use crate::storage::Storage;
    use crate::storage::keys;
    use crate::storage::writer::{Writer, WriterThread};
    use crate::topics::Topics;

    /// I5 for scheduled messages (issue 14, item 3): with a million messages scheduled
    /// an hour ahead and ten due now, a pass visits ten due entries and delivers them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pass_visits_what_is_due_not_what_waits() {
        let dir = tempfile::tempdir().unwrap();
        let storage = StorageHandle::alone(Storage::open(dir.path()).unwrap());
        let topics = Arc::new(Topics::default());
        let (writer, thread): (WriterHandle, WriterThread) = Writer::spawn(
            storage.clone(),
            topics.clone(),
            Arc::new(IdGen::new(1)),
            Arc::new(Config::default()),
            Arc::new(Metrics::new()),
        );
        let now = now_ms();
        // The waiting million: due entries only (a pass must not even read their records).
        for chunk in 0..10u64 {
            let mut batch = rocksdb::WriteBatch::default();
            for i in 0..100_000 {
                let id = Id {
                    boot: 9,
                    seq: chunk * 100_000 + i,
                };
                let at = now + 3_600_000 + i % 1000;
                batch.put_cf(storage.cf(Cf::Due), keys::due(DueKind::Deliver, at, id), []);
            }
            storage.db().write(batch).unwrap();
        }
        let due_at = now_ms() + 20;
        let messages = (0..10)
            .map(|i| pb::Message {
                topic: "t".into(),
                body: format!("m{i}").into(),
                deliver_at_ms: due_at,
                ..Default::default()
            })
            .collect();
        writer.submit(Command::append(messages)).await.unwrap();
        assert_eq!(topics.get("t").unwrap().end(), 0, "delivered early");
        while now_ms() <= due_at {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let timer = Timer::new(storage.clone(), writer.clone());
        let before = storage.counters.due_visited.load(Ordering::Relaxed);
        let wait = timer.pass().await.unwrap();
        let visited = storage.counters.due_visited.load(Ordering::Relaxed) - before;
        assert_eq!(visited, 10, "a pass visited more than what was due");
        assert_eq!(topics.get("t").unwrap().end(), 10);
        assert_eq!(wait, Some(MAX_SLEEP), "the next delivery is an hour away");
        let before = storage.counters.due_visited.load(Ordering::Relaxed);
        timer.pass().await.unwrap();
        let visited = storage.counters.due_visited.load(Ordering::Relaxed) - before;
        assert_eq!(visited, 0, "a pass with nothing due visited entries");
        assert_eq!(topics.get("t").unwrap().end(), 10, "delivered twice");

        drop((timer, writer));
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .unwrap();
    }
}
