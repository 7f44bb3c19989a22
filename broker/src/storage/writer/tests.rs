//! The writer's own tests: durability, group commit, teardown, batch limits.

use super::*;
use crate::storage::dedup::KeyScope;
use crate::storage::{Cf, Storage};
use prost::Message;
use std::time::Duration;
use txmq_protocol::pb::{TxnOutcome, TxnState};

/// A writer on a fresh database. Tests end with [`stop`], so no thread outlives the
/// database or the test; bound in this order, a failed assertion drops the handle before
/// the thread joins (the other way round it would wait on itself and hang).
pub(super) fn writer(
    flush: FlushMode,
) -> (tempfile::TempDir, StorageHandle, WriterThread, WriterHandle) {
    let dir = tempfile::tempdir().unwrap();
    let storage = StorageHandle::alone(Storage::open(dir.path()).unwrap());
    let config = Arc::new(Config {
        flush,
        ..Config::default()
    });
    let (handle, thread) = Writer::spawn(
        storage.clone(),
        Arc::new(Topics::default()),
        Arc::new(IdGen::new(1)),
        config,
        Arc::new(Metrics::new()),
    );
    (dir, storage, thread, handle)
}

/// A writer on `storage` with its own topic registry, boot and configuration (tests
/// that look at the registry, reopen the database, or change a setting).
fn spawn_with(
    storage: &StorageHandle,
    topics: &Arc<Topics>,
    boot: u64,
    config: Config,
) -> (WriterHandle, WriterThread) {
    Writer::spawn(
        storage.clone(),
        topics.clone(),
        Arc::new(IdGen::new(boot)),
        Arc::new(config),
        Arc::new(Metrics::new()),
    )
}

/// Drops the handle, joins the threads, then closes the database: the order the
/// broker's own shutdown follows.
pub(super) async fn stop(handle: WriterHandle, thread: WriterThread, storage: StorageHandle) {
    drop(handle);
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .unwrap();
    assert!(
        storage.give_back_all(Duration::ZERO).await,
        "a thread still holds storage"
    );
}

fn append(i: usize) -> Command {
    Command::append(vec![pb::Message {
        topic: "t".into(),
        body: format!("m{i}").into(),
        ..Default::default()
    }])
}

/// I3's mechanism: with `flush = sync` no reply to a write comes before an fsync that
/// covers it — one after another, every send needs its own — and concurrent sends
/// share fsyncs (group commit). With `flush = async` there are none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_replies_wait_for_an_fsync_and_share_it() {
    let (_dir, storage, thread, w) = writer(FlushMode::Sync);
    let fsyncs = || storage.counters.fsyncs.load(Ordering::Relaxed);
    for i in 0..20 {
        let before = fsyncs();
        w.submit(append(i)).await.unwrap();
        assert!(fsyncs() > before, "send {i} was answered before any fsync");
    }
    let before = fsyncs();
    let sends = (0..2000).map(|i| w.submit(append(i)));
    for r in futures::future::join_all(sends).await {
        r.unwrap();
    }
    let shared = fsyncs() - before;
    assert!(
        (1..1000).contains(&shared),
        "2000 concurrent sends took {shared} fsyncs"
    );

    stop(w, thread, storage).await;

    let (_dir, storage, thread, w) = writer(FlushMode::Async);
    for i in 0..20 {
        w.submit(append(i)).await.unwrap();
    }
    assert_eq!(storage.counters.fsyncs.load(Ordering::Relaxed), 0);
    stop(w, thread, storage).await;
}

/// A write batch holds at most [`MAX_BATCH_BYTES`]: twelve concurrent 15 MiB sends
/// make at least three batches (they used to make one of 180 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_batch_is_capped_in_bytes() {
    let (_dir, storage, thread, w) = writer(FlushMode::Async);
    let big = bytes::Bytes::from(vec![7u8; 15 << 20]);
    // Queue them all before the writer wakes: one request first, so it is busy.
    let sends = (0..12).map(|_| {
        w.submit(Command::append(vec![pb::Message {
            topic: "t".into(),
            body: big.clone(),
            ..Default::default()
        }]))
    });
    let before = storage.counters.batches.load(Ordering::Relaxed);
    for r in futures::future::join_all(sends).await {
        r.unwrap();
    }
    let batches = storage.counters.batches.load(Ordering::Relaxed) - before;
    assert!(batches >= 3, "180 MiB went in {batches} batch(es)");
    stop(w, thread, storage).await;
}

