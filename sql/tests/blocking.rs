//! Issue 25, item 14: the SQLite paths wait for the database's write lock (another
//! writer holds it) without stalling the async runtime. They blocked a tokio worker on
//! `BEGIN IMMEDIATE` for up to the busy timeout, and with it every task on that worker:
//! here, on a runtime of one worker, the task that would let the other writer go.

use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};
use txmq_client::{Message, Producer, ProducerOptions};
use txmq_sql::{BoxError, sqlite};
use txmq_tests::TestBroker;

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_wait_for_the_sqlite_lock_does_not_stall_the_runtime() {
    let b = TestBroker::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.db");
    let mut db = Connection::open(&path).unwrap();
    sqlite::migrate(&db).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let checker = sqlite::Checker::open(&path).unwrap();
    let producer = Producer::connect(b.addr(), ProducerOptions::transactional("g", checker))
        .await
        .unwrap();

    // Another writer holds the lock until a task of this runtime lets it go.
    let (locked_tx, locked) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let holder = {
        let path = path.clone();
        std::thread::spawn(move || {
            let mut other = Connection::open(&path).unwrap();
            let t = other
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .unwrap();
            locked_tx.send(()).unwrap();
            let by_the_task = released.recv_timeout(Duration::from_secs(60)).is_ok();
            t.commit().unwrap();
            by_the_task
        })
    };
    locked.recv().unwrap();

    let send = tokio::spawn(async move {
        sqlite::send_in_transaction(
            &producer,
            &mut db,
            vec![Message::new("orders", "o-1")],
            |tx| {
                tx.execute_batch("CREATE TABLE IF NOT EXISTS orders (id INTEGER)")?;
                Ok::<_, BoxError>(())
            },
        )
        .await
    });
    // Let the send reach the lock, then ask the runtime to run one more task.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::spawn(async move { release.send(()) })
        .await
        .unwrap()
        .unwrap();
    let sent = send.await.unwrap();
    assert!(
        holder.join().unwrap(),
        "the releasing task did not run while the send waited"
    );
    sent.expect("the send waited for the lock and went through");
}
