//! Rewind and skip (issue 15, item 5): a group's position on a topic moves to the
//! earliest or latest message, an offset, or the first message stored at or after a
//! time, only while none of its consumers is connected; acks and retries start over.

use std::time::{Duration, SystemTime};

use txmq_client::{Admin, Consumer, ConsumerOptions, ErrorCode, Message, ResetTo};
use txmq_tests::{TestBroker, eventually, json_lines, next, producer};

/// Receives (and acks) until nothing comes for a moment; the bodies in order.
async fn all_of(b: &TestBroker) -> Vec<String> {
    let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new("g", "t"))
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(d) = next(&mut c, Duration::from_millis(1000)).await {
        got.push(String::from_utf8_lossy(d.body()).into_owned());
        d.ack().await.unwrap();
    }
    got
}

/// Resets until the broker has seen the last consumer go.
async fn reset(admin: &Admin, to: ResetTo) -> u64 {
    eventually(Duration::from_secs(20), || async {
        admin.reset_group("g", "t", to).await.ok()
    })
    .await
    .expect("reset refused")
}

fn bodies(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_moves_to_an_offset_a_time_the_start_or_the_end() {
    let b = TestBroker::start(&[]);
    let p = producer(&b).await;
    for i in 0..5 {
        p.send(Message::new("t", format!("m{i}"))).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let between = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(10)).await;
    for i in 5..10 {
        p.send(Message::new("t", format!("m{i}"))).await.unwrap();
    }
    assert_eq!(all_of(&b).await, bodies(0..10));
    let admin = Admin::connect(b.addr(), "").await.unwrap();

    // Not while a consumer is connected.
    let c = Consumer::subscribe(b.addr(), ConsumerOptions::new("g", "t"))
        .await
        .unwrap();
    let e = admin
        .reset_group("g", "t", ResetTo::Earliest)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
    assert!(e.to_string().contains("consumer"), "{e}");
    drop(c);

    assert_eq!(reset(&admin, ResetTo::Offset(3)).await, 3);
    assert_eq!(all_of(&b).await, bodies(3..10));
    assert_eq!(reset(&admin, ResetTo::Time(between)).await, 5);
    assert_eq!(all_of(&b).await, bodies(5..10));
    assert_eq!(reset(&admin, ResetTo::Earliest).await, 0);
    assert_eq!(all_of(&b).await, bodies(0..10));
    assert_eq!(reset(&admin, ResetTo::Latest).await, 10);
    p.send(Message::new("t", "new")).await.unwrap();
    assert_eq!(all_of(&b).await, vec!["new".to_string()]);

    // The CLI, with a time as people write it.
    let out = b.cli_ok(&[
        "group", "reset", "g", "--topic", "t", "--to", "1h ago", "--json",
    ]);
    assert_eq!(json_lines(&out)[0]["offset"], 0);
    let e = admin
        .reset_group("nobody", "t", ResetTo::Earliest)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::GroupNotFound), "{e}");
}

/// Issue 15, item 4 (groups): a group is deleted with everything it kept (position,
/// acks, retries, dead letters), not while a consumer of it is connected; the name then
/// starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_group_is_gone_and_its_name_starts_afresh() {
    let b = TestBroker::start(&["--max-attempts", "1"]);
    let p = producer(&b).await;
    for i in 0..4 {
        p.send(Message::new("t", format!("m{i}"))).await.unwrap();
    }
    let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new("g", "t"))
        .await
        .unwrap();
    for i in 0..4 {
        let d = next(&mut c, Duration::from_secs(20))
            .await
            .expect("delivery");
        if i == 0 {
            // To the DLQ (one attempt).
            d.nack(Some(Duration::ZERO)).await.unwrap();
        } else {
            d.ack().await.unwrap();
        }
    }
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    assert_eq!(admin.dead_letters("g", 0).await.unwrap().len(), 1);
    let e = admin.delete_group("g").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
    drop(c);
    let topics = eventually(Duration::from_secs(20), || async {
        admin.delete_group("g").await.ok()
    })
    .await;
    assert_eq!(topics, Some(1));
    assert!(
        admin.groups().await.unwrap().iter().all(|g| g.group != "g"),
        "the group is still listed"
    );
    assert!(admin.dead_letters("g", 0).await.unwrap().is_empty());
    let e = admin.delete_group("g").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::GroupNotFound), "{e}");
    // The name starts afresh: everything again, from the start.
    assert_eq!(all_of(&b).await, bodies(0..4));
    assert!(
        admin.dead_letters("g", 0).await.unwrap().is_empty(),
        "the old dead letter came back with the name"
    );
    // The CLI (once the broker has seen that consumer go).
    let out = eventually(Duration::from_secs(20), || async {
        let out = b.cli(&["group", "delete", "g", "--json"]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await
    .expect("txmq group delete");
    assert_eq!(json_lines(&out)[0]["topics"], 1);
}
