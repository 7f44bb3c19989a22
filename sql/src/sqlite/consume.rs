//! The idempotent consumer on SQLite (see the crate's docs).

use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};
use txmq_client::Delivery;

use super::db_err;
use crate::{Applied, BoxError, Error, Result, now_ms};

/// Applies `delivery` once: in one database transaction, records its message id for its
/// consumer group and runs `work`, unless the id was recorded before; then acks (a
/// failed ack only means a redelivery, which is found recorded).
///
/// # Errors
/// [`Error::Work`] (rolled back, not acked: nack or let the lease expire),
/// [`Error::Db`], or [`Error::ApplyUnknown`].
pub async fn consume_once<T, E>(
    db: &mut Connection,
    delivery: &Delivery,
    work: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, E>,
) -> Result<Applied<T>>
where
    E: Into<BoxError>,
{
    let applied = super::off_the_workers(|| apply_once(db, delivery, work))?;
    if let Err(e) = delivery.ack().await {
        tracing::warn!(
            message = delivery.id(),
            "ack after applying failed ({e}); its redelivery will be acked"
        );
    }
    Ok(applied)
}

/// [`consume_once`] without the ack (for callers that ack in batches, or test crashes).
///
/// # Errors
/// As [`consume_once`].
pub fn apply_once<T, E>(
    db: &mut Connection,
    delivery: &Delivery,
    work: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, E>,
) -> Result<Applied<T>>
where
    E: Into<BoxError>,
{
    let tx = db
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    let fresh = tx
        .execute(
            "INSERT OR IGNORE INTO txmq_processed (consumer_group, message_id, at_ms)
             VALUES (?1, ?2, ?3)",
            rusqlite::params![delivery.handle().group, delivery.id(), now_ms()],
        )
        .map_err(db_err)?;
    if fresh != 1 {
        return Ok(Applied::Duplicate);
    }
    let value = work(&tx).map_err(|e| Error::Work(e.into()))?;
    tx.commit().map_err(|e| Error::ApplyUnknown {
        message_id: delivery.id().to_string(),
        source: Box::new(e),
    })?;
    Ok(Applied::Applied(value))
}

/// Deletes the records of messages applied longer ago than `keep`; returns how many.
/// `keep` must be longer than any message can come back (see the crate's docs).
///
/// # Errors
/// The database's error.
pub fn prune_processed(db: &Connection, keep: Duration) -> Result<u64> {
    let before = now_ms() - keep.as_millis() as i64;
    db.execute("DELETE FROM txmq_processed WHERE at_ms < ?1", [before])
        .map(|n| n as u64)
        .map_err(db_err)
}
