//! Hostile and careless input (issue 13, items 6, 8 and 11): invented group names in acks,
//! durations that would overflow the clock, and a consumer whose tag filter would make its
//! whole group skip messages. Each is refused with a clear error and changes nothing.

use std::time::Duration;

use txmq_client::{Admin, Consumer, ConsumerOptions, ErrorCode, Message};
use txmq_protocol::{Body, Frame, pb};
use txmq_tests::{TestBroker, drain, next, producer, raw_call, raw_hello};

fn handle(group: &str, topic: &str) -> pb::DeliveryHandle {
    pb::DeliveryHandle {
        group: group.into(),
        topic: topic.into(),
        offset: 0,
        lease_id: 1,
    }
}

/// Item 6. One ack naming thousands of invented groups starts no queue and stores no
/// group: it is refused as a whole; so are a nack and an extend naming a group that never
/// subscribed, and invalid names. (Each such group used to start a queue task that lived
/// forever: 500k of them took the broker from 35 MB to 594 MB.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_for_groups_that_never_subscribed_are_refused() {
    let b = TestBroker::start(&[]);
    let p = producer(&b).await;
    p.send(Message::new("t", "m")).await.unwrap();
    let mut raw = raw_hello(b.addr(), "").await;

    let one = |g: &str| {
        Body::Ack(pb::AckRequest {
            handles: vec![handle(g, "t")],
        })
    };
    let r = raw_call(&mut raw, 2, one("invented")).await;
    assert_eq!(r.code, ErrorCode::GroupNotFound as i32, "{r:?}");
    assert!(r.message.contains("invented"), "{r:?}");
    let many = Body::Ack(pb::AckRequest {
        handles: (0..20_000).map(|i| handle(&format!("g{i}"), "t")).collect(),
    });
    let r = raw_call(&mut raw, 3, many).await;
    assert_ne!(r.code, ErrorCode::Ok as i32, "{r:?}");
    let r = raw_call(&mut raw, 4, one("bad name")).await;
    assert_eq!(r.code, ErrorCode::InvalidName as i32, "{r:?}");
    let nack = Body::Nack(pb::NackRequest {
        handle: Some(handle("invented", "t")),
        ..Default::default()
    });
    assert_eq!(
        raw_call(&mut raw, 5, nack).await.code,
        ErrorCode::GroupNotFound as i32
    );
    let extend = Body::Extend(pb::ExtendRequest {
        handle: Some(handle("invented", "t")),
        lease_ms: 1000,
    });
    assert_eq!(
        raw_call(&mut raw, 6, extend).await.code,
        ErrorCode::GroupNotFound as i32
    );
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    assert!(
        admin.groups().await.unwrap().is_empty(),
        "a group was made from an ack"
    );
    // A real group's ack still works, and after a restart of its queue too.
    let bodies = drain(&b, "real", "t", Duration::from_secs(1)).await;
    assert_eq!(bodies, vec![b"m".to_vec()]);
}

