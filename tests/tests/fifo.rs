//! Ordered consumer groups and message groups (issue 14, items 8–9; I8 "nothing out of
//! order"): in an ordered group the messages of one message group arrive in log order,
//! the next only after the previous was acked or dead-lettered — across nack, lease
//! expiry, a consumer that leaves and a broker kill -9 — while different message groups
//! go in parallel and an unordered group receives everything without waiting.
//!
//! "Nothing else was delivered" is shown with a marker: a message without a message group
//! sent last. The queue delivers what it reads in log order, so once the marker arrives,
//! anything deliverable before it has arrived too.

use std::collections::HashMap;
use std::time::Duration;

use txmq_client::{
    Consumer, ConsumerOptions, Delivery, ErrorCode, Message, Outcome, Producer, ProducerOptions,
};
use txmq_tests::{TestBroker, next, producer};

const WAIT: Duration = Duration::from_secs(20);

fn ordered(group: &str, topic: &str) -> ConsumerOptions {
    ConsumerOptions::new(group, topic).ordered(true)
}

async fn recv(c: &mut Consumer) -> Delivery {
    next(c, WAIT).await.expect("nothing delivered")
}

fn body(d: &Delivery) -> String {
    String::from_utf8_lossy(d.body()).into_owned()
}

/// Receives until the marker arrives; returns the bodies before it.
async fn until_marker(c: &mut Consumer, marker: &str) -> Vec<Delivery> {
    let mut got = Vec::new();
    loop {
        let d = recv(c).await;
        if body(&d) == marker {
            d.ack().await.unwrap();
            return got;
        }
        got.push(d);
    }
}

/// Messages `g0`, `g1`… of each group, interleaved across groups.
fn interleaved(topic: &str, groups: &[&str], per_group: usize) -> Vec<Message> {
    let mut messages = Vec::new();
    for i in 0..per_group {
        for g in groups {
            messages.push(Message::new(topic, format!("{g}{i}")).group(*g));
        }
    }
    messages
}

/// Item 8. Three message groups, four messages each: at first only the three heads go
/// out; then each group's messages arrive in order, never two of one group at once, and
/// an unordered group on the same topic receives all of them without waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_at_a_time_per_message_group_in_log_order() {
    let b = TestBroker::start(&[]);
    let p = producer(&b).await;
    let mut messages = interleaved("t", &["a", "b", "c"], 4);
    messages.push(Message::new("t", "marker"));
    p.send_batch(messages).await.unwrap();

    let mut unordered = Consumer::subscribe(b.addr(), ConsumerOptions::new("u", "t"))
        .await
        .unwrap();
    let all = until_marker(&mut unordered, "marker").await;
    assert_eq!(all.len(), 12, "the unordered group waited for acks");

    let mut c = Consumer::subscribe(b.addr(), ordered("o", "t"))
        .await
        .unwrap();
    let heads = until_marker(&mut c, "marker").await;
    let mut first: Vec<String> = heads.iter().map(body).collect();
    first.sort();
    assert_eq!(
        first,
        vec!["a0", "b0", "c0"],
        "more than the heads went out"
    );

    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let mut out: HashMap<String, String> = HashMap::new();
    let mut pending = heads;
    let mut received = 3;
    for d in &pending {
        out.insert(d.message_group().to_string(), body(d));
        seen.entry(d.message_group().to_string())
            .or_default()
            .push(body(d));
    }
    while received < 12 || !pending.is_empty() {
        // Ack the oldest outstanding one, then take what that released.
        if let Some(d) = (!pending.is_empty()).then(|| pending.remove(0)) {
            out.remove(d.message_group());
            d.ack().await.unwrap();
        }
        if received < 12 {
            let d = recv(&mut c).await;
            let g = d.message_group().to_string();
            assert!(
                !out.contains_key(&g),
                "{} went out while {} of its group was not acked",
                body(&d),
                out[&g]
            );
            out.insert(g.clone(), body(&d));
            seen.entry(g).or_default().push(body(&d));
            pending.push(d);
            received += 1;
        }
    }
    for g in ["a", "b", "c"] {
        let expect: Vec<String> = (0..4).map(|i| format!("{g}{i}")).collect();
        assert_eq!(seen[g], expect, "group {g} out of order");
    }
}