/// Commits count against the cap with what they stage (all their half messages), not
/// with their few bytes of request: six concurrent commits of 15 MiB transactions do not
/// make one 90 MiB batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_capped_by_what_they_stage() {
    use crate::txn::state::Resolver;
    let (_dir, storage, thread, w) = writer(FlushMode::Async);
    let txns = prepare_big(&w, 6).await;
    let before = storage.counters.batches.load(Ordering::Relaxed);
    let ends = txns.iter().map(|&txn| {
        w.submit(Command::End {
            txn,
            outcome: TxnOutcome::Commit,
            by: Resolver::Producer("g".into()),
        })
    });
    for r in futures::future::join_all(ends).await {
        r.unwrap();
    }
    let batches = storage.counters.batches.load(Ordering::Relaxed) - before;
    assert!(
        batches >= 2,
        "90 MiB of commits went in {batches} batch(es)"
    );
    stop(w, thread, storage).await;
}

/// Six 15 MiB transactions prepared, for tests of what their commits stage.
async fn prepare_big(w: &WriterHandle, n: usize) -> Vec<crate::ids::Id> {
    let big = bytes::Bytes::from(vec![7u8; 15 << 20]);
    let mut txns = Vec::new();
    for _ in 0..n {
        let messages = vec![pb::Message {
            topic: "t".into(),
            body: big.clone(),
            ..Default::default()
        }];
        let bytes = messages.iter().map(|m| m.encoded_len() as u64).sum();
        let Outcome::Prepared { txn, .. } = w
            .submit(Command::Prepare {
                txn: None,
                group: "g".into(),
                messages,
                bytes,
                check_delay_ms: 0,
            })
            .await
            .unwrap()
        else {
            panic!("not prepared")
        };
        txns.push(txn);
    }
    txns
}

/// The cap holds inside one request too: a coalesced batch of six commits of 15 MiB
/// transactions (one `Command::Many`) is written in several batches, answered once, with
/// every outcome in its place, and a refused call among them stays refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_many_of_large_commits_is_split_across_batches() {
    use crate::txn::state::Resolver;
    let (_dir, storage, thread, w) = writer(FlushMode::Sync);
    let txns = prepare_big(&w, 6).await;
    let end = |txn, outcome| Command::End {
        txn,
        outcome,
        by: Resolver::Producer("g".into()),
    };
    let mut cmds: Vec<Command> = txns.iter().map(|&t| end(t, TxnOutcome::Commit)).collect();
    // A conflicting rollback of the first, staged after its commit in an earlier batch.
    cmds.push(end(txns[0], TxnOutcome::Rollback));
    let before = storage.counters.batches.load(Ordering::Relaxed);
    let Outcome::Many(outcomes) = w.submit(Command::Many(cmds)).await.unwrap() else {
        panic!("not many")
    };
    let batches = storage.counters.batches.load(Ordering::Relaxed) - before;
    assert!(
        batches >= 2,
        "90 MiB of commits went in {batches} batch(es)"
    );
    assert_eq!(outcomes.len(), 7);
    let mut offsets = Vec::new();
    for o in &outcomes[..6] {
        let Ok(Outcome::Ended {
            state, receipts, ..
        }) = o
        else {
            panic!("{o:?}")
        };
        assert_eq!(*state, TxnState::Committed);
        offsets.push(receipts[0].offset);
    }
    assert_eq!(offsets, (0..6).collect::<Vec<u64>>(), "out of order");
    assert!(
        outcomes[6].is_err(),
        "rollback after commit: {:?}",
        outcomes[6]
    );
    let topic = storage
        .topics()
        .unwrap()
        .into_iter()
        .find(|t| t.name == "t");
    assert_eq!(topic.unwrap().end, 6);
    stop(w, thread, storage).await;
}

