//! Idempotent sends (issue 18): a repeated idempotency key stores nothing and gets the
//! first receipt, within a batch, across batches and across a reopen; keys are per
//! topic; a zero window remembers nothing.

use super::tests::{stop, writer};
use super::*;
use crate::storage::Cf;

fn keyed(topic: &str, body: &str, key: &str) -> pb::Message {
    pb::Message {
        topic: topic.into(),
        body: body.to_string().into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

async fn send(w: &WriterHandle, messages: Vec<pb::Message>) -> Vec<pb::MessageReceipt> {
    match w.submit(Command::Append { messages }).await.unwrap() {
        Outcome::Stored(r) => r,
        other => panic!("{other:?}"),
    }
}

/// What topic `t`'s log holds: the bodies in offset order.
fn log(storage: &Storage, topic: &str) -> Vec<String> {
    let id = storage
        .topics()
        .unwrap()
        .into_iter()
        .find(|t| t.name == topic)
        .unwrap()
        .record
        .id;
    (0..100)
        .filter_map(|o| storage.read_message(id, o).unwrap())
        .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_key_stores_nothing_and_gets_the_first_receipt() {
    let (_dir, storage, thread, w) = writer(FlushMode::Sync);
    let first = send(&w, vec![keyed("t", "a", "k1")]).await;
    // Again, alone; then beside a new key and twice in one request.
    let again = send(&w, vec![keyed("t", "a-retried", "k1")]).await;
    assert_eq!(again, first, "the first receipt, unchanged");
    let mixed = send(
        &w,
        vec![
            keyed("t", "b", "k2"),
            keyed("t", "a-again", "k1"),
            keyed("t", "b-again", "k2"),
            keyed("t", "unkeyed", ""),
            keyed("t", "unkeyed", ""),
        ],
    )
    .await;
    assert_eq!(mixed[1], first[0]);
    assert_eq!(mixed[2], mixed[0], "a repeat within one request");
    assert_ne!(mixed[3].offset, mixed[4].offset, "no key: no deduplication");
    // Concurrent repeats (one batch or several): one is stored.
    let racing = (0..50).map(|_| send(&w, vec![keyed("t", "c", "k3")]));
    let receipts = futures::future::join_all(racing).await;
    assert!(receipts.windows(2).all(|p| p[0] == p[1]), "{receipts:?}");
    // Keys are per topic.
    let other = send(&w, vec![keyed("u", "a", "k1")]).await;
    assert_eq!(other[0].offset, 0);
    assert_eq!(
        log(&storage, "t"),
        ["a", "b", "unkeyed", "unkeyed", "c"],
        "each key stored once"
    );
    stop(w, thread, storage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_survive_a_reopen_and_a_zero_window_forgets_them() {
    let (dir, storage, thread, w) = writer(FlushMode::Sync);
    let first = send(&w, vec![keyed("t", "a", "k")]).await;
    stop(w, thread, storage).await;
    let storage = Storage::open(dir.path()).unwrap();
    let topics = Arc::new(Topics::default());
    for t in storage.topics().unwrap() {
        topics.insert(Arc::new(Topic::from_record(t.name, &t.record, t.end)));
    }
    // Bound thread first: a failed assertion then drops the handle before the thread
    // joins.
    let (thread, w) = {
        let (w, thread) = Writer::spawn(
            storage.clone(),
            topics.clone(),
            Arc::new(IdGen::new(2)),
            Arc::new(Config::default()),
            Arc::new(Metrics::new()),
        );
        (thread, w)
    };
    assert_eq!(send(&w, vec![keyed("t", "a", "k")]).await, first);
    storage.set_dedup_window(std::time::Duration::ZERO);
    let stored = send(&w, vec![keyed("t", "a", "k")]).await;
    assert_eq!(stored[0].offset, 1, "a zero window remembers nothing");
    assert_eq!(log(&storage, "t"), ["a", "a"]);
    stop(w, thread, storage).await;
}

/// I9: an entry past the window is dropped when RocksDB rewrites its file (the filter),
/// not only ignored by lookups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keys_leave_the_index_at_compaction() {
    let (_dir, storage, thread, w) = writer(FlushMode::Sync);
    send(&w, vec![keyed("t", "a", "old")]).await;
    let id = storage.topics().unwrap()[0].record.id;
    let key = crate::storage::dedup::key(id, "old");
    let present = |s: &Storage| s.db().get_cf(s.cf(Cf::Dedup), &key).unwrap().is_some();
    assert!(present(&storage), "the key was recorded");
    storage.db().flush_cf(storage.cf(Cf::Dedup)).unwrap();
    storage.set_dedup_window(std::time::Duration::from_millis(1));
    std::thread::sleep(std::time::Duration::from_millis(5));
    storage
        .db()
        .compact_range_cf(storage.cf(Cf::Dedup), None::<&[u8]>, None::<&[u8]>);
    assert!(!present(&storage), "an expired key survived compaction");
    stop(w, thread, storage).await;
}
