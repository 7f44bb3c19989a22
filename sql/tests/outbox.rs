//! Issue 18, item 2: the outbox relay, on a real PostgreSQL and on SQLite. Events are
//! written with their business rows; the relay dies after sending a batch and before
//! marking it sent; then it runs again while the broker is down, and the broker comes
//! back. Every event is delivered once, in order: none lost, none stored twice.

use std::process::{Command, Stdio};
use std::time::Duration;

use txmq_tests::postgres::Postgres;
use txmq_tests::{TestBroker, drain, wait_timeout};

const EVENTS: usize = 25;

fn demo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_txmq-sql-demo"))
}

fn run(c: &mut Command) -> std::process::Output {
    c.output().expect("run txmq-sql-demo")
}

async fn crash_stop_and_resume(db: &str) {
    let mut b = TestBroker::start_on_fixed_port(&[]);
    let out = run(demo()
        .args(["outbox-enqueue", "--db", db, "--count"])
        .arg(EVENTS.to_string()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Batches of 10: the first is marked, the second sent and not marked.
    let out = run(demo().args([
        "relay",
        "--db",
        db,
        "--broker",
        b.addr(),
        "--die-at-mark",
        "2",
        "--until-empty",
    ]));
    assert!(
        !out.status.success(),
        "it did not die: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The broker is down when the relay starts again; it comes back.
    b.kill9();
    let mut relay = demo()
        .args(["relay", "--db", db, "--broker", b.addr(), "--until-empty"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the relay");
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.start_again();
    let status = wait_timeout(&mut relay, Duration::from_secs(60));
    let mut out = String::new();
    std::io::Read::read_to_string(relay.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(status.is_some_and(|s| s.success()), "relay: {out}");
    assert_eq!(
        out.trim(),
        format!("{{\"sent\":{}}}", EVENTS - 10),
        "what it sent and marked"
    );

    let bodies = drain(&b, "g", "events", Duration::from_secs(3)).await;
    let bodies: Vec<String> = bodies
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    let expected: Vec<String> = (1..=EVENTS).map(|i| format!("event-{i}")).collect();
    assert_eq!(bodies, expected, "each event once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outbox_delivers_every_event_once_across_a_crash_and_a_broker_outage() {
    let server = Postgres::start();
    crash_stop_and_resume(&server.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_outbox_delivers_every_event_once_across_a_crash_and_a_broker_outage() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("svc.db").display());
    crash_stop_and_resume(&url).await;
}

/// The relay's store wakes on the `NOTIFY` that `enqueue` sends at commit, not at its
/// next poll: here it was told to wait an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_relay_wakes_on_the_commit_of_an_enqueue() {
    use txmq_sql::outbox::Store;
    let server = Postgres::start();
    let mut store = txmq_sql::postgres::Outbox::connect(&server.url())
        .await
        .unwrap();
    let waiting = tokio::spawn(async move {
        store.wait(Duration::from_secs(3600)).await;
    });
    let (mut db, conn) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let tx = db.transaction().await.unwrap();
    txmq_sql::postgres::enqueue(&tx, &txmq_client::Message::new("t", "x"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("the relay was not woken by the commit")
        .unwrap();
}

/// A row the broker refuses for good (here a topic name it does not take) is set aside
/// with the reason, and the rows around it still go, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_refused_for_good_is_set_aside_and_holds_nothing_up() {
    use txmq_client::{Message, Producer, ProducerOptions};
    use txmq_sql::outbox::{RelayOptions, relay};
    let b = TestBroker::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.db");
    let mut db = rusqlite::Connection::open(&path).unwrap();
    txmq_sql::sqlite::migrate(&db).unwrap();
    let tx = db.transaction().unwrap();
    for topic in ["events", "bad name!", "events"] {
        txmq_sql::sqlite::enqueue(&tx, &Message::new(topic, format!("to {topic}"))).unwrap();
    }
    tx.commit().unwrap();
    let producer = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap();
    let mut store = txmq_sql::sqlite::Outbox::open(&path).unwrap();
    let options = RelayOptions {
        until_empty: true,
        ..RelayOptions::default()
    };
    let done = relay(&mut store, &producer, &options, std::future::pending())
        .await
        .unwrap();
    assert_eq!((done.sent, done.failed), (2, 1));
    let error: String = db
        .query_row(
            "SELECT error FROM txmq_outbox WHERE topic = 'bad name!' AND failed_ms IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(error.contains("InvalidName"), "{error}");
    let bodies = drain(&b, "g", "events", Duration::from_secs(2)).await;
    assert_eq!(bodies, vec![b"to events".to_vec(), b"to events".to_vec()]);
}

/// An SQLite outbox in a temporary directory with `messages` enqueued in one
/// transaction; its path (the directory must outlive the test).
fn sqlite_outbox(dir: &tempfile::TempDir, messages: &[txmq_client::Message]) -> std::path::PathBuf {
    let path = dir.path().join("svc.db");
    let mut db = rusqlite::Connection::open(&path).unwrap();
    txmq_sql::sqlite::migrate(&db).unwrap();
    let tx = db.transaction().unwrap();
    for m in messages {
        txmq_sql::sqlite::enqueue(&tx, m).unwrap();
    }
    tx.commit().unwrap();
    path
}

/// Rows of the outbox: (sent, set aside, pending).
fn row_states(path: &std::path::Path) -> (u64, u64, u64) {
    let db = rusqlite::Connection::open(path).unwrap();
    db.query_row(
        "SELECT
             COALESCE(SUM(sent_ms IS NOT NULL), 0),
             COALESCE(SUM(failed_ms IS NOT NULL), 0),
             COALESCE(SUM(sent_ms IS NULL AND failed_ms IS NULL), 0)
         FROM txmq_outbox",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .unwrap()
}

/// Issue 25, item 3: rows whose batch is larger than one frame of the broker's are sent
/// in batches cut by bytes. The relay used to send the same oversize batch forever,
/// dropping its producer's connection each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_larger_together_than_a_frame_are_sent_in_batches_that_fit() {
    use txmq_client::{Message, Producer, ProducerOptions};
    use txmq_sql::outbox::{RelayOptions, relay};
    // A 1 MiB frame: 30 rows of 200 KiB are about six frames' worth.
    let b = TestBroker::start(&[
        "--max-frame-len",
        "1048576",
        "--max-message-bytes",
        "524288",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<Message> = (0..30)
        .map(|i| Message::new("big", vec![b'a' + (i % 26) as u8; 200 * 1024]))
        .collect();
    let path = sqlite_outbox(&dir, &rows);
    let producer = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap();
    // One request over the frame is refused by the client, and the connection lives on.
    let over: Vec<Message> = rows.iter().take(6).cloned().collect();
    let e = producer.send_batch(over).await.expect_err("over one frame");
    assert!(e.is_frame_too_large(), "{e}");
    producer
        .send(Message::new("other", "x"))
        .await
        .expect("the connection lives on");

    let mut store = txmq_sql::sqlite::Outbox::open(&path).unwrap();
    let options = RelayOptions {
        until_empty: true,
        ..RelayOptions::default()
    };
    let done = tokio::time::timeout(
        Duration::from_secs(60),
        relay(&mut store, &producer, &options, std::future::pending()),
    )
    .await
    .expect("the relay wedged on a batch over one frame")
    .unwrap();
    assert_eq!((done.sent, done.failed), (30, 0));
    assert_eq!(row_states(&path), (30, 0, 0));
    let bodies = drain(&b, "g", "big", Duration::from_secs(3)).await;
    let firsts: Vec<u8> = bodies.iter().map(|b| b[0]).collect();
    let expected: Vec<u8> = (0..30).map(|i| b'a' + (i % 26) as u8).collect();
    assert_eq!(firsts, expected, "each row once, in order");
}

/// Issue 25, item 4: a broker that remembers no idempotency keys stops the relay with an
/// error that says what to fix; nothing is set aside (every row used to be).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_idempotency_keys_stops_the_relay_and_sets_nothing_aside() {
    use txmq_client::{ErrorCode, Message, Producer, ProducerOptions};
    use txmq_sql::outbox::{RelayOptions, relay};
    let b = TestBroker::start(&["--dedup-window", "0"]);
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<Message> = (0..5)
        .map(|i| Message::new("events", format!("e{i}")))
        .collect();
    let path = sqlite_outbox(&dir, &rows);
    let producer = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap();
    let mut store = txmq_sql::sqlite::Outbox::open(&path).unwrap();
    let options = RelayOptions {
        until_empty: true,
        ..RelayOptions::default()
    };
    let e = relay(&mut store, &producer, &options, std::future::pending())
        .await
        .expect_err("a relay that cannot avoid duplicates must stop");
    match &e {
        txmq_sql::Error::RelayStopped { why, source } => {
            assert_eq!(source.code(), Some(ErrorCode::IdempotencyDisabled), "{e}");
            assert!(why.contains("dedup-window"), "{why}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(row_states(&path), (0, 0, 5), "rows were set aside");
}

/// Issue 25, item 4: a row scheduled beyond the broker's max-schedule-delay waits (and
/// the rows after it, in id order); the rows before it go; nothing is set aside. The
/// broker announces its limit, so `check` refuses such a message before it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_scheduled_beyond_the_limit_waits_and_is_not_set_aside() {
    use txmq_client::{Message, Producer, ProducerOptions};
    use txmq_sql::outbox::{RelayOptions, check, relay};
    let b = TestBroker::start(&["--max-schedule-delay", "1h"]);
    let producer = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap();
    let limits = producer.limits().await.unwrap();
    assert_eq!(limits.max_schedule_delay, Some(Duration::from_secs(3600)));
    let far = Message::new("events", "later").deliver_after(Duration::from_secs(2 * 3600));
    check(&far, &limits).expect_err("announced limit: refused up front");
    check(&Message::new("events", "now"), &limits).expect("a plain message passes");
    let dir = tempfile::tempdir().unwrap();
    let rows = vec![
        Message::new("events", "first"),
        far,
        Message::new("events", "behind"),
    ];
    let path = sqlite_outbox(&dir, &rows);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut store = txmq_sql::sqlite::Outbox::open(&path).unwrap();
    let options = RelayOptions {
        until_empty: true,
        ..RelayOptions::default()
    };
    let done = relay(&mut store, &producer, &options, std::future::pending())
        .await
        .unwrap();
    assert_eq!((done.sent, done.failed, done.waiting), (1, 0, 2));
    assert_eq!(row_states(&path), (1, 0, 2));
    let age = options.status.oldest_pending_age();
    assert!(
        (Duration::from_millis(50)..Duration::from_secs(600)).contains(&age),
        "the oldest pending row's age: {age:?}"
    );
    let bodies = drain(&b, "g", "events", Duration::from_secs(2)).await;
    assert_eq!(bodies, vec![b"first".to_vec()]);
}
