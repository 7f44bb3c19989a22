//! A service that records an order in its database and announces it with a
//! transactional message through `txmq-sql`, on PostgreSQL or SQLite; it can die at
//! each step (the crash tests), and it can run the check-back answer alone.
//!
//! ```text
//! txmq-sql-demo order   --db URL --broker ADDR --order N [--die-at STEP]
//! txmq-sql-demo checker --db URL --broker ADDR --seconds S
//! txmq-sql-demo points  --db URL --broker ADDR [--die-after N] [--idle-secs S]
//! ```
//! txmq-sql-demo outbox-enqueue --db URL --count N
//! txmq-sql-demo relay   --db URL --broker ADDR [--die-at-mark K] [--until-empty]
//! `outbox-enqueue` writes N events (`event-1`…) each in its own transaction with a
//! business row; `relay` sends them (dying, with `--die-at-mark K`, when it would mark
//! its K-th batch sent: sent, not marked).
//! `points` credits each announced order once (`txmq-sql`'s idempotent consumer); with
//! `--die-after N` it dies after the N-th credit is committed, before its ack.
//! `URL`: a `tokio-postgres` connection string (`host=… port=… user=…`), or
//! `sqlite:PATH`. `STEP`: `in-work` (the order row written, before the database
//! commits), `after-local-commit` (before the message commits), `after-both`.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use txmq_client::{
    Consumer, ConsumerOptions, Message, Producer, ProducerOptions, TransactionChecker,
};
use txmq_sql::outbox::{self, RelayOptions, Store};
use txmq_sql::{Applied, Pending, postgres, sqlite};

/// The producer group of the order service.
const GROUP: &str = "order-service";
/// Where orders are announced.
const TOPIC: &str = "orders";

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Records order N and announces it.
    Order {
        #[arg(long)]
        db: String,
        #[arg(long)]
        broker: String,
        #[arg(long)]
        order: i64,
        #[arg(long, value_enum)]
        die_at: Option<Step>,
    },
    /// Credits each announced order once, until nothing arrives for `idle_secs`.
    Points {
        #[arg(long)]
        db: String,
        #[arg(long)]
        broker: String,
        #[arg(long)]
        die_after: Option<u64>,
        #[arg(long, default_value_t = 3)]
        idle_secs: u64,
    },
    /// Writes `count` events into the outbox, each with a business row.
    OutboxEnqueue {
        #[arg(long)]
        db: String,
        #[arg(long)]
        count: i64,
    },
    /// Relays the outbox.
    Relay {
        #[arg(long)]
        db: String,
        #[arg(long)]
        broker: String,
        #[arg(long)]
        die_at_mark: Option<u64>,
        #[arg(long)]
        until_empty: bool,
        #[arg(long, default_value_t = 10)]
        batch: usize,
    },
    /// Measures transactional sends bound to database transactions: `count` orders from
    /// `concurrency` workers, each with its own connection.
    BenchTxn {
        #[arg(long)]
        db: String,
        #[arg(long)]
        broker: String,
        #[arg(long, default_value_t = 5000)]
        count: i64,
        #[arg(long, default_value_t = 8)]
        concurrency: i64,
    },
    /// Measures the outbox: `count` enqueues (one transaction each), then one relay
    /// draining them.
    BenchOutbox {
        #[arg(long)]
        db: String,
        #[arg(long)]
        broker: String,
        #[arg(long, default_value_t = 20000)]
        count: i64,
        #[arg(long, default_value_t = 100)]
        batch: usize,
    },
    /// Answers the group's check-backs for S seconds.
    Checker {
        #[arg(long)]
        db: String,
        #[arg(long)]
        broker: String,
        #[arg(long)]
        seconds: u64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Step {
    InWork,
    AfterLocalCommit,
    AfterBoth,
}

fn die_if(at: Option<Step>, step: Step) {
    if at == Some(step) {
        eprintln!("dying at the step asked for");
        std::process::abort();
    }
}

enum Db {
    Pg(tokio_postgres::Client),
    Lite(rusqlite::Connection, std::path::PathBuf),
}

async fn open(url: &str) -> anyhow::Result<Db> {
    if let Some(path) = url.strip_prefix("sqlite:") {
        let db = rusqlite::Connection::open(path)?;
        db.busy_timeout(Duration::from_secs(5))?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, amount INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS credits (order_id INTEGER NOT NULL, points INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL);",
        )?;
        sqlite::migrate(&db)?;
        return Ok(Db::Lite(db, path.into()));
    }
    let (db, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connect to PostgreSQL")?;
    tokio::spawn(connection);
    postgres::migrate(&db).await?;
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS orders (id BIGINT PRIMARY KEY, amount BIGINT NOT NULL);
         CREATE TABLE IF NOT EXISTS credits (order_id BIGINT NOT NULL, points BIGINT NOT NULL);
         CREATE TABLE IF NOT EXISTS events (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL);",
    )
    .await?;
    Ok(Db::Pg(db))
}

