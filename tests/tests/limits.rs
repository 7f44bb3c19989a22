//! Limits with clear errors, authentication, graceful shutdown, a full disk, and a
//! thousand connections (issue 6). Each limit is shown by the error a user would see.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use txmq_client::{
    Admin, Consumer, ConsumerOptions, ErrorCode, Message, Producer, ProducerOptions,
};
use txmq_protocol::{Body, Frame, pb};
use txmq_tests::lazyfs::LazyFs;
use txmq_tests::{TestBroker, drain, eventually, next, producer, raw_hello};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_token_is_required_when_set() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let b = TestBroker::start(&["--auth-token-file", token_file.to_str().unwrap()]);

    let none = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap_err();
    assert_eq!(none.code(), Some(ErrorCode::NotAuthenticated), "{none}");
    assert!(none.to_string().contains("requires a token"), "{none}");
    let options = |token: &str| ProducerOptions {
        auth_token: token.into(),
        ..Default::default()
    };
    let wrong = Producer::connect(b.addr(), options("guess"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Some(ErrorCode::NotAuthenticated), "{wrong}");
    assert!(wrong.to_string().contains("does not match"), "{wrong}");
    let admin = Admin::connect(b.addr(), "guess").await.unwrap_err();
    assert_eq!(admin.code(), Some(ErrorCode::NotAuthenticated));

    // A refused connection is closed by the broker after the answer.
    let mut framed = raw_hello(b.addr(), "guess").await;
    let Some(Body::Response(r)) = framed.next().await.unwrap().unwrap().body else {
        panic!("no response")
    };
    assert_eq!(r.code, ErrorCode::NotAuthenticated as i32);
    let after = tokio::time::timeout(Duration::from_secs(10), framed.next()).await;
    assert!(
        matches!(after, Ok(None) | Ok(Some(Err(_)))),
        "the connection stayed open: {after:?}"
    );

    let p = Producer::connect(b.addr(), options("s3cret-token"))
        .await
        .expect("the right token is accepted");
    p.send(Message::new("t", "hello")).await.unwrap();

    // The CLI: one clear line without the token; flag and environment variable work.
    let out = b.cli(&["topic", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("authentication failed"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let listed = b.cli_ok(&["--auth-token", "s3cret-token", "topic", "list"]);
    assert!(listed.contains('t'), "{listed}");
    let out = std::process::Command::new(txmq_tests::bin("txmq"))
        .args(["--broker", b.addr(), "topic", "list"])
        .env("TXMQ_AUTH_TOKEN", "s3cret-token")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_and_property_limits_are_clear_errors() {
    let b = TestBroker::start(&[]);
    let p = producer(&b).await;
    let limit = 4 * 1024 * 1024;
    let at_limit: Vec<u8> = (0..limit).map(|i| (i % 251) as u8).collect();
    p.send(Message::new("big", at_limit.clone()))
        .await
        .expect("a body of exactly 4 MiB is accepted");
    let err = p
        .send(Message::new("big", vec![7u8; limit + 1]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::MessageTooLarge), "{err}");
    assert!(err.to_string().contains("4194304"), "{err}");

    let mut m = Message::new("big", "small body");
    for i in 0..70 {
        m = m.property(format!("p{i}"), "x".repeat(1000));
    }
    let err = p.send(m).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::MessageTooLarge), "{err}");
    assert!(err.to_string().contains("properties"), "{err}");

    // The same connection still works, and the 4 MiB message arrives intact.
    p.send(Message::new("big", "after")).await.unwrap();
    let got = drain(&b, "g", "big", Duration::from_secs(3)).await;
    assert_eq!(got, vec![at_limit, b"after".to_vec()]);

    // A lower limit set by flag is enforced the same way.
    let small = TestBroker::start(&["--max-message-bytes", "1024"]);
    let p = producer(&small).await;
    p.send(Message::new("t", vec![0u8; 1024])).await.unwrap();
    let err = p
        .send(Message::new("t", vec![0u8; 1025]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::MessageTooLarge), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_and_group_names_are_validated() {
    let b = TestBroker::start(&[]);
    let p = producer(&b).await;
    for bad in ["", "has space", "slash/ed", "ünïcode", &"x".repeat(129)] {
        let err = p.send(Message::new(bad, "x")).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidName), "{bad:?}: {err}");
    }
    p.send(Message::new("x".repeat(128), "longest"))
        .await
        .expect("128 bytes is allowed");
    p.send(Message::new("orders.v1_eu-west", "x"))
        .await
        .unwrap();
    let err = Consumer::subscribe(b.addr(), ConsumerOptions::new("bad group", "t"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("group name"), "{err}");
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let err = admin.describe_group("a*b").await.unwrap_err();
    assert!(err.to_string().contains("'*'"), "{err}");
    let out = b.cli(&["produce", "--topic", "no way", "--body", "x"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("topic name"), "{stderr}");
    // Nothing was stored under a refused name.
    let topics: Vec<String> = admin
        .topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(topics.len(), 2, "{topics:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_cleanly() {
    let b = TestBroker::start(&["--max-connections", "3"]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(producer(&b).await);
    }
    let err = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TooManyConnections), "{err}");
    assert!(err.to_string().contains("connection limit"), "{err}");
    let out = b.cli(&["topic", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("connection limit"), "{stderr}");
    // The held connections still work; closing one makes room again.
    for p in &held {
        p.send(Message::new("t", "x")).await.unwrap();
    }
    drop(held.pop());
    let again = eventually(Duration::from_secs(10), || async {
        Producer::connect(b.addr(), ProducerOptions::default())
            .await
            .ok()
    })
    .await;
    assert!(again.is_some(), "a freed slot was not reused");
}

/// A client that pipelines far more requests than the per-connection limit, without
/// reading answers, is slowed down (the broker stops reading it), not refused or dropped:
/// every request is answered, in a usable state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_limit_is_backpressure_without_loss() {
    let b = TestBroker::start(&["--max-in-flight", "4"]);
    let framed = raw_hello(b.addr(), "").await;
    let n = 600u64;
    let (mut sink, mut stream) = framed.split();
    let writer = tokio::spawn(async move {
        for i in 0..n {
            let req = pb::SendRequest {
                messages: vec![pb::Message {
                    topic: "t".into(),
                    body: format!("m{i}").into(),
                    ..Default::default()
                }],
                ..Default::default()
            };
            sink.feed(Frame {
                id: 2 + i,
                body: Some(Body::Send(req)),
            })
            .await
            .unwrap();
        }
        sink.flush().await.unwrap();
        sink
    });
    let mut ok = HashSet::new();
    while (ok.len() as u64) < n + 1 {
        let frame = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("answers keep coming")
            .expect("connection open")
            .expect("valid frame");
        let Some(Body::Response(r)) = frame.body else {
            continue;
        };
        assert_eq!(r.code, ErrorCode::Ok as i32, "{}", r.message);
        assert!(ok.insert(frame.id), "answered twice: {}", frame.id);
    }
    let _sink = writer.await.unwrap();
    let got = drain(&b, "g", "t", Duration::from_secs(3)).await;
    let expect: Vec<Vec<u8>> = (0..n).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(got, expect);
}

/// Graceful shutdown on SIGTERM and on SIGINT while producers are sending: exit 0, every
/// acknowledged send is there after the restart, and the restart is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_stop_cleanly_mid_traffic() {
    let mut b = TestBroker::start(&[]);
    let mut acked = HashSet::new();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let p = producer(&b).await;
        let stop = Arc::new(AtomicBool::new(false));
        let mut senders = Vec::new();
        for w in 0..4 {
            let p = p.clone();
            let stop = stop.clone();
            senders.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for i in 0..1_000_000u32 {
                    if stop.load(Ordering::Relaxed) && i % 50 == 0 {
                        break;
                    }
                    let body = format!("{sig}-{w}-{i}");
                    match p.send(Message::new("t", body.clone())).await {
                        Ok(_) => mine.push(body),
                        Err(_) => break,
                    }
                }
                mine
            }));
        }
        let target = acked.len() as u64 + 500;
        let first = eventually(Duration::from_secs(20), || async {
            let admin = Admin::connect(b.addr(), "").await.ok()?;
            let t = admin.topics().await.ok()?;
            t.iter().any(|t| t.next_offset >= target).then_some(())
        })
        .await;
        assert!(first.is_some(), "traffic did not start");
        b.stop_with(sig);
        stop.store(true, Ordering::Relaxed);
        for s in senders {
            acked.extend(s.await.unwrap());
        }
        let log = b.log_text();
        assert!(log.contains("shutting down"), "{log}");
        assert!(
            log.trim_end().ends_with("stopped"),
            "not a clean stop:\n{log}"
        );
        b.start_again();
    }
    let stored: HashSet<String> = drain(&b, "audit", "t", Duration::from_secs(3))
        .await
        .into_iter()
        .map(|v| String::from_utf8(v).unwrap())
        .collect();
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged sends lost: {:?}",
        lost.len(),
        lost.first()
    );
    assert!(acked.len() >= 1000, "only {} acked", acked.len());
}

