//! The outbox on PostgreSQL (see `crate::outbox`): `enqueue` in the caller's
//! transaction, and the relay's store, woken by `NOTIFY txmq_outbox`.
//!
//! Rows are sent in id order as the relay sees them committed. Ids come from a
//! sequence, taken before commit: two transactions that commit in the other order than
//! their ids can have their rows sent in commit order. Put messages that must stay in
//! order in one transaction, or in one message group written by one writer.

use std::time::Duration;

use futures::StreamExt;
use tokio_postgres::{AsyncMessage, Client};
use txmq_client::Message;

use super::db_err;
use crate::outbox::{Row, Store};
use crate::{Result, now_ms};

/// Writes `message` into the outbox in the caller's transaction `tx`, and notifies the
/// relay (at commit); returns the row's id.
///
/// # Errors
/// The database's error.
pub async fn enqueue(tx: &tokio_postgres::Transaction<'_>, message: &Message) -> Result<i64> {
    let (properties, deliver_at_ms) = Row::columns(message);
    let row = tx
        .query_one(
            "INSERT INTO txmq_outbox
                 (topic, msg_key, tag, message_group, properties, deliver_at_ms, body, created_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
            &[
                &message.topic,
                &message.key,
                &message.tag,
                &message.message_group,
                &properties,
                &deliver_at_ms,
                &message.body.as_ref(),
                &now_ms(),
            ],
        )
        .await
        .map_err(db_err)?;
    tx.batch_execute("NOTIFY txmq_outbox")
        .await
        .map_err(db_err)?;
    Ok(row.get(0))
}

/// The relay's side of the outbox: its own connection, listening for notifications.
pub struct Outbox {
    db: Client,
    woken: tokio::sync::mpsc::Receiver<()>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

impl Outbox {
    /// Connects to `url` (a `tokio-postgres` connection string, without TLS), creates
    /// the tables if missing, and listens on `txmq_outbox`.
    ///
    /// # Errors
    /// The database's error.
    pub async fn connect(url: &str) -> Result<Self> {
        let (db, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(db_err)?;
        let (wake, woken) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => {
                        let _ = wake.try_send(());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!("outbox relay: the database connection ended: {e}");
                        return;
                    }
                }
            }
        });
        super::migrate(&db).await?;
        db.batch_execute("LISTEN txmq_outbox")
            .await
            .map_err(db_err)?;
        Ok(Self { db, woken })
    }
}

impl Store for Outbox {
    async fn epoch(&mut self) -> Result<String> {
        let row = self
            .db
            .query_one("SELECT epoch FROM txmq_outbox_epoch LIMIT 1", &[])
            .await
            .map_err(db_err)?;
        Ok(row.get(0))
    }

    async fn pending(&mut self, limit: usize) -> Result<Vec<Row>> {
        let rows = self
            .db
            .query(
                "SELECT id, topic, msg_key, tag, message_group, properties, deliver_at_ms, body,
                        created_ms
                 FROM txmq_outbox WHERE sent_ms IS NULL AND failed_ms IS NULL
                 ORDER BY id LIMIT $1",
                &[&(limit as i64)],
            )
            .await
            .map_err(db_err)?;
        Ok(rows
            .iter()
            .map(|r| Row {
                id: r.get(0),
                topic: r.get(1),
                key: r.get(2),
                tag: r.get(3),
                message_group: r.get(4),
                properties: Row::properties_of(r.get(5)),
                deliver_at_ms: r.get::<_, i64>(6).max(0) as u64,
                body: r.get(7),
                created_ms: r.get(8),
            })
            .collect())
    }

    async fn mark_sent(&mut self, ids: &[i64]) -> Result<()> {
        self.db
            .execute(
                "UPDATE txmq_outbox SET sent_ms = $2 WHERE id = ANY($1)",
                &[&ids, &now_ms()],
            )
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn mark_failed(&mut self, id: i64, why: &str) -> Result<()> {
        self.db
            .execute(
                "UPDATE txmq_outbox SET failed_ms = $2, error = $3 WHERE id = $1",
                &[&id, &now_ms(), &why],
            )
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn wait(&mut self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.woken.recv()).await;
    }
}

/// Deletes rows sent longer ago than `keep`; returns how many.
///
/// # Errors
/// The database's error.
pub async fn prune_outbox(db: &Client, keep: Duration) -> Result<u64> {
    let before = now_ms() - keep.as_millis() as i64;
    db.execute(
        "DELETE FROM txmq_outbox WHERE sent_ms IS NOT NULL AND sent_ms < $1",
        &[&before],
    )
    .await
    .map_err(db_err)
}
