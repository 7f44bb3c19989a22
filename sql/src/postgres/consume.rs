//! The idempotent consumer on PostgreSQL (see the crate's docs).

use std::time::Duration;

use tokio_postgres::Client;
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
    db: &mut Client,
    delivery: &Delivery,
    work: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> Result<T, E>,
) -> Result<Applied<T>>
where
    E: Into<BoxError>,
{
    let applied = apply_once(db, delivery, work).await?;
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
pub async fn apply_once<T, E>(
    db: &mut Client,
    delivery: &Delivery,
    work: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> Result<T, E>,
) -> Result<Applied<T>>
where
    E: Into<BoxError>,
{
    let group = &delivery.handle().group;
    let tx = db.transaction().await.map_err(db_err)?;
    let fresh = tx
        .execute(
            "INSERT INTO txmq_processed (consumer_group, message_id, at_ms) VALUES ($1, $2, $3)
             ON CONFLICT (consumer_group, message_id) DO NOTHING",
            &[group, &delivery.id(), &now_ms()],
        )
        .await
        .map_err(db_err)?;
    if fresh != 1 {
        return Ok(Applied::Duplicate);
    }
    let value = work(&tx).await.map_err(|e| Error::Work(e.into()))?;
    tx.commit().await.map_err(|e| Error::ApplyUnknown {
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
pub async fn prune_processed(db: &Client, keep: Duration) -> Result<u64> {
    let before = now_ms() - keep.as_millis() as i64;
    db.execute("DELETE FROM txmq_processed WHERE at_ms < $1", &[&before])
        .await
        .map_err(db_err)
}