/// A thousand client connections at once, all sending while a consumer group reads:
/// every send and every message arrives, each connection costs the broker little memory
/// (printed for the note), and every connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_with_traffic() {
    let b = TestBroker::start(&[]);
    let rss_before = b.memory_kb("VmRSS").unwrap_or(0);
    let mut producers = Vec::new();
    for _ in 0..1000 {
        producers.push(producer(&b).await);
    }
    let rss_idle = b.memory_kb("VmRSS").unwrap_or(0);
    let consume = {
        let addr = b.addr().to_string();
        tokio::spawn(async move {
            let mut c = Consumer::subscribe(&addr, ConsumerOptions::new("g", "load"))
                .await
                .unwrap();
            let mut seen = HashSet::new();
            while seen.len() < 5000 {
                let Some(d) = next(&mut c, Duration::from_secs(30)).await else {
                    break;
                };
                d.ack().await.unwrap();
                seen.insert(d.body().to_vec());
            }
            seen.len()
        })
    };
    let sends = producers.iter().enumerate().map(|(i, p)| async move {
        for j in 0..5 {
            p.send(Message::new("load", format!("{i}-{j}")))
                .await
                .expect("send on one of 1000 connections");
        }
    });
    futures::future::join_all(sends).await;
    assert_eq!(consume.await.unwrap(), 5000);
    let rss_busy = b.memory_kb("VmRSS").unwrap_or(0);
    let hwm = b.memory_kb("VmHWM").unwrap_or(0);
    eprintln!(
        "1000 connections: broker VmRSS {rss_before} kB at start, {rss_idle} kB with 1000 idle \
         connections, {rss_busy} kB after 5000 sends and acks; VmHWM {hwm} kB"
    );
    // Memory per connection: a debug build measured ~23 kB idle; 200 kB would mean a
    // per-connection buffer that grows (the frame decoder once reserved 16 MiB each).
    assert!(rss_before > 0 && rss_idle > 0, "no memory readings");
    let per_connection_kb = rss_idle.saturating_sub(rss_before) / 1000;
    assert!(
        per_connection_kb < 200,
        "{per_connection_kb} kB of broker memory per idle connection"
    );
    // Every connection is still usable.
    for p in producers.iter().step_by(97) {
        p.send(Message::new("load", "still here")).await.unwrap();
    }
}

