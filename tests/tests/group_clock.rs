//! Issue 25, item 8: wall clocks across a failover. Each node's clock is measured by
//! the leader's appends against the group's (the median of the members'); a node more
//! than 500 ms off raises an alarm (`/health`, `cluster status`, its log) and refuses to
//! lead, so it never delivers a scheduled message early or stores earlier times; within
//! the bound, `store_ms` never goes backwards along a topic.
//!
//! The clocks are moved with `TXMQ_CLOCK_OFFSET_MS`, which only debug builds of the
//! broker honour.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use txmq_client::{Admin, Consumer, ConsumerOptions, Message, Producer, ProducerOptions, pb};
use txmq_tests::group::{TestGroup, hello};
use txmq_tests::{eventually, http_get, next};

/// The bound (`replication::clock::MAX_SKEW_MS`).
const MAX_SKEW: Duration = Duration::from_millis(500);

async fn health(group: &TestGroup, i: usize) -> Option<serde_json::Value> {
    let (_, body) = http_get(group.nodes[i].metrics_addr(), "/health")
        .await
        .ok()?;
    serde_json::from_str(&body).ok()
}

/// Starts a group of three and gives node `i` the clock offset `offsets[i]` (ms),
/// restarting those that get one; returns once a leader serves.
async fn group_with_clocks(offsets: [i64; 3]) -> TestGroup {
    let mut group = TestGroup::start(3, &["--metrics-listen", "127.0.0.1:0"]);
    group
        .leader(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no leader\n{}", group.logs()));
    for (i, offset) in offsets.iter().enumerate().filter(|(_, o)| **o != 0) {
        group.nodes[i].set_env("TXMQ_CLOCK_OFFSET_MS", Some(&offset.to_string()));
        group.nodes[i].restart();
    }
    group
        .leader(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no leader after the restarts\n{}", group.logs()));
    group
}

/// Waits until the leader's cluster status shows every node reachable with its clock
/// measured within 250 ms of `offsets` (the group's median is 0 in every test here).
async fn measured(group: &mut TestGroup, offsets: [i64; 3]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut last = None;
    loop {
        if let Some(leader) = group.leader(Duration::from_secs(10)).await
            && let Ok(admin) = Admin::connect(group.nodes[leader].addr(), "").await
            && let Ok(s) = admin.cluster_status().await
        {
            let agree = s.nodes.len() == 3
                && s.nodes.iter().all(|n| {
                    n.reachable
                        && n.clock_skew_ms
                            .is_some_and(|ms| (ms - offsets[n.id as usize - 1]).abs() < 250)
                });
            if agree {
                return;
            }
            last = Some(s);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the clocks were never measured as set ({offsets:?}): {last:?}\n{}",
            group.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls node `i` for `how_long`: whether it ever answered a handshake as the leader.
async fn ever_served(group: &TestGroup, i: usize, how_long: Duration) -> bool {
    let until = tokio::time::Instant::now() + how_long;
    while tokio::time::Instant::now() < until {
        if hello(group.nodes[i].addr()).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A node whose clock is ahead, or behind, by more than the bound: the leader measures
/// it and tells it; `/health` says `clock_skewed`; asked to lead (`cluster transfer`),
/// it is elected and hands the leadership on without serving; scheduled messages come
/// due under another leader, none early by the test's (the group's) clock.
async fn a_node_far_off(offset_ms: i64) {
    let off = 2;
    let mut offsets = [0; 3];
    offsets[off] = offset_ms;
    let mut group = group_with_clocks(offsets).await;

    measured(&mut group, offsets).await;
    let told = eventually(Duration::from_secs(10), || async {
        health(&group, off)
            .await
            .filter(|h| h["status"] == "clock_skewed")
    })
    .await;
    assert!(
        told.is_some(),
        "node 3's /health never said clock_skewed: {:?}",
        health(&group, off).await
    );
    for i in (0..3).filter(|i| *i != off) {
        let h = health(&group, i).await.expect("health");
        assert_ne!(h["status"], "clock_skewed", "node {}: {h}", i + 1);
    }

    // Scheduled messages due in 6 s, by the test's clock.
    let p = Producer::connect(&group.addrs(), ProducerOptions::default())
        .await
        .expect("producer");
    let due = SystemTime::now() + Duration::from_secs(6);
    for i in 0..5 {
        p.send(Message::new("clocked", format!("due-{i}")).deliver_at(due))
            .await
            .expect("scheduled send");
    }
    drop(p);

    let leader = group.leader(Duration::from_secs(10)).await.expect("leader");
    let admin = Admin::connect(group.nodes[leader].addr(), "")
        .await
        .unwrap();
    admin
        .cluster_transfer(off as u64 + 1)
        .await
        .expect("transfer asked");
    let served = ever_served(&group, off, Duration::from_secs(4)).await;
    assert!(
        !served,
        "node 3, {offset_ms} ms off, served as the leader\n{}",
        group.logs()
    );
    let now_leader = group.leader(Duration::from_secs(30)).await;
    assert!(
        now_leader.is_some_and(|l| l != off),
        "no other node leads: {now_leader:?}\n{}",
        group.logs()
    );
    assert!(
        group.nodes[off]
            .log_text()
            .contains("handing the leadership over"),
        "node 3 never handed the leadership over\n{}",
        group.nodes[off].log_text()
    );

    let mut c = Consumer::subscribe(&group.addrs(), ConsumerOptions::new("g", "clocked"))
        .await
        .expect("subscribe");
    let mut early = Vec::new();
    for _ in 0..5 {
        let d = next(&mut c, Duration::from_secs(30))
            .await
            .expect("a scheduled message in time");
        let at = SystemTime::now();
        if at + MAX_SKEW < due {
            early.push(format!(
                "{} arrived {:?} before its time",
                String::from_utf8_lossy(d.body()),
                due.duration_since(at).unwrap()
            ));
        }
        d.ack().await.expect("ack");
    }
    assert!(early.is_empty(), "{early:?}\n{}", group.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_ahead_never_leads() {
    a_node_far_off(3000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_behind_never_leads() {
    a_node_far_off(-3000).await;
}

/// Sends to `topic` through the group until `stop`, reconnecting across a failover;
/// when each confirmed send was confirmed.
async fn send_until(addrs: String, topic: &'static str, stop: Arc<AtomicBool>) -> Vec<Instant> {
    let mut confirmed = Vec::new();
    'connect: while !stop.load(Ordering::Relaxed) {
        let Ok(p) = Producer::connect(&addrs, ProducerOptions::default()).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            match p
                .send(Message::new(topic, format!("m{}", confirmed.len())))
                .await
            {
                Ok(_) => confirmed.push(Instant::now()),
                Err(_) => continue 'connect,
            }
        }
    }
    confirmed
}

/// Hands the leadership to node `to` (index) and waits until it serves.
async fn lead(group: &mut TestGroup, to: usize) {
    let leader = group.leader(Duration::from_secs(30)).await.expect("leader");
    if leader != to {
        let admin = Admin::connect(group.nodes[leader].addr(), "")
            .await
            .unwrap();
        admin
            .cluster_transfer(to as u64 + 1)
            .await
            .expect("transfer");
    }
    let led = eventually(Duration::from_secs(30), || async {
        hello(group.nodes[to].addr()).await.ok()
    })
    .await;
    assert!(led.is_some(), "node {} never led\n{}", to + 1, group.logs());
}

/// Within the bound, a failover from a node 400 ms ahead to one 400 ms behind (800 ms
/// apart, each within 500 ms of the group's median) stores no earlier time after a later
/// one: `store_ms` never decreases along the topic's offsets. That shows only if the
/// sends went on within 800 ms of the hand-over (else the clocks never overlap): a
/// round where they did not is done again, at most three times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn within_the_bound_stored_times_never_go_backwards() {
    let (ahead, behind) = (0, 2);
    let offsets = [400, 0, -400];
    let mut group = group_with_clocks(offsets).await;
    measured(&mut group, offsets).await;
    let mut gaps = Vec::new();
    for round in 0..3 {
        let topic: &'static str = ["times0", "times1", "times2"][round];
        lead(&mut group, ahead).await;
        let stop = Arc::new(AtomicBool::new(false));
        let sender = tokio::spawn(send_until(group.addrs(), topic, stop.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        lead(&mut group, behind).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::Relaxed);
        let confirmed = sender.await.unwrap();
        assert!(!confirmed.is_empty());
        let gap = confirmed
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        let admin = Admin::connect(group.nodes[behind].addr(), "")
            .await
            .unwrap();
        let found = admin
            .find_messages(
                pb::FindMessagesRequest {
                    topic: topic.into(),
                    limit: 1000,
                    ..Default::default()
                },
                0,
            )
            .await
            .expect("find");
        assert!(
            found.len() >= confirmed.len(),
            "{} stored, {} confirmed",
            found.len(),
            confirmed.len()
        );
        let times: Vec<(u64, u64)> = found
            .iter()
            .filter_map(|f| f.message.as_ref())
            .map(|m| (m.offset, m.store_ms))
            .collect();
        let backwards: Vec<_> = times
            .windows(2)
            .filter(|w| w[1].1 < w[0].1)
            .map(|w| {
                format!(
                    "offset {} at {} after {} at {}",
                    w[1].0, w[1].1, w[0].0, w[0].1
                )
            })
            .collect();
        assert!(
            backwards.is_empty(),
            "stored times went backwards: {backwards:?}"
        );
        gaps.push(gap);
        // 700 ms: room for the sends' own spacing within the 800 ms the clocks overlap.
        if gap < Duration::from_millis(700) {
            println!("sends went on within {gap:?} of the hand-over (round {round})");
            return;
        }
    }
    panic!(
        "the sends never went on within 700 ms of the hand-over ({gaps:?}): the two clocks \
         never overlapped, so this run could not test the writer's clock"
    );
}
