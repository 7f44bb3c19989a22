//! Issue 14, item 10: a property test of ordered groups. Random sends over many message
//! groups; two ordered consumers that randomly ack, nack (with a short delay), let a lease
//! expire, or crash (and a new one takes their place); the broker killed -9 once midway.
//! Whatever happens, each message group's messages reach the group in order with no gap:
//! every delivery is of its group's head — the first message not yet acked — and a
//! message acked (answered OK, so durable) never comes again.
//!
//! `TXMQ_FIFO_MESSAGES` (300 in CI) and `TXMQ_FIFO_SEED` (random, printed) steer it.

use std::collections::HashMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use txmq_client::{Consumer, ConsumerOptions, Delivery, Message};
use txmq_tests::{TestBroker, next, producer};

const GROUPS: usize = 12;

fn options() -> ConsumerOptions {
    ConsumerOptions {
        lease: Some(Duration::from_millis(400)),
        max_attempts: 1000,
        window: 8,
        ..ConsumerOptions::new("o", "t").ordered(true)
    }
}

fn parse(d: &Delivery) -> (usize, usize) {
    let text = String::from_utf8_lossy(d.body()).into_owned();
    let (g, k) = text.split_once(':').expect("g:k");
    (g.parse().unwrap(), k.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_group_in_order_without_gaps_whatever_happens() {
    let total: usize = std::env::var("TXMQ_FIFO_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let seed: u64 = std::env::var("TXMQ_FIFO_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fifo property: {total} messages, TXMQ_FIFO_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let mut b = TestBroker::start_on_fixed_port(&[]);
    // The messages, each of a random group, numbered within its group.
    let mut count = [0usize; GROUPS];
    let messages: Vec<(usize, usize)> = (0..total)
        .map(|_| {
            let g = rng.random_range(0..GROUPS);
            count[g] += 1;
            (g, count[g] - 1)
        })
        .collect();
    let batch = |from: usize, to: usize| -> Vec<Message> {
        messages[from..to]
            .iter()
            .map(|(g, k)| Message::new("t", format!("{g}:{k}")).group(g.to_string()))
            .collect()
    };
    send(&b, batch(0, total / 2)).await;

    // The index of each group's head: the first message not yet acked.
    let mut head = [0usize; GROUPS];
    let mut consumers = vec![
        Consumer::subscribe(b.addr(), options()).await.unwrap(),
        Consumer::subscribe(b.addr(), options()).await.unwrap(),
    ];
    let mut held: Vec<Delivery> = Vec::new();
    let mut sent_rest = false;
    let mut killed = false;
    let mut events: HashMap<&str, u32> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    while head.iter().zip(&count).any(|(h, c)| h < c) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stuck at heads {head:?} of {count:?} (TXMQ_FIFO_SEED={seed})"
        );
        let acked: usize = head.iter().sum();
        if !sent_rest && acked >= total / 4 {
            send(&b, batch(total / 2, total)).await;
            sent_rest = true;
        }
        if !killed && acked >= total / 2 {
            // Acked is durable: none of it may come back after a kill -9.
            held.clear();
            consumers.clear();
            b.kill9();
            b.start_again();
            for _ in 0..2 {
                consumers.push(Consumer::subscribe(b.addr(), options()).await.unwrap());
            }
            killed = true;
            *events.entry("broker killed").or_default() += 1;
        }
        let i = rng.random_range(0..consumers.len());
        let Some(d) = next(&mut consumers[i], Duration::from_millis(100)).await else {
            continue;
        };
        if d.lease_deadline_ms <= txmq_protocol::now_ms() {
            // Waited in this client's buffer past its lease: the broker may have given it
            // to the other consumer since (and that one's ack moved the head on).
            *events.entry("read after its lease").or_default() += 1;
            continue;
        }
        let (g, k) = parse(&d);
        assert_eq!(
            k, head[g],
            "group {g}: message {k} delivered (attempt {}) while its head is {} \
             (TXMQ_FIFO_SEED={seed})",
            d.attempt, head[g]
        );
        match rng.random_range(0..100) {
            0..70 => {
                // The answer comes before the next read: a message released by this ack
                // is read after the head moved on.
                if d.ack().await.is_ok() {
                    head[g] += 1;
                    *events.entry("acked").or_default() += 1;
                } else {
                    *events.entry("ack too late").or_default() += 1;
                }
            }
            70..85 => {
                let delay = Duration::from_millis(rng.random_range(0..100));
                let _ = d.nack(Some(delay)).await;
                *events.entry("nacked").or_default() += 1;
            }
            85..95 => {
                // Left to expire (its lease is 400 ms).
                held.push(d);
                *events.entry("left to expire").or_default() += 1;
            }
            _ => {
                // This consumer crashes with everything it holds; another one comes.
                // (Its deliveries hold its connection too: all of them go.)
                drop(d);
                held.clear();
                consumers[i] = Consumer::subscribe(b.addr(), options()).await.unwrap();
                *events.entry("consumer crashed").or_default() += 1;
            }
        }
        if held.len() > 16 {
            held.drain(..8);
        }
    }
    eprintln!("fifo property: every group in order; {events:?}");
}

async fn send(b: &TestBroker, messages: Vec<Message>) {
    let p = producer(b).await;
    for chunk in messages.chunks(37) {
        p.send_batch(chunk.to_vec()).await.unwrap();
    }
}
