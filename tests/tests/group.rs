//! A broker group of three nodes (issue 17) under faults, checked with the torture
//! checker's rules (`txmq_tests::torture`): every acknowledged send and committed
//! transaction reaches every group; nothing rolled back, discarded or half is
//! delivered; nothing acked comes back. Redeliveries after a failover (leases live in
//! the leader's memory) are counted apart.
//!
//! `TXMQ_GROUP_KILLS` sets how many leaders are killed (default 4, the CI mode).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::Rng;
use txmq_client::{Admin, Consumer, ConsumerOptions, Message, Producer, ProducerOptions, pb};
use txmq_tests::TestBroker;
use txmq_tests::group::TestGroup;
use txmq_tests::lazyfs::LazyFs;
use txmq_tests::netns::Net;
use txmq_tests::torture::{FAST, Torture};

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
    // A follower dies and comes back under load: it catches up from the log.
    let leader = group
        .leader(Duration::from_secs(30))
        .await
        .expect("a leader");
    let follower = (leader + 1) % 3;
    group.nodes[follower].kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    group.nodes[follower].start_again();
    let addrs = group.addrs();
    let report = torture.finish(|args| group.cli(args)).await;
    let summary = format!("group: kills={kills} gaps={gaps:?} {}", report.summary);
    println!("{summary}");
    for (i, n) in group.nodes.iter_mut().enumerate() {
        assert!(n.is_running(), "node {} died on its own", i + 1);
    }
    // Every node, the restarted ones too, has the whole log.
    let s = status_until(&addrs, "every node caught up", |s| {
        s.nodes.len() == 3 && s.nodes.iter().all(|n| n.lag == 0 && n.reachable)
    })
    .await;
    println!("at the end: {s:?}");
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

/// Sends `bodies` one at a time (one Raft entry each).
async fn send_each(p: &Producer, topic: &str, bodies: impl IntoIterator<Item = String>) {
    for b in bodies {
        p.send(Message::new(topic, b)).await.expect("send");
    }
}

/// Consumes `topic` as `group` until `n` distinct bodies came (or 60 s passed).
async fn consume(addrs: &str, group: &str, topic: &str, n: usize) -> HashSet<String> {
    let mut c = Consumer::subscribe(addrs, ConsumerOptions::new(group, topic))
        .await
        .expect("subscribe");
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < n && tokio::time::Instant::now() < deadline {
        if let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(1), c.next()).await {
            seen.insert(String::from_utf8_lossy(d.body()).into_owned());
            d.ack().await.expect("ack");
        }
    }
    seen
}

