//! Retention (issue 15, item 1): old messages are removed in bulk by a periodic sweep,
//! by age and by size, per topic or by the broker's default; a group behind the new
//! start moves on to the oldest message kept, counts what it skipped, and never stalls;
//! offsets are never reused, also after a restart.

use std::time::Duration;

use txmq_client::{Admin, Consumer, ConsumerOptions, Message};
use txmq_tests::{TestBroker, du, eventually, next, producer};

async fn start_offset(admin: &Admin, topic: &str) -> Option<u64> {
    let topics = admin.topics().await.ok()?;
    topics
        .into_iter()
        .find(|t| t.name == topic)
        .map(|t| t.start_offset)
}

/// By age: everything older than the retention goes; a group that never acked them
/// moves on and says how many it skipped; new messages keep their own offsets, also
/// after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_messages_go_and_groups_move_on() {
    let mut b = TestBroker::start_on_fixed_port(&[
        "--retention",
        "1s",
        "--retention-interval",
        "200ms",
        "--max-attempts",
        "1",
    ]);
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let p = producer(&b).await;
    // Group g exists (its cursor is at 0) before the rest is sent, with one dead letter.
    p.send(Message::new("t", "old-0")).await.unwrap();
    {
        let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new("g", "t"))
            .await
            .unwrap();
        let d = next(&mut c, Duration::from_secs(20)).await.expect("old-0");
        d.nack(Some(Duration::ZERO)).await.unwrap();
    }
    assert_eq!(admin.dead_letters("g", 0).await.unwrap().len(), 1);
    for i in 1..200 {
        p.send(Message::new("t", format!("old-{i}"))).await.unwrap();
    }
    let start = eventually(Duration::from_secs(30), || async {
        start_offset(&admin, "t").await.filter(|s| *s == 200)
    })
    .await;
    assert_eq!(start, Some(200), "retention removed nothing");

    p.send(Message::new("t", "new")).await.unwrap();
    let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new("g", "t"))
        .await
        .unwrap();
    let d = next(&mut c, Duration::from_secs(20))
        .await
        .expect("stalled");
    assert_eq!((d.body().as_ref(), d.offset()), (&b"new"[..], 200));
    d.ack().await.unwrap();
    let skipped = eventually(Duration::from_secs(10), || async {
        let g = admin.describe_group("g").await.ok()?;
        let t = g.topics.into_iter().find(|t| t.topic == "t")?;
        (t.skipped_by_retention > 0).then_some(t.skipped_by_retention)
    })
    .await;
    assert_eq!(skipped, Some(199), "old-0 was dead-lettered, not skipped");
    let gone = eventually(Duration::from_secs(10), || async {
        admin
            .dead_letters("g", 0)
            .await
            .ok()
            .filter(|d| d.is_empty())
    })
    .await;
    assert!(
        gone.is_some(),
        "the dead letter of a removed message stayed"
    );
    drop(c);

    // Everything may go (the topic is empty), and offsets still go on after a restart.
    let start = eventually(Duration::from_secs(30), || async {
        start_offset(&admin, "t").await.filter(|s| *s == 201)
    })
    .await;
    assert_eq!(start, Some(201));
    b.restart();
    let p = producer(&b).await;
    let r = p.send(Message::new("t", "after restart")).await.unwrap();
    assert_eq!(r.offset, 201, "an offset was reused");
}

