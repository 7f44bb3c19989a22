//! The order service: places orders in its database (PostgreSQL or SQLite) and
//! announces each with a transactional message, through `txmq-sql`.
//! `--die-after-local-commit-every K` aborts the process right after the K-th, 2K-th…
//! order is committed locally and before its messages are committed: the crash this
//! product exists for. The broker checks back, and `txmq-sql`'s checker (in this or
//! any later instance) answers from the transaction's record.
//!
//! In the same transaction each order also schedules a "cancel if unpaid" message on
//! `--timeout-topic`, due `--payment-timeout` later: committed with the order, dropped
//! with it, and seen by no one before its time.

use std::time::Duration;

use clap::Parser;
use txmq_client::{Message, Producer, ProducerOptions};
use txmq_example_order_points::{Db, OrderPlaced};
use txmq_sql::Pending;

#[derive(Debug, Parser)]
struct Args {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:9876")]
    broker: String,
    /// The service's database: a PostgreSQL connection string (`host=… dbname=…`), or
    /// `sqlite:PATH` (a bare path is SQLite too).
    #[arg(long, default_value = "orders.db")]
    db: String,
    /// Place orders until the database holds this many.
    #[arg(long, default_value_t = 100)]
    orders: i64,
    /// Topic to announce orders on.
    #[arg(long, default_value = "orders")]
    topic: String,
    /// Producer group (every instance of this service).
    #[arg(long, default_value = "order-service")]
    group: String,
    /// Crash (abort) after every K-th local commit, before the message commit (0: never).
    #[arg(long, default_value_t = 0)]
    die_after_local_commit_every: i64,
    /// Topic of the scheduled "cancel if unpaid" messages.
    #[arg(long, default_value = "order-timeouts")]
    timeout_topic: String,
    /// When an order's "cancel if unpaid" message falls due (`30m`, `10s`).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    payment_timeout: Duration,
    /// Stay connected this many seconds after the last order, answering check-backs.
    #[arg(long, default_value_t = 0)]
    linger: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut db = Db::open(&args.db).await?;
    let options = ProducerOptions {
        group: args.group.clone(),
        checker: Some(db.checker().await?),
        ..ProducerOptions::default()
    };
    let producer = Producer::connect(&args.broker, options).await?;
    loop {
        let id = db.next_order_id().await?;
        if id > args.orders {
            break;
        }
        let order = OrderPlaced {
            order_id: id,
            user: format!("user-{}", id % 7),
            points: id % 5 + 1,
        };
        let messages = vec![
            Message::new(args.topic.clone(), serde_json::to_vec(&order)?)
                .key(id.to_string())
                .tag("placed"),
            Message::new(args.timeout_topic.clone(), serde_json::to_vec(&order)?)
                .key(id.to_string())
                .tag("cancel-if-unpaid")
                .deliver_after(args.payment_timeout),
        ];
        let pending = Pending::begin(&producer, &db.identity().await?, messages).await?;
        let committed = db.place(pending, &order).await?;
        if args.die_after_local_commit_every > 0 && id % args.die_after_local_commit_every == 0 {
            eprintln!("order-service: dying after the local commit of order {id}");
            std::process::abort();
        }
        committed.commit_message().await?;
    }
    tokio::time::sleep(Duration::from_secs(args.linger)).await;
    Ok(())
}
