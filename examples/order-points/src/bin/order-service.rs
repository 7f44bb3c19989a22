//! The order service: places orders in SQLite and announces each with a transactional
//! message. `--die-after-local-commit-every K` aborts the process right after the K-th,
//! 2K-th… order is committed locally and before its message is committed: the crash this
//! product exists for. Run it again and its check-back answer settles the orphan.
//!
//! In the same transaction each order also schedules a "cancel if unpaid" message on
//! `--timeout-topic`, due `--payment-timeout` later: committed with the order, dropped
//! with it, and seen by no one before its time.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use txmq_client::{CheckRequest, Message, Outcome, Producer, ProducerOptions};
use txmq_example_order_points::{OrderPlaced, Orders};

#[derive(Debug, Parser)]
struct Args {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:9876")]
    broker: String,
    /// The service's SQLite database.
    #[arg(long, default_value = "orders.db")]
    db: PathBuf,
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
    let orders = Arc::new(Mutex::new(
        Orders::open(&args.db).with_context(|| format!("opening {}", args.db.display()))?,
    ));
    // The check-back: the broker asks what became of a transaction; the order table knows.
    let checker = {
        let orders = orders.clone();
        move |req: CheckRequest| {
            let orders = orders.clone();
            async move {
                let Some(order) = req
                    .messages
                    .first()
                    .and_then(|m| serde_json::from_slice::<OrderPlaced>(&m.body).ok())
                else {
                    return Outcome::Unknown;
                };
                match orders.lock().expect("orders lock").exists(order.order_id) {
                    Ok(true) => Outcome::Commit,
                    Ok(false) => Outcome::Rollback,
                    Err(_) => Outcome::Unknown,
                }
            }
        }
    };
    let producer = Producer::connect(
        &args.broker,
        ProducerOptions::transactional(args.group.clone(), checker),
    )
    .await?;
    loop {
        let id = orders.lock().expect("orders lock").next_id()?;
        if id > args.orders {
            break;
        }
        let order = OrderPlaced {
            order_id: id,
            user: format!("user-{}", id % 7),
            points: id % 5 + 1,
        };
        let mut txn = producer.begin()?;
        txn.send(
            Message::new(args.topic.clone(), serde_json::to_vec(&order)?)
                .key(id.to_string())
                .tag("placed"),
        )
        .await?;
        txn.send(
            Message::new(args.timeout_topic.clone(), serde_json::to_vec(&order)?)
                .key(id.to_string())
                .tag("cancel-if-unpaid")
                .deliver_after(args.payment_timeout),
        )
        .await?;
        orders.lock().expect("orders lock").place(&order)?;
        if args.die_after_local_commit_every > 0 && id % args.die_after_local_commit_every == 0 {
            eprintln!("order-service: dying after the local commit of order {id}");
            std::process::abort();
        }
        txn.commit().await?;
    }
    tokio::time::sleep(Duration::from_secs(args.linger)).await;
    Ok(())
}
