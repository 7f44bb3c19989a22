//! Issue 18, item 1: a send bound to a database transaction, with the process killed at
//! every step (before the local commit, between the local commit and the message's,
//! after both), on a real PostgreSQL and on SQLite. The check-back answers from the
//! table; the business table and the delivered messages must agree exactly.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use txmq_client::{Consumer, ConsumerOptions};
use txmq_tests::postgres::Postgres;
use txmq_tests::{TestBroker, next};

fn demo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_txmq-sql-demo"))
}

/// Short check-back timings, so a dead producer's transaction is asked about at once.
const FAST_CHECKS: &[&str] = &[
    "--check-timeout",
    "1s",
    "--check-interval",
    "100ms",
    "--check-backoff",
    "300ms",
];

/// Runs one order per step (and one that dies nowhere), then a checker, and returns
/// what the consumer received once it agrees with `business` (or after 30 s).
async fn orders_and_messages(
    db: &str,
    business: impl AsyncFn() -> BTreeSet<i64>,
) -> (BTreeSet<i64>, BTreeSet<i64>) {
    let b = TestBroker::start(FAST_CHECKS);
    let steps = [
        (1, Some("in-work")),
        (2, Some("after-local-commit")),
        (3, Some("after-both")),
        (4, None),
    ];
    for (id, die_at) in steps {
        let mut c = demo();
        c.args(["order", "--db", db, "--broker", b.addr(), "--order"])
            .arg(id.to_string());
        if let Some(step) = die_at {
            c.args(["--die-at", step]);
        }
        let out = c.output().expect("run txmq-sql-demo");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.success(),
            die_at.is_none(),
            "order {id} (die at {die_at:?}): {stderr}"
        );
    }
    let mut checker = demo()
        .args([
            "checker",
            "--db",
            db,
            "--broker",
            b.addr(),
            "--seconds",
            "60",
        ])
        .spawn()
        .expect("run the checker");
    let mut consumer = Consumer::subscribe(b.addr(), ConsumerOptions::new("points", "orders"))
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let expected = business().await;
    while tokio::time::Instant::now() < deadline {
        if let Some(d) = next(&mut consumer, Duration::from_millis(500)).await {
            let body = String::from_utf8_lossy(d.body()).into_owned();
            let id: i64 = body.trim_start_matches("order-").parse().unwrap();
            assert!(seen.insert(id), "order {id} delivered twice");
            d.ack().await.unwrap();
        } else if seen == expected {
            // Settled: and nothing more comes in the next round of checks.
            if next(&mut consumer, Duration::from_secs(2)).await.is_none() {
                break;
            }
            panic!("a message arrived after the orders and messages agreed");
        }
    }
    let _ = checker.kill();
    let _ = checker.wait();
    (business().await, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_orders_and_messages_agree_whatever_step_the_producer_dies_at() {
    let pg = Postgres::start();
    let url = pg.url();
    let (orders, messages) = orders_and_messages(&url, async || {
        let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        db.query("SELECT id FROM orders", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i64>(0))
            .collect()
    })
    .await;
    assert_eq!(orders, BTreeSet::from([2, 3, 4]), "what the database kept");
    assert_eq!(messages, orders, "the messages delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_orders_and_messages_agree_whatever_step_the_producer_dies_at() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orders.db");
    let url = format!("sqlite:{}", path.display());
    let (orders, messages) = orders_and_messages(&url, async || {
        let db = rusqlite::Connection::open(&path).unwrap();
        let mut q = db.prepare("SELECT id FROM orders").unwrap();
        q.query_map([], |r| r.get::<_, i64>(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    })
    .await;
    assert_eq!(orders, BTreeSet::from([2, 3, 4]), "what the database kept");
    assert_eq!(messages, orders, "the messages delivered");
}
