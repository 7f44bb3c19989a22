//! Check-back and transaction ownership under attack and after failures (issue 13, items
//! 1–5 and 19): answers that do not come from the connection asked cancel nothing; only a
//! transaction's own group (or an operator) ends it; refused sends leave nothing behind;
//! producers with a checker come back on their own; large transactions are capped and
//! still checked.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::SinkExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::codec::Framed;
use txmq_client::pb::TxnState;
use txmq_client::{Admin, ErrorCode, Message, Outcome, Producer, ProducerOptions};
use txmq_protocol::{Body, Frame, FrameCodec, pb};
use txmq_tests::{TestBroker, drain, eventually, raw_call, raw_producer};

/// Fast check-backs so tests run in seconds.
const FAST_CHECKS: &[&str] = &[
    "--check-timeout",
    "300ms",
    "--check-interval",
    "100ms",
    "--check-backoff",
    "300ms",
];

async fn txn_info(b: &TestBroker, id: &str) -> Option<pb::TxnInfo> {
    let admin = Admin::connect(b.addr(), "").await.ok()?;
    let list = admin
        .transactions(TxnState::Unspecified, "", 0)
        .await
        .ok()?;
    list.txns.into_iter().find(|t| t.txn_id == id)
}

async fn wait_for_state(b: &TestBroker, id: &str, state: TxnState) -> pb::TxnInfo {
    let reached = eventually(Duration::from_secs(30), || async {
        txn_info(b, id).await.filter(|t| t.state == state as i32)
    })
    .await;
    match reached {
        Some(info) => info,
        None => panic!("{id} never reached {state:?}: {:?}", txn_info(b, id).await),
    }
}

/// A half message left for check-back (resolved `unknown`); its transaction id.
async fn leave_open(p: &Producer, topic: &str, body: &str) -> String {
    let (_, txn) = p
        .send_in_transaction(vec![Message::new(topic, body.to_string())], |_| async {
            Outcome::Unknown
        })
        .await
        .expect("prepare");
    txn.id().unwrap().to_string()
}

/// Frames on one connection are handled in order: once the answer to a request sent after
/// a burst arrives, the broker has dispatched the whole burst.
async fn round_trip(framed: &mut Framed<TcpStream, FrameCodec>, id: u64) -> pb::Response {
    raw_call(framed, id, Body::Stats(pb::StatsRequest {})).await
}

/// Check answers for every small id (the old check ids counted up from 1), all saying
/// "rollback" for a transaction that is not the one asked about.
async fn spray(framed: &mut Framed<TcpStream, FrameCodec>) {
    let frames: Vec<_> = (1..=3000u64)
        .map(|check_id| {
            Ok(Frame {
                id: check_id,
                body: Some(Body::CheckReply(pb::CheckReply {
                    txn_id: "00000000000000010000000000000001".into(),
                    outcome: pb::TxnOutcome::Rollback as i32,
                })),
            })
        })
        .collect();
    framed
        .send_all(&mut futures::stream::iter(frames))
        .await
        .unwrap();
}