/// Dropping the last handle with thousands of writes queued: every one is answered
/// (nothing hangs), the threads end before the database closes, and what was answered
/// OK is there when the database opens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_dropped_with_work_in_flight_answers_it_and_stops_first() {
    let (dir, storage, thread, w) = writer(FlushMode::Sync);
    let mut answers = Vec::new();
    for i in 0..3000 {
        let w = w.clone();
        answers.push(tokio::spawn(async move { w.submit(append(i)).await }));
    }
    tokio::task::yield_now().await;
    stop(w, thread, storage).await;
    let mut stored = 0;
    for a in answers {
        if a.await.unwrap().is_ok() {
            stored += 1;
        }
    }
    assert_eq!(stored, 3000, "queued writes were dropped unanswered");
    let storage = StorageHandle::alone(Storage::open(dir.path()).unwrap());
    let topic = storage
        .topics()
        .unwrap()
        .into_iter()
        .find(|t| t.name == "t")
        .unwrap();
    assert_eq!(topic.end, 3000);
}

/// Topic deletion in one batch with writes around it: a send before it is deleted with
/// it, a send after it makes a new topic under a new id, a command holding the deleted
/// topic is refused; and ids are never reused, also not after a restart when the
/// deleted topic had the largest id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_topic_takes_its_id_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let storage = StorageHandle::alone(Storage::open(dir.path()).unwrap());
    let topics = Arc::new(Topics::default());
    let (handle, thread) = spawn_with(&storage, &topics, 1, Config::default());
    // Bound after the thread: dropped first if an assertion fails.
    let w = handle;
    w.submit(append(0)).await.unwrap();
    let old = topics.get("t").unwrap();
    let deleted = w.submit(Command::DeleteTopic {
        topic: old.clone(),
        force: false,
        checked_below: None,
    });
    let after = w.submit(append(1));
    let retain = w.submit(Command::Retain {
        topic: old.clone(),
        to: 1,
    });
    let (deleted, after, retain) = futures::join!(deleted, after, retain);
    assert!(matches!(
        deleted.unwrap(),
        Outcome::TopicDeleted { messages: 1, .. }
    ));
    match after.unwrap() {
        Outcome::Stored(r) => assert_eq!(r[0].offset, 0, "a new topic starts at 0"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(retain, Err(Error::TopicNotFound(_))), "{retain:?}");
    let new = topics.get("t").unwrap();
    assert!(new.id > old.id);
    assert!(storage.read_message(old.id, 0).unwrap().is_none());
    assert_eq!(storage.deleted_topics().unwrap(), vec![old.id]);
    // The newest topic deleted too: a restart must not hand its id out again.
    let gone = w
        .submit(Command::DeleteTopic {
            topic: new.clone(),
            force: false,
            checked_below: None,
        })
        .await;
    assert!(matches!(gone, Ok(Outcome::TopicDeleted { .. })));
    stop(w, thread, storage).await;
    let storage = StorageHandle::alone(Storage::open(dir.path()).unwrap());
    assert!(storage.topics().unwrap().is_empty());
    assert_eq!(storage.next_topic_id(), new.id + 1);
    let topics = Arc::new(Topics::default());
    let (handle, thread) = spawn_with(&storage, &topics, 2, Config::default());
    let w = handle;
    w.submit(append(2)).await.unwrap();
    assert_eq!(topics.get("t").unwrap().id, new.id + 1, "an id reused");
    stop(w, thread, storage).await;
}

