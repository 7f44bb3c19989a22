//! A send bound to an SQLite transaction, and the checker that answers its check-backs
//! (the rule is in the crate's docs). The producer's transaction is `BEGIN IMMEDIATE`:
//! it holds the database's write lock from its first statement, which is what the
//! checker's insert waits on.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};
use txmq_client::{CheckRequest, Message, Outcome, Producer, TransactionChecker};

use super::{db_err, migrate};
use crate::{BoxError, Committed, Error, Pending, Result, now_ms, outcome_of};

/// How long the checker waits for a producer's open transaction before answering
/// unknown.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// Sends `messages` as one transaction bound to a database transaction on `db`: the
/// half messages first, then `work` inside the database transaction, then both commit.
/// When `work` or the database fails before its commit, both roll back.
///
/// # Errors
/// As [`crate::postgres::send_in_transaction`].
pub async fn send_in_transaction<T, E>(
    producer: &Producer,
    db: &mut Connection,
    messages: Vec<Message>,
    work: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, E>,
) -> Result<T>
where
    E: Into<BoxError>,
{
    let database = super::off_the_workers(|| super::identity(db))?;
    let pending = Pending::begin(producer, &database, messages).await?;
    let (value, committed) = run_local(pending, db, work).await?;
    committed.finish().await;
    Ok(value)
}

/// Why the local transaction did not commit.
enum Local {
    /// Before COMMIT: nothing committed.
    Before(Error),
    /// COMMIT failed: the check-back decides.
    Commit(rusqlite::Error),
}

/// The database half of [`send_in_transaction`]: in one `BEGIN IMMEDIATE` transaction,
/// claims the transaction id, runs `work` and commits. On a failure before the commit,
/// rolls the messages back too.
///
/// # Errors
/// As [`send_in_transaction`].
pub async fn run_local<T, E>(
    pending: Pending,
    db: &mut Connection,
    work: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, E>,
) -> Result<(T, Committed)>
where
    E: Into<BoxError>,
{
    let local = super::off_the_workers(|| {
        let tx = db
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| Local::Before(db_err(e)))?;
        // First: while this transaction runs, it holds the id's key (and the write
        // lock).
        let claimed = tx
            .execute(
                "INSERT OR IGNORE INTO txmq_local_txn (txn_id, outcome, at_ms)
                 VALUES (?1, 'commit', ?2)",
                rusqlite::params![pending.id, now_ms()],
            )
            .map_err(|e| Local::Before(db_err(e)))?;
        if claimed != 1 {
            return Err(Local::Before(Error::Fenced(pending.id.clone())));
        }
        let value = work(&tx).map_err(|e| Local::Before(Error::Work(e.into())))?;
        tx.commit().map_err(Local::Commit)?;
        Ok(value)
    });
    match local {
        Ok(value) => Ok((value, pending.committed())),
        Err(Local::Before(e)) => pending.fail(e).await,
        Err(Local::Commit(e)) => Err(Error::CommitUnknown {
            txn_id: pending.id.clone(),
            source: Box::new(e),
        }),
    }
}

/// Answers check-backs from the table, on its own connection to the database file.
#[derive(Clone)]
pub struct Checker {
    db: Arc<Mutex<Connection>>,
    path: PathBuf,
    horizon: Duration,
    /// The database's identity: the checks it is sent are its own.
    database: String,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker").field("path", &self.path).finish()
    }
}

impl Checker {
    /// A checker on the database file at `path` (its own connection).
    ///
    /// # Errors
    /// The database's error.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Connection::open(path).map_err(db_err)?;
        db.busy_timeout(LOCK_WAIT).map_err(db_err)?;
        migrate(&db)?;
        let database = super::identity(&db)?;
        Ok(Self {
            db: Arc::new(Mutex::new(db)),
            path: path.to_path_buf(),
            horizon: crate::KEEP_ROWS,
            database,
        })
    }

    /// Transactions prepared longer ago than `horizon` are never fenced: their record
    /// may have been pruned (keep rows at least this long). Default: [`crate::KEEP_ROWS`].
    #[must_use]
    pub fn with_horizon(mut self, horizon: Duration) -> Self {
        self.horizon = horizon;
        self
    }

    /// What became of transaction `txn_id`: see the crate's docs for the rule.
    /// Blocking.
    ///
    /// # Errors
    /// The database's error (a lock wait that ran out is `Ok(Unknown)`).
    pub fn decide(&self, txn_id: &str) -> Result<Outcome> {
        self.decide_fencing(txn_id, true)
    }

    /// The rule; without `fence`, an absent record is unknown.
    fn decide_fencing(&self, txn_id: &str, fence: bool) -> Result<Outcome> {
        let db = self
            .db
            .lock()
            .map_err(|e| Error::Db(e.to_string().into()))?;
        if fence {
            let fenced = db.execute(
                "INSERT OR IGNORE INTO txmq_local_txn (txn_id, outcome, at_ms)
                 VALUES (?1, 'rollback', ?2)",
                rusqlite::params![txn_id, now_ms()],
            );
            match fenced {
                Ok(1) => return Ok(Outcome::Rollback),
                Ok(_) => {}
                Err(e) if is_busy(&e) => return Ok(Outcome::Unknown),
                Err(e) => return Err(db_err(e)),
            }
        }
        let outcome: Option<String> = db
            .query_row(
                "SELECT outcome FROM txmq_local_txn WHERE txn_id = ?1",
                [txn_id],
                |r| r.get(0),
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })
            .map_err(db_err)?;
        Ok(outcome.map_or(Outcome::Unknown, |o| outcome_of(&o)))
    }
}

impl TransactionChecker for Checker {
    fn check(
        &self,
        request: CheckRequest,
    ) -> std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>> {
        let checker = self.clone();
        Box::pin(async move {
            if crate::foreign(&request, &checker.database) {
                tracing::warn!(txn = %request.txn_id, "check-back of another database's transaction: answering unknown");
                return Outcome::Unknown;
            }
            let id = request.txn_id.clone();
            let fence = !crate::older_than(&request, checker.horizon);
            match tokio::task::spawn_blocking(move || checker.decide_fencing(&id, fence)).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(e)) => {
                    tracing::warn!(txn = %request.txn_id, "check-back: {e}; answering unknown");
                    Outcome::Unknown
                }
                Err(e) => {
                    tracing::warn!(txn = %request.txn_id, "check-back: {e}; answering unknown");
                    Outcome::Unknown
                }
            }
        })
    }

    fn scopes(&self) -> Vec<String> {
        vec![self.database.clone()]
    }
}

/// Deletes rows older than `keep` (at least [`crate::KEEP_ROWS`] is safe: see the
/// crate's docs); returns how many.
///
/// # Errors
/// The database's error.
pub fn prune(db: &Connection, keep: Duration) -> Result<u64> {
    let before = now_ms() - keep.as_millis() as i64;
    db.execute("DELETE FROM txmq_local_txn WHERE at_ms < ?1", [before])
        .map(|n| n as u64)
        .map_err(db_err)
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}
