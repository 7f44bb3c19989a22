//! `schedule`: how fast scheduled messages are taken, and how late they arrive.
//!
//! First `--waiting` messages are scheduled a day ahead, as fast as the window allows:
//! that is the scheduled-send throughput, and the backlog the timer must not pay for.
//! Then `--messages` more are scheduled to fall due from two seconds on, spread at
//! `--rate` a second (10,000 when 0), and one consumer records how late each arrives: its
//! arrival (this machine's clock, the broker's too) minus its delivery time.

use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use txmq_client::{Consumer, ConsumerOptions, Message, Producer, ProducerOptions};

use crate::scenarios::{histogram, now_us, payload, windowed};
use crate::{Args, Report};

const TOPIC: &str = "bench-schedule";

pub async fn schedule(args: &Args, addr: &str) -> anyhow::Result<Report> {
    let p = Producer::connect(addr, ProducerOptions::default()).await?;
    let body = payload(args.size, false);
    let day = SystemTime::now() + Duration::from_secs(24 * 3600);
    let filling = Instant::now();
    windowed(args.waiting, args.window.max(1), |k| {
        let p = p.clone();
        let m = Message::new("bench-schedule-waiting", body.clone())
            .deliver_at(day + Duration::from_millis(k % 3_600_000));
        async move { p.send(m).await.map(drop) }
    })
    .await?;
    let fill_secs = filling.elapsed().as_secs_f64();

    let options = ConsumerOptions {
        window: args.window as u32,
        ..ConsumerOptions::new("bench", TOPIC)
    };
    let mut c = Consumer::subscribe(addr, options).await?;
    let rate = if args.rate > 0 { args.rate } else { 10_000 };
    let first = SystemTime::now() + Duration::from_secs(2);
    let started = Instant::now();
    windowed(args.messages, args.window.max(1), |k| {
        let p = p.clone();
        let at = first + Duration::from_secs_f64(k as f64 / rate as f64);
        let m = Message::new(TOPIC, body.clone()).deliver_at(at);
        async move { p.send(m).await.map(drop) }
    })
    .await?;
    let send_secs = started.elapsed().as_secs_f64();
    let mut lateness = histogram();
    let mut acks = FuturesUnordered::new();
    let mut received = 0;
    while received < args.messages {
        tokio::select! {
            Some(r) = acks.next(), if !acks.is_empty() => { let _: () = r?; }
            d = tokio::time::timeout(Duration::from_secs(30), c.next()) => {
                let Ok(Some(d)) = d else { anyhow::bail!("consumer stalled at {received}") };
                let d = d?;
                let due_us = d.deliver_ms() * 1000;
                anyhow::ensure!(d.message.store_ms >= d.deliver_ms(), "delivered early");
                lateness.saturating_record(now_us().saturating_sub(due_us).max(1));
                received += 1;
                acks.push(async move { d.ack().await.map_err(anyhow::Error::from) });
            }
        }
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    let mut extra = serde_json::Map::new();
    for (k, v) in [
        ("waiting", serde_json::json!(args.waiting)),
        (
            "scheduled_send_msgs_per_sec",
            serde_json::json!(args.waiting as f64 / fill_secs),
        ),
        ("due_rate_per_sec", serde_json::json!(rate)),
        (
            "measured_send_msgs_per_sec",
            serde_json::json!(args.messages as f64 / send_secs),
        ),
    ] {
        extra.insert(k.into(), v);
    }
    Ok(Report {
        done: args.messages,
        elapsed: started.elapsed(),
        latency: lateness,
        latency_of: "arrival at a consumer minus the scheduled time",
        extra,
    })
}
