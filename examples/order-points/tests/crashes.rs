//! The order → points scenario under crashes, on SQLite and on a real PostgreSQL: the
//! order service is killed between its local commit and the transaction commit, the
//! points service before its ack, several times each; afterwards orders and points
//! agree exactly.

use std::collections::BTreeMap;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use txmq_example_order_points::Db;
use txmq_tests::postgres::Postgres;
use txmq_tests::{TestBroker, wait_timeout};

const ORDERS: i64 = 120;

fn order_service(b: &TestBroker, db: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_order-service"))
        .args(["--broker", b.addr(), "--db", db])
        .args(["--orders", &ORDERS.to_string()])
        .args(["--die-after-local-commit-every", "17", "--linger", "4"])
        .args(["--payment-timeout", "2s"])
        .spawn()
        .expect("start order-service")
}

fn points_service(b: &TestBroker, db: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_points-service"))
        .args(["--broker", b.addr(), "--db", db])
        .args(["--die-before-ack-every", "13", "--exit-when-idle", "5"])
        .spawn()
        .expect("start points-service")
}

fn killed(status: ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(libc::SIGABRT)
}

#[test]
fn orders_and_points_agree_after_crashes_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let (orders, points) = (dir.path().join("orders.db"), dir.path().join("points.db"));
    scenario(
        &format!("sqlite:{}", orders.display()),
        &format!("sqlite:{}", points.display()),
    );
}

#[test]
fn orders_and_points_agree_after_crashes_on_postgres() {
    let server = Postgres::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (db, conn) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        for name in ["orders", "points"] {
            db.batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap();
        }
    });
    let url = |name: &str| {
        server
            .url()
            .replace("dbname=postgres", &format!("dbname={name}"))
    };
    scenario(&url("orders"), &url("points"));
}

/// The whole scenario against the two services' databases.
fn scenario(orders_db: &str, points_db: &str) {
    let b = TestBroker::start(&[
        "--check-timeout",
        "1s",
        "--check-interval",
        "200ms",
        "--check-backoff",
        "500ms",
    ]);
    let mut order_kills = 0;
    let mut points_kills = 0;
    let mut orders = Some(order_service(&b, orders_db));
    let mut points = points_service(&b, points_db);
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        assert!(Instant::now() < deadline, "the services did not finish");
        if let Some(o) = orders.as_mut()
            && let Some(status) = o.try_wait().unwrap()
        {
            if killed(status) {
                order_kills += 1;
                orders = Some(order_service(&b, orders_db));
            } else {
                assert!(status.success(), "order-service failed: {status}");
                orders = None;
            }
        }
        if let Some(status) = points.try_wait().unwrap() {
            if killed(status) {
                points_kills += 1;
            } else {
                assert!(status.success(), "points-service failed: {status}");
                if orders.is_none() {
                    break;
                }
            }
            // Killed, or idle while orders are still coming: start it again.
            points = points_service(&b, points_db);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(mut o) = orders {
        let _ = wait_timeout(&mut o, Duration::from_secs(1));
    }

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (placed, credited, balances) = runtime.block_on(async {
        let orders = Db::open(orders_db).await.unwrap();
        let points = Db::open(points_db).await.unwrap();
        (
            orders.orders().await.unwrap(),
            points.credited_orders().await.unwrap(),
            points.balances().await.unwrap(),
        )
    });
    let placed_ids: Vec<i64> = placed.iter().map(|o| o.0).collect();
    assert_eq!(placed_ids, (1..=ORDERS).collect::<Vec<_>>());
    assert_eq!(credited, placed_ids, "orders and credited orders differ");
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for (_, user, pts) in &placed {
        *expected.entry(user.clone()).or_default() += pts;
    }
    let balances: BTreeMap<String, i64> = balances.into_iter().collect();
    assert_eq!(balances, expected, "points do not add up to the orders");
    assert!(
        order_kills >= 5,
        "order-service died only {order_kills} times"
    );
    assert!(
        points_kills >= 5,
        "points-service died only {points_kills} times"
    );
    // Each order's "cancel if unpaid" message, scheduled in its transaction: one per
    // placed order, none for anything else, none before its time.
    let timeouts = runtime.block_on(txmq_tests::drain(
        &b,
        "payment-watch",
        "order-timeouts",
        Duration::from_secs(4),
    ));
    let mut timed_out: Vec<i64> = timeouts
        .iter()
        .map(|body| {
            serde_json::from_slice::<txmq_example_order_points::OrderPlaced>(body)
                .unwrap()
                .order_id
        })
        .collect();
    timed_out.sort_unstable();
    timed_out.dedup();
    assert_eq!(
        timed_out, placed_ids,
        "scheduled timeouts and orders differ"
    );
    println!(
        "order-points: {} orders, {} credited, order-service killed {order_kills}x between \
         local commit and message commit, points-service killed {points_kills}x before ack",
        placed.len(),
        credited.len()
    );
}
