//! SQLite, through `rusqlite`: the tables this crate owns ([`migrate`]), a send bound
//! to a transaction and its checker (`txn`), the idempotent consumer (`consume`), and
//! the outbox (`outbox`).
//!
//! SQLite calls block, and a `BEGIN IMMEDIATE` waits up to the connection's busy timeout
//! for another writer. Every call this crate makes from an async function runs off the
//! runtime's workers (`off_the_workers`: `tokio::task::block_in_place` on a
//! multi-threaded runtime), so a wait for the database's lock stalls neither the runtime
//! nor the producer's own check-back answers; the API keeps taking `&mut Connection` and
//! closures over the transaction. On a current-thread runtime there is no other thread
//! to hand the work to, and the call runs in place: use a multi-threaded runtime with
//! SQLite. The checker runs its answers on the blocking pool.

mod consume;
mod outbox;
mod txn;

pub use consume::{apply_once, consume_once, prune_processed};
pub use outbox::{Outbox, enqueue, prune_outbox};
pub use txn::{Checker, prune, run_local, send_in_transaction};

/// This database's identity: made once with its tables (the outbox's epoch), it names
/// the database in the transactions bound to it, so their check-backs reach its
/// checkers only.
///
/// # Errors
/// The database's error (the tables are missing: run [`migrate`]).
pub fn identity(db: &Connection) -> Result<String> {
    db.query_row("SELECT epoch FROM txmq_outbox_epoch LIMIT 1", [], |r| {
        r.get(0)
    })
    .map_err(db_err)
}

use rusqlite::Connection;

use crate::{Error, Result};

/// Runs `f`, which may block on the database, without stalling the async runtime: on a
/// multi-threaded runtime this worker hands its other tasks to another thread first
/// (`block_in_place`); elsewhere (no runtime, a current-thread one) it runs in place.
pub(crate) fn off_the_workers<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Creates the tables this crate owns if they are missing: `txmq_local_txn`
/// (transactions bound to this database) and `txmq_processed` (messages the idempotent
/// consumer applied), `txmq_outbox` and its epoch (the outbox relay).
///
/// # Errors
/// The database's error.
pub fn migrate(db: &Connection) -> Result<()> {
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS txmq_local_txn (
             txn_id  TEXT PRIMARY KEY,
             outcome TEXT NOT NULL CHECK (outcome IN ('commit', 'rollback')),
             at_ms   INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS txmq_processed (
             consumer_group TEXT NOT NULL,
             message_id     TEXT NOT NULL,
             at_ms          INTEGER NOT NULL,
             PRIMARY KEY (consumer_group, message_id)
         );
         CREATE INDEX IF NOT EXISTS txmq_processed_at ON txmq_processed (at_ms);
         CREATE TABLE IF NOT EXISTS txmq_outbox (
             id            INTEGER PRIMARY KEY AUTOINCREMENT,
             topic         TEXT NOT NULL,
             msg_key       TEXT NOT NULL,
             tag           TEXT NOT NULL,
             message_group TEXT NOT NULL,
             properties    TEXT NOT NULL,
             deliver_at_ms INTEGER NOT NULL,
             body          BLOB NOT NULL,
             created_ms    INTEGER NOT NULL,
             sent_ms       INTEGER,
             failed_ms     INTEGER,
             error         TEXT
         );
         CREATE INDEX IF NOT EXISTS txmq_outbox_pending ON txmq_outbox (id)
             WHERE sent_ms IS NULL AND failed_ms IS NULL;
         CREATE TABLE IF NOT EXISTS txmq_outbox_epoch (epoch TEXT NOT NULL);",
    )
    .map_err(db_err)?;
    db.execute(
        "INSERT INTO txmq_outbox_epoch (epoch)
             SELECT ?1 WHERE NOT EXISTS (SELECT 1 FROM txmq_outbox_epoch)",
        [crate::outbox::new_epoch()],
    )
    .map_err(db_err)?;
    Ok(())
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::Db(Box::new(e))
}
