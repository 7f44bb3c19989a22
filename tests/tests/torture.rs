//! The torture test (issue 6): I1, I3 and I6 together under `kill -9` of a single
//! broker, with native, gRPC and Remoting clients, an ordered group, gRPC short polls and poison
//! messages (the workload and its checker: `txmq_tests::torture`).
//!
//! `TXMQ_TORTURE_KILLS` sets the number of kills (default 20, the CI mode); a longer run
//! is `TXMQ_TORTURE_KILLS=200 cargo nextest run -p txmq-tests --test torture`.

use std::time::Duration;

use rand::Rng;
use txmq_tests::TestBroker;
use txmq_tests::torture::{FAST, Torture};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_torture() {
    let kills: usize = std::env::var("TXMQ_TORTURE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut args = FAST.to_vec();
    args.extend([
        "--grpc-listen",
        "127.0.0.1:0",
        "--remoting-listen",
        "127.0.0.1:0",
    ]);
    let mut b = TestBroker::start_on_fixed_port(&args);
    let torture = Torture::start_with(b.addr(), Some(b.grpc_addr()), Some(b.remoting_addr()), true);
    for _ in 0..kills {
        let (up, down) = {
            let mut rng = rand::rng();
            (rng.random_range(200..900), rng.random_range(0..200))
        };
        tokio::time::sleep(Duration::from_millis(up)).await;
        b.kill9();
        tokio::time::sleep(Duration::from_millis(down)).await;
        b.start_again();
    }
    // The gRPC consumers must go on after the last restart, not only before the first.
    let grpc_acks_before = torture.grpc_acks();
    let world = torture.world.clone();
    // The Remoting producer routes and connects again after the last restart too.
    let remoting_before = world.remoting_sends();
    let remoting_resumed = txmq_tests::eventually(Duration::from_secs(30), || async {
        (world.remoting_sends() > remoting_before).then_some(())
    })
    .await
    .is_some();
    let report = torture.finish(|args| b.cli_ok(args)).await;
    assert!(b.is_running(), "the broker died on its own");
    let summary = format!("torture: kills={kills} {}", report.summary);
    println!("{summary}");
    assert!(
        report.required > 100,
        "too little traffic to mean anything: {summary}"
    );
    assert!(
        report.grpc_sent > 0,
        "the gRPC producer got nothing stored: {summary}"
    );
    assert!(
        report.grpc_acked > 0,
        "the gRPC consumer acked nothing: {summary}"
    );
    assert!(
        report.remoting_committed > 0,
        "the Remoting consumer committed nothing: {summary}"
    );
    assert!(
        report.remoting_sent > 0 && remoting_resumed,
        "the Remoting producer got nothing stored (or nothing after the last restart): {summary}"
    );
    for (g, kind) in [(0, "SimpleConsumer"), (1, "short-poll consumer")] {
        assert!(
            world.grpc_acks(g) > grpc_acks_before[g],
            "the gRPC {kind} acked nothing after the last restart: {summary}"
        );
    }
    assert!(
        report.dead_lettered,
        "a group's dead-letter queue is empty: the poison messages never got there: {summary}"
    );
    assert!(
        report.problems.is_empty(),
        "{summary}\n{}",
        report.problems.join("\n")
    );
}
