//! The queue's own tests: cost of expiry, acks and their undo, the floor.

use super::acks::cancel_out;
use super::*;

/// The writer's thread comes before its handle: bound in that order, a failed assertion
/// drops the handle first, and the thread's join does not wait on it for ever.
type Fixture = (
    tempfile::TempDir,
    StorageHandle,
    crate::storage::writer::WriterThread,
    WriterHandle,
    Arc<Config>,
);

/// A database in a temporary directory and its writer.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let storage = StorageHandle::alone(Storage::open(dir.path()).unwrap());
    let config = Arc::new(Config::default());
    let (writer, thread) = crate::storage::writer::Writer::spawn(
        storage.clone(),
        Arc::new(crate::topics::Topics::default()),
        Arc::new(crate::ids::IdGen::new(1)),
        config.clone(),
        Arc::new(Metrics::new()),
    );
    (dir, storage, thread, writer, config)
}

/// Topic `t`, created through `writer`, holding `m0`, `m1` and `m2` at offsets 0 to 2.
async fn topic_with_three(writer: &WriterHandle) -> Arc<Topic> {
    use crate::storage::writer::{Command, Outcome};
    let Outcome::Topic(topic) = writer
        .submit(Command::CreateTopic {
            retention: (0, 0),
            queues: 0,
            name: "t".into(),
            fail_if_exists: true,
        })
        .await
        .unwrap()
    else {
        panic!("no topic")
    };
    let messages = (0..3)
        .map(|i| pb::Message {
            topic: "t".into(),
            body: format!("m{i}").into(),
            ..Default::default()
        })
        .collect();
    writer.submit(Command::append(messages)).await.unwrap();
    topic
}

/// Group `g` on `topic`, subscribed before, nothing acked yet.
fn new_group(
    topic: Arc<Topic>,
    storage: StorageHandle,
    writer: WriterHandle,
    config: Arc<Config>,
) -> Queue {
    let loaded = Loaded {
        cursor: Some(CursorRecord::default()),
        acked: vec![],
        retries: vec![],
        dead_letters: 0,
        retry_groups: vec![],
    };
    let metrics = Arc::new(Metrics::new());
    Queue::new("g".into(), topic, loaded, storage, writer, config, metrics)
}

/// I5: a million leases in flight, ten of them expired: an expiry pass handles ten,
/// and the expired ones wait for redelivery with their attempt counted.
#[tokio::test]
async fn lease_expiry_costs_what_is_due() {
    let (_dir, storage, thread, writer, config) = fixture();
    let topic = Arc::new(Topic::new("t".into(), 1, 0, 2_000_000));
    let mut q = new_group(topic, storage, writer, config);
    let now = now_ms();
    for offset in 0..1_000_000u64 {
        let deadline_ms = if offset % 100_000 == 0 {
            now - 1
        } else {
            now + 3_600_000
        };
        q.restore_lease(
            offset,
            Lease {
                lease_id: offset + 1,
                subscription_id: 1,
                holder: 0,
                deadline_ms,
                attempt: 1,
                acking: false,
            },
        );
    }
    q.expire(now).await;
    assert_eq!(q.expiry_visits, 10, "visited more than what was due");
    assert_eq!(q.leases.len(), 999_990);
    assert_eq!(q.retry.len(), 10);
    assert!(q.retry.values().all(|r| r.attempts == 1 && r.is_stored()));
    q.expire(now).await;
    assert_eq!(
        q.expiry_visits, 10,
        "a pass with nothing due visited entries"
    );
    drop(q);
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .unwrap();
}

/// A consumer whose connection closed, still registered because its Unsubscribe has
/// not been handled yet, must not make `pump` spin: it once retried the same message
/// forever (100 % CPU, the Unsubscribe never read). Nothing is lost meanwhile.
#[tokio::test]
async fn a_closed_consumer_does_not_make_pump_spin_or_lose_messages() {
    let (_dir, storage, thread, writer, config) = fixture();
    let topic = topic_with_three(&writer).await;
    let mut q = new_group(topic, storage, writer, config);
    let consumer = |id, outbound| Consumer {
        spec: ConsumerSpec {
            subscription_id: id,
            outbound,
            window: 10,
            lease: Duration::from_secs(30),
            stall: Arc::default(),
            connection_id: 0,
        },
        in_flight: 0,
    };
    let (gone, rx) = mpsc::channel(16);
    drop(rx);
    q.consumers.push(consumer(1, gone));
    tokio::time::timeout(Duration::from_secs(10), q.pump())
        .await
        .expect("pump spun with only a closed consumer")
        .unwrap();
    assert!(q.leases.is_empty());
    let (live, mut rx) = mpsc::channel(16);
    q.consumers.push(consumer(2, live));
    q.pump().await.unwrap();
    let mut offsets = Vec::new();
    while let Ok(frame) = rx.try_recv() {
        if let Some(pb::frame::Body::Delivery(d)) = frame.body {
            offsets.push(d.message.unwrap().offset);
        }
    }
    offsets.sort_unstable();
    assert_eq!(
        offsets,
        vec![0, 1, 2],
        "a message was lost on the closed consumer"
    );
    drop(q);
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .unwrap();
}

