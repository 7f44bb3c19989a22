//! Issue 15, item 4 (topics): a topic is deleted with everything that refers to it: its
//! messages, every group's position, retries and dead letters on it, its scheduled
//! messages. Not while a transaction on it is open or a consumer is subscribed, unless
//! forced; then the transaction is rolled back. The space comes back, other topics are
//! untouched, and a topic created later under the name starts afresh, also after a
//! restart.

use std::time::Duration;

use txmq_client::{
    Admin, Consumer, ConsumerOptions, ErrorCode, Message, Producer, ProducerOptions,
};
use txmq_tests::{TestBroker, du, eventually, json_lines, next, producer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_topic_goes_with_everything_that_refers_to_it() {
    let mut b = TestBroker::start_on_fixed_port(&["--max-attempts", "1", "--check-timeout", "10m"]);
    let p = producer(&b).await;
    let mut body = vec![0u8; 1 << 20];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut body);
    for _ in 0..40 {
        p.send(Message::new("t", body.clone())).await.unwrap();
    }
    p.send(Message::new("other", "stays")).await.unwrap();
    // Group h: a position stored, its queue not running (after a restart).
    drop(
        Consumer::subscribe(b.addr(), ConsumerOptions::new("h", "t"))
            .await
            .unwrap(),
    );
    drop(p);
    b.restart();
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let p = producer(&b).await;
    let scheduled = p
        .send(Message::new("t", "later").deliver_after(Duration::from_secs(3600)))
        .await
        .unwrap();
    // Group g: one dead letter (one attempt), and a consumer still connected.
    let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new("g", "t"))
        .await
        .unwrap();
    let d = next(&mut c, Duration::from_secs(20))
        .await
        .expect("delivery");
    d.nack(Some(Duration::ZERO)).await.unwrap();
    assert_eq!(admin.dead_letters("g", 0).await.unwrap().len(), 1);
    // An open transaction with a message for t.
    let options =
        ProducerOptions::transactional("pg", |_req| async { txmq_client::Outcome::Unknown });
    let tp = Producer::connect(b.addr(), options).await.unwrap();
    let mut open = tp.begin().unwrap();
    open.send(Message::new("t", "open")).await.unwrap();

    let e = admin.delete_topic("t", false).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
    assert!(e.to_string().contains("open transaction"), "{e}");
    // The consumer alone refuses it too.
    open.rollback().await.unwrap();
    let e = admin.delete_topic("t", false).await.unwrap_err();
    assert!(e.to_string().contains("consumer"), "{e}");
    let mut open = tp.begin().unwrap();
    open.send(Message::new("t", "open again")).await.unwrap();
    let before = du(b.data_dir());
    assert_eq!(admin.stats().await.unwrap().groups, 2);

    let out = b.cli_ok(&["topic", "delete", "t", "--force", "--json"]);
    let out = &json_lines(&out)[0];
    assert_eq!(out["deleted"], "t");
    assert_eq!(out["messages"], 40);
    assert_eq!(out["groups"], 2);
    assert_eq!(out["rolled_back"], 1);
    assert_eq!(out["scheduled_cancelled"], 1);

    assert!(admin.topics().await.unwrap().iter().all(|t| t.name != "t"));
    assert!(admin.groups().await.unwrap().iter().all(|g| g.topic != "t"));
    assert!(admin.dead_letters("g", 0).await.unwrap().is_empty());
    // What groups kept under the topic is gone from storage, not only from view.
    assert_eq!(admin.stats().await.unwrap().groups, 0);
    let e = open.commit().await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TxnAlreadyRolledBack), "{e}");
    assert!(admin.scheduled("", 0).await.unwrap().is_empty());
    assert!(scheduled.message_id.len() == 32);
    let e = admin.delete_topic("t", false).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TopicNotFound), "{e}");
    let after = eventually(Duration::from_secs(60), || async {
        let now = du(b.data_dir());
        (now + (20 << 20) < before).then_some(now)
    })
    .await;
    assert!(
        after.is_some(),
        "the space did not come back from {before} bytes"
    );

    // A new topic under the name starts afresh; the old consumer gets nothing of it.
    let r = p.send(Message::new("t", "fresh")).await.unwrap();
    assert_eq!(r.offset, 0, "a new topic's log starts at 0");
    // (It may still hold what was delivered before, never the new topic's.)
    while let Some(d) = next(&mut c, Duration::from_millis(500)).await {
        assert_ne!(
            d.body().as_ref(),
            b"fresh",
            "a dropped consumer still receives"
        );
    }
    drop(c);
    b.restart();
    let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new("g", "t"))
        .await
        .unwrap();
    let d = next(&mut c, Duration::from_secs(20)).await.expect("fresh");
    assert_eq!((d.body().as_ref(), d.offset()), (&b"fresh"[..], 0));
    d.ack().await.unwrap();
    assert!(next(&mut c, Duration::from_millis(500)).await.is_none());
    let mut o = Consumer::subscribe(b.addr(), ConsumerOptions::new("g", "other"))
        .await
        .unwrap();
    let d = next(&mut o, Duration::from_secs(20))
        .await
        .expect("other topic");
    assert_eq!(d.body().as_ref(), b"stays");
}

