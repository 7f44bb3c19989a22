//! What an operator sees (issue 7): Prometheus metrics and `/health` over HTTP, and the
//! CLI's admin views.

use std::time::Duration;

use futures::StreamExt;
use txmq_client::{Consumer, ConsumerOptions, Message, Outcome, Producer, ProducerOptions};
use txmq_tests::{TestBroker, eventually, free_port, http_get, json_lines};

/// The value of one sample line (`name{labels} value`) in a Prometheus text page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn scrape(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics").await.expect("metrics answer");
    assert_eq!(status, 200);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_show_the_counters_moving() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut b = TestBroker::start(&[
        "--metrics-listen",
        &metrics,
        "--check-timeout",
        "300ms",
        "--check-interval",
        "100ms",
    ]);
    // 503 "starting" until storage is open, then 200 "ok".
    let (status, body) = eventually(Duration::from_secs(30), || async {
        http_get(&metrics, "/health")
            .await
            .ok()
            .filter(|(status, _)| *status == 200)
    })
    .await
    .expect("health never said ok");
    assert_eq!(status, 200);
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    let before = scrape(&metrics).await;
    assert_eq!(sample(&before, "txmq_messages_sent_total"), Some(0.0));

    let p = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap();
    for i in 0..10 {
        p.send(Message::new("t", format!("m{i}"))).await.unwrap();
    }
    let txp = Producer::connect(
        b.addr(),
        ProducerOptions::transactional("svc", |_req| async { Outcome::Commit }),
    )
    .await
    .unwrap();
    let mut tx = txp.begin().unwrap();
    tx.send(Message::new("t", "committed")).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = txp.begin().unwrap();
    tx.send_batch(vec![Message::new("t", "r1"), Message::new("t", "r2")])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    // Left open: the check-back (answered commit) resolves it.
    let mut tx = txp.begin().unwrap();
    tx.send(Message::new("t", "checked")).await.unwrap();

    let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new("g", "t"))
        .await
        .unwrap();
    let mut nacked = false;
    let mut acked = 0;
    while acked < 12 {
        let d = tokio::time::timeout(Duration::from_secs(20), c.next())
            .await
            .expect("deliveries")
            .unwrap()
            .unwrap();
        if !nacked {
            nacked = true;
            d.nack(Some(Duration::from_millis(50))).await.unwrap();
            continue;
        }
        d.ack().await.unwrap();
        acked += 1;
    }

    let page = eventually(Duration::from_secs(10), || async {
        let page = scrape(&metrics).await;
        (sample(&page, "txmq_acks_total") == Some(12.0)).then_some(page)
    })
    .await
    .expect("acks counted");
    for (series, want) in [
        ("txmq_messages_sent_total", 10.0),
        ("txmq_half_messages_sent_total", 4.0),
        ("txmq_half_messages_pending", 0.0),
        ("txmq_transactions_resolved_total{outcome=\"commit\"}", 2.0),
        (
            "txmq_transactions_resolved_total{outcome=\"rollback\"}",
            1.0,
        ),
        ("txmq_checks_total{result=\"commit\"}", 1.0),
        ("txmq_deliveries_total", 13.0),
        ("txmq_redeliveries_total", 1.0),
        ("txmq_nacks_total", 1.0),
        ("txmq_dead_letters_total", 0.0),
        ("txmq_group_lag{group=\"g\",topic=\"t\"}", 0.0),
        ("txmq_connections", 3.0),
    ] {
        assert_eq!(sample(&page, series), Some(want), "{series} in\n{page}");
    }
    assert!(sample(&page, "txmq_storage_write_seconds_count").unwrap() > 0.0);
    assert!(sample(&page, "txmq_group_commit_requests_sum").unwrap() >= 20.0);

    // Half messages pending survive a restart: counted from storage at start.
    let mut tx = txp.begin().unwrap();
    tx.check_after(Duration::from_secs(3600));
    tx.send_batch(vec![Message::new("t", "a"), Message::new("t", "b")])
        .await
        .unwrap();
    drop((p, txp, c));
    b.restart();
    let page = eventually(Duration::from_secs(10), || async {
        let (_, page) = http_get(&metrics, "/metrics").await.ok()?;
        Some(page).filter(|p| p.contains("txmq_half_messages_pending"))
    })
    .await
    .unwrap();
    assert_eq!(
        sample(&page, "txmq_half_messages_pending"),
        Some(2.0),
        "{page}"
    );
    assert_eq!(sample(&page, "txmq_messages_sent_total"), Some(0.0));
    assert_eq!(
        sample(&page, "txmq_group_lag{group=\"g\",topic=\"t\"}"),
        Some(0.0)
    );
    let (status, _) = http_get(&metrics, "/nope").await.unwrap();
    assert_eq!(status, 404);
}

