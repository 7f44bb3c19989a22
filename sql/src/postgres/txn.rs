//! A send bound to a PostgreSQL transaction, and the checker that answers its
//! check-backs (the rule is in the crate's docs).

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use txmq_client::{CheckRequest, Message, Outcome, Producer, TransactionChecker};

use super::db_err;
use crate::{BoxError, Committed, Error, Pending, Result, now_ms, outcome_of};

/// How long the checker waits for a producer's open transaction before answering
/// unknown.
const LOCK_WAIT: &str = "1s";

/// Sends `messages` as one transaction bound to a database transaction on `db`: the
/// half messages first, then `work` inside the database transaction, then both commit.
/// When `work` or the database fails before its commit, both roll back.
///
/// # Errors
/// [`Error::Work`] with the work's error, [`Error::Db`], [`Error::Broker`] (nothing
/// committed), [`Error::Fenced`], or [`Error::CommitUnknown`] (left to the check-back).
/// A failure to commit the messages after the database committed is not an error: the
/// check-back commits them.
pub async fn send_in_transaction<T, E>(
    producer: &Producer,
    db: &mut Client,
    messages: Vec<Message>,
    work: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> Result<T, E>,
) -> Result<T>
where
    E: Into<BoxError>,
{
    let database = super::identity(db).await?;
    let pending = Pending::begin(producer, &database, messages).await?;
    let (value, committed) = run_local(pending, db, work).await?;
    committed.finish().await;
    Ok(value)
}

/// The database half of [`send_in_transaction`]: in one database transaction, claims
/// the transaction id, runs `work` and commits. On a failure before the commit, rolls
/// the messages back too.
///
/// # Errors
/// As [`send_in_transaction`].
pub async fn run_local<T, E>(
    pending: Pending,
    db: &mut Client,
    work: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> Result<T, E>,
) -> Result<(T, Committed)>
where
    E: Into<BoxError>,
{
    let tx = match db.transaction().await {
        Ok(tx) => tx,
        Err(e) => return pending.fail(db_err(e)).await,
    };
    // First: while this transaction runs, it holds the id's key.
    let claimed = tx
        .execute(
            "INSERT INTO txmq_local_txn (txn_id, outcome, at_ms) VALUES ($1, 'commit', $2)
             ON CONFLICT (txn_id) DO NOTHING",
            &[&pending.id, &now_ms()],
        )
        .await;
    match claimed {
        Ok(1) => {}
        Ok(_) => {
            drop(tx);
            let id = pending.id.clone();
            return pending.fail(Error::Fenced(id)).await;
        }
        Err(e) => {
            drop(tx);
            return pending.fail(db_err(e)).await;
        }
    }
    let value = match work(&tx).await {
        Ok(v) => v,
        Err(e) => {
            drop(tx);
            return pending.fail(Error::Work(e.into())).await;
        }
    };
    match tx.commit().await {
        Ok(()) => Ok((value, pending.committed())),
        // COMMIT was sent: it may have happened. The check-back decides from the table.
        Err(e) => Err(Error::CommitUnknown {
            txn_id: pending.id.clone(),
            source: Box::new(e),
        }),
    }
}

/// Answers check-backs from the table, on connections of its own (made again after
/// they broke, when the checker was made with [`Checker::connect`]).
#[derive(Clone)]
pub struct Checker {
    /// Its connections, taken in turn: one check waiting on a producer's lock does not
    /// hold up the others.
    pool: Arc<[tokio::sync::RwLock<Arc<Client>>]>,
    next: Arc<std::sync::atomic::AtomicUsize>,
    url: Option<Arc<str>>,
    horizon: Duration,
    /// The database's identity: the checks it is sent are its own.
    database: String,
}

/// Connections a checker made with [`Checker::connect`] keeps.
pub const CHECKER_CONNECTIONS: usize = 4;

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("horizon", &self.horizon)
            .finish_non_exhaustive()
    }
}