/// The indexes are written with the message and lose the entries of removed messages
/// once compacted: the compaction filter knows each topic's first kept offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_entries_of_removed_messages_are_compacted_away() {
    let dir = tempfile::tempdir().unwrap();
    let storage = StorageHandle::alone(Storage::open(dir.path()).unwrap());
    let topics = Arc::new(Topics::default());
    let (handle, thread) = spawn_with(&storage, &topics, 1, Config::default());
    let w = handle;
    let mut ids = Vec::new();
    for i in 0..100 {
        let m = pb::Message {
            topic: "t".into(),
            key: format!("k{}", i % 3),
            body: vec![i as u8; 100].into(),
            ..Default::default()
        };
        match w.submit(Command::append(vec![m])).await.unwrap() {
            Outcome::Stored(r) => ids.push(Id::parse(&r[0].message_id).unwrap()),
            other => panic!("{other:?}"),
        }
    }
    let t = topics.get("t").unwrap();
    assert_eq!(storage.locate(ids[5]).unwrap(), Some((t.id, 5)));
    assert_eq!(
        storage.offsets_by_key(t.id, "k1", 0, 10).unwrap(),
        [1, 4, 7, 10, 13, 16, 19, 22, 25, 28]
    );
    let count = |storage: &Storage, cf| {
        let mut it = storage.db().raw_iterator_cf(storage.cf(cf));
        it.seek_to_first();
        let mut n = 0;
        while it.valid() {
            n += 1;
            it.next();
        }
        n
    };
    assert_eq!(
        (count(&storage, Cf::MsgId), count(&storage, Cf::MsgKey)),
        (100, 100)
    );
    w.submit(Command::Retain {
        topic: t.clone(),
        to: 60,
    })
    .await
    .unwrap();
    assert_eq!(storage.index_garbage(), 60);
    // Out of view at once, out of the files once compacted.
    assert_eq!(storage.locate(ids[5]).unwrap(), None);
    assert_eq!(storage.offsets_by_key(t.id, "k1", 0, 2).unwrap(), [61, 64]);
    storage.db().flush_cf(storage.cf(Cf::MsgId)).unwrap();
    storage.db().flush_cf(storage.cf(Cf::MsgKey)).unwrap();
    storage.compact_indexes();
    assert_eq!(
        (count(&storage, Cf::MsgId), count(&storage, Cf::MsgKey)),
        (40, 40)
    );
    assert_eq!(storage.index_garbage(), 0);
    assert_eq!(storage.locate(ids[60]).unwrap(), Some((t.id, 60)));
    // After a restart the floors come from what is stored: more garbage is still known
    // as such, and counted.
    w.submit(Command::Retain {
        topic: t.clone(),
        to: 80,
    })
    .await
    .unwrap();
    stop(w, thread, storage).await;
    let storage = StorageHandle::alone(Storage::open(dir.path()).unwrap());
    assert!(storage.index_garbage() > 0, "the garbage was forgotten");
    storage.compact_indexes();
    assert_eq!(
        (count(&storage, Cf::MsgId), count(&storage, Cf::MsgKey)),
        (20, 20)
    );
    let topics = Arc::new(Topics::default());
    for st in storage.topics().unwrap() {
        topics.insert(Arc::new(Topic::from_record(st.name, &st.record, st.end)));
    }
    let (handle, thread) = spawn_with(&storage, &topics, 2, Config::default());
    let w = handle;
    let t = topics.get("t").unwrap();
    // A deleted topic's go entirely.
    w.submit(Command::DeleteTopic {
        topic: t.clone(),
        force: false,
        checked_below: None,
    })
    .await
    .unwrap();
    storage.compact_indexes();
    assert_eq!(
        (count(&storage, Cf::MsgId), count(&storage, Cf::MsgKey)),
        (0, 0)
    );
    stop(w, thread, storage).await;
}

/// Issue 25, item 13: a deletion without `--force` is refused in the writer's own step
/// while a transaction has messages for the topic, so one prepared after the request's
/// first look cannot outlive its topic (its commit once made a new topic of that name).
/// Its commit then goes to the topic as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_is_refused_in_its_step_while_a_transaction_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let storage = StorageHandle::alone(Storage::open(dir.path()).unwrap());
    let topics = Arc::new(Topics::default());
    let (handle, thread) = spawn_with(&storage, &topics, 1, Config::default());
    let w = handle;
    w.submit(append(0)).await.unwrap();
    let old = topics.get("t").unwrap();
    let prepare = Command::Prepare {
        txn: None,
        group: "pg".into(),
        messages: vec![pb::Message {
            topic: "t".into(),
            body: "m".into(),
            ..Default::default()
        }],
        bytes: 1,
        check_delay_ms: 0,
    };
    let delete = || Command::DeleteTopic {
        topic: old.clone(),
        force: false,
        checked_below: None,
    };
    // Prepared in the same batch as the deletion, and prepared before it.
    let both = w
        .submit(Command::Many(vec![prepare, delete()]))
        .await
        .unwrap();
    let Outcome::Many(both) = both else {
        panic!("{both:?}")
    };
    let Ok(Outcome::Prepared { txn, .. }) = &both[0] else {
        panic!("{both:?}")
    };
    assert!(matches!(&both[1], Err(Error::Invalid(_))), "{both:?}");
    let again = w.submit(delete()).await;
    assert!(
        matches!(&again, Err(Error::Invalid(t)) if t.contains("open transaction")),
        "{again:?}"
    );
    let commit = w
        .submit(Command::End {
            txn: *txn,
            outcome: TxnOutcome::Commit,
            by: crate::txn::state::Resolver::Operator,
        })
        .await
        .unwrap();
    match commit {
        Outcome::Ended { receipts, .. } => assert_eq!(receipts[0].offset, 1, "{receipts:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        topics.get("t").unwrap().id,
        old.id,
        "the topic was replaced"
    );
    // Resolved: now it goes.
    assert!(matches!(
        w.submit(delete()).await,
        Ok(Outcome::TopicDeleted { .. })
    ));
    stop(w, thread, storage).await;
}

