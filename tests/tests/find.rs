//! Issue 15, item 6: finding a message by id (with its life: the transaction it came
//! from, what each group did with it), and a topic's messages by key (the key index
//! written with the message) and by stored time, a page at a time; through the client
//! and the CLI, across a restart, and gone once retention removed them.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use txmq_client::pb::FindMessagesRequest;
use txmq_client::{
    Admin, Consumer, ConsumerOptions, ErrorCode, Message, Outcome, Producer, ProducerOptions,
};
use txmq_tests::{TestBroker, eventually, json_lines, next, producer};

fn query(topic: &str, key: &str) -> FindMessagesRequest {
    FindMessagesRequest {
        topic: topic.into(),
        key: key.into(),
        body: true,
        ..Default::default()
    }
}

fn bodies(found: &[txmq_client::pb::FoundMessage]) -> Vec<String> {
    found
        .iter()
        .map(|f| String::from_utf8_lossy(&f.message.as_ref().unwrap().body).into_owned())
        .collect()
}

async fn states(admin: &Admin, id: &str) -> HashMap<String, (String, u32)> {
    let shown = admin.show_message(id, false).await.unwrap();
    shown
        .groups
        .into_iter()
        .map(|g| (g.group, (g.state, g.attempts)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_found_by_id_key_and_time_with_its_life() {
    let mut b = TestBroker::start_on_fixed_port(&["--max-attempts", "2"]);
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let p = producer(&b).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let key = if i % 2 == 0 { "even" } else { "odd" };
        let m = Message::new("t", format!("m{i}"))
            .key(key)
            .tag("a")
            .property("n", i.to_string());
        ids.push(p.send(m).await.unwrap().message_id);
    }
    // A time strictly between m9's store time and m10's, whatever the clock's grain.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let middle = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // From a transaction, committed.
    let tp = Producer::connect(
        b.addr(),
        ProducerOptions::transactional("pg", |_r| async { Outcome::Unknown }),
    )
    .await
    .unwrap();
    let mut txn = tp.begin().unwrap();
    let from_txn = txn
        .send(Message::new("t", "m10").key("even").tag("b"))
        .await
        .unwrap();
    txn.commit().await.unwrap();
    let scheduled = p
        .send(Message::new("t", "later").deliver_after(Duration::from_secs(3600)))
        .await
        .unwrap();

    // Group g, one delivery at a time: m0 acked, m1 nacked for an hour (waiting), m2
    // dead-lettered after two attempts, then the next one held (in flight). Group f
    // receives tag b only.
    let g = ConsumerOptions {
        window: 1,
        ..ConsumerOptions::new("g", "t")
    };
    let mut c = Consumer::subscribe(b.addr(), g).await.unwrap();
    let f = ConsumerOptions {
        tag_filter: "b".into(),
        ..ConsumerOptions::new("f", "t")
    };
    let mut fc = Consumer::subscribe(b.addr(), f).await.unwrap();
    let mut m2_seen = 0;
    let held = loop {
        let d = next(&mut c, Duration::from_secs(20))
            .await
            .expect("delivery");
        match d.body().as_ref() {
            b"m0" => d.ack().await.unwrap(),
            b"m1" => d.nack(Some(Duration::from_secs(3600))).await.unwrap(),
            b"m2" => {
                m2_seen += 1;
                d.nack(Some(Duration::ZERO)).await.unwrap();
            }
            _ if m2_seen < 2 => d.ack().await.unwrap(),
            _ => break d,
        }
    };
    let in_f = next(&mut fc, Duration::from_secs(20)).await.expect("tag b");
    // Group late starts from the latest: the messages before were never its own.
    let late = ConsumerOptions {
        start_from: txmq_client::StartFrom::Latest,
        ..ConsumerOptions::new("late", "t")
    };
    drop(Consumer::subscribe(b.addr(), late).await.unwrap());
    // Group r acks m0 at its second delivery.
    let r = ConsumerOptions {
        window: 1,
        ..ConsumerOptions::new("r", "t")
    };
    let mut rc = Consumer::subscribe(b.addr(), r).await.unwrap();
    let d = next(&mut rc, Duration::from_secs(20))
        .await
        .expect("m0 for r");
    assert_eq!(d.body().as_ref(), b"m0");
    d.nack(Some(Duration::ZERO)).await.unwrap();
    let d = next(&mut rc, Duration::from_secs(20))
        .await
        .expect("m0 again");
    assert_eq!((d.body().as_ref(), d.attempt), (&b"m0"[..], 2));
    d.ack().await.unwrap();
    drop(rc);
    assert_eq!(in_f.body().as_ref(), b"m10");

    let s = states(&admin, &ids[0]).await;
    assert_eq!(s["g"], ("acked".into(), 1));
    assert_eq!(
        s["r"],
        ("acked".into(), 2),
        "the attempts of an acked message"
    );
    assert_eq!(s["f"].0, "filtered out");
    assert_eq!(s["late"].0, "before start");
    assert_eq!(states(&admin, &ids[1]).await["g"], ("waiting".into(), 1));
    let s = states(&admin, &ids[2]).await;
    assert_eq!(s["g"], ("dead-lettered".into(), 2));
    assert_eq!(
        states(&admin, held.id()).await["g"],
        ("in flight".into(), 1)
    );
    assert_eq!(
        states(&admin, &from_txn.message_id).await["f"],
        ("in flight".into(), 1)
    );
    if held.offset() < 9 {
        assert_eq!(states(&admin, &ids[9]).await["g"].0, "pending");
    }
    // The message itself, and its transaction.
    let shown = admin
        .show_message(&from_txn.message_id, true)
        .await
        .unwrap();
    assert_eq!(shown.state, "visible");
    assert_eq!(shown.txn_state, "committed");
    let found = shown.message.unwrap();
    let m = found.message.unwrap();
    assert_eq!(
        (m.offset, m.key.as_str(), m.tag.as_str()),
        (10, "even", "b")
    );
    assert_eq!((m.body.as_ref(), found.body_len), (&b"m10"[..], 3));
    let plain = admin.show_message(&ids[3], false).await.unwrap();
    let m = plain.message.unwrap();
    assert!(m.message.unwrap().body.is_empty(), "a body without --body");
    assert_eq!(m.body_len, 2);
    // A scheduled message, waiting.
    assert_eq!(
        admin
            .show_message(&scheduled.message_id, false)
            .await
            .unwrap()
            .state,
        "scheduled"
    );
    // Unknown and malformed ids.
    let e = admin
        .show_message("0000000000000001FFFFFFFFFFFFFFFF", false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::MessageNotFound), "{e}");
    let e = admin.show_message("nope", false).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");

    // By key, by time, and both; a page at a time.
    let even = admin.find_messages(query("t", "even"), 0).await.unwrap();
    assert_eq!(bodies(&even), ["m0", "m2", "m4", "m6", "m8", "m10"]);
    let mut q = query("t", "odd");
    q.limit = 2;
    let page = admin.find_messages_page(q.clone()).await.unwrap();
    assert_eq!((bodies(&page.messages).len(), page.more), (2, true));
    assert_eq!(
        bodies(&admin.find_messages(q, 0).await.unwrap()),
        ["m1", "m3", "m5", "m7", "m9"]
    );
    let since = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let mut q = query("t", "");
    q.since_ms = since(middle);
    assert_eq!(
        bodies(&admin.find_messages(q.clone(), 0).await.unwrap()),
        ["m10"]
    );
    q.key = "odd".into();
    assert!(admin.find_messages(q, 0).await.unwrap().is_empty());
    let mut q = query("t", "even");
    q.until_ms = since(middle);
    assert_eq!(bodies(&admin.find_messages(q, 0).await.unwrap()).len(), 5);
    assert!(
        admin
            .find_messages(query("t", "none"), 0)
            .await
            .unwrap()
            .is_empty()
    );

    // The CLI, after a restart (the indexes are durable).
    drop((c, fc, held, in_f));
    b.restart();
    let out = b.cli_ok(&["message", "show", &ids[2], "--json"]);
    let v = &json_lines(&out)[0];
    assert_eq!(
        (v["offset"].as_u64(), v["key"].as_str()),
        (Some(2), Some("even"))
    );
    assert_eq!(v["properties"]["n"], "2");
    let g = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == "g")
        .unwrap();
    assert_eq!(
        (g["state"].as_str(), g["attempts"].as_u64()),
        (Some("dead-lettered"), Some(2))
    );
    let out = b.cli_ok(&[
        "message", "find", "--topic", "t", "--key", "odd", "--json", "--body",
    ]);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[4]["body"], "m9");
    let out = b.cli_ok(&[
        "message", "find", "--topic", "t", "--since", "1h ago", "--limit", "3",
    ]);
    assert_eq!(out.lines().count(), 4, "a header and 3 rows: {out}");
}

/// Retention takes a message out of the indexes too: not found by id or by key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_message_is_no_longer_found() {
    let b = TestBroker::start(&["--retention", "1s", "--retention-interval", "200ms"]);
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let p = producer(&b).await;
    let old = p.send(Message::new("t", "old").key("k")).await.unwrap();
    assert_eq!(
        admin
            .show_message(&old.message_id, false)
            .await
            .unwrap()
            .state,
        "visible"
    );
    let gone = eventually(Duration::from_secs(30), || async {
        let e = admin.show_message(&old.message_id, false).await.err()?;
        Some(e.code())
    })
    .await;
    assert_eq!(gone, Some(Some(ErrorCode::MessageNotFound)));
    let new = p.send(Message::new("t", "new").key("k")).await.unwrap();
    let found = admin.find_messages(query("t", "k"), 0).await.unwrap();
    assert_eq!(bodies(&found), ["new"]);
    assert_eq!(
        admin
            .show_message(&new.message_id, false)
            .await
            .unwrap()
            .state,
        "visible"
    );
}