#[test]
fn an_ack_put_and_its_delete_cancel_out() {
    let k = |o| keys::group_offset("g", 1, o);
    let ops = vec![
        Op::Put(Cf::Acked, k(5), vec![]),
        Op::Put(Cf::Acked, k(9), vec![]),
        Op::Delete(Cf::Acked, k(4)),
        Op::Delete(Cf::Acked, k(5)),
        Op::Put(Cf::Cursor, keys::cursor("g", 1), vec![1]),
    ];
    let out = cancel_out(ops);
    let described: Vec<String> = out
        .iter()
        .map(|op| match op {
            Op::Put(cf, k, _) => format!("put {cf:?} {:?}", keys::group_offset_offset(k)),
            Op::Delete(cf, k) => format!("del {cf:?} {:?}", keys::group_offset_offset(k)),
            Op::DeleteRange(cf, ..) => format!("range {cf:?}"),
        })
        .collect();
    assert_eq!(described.len(), 3, "{described:?}");
    assert!(
        described[0].starts_with("put Acked Some(9)"),
        "{described:?}"
    );
    assert!(
        described[1].starts_with("del Acked Some(4)"),
        "{described:?}"
    );
    assert!(described[2].starts_with("put Cursor"), "{described:?}");
}

#[test]
fn tag_filters_parse() {
    assert_eq!(parse_tags(""), None);
    assert_eq!(parse_tags(" * "), None);
    let set = parse_tags("A || B||C").unwrap();
    assert!(set.contains("A") && set.contains("B") && set.contains("C"));
    assert_eq!(set.len(), 3);
}

/// I6: an ack whose lease is gone is answered OK only for a message that was acked. The
/// floor also passes a message that waits for redelivery, and one dead-lettered; an ack
/// of their expired lease (slow on its way) is refused, so no client is told "acked"
/// of a message that is then delivered again or sits in the dead-letter queue.
#[tokio::test]
async fn an_ack_of_an_expired_lease_is_refused_unless_the_message_was_acked() {
    let (_dir, storage, thread, writer, config) = fixture();
    let topic = Arc::new(Topic::new("t".into(), 1, 0, 10));
    let mut q = new_group(topic, storage, writer, config);
    q.next = 3;
    let now = now_ms();
    let lease = |id: u64, attempt: u32, deadline_ms: u64| Lease {
        lease_id: id,
        subscription_id: 1,
        holder: 0,
        deadline_ms,
        attempt,
        acking: false,
    };
    let ack = ack_one;
    // Offset 0: acked on time, then the same ack again (its answer was lost): OK both.
    q.restore_lease(0, lease(1, 1, now + 60_000));
    ack(&mut q, 0, 1).await.expect("acked");
    ack(&mut q, 0, 1)
        .await
        .expect("a repeated ack is a success");
    // Offset 1: its lease expired before the ack came: it waits to be delivered again.
    q.restore_lease(1, lease(2, 1, now - 1));
    q.expire(now).await;
    assert!(q.retry.contains_key(&1));
    let e = ack(&mut q, 1, 2).await.expect_err("a lease that expired");
    assert!(matches!(e, Error::LeaseNotFound(_)), "{e}");
    // Offset 2: its last attempt expired: dead-lettered, and passed by the floor.
    let max = q.max_attempts();
    q.restore_lease(2, lease(3, max, now - 1));
    q.expire(now).await;
    assert!(q.is_acked(2) && !q.retry.contains_key(&2) && !q.leases.contains_key(&2));
    let e = ack(&mut q, 2, 3)
        .await
        .expect_err("a dead letter is not acked");
    assert!(matches!(e, Error::LeaseNotFound(_)), "{e}");
    // Forgotten by this queue (an older dead letter, or another run): storage says.
    q.dead_recent.clear();
    let e = ack(&mut q, 2, 3)
        .await
        .expect_err("a stored dead letter is not acked");
    assert!(matches!(e, Error::LeaseNotFound(_)), "{e}");
    drop(q);
    thread.join();
}