/// By size, for one topic (`topic alter --retention-bytes`): once its log is on disk
/// and over the limit, the oldest messages go, the newest stay, and the disk use of the
/// data directory comes down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_over_its_size_loses_its_oldest_and_the_space_comes_back() {
    let metrics = format!("127.0.0.1:{}", txmq_tests::free_port());
    let b = TestBroker::start(&[
        "--retention-interval",
        "200ms",
        "--metrics-listen",
        &metrics,
    ]);
    let out = b.cli_ok(&["topic", "create", "big", "--json"]);
    assert!(out.contains("\"created\":\"big\""), "{out}");
    let p = producer(&b).await;
    // A random body (the limit is on disk, after compression; each message is
    // compressed on its own, so one random body serves them all).
    let mut body = vec![0u8; 1 << 20];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut body);
    for i in 0..100 {
        let mut m = Message::new("big", body.clone());
        m = m.key(format!("k{i}"));
        p.send(m).await.unwrap();
    }
    // Pushes the log into files, where sizes are known.
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let before = du(b.data_dir());
    let out = b.cli_ok(&[
        "topic",
        "alter",
        "big",
        "--retention-bytes",
        "16MiB",
        "--json",
    ]);
    assert!(out.contains("\"retention_bytes\":16777216"), "{out}");
    let start = eventually(Duration::from_secs(60), || async {
        start_offset(&admin, "big").await.filter(|s| *s > 0)
    })
    .await
    .expect("nothing removed by size");
    assert!(start < 100, "the newest went too: start {start}");
    let after = eventually(Duration::from_secs(60), || async {
        let now = du(b.data_dir());
        (now < before).then_some(now)
    })
    .await;
    assert!(
        after.is_some(),
        "the data directory did not shrink from {before} bytes"
    );
    // What the topic takes and how old its oldest message is: in the listing and in
    // the metrics (item 7).
    let out = b.cli_ok(&["topic", "list", "--json"]);
    let listed = txmq_tests::json_lines(&out);
    let big = listed
        .iter()
        .find(|t| t["name"] == "big")
        .expect("big listed");
    let bytes = big["bytes"].as_u64().unwrap();
    assert!((1..=17 << 20).contains(&bytes), "{big}");
    assert!(big["oldest_ms"].as_u64().unwrap() > 0, "{big}");
    let scraped = eventually(Duration::from_secs(20), || async {
        let (_, text) = txmq_tests::http_get(&metrics, "/metrics").await.ok()?;
        let line = text
            .lines()
            .find(|l| l.starts_with("txmq_topic_stored_bytes{topic=\"big\"}"))?
            .to_owned();
        let value: f64 = line.rsplit(' ').next()?.parse().ok()?;
        (value > 0.0 && text.contains("txmq_topic_oldest_message_age_seconds{topic=\"big\"}"))
            .then_some(value)
    })
    .await;
    assert!(
        scraped.is_some(),
        "no per-topic bytes and age in the metrics"
    );
    let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new("r", "big"))
        .await
        .unwrap();
    let d = next(&mut c, Duration::from_secs(20))
        .await
        .expect("nothing kept");
    assert_eq!(d.offset(), start, "the first kept message");
}

/// Review findings: retention passing an ordered group's heads and the messages held
/// behind them does not stall the group. Group `a`'s head waits for redelivery (nacked
/// for a minute) when its messages go; group `b`'s head is leased, and its ack after the
/// messages went releases the group. New messages of both groups then arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_does_not_stall_an_ordered_group() {
    let b = TestBroker::start(&["--retention", "1s", "--retention-interval", "200ms"]);
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let p = producer(&b).await;
    for body in ["a0", "b0", "a1", "b1"] {
        let group = &body[..1];
        p.send(Message::new("t", body).group(group)).await.unwrap();
    }
    let options = ConsumerOptions {
        lease: Some(Duration::from_secs(120)),
        ..ConsumerOptions::new("o", "t").ordered(true)
    };
    let mut c = Consumer::subscribe(b.addr(), options).await.unwrap();
    let mut heads = Vec::new();
    for _ in 0..2 {
        heads.push(next(&mut c, Duration::from_secs(20)).await.expect("a head"));
    }
    heads.sort_by_key(|d| d.body().to_vec());
    let (a0, b0) = (heads.remove(0), heads.remove(0));
    assert_eq!(
        (a0.body().as_ref(), b0.body().as_ref()),
        (&b"a0"[..], &b"b0"[..])
    );
    a0.nack(Some(Duration::from_secs(60))).await.unwrap();
    let start = eventually(Duration::from_secs(30), || async {
        start_offset(&admin, "t").await.filter(|s| *s == 4)
    })
    .await;
    assert_eq!(start, Some(4), "retention removed nothing");
    p.send(Message::new("t", "a2").group("a")).await.unwrap();
    p.send(Message::new("t", "b2").group("b")).await.unwrap();
    let d = next(&mut c, Duration::from_secs(20))
        .await
        .expect("group a stalled");
    assert_eq!(d.body().as_ref(), b"a2");
    d.ack().await.unwrap();
    b0.ack().await.unwrap();
    let d = next(&mut c, Duration::from_secs(20))
        .await
        .expect("group b stalled");
    assert_eq!(d.body().as_ref(), b"b2");
}
