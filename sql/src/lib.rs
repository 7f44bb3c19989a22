//! The service side of a transactional message, done for the user, on PostgreSQL
//! ([`postgres`], through `tokio-postgres`) and SQLite ([`sqlite`], through `rusqlite`).
//!
//! **A send bound to a database transaction.** One call stores the half messages, runs
//! the caller's work inside a database transaction that also records the txmq
//! transaction id in a table this crate owns (`txmq_local_txn`), commits the database,
//! then commits the messages; on failure before the database commit, both roll back.
//!
//! **Its check-back answer** ([`postgres::Checker`], [`sqlite::Checker`]): if the
//! producer died between the two commits, the broker asks; the checker answers from the
//! table. The rule is a fence, not a guess:
//! - the producer's transaction inserts the id row (`commit`) *first*, so while it runs
//!   it holds that key;
//! - the checker tries to insert the same id as `rollback`. If that succeeds, the
//!   producer's transaction never committed, and now never can (its own insert would
//!   find the key taken and it rolls back): answer **rollback**. If the key is taken by
//!   a committed row, answer what the row says (**commit**). If the producer's
//!   transaction is still open, the insert waits on its key; past the checker's lock
//!   wait (1 s) the answer is **unknown**, and the broker asks again later.
//!
//! No clock and no age threshold is involved, so a slow transaction is never rolled
//! back under its feet. The rule holds for the database the transaction was recorded
//! in: each database has an identity (made once, kept in its `txmq_outbox_epoch` table),
//! the half messages carry it, and the checker declares it, so the broker asks only
//! that database's checkers (a producer group may span shards or tenants). Half messages
//! prepared before identities existed carry none, and any checker answers them by the
//! fence, as before. Rows must outlive every check-back of their transaction: prune
//! ([`postgres::prune`], [`sqlite::prune`]) only what is older than the broker's
//! `discarded_retention` (7 days) plus a margin; [`KEEP_ROWS`] is the default. As a
//! second guard, a transaction prepared longer ago than the checker's horizon (the
//! same 14 days by default) is never fenced: an absent record then answers unknown,
//! for an operator to resolve, rather than rollback.
//!
//! **The idempotent consumer** (`consume_once`): applies a delivery's effect and records
//! the message id (per consumer group) in `txmq_processed` in the same database
//! transaction, then acks. A redelivery finds the row and is acked without being
//! applied again; two deliveries of one message at once wait on each other's key.
//! Rows are pruned after a retention the user sets (`prune_processed`): longer than any
//! message can be redelivered (leases, retries, a dead letter's redrive).
//!
//! **The outbox relay** ([`outbox`]): messages written in the caller's transaction
//! (`enqueue`), sent in order by a relay with their row ids as idempotency keys, and
//! marked sent; the service keeps working while the broker is down.
//!
//! The steps are public too ([`Pending`], [`Committed`]) for callers that need to place
//! their own work between them (the crash tests kill a process at each).

pub mod outbox;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use txmq_client::{Message, Outcome, Producer, Transaction};

/// Rows of `txmq_local_txn` younger than this are kept by the prune helpers' default:
/// twice the broker's default `discarded_retention`, during which an operator may
/// re-arm a transaction and it is checked again.
pub const KEEP_ROWS: std::time::Duration = std::time::Duration::from_secs(14 * 24 * 3600);

/// The table this crate owns, its columns, and what they hold.
pub const TABLE: &str = "txmq_local_txn";

/// An error of the caller's own work.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker refused or could not be reached (nothing was committed locally).
    #[error("txmq: {0}")]
    Broker(#[from] txmq_client::Error),
    /// The database failed before its commit: both sides rolled back.
    #[error("database: {0}")]
    Db(BoxError),
    /// The caller's work failed: both sides rolled back.
    #[error("the work in the transaction failed: {0}")]
    Work(BoxError),
    /// A check-back decided this transaction first (rolled back: the producer took
    /// longer than the broker's check timeout to start its database transaction).
    #[error("transaction {0} was already rolled back by a check-back")]
    Fenced(String),
    /// The database commit failed in a way that leaves its outcome unknown (the
    /// connection dropped during COMMIT): the messages are left to the check-back,
    /// which answers from the table.
    #[error("the database commit of transaction {txn_id} may or may not have happened: {source}")]
    CommitUnknown {
        /// The txmq transaction.
        txn_id: String,
        /// The database's error.
        source: BoxError,
    },
    /// The database commit of a message's effect failed in a way that leaves its
    /// outcome unknown: the message is not acked, and its redelivery finds out (applied
    /// once either way).
    #[error(
        "the database commit of message {message_id}'s effect may or may not have happened: {source}"
    )]
    ApplyUnknown {
        /// The message.
        message_id: String,
        /// The database's error.
        source: BoxError,
    },
    /// The outbox relay stopped: the broker is configured so that the relay cannot
    /// work with it (it remembers no idempotency keys, or refuses the relay's
    /// credentials). Nothing was set aside; the rows wait.
    #[error("outbox relay stopped: {source}; {why}")]
    RelayStopped {
        /// What to fix.
        why: String,
        /// The broker's refusal.
        source: txmq_client::Error,
    },
}

