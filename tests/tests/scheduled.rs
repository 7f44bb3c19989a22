//! Scheduled messages (issue 14, items 1–6; I8 "nothing early"): held back until their
//! time, then delivered like any message with their id, key, tag and properties; in a
//! transaction scheduled at commit and discarded by rollback; cancellable before their
//! time; delivered after a kill -9 and restart.
//!
//! "Not before its time" is checked on the broker's clock (the delivered message's
//! `store_ms` against its `deliver_ms`), and "never" with a later marker: the timer
//! delivers in time order, so once a message due after it has arrived, the one before
//! would have too.

use std::time::{Duration, SystemTime};

use txmq_client::{
    Admin, Consumer, ConsumerOptions, Delivery, ErrorCode, Message, Outcome, Producer,
    ProducerOptions,
};
use txmq_tests::{TestBroker, json_lines, next, producer};

const WAIT: Duration = Duration::from_secs(20);

async fn consumer(b: &TestBroker, topic: &str) -> Consumer {
    Consumer::subscribe(b.addr(), ConsumerOptions::new("g", topic))
        .await
        .expect("subscribe")
}

async fn receive(c: &mut Consumer) -> Delivery {
    let d = next(c, WAIT).await.expect("nothing delivered");
    d.ack().await.expect("ack");
    d
}

fn body(d: &Delivery) -> String {
    String::from_utf8_lossy(d.body()).into_owned()
}

/// Items 1–2. A scheduled message waits for its time while a plain one sent after it
/// goes at once; it then arrives whole, with the id its receipt gave, and not before its
/// time by the broker's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_message_waits_for_its_time() {
    let b = TestBroker::start(&[]);
    let p = producer(&b).await;
    let mut c = consumer(&b, "orders").await;
    let later = Message::new("orders", "cancel-unpaid")
        .key("order-42")
        .tag("timeout")
        .property("reason", "unpaid")
        .deliver_after(Duration::from_millis(1500));
    let receipt = p.send(later).await.unwrap();
    assert!(receipt.deliver_ms > 0, "{receipt:?}");
    assert_eq!(receipt.offset, 0, "a scheduled message has no offset yet");
    p.send(Message::new("orders", "marker")).await.unwrap();

    let first = receive(&mut c).await;
    assert_eq!(body(&first), "marker", "the scheduled message came early");
    let d = receive(&mut c).await;
    assert_eq!(body(&d), "cancel-unpaid");
    assert_eq!(d.id(), receipt.message_id);
    assert_eq!((d.key(), d.tag()), ("order-42", "timeout"));
    assert_eq!(
        d.message.properties.get("reason").map(String::as_str),
        Some("unpaid")
    );
    assert_eq!(d.deliver_ms(), receipt.deliver_ms);
    assert!(
        d.message.store_ms >= d.deliver_ms(),
        "visible at {} before its time {}",
        d.message.store_ms,
        d.deliver_ms()
    );
    assert_eq!(d.offset(), 1, "it takes its place in the log when due");
}

/// Item 1. A time already past means now; a time beyond max-schedule-delay is refused
/// with a clear error, and nothing of the request is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_is_now_and_beyond_the_maximum_is_refused() {
    let b = TestBroker::start(&["--max-schedule-delay", "1h"]);
    let p = producer(&b).await;
    let past = SystemTime::now() - Duration::from_secs(3600);
    let r = p
        .send(Message::new("t", "past").deliver_at(past))
        .await
        .unwrap();
    assert_eq!(r.deliver_ms, 0, "a past time is not a schedule: {r:?}");
    let e = p.cancel_scheduled(&r.message_id).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AlreadyDelivered), "{e}");
    let e = p
        .send_batch(vec![
            Message::new("t", "ok"),
            Message::new("t", "far").deliver_after(Duration::from_secs(2 * 3600)),
        ])
        .await
        .unwrap_err();
    // Its own code (issue 25, item 4): the same message may be taken later.
    assert_eq!(e.code(), Some(ErrorCode::ScheduleTooFar), "{e}");
    assert!(e.to_string().contains("max-schedule-delay"), "{e}");
    let ok = p
        .send(Message::new("t", "near").deliver_after(Duration::from_secs(1800)))
        .await
        .unwrap();
    assert!(ok.deliver_ms > 0);
    let mut c = consumer(&b, "t").await;
    assert_eq!(body(&receive(&mut c).await), "past");
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let waiting = admin.scheduled("t", 0).await.unwrap();
    let ids: Vec<&str> = waiting.iter().map(|s| s.message_id.as_str()).collect();
    assert_eq!(
        ids,
        vec![ok.message_id.as_str()],
        "the refused batch left something"
    );
}

