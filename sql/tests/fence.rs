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
