//! The points service: consumes order messages and credits points in its database
//! (PostgreSQL or SQLite) through `txmq-sql`'s idempotent consumer: the credit and the
//! message id commit together, so a redelivery credits nothing twice.
//! `--die-before-ack-every K` aborts after every K-th credit, before its ack.

use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use txmq_client::{Consumer, ConsumerOptions};
use txmq_example_order_points::{Db, OrderPlaced};

#[derive(Debug, Parser)]
struct Args {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:9876")]
    broker: String,
    /// The service's database: a PostgreSQL connection string (`host=… dbname=…`), or
    /// `sqlite:PATH` (a bare path is SQLite too).
    #[arg(long, default_value = "points.db")]
    db: String,
    /// Topic of order messages.
    #[arg(long, default_value = "orders")]
    topic: String,
    /// Consumer group.
    #[arg(long, default_value = "points")]
    group: String,
    /// Crash (abort) after every K-th credit, before its ack (0: never).
    #[arg(long, default_value_t = 0)]
    die_before_ack_every: u64,
    /// Exit after this many seconds without a message (0: run until stopped).
    #[arg(long, default_value_t = 0)]
    exit_when_idle: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut db = Db::open(&args.db).await?;
    let mut consumer = Consumer::subscribe(
        &args.broker,
        ConsumerOptions::new(args.group.clone(), args.topic.clone()),
    )
    .await?;
    let idle = match args.exit_when_idle {
        0 => Duration::MAX,
        s => Duration::from_secs(s),
    };
    let mut handled = 0u64;
    loop {
        let next = match tokio::time::timeout(idle, consumer.next()).await {
            Err(_) => return Ok(()),
            Ok(None) => anyhow::bail!("subscription ended"),
            Ok(Some(next)) => next?,
        };
        let order: OrderPlaced = match serde_json::from_slice(next.body()) {
            Ok(o) => o,
            Err(e) => {
                // Not ours to fix: toward the dead-letter queue.
                eprintln!("points-service: bad message {}: {e}", next.id());
                next.nack(None).await?;
                continue;
            }
        };
        db.credit(&next, &order).await?;
        handled += 1;
        if args.die_before_ack_every > 0 && handled.is_multiple_of(args.die_before_ack_every) {
            eprintln!(
                "points-service: dying before the ack of order {}",
                order.order_id
            );
            std::process::abort();
        }
        next.ack().await?;
    }
}
