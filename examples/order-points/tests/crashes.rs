//! The order → points scenario under crashes: the order service is killed between its
//! local commit and the transaction commit, the points service before its ack, several
//! times each; afterwards orders and points agree exactly.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use txmq_example_order_points::{Orders, Points};
use txmq_tests::{TestBroker, wait_timeout};

const ORDERS: i64 = 120;

fn order_service(b: &TestBroker, db: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_order-service"))
        .args(["--broker", b.addr(), "--db"])
        .arg(db)
        .args(["--orders", &ORDERS.to_string()])
        .args(["--die-after-local-commit-every", "17", "--linger", "4"])
        .args(["--payment-timeout", "2s"])
        .spawn()
        .expect("start order-service")
}

fn points_service(b: &TestBroker, db: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_points-service"))
        .args(["--broker", b.addr(), "--db"])
        .arg(db)
        .args(["--die-before-ack-every", "13", "--exit-when-idle", "5"])
        .spawn()
        .expect("start points-service")
}

fn killed(status: ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(libc::SIGABRT)
}

#[test]
fn orders_and_points_agree_after_crashes() {
    let b = TestBroker::start(&[
        "--check-timeout",
        "1s",
        "--check-interval",
        "200ms",
        "--check-backoff",
        "500ms",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let (orders_db, points_db) = (dir.path().join("orders.db"), dir.path().join("points.db"));
    let mut order_kills = 0;
    let mut points_kills = 0;
    let mut orders = Some(order_service(&b, &orders_db));
    let mut points = points_service(&b, &points_db);
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        assert!(Instant::now() < deadline, "the services did not finish");
        if let Some(o) = orders.as_mut()
            && let Some(status) = o.try_wait().unwrap()
        {
            if killed(status) {
                order_kills += 1;
                orders = Some(order_service(&b, &orders_db));
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
            points = points_service(&b, &points_db);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(mut o) = orders {
        let _ = wait_timeout(&mut o, Duration::from_secs(1));
    }

    let placed = Orders::open(&orders_db).unwrap().all().unwrap();
    let points = Points::open(&points_db).unwrap();
    let credited = points.credited_orders().unwrap();
    let placed_ids: Vec<i64> = placed.iter().map(|o| o.0).collect();
    assert_eq!(placed_ids, (1..=ORDERS).collect::<Vec<_>>());
    assert_eq!(credited, placed_ids, "orders and credited orders differ");
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for (_, user, pts) in &placed {
        *expected.entry(user.clone()).or_default() += pts;
    }
    let balances: BTreeMap<String, i64> = points.balances().unwrap().into_iter().collect();
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
    let runtime = tokio::runtime::Runtime::new().unwrap();
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
