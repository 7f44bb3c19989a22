//! Transactional messages against the real broker: I1 (invisible until committed), I2
//! (atomic, idempotent resolution), I4 (check-back that works), and crash recovery.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::StreamExt;
use txmq_client::pb::TxnState;
use txmq_client::{
    Admin, Consumer, ConsumerOptions, ErrorCode, Message, Outcome, Producer, ProducerOptions,
};
use txmq_tests::{TestBroker, eventually, json_lines};

/// Fast check-backs so tests run in seconds.
const FAST_CHECKS: &[&str] = &[
    "--check-timeout",
    "300ms",
    "--check-interval",
    "100ms",
    "--check-backoff",
    "300ms",
    "--check-reply-timeout",
    "2s",
];

async fn txn_producer(b: &TestBroker, group: &str, answer: Outcome) -> (Producer, Arc<AtomicU32>) {
    let checks = Arc::new(AtomicU32::new(0));
    let seen = checks.clone();
    let options = ProducerOptions::transactional(group, move |_req| {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            answer
        }
    });
    let p = Producer::connect(b.addr(), options)
        .await
        .expect("producer");
    (p, checks)
}

/// Everything a fresh group can read from `topic` within `wait`, acked, as text.
async fn drain(b: &TestBroker, group: &str, topic: &str, wait: Duration) -> Vec<String> {
    txmq_tests::drain(b, group, topic, wait)
        .await
        .into_iter()
        .map(|body| String::from_utf8_lossy(&body).into_owned())
        .collect()
}