/// Item 8. Durations from the network are range-checked before they reach a clock: a
/// `u64::MAX` lease once wrapped around and sent one message 16 times into the DLQ in
/// 300 ms, and the later ack still said OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_out_of_range_are_refused_and_name_the_field() {
    let b = TestBroker::start(&[]);
    let p = producer(&b).await;
    p.send(Message::new("t", "m")).await.unwrap();
    let mut raw = raw_hello(b.addr(), "").await;
    let subscribe = |lease_ms| {
        Body::Subscribe(pb::SubscribeRequest {
            group: "g".into(),
            topic: "t".into(),
            lease_ms,
            ..Default::default()
        })
    };
    let r = raw_call(&mut raw, 2, subscribe(u64::MAX)).await;
    assert_eq!(r.code, ErrorCode::InvalidRequest as i32, "{r:?}");
    assert!(r.message.contains("lease_ms"), "{r:?}");
    // A transaction's first-check delay, from a producer of a group.
    let group_conn = txmq_client::Producer::connect(
        b.addr(),
        txmq_client::ProducerOptions {
            group: "pg".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut txn = group_conn.begin().unwrap();
    txn.check_after(Duration::from_millis(u64::MAX));
    let e = txn.send(Message::new("t", "x")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
    assert!(e.to_string().contains("check_delay_ms"), "{e}");

    // A real delivery, then nack and extend with absurd durations. The delivery may come
    // before or after the subscription's answer: read both.
    {
        use futures::SinkExt;
        raw.send(Frame {
            id: 3,
            body: Some(subscribe(60_000)),
        })
        .await
        .unwrap();
    }
    let (mut subscribed, mut delivery) = (false, None);
    while !subscribed || delivery.is_none() {
        use futures::StreamExt;
        let frame = tokio::time::timeout(Duration::from_secs(30), raw.next())
            .await
            .expect("no delivery")
            .unwrap()
            .unwrap();
        match frame.body {
            Some(Body::Delivery(d)) => delivery = Some(d),
            Some(Body::Response(r)) if frame.id == 3 => {
                assert_eq!(r.code, ErrorCode::Ok as i32, "{r:?}");
                subscribed = true;
            }
            _ => {}
        }
    }
    let delivery = delivery.unwrap();
    let h = delivery.handle.clone();
    let r = raw_call(
        &mut raw,
        4,
        Body::Extend(pb::ExtendRequest {
            handle: h.clone(),
            lease_ms: u64::MAX,
        }),
    )
    .await;
    assert_eq!(r.code, ErrorCode::InvalidRequest as i32, "{r:?}");
    let r = raw_call(
        &mut raw,
        5,
        Body::Nack(pb::NackRequest {
            handle: h.clone(),
            delay_ms: u64::MAX,
            use_backoff: false,
        }),
    )
    .await;
    assert_eq!(r.code, ErrorCode::InvalidRequest as i32, "{r:?}");
    assert!(r.message.contains("delay_ms"), "{r:?}");
    // Nothing changed: the lease is still the consumer's, and its ack works.
    let r = raw_call(
        &mut raw,
        6,
        Body::Ack(pb::AckRequest {
            handles: vec![h.unwrap()],
        }),
    )
    .await;
    assert_eq!(r.code, ErrorCode::Ok as i32, "{r:?}");
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let g = admin.describe_group("g").await.unwrap();
    assert_eq!(g.topics[0].dead_letters, 0);
    assert_eq!(g.topics[0].ack_floor, 1);
}

/// Item 11. A group has one tag filter per topic. A consumer started with another filter
/// is refused with a clear error instead of making the whole group skip every message it
/// does not want (the last subscriber's filter used to win, durably); the change is an
/// explicit option.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_tag_filter_is_refused_not_a_silent_skip() {
    let b = TestBroker::start(&[]);
    let p = producer(&b).await;
    let with_tag = |tag: &str| ConsumerOptions {
        tag_filter: tag.into(),
        ..ConsumerOptions::new("g", "t")
    };
    let mut a = Consumer::subscribe(b.addr(), with_tag("A")).await.unwrap();
    let e = Consumer::subscribe(b.addr(), with_tag("B"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::FilterConflict), "{e}");
    assert!(
        e.to_string().contains("\"A\"") && e.to_string().contains("\"B\""),
        "{e}"
    );
    let e = Consumer::subscribe(b.addr(), with_tag(""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::FilterConflict), "{e}");
    // The same filter, written differently, is the same filter.
    drop(
        Consumer::subscribe(b.addr(), with_tag(" A "))
            .await
            .unwrap(),
    );
    for tag in ["A", "B", "A"] {
        p.send(Message::new("t", tag).tag(tag)).await.unwrap();
    }
    let mut got = Vec::new();
    while let Some(d) = next(&mut a, Duration::from_secs(1)).await {
        got.push(d.tag().to_string());
        d.ack().await.unwrap();
    }
    assert_eq!(got, vec!["A", "A"]);
    // The CLI says it in one line, and the explicit change works.
    let out = b.cli(&[
        "consume",
        "--topic",
        "t",
        "--group",
        "g",
        "--tag",
        "B",
        "--count",
        "1",
        "--timeout",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("replace-filter"));
    drop(a);
    let out = b.cli_ok(&[
        "consume",
        "--topic",
        "t",
        "--group",
        "g",
        "--tag",
        "B",
        "--replace-filter",
        "--count",
        "1",
        "--timeout",
        "3",
        "--json",
    ]);
    assert_eq!(
        txmq_tests::json_lines(&out).len(),
        0,
        "B was filtered out before the change"
    );
    p.send(Message::new("t", "B2").tag("B")).await.unwrap();
    let out = b.cli_ok(&[
        "consume",
        "--topic",
        "t",
        "--group",
        "g",
        "--tag",
        "B",
        "--count",
        "1",
        "--timeout",
        "5",
        "--json",
    ]);
    assert_eq!(txmq_tests::json_lines(&out)[0]["body"], "B2");
}

/// Item 10. Every listing is paged with a bounded page size, whatever limit is asked
/// for; the client's admin calls walk the pages. (ListTopics used to return everything in
/// one frame, and past ~250k topics the answer exceeded the frame limit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_are_paged() {
    let b = TestBroker::start(&["--max-attempts", "1"]);
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let creates = (0..2500).map(|i| {
        let admin = &admin;
        async move { admin.create_topic(&format!("t{i:04}"), true).await }
    });
    for r in futures::future::join_all(creates).await {
        r.unwrap();
    }
    let mut raw = raw_hello(b.addr(), "").await;
    for (id, limit) in [(2, 0), (3, 1_000_000)] {
        let r = raw_call(
            &mut raw,
            id,
            Body::ListTopics(pb::ListTopicsRequest {
                after: String::new(),
                limit,
            }),
        )
        .await;
        let Some(pb::response::Result::Topics(page)) = r.result else {
            panic!("{r:?}")
        };
        assert_eq!(page.topics.len(), 1000, "limit {limit}");
    }
    let names: Vec<String> = admin
        .topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    let expect: Vec<String> = (0..2500).map(|i| format!("t{i:04}")).collect();
    assert_eq!(names, expect);

    // Dead letters: 1,100 of them, listed a page at a time.
    let p = producer(&b).await;
    let sends = (0..1100).map(|i| p.send(Message::new("dead", format!("d{i}"))));
    for r in futures::future::join_all(sends).await {
        r.unwrap();
    }
    b.cli_ok(&[
        "consume", "--topic", "dead", "--group", "g", "--nack", "0", "--count", "1100",
    ]);
    let r = raw_call(
        &mut raw,
        4,
        Body::ListDeadLetters(pb::ListDeadLettersRequest {
            group: "g".into(),
            limit: u32::MAX,
            ..Default::default()
        }),
    )
    .await;
    let Some(pb::response::Result::DeadLetters(page)) = r.result else {
        panic!("{r:?}")
    };
    assert_eq!(page.dead_letters.len(), 1000);
    let all = admin.dead_letters("g", 0).await.unwrap();
    let offsets: Vec<u64> = all.iter().map(|d| d.offset).collect();
    assert_eq!(offsets, (0..1100).collect::<Vec<u64>>());

    // Transactions.
    let txp = txmq_client::Producer::connect(
        b.addr(),
        txmq_client::ProducerOptions {
            group: "pg".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let prepares = (0..1100).map(|i| {
        let txp = txp.clone();
        async move {
            let mut t = txp.begin().unwrap();
            t.send(Message::new("tx", format!("x{i}"))).await
        }
    });
    for r in futures::future::join_all(prepares).await {
        r.unwrap();
    }
    let r = raw_call(
        &mut raw,
        5,
        Body::ListTxns(pb::ListTxnsRequest {
            limit: u32::MAX,
            ..Default::default()
        }),
    )
    .await;
    let Some(pb::response::Result::Txns(page)) = r.result else {
        panic!("{r:?}")
    };
    assert_eq!(page.txns.len(), 1000);
}

/// Item 10, in bytes: dead letters carry their bodies, so a page of them stops at half
/// the frame limit (and says there is more) instead of making a frame the connection
/// cannot carry; the client walks the shorter pages to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_pages_fit_in_a_frame() {
    let b = TestBroker::start(&[
        "--max-attempts",
        "1",
        "--max-frame-len",
        "1048576",
        "--max-message-bytes",
        "524288",
    ]);
    let p = producer(&b).await;
    let body = |i: usize| vec![b'a' + i as u8; 400_000];
    for i in 0..12 {
        p.send(Message::new("heavy", body(i))).await.unwrap();
    }
    b.cli_ok(&[
        "consume", "--topic", "heavy", "--group", "g", "--nack", "0", "--count", "12",
    ]);
    let mut raw = raw_hello(b.addr(), "").await;
    let r = raw_call(
        &mut raw,
        2,
        Body::ListDeadLetters(pb::ListDeadLettersRequest {
            group: "g".into(),
            ..Default::default()
        }),
    )
    .await;
    let Some(pb::response::Result::DeadLetters(page)) = r.result else {
        panic!("{r:?}")
    };
    assert!(page.more, "a short page must say there is more");
    assert!(
        (1..12).contains(&page.dead_letters.len()),
        "{} in one page",
        page.dead_letters.len()
    );
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let all = admin.dead_letters("g", 0).await.unwrap();
    let bodies: Vec<Vec<u8>> = all
        .iter()
        .map(|d| d.message.as_ref().unwrap().body.to_vec())
        .collect();
    assert_eq!(bodies, (0..12).map(body).collect::<Vec<_>>());
}

/// I7 (issue 25, item 5): a producer's `Hello` declares its check scopes; too many, one
/// too long or an empty one is refused with a clear error (each is kept for the
/// connection's life), and a reasonable declaration is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_with_unreasonable_check_scopes_is_refused() {
    let b = TestBroker::start(&[]);
    let answer = async |check_scopes: Vec<String>| {
        let s = tokio::net::TcpStream::connect(b.addr()).await.unwrap();
        let mut framed = tokio_util::codec::Framed::new(s, txmq_protocol::FrameCodec::default());
        let hello = pb::Hello {
            protocol_version: txmq_protocol::PROTOCOL_VERSION,
            role: pb::Role::Producer as i32,
            producer_group: "g".into(),
            answers_checks: true,
            check_scopes,
            ..Default::default()
        };
        let r = raw_call(&mut framed, 1, Body::Hello(hello)).await;
        (r.code, r.message)
    };
    for bad in [
        vec!["x".to_string(); 17],
        vec!["y".repeat(257)],
        vec![String::new()],
    ] {
        let (code, message) = answer(bad).await;
        assert_eq!(code, ErrorCode::InvalidRequest as i32, "{message}");
        assert!(message.contains("check_scopes"), "{message}");
    }
    let (code, message) = answer(vec!["db-a".into(), "db-b".into()]).await;
    assert_eq!(code, 0, "{message}");
}

/// Issue 26, item 6: a producer that knows its own transaction id cannot name its
/// neighbour's. Two producers of one group prepare one after the other; the first tries
/// to roll back the second's transaction by guessing its id from its own, in the layout
/// ids had (the counter above 20 random bits: 2^20 guesses cover every neighbour) and a
/// few thousand guesses of the present one (its 64 random bits are not to be searched).
/// With 20 random bits this search found the neighbour's transaction and rolled it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbours_transaction_id_cannot_be_guessed() {
    use futures::StreamExt;
    use txmq_client::{Outcome, Producer, ProducerOptions};
    let b = TestBroker::start(&[]);
    let options = || ProducerOptions::transactional("g", |_| async { Outcome::Unknown });
    let attacker = Producer::connect(b.addr(), options()).await.unwrap();
    let victim = Producer::connect(b.addr(), options()).await.unwrap();
    let mut own = attacker.begin().unwrap();
    own.send_batch(vec![Message::new("t", "mine")])
        .await
        .unwrap();
    let mut theirs = victim.begin().unwrap();
    theirs
        .send_batch(vec![Message::new("t", "theirs")])
        .await
        .unwrap();
    let own_id = own.id().unwrap().to_string();
    let their_id = theirs.id().unwrap().to_string();
    let (hi, lo) = own_id.split_at(16);
    let (hi, lo) = (
        u64::from_str_radix(hi, 16).unwrap(),
        u64::from_str_radix(lo, 16).unwrap(),
    );
    // The old layout's neighbours: the same boot, the next counter, any 20 low bits. The
    // present layout's: the next counter in the first half, a guess at the second.
    let old = (0..1u64 << 20).map(move |noise| (hi, (((lo >> 20) + 1) << 20) | noise));
    let new = (0..4096u64).map(move |guess| (hi + 1, guess));
    let guesses = old.chain(new).map(|(a, b)| format!("{a:016X}{b:016X}"));
    let attacker = &attacker;
    let found = futures::stream::iter(guesses)
        .map(|id| async move {
            let ended = attacker
                .end_transaction(&id, Outcome::Rollback, false)
                .await;
            ended.is_ok().then_some(id)
        })
        .buffer_unordered(512)
        .filter_map(|hit| async move { hit });
    let mut found = std::pin::pin!(found);
    let hit = found.next().await;
    assert_eq!(
        hit, None,
        "the neighbour's transaction {their_id} was found from {own_id} and rolled back"
    );
    theirs.commit().await.expect("the neighbour's own commit");
    own.rollback().await.unwrap();
}