/// A small tmpfs mounted for one test and unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn resize(&self, size: &str) {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .output()
            .expect("run mount");
        assert!(out.status.success(), "{out:?}");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn big_body(i: u32) -> Vec<u8> {
    let mut body = format!("{i:08}").into_bytes();
    body.resize(256 * 1024, (i % 251) as u8);
    body
}

/// Disk full: sends get STORAGE_ERROR replies, the broker stays up (it reopens its
/// storage, refusing with the reason meanwhile), and once space returns it accepts writes
/// again; after a kill -9 every acknowledged message is there, once, intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gives_errors_then_recovers() {
    let disk = SmallDisk::mount("96m");
    // Watermarks off: this is about the write that finds no space.
    let mut b = TestBroker::start_in(
        Some(disk.dir.path().join("data")),
        &["--disk-high-watermark", "1", "--disk-low-watermark", "1"],
    );
    let p = producer(&b).await;
    let mut acked = Vec::new();
    let mut refusal = None;
    for i in 0..2000u32 {
        match p.send(Message::new("t", big_body(i))).await {
            Ok(_) => acked.push(i),
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    let err = refusal.expect("a 96 MiB disk fills before 500 MiB were written");
    assert_eq!(err.code(), Some(ErrorCode::StorageError), "{err}");
    assert!(err.to_string().contains("No space left"), "{err}");
    assert!(b.is_running(), "the broker died on a full disk");
    // The broker reopens its storage after the failure and refuses meanwhile. Recovery
    // may itself free space (it flushes the recovered log into compressed tables), so a
    // send now may be refused or stored; either way its answer is the truth.
    match p.send(Message::new("t", big_body(99_999))).await {
        Ok(_) => acked.push(99_999),
        // Refused with the reason, or cut off while the broker closes its connections to
        // reopen storage.
        Err(err) => assert!(
            matches!(err.code(), Some(ErrorCode::StorageError) | None),
            "{err}"
        ),
    }
    disk.resize("512m");
    let first = acked.len() as u32 + 100_000;
    let resumed = eventually(Duration::from_secs(60), || async {
        p.send(Message::new("t", big_body(first))).await.ok()
    })
    .await;
    assert!(
        resumed.is_some(),
        "writes did not resume once space returned"
    );
    // Nothing refused moved the log.
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let next_offset = admin.topics().await.unwrap()[0].next_offset;
    assert_eq!(
        next_offset,
        acked.len() as u64 + 1,
        "a refused write moved the log"
    );
    acked.push(first);
    for i in first + 1..first + 10 {
        p.send(Message::new("t", big_body(i))).await.unwrap();
        acked.push(i);
    }

    b.kill9();
    b.start_again();
    let stored = drain(&b, "audit", "t", Duration::from_secs(3)).await;
    for body in &stored {
        let i: u32 = std::str::from_utf8(&body[..8]).unwrap().parse().unwrap();
        assert_eq!(body, &big_body(i), "message {i} is corrupt");
    }
    let ids: Vec<u32> = stored
        .iter()
        .map(|b| std::str::from_utf8(&b[..8]).unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        ids, acked,
        "acknowledged messages lost, duplicated or reordered"
    );
}

/// Issue 13, item 14: a broker with a frame limit above the default. The clients adopt
/// the limit from the handshake, so an 18 MiB message that the broker accepts is also sent
/// by the producer and delivered to the consumer (the client used to keep 16 MiB: the send
/// failed, or every delivery dropped the consumer's connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_use_the_frame_limit_the_broker_announces() {
    let b = TestBroker::start(&[
        "--max-frame-len",
        "67108864",
        "--max-message-bytes",
        "25165824",
    ]);
    let p = producer(&b).await;
    let body: Vec<u8> = (0..18 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    p.send(Message::new("big", body.clone()))
        .await
        .expect("send 18 MiB");
    let got = drain(&b, "g", "big", Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert!(got[0] == body, "the body changed on the way");
}

/// Issue 13, item 12: an ack whose write fails (disk full) changes nothing. Before, the
/// queue marked the message acked in memory first, so the client's retry was answered OK
/// ("repeated") although nothing was stored. Now neither the ack nor its retry is
/// answered OK, the broker reloads what the group has on disk, and the message comes back
/// once space returns; acked then, it stays acked across a kill -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_that_cannot_be_written_changes_nothing() {
    let disk = SmallDisk::mount("96m");
    // No high-water mark: the sends fill the disk until a write fails (which is sticky),
    // rather than stop at DISK_FULL with room left that the ack's write could still use.
    let mut b = TestBroker::start_on_fixed_port_in(
        Some(disk.dir.path().join("data")),
        &["--disk-high-watermark", "1"],
    );
    let p = producer(&b).await;
    p.send(Message::new("acks", "first")).await.unwrap();
    let options = ConsumerOptions {
        lease: Some(Duration::from_secs(600)),
        ..ConsumerOptions::new("g", "acks")
    };
    let mut c = Consumer::subscribe(b.addr(), options.clone())
        .await
        .unwrap();
    let d = next(&mut c, Duration::from_secs(10))
        .await
        .expect("delivery");
    // Fill the disk (and the write-ahead log's preallocated room) with big messages.
    let mut full = false;
    for i in 0..2000u32 {
        if p.send(Message::new("filler", big_body(i))).await.is_err() {
            full = true;
            break;
        }
    }
    assert!(full, "the disk never filled");
    // What is asserted is that neither the ack nor its retry is answered as done. The
    // broker reacts to the failed write by reopening its storage, so either may meet it
    // shutting down, or its connection closing (no code): each is "not done" as well.
    let not_done = |e: &txmq_client::Error| {
        matches!(
            e.code(),
            Some(ErrorCode::StorageError | ErrorCode::LeaseNotFound | ErrorCode::ShuttingDown)
                | None
        )
    };
    let e = d.ack().await.expect_err("an ack was stored on a full disk");
    assert!(not_done(&e), "{e}");
    let e = d
        .ack()
        .await
        .expect_err("a retried ack was answered as done");
    assert!(not_done(&e), "{e}");
    drop((d, c));

    disk.resize("512m");
    // The group did not lose the message: it comes back, and this time the ack holds.
    let mut c = eventually(Duration::from_secs(60), || async {
        Consumer::subscribe(b.addr(), options.clone()).await.ok()
    })
    .await
    .expect("the broker never took consumers again");
    let again = next(&mut c, Duration::from_secs(30))
        .await
        .expect("the message whose ack failed never came back");
    assert_eq!(again.body().as_ref(), b"first");
    again.ack().await.expect("the ack of the redelivery holds");
    drop((again, c));
    b.kill9();
    b.start_again();
    let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new("g", "acks"))
        .await
        .unwrap();
    assert!(
        next(&mut c, Duration::from_secs(2)).await.is_none(),
        "an acknowledged message came back"
    );
}