/// Item 8. A nacked head comes back before the next of its group, and so does one whose
/// lease expired; a consumer that leaves gives its head back to the others first; a head
/// that runs out of attempts goes to the DLQ and lets the next go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_expiry_departure_and_dlq_keep_the_order() {
    let b = TestBroker::start(&["--max-attempts", "4"]);
    let p = producer(&b).await;
    p.send_batch(interleaved("t", &["a"], 3)).await.unwrap();
    let options = ConsumerOptions {
        lease: Some(Duration::from_millis(600)),
        ..ordered("o", "t")
    };
    {
        let mut c = Consumer::subscribe(b.addr(), options.clone())
            .await
            .unwrap();
        let d = recv(&mut c).await;
        assert_eq!((body(&d).as_str(), d.attempt), ("a0", 1));
        d.nack(Some(Duration::from_millis(200))).await.unwrap();
        p.send(Message::new("t", "m1")).await.unwrap();
        assert!(
            until_marker(&mut c, "m1").await.is_empty(),
            "a1 overtook a0"
        );
        let d = recv(&mut c).await;
        assert_eq!((body(&d).as_str(), d.attempt), ("a0", 2), "after the nack");
        // Not acked: the lease expires and a0 comes back, still before a1.
        let d = recv(&mut c).await;
        assert_eq!(
            (body(&d).as_str(), d.attempt),
            ("a0", 3),
            "after the expiry"
        );
        // Held on purpose from here on, so that no further expiry races the departure.
        d.extend(Duration::from_secs(60)).await.unwrap();
        // The consumer leaves holding a0 (its deliveries hold the connection too, so
        // they all go at the end of this block): a0 goes to the next one, counted.
    }
    let mut c2 = Consumer::subscribe(b.addr(), options).await.unwrap();
    let d = recv(&mut c2).await;
    assert_eq!(
        (body(&d).as_str(), d.attempt),
        ("a0", 4),
        "after the departure"
    );
    // Its last attempt: nacked, it goes to the DLQ, and a1 may go.
    d.nack(Some(Duration::ZERO)).await.unwrap();
    let d = recv(&mut c2).await;
    assert_eq!((body(&d).as_str(), d.attempt), ("a1", 1));
    d.ack().await.unwrap();
    assert_eq!(body(&recv(&mut c2).await), "a2");
}

/// Item 8, broker restart. Acked heads stay done; the head out at the kill -9 comes back
/// first; a head waiting for redelivery across the restart still leads its group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_broker_keeps_each_groups_order() {
    let mut b = TestBroker::start_on_fixed_port(&[]);
    let p = producer(&b).await;
    p.send_batch(interleaved("t", &["a", "b"], 3))
        .await
        .unwrap();
    let mut c = Consumer::subscribe(b.addr(), ordered("o", "t"))
        .await
        .unwrap();
    let mut heads: Vec<Delivery> = vec![recv(&mut c).await, recv(&mut c).await];
    heads.sort_by_key(body);
    let (a0, b0) = (heads.remove(0), heads.remove(0));
    assert_eq!((body(&a0).as_str(), body(&b0).as_str()), ("a0", "b0"));
    a0.ack().await.unwrap();
    b0.nack(Some(Duration::from_millis(1500))).await.unwrap();
    let a1 = recv(&mut c).await;
    assert_eq!(body(&a1), "a1");
    drop(c);
    b.kill9();
    b.start_again();

    let p = producer(&b).await;
    p.send(Message::new("t", "marker")).await.unwrap();
    let mut c = Consumer::subscribe(b.addr(), ordered("o", "t"))
        .await
        .unwrap();
    let before: Vec<String> = until_marker(&mut c, "marker")
        .await
        .iter()
        .map(body)
        .collect();
    assert_eq!(before, vec!["a1"], "b1 overtook b0 waiting for redelivery");
    let b0 = recv(&mut c).await;
    assert_eq!(body(&b0), "b0");
    b0.ack().await.unwrap();
    assert_eq!(body(&recv(&mut c).await), "b1");
}