/// A deletion cut short (the broker killed after the topic's write, before its cleanup)
/// is finished at the next start: the groups' state, the scheduled messages and, when
/// forced, the open transactions of the topic go all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_deletion_is_finished_at_the_next_start() {
    let mut b = TestBroker::start_on_fixed_port(&["--max-attempts", "1", "--check-timeout", "10m"]);
    b.set_env("TXMQ_FAULT_HALT_AFTER_TOPIC_DELETE", Some("1"));
    b.restart();
    let p = producer(&b).await;
    p.send(Message::new("t", "m")).await.unwrap();
    p.send(Message::new("t", "later").deliver_after(Duration::from_secs(3600)))
        .await
        .unwrap();
    {
        let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new("h", "t"))
            .await
            .unwrap();
        let d = next(&mut c, Duration::from_secs(20))
            .await
            .expect("delivery");
        d.nack(Some(Duration::ZERO)).await.unwrap();
    }
    let options =
        ProducerOptions::transactional("pg", |_req| async { txmq_client::Outcome::Unknown });
    let tp = Producer::connect(b.addr(), options).await.unwrap();
    let mut open = tp.begin().unwrap();
    open.send(Message::new("t", "open")).await.unwrap();
    let txn_id = open.id().unwrap().to_string();
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    assert_eq!(admin.stats().await.unwrap().groups, 1);

    let mut cli = b.cli_spawn(&["topic", "delete", "t", "--force"]);
    let halted = eventually(Duration::from_secs(20), || async {
        b.log_text().contains("fault point: halting").then_some(())
    })
    .await;
    assert!(halted.is_some(), "the delete never reached its fault point");
    b.kill9();
    let _ = cli.kill();
    let _ = cli.wait();
    b.set_env("TXMQ_FAULT_HALT_AFTER_TOPIC_DELETE", None);
    b.start_again();

    let admin = Admin::connect(b.addr(), "").await.unwrap();
    assert!(admin.topics().await.unwrap().iter().all(|t| t.name != "t"));
    // A commit while the cleanup runs (or after it) never goes through: refused while
    // the rollback is pending, already rolled back after.
    let rolled_back = eventually(Duration::from_secs(20), || async {
        let e = admin
            .resolve(&txn_id, true)
            .await
            .expect_err("a commit of a forced deletion's transaction went through");
        match e.code() {
            Some(ErrorCode::TxnAlreadyRolledBack) => Some(()),
            Some(ErrorCode::InvalidRequest) => None,
            other => panic!("unexpected {other:?}: {e}"),
        }
    })
    .await;
    assert!(rolled_back.is_some(), "the transaction was not rolled back");
    let cleaned = eventually(Duration::from_secs(20), || async {
        let groups = admin.stats().await.ok()?.groups;
        let scheduled = admin.scheduled("", 0).await.ok()?.len();
        (groups == 0 && scheduled == 0).then_some(())
    })
    .await;
    assert!(
        cleaned.is_some(),
        "the cleanup was not resumed:\n{}",
        b.log_text()
    );
    let e = admin.resolve(&txn_id, true).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TxnAlreadyRolledBack), "{e}");
    assert!(
        b.log_text()
            .contains("resuming the cleanup of a deleted topic")
    );
}