/// Issue 13, item 7, where it shows for certain: the disk hangs (`txmq-lazyfs` stalls
/// fsync, and every write behind it), so nothing is stored or answered. A broker that
/// budgets bytes stops reading a connection once 64 MiB of its requests wait, and the
/// sender feels it as backpressure; one that counts requests reads on (up to 4,096 of
/// 15 MiB) into memory. Once the disk answers again, every send that went out is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_disk_stops_the_broker_reading_before_its_memory_grows() {
    let fs = LazyFs::mount();
    let b = TestBroker::start_in(
        Some(fs.path().join("data")),
        &["--max-message-bytes", "15794176"],
    );
    let mut framed = raw_hello(b.addr(), "").await;
    let body = bytes::Bytes::from(vec![0u8; 15 << 20]);
    let send = |id: u64| Frame {
        id,
        body: Some(Body::Send(pb::SendRequest {
            messages: vec![pb::Message {
                topic: "big".into(),
                body: body.clone(),
                ..Default::default()
            }],
            ..Default::default()
        })),
    };
    // One stored first, so the topic exists and the next fsync is the one that hangs.
    framed.send(send(2)).await.unwrap();
    let first = framed.next().await.unwrap().unwrap();
    assert!(
        matches!(first.body, Some(Body::Response(ref r)) if r.code == 0),
        "{first:?}"
    );
    let stalled = fs.stall_fsync();
    // 64 MiB in flight is 4 or 5 of these; the broker's codec buffer and the two kernel
    // socket buffers (a few MiB each on loopback) hold about one more.
    const MOST: u64 = 10;
    let mut sent = 0;
    let mut held = false;
    for id in 3..3 + 3 * MOST {
        let fed = tokio::time::timeout(Duration::from_secs(5), framed.send(send(id))).await;
        match fed {
            Ok(Ok(())) => sent += 1,
            Ok(Err(e)) => panic!("connection broken after {sent} sends: {e}"),
            Err(_) => {
                held = true;
                break;
            }
        }
    }
    assert!(
        held && sent <= MOST,
        "the broker read {sent} sends of 15 MiB while its disk hung (at most {MOST} fit its \
         budget); held back: {held}"
    );
    drop(stalled);
    // The frame cut off by the backpressure goes out whole now, and every send is stored.
    tokio::time::timeout(Duration::from_secs(60), framed.flush())
        .await
        .expect("the broker never read on")
        .unwrap();
    for _ in 0..=sent {
        let answer = tokio::time::timeout(Duration::from_secs(60), framed.next())
            .await
            .expect("an answer never came")
            .unwrap()
            .unwrap();
        let Some(Body::Response(r)) = answer.body else {
            panic!("{answer:?}")
        };
        assert_eq!(r.code, 0, "{r:?}");
    }
    eprintln!("{sent} sends of 15 MiB went out while the disk hung, then backpressure");
    drop(framed);
    drop(b);
}

