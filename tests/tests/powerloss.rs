//! Power loss, not just a killed process (I3; issue 13, item 20). A kill -9 keeps the
//! operating system's page cache, so it cannot tell a missing fsync. Here the broker's
//! data directory lives on `txmq-lazyfs`, a FUSE filesystem that keeps written data in
//! memory until fsync and throws the unsynced part away on a "power cut". Under mixed
//! load (sends, transactions, acks) the broker is killed and the power cut at random
//! moments; after each restart everything that was acknowledged must be there.
//!
//! `TXMQ_POWERLOSS_CUTS` sets the number of cuts (CI: 5). The same check with
//! `--flush async` finds losses, which shows the test can see a missing fsync.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use txmq_client::{Consumer, ConsumerOptions, Message, Producer, ProducerOptions};
use txmq_tests::lazyfs::LazyFs;
use txmq_tests::{TestBroker, drain, eventually, free_port, http_get, next, producer};

/// What clients were told, during one round of load.
#[derive(Default)]
struct Told {
    /// Bodies of plain sends answered OK.
    sent: HashSet<String>,
    /// Bodies of transactional messages whose commit was answered OK.
    committed: HashSet<String>,
    /// Bodies whose ack was answered OK.
    acked: HashSet<String>,
}

/// Sends, transactions and acks on the round's topics, until the broker dies.
async fn load(b: &TestBroker, round: u32, told: Arc<Mutex<Told>>) {
    let plain = format!("plain-{round}");
    let orders = format!("orders-{round}");
    let p = producer(b).await;
    let t = Producer::connect(
        b.addr(),
        ProducerOptions::transactional("svc", |_req| async { txmq_client::Outcome::Rollback }),
    )
    .await
    .unwrap();
    let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new("workers", &plain))
        .await
        .unwrap();
    let sends = {
        let told = told.clone();
        async move {
            for i in 0.. {
                let body = format!("p{round}-{i}");
                if let Err(e) = p.send(Message::new(&plain, body.clone())).await {
                    eprintln!("sends stop: {e}");
                    return;
                }
                told.lock().unwrap().sent.insert(body);
            }
        }
    };
    let txns = {
        let told = told.clone();
        async move {
            for i in 0.. {
                let Ok(mut txn) = t.begin() else { return };
                let body = format!("o{round}-{i}");
                if let Err(e) = txn.send(Message::new(&orders, body.clone())).await {
                    eprintln!("transactions stop: {e}");
                    return;
                }
                if i % 3 == 2 {
                    if txn.rollback().await.is_err() {
                        return;
                    }
                } else {
                    if txn.commit().await.is_err() {
                        return;
                    }
                    told.lock().unwrap().committed.insert(body);
                }
            }
        }
    };
    let acks = {
        let told = told.clone();
        async move {
            while let Some(d) = next(&mut c, Duration::from_secs(5)).await {
                let body = String::from_utf8_lossy(d.body()).into_owned();
                if d.ack().await.is_err() {
                    return;
                }
                told.lock().unwrap().acked.insert(body);
            }
        }
    };
    tokio::join!(sends, txns, acks);
}

