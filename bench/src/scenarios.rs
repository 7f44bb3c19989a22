//! The workloads. Every loop is bounded by `--messages`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use txmq_client::{Consumer, ConsumerOptions, Message, Outcome, Producer, ProducerOptions};

use crate::{Args, Report, Scenario};

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A payload of `size` bytes whose first 8 carry the send time (µs), for e2e latency.
pub(crate) fn payload(size: usize, stamp: bool) -> Bytes {
    let mut b = vec![b'x'; size.max(8)];
    if stamp {
        b[..8].copy_from_slice(&now_us().to_be_bytes());
    }
    b.truncate(size.max(8));
    Bytes::from(b)
}

/// Splits `total` over `parts` as evenly as possible.
pub(crate) fn share(total: u64, parts: usize, i: usize) -> u64 {
    let parts = parts as u64;
    total / parts + u64::from((i as u64) < total % parts)
}

/// Runs the chosen scenario.
pub async fn run(args: &Args, addr: &str) -> anyhow::Result<Report> {
    match args.scenario {
        Scenario::Send => send(args, addr, "bench-send", false, 0).await,
        Scenario::Txn => txn(args, addr).await,
        Scenario::E2e => e2e(args, addr, false).await,
        Scenario::Fifo => e2e(args, addr, true).await,
        Scenario::Backlog => backlog(args, addr).await,
        Scenario::Schedule => crate::schedule::schedule(args, addr).await,
        Scenario::Retention | Scenario::Failover => {
            anyhow::bail!("this scenario runs from main (it needs the broker)")
        }
    }
}

/// Sends `--messages` over the producers; with `groups` > 0, message k of a producer is
/// in message group `k % groups`.
pub(crate) async fn send(
    args: &Args,
    addr: &str,
    topic: &str,
    stamp: bool,
    groups: u64,
) -> anyhow::Result<Report> {
    let mut producers = Vec::new();
    for _ in 0..args.producers {
        producers.push(Producer::connect(addr, crate::access::producer()).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, p) in producers.into_iter().enumerate() {
        let n = share(args.messages, args.producers, i);
        let (size, window, topic) = (args.size, args.window.max(1), topic.to_string());
        let keyed = args.keyed;
        // Paced sends: message k of this producer is due at k / rate after the start.
        let interval = (args.rate > 0)
            .then(|| Duration::from_secs_f64(args.producers as f64 / args.rate as f64));
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut in_flight = FuturesUnordered::new();
            let mut sent: u64 = 0;
            let due = |k: u64| interval.map(|i| started + i.mul_f64(k as f64));
            while sent < n || !in_flight.is_empty() {
                let can_send = sent < n && in_flight.len() < window;
                let wait = due(sent).filter(|at| *at > Instant::now());
                if can_send && wait.is_none() {
                    let p = p.clone();
                    let mut m = Message::new(topic.clone(), payload(size, stamp));
                    if groups > 0 {
                        m = m.group(format!("g{}", sent % groups));
                    }
                    if keyed {
                        m = m.key(format!("order-{i}-{sent}"));
                    }
                    in_flight.push(async move {
                        let t = Instant::now();
                        p.send(m).await.map(|_| t.elapsed())
                    });
                    sent += 1;
                    continue;
                }
                let sleep = async {
                    match wait {
                        Some(at) if can_send => tokio::time::sleep_until(at.into()).await,
                        _ => std::future::pending().await,
                    }
                };
                tokio::select! {
                    Some(r) = in_flight.next(), if !in_flight.is_empty() => {
                        hist.saturating_record(r?.as_micros() as u64);
                    }
                    () = sleep => {}
                }
            }
            anyhow::Ok(hist)
        }));
    }
    let latency = merged(tasks).await?;
    Ok(Report {
        done: args.messages,
        elapsed: started.elapsed(),
        latency,
        latency_of: "send until durable reply",
        extra: Default::default(),
    })
}