/// Item 4. In a transaction a scheduled message is scheduled at commit (not at prepare,
/// and not delivered at commit), and a rollback discards it with the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_transaction_scheduled_at_commit_and_discarded_by_rollback() {
    let b = TestBroker::start(&[]);
    let options = ProducerOptions::transactional("shop", |_req| async { Outcome::Unknown });
    let p = Producer::connect(b.addr(), options).await.unwrap();
    let mut c = consumer(&b, "orders").await;

    // Rolled back: its scheduled message is never delivered.
    let mut rolled = p.begin().unwrap();
    rolled
        .send(Message::new("orders", "never").deliver_after(Duration::from_millis(300)))
        .await
        .unwrap();
    rolled.rollback().await.unwrap();

    let mut txn = p.begin().unwrap();
    txn.send(Message::new("orders", "order-created"))
        .await
        .unwrap();
    let scheduled = txn
        .send(Message::new("orders", "cancel-if-unpaid").deliver_after(Duration::from_secs(1)))
        .await
        .unwrap();
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    assert!(
        admin.scheduled("orders", 0).await.unwrap().is_empty(),
        "scheduled before its transaction committed"
    );
    txn.commit().await.unwrap();
    let listed = admin.scheduled("orders", 0).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].message_id, scheduled.message_id);
    assert_eq!(listed[0].txn_id, txn.id().unwrap());

    assert_eq!(body(&receive(&mut c).await), "order-created");
    let d = receive(&mut c).await;
    assert_eq!(body(&d), "cancel-if-unpaid", "the rolled-back one came");
    assert!(d.message.store_ms >= d.deliver_ms());
    assert_eq!(d.message.txn_id, txn.id().unwrap());
}

/// Item 5. Cancel before the time: gone (and cancelling again still succeeds); after
/// delivery: refused, saying where it went; an unknown id: not found; listing is paged
/// and filters by topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_before_the_time_and_not_after() {
    let b = TestBroker::start(&[]);
    let p = producer(&b).await;
    let mut c = consumer(&b, "orders").await;
    let doomed = p
        .send(Message::new("orders", "cancelled").deliver_after(Duration::from_millis(800)))
        .await
        .unwrap();
    let ok = p.cancel_scheduled(&doomed.message_id).await.unwrap();
    assert_eq!(
        (ok.topic.as_str(), ok.deliver_ms),
        ("orders", doomed.deliver_ms)
    );
    p.cancel_scheduled(&doomed.message_id).await.unwrap();
    let after = p
        .send(Message::new("orders", "after").deliver_after(Duration::from_millis(1200)))
        .await
        .unwrap();
    let d = receive(&mut c).await;
    assert_eq!(body(&d), "after", "a cancelled message was delivered");

    let e = p.cancel_scheduled(&after.message_id).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AlreadyDelivered), "{e}");
    assert!(e.to_string().contains("offset 0"), "{e}");
    let e = p
        .cancel_scheduled("0000000000000001ffffffffffffffff")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::ScheduledNotFound), "{e}");
    let e = p.cancel_scheduled("not-an-id").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");

    // 1,100 waiting in two topics: listed a page at a time, earliest first.
    let messages = (0..1100u64).map(|i| {
        let topic = if i % 2 == 0 { "even" } else { "odd" };
        Message::new(topic, format!("m{i}")).deliver_after(Duration::from_secs(600 + i))
    });
    let receipts = p.send_batch(messages.collect()).await.unwrap();
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let all = admin.scheduled("", 0).await.unwrap();
    assert_eq!(all.len(), 1100);
    assert!(all.windows(2).all(|w| w[0].deliver_ms <= w[1].deliver_ms));
    let odd = admin.scheduled("odd", 0).await.unwrap();
    assert_eq!(odd.len(), 550);
    assert!(odd.iter().all(|s| s.topic == "odd"));
    assert_eq!(admin.scheduled("", 7).await.unwrap().len(), 7);
    let first = &receipts[0];
    assert_eq!(all[0].message_id, first.message_id);
}

/// Item 6. A message due while the broker was down (kill -9) is delivered right after
/// it starts again, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_due_while_the_broker_was_down_comes_after_start() {
    let mut b = TestBroker::start_on_fixed_port(&[]);
    let p = producer(&b).await;
    let r = p
        .send(Message::new("orders", "overdue").deliver_after(Duration::from_millis(500)))
        .await
        .unwrap();
    b.kill9();
    tokio::time::sleep(Duration::from_millis(800)).await;
    b.start_again();
    let mut c = consumer(&b, "orders").await;
    let d = receive(&mut c).await;
    assert_eq!(
        (body(&d).as_str(), d.id()),
        ("overdue", r.message_id.as_str())
    );
    let p = producer(&b).await;
    p.send(Message::new("orders", "marker")).await.unwrap();
    assert_eq!(body(&receive(&mut c).await), "marker", "delivered twice");
}

/// The CLI: `produce --deliver-after`, `scheduled list`, `scheduled cancel`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_schedules_lists_and_cancels() {
    let b = TestBroker::start(&[]);
    let out = b.cli_ok(&[
        "produce",
        "--topic",
        "t",
        "--body",
        "later",
        "--deliver-after",
        "10m",
        "--json",
    ]);
    let sent = &json_lines(&out)[0];
    let id = sent["id"].as_str().unwrap().to_string();
    assert!(sent["deliver_ms"].as_u64().unwrap() > 0, "{sent}");
    let listed = json_lines(&b.cli_ok(&["scheduled", "list", "--topic", "t", "--json"]));
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    b.cli_ok(&["scheduled", "cancel", &id]);
    assert!(json_lines(&b.cli_ok(&["scheduled", "list", "--json"])).is_empty());
    let bad = b.cli(&["produce", "--topic", "t", "--deliver-at", "tomorrow"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("RFC 3339"));
}
