//! The payment service: accepts payments into its own database (PostgreSQL or SQLite),
//! each with a `payments` message written into the outbox in the same transaction, and
//! runs the outbox relay beside it. It never waits for the broker: while the broker is
//! down payments keep being accepted and wait in the outbox; when it comes back the
//! relay sends them, in order, each once.
//!
//! ```text
//! payment-service --db URL --broker ADDR [--payments N] [--every-ms M]
//! ```
//! `URL`: a `tokio-postgres` connection string (`host=… dbname=…`) or `sqlite:PATH`.
//! It exits once all N payments are accepted and relayed.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use txmq_client::{Message, Producer, ProducerOptions};
use txmq_sql::outbox::{self, RelayOptions};
use txmq_sql::{postgres, sqlite};

#[derive(Debug, Parser)]
struct Args {
    /// The service's database.
    #[arg(long)]
    db: String,
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:9876")]
    broker: String,
    /// Payments to accept.
    #[arg(long, default_value_t = 100)]
    payments: i64,
    /// One payment every this many milliseconds.
    #[arg(long, default_value_t = 100)]
    every_ms: u64,
}

fn is_postgres(db: &str) -> bool {
    db.starts_with("host=") || db.starts_with("postgres")
}

/// Accepts the payments, one transaction each: the payment row and its message.
async fn accept(db: &str, payments: i64, every: Duration) -> anyhow::Result<()> {
    let message = |id: i64| Message::new("payments", format!("payment-{id}")).key(id.to_string());
    if is_postgres(db) {
        let (mut client, conn) = tokio_postgres::connect(db, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        postgres::migrate(&client).await?;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS payments (id BIGINT PRIMARY KEY, amount BIGINT NOT NULL)",
            )
            .await?;
        for id in 1..=payments {
            let tx = client.transaction().await?;
            tx.execute(
                "INSERT INTO payments (id, amount) VALUES ($1, $2)",
                &[&id, &(id * 100)],
            )
            .await?;
            postgres::enqueue(&tx, &message(id)).await?;
            tx.commit().await?;
            println!("payment {id} accepted");
            tokio::time::sleep(every).await;
        }
    } else {
        let path = db.strip_prefix("sqlite:").unwrap_or(db);
        let mut conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        sqlite::migrate(&conn)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS payments (id INTEGER PRIMARY KEY, amount INTEGER NOT NULL)",
        )?;
        for id in 1..=payments {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO payments (id, amount) VALUES (?1, ?2)",
                [id, id * 100],
            )?;
            sqlite::enqueue(&tx, &message(id))?;
            tx.commit()?;
            println!("payment {id} accepted");
            tokio::time::sleep(every).await;
        }
    }
    Ok(())
}

/// Relays the outbox until `accepted` is done and the outbox is empty.
async fn relay(
    db: &str,
    broker: &str,
    accepted: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // The producer connects on its first send, retrying while the broker is down.
    let producer = loop {
        match Producer::connect(broker, ProducerOptions::default()).await {
            Ok(p) => break p,
            Err(e) => {
                tracing::warn!("broker not reachable ({e}); payments wait in the outbox");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let options = RelayOptions::default();
    let until_empty = RelayOptions {
        until_empty: true,
        ..options.clone()
    };
    let mut accepted_done = accepted.clone();
    let done = async move {
        let _ = accepted_done.wait_for(|done| *done).await;
    };
    if is_postgres(db) {
        let mut store = postgres::Outbox::connect(db).await?;
        outbox::relay(&mut store, &producer, &options, done).await?;
        outbox::relay(&mut store, &producer, &until_empty, std::future::pending()).await?;
    } else {
        let path = std::path::Path::new(db.strip_prefix("sqlite:").unwrap_or(db));
        let mut store = sqlite::Outbox::open(path)?;
        outbox::relay(&mut store, &producer, &options, done).await?;
        outbox::relay(&mut store, &producer, &until_empty, std::future::pending()).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let (done, accepted) = tokio::sync::watch::channel(false);
    let relaying = {
        let (db, broker) = (args.db.clone(), args.broker.clone());
        tokio::spawn(async move { relay(&db, &broker, accepted).await })
    };
    accept(
        &args.db,
        args.payments,
        Duration::from_millis(args.every_ms),
    )
    .await
    .context("accepting payments")?;
    let _ = done.send(true);
    relaying.await??;
    println!("all {} payments accepted and relayed", args.payments);
    Ok(())
}