async fn txn(args: &Args, addr: &str) -> anyhow::Result<Report> {
    let mut producers = Vec::new();
    for _ in 0..args.producers {
        // The checker is never needed here (every transaction is committed at once); it
        // answers Commit so a slow run cannot leave anything half-done.
        let options =
            crate::access::transactional(ProducerOptions::transactional("bench", |_| async {
                Outcome::Commit
            }));
        producers.push(Producer::connect(addr, options).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, p) in producers.into_iter().enumerate() {
        let n = share(args.messages, args.producers, i);
        let (size, window, keyed) = (args.size, args.window.max(1), args.keyed);
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut in_flight = FuturesUnordered::new();
            let mut started_txns = 0;
            while started_txns < n || !in_flight.is_empty() {
                while started_txns < n && in_flight.len() < window {
                    let p = p.clone();
                    let key = keyed.then(|| format!("order-{i}-{started_txns}"));
                    in_flight.push(async move {
                        let t = Instant::now();
                        let mut m = Message::new("bench-txn", payload(size, false));
                        if let Some(key) = key {
                            m = m.key(key);
                        }
                        let (outcome, _) = p
                            .send_in_transaction(vec![m], |_id| async { Outcome::Commit })
                            .await?;
                        anyhow::ensure!(outcome == Outcome::Commit);
                        anyhow::Ok(t.elapsed())
                    });
                    started_txns += 1;
                }
                if let Some(r) = in_flight.next().await {
                    hist.saturating_record(r?.as_micros() as u64);
                }
            }
            anyhow::Ok(hist)
        }));
    }
    let latency = merged(tasks).await?;
    Ok(Report {
        done: args.messages,
        elapsed: started.elapsed(),
        latency,
        latency_of: "half message + commit, until the commit is durable",
        extra: Default::default(),
    })
}

/// Producers and consumers at once; `ordered`: an ordered group, the messages spread over
/// `--message-groups` message groups.
async fn e2e(args: &Args, addr: &str, ordered: bool) -> anyhow::Result<Report> {
    let topic = if ordered { "bench-fifo" } else { "bench-e2e" };
    let received = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for _ in 0..args.consumers {
        let options = crate::access::consumer(ConsumerOptions {
            window: args.window as u32,
            ..ConsumerOptions::new("bench", topic).ordered(ordered)
        });
        consumers.push(Consumer::subscribe(addr, options).await?);
    }
    let total = args.messages;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut c in consumers {
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut acks = FuturesUnordered::new();
            while received.load(Ordering::Relaxed) < total {
                tokio::select! {
                    Some(r) = acks.next(), if !acks.is_empty() => { let _: () = r?; }
                    d = tokio::time::timeout(Duration::from_secs(30), c.next()) => {
                        let Ok(Some(d)) = d else { anyhow::bail!("consumer stalled") };
                        let d = d?;
                        let sent = u64::from_be_bytes(d.body()[..8].try_into()?);
                        hist.saturating_record(now_us().saturating_sub(sent));
                        received.fetch_add(1, Ordering::Relaxed);
                        acks.push(async move { d.ack().await.map_err(anyhow::Error::from) });
                    }
                }
            }
            while let Some(r) = acks.next().await {
                r?;
            }
            anyhow::Ok(hist)
        }));
    }
    let groups = if ordered { args.message_groups } else { 0 };
    send(args, addr, topic, true, groups).await?;
    let latency = merged(tasks).await?;
    let mut extra = serde_json::Map::new();
    if ordered {
        extra.insert("message_groups".into(), serde_json::json!(groups));
    }
    Ok(Report {
        done: total,
        elapsed: started.elapsed(),
        latency,
        latency_of: "send until delivered to a consumer",
        extra,
    })
}