/// Acks `lease_id` of `offset` through one write of acks, as the run loop does; the answer.
async fn ack_one(q: &mut Queue, offset: u64, lease_id: u64) -> Result<Outcome> {
    let (reply, rx) = oneshot::channel();
    q.pending_acks
        .push((vec![LeaseRef::new(offset, lease_id)], reply));
    q.start_acks().await;
    let written = (&mut q.ack_flight.as_mut().expect("a write").rx)
        .await
        .expect("the writer answers");
    q.finish_acks(written);
    rx.await.expect("an answer")
}

/// The deliveries waiting in a consumer's channel: (offset, lease id).
fn delivered(rx: &mut mpsc::Receiver<Frame>) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    while let Ok(frame) = rx.try_recv() {
        if let Some(pb::frame::Body::Delivery(d)) = frame.body {
            let h = d.handle.expect("a handle");
            out.push((h.offset, h.lease_id));
        }
    }
    out
}

/// I6, issue 25 item 1: a message no consumer could take when it was read waits for
/// redelivery in memory only. Acks of the messages after it must not move the stored
/// floor past it: after a restart it is delivered (it was once lost for good).
#[tokio::test]
async fn the_floor_does_not_pass_a_redelivery_only_memory_knows() {
    let (_dir, storage, thread, writer, config) = fixture();
    let topic = topic_with_three(&writer).await;
    let consumer = |outbound| Consumer {
        spec: ConsumerSpec {
            subscription_id: 1,
            outbound,
            window: 10,
            lease: Duration::from_secs(30),
            stall: Arc::default(),
            connection_id: 0,
        },
        in_flight: 0,
    };
    let mut q = new_group(
        topic.clone(),
        storage.clone(),
        writer.clone(),
        config.clone(),
    );
    // A channel with room for one delivery: each pump delivers one message and cannot
    // hand over the next (a full outbound queue, as under a slow client).
    let (tx, mut rx) = mpsc::channel(1);
    q.consumers.push(consumer(tx));
    q.pump().await.unwrap();
    let first = delivered(&mut rx);
    q.pump().await.unwrap();
    let second = delivered(&mut rx);
    assert_eq!(
        [first.as_slice(), second.as_slice()]
            .concat()
            .iter()
            .map(|d| d.0)
            .collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert!(
        q.retry.get(&2).is_some_and(|r| !r.is_stored()),
        "offset 2 could not be handed over: it waits in memory"
    );
    for (offset, lease_id) in [first[0], second[0]] {
        ack_one(&mut q, offset, lease_id).await.expect("acked");
    }
    assert_eq!(q.floor(), 2, "the floor passed a redelivery nothing stores");
    drop(q);
    // A restart: the group's state as stored.
    let loaded = Loaded::load(&storage, "g", &topic).unwrap();
    let metrics = Arc::new(Metrics::new());
    let mut q = Queue::new("g".into(), topic, loaded, storage, writer, config, metrics);
    let (tx, mut rx) = mpsc::channel(16);
    q.consumers.push(consumer(tx));
    q.pump().await.unwrap();
    let again: Vec<u64> = delivered(&mut rx).iter().map(|d| d.0).collect();
    assert_eq!(again, vec![2], "offset 2 was lost across the restart");
    drop(q);
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .unwrap();
}

/// A crowded floor (many acks behind one message) passes an in-memory redelivery only
/// by storing it, so one message no consumer could take does not pin the floor.
#[tokio::test]
async fn a_crowded_floor_stores_an_in_memory_redelivery_to_pass_it() {
    let (_dir, storage, thread, writer, config) = fixture();
    let topic = Arc::new(Topic::new("t".into(), 1, 0, 10_000));
    let mut q = new_group(topic, storage.clone(), writer, config);
    let n = acks::MAX_ACKED_ABOVE_FLOOR as u64 + 10;
    q.next = n + 1;
    q.schedule(
        0,
        Redelivery {
            attempts: 0,
            due_ms: now_ms(),
            kept: Kept::InMemory,
        },
    );
    q.acked.extend(1..=n);
    let ops = q.advance_floor();
    assert_eq!(q.floor(), n + 1);
    assert!(q.retry[&0].is_stored(), "passed without a record");
    assert!(
        ops.iter().any(|op| matches!(op, Op::Put(Cf::Retry, k, _)
            if keys::group_offset_offset(k) == Some(0))),
        "no retry record written for offset 0"
    );
    drop(q);
    thread.join();
}
