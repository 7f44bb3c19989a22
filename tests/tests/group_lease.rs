//! Issue 25, item 9: a leader paused (SIGSTOP) until another node led and confirmed a
//! write answers nothing from its old state when it wakes. An adversarial client once
//! got, within milliseconds of the resume, an OK to a new connection's handshake and
//! listings without the confirmed write, on new and on existing sessions (3 of 6
//! pauses): the lease was checked on a 100 ms tick only. Now every request asks it.
//!
//! Issue 25, item 7: handing the leadership over stops the old leader serving first.
//!
//! `TXMQ_PAUSES` sets the number of pauses (4 by default, about 30 s); `TXMQ_TRANSFERS`
//! the number of transfers under load (3 by default).

use std::time::Duration;

use txmq_client::{Admin, ErrorCode, Message, Producer, ProducerOptions};
use txmq_tests::group::{TestGroup, hello};

/// The first node but `paused` that answers a handshake as the leader.
async fn new_leader(group: &TestGroup, paused: usize) -> Option<usize> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        for i in (0..group.nodes.len()).filter(|i| *i != paused) {
            if hello(group.nodes[i].addr()).await.is_ok() {
                return Some(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_answers_nothing_from_its_old_state() {
    let pauses: usize = std::env::var("TXMQ_PAUSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let mut group = TestGroup::start(3, &[]);
    let mut violations = Vec::new();
    for round in 0..pauses {
        let old = group
            .leader(Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("no leader\n{}", group.logs()));
        // A session opened before the pause, and used.
        let before = Admin::connect(group.nodes[old].addr(), "").await.unwrap();
        before.topics().await.unwrap();

        group.nodes[old].signal(libc::SIGSTOP);
        let new = new_leader(&group, old).await;
        let Some(new) = new else {
            group.nodes[old].signal(libc::SIGCONT);
            panic!(
                "no other node led while the leader was paused\n{}",
                group.logs()
            );
        };
        // A write the new leader confirmed: a topic of its own.
        let topic = format!("after-{round}");
        let p = Producer::connect(group.nodes[new].addr(), ProducerOptions::default())
            .await
            .unwrap();
        p.send(Message::new(&topic, "confirmed")).await.unwrap();
        drop(p);

        group.nodes[old].signal(libc::SIGCONT);
        // At once: a new connection's handshake, and a listing on the old session. Each
        // is received after the confirmed write; neither may answer from before it.
        let (handshake, listing) = tokio::join!(hello(group.nodes[old].addr()), before.topics());
        if handshake.is_ok() {
            violations.push(format!(
                "pause {round}: the old leader answered a handshake OK"
            ));
        }
        match listing {
            Ok(topics) if !topics.iter().any(|t| t.name == topic) => violations.push(format!(
                "pause {round}: the old leader listed topics without {topic:?}, confirmed by \
                 the new leader"
            )),
            Ok(_) => {}
            Err(e) => assert!(
                matches!(e.code(), Some(ErrorCode::NotLeader) | None),
                "pause {round}: {e}"
            ),
        }
    }
    assert!(violations.is_empty(), "{violations:#?}\n{}", group.logs());
}

/// Issue 25, item 7: `cluster transfer` makes its target stand for election at once, not
/// after the followers' patience the lease counts on; the old leader stops serving
/// first. Under the torture load (native and checked by its rules: nothing acked comes
/// back on a newer lease, nothing lost), the leadership is handed over several times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handing_the_leadership_over_never_lets_two_nodes_serve() {
    use txmq_tests::torture::{FAST, Torture};
    let transfers: usize = std::env::var("TXMQ_TRANSFERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut group = TestGroup::start(3, FAST);
    group
        .leader(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no leader\n{}", group.logs()));
    let torture = Torture::start(&group.addrs(), None);
    for _ in 0..transfers {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let leader = group
            .leader(Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("no leader\n{}", group.logs()));
        let to = ((leader + 1) % 3) as u64 + 1;
        let admin = Admin::connect(group.nodes[leader].addr(), "")
            .await
            .unwrap();
        admin.cluster_transfer(to).await.expect("transfer");
    }
    let report = torture.finish(|args| group.cli(args)).await;
    println!("transfers: {transfers} {}", report.summary);
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
}

/// Issue 25, item 7: a transfer to a node that cannot be elected (it is paused) leaves
/// the old leader serving nothing at once; the group then elects a leader among the
/// others (openraft's leader sends no heartbeats once it hands over) and serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_transfer_failed_serves_again() {
    let mut group = TestGroup::start(3, &[]);
    let leader = group
        .leader(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no leader\n{}", group.logs()));
    let target = (leader + 1) % 3;
    group.nodes[target].signal(libc::SIGSTOP);
    let admin = Admin::connect(group.nodes[leader].addr(), "")
        .await
        .unwrap();
    let answer = admin.cluster_transfer(target as u64 + 1).await;
    let refused = hello(group.nodes[leader].addr()).await;
    let started = std::time::Instant::now();
    let back = loop {
        let mut serving = None;
        for i in (0..3).filter(|i| *i != target) {
            if hello(group.nodes[i].addr()).await.is_ok() {
                serving = Some(i);
            }
        }
        if serving.is_some() {
            break serving;
        }
        if started.elapsed() > Duration::from_secs(30) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    group.nodes[target].signal(libc::SIGCONT);
    answer.expect("transfer asked");
    assert!(
        refused.is_err(),
        "the old leader served while handing over: {refused:?}"
    );
    assert!(
        back.is_some(),
        "the group never served again\n{}",
        group.logs()
    );
}
