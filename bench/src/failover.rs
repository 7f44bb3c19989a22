//! `failover`: how long a broker group's clients go without an acknowledged send when
//! the leader dies (issue 17), measured from the clients' side.
//!
//! The bench starts a group (`--group`, at least 3), and `--producers` producers send
//! paced messages (`--rate` a second over all, 1,000 when 0) through the group's
//! addresses. After 3 s, the leader is killed with SIGKILL; a send that fails is retried
//! (the producer reconnects and finds the new leader on its own). The gap is the time
//! from the kill to the first send the new leader acknowledges. The killed node starts
//! again and catches up; 3 s later the next leader is killed, `--kills` times.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use txmq_client::{Message, Producer, ProducerOptions};

use crate::broker::Broker;
use crate::{Args, Report};

const TOPIC: &str = "bench-failover";

/// Runs the kills against `broker` (a group the bench started).
pub async fn failover(args: &Args, broker: &mut Broker) -> anyhow::Result<Report> {
    anyhow::ensure!(args.group >= 3, "failover needs --group 3 (or more)");
    let rate = if args.rate == 0 { 1000 } else { args.rate };
    let oks: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let latency = Arc::new(Mutex::new(hdrhistogram::Histogram::<u64>::new(3)?));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.producers {
        let p = Producer::connect(broker.addr(), ProducerOptions::default()).await?;
        let (oks, errors, stop, latency) =
            (oks.clone(), errors.clone(), stop.clone(), latency.clone());
        let every = Duration::from_secs_f64(args.producers as f64 / rate as f64);
        let body = vec![b'x'; args.size];
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                seq += 1;
                loop {
                    let sent = Instant::now();
                    match p
                        .send(Message::new(TOPIC, body.clone()).key(format!("{w}-{seq}")))
                        .await
                    {
                        Ok(_) => {
                            let now = Instant::now();
                            let _ = latency
                                .lock()
                                .unwrap()
                                .record((now - sent).as_micros() as u64);
                            oks.lock().unwrap().push(now);
                            break;
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
        }));
    }
    let mut gaps = Vec::new();
    for _ in 0..args.kills {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let leader = broker.leader(Duration::from_secs(30)).await?;
        broker.kill(leader);
        let killed = Instant::now();
        let gap = loop {
            let first = oks
                .lock()
                .unwrap()
                .iter()
                .copied()
                .filter(|t| *t > killed)
                .min();
            if let Some(first) = first {
                break first - killed;
            }
            anyhow::ensure!(
                killed.elapsed() < Duration::from_secs(60),
                "no send acknowledged within 60 s of the kill"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        eprintln!(
            "killed node {}: sends acknowledged again after {gap:?}",
            leader + 1
        );
        gaps.push(gap);
        broker.restart(leader)?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    let done = oks.lock().unwrap().len() as u64;
    let ms: Vec<f64> = gaps.iter().map(|g| g.as_secs_f64() * 1e3).collect();
    let mut extra = serde_json::Map::new();
    extra.insert("kills".into(), serde_json::json!(args.kills));
    extra.insert(
        "gaps_ms".into(),
        serde_json::json!(ms.iter().map(|m| m.round()).collect::<Vec<_>>()),
    );
    extra.insert(
        "max_gap_ms".into(),
        serde_json::json!(ms.iter().copied().fold(0.0, f64::max).round()),
    );
    extra.insert(
        "mean_gap_ms".into(),
        serde_json::json!((ms.iter().sum::<f64>() / ms.len().max(1) as f64).round()),
    );
    extra.insert(
        "send_errors".into(),
        serde_json::json!(errors.load(Ordering::Relaxed)),
    );
    let latency = Arc::try_unwrap(latency)
        .map(|m| m.into_inner().unwrap())
        .unwrap_or_else(|l| l.lock().unwrap().clone());
    Ok(Report {
        done,
        elapsed: started.elapsed(),
        latency,
        latency_of: "send, acknowledged",
        extra,
    })
}