async fn txn_state(b: &TestBroker, id: &str) -> Option<txmq_client::pb::TxnInfo> {
    let admin = Admin::connect(b.addr(), "").await.ok()?;
    let list = admin
        .transactions(TxnState::Unspecified, "", 0)
        .await
        .ok()?;
    list.txns.into_iter().find(|t| t.txn_id == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_message_is_invisible_until_commit() {
    let b = TestBroker::start(&[]);
    let (p, _) = txn_producer(&b, "pg", Outcome::Unknown).await;
    let mut txn = p.begin().unwrap();
    let half = txn.send(Message::new("orders", "order-1")).await.unwrap();
    assert_eq!(half.offset, 0);
    // A consumer subscribed before the commit sees nothing of it: a plain marker sent
    // after the half message is the first thing it receives (no fixed wait to prove it).
    let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new("g", "orders"))
        .await
        .unwrap();
    txmq_tests::producer(&b)
        .await
        .send(Message::new("orders", "marker"))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("marker not delivered")
        .unwrap()
        .unwrap();
    assert_eq!(first.body().as_ref(), b"marker", "half message delivered");
    first.ack().await.unwrap();
    txn.commit().await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("committed message not delivered")
        .unwrap()
        .unwrap();
    assert_eq!(d.body().as_ref(), b"order-1");
    assert_eq!(d.id(), half.message_id, "id assigned at half time is kept");
    assert_eq!(d.message.txn_id, txn.id().unwrap());
    d.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_is_never_visible_and_conflicts_are_refused() {
    let b = TestBroker::start(&[]);
    let (p, _) = txn_producer(&b, "pg", Outcome::Unknown).await;

    let mut rolled = p.begin().unwrap();
    rolled.send(Message::new("t", "rolled back")).await.unwrap();
    rolled.rollback().await.unwrap();
    rolled
        .rollback()
        .await
        .expect("repeated rollback is a no-op success");
    let err = rolled.commit().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TxnAlreadyRolledBack), "{err}");

    let mut committed = p.begin().unwrap();
    committed
        .send(Message::new("t", "committed"))
        .await
        .unwrap();
    committed.commit().await.unwrap();
    let id = committed.id().unwrap().to_string();
    let again = p
        .end_transaction(&id, Outcome::Commit, false)
        .await
        .unwrap();
    assert!(
        again.repeated,
        "second commit must be recognised as a repeat"
    );
    assert!(again.receipts.is_empty());
    let err = committed.rollback().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TxnAlreadyCommitted), "{err}");

    let err = p
        .end_transaction("00000000000000000000000000000000", Outcome::Commit, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TxnNotFound));

    // The duplicate commit wrote no duplicate message; the rollback wrote nothing.
    let bodies = drain(&b, "g", "t", Duration::from_secs(2)).await;
    assert_eq!(bodies, vec!["committed".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_commits_make_one_message() {
    let b = TestBroker::start(&[]);
    let (p, _) = txn_producer(&b, "pg", Outcome::Unknown).await;
    let mut txn = p.begin().unwrap();
    txn.send(Message::new("t", "once")).await.unwrap();
    let id = txn.id().unwrap().to_string();
    let commits = (0..8).map(|_| {
        let p = p.clone();
        let id = id.clone();
        async move { p.end_transaction(&id, Outcome::Commit, false).await }
    });
    let results = futures::future::join_all(commits).await;
    let fresh = results
        .iter()
        .filter(|r| matches!(r, Ok(ok) if !ok.repeated))
        .count();
    assert_eq!(fresh, 1, "exactly one commit does the work: {results:?}");
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(
        drain(&b, "g", "t", Duration::from_secs(2)).await,
        vec!["once"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_message_transaction_is_all_or_nothing() {
    let b = TestBroker::start(&[]);
    let (p, _) = txn_producer(&b, "pg", Outcome::Unknown).await;
    let mut txn = p.begin().unwrap();
    for i in 0..5 {
        txn.send(Message::new("a", format!("a{i}"))).await.unwrap();
    }
    txn.send_batch(vec![Message::new("b", "b0"), Message::new("b", "b1")])
        .await
        .unwrap();
    let mut ca = Consumer::subscribe(b.addr(), ConsumerOptions::new("g", "a"))
        .await
        .unwrap();
    // A marker sent after the halves arrives first: none of them is visible.
    txmq_tests::producer(&b)
        .await
        .send(Message::new("a", "marker"))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), ca.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first.body().as_ref(),
        b"marker",
        "a half message was delivered"
    );
    first.ack().await.unwrap();
    txn.commit().await.unwrap();
    let offsets: Vec<u64> = txn.receipts().iter().map(|r| r.offset).collect();
    assert_eq!(offsets, vec![1, 2, 3, 4, 5, 0, 1]);
    let mut got = Vec::new();
    for _ in 0..5 {
        let d = tokio::time::timeout(Duration::from_secs(10), ca.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.push(String::from_utf8_lossy(d.body()).into_owned());
        d.ack().await.unwrap();
    }
    assert_eq!(got, vec!["a0", "a1", "a2", "a3", "a4"]);
    assert_eq!(
        drain(&b, "g", "b", Duration::from_secs(2)).await,
        vec!["b0", "b1"]
    );

    // send_in_transaction with a local transaction that fails: nothing visible.
    let (outcome, rolled) = p
        .send_in_transaction(
            vec![Message::new("a", "x"), Message::new("b", "y")],
            |_id| async { Outcome::Rollback },
        )
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Rollback);
    let info = txn_state(&b, rolled.id().unwrap()).await.unwrap();
    assert_eq!(info.state, TxnState::RolledBack as i32);
    assert!(drain(&b, "g", "a", Duration::from_secs(1)).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_producer_is_resolved_by_another_of_its_group() {
    let b = TestBroker::start(FAST_CHECKS);
    // A producer process that sends a half message and dies without resolving it.
    let mut first = b.cli_spawn(&[
        "produce",
        "--topic",
        "orders",
        "--body",
        "order-9",
        "--transactional",
        "--group",
        "order-service",
        "--resolve",
        "unknown",
        "--linger",
        "60",
        "--json",
    ]);
    let stdout = first.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout).lines().next()
    })
    .await
    .unwrap()
    .expect("producer printed its transaction")
    .unwrap();
    let txn_id = json_lines(&line)[0]["txn"].as_str().unwrap().to_string();
    first.kill().unwrap();
    first.wait().unwrap();

    // A second producer process of the same group answers the check-back: commit.
    let (_second, checks) = txn_producer(&b, "order-service", Outcome::Commit).await;
    let bodies = drain(&b, "points", "orders", Duration::from_secs(5)).await;
    assert_eq!(bodies, vec!["order-9"]);
    assert!(checks.load(Ordering::SeqCst) >= 1);
    let info = txn_state(&b, &txn_id).await.unwrap();
    assert_eq!(info.state, TxnState::Committed as i32, "{info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_producer_connected_does_not_count_a_check() {
    let b = TestBroker::start(FAST_CHECKS);
    let id = {
        let (p, _) = txn_producer(&b, "lonely", Outcome::Unknown).await;
        let mut txn = p.begin().unwrap();
        txn.send(Message::new("t", "x")).await.unwrap();
        txn.id().unwrap().to_string()
    };
    // The producer is gone. Wait until the scheduler has visited it several times.
    let info = eventually(Duration::from_secs(20), || async {
        txn_state(&b, &id)
            .await
            .filter(|t| t.last_check_note.contains("no producer"))
    })
    .await
    .expect("the scheduler never looked at the transaction");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = txn_state(&b, &id).await.unwrap();
    assert_eq!(info.check_count, 0, "{info:?}");
    assert_eq!(later.check_count, 0, "{later:?}");
    assert_eq!(later.state, TxnState::Prepared as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_until_check_max_discards_then_rearm_checks_again() {
    let mut args = FAST_CHECKS.to_vec();
    args.extend(["--check-max", "3"]);
    let b = TestBroker::start(&args);
    let (p, checks) = txn_producer(&b, "pg", Outcome::Unknown).await;
    let mut txn = p.begin().unwrap();
    txn.send(Message::new("t", "maybe")).await.unwrap();
    let id = txn.id().unwrap().to_string();
    let info = eventually(Duration::from_secs(30), || async {
        txn_state(&b, &id)
            .await
            .filter(|t| t.state == TxnState::Discarded as i32)
    })
    .await
    .expect("never discarded");
    assert_eq!(info.check_count, 3);
    assert_eq!(
        checks.load(Ordering::SeqCst),
        3,
        "each counted check reached the producer"
    );

    // Listed for operators, not lost.
    let out = b.cli_ok(&["txn", "list", "--state", "discarded", "--json"]);
    let listed = json_lines(&out);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["check_count"], 3);

    // Re-armed: checked again, and this time the producer knows.
    drop(p);
    let (_p2, checks2) = txn_producer(&b, "pg", Outcome::Commit).await;
    b.cli_ok(&["txn", "rearm", &id]);
    let bodies = drain(&b, "g", "t", Duration::from_secs(5)).await;
    assert_eq!(bodies, vec!["maybe"]);
    assert!(checks2.load(Ordering::SeqCst) >= 1);
    let err = b.cli(&["txn", "rearm", &id]);
    assert!(
        !err.status.success(),
        "a committed transaction cannot be re-armed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_transaction_survives_kill_9_and_resolves() {
    let mut b = TestBroker::start(&[]);
    let id = {
        let (p, _) = txn_producer(&b, "pg", Outcome::Unknown).await;
        let mut txn = p.begin().unwrap();
        txn.send(Message::new("t", "survivor")).await.unwrap();
        txn.id().unwrap().to_string()
    };
    b.kill9();
    b.start_again();
    let info = txn_state(&b, &id)
        .await
        .expect("transaction lost in the crash");
    assert_eq!(info.state, TxnState::Prepared as i32);
    // Still invisible after the crash: a marker sent now is all a group finds.
    txmq_tests::producer(&b)
        .await
        .send(Message::new("t", "marker"))
        .await
        .unwrap();
    assert_eq!(
        drain(&b, "g0", "t", Duration::from_secs(1)).await,
        vec!["marker"]
    );
    let out = b.cli_ok(&["txn", "commit", &id]);
    assert!(out.contains("committed"), "{out}");
    assert_eq!(
        drain(&b, "g0", "t", Duration::from_secs(2)).await,
        vec!["survivor"]
    );
}

#[test]
fn cli_transactional_flow() {
    let b = TestBroker::start(FAST_CHECKS);
    let out = b.cli_ok(&[
        "produce",
        "--topic",
        "t",
        "--body",
        "hello",
        "--transactional",
        "--group",
        "cli",
        "--resolve",
        "rollback",
        "--json",
    ]);
    assert_eq!(json_lines(&out)[0]["resolve"], "rollback");
    let out = b.cli_ok(&[
        "produce",
        "--topic",
        "t",
        "--body",
        "later",
        "--transactional",
        "--group",
        "cli",
        "--resolve",
        "unknown",
        "--check-answer",
        "commit",
        "--linger",
        "3",
    ]);
    assert!(
        out.contains("check-back for"),
        "the CLI answered no check-back: {out}"
    );
    let out = b.cli_ok(&[
        "consume",
        "--topic",
        "t",
        "--group",
        "g",
        "--timeout",
        "2",
        "--json",
    ]);
    let got = json_lines(&out);
    assert_eq!(got.len(), 1, "{out}");
    assert_eq!(got[0]["body"], "later");
}

/// A batch of transactional calls (what a producer coalesces from concurrent transactions)
/// answers each call on its own: refusals stay with their call, the good calls are stored,
/// and resolutions within one batch see each other (I2 holds inside a batch too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_batch_answers_each_call_on_its_own() {
    use txmq_client::connection::{self, Connection};
    use txmq_client::pb::{self, TxnOutcome, frame::Body, txn_call::Call, txn_call_result};

    let b = TestBroker::start(&[]);
    let hello = connection::hello(pb::Role::Producer, "batchers", "");
    let (conn, _pushes) = Connection::open(b.addr(), hello).await.unwrap();
    let prepare = |topic: &str, body: &str, transactional: bool| pb::TxnCall {
        call: Some(Call::Prepare(pb::SendRequest {
            messages: vec![pb::Message {
                topic: topic.into(),
                body: body.as_bytes().to_vec().into(),
                ..Default::default()
            }],
            transactional,
            ..Default::default()
        })),
    };
    let end = |txn_id: &str, outcome: TxnOutcome| pb::TxnCall {
        call: Some(Call::End(pb::EndTxnRequest {
            txn_id: txn_id.into(),
            outcome: outcome as i32,
            operator: false,
        })),
    };
    let batch = async |calls: Vec<pb::TxnCall>| match conn
        .call(Body::TxnBatch(pb::TxnBatchRequest { calls }))
        .await
        .unwrap()
    {
        pb::response::Result::TxnBatch(ok) => ok.results,
        other => panic!("{other:?}"),
    };
    let codes = |results: &[pb::TxnCallResult]| -> Vec<ErrorCode> {
        results
            .iter()
            .map(|r| ErrorCode::try_from(r.code).unwrap())
            .collect()
    };

    let first = batch(vec![
        prepare("orders", "a", true),
        prepare("orders", "plain", false),
        prepare("bad name!", "b", true),
        end("00000000000000000000000000000001", TxnOutcome::Commit),
        prepare("orders", "c", true),
        pb::TxnCall { call: None },
    ])
    .await;
    assert_eq!(
        codes(&first),
        [
            ErrorCode::Ok,
            ErrorCode::InvalidRequest,
            ErrorCode::InvalidName,
            ErrorCode::TxnNotFound,
            ErrorCode::Ok,
            ErrorCode::InvalidRequest,
        ]
    );
    assert!(
        first[3]
            .message
            .contains("00000000000000000000000000000001")
    );
    let txn_of = |r: &pb::TxnCallResult| match &r.result {
        Some(txn_call_result::Result::Prepared(ok)) => ok.txn_id.clone(),
        other => panic!("{other:?}"),
    };
    let (a, c) = (txn_of(&first[0]), txn_of(&first[4]));
    assert_ne!(a, c, "two prepares without an id start two transactions");
    assert_eq!(
        txn_state(&b, &a).await.unwrap().state,
        TxnState::Prepared as i32
    );
    assert!(
        drain(&b, "early", "orders", Duration::from_millis(300))
            .await
            .is_empty()
    );

    let second = batch(vec![
        end(&a, TxnOutcome::Commit),
        end(&c, TxnOutcome::Rollback),
        end(&a, TxnOutcome::Rollback),
        end(&a, TxnOutcome::Commit),
    ])
    .await;
    assert_eq!(
        codes(&second),
        [
            ErrorCode::Ok,
            ErrorCode::Ok,
            ErrorCode::TxnAlreadyCommitted,
            ErrorCode::Ok,
        ]
    );
    let ended = |r: &pb::TxnCallResult| match &r.result {
        Some(txn_call_result::Result::Ended(ok)) => ok.clone(),
        other => panic!("{other:?}"),
    };
    let (committed, repeated) = (ended(&second[0]), ended(&second[3]));
    assert_eq!(committed.state, TxnState::Committed as i32);
    assert_eq!(committed.receipts.len(), 1);
    assert!(!committed.repeated);
    assert!(repeated.repeated);
    assert_eq!(ended(&second[1]).state, TxnState::RolledBack as i32);
    assert_eq!(
        drain(&b, "late", "orders", Duration::from_secs(2)).await,
        ["a"]
    );

    // I7: more calls than a batch may carry is refused as a whole, nothing stored.
    let too_many = (0..10_001).map(|_| end(&a, TxnOutcome::Rollback)).collect();
    let refused = conn
        .call(Body::TxnBatch(pb::TxnBatchRequest { calls: too_many }))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, txmq_client::Error::Broker { code: ErrorCode::InvalidRequest, message } if message.contains("10001 calls")),
        "{refused}"
    );
    assert_eq!(
        txn_state(&b, &a).await.unwrap().state,
        TxnState::Committed as i32
    );

    let empty = conn
        .call(Body::TxnBatch(pb::TxnBatchRequest { calls: Vec::new() }))
        .await
        .unwrap_err();
    assert!(
        matches!(
            empty,
            txmq_client::Error::Broker {
                code: ErrorCode::InvalidRequest,
                ..
            }
        ),
        "{empty}"
    );
}
