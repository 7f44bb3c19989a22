//! The checker's rule (see the crate's docs), on a real PostgreSQL and on SQLite: a
//! transaction the checker decides before the producer's database transaction starts is
//! fenced (rolled back, and the producer's claim then fails); one still open is
//! unknown; a committed one is commit; one whose work failed is rolled back on both
//! sides.

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
    let checker = postgres::Checker::new(pg(&server.url()).await)
        .await
        .unwrap();

    // Decided first: fenced.
    let pending = Pending::begin(&p, message()).await.unwrap();
    let id = pending.txn_id().to_string();
    assert_eq!(checker.decide(&id).await.unwrap(), Outcome::Rollback);
    let e = postgres::run_local(pending, &mut db, async |_| Ok::<_, BoxError>(()))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Fenced(_)), "{e}");

    // Asked while the producer's transaction is open: unknown; once committed: commit.
    let pending = Pending::begin(&p, message()).await.unwrap();
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
    let pending = Pending::begin(&p, message()).await.unwrap();
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
    let checker = sqlite::Checker::open(&path).unwrap();

    let pending = Pending::begin(&p, message()).await.unwrap();
    let id = pending.txn_id().to_string();
    assert_eq!(checker.decide(&id).unwrap(), Outcome::Rollback);
    let e = sqlite::run_local(pending, &mut db, |_| Ok::<_, BoxError>(()))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Fenced(_)), "{e}");

    let pending = Pending::begin(&p, message()).await.unwrap();
    let id = pending.txn_id().to_string();
    let (during, committed) = sqlite::run_local(pending, &mut db, |_| {
        Ok::<_, BoxError>(checker.decide(&id).unwrap())
    })
    .await
    .unwrap();
    assert_eq!(during, Outcome::Unknown);
    assert_eq!(checker.decide(&id).unwrap(), Outcome::Commit);
    committed.commit_message().await.unwrap();

    let pending = Pending::begin(&p, message()).await.unwrap();
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
