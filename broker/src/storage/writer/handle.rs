//! The sending side of the writer ([`WriterHandle`]) and its threads ([`WriterThread`]).

use tokio::sync::{mpsc, oneshot};

use super::{Command, Outcome};
use crate::error::{Error, Result};

/// A request to the writer, from its submission to its one answer.
///
/// **Every job is answered exactly once, and an OK only once what it wrote and what it
/// read is durable.** This type keeps the first half: the answer is sent by consuming the
/// job ([`Job::answer`]), the rest of a [`Command::Many`] cut short by a batch's cap
/// carries the reply on ([`Job::continued`]), and a job dropped unanswered panics in
/// debug builds (in release builds it answers [`Error::ShuttingDown`], what its
/// submitter would read from a closed channel anyway). The syncer keeps the second half:
/// it receives the jobs of each batch in order, with their results, and answers them
/// after the fsync that covers the batch (`sync::sync_loop`).
pub(super) struct Job {
    cmd: Command,
    /// [`Command::bytes`], measured on the submitter's thread rather than the writer's.
    bytes: usize,
    /// For the rest of a [`Command::Many`] that did not fit in one batch: the outcomes of
    /// the commands staged in earlier batches, which go first in its answer.
    done: Vec<Result<Outcome>>,
    /// `None` once answered.
    reply: Option<oneshot::Sender<Result<Outcome>>>,
}

impl Job {
    pub(super) fn new(cmd: Command, reply: oneshot::Sender<Result<Outcome>>) -> Self {
        let bytes = cmd.bytes();
        Self {
            cmd,
            bytes,
            done: Vec::new(),
            reply: Some(reply),
        }
    }

    /// [`Command::bytes`] of its command.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Its command, to stage (a job is staged once), and the outcomes of a `Many`'s
    /// commands staged in earlier batches.
    pub(super) fn take(&mut self) -> (Command, Vec<Result<Outcome>>) {
        (
            std::mem::replace(&mut self.cmd, Command::Raw(Vec::new())),
            std::mem::take(&mut self.done),
        )
    }

    /// The rest of this job's `Many`, left for the next batch with the outcomes of what
    /// was staged so far: the one answer comes after its last batch.
    pub(super) fn continued(mut self, rest: Vec<Command>, done: Vec<Result<Outcome>>) -> Self {
        let cmd = Command::Many(rest);
        Self {
            bytes: cmd.bytes(),
            cmd,
            done,
            reply: self.reply.take(),
        }
    }

    /// Sends its one answer.
    pub(super) fn answer(mut self, result: Result<Outcome>) {
        if let Some(reply) = self.reply.take() {
            // The submitter may have gone: nothing waits for the answer then.
            let _ = reply.send(result);
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(reply) = self.reply.take() {
            // (Not while unwinding: a panicking writer drops what it holds.)
            if cfg!(debug_assertions) && !std::thread::panicking() {
                panic!("a writer job was dropped without an answer");
            }
            let _ = reply.send(Err(Error::ShuttingDown));
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
        self.submit_to(cmd, reply).await;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Submits a command; the answer arrives on `reply`.
    pub async fn submit_to(&self, cmd: Command, reply: oneshot::Sender<Result<Outcome>>) {
        // Room first, then the job: a submitter cancelled while it waits for room (its
        // connection closed) holds no job, so none is dropped unanswered.
        match self.tx.reserve().await {
            Ok(permit) => permit.send(Job::new(cmd, reply)),
            Err(_) => {
                let _ = reply.send(Err(Error::ShuttingDown));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 25, "Shape": a job the writer loses track of is a bug found at once in
    /// debug builds, not a request left to time out.
    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "dropped without an answer")]
    fn a_job_dropped_unanswered_panics_in_debug_builds() {
        let (reply, _rx) = oneshot::channel();
        drop(Job::new(Command::Raw(Vec::new()), reply));
    }

    #[test]
    fn a_job_is_answered_once_and_a_continuation_carries_the_reply() {
        let (reply, mut rx) = oneshot::channel();
        let mut job = Job::new(Command::Many(vec![Command::Raw(Vec::new())]), reply);
        let (_cmd, done) = job.take();
        assert!(done.is_empty());
        let mut rest = job.continued(vec![Command::Raw(Vec::new())], vec![Ok(Outcome::Done)]);
        assert!(rx.try_recv().is_err(), "answered before its last batch");
        let (_cmd, done) = rest.take();
        assert_eq!(done.len(), 1);
        rest.answer(Ok(Outcome::Many(done)));
        assert!(matches!(rx.try_recv(), Ok(Ok(Outcome::Many(v))) if v.len() == 1));
    }
}