async fn order(db: &mut Db, broker: &str, id: i64, die_at: Option<Step>) -> anyhow::Result<()> {
    let producer = Producer::connect(
        broker,
        ProducerOptions {
            group: GROUP.into(),
            ..ProducerOptions::default()
        },
    )
    .await?;
    let message = Message::new(TOPIC, format!("order-{id}")).key(id.to_string());
    let database = match db {
        Db::Pg(client) => postgres::identity(client).await?,
        Db::Lite(conn, _) => sqlite::identity(conn)?,
    };
    let pending = Pending::begin(&producer, &database, vec![message]).await?;
    let amount = id * 10;
    let (_, committed) = match db {
        Db::Pg(client) => {
            postgres::run_local(pending, client, async |tx| {
                tx.execute(
                    "INSERT INTO orders (id, amount) VALUES ($1, $2)",
                    &[&id, &amount],
                )
                .await?;
                die_if(die_at, Step::InWork);
                Ok::<_, tokio_postgres::Error>(())
            })
            .await?
        }
        Db::Lite(conn, _) => {
            sqlite::run_local(pending, conn, |tx| {
                tx.execute(
                    "INSERT INTO orders (id, amount) VALUES (?1, ?2)",
                    [id, amount],
                )?;
                die_if(die_at, Step::InWork);
                Ok::<_, rusqlite::Error>(())
            })
            .await?
        }
    };
    die_if(die_at, Step::AfterLocalCommit);
    committed.commit_message().await?;
    die_if(die_at, Step::AfterBoth);
    println!("order {id} recorded and announced");
    Ok(())
}

/// The points service: one credit per order, whatever is redelivered.
async fn points(
    db: &mut Db,
    broker: &str,
    die_after: Option<u64>,
    idle: Duration,
) -> anyhow::Result<()> {
    let mut consumer = Consumer::subscribe(broker, ConsumerOptions::new("points", TOPIC)).await?;
    let (mut applied, mut duplicates) = (0u64, 0u64);
    while let Ok(Some(delivery)) = tokio::time::timeout(idle, consumer.next()).await {
        let delivery = delivery?;
        let body = String::from_utf8_lossy(delivery.body()).into_owned();
        let id: i64 = body
            .strip_prefix("order-")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("not an order: {body:?}"))?;
        let done = match db {
            Db::Pg(client) => {
                txmq_sql::postgres::apply_once(client, &delivery, async |tx| {
                    tx.execute(
                        "INSERT INTO credits (order_id, points) VALUES ($1, $2)",
                        &[&id, &id],
                    )
                    .await
                    .map(|_| ())
                })
                .await?
            }
            Db::Lite(conn, _) => txmq_sql::sqlite::apply_once(conn, &delivery, |tx| {
                tx.execute(
                    "INSERT INTO credits (order_id, points) VALUES (?1, ?2)",
                    [id, id],
                )
                .map(|_| ())
            })?,
        };
        match done {
            Applied::Applied(_) => applied += 1,
            Applied::Duplicate => duplicates += 1,
        }
        if die_after == Some(applied) {
            eprintln!("dying after credit {applied}, before its ack");
            std::process::abort();
        }
        delivery.ack().await?;
    }
    println!("{{\"applied\":{applied},\"duplicates\":{duplicates}}}");
    Ok(())
}