impl Checker {
    /// A checker on `db`, a connection of its own (its lock wait is set on it).
    ///
    /// # Errors
    /// The database's error.
    pub async fn new(db: Client) -> Result<Self> {
        prepare(&db).await?;
        let database = checked_identity(&db).await?;
        Ok(Self {
            pool: Arc::from([tokio::sync::RwLock::new(Arc::new(db))]),
            next: Arc::default(),
            url: None,
            horizon: crate::KEEP_ROWS,
            database,
        })
    }

    /// A checker on [`CHECKER_CONNECTIONS`] connections of its own to `url` (without
    /// TLS), each made again when it breaks (a database restart).
    ///
    /// # Errors
    /// The database's error.
    pub async fn connect(url: &str) -> Result<Self> {
        let mut pool = Vec::with_capacity(CHECKER_CONNECTIONS);
        for _ in 0..CHECKER_CONNECTIONS {
            let db = open(url).await?;
            prepare(&db).await?;
            pool.push(tokio::sync::RwLock::new(Arc::new(db)));
        }
        let first = pool[0].read().await.clone();
        let database = checked_identity(&first).await?;
        Ok(Self {
            pool: pool.into(),
            next: Arc::default(),
            url: Some(url.into()),
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
    ///
    /// # Errors
    /// The database's error (a lock wait that ran out is `Ok(Unknown)`).
    pub async fn decide(&self, txn_id: &str) -> Result<Outcome> {
        self.decide_fencing(txn_id, true).await
    }

    async fn decide_fencing(&self, txn_id: &str, fence: bool) -> Result<Outcome> {
        let slot = &self.pool
            [self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.pool.len()];
        let db = slot.read().await.clone();
        match decide_on(&db, txn_id, fence).await {
            Err(e) if db.is_closed() && self.url.is_some() => {
                let url = self.url.as_deref().expect("checked");
                tracing::info!("check-back: the database connection broke ({e}); connecting again");
                let fresh = Arc::new(open(url).await?);
                prepare(&fresh).await?;
                *slot.write().await = fresh.clone();
                decide_on(&fresh, txn_id, fence).await
            }
            other => other,
        }
    }
}

async fn open(url: &str) -> Result<Client> {
    let (db, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(db_err)?;
    tokio::spawn(conn);
    Ok(db)
}

/// The database's identity, making its tables first if they are missing.
async fn checked_identity(db: &Client) -> Result<String> {
    match super::identity(db).await {
        Ok(id) => Ok(id),
        Err(_) => {
            super::migrate(db).await?;
            super::identity(db).await
        }
    }
}

async fn prepare(db: &Client) -> Result<()> {
    db.batch_execute(&format!("SET lock_timeout = '{LOCK_WAIT}'"))
        .await
        .map_err(db_err)
}

/// The rule on one connection; without `fence`, an absent record is unknown.
async fn decide_on(db: &Client, txn_id: &str, fence: bool) -> Result<Outcome> {
    if fence {
        let fenced = db
            .query_opt(
                "INSERT INTO txmq_local_txn (txn_id, outcome, at_ms) VALUES ($1, 'rollback', $2)
                 ON CONFLICT (txn_id) DO NOTHING RETURNING outcome",
                &[&txn_id, &now_ms()],
            )
            .await;
        match fenced {
            Ok(Some(_)) => return Ok(Outcome::Rollback),
            Ok(None) => {}
            Err(e) if is_lock_timeout(&e) => return Ok(Outcome::Unknown),
            Err(e) => return Err(db_err(e)),
        }
    }
    // The key was taken: by a committed row (a new statement sees it).
    let row = db
        .query_opt(
            "SELECT outcome FROM txmq_local_txn WHERE txn_id = $1",
            &[&txn_id],
        )
        .await
        .map_err(db_err)?;
    Ok(row.map_or(Outcome::Unknown, |r| outcome_of(r.get::<_, &str>(0))))
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
            let fence = !crate::older_than(&request, checker.horizon);
            match checker.decide_fencing(&request.txn_id, fence).await {
                Ok(outcome) => outcome,
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
pub async fn prune(db: &Client, keep: Duration) -> Result<u64> {
    let before = now_ms() - keep.as_millis() as i64;
    db.execute("DELETE FROM txmq_local_txn WHERE at_ms < $1", &[&before])
        .await
        .map_err(db_err)
}

fn is_lock_timeout(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}
