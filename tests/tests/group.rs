//! A broker group of three nodes (issue 17) under faults, checked with the torture
//! checker's rules (`txmq_tests::torture`): every acknowledged send and committed
//! transaction reaches every group; nothing rolled back, discarded or half is
//! delivered; nothing acked comes back. Redeliveries after a failover (leases live in
//! the leader's memory) are counted apart.
//!
//! `TXMQ_GROUP_KILLS` sets how many leaders are killed (default 4, the CI mode).

use std::time::{Duration, Instant};

use rand::Rng;
use txmq_tests::group::TestGroup;
use txmq_tests::torture::Torture;

/// The torture test's settings: check-backs and redeliveries fast enough to settle.
const FAST: &[&str] = &[
    "--check-timeout",
    "1s",
    "--check-interval",
    "100ms",
    "--check-backoff",
    "300ms",
    "--check-max",
    "10",
    "--check-reply-timeout",
    "1s",
    "--max-attempts",
    "4",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_load_loses_nothing() {
    let kills: usize = std::env::var("TXMQ_GROUP_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let mut group = TestGroup::start(3, FAST);
    let first = group
        .leader(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no leader elected\n{}", group.logs()));
    println!("node {} leads", first + 1);
    let torture = Torture::start(&group.addrs(), None);
    let mut gaps = Vec::new();
    for _ in 0..kills {
        let up = rand::rng().random_range(1500..3500);
        tokio::time::sleep(Duration::from_millis(up)).await;
        let leader = group
            .leader(Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("no leader\n{}", group.logs()));
        group.nodes[leader].kill9();
        let killed = Instant::now();
        let next = group
            .leader(Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("no new leader within 30 s\n{}", group.logs()));
        gaps.push(killed.elapsed());
        println!(
            "killed node {}; node {} leads after {:?}",
            leader + 1,
            next + 1,
            killed.elapsed()
        );
        // Back as a follower, catching up from the log.
        group.nodes[leader].start_again();
    }
    let addrs = group.addrs();
    let report = torture
        .finish(|args| {
            let out = std::process::Command::new(txmq_tests::bin("txmq"))
                .arg("--broker")
                .arg(&addrs)
                .args(args)
                .output()
                .expect("run txmq");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .await;
    let summary = format!("group: kills={kills} gaps={gaps:?} {}", report.summary);
    println!("{summary}");
    for (i, n) in group.nodes.iter_mut().enumerate() {
        assert!(n.is_running(), "node {} died on its own", i + 1);
    }
    assert!(
        report.required > 100,
        "too little traffic to mean anything: {summary}"
    );
    assert!(
        report.problems.is_empty(),
        "{summary}\n{}\n{}",
        report.problems.join("\n"),
        group.logs()
    );
}
