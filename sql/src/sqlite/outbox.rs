//! The outbox on SQLite (see `crate::outbox`): `enqueue` in the caller's transaction,
//! and the relay's store, which polls (SQLite has no notifications). SQLite has one
//! writer at a time, so rows commit in id order and are sent in that order.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use txmq_client::Message;

use super::db_err;
use crate::outbox::{Row, Store};
use crate::{Result, now_ms};

/// Writes `message` into the outbox in the caller's transaction `tx`; returns the row's
/// id.
///
/// # Errors
/// The database's error.
pub fn enqueue(tx: &rusqlite::Transaction<'_>, message: &Message) -> Result<i64> {
    let (properties, deliver_at_ms) = Row::columns(message);
    tx.execute(
        "INSERT INTO txmq_outbox
             (topic, msg_key, tag, message_group, properties, deliver_at_ms, body, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        rusqlite::params![
            message.topic,
            message.key,
            message.tag,
            message.message_group,
            properties,
            deliver_at_ms,
            message.body.as_ref(),
            now_ms()
        ],
    )
    .map_err(db_err)?;
    Ok(tx.last_insert_rowid())
}

/// The relay's side of the outbox: its own connection to the database file.
#[derive(Debug)]
pub struct Outbox {
    db: Connection,
}

impl Outbox {
    /// Opens the database at `path` and creates the tables if missing.
    ///
    /// # Errors
    /// The database's error.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Connection::open(path).map_err(db_err)?;
        db.busy_timeout(Duration::from_secs(5)).map_err(db_err)?;
        super::migrate(&db)?;
        Ok(Self { db })
    }
}

impl Store for Outbox {
    async fn epoch(&mut self) -> Result<String> {
        super::off_the_workers(|| {
            self.db
                .query_row("SELECT epoch FROM txmq_outbox_epoch LIMIT 1", [], |r| {
                    r.get(0)
                })
                .map_err(db_err)
        })
    }

    async fn pending(&mut self, limit: usize) -> Result<Vec<Row>> {
        super::off_the_workers(|| self.pending_now(limit))
    }

    async fn mark_sent(&mut self, ids: &[i64]) -> Result<()> {
        super::off_the_workers(|| self.mark_sent_now(ids))
    }

    async fn mark_failed(&mut self, id: i64, why: &str) -> Result<()> {
        super::off_the_workers(|| {
            self.db
                .execute(
                    "UPDATE txmq_outbox SET failed_ms = ?2, error = ?3 WHERE id = ?1",
                    rusqlite::params![id, now_ms(), why],
                )
                .map_err(db_err)?;
            Ok(())
        })
    }

    async fn wait(&mut self, at_most: Duration) {
        tokio::time::sleep(at_most).await;
    }
}

impl Outbox {
    fn pending_now(&mut self, limit: usize) -> Result<Vec<Row>> {
        let mut q = self
            .db
            .prepare_cached(
                "SELECT id, topic, msg_key, tag, message_group, properties, deliver_at_ms, body,
                        created_ms
                 FROM txmq_outbox WHERE sent_ms IS NULL AND failed_ms IS NULL
                 ORDER BY id LIMIT ?1",
            )
            .map_err(db_err)?;
        let rows = q
            .query_map([limit as i64], |r| {
                Ok(Row {
                    id: r.get(0)?,
                    topic: r.get(1)?,
                    key: r.get(2)?,
                    tag: r.get(3)?,
                    message_group: r.get(4)?,
                    properties: Row::properties_of(&r.get::<_, String>(5)?),
                    deliver_at_ms: r.get::<_, i64>(6)?.max(0) as u64,
                    body: r.get(7)?,
                    created_ms: r.get(8)?,
                })
            })
            .map_err(db_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db_err)?;
        Ok(rows)
    }

    fn mark_sent_now(&mut self, ids: &[i64]) -> Result<()> {
        let tx = self.db.transaction().map_err(db_err)?;
        {
            let mut q = tx
                .prepare_cached("UPDATE txmq_outbox SET sent_ms = ?2 WHERE id = ?1")
                .map_err(db_err)?;
            let now = now_ms();
            for id in ids {
                q.execute([*id, now]).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }
}

/// Deletes rows sent longer ago than `keep`; returns how many.
///
/// # Errors
/// The database's error.
pub fn prune_outbox(db: &Connection, keep: Duration) -> Result<u64> {
    let before = now_ms() - keep.as_millis() as i64;
    db.execute(
        "DELETE FROM txmq_outbox WHERE sent_ms IS NOT NULL AND sent_ms < ?1",
        [before],
    )
    .map(|n| n as u64)
    .map_err(db_err)
}