/// Waits until the leader's status says `pred`, or panics after 60 s.
async fn status_until(
    addrs: &str,
    what: &str,
    pred: impl Fn(&pb::ClusterStatusOk) -> bool,
) -> pb::ClusterStatusOk {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        if let Ok(admin) = Admin::connect(addrs, "").await
            && let Ok(s) = admin.cluster_status().await
        {
            if pred(&s) {
                return s;
            }
            last = Some(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("not {what} within 60 s: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_data_catches_up_from_a_snapshot() {
    let mut group = TestGroup::start(3, &["--snapshot-entries", "100"]);
    let leader = group
        .leader(Duration::from_secs(30))
        .await
        .expect("a leader");
    let addrs = group.addrs();
    let p = Producer::connect(&addrs, ProducerOptions::default())
        .await
        .expect("producer");
    send_each(&p, "t", (0..250).map(|i| format!("a-{i}"))).await;
    // A follower loses its disk, while the group goes on and trims its log.
    let lost = (leader + 1) % 3;
    group.nodes[lost].kill9();
    std::fs::remove_dir_all(group.nodes[lost].data_dir()).expect("wipe");
    send_each(&p, "t", (0..250).map(|i| format!("b-{i}"))).await;
    let s = status_until(&addrs, "trimmed", |s| s.purged_index > 0).await;
    println!("log trimmed: {s:?}");
    group.nodes[lost].start_again();
    let lost_id = lost as u64 + 1;
    status_until(&addrs, "caught up", |s| {
        s.nodes
            .iter()
            .any(|n| n.id == lost_id && n.lag == 0 && n.matched_index > 0)
    })
    .await;
    assert!(
        group.nodes[lost]
            .log_text()
            .contains("installing a snapshot"),
        "it did not catch up from a snapshot:\n{}",
        group.nodes[lost].log_text()
    );
    // It leads, from what it received: everything is there.
    Admin::connect(&addrs, "")
        .await
        .unwrap()
        .cluster_transfer(lost_id)
        .await
        .expect("transfer");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while group.leader(Duration::from_secs(30)).await != Some(lost) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leadership did not move\n{}",
            group.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    send_each(&p, "t", (0..10).map(|i| format!("c-{i}"))).await;
    let seen = consume(&addrs, "after", "t", 510).await;
    let expected: HashSet<String> = (0..250)
        .map(|i| format!("a-{i}"))
        .chain((0..250).map(|i| format!("b-{i}")))
        .chain((0..10).map(|i| format!("c-{i}")))
        .collect();
    let missing: Vec<_> = expected.difference(&seen).take(5).collect();
    assert!(
        missing.is_empty() && seen.len() == expected.len(),
        "{} of {} came, missing e.g. {missing:?}\n{}",
        seen.len(),
        expected.len(),
        group.logs()
    );
}

/// Issue 25, item 6: installing a snapshot renames the node's state directories, and
/// Raft purges its log once it is installed; a power cut right after must not put the
/// old state back. The follower that installed one loses power (the lazy file system
/// undoes every directory rename whose parent was not fsynced), starts again, keeps up,
/// and leads with everything. Without the fsyncs it came back without its state, unable
/// to re-apply what its log no longer held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_after_a_snapshot_installation_loses_nothing() {
    let fs = LazyFs::mount();
    let dirs = vec![None, None, Some(fs.path().join("data"))];
    let mut group = TestGroup::start_in(dirs, &["--snapshot-entries", "100"]);
    let leader = group
        .leader(Duration::from_secs(30))
        .await
        .expect("a leader");
    let addrs = group.addrs();
    if leader == 2 {
        Admin::connect(&addrs, "")
            .await
            .unwrap()
            .cluster_transfer(1)
            .await
            .expect("transfer");
        while group.leader(Duration::from_secs(30)).await == Some(2) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let p = Producer::connect(&addrs, ProducerOptions::default())
        .await
        .expect("producer");
    send_each(&p, "t", (0..250).map(|i| format!("a-{i}"))).await;
    // Node 3 loses its disk while the group goes on and trims its log: it catches up
    // from a snapshot.
    group.nodes[2].kill9();
    std::fs::remove_dir_all(group.nodes[2].data_dir()).expect("wipe");
    send_each(&p, "t", (0..250).map(|i| format!("b-{i}"))).await;
    status_until(&addrs, "trimmed", |s| s.purged_index > 0).await;
    group.nodes[2].start_again();
    status_until(&addrs, "caught up", |s| {
        s.nodes
            .iter()
            .any(|n| n.id == 3 && n.lag == 0 && n.matched_index > 0)
    })
    .await;
    assert!(
        group.nodes[2].log_text().contains("installing a snapshot"),
        "it did not catch up from a snapshot:\n{}",
        group.nodes[2].log_text()
    );
    // The power goes, and comes back.
    group.nodes[2].kill9();
    let (bytes, renames) = fs.power_cut_counting();
    println!("power cut: {bytes} unsynced bytes dropped, {renames} directory renames undone");
    group.nodes[2].start_again();
    send_each(&p, "t", (0..10).map(|i| format!("c-{i}"))).await;
    let last = status_until(&addrs, "written", |_| true)
        .await
        .last_log_index;
    status_until(&addrs, "caught up after the cut", |s| {
        s.nodes.iter().any(|n| n.id == 3 && n.matched_index >= last)
    })
    .await;
    assert!(
        group.nodes[2].is_running(),
        "node 3 did not survive the power cut\n{}",
        group.nodes[2].log_text()
    );
    Admin::connect(&addrs, "")
        .await
        .unwrap()
        .cluster_transfer(3)
        .await
        .expect("transfer");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while group.leader(Duration::from_secs(30)).await != Some(2) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leadership did not move\n{}",
            group.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seen = consume(&addrs, "after", "t", 510).await;
    assert_eq!(seen.len(), 510, "node 3 lost messages\n{}", group.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_added_and_removed() {
    let mut group = TestGroup::start(3, &["--snapshot-entries", "50"]);
    group
        .leader(Duration::from_secs(30))
        .await
        .expect("a leader");
    let addrs = group.addrs();
    let p = Producer::connect(&addrs, ProducerOptions::default())
        .await
        .expect("producer");
    send_each(&p, "t", (0..120).map(|i| format!("m-{i}"))).await;
    let (extra, entry) = group.start_extra(&[]);
    let admin = Admin::connect(&addrs, "").await.unwrap();
    let s = admin
        .cluster_add(4, entry.split_once('=').unwrap().1)
        .await
        .expect("add");
    assert!(s.nodes.iter().any(|n| n.id == 4), "{s:?}");
    // Added twice: refused, nothing changes.
    let again = admin
        .cluster_add(4, entry.split_once('=').unwrap().1)
        .await
        .expect_err("added twice");
    assert!(again.to_string().contains("already a member"), "{again}");
    let s = status_until(&addrs, "a caught-up voter", |s| {
        s.nodes.iter().any(|n| n.id == 4 && n.voter && n.lag == 0)
    })
    .await;
    assert_eq!(s.nodes.len(), 4, "{s:?}");
    assert!(group.nodes[extra].is_running());
    let admin = Admin::connect(&addrs, "").await.unwrap();
    let s = admin.cluster_remove(4).await.expect("remove");
    assert!(s.nodes.iter().all(|n| n.id != 4), "{s:?}");
    let e = admin.cluster_remove(4).await.expect_err("removed twice");
    assert!(e.to_string().contains("not a member"), "{e}");
    // A single broker is not a group.
    let single = txmq_tests::TestBroker::start(&[]);
    let e = Admin::connect(single.addr(), "")
        .await
        .unwrap()
        .cluster_status()
        .await
        .expect_err("not a group");
    assert!(e.to_string().contains("not part of a group"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_stops_acknowledging_and_nothing_diverges() {
    let net = Net::create(3);
    let peers = (0..3)
        .map(|i| format!("{}={}:7100", i + 1, net.addr(i)))
        .collect::<Vec<_>>()
        .join(",");
    let nodes = (0..3)
        .map(|i| {
            let id = (i + 1).to_string();
            let mut args = txmq_tests::group::node_args(&id, &peers);
            args.extend_from_slice(FAST);
            // Off loopback, with no users: said to be meant.
            args.push("--allow-anonymous");
            TestBroker::start_in_netns(&net.ns(i), &format!("{}:7200", net.addr(i)), &args)
        })
        .collect();
    let mut group = TestGroup { nodes, peers };
    let old = group
        .leader(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no leader\n{}", group.logs()));
    let torture = Torture::start(&group.addrs(), None);
    tokio::time::sleep(Duration::from_secs(2)).await;

    net.cut(old);
    let cut_at = Instant::now();
    // Inside the cut-off namespace, its leader takes no write: it cannot reach a
    // majority, and stops serving.
    let out = net
        .command(old, txmq_tests::bin("txmq").to_str().unwrap())
        .args(["--broker", group.nodes[old].addr()])
        .args(["produce", "--topic", "cut-off", "--body", "never"])
        .output()
        .expect("run txmq in the namespace");
    assert!(
        !out.status.success(),
        "the cut-off leader acknowledged a write: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    println!(
        "cut-off leader refused after {:?}: {}",
        cut_at.elapsed(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    // The others elect a leader and serve meanwhile.
    let new = group
        .leader(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no leader on the majority side\n{}", group.logs()));
    assert_ne!(new, old);
    println!(
        "node {} leads after the cut ({:?})",
        new + 1,
        cut_at.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    net.heal(old);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let addrs = group.addrs();
    let report = torture.finish(|args| group.cli(args)).await;
    println!("partition: {}", report.summary);
    assert!(
        report.required > 100,
        "too little traffic: {}",
        report.summary
    );
    assert!(
        report.problems.is_empty(),
        "{}\n{}\n{}",
        report.summary,
        report.problems.join("\n"),
        group.logs()
    );
    // Nothing of the refused write was kept, and every node has the same log.
    let admin = Admin::connect(&addrs, "").await.unwrap();
    let topics = admin.topics().await.unwrap();
    assert!(
        topics.iter().all(|t| t.name != "cut-off"),
        "the cut-off leader's write survived: {topics:?}"
    );
    let s = status_until(&addrs, "every node level", |s| {
        s.nodes.len() == 3 && s.nodes.iter().all(|n| n.lag == 0 && n.reachable)
    })
    .await;
    println!("after healing: {s:?}");
}

/// The power-loss filesystem (issue 13) under two nodes of three: a kill -9 keeps the
/// page cache, a power cut does not. Each round, node 3 is killed (so for a while only
/// nodes 1 and 2 hold what is committed), then nodes 1 and 2 lose power at once, and
/// all three start again. Whatever was acknowledged was fsynced by nodes 1 and 2 (the
/// majority then), so it must survive; a log store that reported appends flushed
/// before their fsync loses them here.
///
/// `TXMQ_GROUP_POWER_CUTS` sets the rounds (default 3, the CI mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_of_a_majority_loses_nothing_acknowledged() {
    let rounds: usize = std::env::var("TXMQ_GROUP_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let fs = [LazyFs::mount(), LazyFs::mount()];
    let dirs = vec![
        Some(fs[0].path().join("data")),
        Some(fs[1].path().join("data")),
        None,
    ];
    let mut group = TestGroup::start_in(dirs, FAST);
    group
        .leader(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no leader\n{}", group.logs()));
    let torture = Torture::start(&group.addrs(), None);
    let mut dropped = Vec::new();
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        group.nodes[2].kill9();
        // Nodes 1 and 2 elect (if node 3 led) and go on alone.
        let up = rand::rng().random_range(3000..5000);
        tokio::time::sleep(Duration::from_millis(up)).await;
        group.nodes[0].kill9();
        group.nodes[1].kill9();
        dropped.push((fs[0].power_cut(), fs[1].power_cut()));
        for n in &mut group.nodes {
            n.start_again();
        }
        group
            .leader(Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("no leader after the cut\n{}", group.logs()));
    }
    let report = torture.finish(|args| group.cli(args)).await;
    let summary = format!(
        "power cuts: unsynced bytes dropped {dropped:?} {}",
        report.summary
    );
    println!("{summary}");
    assert!(
        dropped.iter().any(|(a, b)| a + b > 0),
        "the cuts dropped nothing: the test saw no unsynced data"
    );
    assert!(report.required > 100, "too little traffic: {summary}");
    assert!(
        report.problems.is_empty(),
        "{summary}\n{}\n{}",
        report.problems.join("\n"),
        group.logs()
    );
}