/// Issue 13, item 7: in-flight limits count bytes, not only requests. One connection
/// pipelines sends of 15 MiB without reading a single answer (300 in CI;
/// `TXMQ_PIPELINE_SENDS=2000` for the full run, about a minute here); the broker keeps
/// reading only as fast as it stores (per-connection and broker-wide byte budgets, a byte
/// cap per write batch), stays up, and its memory stays bounded. (The limits counted
/// requests: 4,096 of 15 MiB each may wait per connection.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_large_sends_are_held_to_a_byte_budget() {
    // On the real disk with fsync: the writer is far slower than loopback, which is
    // when requests pile up in a broker that counts them instead of their bytes.
    let b = TestBroker::start(&["--max-message-bytes", "15794176"]);
    let pid = b.pid();
    let rss_kb = move || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let framed = raw_hello(b.addr(), "").await;
    let (mut sink, stream) = framed.split();
    let body = bytes::Bytes::from(vec![0u8; 15 << 20]);
    // What the budgets allow: 64 MiB in flight on this connection, a 64 MiB write batch,
    // 128 MiB of memtables, two 16 MiB frame buffers, and the broker's ~250 MiB besides
    // (measured: 414-441 MiB; the broker of f40acd7 reached 648 MiB after 300 sends and
    // 783 MiB after 1,000, growing). The load stops at the bound, so the machine survives
    // a broker without budgets.
    const LIMIT_KB: u64 = 600 << 10;
    let mut peak = 0;
    let mut sent = 0u64;
    let total: u64 = std::env::var("TXMQ_PIPELINE_SENDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    for i in 0..total {
        let req = pb::SendRequest {
            messages: vec![pb::Message {
                topic: "big".into(),
                body: body.clone(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let fed = tokio::time::timeout(
            Duration::from_secs(60),
            sink.send(Frame {
                id: 2 + i,
                body: Some(Body::Send(req)),
            }),
        )
        .await;
        peak = peak.max(rss_kb());
        if peak > LIMIT_KB {
            break;
        }
        match fed {
            Ok(Ok(())) => sent += 1,
            // The broker stopped reading us for a minute: backpressure, as it should be.
            Err(_) => break,
            Ok(Err(e)) => panic!("connection broken after {sent} sends: {e}"),
        }
    }
    assert!(
        peak <= LIMIT_KB,
        "broker RSS reached {} MiB after {sent} pipelined 15 MiB sends",
        peak >> 10
    );
    let mut b = b;
    assert!(b.is_running(), "the broker died");
    eprintln!(
        "{sent} sends of 15 MiB pipelined without reading answers: broker peak RSS {} MiB",
        peak >> 10
    );
    drop((sink, stream));
    // Still serving others.
    let p = producer(&b).await;
    p.send(Message::new("t", "after")).await.unwrap();
}

/// Issue 15, item 2: above the high-water mark of disk use new messages (sends and
/// prepares) are refused with DISK_FULL and a sentence, while a commit, a rollback and
/// an ack of what is stored still work; below the low-water mark sends are taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_high_water_mark_only_new_messages_are_refused() {
    use txmq_client::Outcome;
    let disk = SmallDisk::mount("64m");
    let b = TestBroker::start_in(
        Some(disk.dir.path().join("data")),
        &[
            "--disk-high-watermark",
            "0.6",
            "--disk-low-watermark",
            "0.4",
        ],
    );
    let p = producer(&b).await;
    p.send(Message::new("t", "before")).await.unwrap();
    let options = ProducerOptions::transactional("shop", |_req| async { Outcome::Unknown });
    let tp = Producer::connect(b.addr(), options).await.unwrap();
    let mut txn = tp.begin().unwrap();
    txn.send(Message::new("t", "prepared")).await.unwrap();
    let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new("g", "t"))
        .await
        .unwrap();
    let d = next(&mut c, Duration::from_secs(20)).await.expect("before");

    // Another tenant of the file system takes it to about 75 %.
    let filler = disk.dir.path().join("filler");
    std::fs::write(&filler, vec![1u8; 48 << 20]).unwrap();
    let refused = eventually(Duration::from_secs(20), || async {
        p.send(Message::new("t", "new")).await.err()
    })
    .await
    .expect("sends were still taken above the high-water mark");
    assert_eq!(refused.code(), Some(ErrorCode::DiskFull), "{refused}");
    assert!(refused.to_string().contains("high-water mark"), "{refused}");
    let mut other = tp.begin().unwrap();
    let e = other
        .send(Message::new("t", "another prepare"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::DiskFull), "{e}");
    // What is stored can still be resolved and settled.
    txn.commit().await.unwrap();
    d.ack().await.unwrap();
    // (Sends of "new" taken before the watermark was seen come first.)
    loop {
        let m = next(&mut c, Duration::from_secs(20))
            .await
            .expect("the commit");
        m.ack().await.unwrap();
        if m.body().as_ref() == b"prepared" {
            break;
        }
        assert_eq!(m.body().as_ref(), b"new");
    }

    std::fs::remove_file(&filler).unwrap();
    let resumed = eventually(Duration::from_secs(20), || async {
        p.send(Message::new("t", "after")).await.ok()
    })
    .await;
    assert!(
        resumed.is_some(),
        "sends were not taken again below the low-water mark"
    );
}

/// Issue 26, item 7: topics are capped (`--max-topics`; each costs memory, keys and
/// metric series for ever). A send to a new topic and an operator's `topic create` past
/// the cap are refused with LIMIT_REACHED, naming the setting, and counted; sends to the
/// existing topics go on; deleting a topic makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_past_the_cap_are_refused() {
    let b = TestBroker::start(&["--max-topics", "3", "--metrics-listen", "127.0.0.1:0"]);
    let p = producer(&b).await;
    for t in ["a", "b", "c"] {
        p.send(Message::new(t, "m")).await.unwrap();
    }
    let refused = p.send(Message::new("d", "m")).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::LimitReached), "{refused}");
    assert!(refused.to_string().contains("max-topics"), "{refused}");
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let refused = admin.create_topic("e", false).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::LimitReached), "{refused}");
    p.send(Message::new("a", "still")).await.unwrap();
    let names: Vec<String> = admin
        .topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    let (_, metrics) = txmq_tests::http_get(b.metrics_addr(), "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains("txmq_limit_refusals_total{limit=\"topics\"} 2"),
        "{metrics}"
    );
    admin.delete_topic("c", true).await.unwrap();
    p.send(Message::new("d", "room again")).await.unwrap();
}

