//! PostgreSQL, through `tokio-postgres`: the tables this crate owns ([`migrate`]), a
//! send bound to a transaction and its checker (`txn`), the idempotent consumer
//! (`consume`), and the outbox (`outbox`).

mod consume;
mod outbox;
mod txn;

pub use consume::{apply_once, consume_once, prune_processed};
pub use outbox::{Outbox, enqueue, prune_outbox};
pub use txn::{CHECKER_CONNECTIONS, Checker, prune, run_local, send_in_transaction};

/// This database's identity: made once with its tables (the outbox's epoch), it names
/// the database in the transactions bound to it, so their check-backs reach its
/// checkers only.
///
/// # Errors
/// The database's error (the tables are missing: run [`migrate`]).
pub async fn identity(db: &Client) -> Result<String> {
    db.query_one("SELECT epoch FROM txmq_outbox_epoch LIMIT 1", &[])
        .await
        .map(|r| r.get(0))
        .map_err(db_err)
}

use tokio_postgres::Client;

use crate::{Error, Result};

/// Creates the tables this crate owns if they are missing (safe to run from several
/// processes at once): `txmq_local_txn` (transactions bound to this database) and
/// `txmq_processed` (messages the idempotent consumer applied), `txmq_outbox` and its
/// epoch (the outbox relay).
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
         CREATE TABLE IF NOT EXISTS txmq_outbox (
             id            BIGSERIAL PRIMARY KEY,
             topic         TEXT NOT NULL,
             msg_key       TEXT NOT NULL,
             tag           TEXT NOT NULL,
             message_group TEXT NOT NULL,
             properties    TEXT NOT NULL,
             deliver_at_ms BIGINT NOT NULL,
             body          BYTEA NOT NULL,
             created_ms    BIGINT NOT NULL,
             sent_ms       BIGINT,
             failed_ms     BIGINT,
             error         TEXT
         );
         CREATE INDEX IF NOT EXISTS txmq_outbox_pending ON txmq_outbox (id)
             WHERE sent_ms IS NULL AND failed_ms IS NULL;
         CREATE TABLE IF NOT EXISTS txmq_outbox_epoch (epoch TEXT NOT NULL);",
    )
    .await
    .map_err(db_err)?;
    // The epoch is hex: safe to write into the statement.
    db.batch_execute(&format!(
        "INSERT INTO txmq_outbox_epoch (epoch)
             SELECT '{}' WHERE NOT EXISTS (SELECT 1 FROM txmq_outbox_epoch);
         COMMIT;",
        crate::outbox::new_epoch()
    ))
    .await
    .map_err(db_err)
}

fn db_err(e: tokio_postgres::Error) -> Error {
    Error::Db(Box::new(e))
}