/// Issue 25, item 13: a scheduled message of a deleted topic that comes due before the
/// deletion's cleanup cancelled it is cancelled then, not delivered into a new topic of
/// that name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_message_goes_with_its_deleted_topic() {
    let dir = tempfile::tempdir().unwrap();
    let storage = StorageHandle::alone(Storage::open(dir.path()).unwrap());
    let topics = Arc::new(Topics::default());
    let (handle, thread) = spawn_with(&storage, &topics, 1, Config::default());
    let w = handle;
    let at = txmq_protocol::now_ms() + 60_000;
    let receipts = match w
        .submit(Command::Append {
            messages: vec![pb::Message {
                topic: "t".into(),
                body: "later".into(),
                deliver_at_ms: at,
                ..Default::default()
            }],
            keys: KeyScope::Topic,
        })
        .await
        .unwrap()
    {
        Outcome::Stored(r) => r,
        other => panic!("{other:?}"),
    };
    let id = Id::parse(&receipts[0].message_id).expect("an id");
    let old = topics.get("t").unwrap();
    w.submit(Command::DeleteTopic {
        topic: old.clone(),
        force: false,
        checked_below: None,
    })
    .await
    .unwrap();
    // Its due entry comes up before the cleanup ran.
    w.submit(Command::Deliver { id, due_ms: at }).await.unwrap();
    assert!(
        topics
            .get("t")
            .is_none_or(|t| t.id == old.id && t.end() == 0),
        "delivered into a new topic"
    );
    assert!(
        storage.topics().unwrap().is_empty(),
        "a topic was made again"
    );
    let rec = storage.scheduled(id).unwrap().expect("its record");
    assert_eq!(
        rec.state,
        crate::storage::records::SchedState::Cancelled as i32
    );
    stop(w, thread, storage).await;
}

/// A forced deletion dooms the open transactions on its topic: until its cleanup is
/// recorded as done, their commits are refused (the cleanup rolls them back), also
/// after a restart; a transaction made after the deletion is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_deletion_refuses_commits_until_its_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let prepare = |w: &WriterHandle| {
        let w = w.clone();
        async move {
            let cmd = Command::Prepare {
                txn: None,
                group: "pg".into(),
                messages: vec![pb::Message {
                    topic: "t".into(),
                    body: "m".into(),
                    ..Default::default()
                }],
                bytes: 1,
                check_delay_ms: 0,
            };
            match w.submit(cmd).await.unwrap() {
                Outcome::Prepared { txn, .. } => txn,
                other => panic!("{other:?}"),
            }
        }
    };
    let commit = |txn| Command::End {
        txn,
        outcome: TxnOutcome::Commit,
        by: crate::txn::state::Resolver::Operator,
    };
    let storage = StorageHandle::alone(Storage::open(dir.path()).unwrap());
    let topics = Arc::new(Topics::default());
    let (handle, thread) = spawn_with(&storage, &topics, 1, Config::default());
    let w = handle;
    let before = prepare(&w).await;
    let topic = topics.get("t").unwrap();
    let deleted = w.submit(Command::DeleteTopic {
        topic: topic.clone(),
        force: true,
        checked_below: None,
    });
    assert!(matches!(
        deleted.await.unwrap(),
        Outcome::TopicDeleted { .. }
    ));
    let after = prepare(&w).await;
    let e = w.submit(commit(before)).await.unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e:?}");
    assert!(
        w.submit(commit(after)).await.is_ok(),
        "a later transaction was refused"
    );
    stop(w, thread, storage).await;

    let storage = StorageHandle::alone(Storage::open(dir.path()).unwrap());
    let topics = Arc::new(Topics::default());
    let (handle, thread) = spawn_with(&storage, &topics, 2, Config::default());
    let w = handle;
    let e = w.submit(commit(before)).await.unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "after a restart: {e:?}");
    let (id, record) = storage.deleted_topic_records().unwrap().remove(0);
    assert_eq!(id, topic.id);
    w.submit(Command::FinishDeletion { id, record })
        .await
        .unwrap();
    assert!(storage.deleted_topic_records().unwrap()[0].1.cleaned);
    assert!(w.submit(commit(before)).await.is_ok());
    stop(w, thread, storage).await;
}