/// Item 1. A check is pending at a producer whose checker waits at a gate. Meanwhile a
/// socket that never said Hello, and an authenticated one of another connection, spray
/// check answers with every small id (the old ids counted up from 1) saying "rollback".
/// Before the fix the spray removed the pending check (the id matched, the transaction
/// did not), the attempt counted, and with check-max 1 the transaction was discarded; now
/// the spray is refused and the real answer commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sprayed_check_answers_cancel_nothing() {
    let mut args = FAST_CHECKS.to_vec();
    args.extend(["--check-max", "1", "--check-reply-timeout", "20s"]);
    let b = TestBroker::start(&args);
    let asked = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (seen, open) = (asked.clone(), gate.clone());
    let options = ProducerOptions::transactional("orders", move |_req| {
        let (seen, open) = (seen.clone(), open.clone());
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            open.acquire().await.expect("gate").forget();
            Outcome::Commit
        }
    });
    let p = Producer::connect(b.addr(), options).await.unwrap();
    let id = leave_open(&p, "orders", "order-1").await;
    eventually(Duration::from_secs(20), || async {
        (asked.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await
    .expect("the check never reached the producer");

    // Never said Hello: every frame meets the handshake gate.
    let mut anonymous = Framed::new(
        TcpStream::connect(b.addr()).await.unwrap(),
        FrameCodec::default(),
    );
    spray(&mut anonymous).await;
    let r = round_trip(&mut anonymous, 1_000_000).await;
    assert_eq!(r.code, ErrorCode::HandshakeRequired as i32, "{r:?}");
    // Said Hello, but is not the connection the check went to.
    let mut other = raw_producer(b.addr(), "orders", false, 1_000_001).await;
    spray(&mut other).await;
    assert_eq!(round_trip(&mut other, 1_000_002).await.code, 0);

    gate.add_permits(1000);
    let info = wait_for_state(&b, &id, TxnState::Committed).await;
    assert_eq!(info.check_count, 1, "{info:?}");
    assert_eq!(
        drain(&b, "points", "orders", Duration::from_secs(2)).await,
        vec![b"order-1".to_vec()]
    );
}

/// Item 2. Only the group that prepared a transaction ends it; an operator does so through
/// the admin path, which the history says; ids give nothing away about each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owning_group_or_an_operator_ends_a_transaction() {
    let b = TestBroker::start(&[]);
    let group = |g: &str| ProducerOptions {
        group: g.into(),
        ..Default::default()
    };
    let owner = Producer::connect(b.addr(), group("orders")).await.unwrap();
    let intruder = Producer::connect(b.addr(), group("evil")).await.unwrap();
    let plain = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap();
    let id = leave_open(&owner, "orders", "order-1").await;

    for (who, p) in [("another group", &intruder), ("no group", &plain)] {
        let e = p
            .end_transaction(&id, Outcome::Rollback, false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::WrongProducerGroup), "{who}: {e}");
        assert!(e.to_string().contains("\"orders\""), "{who}: {e}");
    }
    let e = intruder
        .end_transaction(&id, Outcome::Rollback, true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
    assert_eq!(
        txn_info(&b, &id).await.unwrap().state,
        TxnState::Prepared as i32
    );
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    admin.resolve(&id, true).await.expect("operator commit");
    let info = txn_info(&b, &id).await.unwrap();
    assert_eq!(info.state, TxnState::Committed as i32);
    assert!(info.last_check_note.contains("operator"), "{info:?}");
    // The owner's repeat is the no-op success it always was.
    let ok = owner
        .end_transaction(&id, Outcome::Commit, false)
        .await
        .unwrap();
    assert!(ok.repeated);

    // Ids: 200 transactions in a row; none is its predecessor plus one, and the low bits
    // vary (they used to count up by one).
    let mut seqs = Vec::new();
    for i in 0..200 {
        let id = leave_open(&owner, "orders", &format!("o{i}")).await;
        seqs.push(u64::from_str_radix(&id[16..], 16).unwrap());
    }
    assert!(
        seqs.windows(2).all(|w| w[1] != w[0] + 1),
        "transaction ids count up by one: {seqs:?}"
    );
    let low: std::collections::HashSet<u64> = seqs.iter().map(|s| s & 0xFFFFF).collect();
    assert!(low.len() > 190, "{seqs:?}");
}

/// Item 3. With topic auto-creation off, thousands of transactional sends to a missing
/// topic are refused and leave nothing behind: the writer stays up (a debug build used to
/// panic it), and check-backs of real transactions still run (4,096 stray due entries
/// used to starve every pass).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_transactional_sends_leave_nothing_behind() {
    let mut args = FAST_CHECKS.to_vec();
    args.extend(["--auto-create-topics", "false"]);
    let mut b = TestBroker::start_on_fixed_port(&args);
    Admin::connect(b.addr(), "")
        .await
        .unwrap()
        .create_topic("real", true)
        .await
        .unwrap();
    let options = ProducerOptions::transactional("orders", |_req| async { Outcome::Commit });
    let p = Producer::connect(b.addr(), options).await.unwrap();
    for chunk in 0..9 {
        let refusals = (0..500).map(|i| {
            let p = p.clone();
            async move {
                let mut txn = p.begin().unwrap();
                txn.send(Message::new("missing", format!("{chunk}-{i}")))
                    .await
            }
        });
        for r in futures::future::join_all(refusals).await {
            let e = r.expect_err("a send to a missing topic was stored");
            assert_eq!(e.code(), Some(ErrorCode::TopicNotFound), "{e}");
        }
    }
    // Across a restart too (stray entries were durable).
    b.restart();
    let id = leave_open(&p, "real", "kept").await;
    wait_for_state(&b, &id, TxnState::Committed).await;
    assert_eq!(
        drain(&b, "g", "real", Duration::from_secs(2)).await,
        vec![b"kept".to_vec()]
    );
}