/// Issue 26, item 7: one connection holds at most `--max-subscriptions-per-connection`
/// subscriptions (each a consumer with its own window in a queue): one more is refused
/// with LIMIT_REACHED, naming the setting; after an unsubscribe there is room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_past_the_cap_are_refused() {
    let b = TestBroker::start(&["--max-subscriptions-per-connection", "2"]);
    let mut raw = raw_hello(b.addr(), "").await;
    let subscribe = |n: u64| {
        Body::Subscribe(pb::SubscribeRequest {
            group: format!("g{n}"),
            topic: "t".into(),
            ..Default::default()
        })
    };
    let mut ids = Vec::new();
    for n in 1..=2 {
        let r = txmq_tests::raw_call(&mut raw, 10 + n, subscribe(n)).await;
        match r.result {
            Some(pb::response::Result::Subscribe(ok)) => ids.push(ok.subscription_id),
            other => panic!("subscription {n} refused: {other:?} {}", r.message),
        }
    }
    let r = txmq_tests::raw_call(&mut raw, 13, subscribe(3)).await;
    assert_eq!(r.code, ErrorCode::LimitReached as i32, "{r:?}");
    assert!(
        r.message.contains("max-subscriptions-per-connection"),
        "{r:?}"
    );
    let r = txmq_tests::raw_call(
        &mut raw,
        14,
        Body::Unsubscribe(pb::UnsubscribeRequest {
            subscription_id: ids[0],
        }),
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    let r = txmq_tests::raw_call(&mut raw, 15, subscribe(3)).await;
    assert_eq!(r.code, 0, "room again after an unsubscribe: {r:?}");
}