/// Issue 26, item 6: a native lease answers only the connection it was given to.
/// Another connection (of the same group and user) that names it, exactly as it was
/// delivered, cannot ack, nack or extend it; the connection that holds it
/// acks it, and it is not delivered again. (Any connection of the group could once ack
/// or hide another member's message with a handle it read or guessed: lease ids run in
/// sequence.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_answers_only_the_connection_it_was_given_to() {
    let b = TestBroker::start(&[]);
    let p = producer(&b).await;
    p.send(Message::new("t", "mine")).await.unwrap();
    let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new("g", "t"))
        .await
        .unwrap();
    let d = next(&mut c, Duration::from_secs(10))
        .await
        .expect("the delivery");
    let mut other = raw_hello(b.addr(), "").await;
    let h = d.handle().clone();
    let calls = [
        Body::Ack(pb::AckRequest {
            handles: vec![h.clone()],
        }),
        Body::Nack(pb::NackRequest {
            handle: Some(h.clone()),
            ..Default::default()
        }),
        Body::Extend(pb::ExtendRequest {
            handle: Some(h.clone()),
            lease_ms: 43_200_000,
        }),
    ];
    for (i, call) in calls.into_iter().enumerate() {
        let r = raw_call(&mut other, 2 + i as u64, call).await;
        assert_eq!(
            r.code,
            ErrorCode::LeaseNotFound as i32,
            "call {i} on another connection's lease: {r:?}"
        );
    }
    d.ack().await.expect("its own connection acks it");
    drop(c);
    let again = drain(&b, "g", "t", Duration::from_millis(500)).await;
    assert!(again.is_empty(), "delivered again: {again:?}");
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let dead = admin.dead_letters("g", 10).await.unwrap();
    assert!(dead.is_empty(), "dead-lettered by another connection");
}
