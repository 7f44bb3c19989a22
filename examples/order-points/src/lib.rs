//! The order → points example: what both services share.
//!
//! The **order service** keeps orders in its own SQLite database. For each order it sends a
//! half message, commits the order locally, then commits the message. If it dies between
//! the two commits, the broker checks back and the service (any live instance of its
//! producer group) answers by looking the order up: there → commit, absent → roll back.
//!
//! The **points service** credits points from each order message in *its* SQLite database,
//! recording the message id in the same local transaction as the credit. A redelivery
//! (it died before its ack) finds the id already recorded and credits nothing twice.

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// The body of an `orders` message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OrderPlaced {
    /// The order's id in the order service's database.
    pub order_id: i64,
    /// Who ordered.
    pub user: String,
    /// Points it earns.
    pub points: i64,
}

/// The order service's database.
pub struct Orders {
    db: Connection,
}

impl Orders {
    /// Opens (and creates) the database.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn open(path: &std::path::Path) -> rusqlite::Result<Self> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS orders (
                id INTEGER PRIMARY KEY, user TEXT NOT NULL, points INTEGER NOT NULL)",
        )?;
        Ok(Self { db })
    }

    /// The id the next order gets.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn next_id(&self) -> rusqlite::Result<i64> {
        self.db
            .query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM orders", [], |r| {
                r.get(0)
            })
    }

    /// The local transaction: stores the order, durably.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn place(&mut self, order: &OrderPlaced) -> rusqlite::Result<()> {
        let tx = self.db.transaction()?;
        tx.execute(
            "INSERT INTO orders (id, user, points) VALUES (?1, ?2, ?3)",
            params![order.order_id, order.user, order.points],
        )?;
        tx.commit()
    }

    /// Whether an order exists: what the check-back asks.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn exists(&self, order_id: i64) -> rusqlite::Result<bool> {
        self.db
            .query_row("SELECT 1 FROM orders WHERE id = ?1", [order_id], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
    }

    /// Every order as (id, user, points), by id.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn all(&self) -> rusqlite::Result<Vec<(i64, String, i64)>> {
        let mut st = self
            .db
            .prepare("SELECT id, user, points FROM orders ORDER BY id")?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect()
    }
}

/// The points service's database.
pub struct Points {
    db: Connection,
}

impl Points {
    /// Opens (and creates) the database.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn open(path: &std::path::Path) -> rusqlite::Result<Self> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS processed (
                 message_id TEXT PRIMARY KEY, order_id INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS balances (
                 user TEXT PRIMARY KEY, points INTEGER NOT NULL);",
        )?;
        Ok(Self { db })
    }

    /// Credits an order's points unless this message was already processed, in one local
    /// transaction. Returns whether it credited.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn credit(&mut self, message_id: &str, order: &OrderPlaced) -> rusqlite::Result<bool> {
        let tx = self.db.transaction()?;
        let fresh = tx.execute(
            "INSERT OR IGNORE INTO processed (message_id, order_id) VALUES (?1, ?2)",
            params![message_id, order.order_id],
        )? == 1;
        if fresh {
            tx.execute(
                "INSERT INTO balances (user, points) VALUES (?1, ?2)
                 ON CONFLICT (user) DO UPDATE SET points = points + excluded.points",
                params![order.user, order.points],
            )?;
        }
        tx.commit()?;
        Ok(fresh)
    }

    /// Order ids credited, by id.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn credited_orders(&self) -> rusqlite::Result<Vec<i64>> {
        let mut st = self
            .db
            .prepare("SELECT order_id FROM processed ORDER BY order_id")?;
        st.query_map([], |r| r.get(0))?.collect()
    }

    /// Balance per user, by user.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn balances(&self) -> rusqlite::Result<Vec<(String, i64)>> {
        let mut st = self
            .db
            .prepare("SELECT user, points FROM balances ORDER BY user")?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
    }
}