/// Stores one message on topic "t" through a writer on `storage`, then (given a time)
/// rewrites its `store_ms` to it (a leader whose clock was ahead stored it); its offset.
async fn stored_at(
    storage: &StorageHandle,
    topics: &Arc<Topics>,
    boot: u64,
    store_ms: Option<u64>,
) -> u64 {
    let (w, thread) = spawn_with(storage, topics, boot, Config::default());
    let offset = match w
        .submit(Command::Append {
            messages: vec![pb::Message {
                topic: "t".into(),
                body: "m".into(),
                ..Default::default()
            }],
            keys: KeyScope::Topic,
        })
        .await
        .unwrap()
    {
        Outcome::Stored(r) => r[0].offset,
        other => panic!("{other:?}"),
    };
    if let Some(store_ms) = store_ms {
        let t = topics.get("t").unwrap();
        let mut m = storage.read_message(t.id, offset).unwrap().unwrap();
        m.store_ms = store_ms;
        let put = Op::Put(
            Cf::Log,
            crate::storage::keys::log(t.id, offset).to_vec(),
            m.encode_to_vec(),
        );
        w.submit(Command::Raw(vec![put])).await.unwrap();
    }
    drop(w);
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .unwrap();
    offset
}

/// Issue 25, item 8: a new writer (a new leader, a restart) whose machine's clock is
/// behind the latest time stored gives no earlier time: `store_ms` never decreases along
/// a topic. Further ahead than two clocks within the group's skew bound can be apart, it
/// starts at that limit instead (times pinned far ahead would hold back check-backs and
/// purges).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_writer_gives_no_time_before_the_latest_stored() {
    let dir = tempfile::tempdir().unwrap();
    let storage = StorageHandle::alone(Storage::open(dir.path()).unwrap());
    let topics = Arc::new(Topics::default());
    let ahead = txmq_protocol::now_ms() + 400;
    let first = stored_at(&storage, &topics, 1, Some(ahead)).await;
    let next = stored_at(&storage, &topics, 2, None).await;
    let t = topics.get("t").unwrap();
    let m = storage.read_message(t.id, next).unwrap().unwrap();
    assert!(next > first);
    assert!(
        m.store_ms >= ahead,
        "stored at {} after {ahead}: back in time",
        m.store_ms
    );

    let far = txmq_protocol::now_ms() + 3_600_000;
    stored_at(&storage, &topics, 3, Some(far)).await;
    let before = txmq_protocol::now_ms();
    let last = stored_at(&storage, &topics, 4, None).await;
    let m = storage.read_message(t.id, last).unwrap().unwrap();
    let bound = super::clock::AHEAD_AT_MOST_MS;
    assert!(
        m.store_ms <= txmq_protocol::now_ms() + bound && m.store_ms >= before,
        "stored at {} with the machine's clock at {before}: not capped at the bound",
        m.store_ms
    );
    stop_storage(storage).await;
}

async fn stop_storage(storage: StorageHandle) {
    assert!(storage.give_back_all(Duration::ZERO).await);
}

/// A command after a purge in the same batch does not read the purged record back from
/// the database and write it again (it would stay, its purge entry gone, forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_transaction_stays_purged_within_its_batch() {
    use crate::txn::state::Resolver;
    let (_dir, storage, thread, w) = writer(FlushMode::Sync);
    let txn = prepare_big(&w, 1).await[0];
    w.submit(Command::End {
        txn,
        outcome: TxnOutcome::Commit,
        by: Resolver::Producer("g".into()),
    })
    .await
    .unwrap();
    let purge_ms = storage
        .txn(txn)
        .unwrap()
        .expect("resolved, kept a while")
        .purge_ms;
    assert!(purge_ms > 0);
    w.submit(Command::Many(vec![
        Command::Purge {
            txn,
            due_ms: purge_ms,
        },
        Command::NoteRefusedEnd {
            txn,
            note: "a one-way rollback refused".into(),
        },
    ]))
    .await
    .unwrap();
    assert!(storage.txn(txn).unwrap().is_none(), "the record came back");
    stop(w, thread, storage).await;
}