/// Writes `count` events, each with its business row in one transaction.
async fn enqueue(db: &mut Db, count: i64) -> anyhow::Result<()> {
    for i in 1..=count {
        let name = format!("event-{i}");
        let message = Message::new("events", name.clone()).key(i.to_string());
        match db {
            Db::Pg(client) => {
                let tx = client.transaction().await?;
                tx.execute("INSERT INTO events (name) VALUES ($1)", &[&name])
                    .await?;
                postgres::enqueue(&tx, &message).await?;
                tx.commit().await?;
            }
            Db::Lite(conn, _) => {
                let tx = conn.transaction()?;
                tx.execute("INSERT INTO events (name) VALUES (?1)", [&name])?;
                sqlite::enqueue(&tx, &message)?;
                tx.commit()?;
            }
        }
    }
    Ok(())
}

/// A store that dies when it would mark its `die_at`-th batch sent.
struct Dying<S> {
    inner: S,
    marks: u64,
    die_at: Option<u64>,
}

impl<S: Store> Store for Dying<S> {
    async fn epoch(&mut self) -> txmq_sql::Result<String> {
        self.inner.epoch().await
    }
    async fn pending(&mut self, limit: usize) -> txmq_sql::Result<Vec<txmq_sql::outbox::Row>> {
        self.inner.pending(limit).await
    }
    async fn mark_sent(&mut self, ids: &[i64]) -> txmq_sql::Result<()> {
        self.marks += 1;
        if self.die_at == Some(self.marks) {
            eprintln!("dying before marking batch {} sent", self.marks);
            std::process::abort();
        }
        self.inner.mark_sent(ids).await
    }
    async fn mark_failed(&mut self, id: i64, why: &str) -> txmq_sql::Result<()> {
        self.inner.mark_failed(id, why).await
    }
    async fn wait(&mut self, at_most: Duration) {
        self.inner.wait(at_most).await;
    }
}

async fn relay(
    db: &str,
    broker: &str,
    die_at: Option<u64>,
    options: RelayOptions,
) -> anyhow::Result<()> {
    let producer = Producer::connect(broker, ProducerOptions::default()).await;
    // The broker may be down: the producer is made once it answers.
    let producer = match producer {
        Ok(p) => p,
        Err(e) => {
            eprintln!("broker not reachable yet ({e}); waiting for it");
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Ok(p) = Producer::connect(broker, ProducerOptions::default()).await {
                    break p;
                }
            }
        }
    };
    let sent = if let Some(path) = db.strip_prefix("sqlite:") {
        let mut store = Dying {
            inner: sqlite::Outbox::open(std::path::Path::new(path))?,
            marks: 0,
            die_at,
        };
        outbox::relay(&mut store, &producer, &options, std::future::pending()).await?
    } else {
        let mut store = Dying {
            inner: postgres::Outbox::connect(db).await?,
            marks: 0,
            die_at,
        };
        outbox::relay(&mut store, &producer, &options, std::future::pending()).await?
    };
    println!("{{\"sent\":{}}}", sent.sent);
    Ok(())
}

