//! The order → points example: what both services share, on `txmq-sql`'s helpers, on
//! PostgreSQL or SQLite (`--db`: a `tokio-postgres` connection string such as
//! `host=127.0.0.1 port=5432 user=postgres dbname=orders`, or `sqlite:PATH`, or a bare
//! path, which is SQLite).
//!
//! The **order service** keeps orders in its own database. For each order it stores the
//! half messages, inserts the order in a database transaction that also records the
//! txmq transaction id (`txmq_sql::*::run_local`), then commits the messages. If it dies
//! between the two commits, the broker checks back and `txmq_sql`'s checker answers from
//! that record (the fence: see the crate's docs).
//!
//! The **points service** credits points from each order message in *its* database
//! through `txmq_sql`'s idempotent consumer: the credit and the message id commit
//! together, so a redelivery (it died before its ack) credits nothing twice.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use txmq_client::{Delivery, TransactionChecker};
use txmq_sql::{Applied, Committed, Pending, postgres, sqlite};

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

/// A service's database.
pub enum Db {
    /// PostgreSQL, with its connection string (the checker opens its own connection).
    Pg(tokio_postgres::Client, String),
    /// SQLite, with its file (the checker opens its own connection).
    Lite(rusqlite::Connection, PathBuf),
}

impl Db {
    /// Opens the database `spec` names and creates this crate's and the helpers' tables.
    ///
    /// # Errors
    /// The database's errors.
    pub async fn open(spec: &str) -> anyhow::Result<Self> {
        if spec.starts_with("host=") || spec.starts_with("postgres") {
            let (db, conn) = tokio_postgres::connect(spec, tokio_postgres::NoTls)
                .await
                .context("connect to PostgreSQL")?;
            tokio::spawn(conn);
            postgres::migrate(&db).await?;
            db.batch_execute(
                "CREATE TABLE IF NOT EXISTS orders (
                     id BIGINT PRIMARY KEY, username TEXT NOT NULL, points BIGINT NOT NULL);
                 CREATE TABLE IF NOT EXISTS credits (
                     order_id BIGINT NOT NULL, username TEXT NOT NULL, points BIGINT NOT NULL);",
            )
            .await?;
            return Ok(Self::Pg(db, spec.to_string()));
        }
        let path = PathBuf::from(spec.strip_prefix("sqlite:").unwrap_or(spec));
        let db = rusqlite::Connection::open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        sqlite::migrate(&db)?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS orders (
                 id INTEGER PRIMARY KEY, username TEXT NOT NULL, points INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS credits (
                 order_id INTEGER NOT NULL, username TEXT NOT NULL, points INTEGER NOT NULL);",
        )?;
        Ok(Self::Lite(db, path))
    }

    /// The check-back answer of the order service, on its own connection.
    ///
    /// # Errors
    /// The database's errors.
    pub async fn checker(&self) -> anyhow::Result<Arc<dyn TransactionChecker>> {
        Ok(match self {
            Self::Pg(_, url) => Arc::new(postgres::Checker::connect(url).await?),
            Self::Lite(_, path) => Arc::new(sqlite::Checker::open(path)?),
        })
    }

    /// The database's identity (what its transactions' check-backs are routed by).
    ///
    /// # Errors
    /// The database's errors.
    pub async fn identity(&self) -> anyhow::Result<String> {
        Ok(match self {
            Self::Pg(db, _) => txmq_sql::postgres::identity(db).await?,
            Self::Lite(db, _) => txmq_sql::sqlite::identity(db)?,
        })
    }

    /// The id the next order gets.
    ///
    /// # Errors
    /// The database's errors.
    pub async fn next_order_id(&self) -> anyhow::Result<i64> {
        const Q: &str = "SELECT COALESCE(MAX(id), 0) + 1 FROM orders";
        Ok(match self {
            Self::Pg(db, _) => db.query_one(Q, &[]).await?.get(0),
            Self::Lite(db, _) => db.query_row(Q, [], |r| r.get(0))?,
        })
    }

    /// The local transaction of an order whose half messages are stored: the order and
    /// the transaction's record commit together. What is left is the messages' commit.
    ///
    /// # Errors
    /// The helper's errors (both sides rolled back unless the commit's outcome is
    /// unknown).
    pub async fn place(
        &mut self,
        pending: Pending,
        order: &OrderPlaced,
    ) -> anyhow::Result<Committed> {
        let (_, committed) = match self {
            Self::Pg(db, _) => {
                postgres::run_local(pending, db, async |tx| {
                    tx.execute(
                        "INSERT INTO orders (id, username, points) VALUES ($1, $2, $3)",
                        &[&order.order_id, &order.user, &order.points],
                    )
                    .await
                    .map(|_| ())
                })
                .await?
            }
            Self::Lite(db, _) => {
                sqlite::run_local(pending, db, |tx| {
                    tx.execute(
                        "INSERT INTO orders (id, username, points) VALUES (?1, ?2, ?3)",
                        rusqlite::params![order.order_id, order.user, order.points],
                    )
                    .map(|_| ())
                })
                .await?
            }
        };
        Ok(committed)
    }

    /// Every order as (id, user, points), by id.
    ///
    /// # Errors
    /// The database's errors.
    pub async fn orders(&self) -> anyhow::Result<Vec<(i64, String, i64)>> {
        const Q: &str = "SELECT id, username, points FROM orders ORDER BY id";
        Ok(match self {
            Self::Pg(db, _) => db
                .query(Q, &[])
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
            Self::Lite(db, _) => db
                .prepare(Q)?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?,
        })
    }

    /// Credits an order's points once per message (the idempotent consumer), without
    /// the ack. Returns whether it credited now.
    ///
    /// # Errors
    /// The helper's errors.
    pub async fn credit(
        &mut self,
        delivery: &Delivery,
        order: &OrderPlaced,
    ) -> anyhow::Result<bool> {
        let applied = match self {
            Self::Pg(db, _) => {
                postgres::apply_once(db, delivery, async |tx| {
                    tx.execute(
                        "INSERT INTO credits (order_id, username, points) VALUES ($1, $2, $3)",
                        &[&order.order_id, &order.user, &order.points],
                    )
                    .await
                    .map(|_| ())
                })
                .await?
            }
            Self::Lite(db, _) => sqlite::apply_once(db, delivery, |tx| {
                tx.execute(
                    "INSERT INTO credits (order_id, username, points) VALUES (?1, ?2, ?3)",
                    rusqlite::params![order.order_id, order.user, order.points],
                )
                .map(|_| ())
            })?,
        };
        Ok(matches!(applied, Applied::Applied(_)))
    }

    /// Order ids credited, by id (an order credited twice shows twice).
    ///
    /// # Errors
    /// The database's errors.
    pub async fn credited_orders(&self) -> anyhow::Result<Vec<i64>> {
        const Q: &str = "SELECT order_id FROM credits ORDER BY order_id";
        Ok(match self {
            Self::Pg(db, _) => db.query(Q, &[]).await?.iter().map(|r| r.get(0)).collect(),
            Self::Lite(db, _) => db
                .prepare(Q)?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?,
        })
    }

    /// Points per user, by user.
    ///
    /// # Errors
    /// The database's errors.
    pub async fn balances(&self) -> anyhow::Result<Vec<(String, i64)>> {
        const Q: &str = "SELECT username, CAST(SUM(points) AS BIGINT) FROM credits GROUP BY username ORDER BY username";
        Ok(match self {
            Self::Pg(db, _) => db
                .query(Q, &[])
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
            Self::Lite(db, _) => db
                .prepare(Q)?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?,
        })
    }
}
