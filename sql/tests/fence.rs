//! The checker's rule (see the crate's docs), on a real PostgreSQL and on SQLite: a
//! transaction the checker decides before the producer's database transaction starts is
//! fenced (rolled back, and the producer's claim then fails); one still open is
//! unknown; a committed one is commit; one whose work failed is rolled back on both
//! sides.

use std::time::Duration;

use txmq_client::{Message, Outcome, Producer, ProducerOptions};
use txmq_sql::{BoxError, Error, Pending, postgres, sqlite};
use txmq_tests::TestBroker;
use txmq_tests::postgres::Postgres;

async fn producer(b: &TestBroker) -> Producer {
    let options = ProducerOptions {
        group: "svc".into(),
        ..ProducerOptions::default()
    };
    Producer::connect(b.addr(), options).await.unwrap()
}

fn message() -> Vec<Message> {
    vec![Message::new("t", "x")]
}

async fn pg(url: &str) -> tokio_postgres::Client {
    let (db, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_checker_fences_waits_and_reads() {
    let server = Postgres::start();
    let b = TestBroker::start(&[]);
    let p = producer(&b).await;
    let mut db = pg(&server.url()).await;
    postgres::migrate(&db).await.unwrap();
    let database = postgres::identity(&db).await.unwrap();
    let checker = postgres::Checker::new(pg(&server.url()).await)
        .await
        .unwrap();

    // Decided first: fenced.
    let pending = Pending::begin(&p, &database, message()).await.unwrap();
    let id = pending.txn_id().to_string();
    assert_eq!(checker.decide(&id).await.unwrap(), Outcome::Rollback);
    let e = postgres::run_local(pending, &mut db, async |_| Ok::<_, BoxError>(()))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Fenced(_)), "{e}");

    // Asked while the producer's transaction is open: unknown; once committed: commit.
    let pending = Pending::begin(&p, &database, message()).await.unwrap();
    let id = pending.txn_id().to_string();
    let (during, committed) = postgres::run_local(pending, &mut db, async |_| {
        Ok::<_, BoxError>(checker.decide(&id).await.unwrap())
    })
    .await
    .unwrap();
    assert_eq!(during, Outcome::Unknown);
    assert_eq!(checker.decide(&id).await.unwrap(), Outcome::Commit);
    committed.commit_message().await.unwrap();

    // The work fails: nothing committed, and the checker says rollback.
    let pending = Pending::begin(&p, &database, message()).await.unwrap();
    let id = pending.txn_id().to_string();
    let e = postgres::run_local(pending, &mut db, async |_| {
        Err::<(), BoxError>("the business said no".into())
    })
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Work(_)), "{e}");
    assert_eq!(checker.decide(&id).await.unwrap(), Outcome::Rollback);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_checker_fences_waits_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.db");
    let b = TestBroker::start(&[]);
    let p = producer(&b).await;
    let mut db = rusqlite::Connection::open(&path).unwrap();
    sqlite::migrate(&db).unwrap();
    let database = sqlite::identity(&db).unwrap();
    let checker = sqlite::Checker::open(&path).unwrap();

    let pending = Pending::begin(&p, &database, message()).await.unwrap();
    let id = pending.txn_id().to_string();
    assert_eq!(checker.decide(&id).unwrap(), Outcome::Rollback);
    let e = sqlite::run_local(pending, &mut db, |_| Ok::<_, BoxError>(()))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Fenced(_)), "{e}");

    let pending = Pending::begin(&p, &database, message()).await.unwrap();
    let id = pending.txn_id().to_string();
    let (during, committed) = sqlite::run_local(pending, &mut db, |_| {
        Ok::<_, BoxError>(checker.decide(&id).unwrap())
    })
    .await
    .unwrap();
    assert_eq!(during, Outcome::Unknown);
    assert_eq!(checker.decide(&id).unwrap(), Outcome::Commit);
    committed.commit_message().await.unwrap();

    let pending = Pending::begin(&p, &database, message()).await.unwrap();
    let id = pending.txn_id().to_string();
    let e = sqlite::run_local(pending, &mut db, |_| {
        Err::<(), BoxError>("the business said no".into())
    })
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Work(_)), "{e}");
    assert_eq!(checker.decide(&id).unwrap(), Outcome::Rollback);
}