/// Issue 26, item 7: consumer queues and groups are capped (each runs a task with its
/// memory and metric series): past `--max-groups` a new group's subscription, and past
/// `--max-queues` a new (group, topic) queue, is refused with `LIMIT_REACHED` naming the
/// setting, counted in `txmq_limit_refusals_total`; what runs keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_and_groups_are_capped() {
    let b = TestBroker::start(&[
        "--max-groups",
        "2",
        "--max-queues",
        "3",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let subscribe = |group: &str, topic: &str| {
        Consumer::subscribe(b.addr(), ConsumerOptions::new(group, topic))
    };
    let mut held = vec![
        subscribe("g1", "t1").await.unwrap(),
        subscribe("g2", "t1").await.unwrap(),
    ];
    let err = subscribe("g3", "t1").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::LimitReached), "{err}");
    assert!(err.to_string().contains("max-groups"), "{err}");
    held.push(subscribe("g1", "t2").await.unwrap());
    let err = subscribe("g1", "t3").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::LimitReached), "{err}");
    assert!(err.to_string().contains("max-queues"), "{err}");
    let (_, metrics) = txmq_tests::http_get(b.metrics_addr(), "/metrics")
        .await
        .unwrap();
    for cap in ["groups", "queues"] {
        assert!(
            metrics.contains(&format!("txmq_limit_refusals_total{{limit=\"{cap}\"}} 1")),
            "no refusal counted for {cap}:\n{metrics}"
        );
    }
    // What runs still serves.
    producer(&b)
        .await
        .send(Message::new("t1", "m"))
        .await
        .unwrap();
    let d = next(&mut held[0], Duration::from_secs(10))
        .await
        .expect("a delivery");
    assert_eq!(d.body().as_ref(), b"m");
}
