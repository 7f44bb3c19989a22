//! Consumer groups against the real broker: leases, redelivery, nack, dead letters,
//! sharing within a group, fan-out across groups, tag filters (I6).

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use txmq_client::{Admin, Consumer, ConsumerOptions, Message, Producer, ProducerOptions};
use txmq_tests::{TestBroker, json_lines, next};

async fn send(b: &TestBroker, topic: &str, bodies: &[&str]) {
    let p = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap();
    for body in bodies {
        p.send(Message::new(topic, body.to_string())).await.unwrap();
    }
}

fn opts(group: &str, topic: &str, lease_ms: u64) -> ConsumerOptions {
    ConsumerOptions {
        lease: Some(Duration::from_millis(lease_ms)),
        ..ConsumerOptions::new(group, topic)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_redelivers_with_next_attempt() {
    let b = TestBroker::start(&[]);
    send(&b, "t", &["m"]).await;
    let mut c = Consumer::subscribe(b.addr(), opts("g", "t", 700))
        .await
        .unwrap();
    let first = next(&mut c, Duration::from_secs(10)).await.unwrap();
    assert_eq!(first.attempt, 1);
    let again = next(&mut c, Duration::from_secs(10))
        .await
        .expect("not redelivered");
    assert_eq!(again.id(), first.id());
    assert_eq!(again.attempt, 2);
    // The stale handle no longer names a lease; the fresh one does.
    let err = first.ack().await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(txmq_client::ErrorCode::LeaseNotFound),
        "{err}"
    );
    again.ack().await.unwrap();
    again.ack().await.expect("a repeated ack is a success");
    assert!(next(&mut c, Duration::from_millis(1500)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_keeps_the_lease() {
    let b = TestBroker::start(&[]);
    send(&b, "t", &["m"]).await;
    // A 3 s lease leaves ample time to extend it on a loaded machine.
    let mut c = Consumer::subscribe(b.addr(), opts("g", "t", 3000))
        .await
        .unwrap();
    let d = next(&mut c, Duration::from_secs(10)).await.unwrap();
    let deadline = d.extend(Duration::from_secs(60)).await.unwrap();
    assert!(deadline >= d.lease_deadline_ms + 50_000, "{deadline}");
    // Once the original deadline has passed, a marker sent then arrives first: the
    // expired lease would have been redelivered before any new message.
    let wait = d.lease_deadline_ms.saturating_sub(txmq_protocol::now_ms()) + 500;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    send(&b, "t", &["marker"]).await;
    let m = next(&mut c, Duration::from_secs(10)).await.unwrap();
    assert_eq!(m.body().as_ref(), b"marker", "redelivered despite extend");
    m.ack().await.unwrap();
    d.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_redelivers_after_delay_then_dead_letters_and_redrives() {
    let b = TestBroker::start(&["--max-attempts", "3"]);
    send(&b, "t", &["poison"]).await;
    let mut c = Consumer::subscribe(b.addr(), opts("g", "t", 30_000))
        .await
        .unwrap();
    for attempt in 1..=3 {
        let d = next(&mut c, Duration::from_secs(10))
            .await
            .expect("redelivery");
        assert_eq!(d.attempt, attempt);
        d.nack(Some(Duration::from_millis(200))).await.unwrap();
    }
    assert!(
        next(&mut c, Duration::from_secs(1)).await.is_none(),
        "delivered past max attempts"
    );
    let out = b.cli_ok(&["dlq", "list", "--group", "g", "--json"]);
    let dead = json_lines(&out);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["body"], "poison");
    assert_eq!(dead[0]["attempts"], 3);
    let g = Admin::connect(b.addr(), "")
        .await
        .unwrap()
        .describe_group("g")
        .await
        .unwrap();
    assert_eq!(g.topics[0].dead_letters, 1);

    let out = b.cli_ok(&["dlq", "redrive", "--group", "g"]);
    assert!(out.contains("redrove 1"), "{out}");
    let d = next(&mut c, Duration::from_secs(10))
        .await
        .expect("redriven message");
    assert_eq!(d.body().as_ref(), b"poison");
    assert_eq!(d.attempt, 1, "a redriven message starts counting again");
    d.ack().await.unwrap();
    assert!(json_lines(&b.cli_ok(&["dlq", "list", "--group", "g", "--json"])).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_of_one_group_share_and_groups_each_get_all() {
    let b = TestBroker::start(&[]);
    let bodies: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    send(&b, "t", &refs).await;
    let small = |g: &str| ConsumerOptions {
        window: 4,
        ..ConsumerOptions::new(g, "t")
    };
    let mut c1 = Consumer::subscribe(b.addr(), small("shared"))
        .await
        .unwrap();
    let mut c2 = Consumer::subscribe(b.addr(), small("shared"))
        .await
        .unwrap();
    let mut other = Consumer::subscribe(b.addr(), small("other")).await.unwrap();
    let (mut seen1, mut seen2, mut seen_other) = (Vec::new(), Vec::new(), Vec::new());
    while seen1.len() + seen2.len() < 40 || seen_other.len() < 40 {
        tokio::select! {
            Some(d) = c1.next() => { let d = d.unwrap(); d.ack().await.unwrap(); seen1.push(d.offset()); }
            Some(d) = c2.next() => { let d = d.unwrap(); d.ack().await.unwrap(); seen2.push(d.offset()); }
            Some(d) = other.next() => { let d = d.unwrap(); d.ack().await.unwrap(); seen_other.push(d.offset()); }
            () = tokio::time::sleep(Duration::from_secs(10)) => panic!("stalled: {} {} {}", seen1.len(), seen2.len(), seen_other.len()),
        }
    }
    assert!(
        !seen1.is_empty() && !seen2.is_empty(),
        "one consumer got nothing"
    );
    let shared: HashSet<u64> = seen1.iter().chain(&seen2).copied().collect();
    assert_eq!(shared.len(), 40, "each message once within the group");
    assert_eq!(seen_other, (0..40).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_releases_leases_at_once() {
    let b = TestBroker::start(&[]);
    send(&b, "t", &["a", "b"]).await;
    let mut c1 = Consumer::subscribe(b.addr(), opts("g", "t", 60_000))
        .await
        .unwrap();
    let d = next(&mut c1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(d.attempt, 1);
    drop(d);
    drop(c1);
    // Lease of 60 s, yet the other consumer gets both at once.
    let mut c2 = Consumer::subscribe(b.addr(), opts("g", "t", 60_000))
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = next(&mut c2, Duration::from_secs(5))
            .await
            .expect("released lease not redelivered");
        got.push((String::from_utf8_lossy(d.body()).into_owned(), d.attempt));
        d.ack().await.unwrap();
    }
    got.sort();
    // Both were leased to the first consumer (window 256): each delivery counted.
    assert_eq!(got, vec![("a".to_string(), 2), ("b".to_string(), 2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_filter_is_applied_on_the_broker() {
    let b = TestBroker::start(&[]);
    let p = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap();
    for (body, tag) in [("1", "A"), ("2", "B"), ("3", "C"), ("4", "A")] {
        p.send(Message::new("t", body).tag(tag)).await.unwrap();
    }
    let mut c = Consumer::subscribe(
        b.addr(),
        ConsumerOptions {
            tag_filter: "A||C".into(),
            ..ConsumerOptions::new("g", "t")
        },
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    while let Some(d) = next(&mut c, Duration::from_secs(2)).await {
        got.push(String::from_utf8_lossy(d.body()).into_owned());
        d.ack().await.unwrap();
    }
    assert_eq!(got, vec!["1", "3", "4"]);
    let g = Admin::connect(b.addr(), "")
        .await
        .unwrap()
        .describe_group("g")
        .await
        .unwrap();
    assert_eq!(g.topics[0].lag, 0, "filtered messages count as done: {g:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_but_unacked_at_crash_is_delivered_again() {
    let mut b = TestBroker::start(&[]);
    send(&b, "t", &["x", "y"]).await;
    {
        let mut c = Consumer::subscribe(b.addr(), opts("g", "t", 60_000))
            .await
            .unwrap();
        let d = next(&mut c, Duration::from_secs(10)).await.unwrap();
        d.ack().await.unwrap();
        let _unacked = next(&mut c, Duration::from_secs(10)).await.unwrap();
        b.kill9();
    }
    b.start_again();
    let mut c = Consumer::subscribe(b.addr(), opts("g", "t", 60_000))
        .await
        .unwrap();
    let d = next(&mut c, Duration::from_secs(10))
        .await
        .expect("unacked message lost");
    assert_eq!(d.body().as_ref(), b"y");
    d.ack().await.unwrap();
    assert!(next(&mut c, Duration::from_secs(1)).await.is_none());
}

#[test]
fn cli_no_ack_lease_and_nack() {
    let b = TestBroker::start(&[]);
    b.cli_ok(&["produce", "--topic", "t", "--body", "hi"]);
    let out = b.cli_ok(&[
        "consume", "--topic", "t", "--group", "g", "--count", "1", "--no-ack", "--lease", "1",
        "--json",
    ]);
    assert_eq!(json_lines(&out)[0]["attempt"], 1);
    let out = b.cli_ok(&[
        "consume",
        "--topic",
        "t",
        "--group",
        "g",
        "--count",
        "1",
        "--timeout",
        "10",
        "--nack",
        "1",
        "--json",
    ]);
    assert_eq!(
        json_lines(&out)[0]["attempt"],
        2,
        "expired lease comes back with attempt 2"
    );
    let out = b.cli_ok(&[
        "consume",
        "--topic",
        "t",
        "--group",
        "g",
        "--count",
        "1",
        "--timeout",
        "10",
        "--json",
    ]);
    assert_eq!(
        json_lines(&out)[0]["attempt"],
        3,
        "nacked message comes back"
    );
    let out = b.cli_ok(&["group", "describe", "g", "--json"]);
    let g = &json_lines(&out)[0];
    assert_eq!(g["lag"], 0);
    assert_eq!(g["ack_floor"], 1);
}

/// `txmq consume --count N` leaves cleanly: deliveries the broker pushed beyond the N it
/// wanted go back without counting an attempt, and a library consumer's `close` does the
/// same, while dropping one counts it (a crash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_close_gives_deliveries_back_uncounted() {
    let b = TestBroker::start(&[]);
    let bodies: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    send(&b, "t", &refs).await;
    for _ in 0..3 {
        b.cli_ok(&["consume", "--topic", "t", "--group", "g", "--count", "5"]);
    }
    let mut c = Consumer::subscribe(b.addr(), opts("g", "t", 30_000))
        .await
        .unwrap();
    let d = next(&mut c, Duration::from_secs(10))
        .await
        .expect("a delivery");
    assert_eq!(
        d.attempt,
        1,
        "{} came back with an attempt counted",
        d.offset()
    );

    // Library: close gives back uncounted ...
    let mut held = Vec::new();
    while held.len() < 5 {
        held.push(
            next(&mut c, Duration::from_secs(10))
                .await
                .expect("delivery"),
        );
    }
    c.close().await.unwrap();
    let mut c = Consumer::subscribe(b.addr(), opts("g", "t", 30_000))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 5 {
        seen.push(
            next(&mut c, Duration::from_secs(10))
                .await
                .expect("redelivery"),
        );
    }
    assert!(
        seen.iter().all(|d| d.attempt == 1),
        "close counted an attempt"
    );
    // ... and dropping counts one (the deliveries too: they hold the connection).
    let dropped: Vec<u64> = seen.iter().map(|d| d.offset()).collect();
    drop((seen, c, held, d));
    let mut c = Consumer::subscribe(b.addr(), opts("g", "t", 30_000))
        .await
        .unwrap();
    let mut again = Vec::new();
    while again.len() < 35 {
        let Some(d) = next(&mut c, Duration::from_secs(10)).await else {
            break;
        };
        if dropped.contains(&d.offset()) {
            assert_eq!(d.attempt, 2, "a drop did not count the attempt");
        }
        again.push(d.offset());
        d.ack().await.unwrap();
    }
    assert!(dropped.iter().all(|o| again.contains(o)));
}

/// Sends `n` messages `m0..` to `topic`, concurrently.
async fn send_many(b: &TestBroker, topic: &str, n: usize) {
    let p = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap();
    let sends = (0..n).map(|i| p.send(Message::new(topic, format!("m{i}"))));
    for r in futures::future::join_all(sends).await {
        r.unwrap();
    }
}

/// Acks every delivery until `n` were acked.
async fn ack_all(c: &mut Consumer, n: usize) {
    for _ in 0..n {
        let d = next(c, Duration::from_secs(10)).await.expect("delivery");
        d.ack().await.unwrap();
    }
}

/// Issue 13, item 13: one message that is never acked (nacked for an hour, or held under
/// a long lease) no longer pins the group's ack floor. The floor passes it (it waits in
/// the retry index instead), so the acks above it do not pile up in memory and in storage,
/// and a restart does not re-read the log from it; it is still delivered again, and
/// nothing acked comes back. (The floor used to stay at the poison message: 0 here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_never_acked_does_not_pin_the_floor() {
    let mut b = TestBroker::start_on_fixed_port(&["--max-attempts", "100"]);
    send(&b, "t", &["poison"]).await;
    let mut c = Consumer::subscribe(b.addr(), opts("g", "t", 3_600_000))
        .await
        .unwrap();
    let d = next(&mut c, Duration::from_secs(10)).await.unwrap();
    assert_eq!(d.body().as_ref(), b"poison");
    d.nack(Some(Duration::from_secs(3600))).await.unwrap();
    // A delivery holds its connection open: let go of it, so dropping `c` ends it.
    drop(d);
    send_many(&b, "t", 3000).await;
    ack_all(&mut c, 3000).await;
    let g = describe(&b).await;
    assert_eq!(g.topics[0].ack_floor, 3001, "{g:?}");
    assert_eq!(g.topics[0].waiting_retry, 1, "{g:?}");
    drop(c);

    // A message held under a long lease: passed once the acks behind it pile up.
    let holder_opts = ConsumerOptions {
        window: 1,
        ..opts("g", "t", 3_600_000)
    };
    send(&b, "t", &["held"]).await;
    let mut holder = Consumer::subscribe(b.addr(), holder_opts).await.unwrap();
    let held = next(&mut holder, Duration::from_secs(10)).await.unwrap();
    assert_eq!(held.body().as_ref(), b"held");
    let mut c = Consumer::subscribe(b.addr(), opts("g", "t", 3_600_000))
        .await
        .unwrap();
    send_many(&b, "t", 5000).await;
    ack_all(&mut c, 5000).await;
    let g = describe(&b).await;
    assert_eq!(g.topics[0].ack_floor, 8002, "{g:?}");

    // After a crash: the held message comes back at once, the poison one waits for its
    // hour, and nothing acked comes back.
    b.kill9();
    drop((c, holder));
    b.start_again();
    let mut c = Consumer::subscribe(b.addr(), opts("g", "t", 3_600_000))
        .await
        .unwrap();
    let d = next(&mut c, Duration::from_secs(10))
        .await
        .expect("the held message");
    assert_eq!(d.body().as_ref(), b"held");
    d.ack().await.unwrap();
    assert!(next(&mut c, Duration::from_secs(2)).await.is_none());
    let g = describe(&b).await;
    assert_eq!(g.topics[0].ack_floor, 8002, "{g:?}");
    assert_eq!(g.topics[0].waiting_retry, 1, "{g:?}");
}

async fn describe(b: &TestBroker) -> txmq_client::pb::DescribeGroupOk {
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    admin.describe_group("g").await.unwrap()
}

/// Issue 13, item 17: a member of the group whose client stopped reading its socket. The
/// deliveries stuck behind it used to expire and count as attempts, again and again (51
/// to 163 of 20,000 messages reached the DLQ). Now the broker sees the connection stall,
/// sends it nothing more, gives its expired leases back without counting an attempt, and
/// shows the stall in `group describe`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_burns_no_attempts() {
    use futures::SinkExt;
    let b = TestBroker::start(&["--max-attempts", "2"]);
    let n = 600;
    let p = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap();
    let sends = (0..n).map(|i| {
        let mut body = format!("{i:05}").into_bytes();
        body.resize(64 * 1024, b'x');
        p.send(Message::new("t", body))
    });
    for r in futures::future::join_all(sends).await {
        r.unwrap();
    }
    // Subscribes with a window of 256 and a 3 s lease, then never reads again.
    let mut idle = txmq_tests::raw_hello(b.addr(), "").await;
    idle.send(txmq_protocol::Frame {
        id: 2,
        body: Some(txmq_protocol::Body::Subscribe(
            txmq_client::pb::SubscribeRequest {
                group: "g".into(),
                topic: "t".into(),
                lease_ms: 3000,
                window: 256,
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut c = Consumer::subscribe(b.addr(), opts("g", "t", 30_000))
        .await
        .unwrap();
    let mut seen = HashSet::new();
    let mut attempts = Vec::new();
    while seen.len() < n {
        let d = next(&mut c, Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("only {} of {n} arrived", seen.len()));
        seen.insert(d.body()[..5].to_vec());
        attempts.push(d.attempt);
        d.ack().await.unwrap();
    }
    let g = describe(&b).await;
    let t = &g.topics[0];
    assert_eq!(t.dead_letters, 0, "{g:?}");
    assert_eq!(t.stalled_consumers, 1, "{g:?}");
    assert!(
        attempts.iter().all(|a| *a == 1),
        "attempts were counted for deliveries stuck behind the idle consumer: {:?}",
        attempts.iter().filter(|a| **a > 1).count()
    );
    drop(idle);
}
