//! Issue 18, item 6: the payment service keeps accepting payments while the broker is
//! down (they wait in its outbox), and once the broker is back every payment is
//! delivered once, in order; on SQLite and on a real PostgreSQL.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use txmq_tests::postgres::Postgres;
use txmq_tests::{TestBroker, drain, eventually, wait_timeout};

const PAYMENTS: u64 = 60;

async fn scenario(db: &str) {
    let mut b = TestBroker::start_on_fixed_port(&[]);
    let mut service = Command::new(env!("CARGO_BIN_EXE_payment-service"))
        .args(["--db", db, "--broker", b.addr(), "--every-ms", "50"])
        .args(["--payments", &PAYMENTS.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start payment-service");
    let accepted = Arc::new(AtomicU64::new(0));
    let reader = {
        let (out, accepted) = (service.stdout.take().unwrap(), accepted.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.ends_with(" accepted") {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    eventually(Duration::from_secs(30), || async {
        (accepted.load(Ordering::Relaxed) >= 10).then_some(())
    })
    .await
    .expect("no payments accepted");
    b.kill9();
    let at_kill = accepted.load(Ordering::Relaxed);
    let kept_going = eventually(Duration::from_secs(30), || async {
        (accepted.load(Ordering::Relaxed) >= at_kill + 10).then_some(())
    })
    .await;
    assert!(kept_going.is_some(), "payments stopped with the broker");
    assert!(
        accepted.load(Ordering::Relaxed) < PAYMENTS,
        "all payments went in before the broker came back: the outage proves nothing"
    );
    b.start_again();
    let status = wait_timeout(&mut service, Duration::from_secs(90));
    assert!(
        status.is_some_and(|s| s.success()),
        "payment-service did not finish: {status:?}"
    );
    let _ = reader.join();
    let bodies = drain(&b, "ledger", "payments", Duration::from_secs(3)).await;
    let bodies: Vec<String> = bodies
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    let expected: Vec<String> = (1..=PAYMENTS).map(|i| format!("payment-{i}")).collect();
    assert_eq!(bodies, expected, "each payment once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_payments_wait_out_a_broker_outage() {
    let dir = tempfile::tempdir().unwrap();
    scenario(&format!(
        "sqlite:{}",
        dir.path().join("payments.db").display()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_payments_wait_out_a_broker_outage() {
    let server = Postgres::start();
    scenario(&server.url()).await;
}