/// One worker of `bench-txn`: orders `from..to`.
async fn bench_worker(db: String, broker: String, from: i64, to: i64) -> anyhow::Result<()> {
    let mut db = open(&db).await?;
    let producer = Producer::connect(
        &broker,
        ProducerOptions {
            group: GROUP.into(),
            ..ProducerOptions::default()
        },
    )
    .await?;
    for id in from..to {
        let message = Message::new("bench-orders", format!("order-{id}"));
        let amount = id * 10;
        match &mut db {
            Db::Pg(client) => {
                postgres::send_in_transaction(&producer, client, vec![message], async |tx| {
                    tx.execute(
                        "INSERT INTO orders (id, amount) VALUES ($1, $2)",
                        &[&id, &amount],
                    )
                    .await
                })
                .await?;
            }
            Db::Lite(conn, _) => {
                sqlite::send_in_transaction(&producer, conn, vec![message], |tx| {
                    tx.execute(
                        "INSERT INTO orders (id, amount) VALUES (?1, ?2)",
                        [id, amount],
                    )
                })
                .await?;
            }
        }
    }
    Ok(())
}

async fn bench_txn(db: &str, broker: &str, count: i64, concurrency: i64) -> anyhow::Result<()> {
    let base = 1_000_000_000 + (txmq_sql_now_ms() % 1_000_000) * 1000;
    let per = count / concurrency.max(1);
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let from = base + w * per;
            tokio::spawn(bench_worker(db.into(), broker.into(), from, from + per))
        })
        .collect();
    for w in workers {
        w.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let n = per * concurrency;
    println!(
        "{{\"scenario\":\"txn-bound\",\"messages\":{n},\"seconds\":{secs:.2},\"msgs_per_sec\":{:.0}}}",
        n as f64 / secs
    );
    Ok(())
}

async fn bench_outbox(db: &str, broker: &str, count: i64, batch: usize) -> anyhow::Result<()> {
    let mut conn = open(db).await?;
    let started = std::time::Instant::now();
    enqueue(&mut conn, count).await?;
    let enqueue_secs = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let options = RelayOptions {
        batch,
        until_empty: true,
        ..RelayOptions::default()
    };
    relay(db, broker, None, options).await?;
    let relay_secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"scenario\":\"outbox\",\"rows\":{count},\"enqueue_per_sec\":{:.0},\"relay_per_sec\":{:.0}}}",
        count as f64 / enqueue_secs,
        count as f64 / relay_secs
    );
    Ok(())
}

fn txmq_sql_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn checker(url: &str, db: Db, broker: &str, seconds: u64) -> anyhow::Result<()> {
    let checker: std::sync::Arc<dyn TransactionChecker> = match db {
        Db::Pg(_) => std::sync::Arc::new(postgres::Checker::connect(url).await?),
        Db::Lite(_, path) => std::sync::Arc::new(sqlite::Checker::open(&path)?),
    };
    let options = ProducerOptions {
        group: GROUP.into(),
        checker: Some(checker),
        ..ProducerOptions::default()
    };
    let _producer = Producer::connect(broker, options).await?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
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
    match Args::parse().command {
        Cmd::Order {
            db,
            broker,
            order: id,
            die_at,
        } => {
            if id < 0 {
                bail!("an order id is not negative");
            }
            let mut db = open(&db).await?;
            order(&mut db, &broker, id, die_at).await
        }
        Cmd::Checker {
            db,
            broker,
            seconds,
        } => checker(&db, open(&db).await?, &broker, seconds).await,
        Cmd::BenchTxn {
            db,
            broker,
            count,
            concurrency,
        } => bench_txn(&db, &broker, count, concurrency).await,
        Cmd::BenchOutbox {
            db,
            broker,
            count,
            batch,
        } => bench_outbox(&db, &broker, count, batch).await,
        Cmd::OutboxEnqueue { db, count } => enqueue(&mut open(&db).await?, count).await,
        Cmd::Relay {
            db,
            broker,
            die_at_mark,
            until_empty,
            batch,
        } => {
            let options = RelayOptions {
                batch,
                until_empty,
                ..RelayOptions::default()
            };
            relay(&db, &broker, die_at_mark, options).await
        }
        Cmd::Points {
            db,
            broker,
            die_after,
            idle_secs,
        } => {
            let mut db = open(&db).await?;
            points(&mut db, &broker, die_after, Duration::from_secs(idle_secs)).await
        }
    }
}
