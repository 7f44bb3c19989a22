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

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A payload of `size` bytes whose first 8 carry the send time (µs), for e2e latency.
fn payload(size: usize, stamp: bool) -> Bytes {
    let mut b = vec![b'x'; size.max(8)];
    if stamp {
        b[..8].copy_from_slice(&now_us().to_be_bytes());
    }
    b.truncate(size.max(8));
    Bytes::from(b)
}

/// Splits `total` over `parts` as evenly as possible.
fn share(total: u64, parts: usize, i: usize) -> u64 {
    let parts = parts as u64;
    total / parts + u64::from((i as u64) < total % parts)
}

/// Runs the chosen scenario.
pub async fn run(args: &Args, addr: &str) -> anyhow::Result<Report> {
    match args.scenario {
        Scenario::Send => send(args, addr, "bench-send", false).await,
        Scenario::Txn => txn(args, addr).await,
        Scenario::E2e => e2e(args, addr).await,
    }
}

async fn send(args: &Args, addr: &str, topic: &str, stamp: bool) -> anyhow::Result<Report> {
    let mut producers = Vec::new();
    for _ in 0..args.producers {
        producers.push(Producer::connect(addr, ProducerOptions::default()).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, p) in producers.into_iter().enumerate() {
        let n = share(args.messages, args.producers, i);
        let (size, window, topic) = (args.size, args.window.max(1), topic.to_string());
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut in_flight = FuturesUnordered::new();
            let mut sent = 0;
            while sent < n || !in_flight.is_empty() {
                while sent < n && in_flight.len() < window {
                    let p = p.clone();
                    let m = Message::new(topic.clone(), payload(size, stamp));
                    in_flight.push(async move {
                        let t = Instant::now();
                        p.send(m).await.map(|_| t.elapsed())
                    });
                    sent += 1;
                }
                if let Some(r) = in_flight.next().await {
                    hist.saturating_record(r?.as_micros() as u64);
                }
            }
            anyhow::Ok(hist)
        }));
    }
    let mut latency = histogram();
    for t in tasks {
        latency.add(t.await??)?;
    }
    Ok(Report {
        done: args.messages,
        elapsed: started.elapsed(),
        latency,
        latency_of: "send until durable reply",
    })
}

async fn txn(args: &Args, addr: &str) -> anyhow::Result<Report> {
    let mut producers = Vec::new();
    for _ in 0..args.producers {
        // The checker is never needed here (every transaction is committed at once); it
        // answers Commit so a slow run cannot leave anything half-done.
        let options = ProducerOptions::transactional("bench", |_| async { Outcome::Commit });
        producers.push(Producer::connect(addr, options).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, p) in producers.into_iter().enumerate() {
        let n = share(args.messages, args.producers, i);
        let (size, window) = (args.size, args.window.max(1));
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut in_flight = FuturesUnordered::new();
            let mut started_txns = 0;
            while started_txns < n || !in_flight.is_empty() {
                while started_txns < n && in_flight.len() < window {
                    let p = p.clone();
                    in_flight.push(async move {
                        let t = Instant::now();
                        let m = Message::new("bench-txn", payload(size, false));
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
    let mut latency = histogram();
    for t in tasks {
        latency.add(t.await??)?;
    }
    Ok(Report {
        done: args.messages,
        elapsed: started.elapsed(),
        latency,
        latency_of: "half message + commit, until the commit is durable",
    })
}

async fn e2e(args: &Args, addr: &str) -> anyhow::Result<Report> {
    let topic = "bench-e2e";
    let received = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for _ in 0..args.consumers {
        let options = ConsumerOptions {
            window: args.window as u32,
            ..ConsumerOptions::new("bench", topic)
        };
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
    send(args, addr, topic, true).await?;
    let mut latency = histogram();
    for t in tasks {
        latency.add(t.await??)?;
    }
    Ok(Report {
        done: total,
        elapsed: started.elapsed(),
        latency,
        latency_of: "send until delivered to a consumer",
    })
}