/// Item 4. A process that only answers check-backs (it never sends again) is back in its
/// group's rotation after the broker restarts; a producer without a checker is never sent
/// checks, so none of them count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkers_come_back_on_their_own_and_others_are_never_asked() {
    let mut b = TestBroker::start_on_fixed_port(FAST_CHECKS);
    // A producer of the group without a checker, connected throughout.
    let silent = Producer::connect(
        b.addr(),
        ProducerOptions {
            group: "orders".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let asked = Arc::new(AtomicU32::new(0));
    let seen = asked.clone();
    let options = ProducerOptions::transactional("orders", move |_req| {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, Ordering::SeqCst);
            Outcome::Commit
        }
    });
    let checker = Producer::connect(b.addr(), options).await.unwrap();
    // Both connected: the one without a checker registered first, so a round-robin that
    // counted it would ask it first, wait out the reply timeout, and count that attempt.
    let first = leave_open(&silent, "orders", "order-6").await;
    let info = wait_for_state(&b, &first, TxnState::Committed).await;
    assert_eq!(
        info.check_count, 1,
        "a check went to a producer that cannot answer: {info:?}"
    );

    let id = leave_open(&silent, "orders", "order-7").await;
    b.restart();
    // Neither producer sends anything from here on.
    let info = wait_for_state(&b, &id, TxnState::Committed).await;
    assert_eq!(info.check_count, 1, "{info:?}");
    assert!(asked.load(Ordering::SeqCst) >= 2);
    drop((silent, checker));
}

/// Item 5. A transaction's size is capped with a clear error at prepare, and the
/// check-back of one too large for a frame still reaches its checker (without bodies)
/// instead of closing the producer's connection at every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transaction_is_capped_and_still_checked() {
    let mut args = FAST_CHECKS.to_vec();
    args.extend(["--max-txn-bytes", "10000000", "--check-max", "2"]);
    let b = TestBroker::start(&args);
    let omitted = Arc::new(AtomicU32::new(0));
    let seen = omitted.clone();
    let options = ProducerOptions::transactional("big", move |req: txmq_client::CheckRequest| {
        let seen = seen.clone();
        async move {
            if req.bodies_omitted
                && req.messages.len() == 2
                && req
                    .messages
                    .iter()
                    .all(|m| m.body.is_empty() && m.key == "k")
            {
                seen.fetch_add(1, Ordering::SeqCst);
            }
            Outcome::Commit
        }
    });
    let p = Producer::connect(b.addr(), options).await.unwrap();
    let body = |fill: u8| vec![fill; 4 * 1024 * 1024];
    let mut txn = p.begin().unwrap();
    txn.send(Message::new("big", body(1)).key("k"))
        .await
        .unwrap();
    txn.send(Message::new("big", body(2)).key("k"))
        .await
        .unwrap();
    let e = txn
        .send(Message::new("big", body(3)).key("k"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::MessageTooLarge), "{e}");
    assert!(e.to_string().contains("max-txn-bytes"), "{e}");
    let id = txn.id().unwrap().to_string();
    p.end_transaction(&id, Outcome::Unknown, false)
        .await
        .unwrap();
    wait_for_state(&b, &id, TxnState::Committed).await;
    assert_eq!(omitted.load(Ordering::SeqCst), 1);
    let bodies = drain(&b, "g", "big", Duration::from_secs(3)).await;
    assert_eq!(bodies, vec![body(1), body(2)]);
}