/// A check-back about a transaction prepared longer ago than the checker's horizon is
/// never fenced (its record may have been pruned): an absent record answers unknown,
/// where a recent one answers rollback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_transaction_without_a_record_is_unknown_not_rolled_back() {
    use txmq_client::{CheckRequest, TransactionChecker, pb};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.db");
    let db = rusqlite::Connection::open(&path).unwrap();
    sqlite::migrate(&db).unwrap();
    let checker = sqlite::Checker::open(&path).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let request = |id: &str, store_ms: u64| CheckRequest {
        txn_id: id.into(),
        producer_group: "svc".into(),
        messages: vec![pb::StoredMessage {
            store_ms,
            ..Default::default()
        }],
        attempt: 1,
        bodies_omitted: false,
        messages_omitted: 0,
    };
    let old = now - txmq_sql::KEEP_ROWS.as_millis() as u64 - 60_000;
    assert_eq!(checker.check(request("old", old)).await, Outcome::Unknown);
    assert_eq!(checker.check(request("new", now)).await, Outcome::Rollback);
}

/// The PostgreSQL checker made with `connect` survives its connection being killed (a
/// database restart): the next check connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_checker_connects_again_after_its_connection_dies() {
    let server = Postgres::start();
    let db = pg(&server.url()).await;
    postgres::migrate(&db).await.unwrap();
    let checker = postgres::Checker::connect(&server.url()).await.unwrap();
    assert_eq!(checker.decide("a").await.unwrap(), Outcome::Rollback);
    let killed = db
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap();
    assert!(killed >= 1);
    // The first statement on the dead connection may still be on its way out.
    let mut answer = checker.decide("b").await;
    for _ in 0..3 {
        if answer.is_ok() {
            break;
        }
        answer = checker.decide("b").await;
    }
    assert_eq!(answer.unwrap(), Outcome::Rollback);
}

/// Issue 25, item 5: one producer group, two databases (shards, tenants), each with its
/// own checker. Transactions whose database committed and whose messages were never
/// committed are checked back, each only by its own database's checker: all of them
/// are committed, none discarded or rolled back. A check that landed on the other
/// database's checker was fenced there (no record) and rolled back committed work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_databases_in_one_group_each_answer_their_own_transactions() {
    use txmq_client::{Admin, Consumer, ConsumerOptions, pb::TxnState};
    let b = TestBroker::start(&[
        "--check-timeout",
        "1s",
        "--check-interval",
        "100ms",
        "--check-backoff",
        "200ms",
        "--check-max",
        "3",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let mut dbs = Vec::new();
    let mut producers = Vec::new();
    for name in ["a", "b"] {
        let path = dir.path().join(format!("{name}.db"));
        let db = rusqlite::Connection::open(&path).unwrap();
        sqlite::migrate(&db).unwrap();
        let checker = sqlite::Checker::open(&path).unwrap();
        let p = Producer::connect(b.addr(), ProducerOptions::transactional("shared", checker))
            .await
            .unwrap();
        dbs.push(db);
        producers.push(p);
    }
    assert_ne!(
        sqlite::identity(&dbs[0]).unwrap(),
        sqlite::identity(&dbs[1]).unwrap()
    );
    // Two transactions per database: committed there, their messages left to the
    // check-back (the producer "died" between the two commits).
    let mut ids = Vec::new();
    for (i, (db, p)) in dbs.iter_mut().zip(&producers).enumerate() {
        let database = sqlite::identity(db).unwrap();
        for j in 0..2 {
            let body = format!("db{i}-order{j}");
            let pending = Pending::begin(p, &database, vec![Message::new("orders", body)])
                .await
                .unwrap();
            ids.push(pending.txn_id().to_string());
            let ((), committed) = sqlite::run_local(pending, db, |_| Ok::<_, BoxError>(()))
                .await
                .unwrap();
            drop(committed);
        }
    }
    let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new("g", "orders"))
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < 4 && tokio::time::Instant::now() < deadline {
        if let Some(d) = txmq_tests::next(&mut c, Duration::from_secs(1)).await {
            got.push(String::from_utf8_lossy(d.body()).into_owned());
            d.ack().await.unwrap();
        }
    }
    got.sort();
    assert_eq!(
        got,
        ["db0-order0", "db0-order1", "db1-order0", "db1-order1"]
    );
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let txns = admin
        .transactions(TxnState::Unspecified, "", 0)
        .await
        .unwrap()
        .txns;
    for id in &ids {
        let t = txns.iter().find(|t| &t.txn_id == id).expect("listed");
        assert_eq!(
            t.state,
            TxnState::Committed as i32,
            "{id}: {:?} ({})",
            t.state,
            t.last_check_note
        );
        // Asked once, of its own database: another database's checker would have
        // answered unknown (or, before it knew better, fenced it).
        assert_eq!(t.check_count, 1, "{id}: {}", t.last_check_note);
    }
}