/// SIGKILL, then wait until every thread of the process is gone (a zombie), so no write
/// of it can still reach the filesystem after the power cut. Blocking on purpose: the
/// load polled in the same task must not see its connections break (and stop) before the
/// cut is complete.
fn kill_and_wait(pid: u32) {
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on our own child's pid has no memory-safety effects.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    for _ in 0..1000 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next());
        if matches!(state, None | Some("Z") | Some("X")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("the broker did not die");
}

/// Runs `cuts` rounds of load → kill -9 → power cut → restart → check, and returns what
/// was lost: acknowledged sends, committed messages, and acked messages that came back.
async fn cut_power_under_load(flush: &str, cuts: u32) -> (usize, usize, usize) {
    let fs = LazyFs::mount();
    let mut b = TestBroker::start_in(Some(fs.path().join("data")), &["--flush", flush]);
    let mut lost = (0, 0, 0);
    for round in 0..cuts {
        let told = Arc::new(Mutex::new(Told::default()));
        let pause = Duration::from_millis(rand::rng().random_range(300..1200));
        // The machine loses power in the middle of the load: the process dies, and so
        // does every write it made that was not fsynced.
        let pid = b.pid();
        let power_loss = async {
            tokio::time::sleep(pause).await;
            kill_and_wait(pid);
            fs.power_cut()
        };
        let dropped = tokio::select! {
            biased;
            dropped = power_loss => dropped,
            () = load(&b, round, told.clone()) => panic!("the load stopped before the power cut"),
        };
        b.kill9();
        b.start_again();

        let told = std::mem::take(&mut *told.lock().unwrap());
        let text = |v: Vec<Vec<u8>>| -> HashSet<String> {
            v.into_iter()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .collect()
        };
        let wait = Duration::from_secs(2);
        let stored = text(drain(&b, "audit", &format!("plain-{round}"), wait).await);
        let committed = text(drain(&b, "audit", &format!("orders-{round}"), wait).await);
        let again = text(drain(&b, "workers", &format!("plain-{round}"), wait).await);
        let lost_sends = told.sent.difference(&stored).count();
        let lost_commits = told.committed.difference(&committed).count();
        let came_back = told.acked.intersection(&again).count();
        eprintln!(
            "power cut {round} ({flush}): dropped {dropped} unsynced bytes; told sent={} committed={} acked={}; \
             lost sends={lost_sends} commits={lost_commits}, acked delivered again={came_back}",
            told.sent.len(),
            told.committed.len(),
            told.acked.len()
        );
        assert!(
            !told.sent.is_empty() && !told.committed.is_empty(),
            "round {round} acknowledged nothing: the load did not run"
        );
        lost.0 += lost_sends;
        lost.1 += lost_commits;
        lost.2 += came_back;
    }
    b.stop();
    lost
}

fn cuts() -> u32 {
    std::env::var("TXMQ_POWERLOSS_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// With `--flush sync` (the default), nothing acknowledged is lost at a power cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_at_a_power_cut() {
    let lost = cut_power_under_load("sync", cuts()).await;
    assert_eq!(
        lost,
        (0, 0, 0),
        "(acknowledged sends lost, committed messages lost, acked messages delivered again)"
    );
}

/// The same rounds with `--flush async` lose acknowledged writes: the filesystem really
/// throws unsynced data away, so the test above would see a missing fsync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_flush_loses_acknowledged_writes_and_the_test_sees_it() {
    let (sends, commits, _) = cut_power_under_load("async", 2).await;
    assert!(
        sends + commits > 0,
        "with --flush async a power cut lost nothing: the filesystem kept unsynced data"
    );
}

/// Issue 13, item 15: a failed fsync is sticky. Once a sync of the write-ahead log fails,
/// no later write is answered OK by that database (not even one that wrote nothing),
/// nothing answered with an error becomes visible, `/health` says why, and the broker
/// reopens its storage, recovers to what is on disk and takes writes again once fsync
/// works; nothing answered OK is lost, across a power cut too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_is_sticky_and_the_broker_recovers_to_the_disk() {
    let fs = LazyFs::mount();
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut b = TestBroker::start_in(
        Some(fs.path().join("data")),
        &["--metrics-listen", &metrics],
    );
    let p = producer(&b).await;
    let mut stored = Vec::new();
    for i in 0..50 {
        let body = format!("ok-{i}");
        p.send(Message::new("t", body.clone())).await.unwrap();
        stored.push(body);
    }
    fs.fail_fsync(true);
    for i in 0..5 {
        let e = p
            .send(Message::new("t", format!("refused-{i}")))
            .await
            .expect_err("a write was answered OK while fsync fails");
        // Refused with the reason, or cut off when the broker closed every connection to
        // reopen its storage (the request may not have been read): never OK.
        assert!(
            matches!(
                e,
                txmq_client::Error::Broker {
                    code: txmq_client::ErrorCode::StorageError,
                    ..
                } | txmq_client::Error::Disconnected(_)
            ),
            "{e:?}"
        );
    }
    let (status, body) = http_get(&metrics, "/health").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("storage_failed") || body.contains("recovering"),
        "{body}"
    );
    fs.fail_fsync(false);
    let resumed = eventually(Duration::from_secs(60), || async {
        p.send(Message::new("t", "ok-again".to_string())).await.ok()
    })
    .await;
    assert!(resumed.is_some(), "writes never resumed:\n{}", b.log_text());
    stored.push("ok-again".into());
    let (status, body) = http_get(&metrics, "/health").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let text = |v: Vec<Vec<u8>>| -> Vec<String> {
        v.into_iter()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect()
    };
    let got = text(drain(&b, "audit", "t", Duration::from_secs(2)).await);
    assert_eq!(
        got, stored,
        "a refused write became visible, or an OK one is missing"
    );
    assert!(b.log_text().contains("storage failed"));

    b.kill9();
    fs.power_cut();
    b.start_again();
    let got = text(drain(&b, "audit2", "t", Duration::from_secs(2)).await);
    assert_eq!(got, stored, "after a power cut");
}