/// Item 5, the rest of it. Without bodies a check request still carries every message's
/// key, tag and properties (up to 64 KiB each): a transaction of many such messages makes
/// a check frame over the limit even so. The request keeps the first messages that fit,
/// says how many it left out, and still reaches the checker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_request_fits_in_a_frame_whatever_the_metadata() {
    let mut args = FAST_CHECKS.to_vec();
    // 1 MiB frames: 24 messages of 60 KB of properties are 1.4 MB without bodies.
    args.extend([
        "--max-frame-len",
        "1048576",
        "--max-message-bytes",
        "524288",
        "--check-max",
        "2",
    ]);
    let b = TestBroker::start(&args);
    let seen = Arc::new(std::sync::Mutex::new(None));
    let saw = seen.clone();
    let options = ProducerOptions::transactional("meta", move |req: txmq_client::CheckRequest| {
        let saw = saw.clone();
        async move {
            *saw.lock().unwrap() = Some((req.messages.len(), req.messages_omitted));
            Outcome::Commit
        }
    });
    let p = Producer::connect(b.addr(), options).await.unwrap();
    let mut txn = p.begin().unwrap();
    for i in 0..24 {
        let m = Message::new("meta", format!("body-{i}"))
            .key(format!("k{i}"))
            .property("blob", "x".repeat(60_000));
        txn.send(m).await.unwrap();
    }
    let id = txn.id().unwrap().to_string();
    p.end_transaction(&id, Outcome::Unknown, false)
        .await
        .unwrap();
    let info = wait_for_state(&b, &id, TxnState::Committed).await;
    assert_eq!(info.check_count, 1, "{info:?}");
    let (kept, omitted) = seen.lock().unwrap().expect("the checker was never asked");
    assert!(kept >= 1 && omitted > 0, "kept {kept}, omitted {omitted}");
    assert_eq!(kept + omitted as usize, 24);
    let bodies = drain(&b, "g", "meta", Duration::from_secs(3)).await;
    assert_eq!(bodies.len(), 24);
}

/// Item 19. A dropped `Producer` answers no more check-backs, also one whose checker was
/// still running when it was dropped: that answer is thrown away, not sent on a
/// connection kept open for it. The proof is positive: a producer of the same group that
/// connects afterwards decides the transaction (rollback), which the late commit would
/// have pre-empted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_producer_answers_no_more_checks() {
    let b = TestBroker::start(FAST_CHECKS);
    let started = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(Semaphore::new(0));
    let returned = Arc::new(AtomicU32::new(0));
    let options = {
        let (started, release, returned) = (started.clone(), release.clone(), returned.clone());
        ProducerOptions::transactional("late", move |_req| {
            let (started, release, returned) = (started.clone(), release.clone(), returned.clone());
            async move {
                started.notify_one();
                let _ = release.acquire().await;
                returned.fetch_add(1, Ordering::SeqCst);
                Outcome::Commit
            }
        })
    };
    let first = Producer::connect(b.addr(), options).await.unwrap();
    let id = leave_open(&first, "late", "order-1").await;
    started.notified().await;
    drop(first);
    // The checker now returns "commit" with nobody left to carry it.
    release.add_permits(1);
    eventually(Duration::from_secs(10), || async {
        (returned.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await
    .expect("the checker never returned");
    // Past the point where its answer would have been sent.
    tokio::task::yield_now().await;
    let second = Producer::connect(
        b.addr(),
        ProducerOptions::transactional("late", |_req| async { Outcome::Rollback }),
    )
    .await
    .unwrap();
    let info = wait_for_state(&b, &id, TxnState::RolledBack).await;
    assert!(info.check_count >= 2, "{info:?}");
    drop(second);
}

/// Issue 15, item 3. A discarded transaction is kept for operators for
/// discarded-retention, then purged with its half messages; one re-armed before then is
/// prepared again and never purged while it can be checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarded_transactions_are_purged_after_their_retention() {
    let mut args = FAST_CHECKS.to_vec();
    args.extend(["--check-max", "1", "--discarded-retention", "1500ms"]);
    let b = TestBroker::start(&args);
    let options = ProducerOptions::transactional("aging", |_req| async { Outcome::Unknown });
    let p = Producer::connect(b.addr(), options).await.unwrap();
    let first = leave_open(&p, "aging", "first").await;
    let second = leave_open(&p, "aging", "second").await;
    wait_for_state(&b, &first, TxnState::Discarded).await;
    wait_for_state(&b, &second, TxnState::Discarded).await;
    // No producer from here on: a re-armed transaction is checked without the attempts
    // counting, so it stays prepared, and must never be purged.
    drop(p);
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    admin.rearm(&second).await.unwrap();

    let purged = eventually(Duration::from_secs(30), || async {
        txn_info(&b, &first).await.is_none().then_some(())
    })
    .await;
    assert!(
        purged.is_some(),
        "the discarded transaction was never purged"
    );
    let e = admin.rearm(&first).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TxnNotFound), "{e}");
    let kept = txn_info(&b, &second)
        .await
        .expect("the re-armed one was purged");
    assert_eq!(kept.state, TxnState::Prepared as i32, "{kept:?}");
    let stats = admin.stats().await.unwrap();
    assert_eq!(
        stats.half_messages_pending, 1,
        "the purged halves are still counted"
    );
}
