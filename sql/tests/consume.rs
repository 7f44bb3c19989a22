//! Issue 18, item 3: the idempotent consumer, on a real PostgreSQL and on SQLite. The
//! points service dies after committing a credit and before its ack; the message comes
//! back and is found applied: every order is credited exactly once.

use std::process::Command;
use std::time::Duration;

use txmq_client::{Message, Producer, ProducerOptions};
use txmq_tests::TestBroker;
use txmq_tests::postgres::Postgres;

const ORDERS: i64 = 30;

fn points(db: &str, broker: &str, die_after: Option<u64>) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_txmq-sql-demo"));
    c.args(["points", "--db", db, "--broker", broker, "--idle-secs", "2"]);
    if let Some(n) = die_after {
        c.args(["--die-after", &n.to_string()]);
    }
    c.output().expect("run txmq-sql-demo")
}

/// Announces the orders, runs the points service to its death after credit 10, then
/// again to the end; returns what the second run said.
async fn crash_and_resume(db: &str) -> serde_json::Value {
    let b = TestBroker::start(&[]);
    let p = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap();
    for id in 1..=ORDERS {
        p.send(Message::new("orders", format!("order-{id}")))
            .await
            .unwrap();
    }
    let out = points(db, b.addr(), Some(10));
    assert!(
        !out.status.success(),
        "it did not die: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = points(db, b.addr(), None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("{stdout}"))
}

fn check(said: &serde_json::Value, count: i64, distinct: i64) {
    assert_eq!(
        (count, distinct),
        (ORDERS, ORDERS),
        "credits (all, distinct orders)"
    );
    assert!(
        said["duplicates"].as_u64() >= Some(1),
        "the credit committed before the crash came back and was found: {said}"
    );
    assert_eq!(said["applied"].as_i64(), Some(ORDERS - 10), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_credits_each_order_once_across_a_crash_before_the_ack() {
    let server = Postgres::start();
    let said = crash_and_resume(&server.url()).await;
    let (db, conn) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = db
        .query_one(
            "SELECT count(*), count(DISTINCT order_id) FROM credits",
            &[],
        )
        .await
        .unwrap();
    check(&said, row.get(0), row.get(1));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let pruned = txmq_sql::postgres::prune_processed(&db, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(pruned, ORDERS as u64, "every record is older than now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_credits_each_order_once_across_a_crash_before_the_ack() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("points.db");
    let said = crash_and_resume(&format!("sqlite:{}", path.display())).await;
    let db = rusqlite::Connection::open(&path).unwrap();
    let (count, distinct): (i64, i64) = db
        .query_row(
            "SELECT count(*), count(DISTINCT order_id) FROM credits",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    check(&said, count, distinct);
    std::thread::sleep(Duration::from_millis(20));
    let pruned = txmq_sql::sqlite::prune_processed(&db, Duration::ZERO).unwrap();
    assert_eq!(pruned, ORDERS as u64, "every record is older than now");
}