/// Consumes `n` messages of `topic` as a new group, acking each; returns msgs/s.
async fn consume(args: &Args, addr: &str, topic: &str, n: u64) -> anyhow::Result<f64> {
    let options = ConsumerOptions {
        window: args.window as u32,
        ..ConsumerOptions::new(format!("{topic}-readers"), topic)
    };
    let mut c = Consumer::subscribe(addr, options).await?;
    let started = Instant::now();
    let mut acks = FuturesUnordered::new();
    let mut received = 0;
    while received < n {
        tokio::select! {
            Some(r) = acks.next(), if !acks.is_empty() => { let _: () = r?; }
            d = tokio::time::timeout(Duration::from_secs(30), c.next()) => {
                let Ok(Some(d)) = d else { anyhow::bail!("consumer stalled at {received}") };
                let d = d?;
                received += 1;
                acks.push(async move { d.ack().await.map_err(anyhow::Error::from) });
            }
        }
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Stores `n` messages fast (batches of 256, 16 batches in flight).
async fn fill(addr: &str, topic: &str, n: u64, size: usize) -> anyhow::Result<()> {
    const BATCH: u64 = 256;
    let p = Producer::connect(addr, ProducerOptions::default()).await?;
    let body = payload(size, false);
    windowed(n.div_ceil(BATCH), 16, |k| {
        let messages = (0..(n - k * BATCH).min(BATCH))
            .map(|_| Message::new(topic, body.clone()))
            .collect();
        let p = p.clone();
        async move { p.send_batch(messages).await.map(drop) }
    })
    .await
}

/// Leaves `n` transactions prepared (one half message each), never checked during the run.
async fn prepare(addr: &str, n: u64, size: usize, window: usize) -> anyhow::Result<()> {
    let options = ProducerOptions::transactional("bench-backlog", |_| async { Outcome::Unknown });
    let p = Producer::connect(addr, options).await?;
    let body = payload(size, false);
    windowed(n, window, |_| {
        let txn = p.begin();
        let m = Message::new("bench-backlog-halves", body.clone());
        async move {
            let mut txn = txn?;
            txn.check_after(Duration::from_secs(24 * 3600));
            txn.send(m).await.map(drop)
        }
    })
    .await
}

/// Runs `n` operations, `op(k)` starting the k-th, with at most `window` in flight.
pub(crate) async fn windowed<F, Fut>(n: u64, window: usize, mut op: F) -> anyhow::Result<()>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = txmq_client::Result<()>>,
{
    let mut in_flight = FuturesUnordered::new();
    let mut started = 0;
    while started < n || !in_flight.is_empty() {
        while started < n && in_flight.len() < window {
            in_flight.push(op(started));
            started += 1;
        }
        if let Some(r) = in_flight.next().await {
            r?;
        }
    }
    Ok(())
}

/// The latencies of every producer or consumer task, in one histogram.
pub(crate) async fn merged(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Histogram<u64>>>>,
) -> anyhow::Result<Histogram<u64>> {
    let mut latency = histogram();
    for t in tasks {
        latency.add(t.await??)?;
    }
    Ok(latency)
}

/// Send and consume on the empty broker; fill; send and consume again. The headline
/// figures are the second send's; the ratios compare before and after.
async fn backlog(args: &Args, addr: &str) -> anyhow::Result<Report> {
    let before = send(args, addr, "bench-backlog-before", false, 0).await?;
    let consume_before = consume(args, addr, "bench-backlog-before", args.messages).await?;
    let filling = Instant::now();
    fill(addr, "bench-backlog-fill", args.backlog, args.size).await?;
    prepare(addr, args.prepared, args.size, args.window.max(1)).await?;
    let fill_secs = filling.elapsed().as_secs_f64();
    let after = send(args, addr, "bench-backlog-after", false, 0).await?;
    let consume_after = consume(args, addr, "bench-backlog-after", args.messages).await?;
    let rate = |r: &Report| r.done as f64 / r.elapsed.as_secs_f64();
    let (send_before, send_after) = (rate(&before), rate(&after));
    let mut extra = serde_json::Map::new();
    for (k, v) in [
        ("backlog", serde_json::json!(args.backlog)),
        ("prepared", serde_json::json!(args.prepared)),
        ("fill_secs", serde_json::json!(fill_secs)),
        ("empty_send_msgs_per_sec", serde_json::json!(send_before)),
        (
            "empty_send_p99_us",
            serde_json::json!(before.latency.value_at_quantile(0.99)),
        ),
        (
            "empty_consume_msgs_per_sec",
            serde_json::json!(consume_before),
        ),
        (
            "backlog_consume_msgs_per_sec",
            serde_json::json!(consume_after),
        ),
        ("send_ratio", serde_json::json!(send_after / send_before)),
        (
            "consume_ratio",
            serde_json::json!(consume_after / consume_before),
        ),
    ] {
        extra.insert(k.into(), v);
    }
    Ok(Report {
        extra,
        latency_of: "send until durable reply, with the backlog stored",
        ..after
    })
}