#[test]
fn cli_admin_views_as_tables_and_json() {
    let b = TestBroker::start(&[]);
    b.cli_ok(&[
        "produce", "--topic", "orders", "--count", "5", "--size", "10",
    ]);
    b.cli_ok(&[
        "produce", "--topic", "audit", "--count", "2", "--size", "10",
    ]);
    b.cli_ok(&[
        "consume", "--topic", "orders", "--group", "points", "--count", "3",
    ]);

    let topics = b.cli_ok(&["topic", "list"]);
    assert!(topics.lines().next().unwrap().contains("TOPIC"), "{topics}");
    let topics = json_lines(&b.cli_ok(&["topic", "list", "--json"]));
    let orders = topics.iter().find(|t| t["name"] == "orders").unwrap();
    assert_eq!(orders["messages"], 5);

    let groups = b.cli_ok(&["group", "list"]);
    assert!(groups.contains("points"), "{groups}");
    let groups = json_lines(&b.cli_ok(&["group", "list", "--json"]));
    let points = groups.iter().find(|g| g["group"] == "points").unwrap();
    assert_eq!(points["topic"], "orders");
    assert!(points["lag"].as_u64().unwrap() >= 2, "{points}");

    let stats = b.cli_ok(&["stats"]);
    assert!(stats.contains("topics"), "{stats}");
    let stats = json_lines(&b.cli_ok(&["stats", "--json"]));
    assert_eq!(stats[0]["topics"], 2);
    assert_eq!(stats[0]["messages"], 7);
    assert_eq!(stats[0]["groups"], 1);
    assert!(stats[0]["connections"].as_u64().unwrap() >= 1);

    let described = json_lines(&b.cli_ok(&["group", "describe", "points", "--json"]));
    assert_eq!(described[0]["topic"], "orders");
}

/// The client's runnable example (its crate docs point to it) works against a broker.
#[test]
fn the_client_quickstart_example_runs() {
    let b = TestBroker::start(&[]);
    let exe = txmq_tests::bin("examples/quickstart");
    let out = std::process::Command::new(exe)
        .arg(b.addr())
        .output()
        .expect("run the quickstart example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("received \"hello\""), "{stdout}");
    assert!(stdout.contains("received \"order 42\""), "{stdout}");
}

/// `txn list` pages: `--limit` cuts, `--after` the last id of a page gives the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_list_pages_with_limit_and_after() {
    let b = TestBroker::start(&[]);
    let p = Producer::connect(
        b.addr(),
        ProducerOptions::transactional("svc", |_req| async { Outcome::Unknown }),
    )
    .await
    .unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut tx = p.begin().unwrap();
        tx.check_after(Duration::from_secs(3600));
        tx.send(Message::new("t", format!("m{i}"))).await.unwrap();
        ids.push(tx.id().unwrap().to_string());
    }
    let ids_of = |out: String| -> Vec<String> {
        json_lines(&out)
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect()
    };
    let b2 = &b;
    let page = |args: Vec<&str>| {
        let mut all = vec!["txn", "list", "--json"];
        all.extend(args);
        ids_of(b2.cli_ok(&all))
    };
    let first = page(vec!["--limit", "2"]);
    assert_eq!(first, ids[..2]);
    let second = page(vec!["--limit", "2", "--after", &first[1]]);
    assert_eq!(second, ids[2..4]);
    let last = page(vec!["--after", &second[1]]);
    assert_eq!(last, ids[4..]);
    let out = b.cli(&["txn", "list", "--after", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a transaction id"));
}

/// Issue 14, "everywhere": scheduled messages waiting and delivered, their lateness, and
/// ordered groups' blocked message groups show in the metrics, and the waiting count
/// survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_and_ordered_metrics() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut b = TestBroker::start_on_fixed_port(&["--metrics-listen", &metrics]);
    let p = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap();
    for i in 0..3 {
        let later =
            Message::new("s", format!("later-{i}")).deliver_after(Duration::from_secs(3600));
        p.send(later).await.unwrap();
    }
    let soon = Message::new("s", "soon").deliver_after(Duration::from_millis(200));
    p.send(soon).await.unwrap();
    let page = eventually(Duration::from_secs(20), || async {
        let page = scrape(&metrics).await;
        (sample(&page, "txmq_scheduled_delivered_total") == Some(1.0)).then_some(page)
    })
    .await
    .expect("the due one was never delivered");
    assert_eq!(sample(&page, "txmq_scheduled_pending"), Some(3.0), "{page}");
    assert_eq!(
        sample(&page, "txmq_schedule_lateness_seconds_count"),
        Some(1.0)
    );

    p.send_batch(
        (0..3)
            .map(|i| Message::new("f", format!("a{i}")).group("a"))
            .collect(),
    )
    .await
    .unwrap();
    let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new("o", "f").ordered(true))
        .await
        .unwrap();
    let head = txmq_tests::next(&mut c, Duration::from_secs(20))
        .await
        .expect("the head");
    let blocked = eventually(Duration::from_secs(20), || async {
        let page = scrape(&metrics).await;
        (sample(&page, "txmq_ordered_blocked_message_groups") == Some(1.0)).then_some(())
    })
    .await;
    assert!(blocked.is_some(), "a blocked message group is not counted");
    head.ack().await.unwrap();
    drop((c, head));

    b.restart();
    // Counted from storage at start (the page is empty until storage is open).
    let pending = eventually(Duration::from_secs(30), || async {
        let (status, body) = http_get(&metrics, "/metrics").await.ok()?;
        if status != 200 {
            return None;
        }
        sample(&body, "txmq_scheduled_pending")
    })
    .await;
    assert_eq!(pending, Some(3.0));
}
