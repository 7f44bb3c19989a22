//! SQLite, through `rusqlite`: the tables this crate owns ([`migrate`]), a send bound
//! to a transaction and its checker (`txn`), and the idempotent consumer (`consume`).
//!
//! SQLite calls block; they are short local-file work, run where the caller runs (the
//! checker runs its own on the blocking pool).

mod consume;
mod txn;

pub use consume::{apply_once, consume_once, prune_processed};
pub use txn::{Checker, prune, run_local, send_in_transaction};

use rusqlite::Connection;

use crate::{Error, Result};

/// Creates the tables this crate owns if they are missing: `txmq_local_txn`
/// (transactions bound to this database) and `txmq_processed` (messages the idempotent
/// consumer applied).
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
         CREATE INDEX IF NOT EXISTS txmq_processed_at ON txmq_processed (at_ms);",
    )
    .map_err(db_err)
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::Db(Box::new(e))
}
