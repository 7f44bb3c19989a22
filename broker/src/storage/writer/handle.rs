//! The sending side of the writer ([`WriterHandle`]) and its threads ([`WriterThread`]).

use tokio::sync::{mpsc, oneshot};

use super::{Command, Outcome};
use crate::error::{Error, Result};

pub(super) struct Job {
    pub(super) cmd: Command,
    pub(super) reply: oneshot::Sender<Result<Outcome>>,
    /// [`Command::bytes`], measured on the submitter's thread rather than the writer's.
    pub(super) bytes: usize,
    /// For the rest of a [`Command::Many`] that did not fit in one batch: the outcomes of
    /// the commands staged in earlier batches, which go first in its answer.
    pub(super) prefix: Vec<Result<Outcome>>,
}

impl Job {
    pub(super) fn new(cmd: Command, reply: oneshot::Sender<Result<Outcome>>) -> Self {
        let bytes = cmd.bytes();
        Self {
            cmd,
            reply,
            bytes,
            prefix: Vec::new(),
        }
    }
}

/// The sending side of the writer.
#[derive(Debug, Clone)]
pub struct WriterHandle {
    pub(super) tx: mpsc::Sender<Job>,
}

impl WriterHandle {
    /// Submits a command and waits until it is durable (or refused).
    ///
    /// # Errors
    /// The command's own refusal, a storage failure, or [`Error::ShuttingDown`].
    pub async fn submit(&self, cmd: Command) -> Result<Outcome> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::new(cmd, reply))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Submits a command; the answer arrives on `reply`.
    pub async fn submit_to(&self, cmd: Command, reply: oneshot::Sender<Result<Outcome>>) {
        if let Err(mpsc::error::SendError(job)) = self.tx.send(Job::new(cmd, reply)).await {
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
pub struct WriterThread(pub(super) Option<std::thread::JoinHandle<()>>);

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
