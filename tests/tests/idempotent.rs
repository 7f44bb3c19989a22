//! Idempotent sends (issue 18, item 4): a send that carries an idempotency key is
//! stored once however often it arrives within the dedup window, and the producer
//! resends it on its own when the answer is lost: here, the connection cut between the
//! broker's write and its reply (`txmq_tests::proxy`).

use std::time::Duration;

use txmq_client::{Message, Producer, ProducerOptions};
use txmq_tests::proxy::CutProxy;
use txmq_tests::{TestBroker, drain, http_get};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_whose_answer_was_lost_is_stored_once_when_it_carries_a_key() {
    let b = TestBroker::start(&["--metrics-listen", "127.0.0.1:0"]);
    let proxy = CutProxy::start(b.addr()).await;
    let p = Producer::connect(proxy.addr(), ProducerOptions::default())
        .await
        .unwrap();
    p.send(Message::new("orders", "before")).await.unwrap();

    // The answer is lost; the producer reconnects, sends again, and gets the first
    // receipt.
    proxy.cut_next_reply();
    let receipt = p
        .send(Message::new("orders", "order-1").idempotency_key("order-1"))
        .await
        .expect("resent on its own");
    assert_eq!(proxy.cuts(), 1, "the answer was not cut");
    assert_eq!(receipt.offset, 1);
    // The application's own retry, later: the same receipt, nothing stored.
    let again = p
        .send(Message::new("orders", "order-1").idempotency_key("order-1"))
        .await
        .unwrap();
    assert_eq!(again, receipt);
    // The key reused for another message (issue 25, item 2): refused, nothing stored.
    let reused = p
        .send(Message::new("orders", "order-1 changed").idempotency_key("order-1"))
        .await
        .unwrap_err();
    assert_eq!(
        reused.code(),
        Some(txmq_client::ErrorCode::IdempotencyConflict),
        "{reused}"
    );

    // Without a key the lost answer is an unknown outcome, and a retry stores it twice:
    // what the key prevents.
    proxy.cut_next_reply();
    let lost = p.send(Message::new("orders", "plain")).await.unwrap_err();
    assert!(lost.outcome_unknown(), "{lost}");
    p.send(Message::new("orders", "plain")).await.unwrap();

    let bodies = drain(&b, "g", "orders", Duration::from_secs(3)).await;
    let bodies: Vec<_> = bodies.iter().map(|b| String::from_utf8_lossy(b)).collect();
    assert_eq!(bodies, ["before", "order-1", "plain", "plain"]);
    let (_, metrics) = http_get(b.metrics_addr(), "/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "txmq_sends_deduplicated_total 2"),
        "two repeats counted: {}",
        metrics
            .lines()
            .filter(|l| l.contains("dedup"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Bad input gets a clear error: a key over 256 bytes, and a key on a transaction's
/// message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_too_long_or_on_transactions_are_refused() {
    let b = TestBroker::start(&[]);
    let options = ProducerOptions {
        group: "pg".into(),
        ..ProducerOptions::default()
    };
    let p = Producer::connect(b.addr(), options).await.unwrap();
    let e = p
        .send(Message::new("t", "x").idempotency_key("k".repeat(257)))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("idempotency_key is 257 bytes"),
        "{e}"
    );
    let mut txn = p.begin().unwrap();
    let e = txn
        .send(Message::new("t", "x").idempotency_key("k"))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("idempotency_key is for plain sends"),
        "{e}"
    );
    p.send(Message::new("t", "ok").idempotency_key("k".repeat(256)))
        .await
        .unwrap();
}

/// A broker that remembers no keys (`--dedup-window 0`) refuses keyed sends: storing
/// them would turn the producer's safe resend into a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_a_window_refuses_keys() {
    let b = TestBroker::start(&["--dedup-window", "0s"]);
    let p = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap();
    let e = p
        .send(Message::new("t", "x").idempotency_key("k"))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("does not remember idempotency keys"),
        "{e}"
    );
    p.send(Message::new("t", "x")).await.unwrap();
}

/// `txmq produce --idempotency-key`: the same command twice stores its messages once,
/// and both runs print the same receipts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_with_keys() {
    let b = TestBroker::start(&[]);
    let run = || {
        b.cli_ok(&[
            "produce",
            "--topic",
            "t",
            "--body",
            "x",
            "--count",
            "3",
            "--idempotency-key",
            "batch-7",
            "--json",
        ])
    };
    let (first, second) = (run(), run());
    let offsets = |out: &str| {
        let mut o: Vec<u64> = txmq_tests::json_lines(out)
            .iter()
            .map(|v| v["offset"].as_u64().unwrap())
            .collect();
        o.sort_unstable();
        o
    };
    assert_eq!(offsets(&first), [0, 1, 2]);
    assert_eq!(
        offsets(&second),
        offsets(&first),
        "the first receipts again"
    );
    let stored = drain(&b, "g", "t", Duration::from_secs(2)).await;
    assert_eq!(stored.len(), 3);
}
