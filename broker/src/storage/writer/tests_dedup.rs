//! Idempotent sends (issue 18): a repeated idempotency key stores nothing and gets the
//! first receipt, within a batch, across batches and across a reopen; keys are per
//! topic; a zero window remembers nothing. A repeat must be the same message (issue 25):
//! a native key reused for another one is refused; a gRPC message id reused by another
//! client, or for another message, is stored.

use super::tests::{stop, writer};
use super::*;
use crate::storage::dedup::KeyScope;
use crate::storage::{Cf, Storage};

fn keyed(topic: &str, body: &str, key: &str) -> pb::Message {
    pb::Message {
        topic: topic.into(),
        body: body.to_string().into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

async fn send(w: &WriterHandle, messages: Vec<pb::Message>) -> Vec<pb::MessageReceipt> {
    send_as(w, messages, KeyScope::Topic).await.unwrap()
}

async fn send_as(
    w: &WriterHandle,
    messages: Vec<pb::Message>,
    keys: KeyScope,
) -> Result<Vec<pb::MessageReceipt>> {
    match w.submit(Command::Append { messages, keys }).await? {
        Outcome::Stored(r) => Ok(r),
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
    let again = send(&w, vec![keyed("t", "a", "k1")]).await;
    assert_eq!(again, first, "the first receipt, unchanged");
    let mixed = send(
        &w,
        vec![
            keyed("t", "b", "k2"),
            keyed("t", "a", "k1"),
            keyed("t", "b", "k2"),
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
    let storage = StorageHandle::alone(Storage::open(dir.path()).unwrap());
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
    let key = crate::storage::dedup::key(id, &KeyScope::Topic, "old");
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

/// Issue 25, item 2: a native key reused for another message is refused with its own
/// code, alone or beside good messages, and stores nothing; the first stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_key_reused_for_another_message_is_refused() {
    let (_dir, storage, thread, w) = writer(FlushMode::Sync);
    let first = send(&w, vec![keyed("t", "a", "k1")]).await;
    let mut tagged = keyed("t", "a", "k1");
    tagged.tag = "other".into();
    for reused in [keyed("t", "b", "k1"), tagged] {
        let e = send_as(&w, vec![keyed("t", "fine", "k9"), reused], KeyScope::Topic)
            .await
            .expect_err("another message under a key in use");
        assert!(matches!(e, Error::IdempotencyConflict(_)), "{e}");
        assert_eq!(e.code(), txmq_protocol::pb::ErrorCode::IdempotencyConflict);
    }
    // Twice in one request with other content: refused too.
    let e = send_as(
        &w,
        vec![keyed("t", "x", "k5"), keyed("t", "y", "k5")],
        KeyScope::Topic,
    )
    .await
    .expect_err("one key, two messages, one request");
    assert!(matches!(e, Error::IdempotencyConflict(_)), "{e}");
    assert_eq!(send(&w, vec![keyed("t", "a", "k1")]).await, first);
    assert_eq!(
        log(&storage, "t"),
        ["a"],
        "a refused request stored something"
    );
    stop(w, thread, storage).await;
}

/// Issue 25, item 2: two gRPC clients with the same message id (two containerised
/// producers) both have their message stored; one client's own retry is deduplicated; a
/// native key equal to the id is another key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_message_ids_are_scoped_by_client_and_content() {
    let (_dir, storage, thread, w) = writer(FlushMode::Sync);
    let c1 = KeyScope::GrpcClient("c1".into());
    let c2 = KeyScope::GrpcClient("c2".into());
    let first = send_as(&w, vec![keyed("t", "from-c1", "ID")], c1.clone())
        .await
        .unwrap();
    let other_client = send_as(&w, vec![keyed("t", "from-c2", "ID")], c2.clone())
        .await
        .unwrap();
    assert_ne!(other_client, first, "another client's message was dropped");
    let retried = send_as(&w, vec![keyed("t", "from-c1", "ID")], c1.clone())
        .await
        .unwrap();
    assert_eq!(retried, first, "a client's own retry is the same message");
    // The same client, the same id, other content: a different message, stored.
    let clash = send_as(&w, vec![keyed("t", "c1-again", "ID")], c1.clone())
        .await
        .unwrap();
    assert_ne!(clash, first);
    let native = send(&w, vec![keyed("t", "native", "ID")]).await;
    assert_ne!(native, first, "a native key met a gRPC id");
    assert_eq!(
        log(&storage, "t"),
        ["from-c1", "from-c2", "c1-again", "native"]
    );
    stop(w, thread, storage).await;
}