/// What [`postgres::consume_once`] and [`sqlite::consume_once`] did with a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied<T> {
    /// Its effect was applied now (and recorded, in the same database transaction).
    Applied(T),
    /// It had been applied before (a redelivery): nothing was done again.
    Duplicate,
}

/// A result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Half messages stored, no database work yet.
#[derive(Debug)]
pub struct Pending {
    message: Transaction,
    id: String,
}

impl Pending {
    /// Stores `messages` as the half messages of a new transaction of `producer`'s
    /// group (it needs one, with this crate's checker), to be recorded in the database
    /// whose identity is `database` ([`postgres::identity`], [`sqlite::identity`]). The
    /// messages carry it ([`txmq_client::CHECK_SCOPE_PROPERTY`]), so the transaction's
    /// check-backs go only to checkers of that database: a checker of another one would
    /// find no record and fence it, rolling back work that committed (a producer group
    /// shared by two databases).
    ///
    /// # Errors
    /// The broker refused or could not be reached.
    pub async fn begin(
        producer: &Producer,
        database: &str,
        mut messages: Vec<Message>,
    ) -> Result<Self> {
        for m in &mut messages {
            m.properties.insert(
                txmq_client::CHECK_SCOPE_PROPERTY.into(),
                database.to_string(),
            );
        }
        let mut message = producer.begin()?;
        message.send_batch(messages).await?;
        let id = message
            .id()
            .ok_or_else(|| {
                Error::Broker(txmq_client::Error::Unexpected(
                    "a transaction without an id".into(),
                ))
            })?
            .to_string();
        Ok(Self { message, id })
    }

    /// The txmq transaction id (what the table records).
    pub fn txn_id(&self) -> &str {
        &self.id
    }

    /// Rolls the messages back (the local work did not commit).
    ///
    /// # Errors
    /// The broker could not be told; the check-back then finds no committed row and
    /// rolls back.
    pub async fn roll_back(self) -> Result<()> {
        let mut message = self.message;
        message.rollback().await?;
        Ok(())
    }

    /// The local transaction committed: what is left is the messages' commit.
    fn committed(self) -> Committed {
        Committed {
            message: self.message,
        }
    }

    /// Rolls back after a failure before the local commit, and returns that failure.
    async fn fail<T>(self, e: Error) -> Result<T> {
        let id = self.id.clone();
        if let Err(r) = self.roll_back().await {
            tracing::warn!(txn = %id, "rolling back the messages failed ({r}); the check-back will");
        }
        Err(e)
    }
}

/// The local transaction committed; the messages are not yet.
#[derive(Debug)]
pub struct Committed {
    message: Transaction,
}

impl Committed {
    /// Commits the messages: they become visible.
    ///
    /// # Errors
    /// The broker could not be told. Nothing is lost: the check-back finds the committed
    /// row and commits them.
    pub async fn commit_message(self) -> Result<()> {
        let mut message = self.message;
        message.commit().await?;
        Ok(())
    }

    /// Commits the messages, and when the broker cannot be told, leaves them to the
    /// check-back (which commits them) with a warning instead of an error.
    pub async fn finish(self) {
        let id = self.message.id().unwrap_or_default().to_string();
        if let Err(e) = self.commit_message().await {
            tracing::warn!(txn = %id, "committing the messages failed ({e}); the check-back will commit them");
        }
    }
}

/// The outcome a row of the table records.
fn outcome_of(text: &str) -> Outcome {
    match text {
        "commit" => Outcome::Commit,
        "rollback" => Outcome::Rollback,
        _ => Outcome::Unknown,
    }
}

/// Whether a check-back's transaction belongs to another database than `mine` (its
/// messages name another identity). The broker routes checks by identity, so this does
/// not happen; a checker that is asked anyway answers unknown rather than fence.
fn foreign(request: &txmq_client::CheckRequest, mine: &str) -> bool {
    request.messages.iter().any(|m| {
        m.properties
            .get(txmq_client::CHECK_SCOPE_PROPERTY)
            .is_some_and(|theirs| theirs != mine)
    })
}

/// Whether a check-back's transaction was prepared longer ago than `horizon` (by its
/// half messages' stored times): its record may have been pruned, so the checker must
/// not fence it (an absent record then means unknown, not "never committed").
fn older_than(request: &txmq_client::CheckRequest, horizon: std::time::Duration) -> bool {
    let prepared = request
        .messages
        .iter()
        .map(|m| m.store_ms)
        .min()
        .unwrap_or(0);
    prepared > 0 && (now_ms() as u64).saturating_sub(prepared) > horizon.as_millis() as u64
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
