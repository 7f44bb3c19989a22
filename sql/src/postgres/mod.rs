//! PostgreSQL, through `tokio-postgres`: the tables this crate owns ([`migrate`]), a
//! send bound to a transaction and its checker (`txn`), and the idempotent consumer
//! (`consume`).

mod consume;
mod txn;

pub use consume::{apply_once, consume_once, prune_processed};
pub use txn::{Checker, prune, run_local, send_in_transaction};

use tokio_postgres::Client;

use crate::{Error, Result};

/// Creates the tables this crate owns if they are missing (safe to run from several
/// processes at once): `txmq_local_txn` (transactions bound to this database) and
/// `txmq_processed` (messages the idempotent consumer applied).
///
/// # Errors
/// The database's error.
pub async fn migrate(db: &Client) -> Result<()> {
    db.batch_execute(
        "BEGIN;
         SELECT pg_advisory_xact_lock(7478237600418);
         CREATE TABLE IF NOT EXISTS txmq_local_txn (
             txn_id  TEXT PRIMARY KEY,
             outcome TEXT NOT NULL CHECK (outcome IN ('commit', 'rollback')),
             at_ms   BIGINT NOT NULL
         );
         CREATE TABLE IF NOT EXISTS txmq_processed (
             consumer_group TEXT NOT NULL,
             message_id     TEXT NOT NULL,
             at_ms          BIGINT NOT NULL,
             PRIMARY KEY (consumer_group, message_id)
         );
         CREATE INDEX IF NOT EXISTS txmq_processed_at ON txmq_processed (at_ms);
         COMMIT;",
    )
    .await
    .map_err(db_err)
}

fn db_err(e: tokio_postgres::Error) -> Error {
    Error::Db(Box::new(e))
}