/// Item 9, and the group's ordering is fixed: a transaction's messages take their place
/// in their group at commit, in the order they were sent; an unordered subscription to
/// an ordered group is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_take_their_place_at_commit() {
    let b = TestBroker::start(&[]);
    let options = ProducerOptions::transactional("shop", |_req| async { Outcome::Unknown });
    let tp = Producer::connect(b.addr(), options).await.unwrap();
    let p = producer(&b).await;
    p.send(Message::new("t", "before").group("x"))
        .await
        .unwrap();
    let mut txn = tp.begin().unwrap();
    txn.send(Message::new("t", "t0").group("x")).await.unwrap();
    txn.send(Message::new("t", "t1").group("x")).await.unwrap();
    p.send(Message::new("t", "during").group("x"))
        .await
        .unwrap();
    txn.commit().await.unwrap();
    p.send(Message::new("t", "after").group("x")).await.unwrap();

    let mut c = Consumer::subscribe(b.addr(), ordered("o", "t"))
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..5 {
        let d = recv(&mut c).await;
        got.push(body(&d));
        d.ack().await.unwrap();
    }
    assert_eq!(got, vec!["before", "during", "t0", "t1", "after"]);

    let e = Consumer::subscribe(b.addr(), ConsumerOptions::new("o", "t"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::OrderingConflict), "{e}");
    let described = b.cli_ok(&["group", "describe", "o", "--json"]);
    assert!(described.contains("\"ordered\":true"), "{described}");
}

/// Review findings. A dead letter redriven while its group has moved on waits behind the
/// group's head and then goes (it was dropped, and the group stuck, before); a head held
/// for long does not pin the ack floor over the messages held behind it, and after a
/// kill -9 those still wait behind the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_and_a_crowded_floor_keep_the_order() {
    let mut b = TestBroker::start_on_fixed_port(&[]);
    let p = producer(&b).await;
    p.send_batch(interleaved("t", &["a"], 3)).await.unwrap();
    let options = ConsumerOptions {
        max_attempts: 1,
        ..ordered("o", "t")
    };
    let mut c = Consumer::subscribe(b.addr(), options).await.unwrap();
    let a0 = recv(&mut c).await;
    let a0_id = a0.id().to_string();
    a0.nack(Some(Duration::ZERO)).await.unwrap();
    let a1 = recv(&mut c).await;
    assert_eq!(body(&a1), "a1", "a0 was dead-lettered");
    let admin = txmq_client::Admin::connect(b.addr(), "").await.unwrap();
    assert_eq!(admin.redrive("o", Some(&a0_id)).await.unwrap(), 1);
    p.send(Message::new("t", "m")).await.unwrap();
    assert!(until_marker(&mut c, "m").await.is_empty(), "a0 overtook a1");
    a1.ack().await.unwrap();
    let again = recv(&mut c).await;
    assert_eq!(
        body(&again),
        "a0",
        "the redriven one waits for a1, then goes"
    );
    again.ack().await.unwrap();
    assert_eq!(body(&recv(&mut c).await), "a2");
    drop(c);

    // x0 held out (its lease extended), x1 behind it, then 5,000 others acked.
    let mut messages = vec![
        Message::new("u", "x0").group("x"),
        Message::new("u", "x1").group("x"),
    ];
    messages.extend((0..5000).map(|i| Message::new("u", format!("o{i}")).group(format!("g{i}"))));
    for chunk in messages.chunks(1000) {
        p.send_batch(chunk.to_vec()).await.unwrap();
    }
    let options = ConsumerOptions {
        window: 1000,
        ..ordered("o", "u")
    };
    let mut c = Consumer::subscribe(b.addr(), options.clone())
        .await
        .unwrap();
    let x0 = recv(&mut c).await;
    assert_eq!(body(&x0), "x0");
    x0.extend(Duration::from_secs(600)).await.unwrap();
    for _ in 0..5000 {
        let d = recv(&mut c).await;
        assert_ne!(body(&d), "x1", "x1 overtook x0");
        d.ack().await.unwrap();
    }
    let floor = txmq_tests::eventually(Duration::from_secs(10), || async {
        let g = admin.describe_group("o").await.ok()?;
        let t = g.topics.into_iter().find(|t| t.topic == "u")?;
        (t.ack_floor > 2).then_some(t.ack_floor)
    })
    .await;
    assert!(floor.is_some(), "the floor stayed behind the held message");
    drop((c, x0));
    b.kill9();
    b.start_again();
    let p = producer(&b).await;
    p.send(Message::new("u", "marker")).await.unwrap();
    let mut c = Consumer::subscribe(b.addr(), options).await.unwrap();
    let before: Vec<String> = until_marker(&mut c, "marker")
        .await
        .iter()
        .map(body)
        .collect();
    assert_eq!(before, vec!["x0"], "after the restart");
}
