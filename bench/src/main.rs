//! `txmq-bench`: durable throughput and latency of a txmq broker.
//!
//! Starts its own broker (the `txmq-broker` built next to this binary) on a temporary
//! data directory unless `--broker` names one, runs one scenario, and prints a table or
//! (with `--json`) one JSON line.

mod access;
mod broker;
mod failover;
mod grpc;
mod remoting;
mod retention;
mod scenarios;
mod schedule;
mod stalls;

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};

// The bench shares the two cores with the broker: the same allocator as the broker keeps
// its own cost per request down.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Which workload.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Scenario {
    /// Plain durable sends.
    Send,
    /// Half message + commit per transaction, through the transactional API.
    Txn,
    /// Producers and consumers (with ack) at once.
    E2e,
    /// Send and consume on an empty broker, then fill it with `--backlog` stored messages
    /// and `--prepared` open transactions, and send and consume again.
    Backlog,
    /// `e2e` through an ordered (FIFO) group, the messages spread over `--message-groups`.
    Fifo,
    /// Scheduled sends with `--waiting` messages scheduled a day ahead, then the lateness
    /// of `--messages` falling due at `--rate` a second.
    Schedule,
    /// A broker group's failover gap: paced sends while the leader is killed `--kills`
    /// times (needs `--group 3`).
    Failover,
    /// Paced sends (`--rate`, 20,000 a second when 0) to a broker with a short retention
    /// (`--retention-secs`), sampling its data directory's disk use every second.
    Retention,
}

/// Which face of the broker the clients speak to (`send`, `txn`, `e2e`).
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Protocol {
    /// txmq's own protocol and client library.
    Native,
    /// RocketMQ's Remoting protocol, as the classic Java and Go clients speak it.
    Remoting,
    /// RocketMQ 5's gRPC protocol, as the 5.x clients speak it.
    Grpc,
}

/// Flush mode passed to a broker the bench starts.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Flush {
    /// fsync before every reply (group commit).
    Sync,
    /// Reply once in the page cache.
    Async,
}

/// Command line.
#[derive(Debug, Clone, Parser)]
#[command(name = "txmq-bench", version, about)]
pub struct Args {
    /// Scenario.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Messages (for `txn`: transactions) to send.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Payload bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Producer connections.
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Consumer connections (e2e).
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Requests in flight per producer; consumer window.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// `send`: offered load in messages per second over all producers (0: as fast as the
    /// window allows). Latency at a fixed rate is what `--rate` is for.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Flush mode of the broker the bench starts.
    #[arg(long, value_enum, default_value = "sync")]
    pub flush: Flush,
    /// Use this broker instead of starting one (CPU and RSS are then not reported).
    #[arg(long)]
    pub broker: Option<String>,
    /// One JSON line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// `backlog`: messages stored before the second measurement.
    #[arg(long, default_value_t = 10_000_000)]
    pub backlog: u64,
    /// `backlog`: prepared (never resolved) transactions stored before it.
    #[arg(long, default_value_t = 1_000_000)]
    pub prepared: u64,
    /// `fifo`: message groups the messages are spread over.
    #[arg(long, default_value_t = 1000)]
    pub message_groups: u64,
    /// `schedule`: messages scheduled a day ahead, waiting during the measurement.
    #[arg(long, default_value_t = 1_000_000)]
    pub waiting: u64,
    /// `send`, `e2e`, `fifo`, `txn`: give every message a distinct key, as an order id
    /// would be (each is then also written to the broker's key index).
    #[arg(long)]
    pub keyed: bool,
    /// `retention`: the retention of the broker the bench starts, in seconds.
    #[arg(long, default_value_t = 10)]
    pub retention_secs: u64,
    /// Start a broker group of this many nodes on this machine instead of one broker
    /// (0 or 1: a single broker). The nodes share the machine's cores: compare with a
    /// single broker run at the same time, not with figures from elsewhere.
    #[arg(long, default_value_t = 0)]
    pub group: usize,
    /// `failover`: how many times the leader is killed.
    #[arg(long, default_value_t = 3)]
    pub kills: usize,
    /// The broker has users: the clients log in (SCRAM) as a normal user, and every
    /// request is checked against its rules.
    #[arg(long)]
    pub users: bool,
    /// The broker serves TLS (a self-signed certificate the clients trust).
    #[arg(long)]
    pub tls: bool,
    /// The face the clients speak to (`send`, `txn`, `e2e` on the broker the bench
    /// starts): the same broker, storage and delivery under each.
    #[arg(long, value_enum, default_value = "native")]
    pub protocol: Protocol,
}

/// What a scenario measured.
#[derive(Debug)]
pub struct Report {
    /// Units done (messages, or committed transactions).
    pub done: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Latency in microseconds.
    pub latency: hdrhistogram::Histogram<u64>,
    /// What the latency measures.
    pub latency_of: &'static str,
    /// Scenario-specific figures, printed after the common ones.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.messages > 0, "--messages must be at least 1");
    anyhow::ensure!(
        args.producers > 0 && args.consumers > 0,
        "need at least one producer and consumer"
    );
    anyhow::ensure!(
        args.broker.is_none() || args.group <= 1,
        "--group starts its own brokers: not with --broker"
    );
    anyhow::ensure!(
        !(args.users || args.tls)
            || (args.broker.is_none()
                && args.group <= 1
                && matches!(
                    args.scenario,
                    Scenario::Send | Scenario::Txn | Scenario::E2e
                )),
        "--users and --tls are for send, txn and e2e on the broker the bench starts"
    );
    anyhow::ensure!(
        args.protocol == Protocol::Native
            || (args.broker.is_none()
                && args.group <= 1
                && !args.users
                && !args.tls
                && matches!(
                    args.scenario,
                    Scenario::Send | Scenario::Txn | Scenario::E2e
                )),
        "--protocol remoting and grpc are for send, txn and e2e on a single broker the bench \
         starts, without --users or --tls"
    );
    let (mut access_args, _access_files) = access::broker_args(args.users, args.tls)?;
    match args.protocol {
        Protocol::Native => {}
        Protocol::Remoting => {
            access_args.extend(["--remoting-listen".into(), "127.0.0.1:0".into()])
        }
        Protocol::Grpc => access_args.extend(["--grpc-listen".into(), "127.0.0.1:0".into()]),
    }
    let mut broker = match &args.broker {
        Some(addr) => broker::Broker::external(addr),
        None => {
            let mut extra = if args.scenario == Scenario::Retention {
                retention::broker_args(&args)
            } else {
                Vec::new()
            };
            extra.extend(access_args);
            if args.group > 1 {
                broker::Broker::start_group(args.group, args.flush, &extra).await?
            } else {
                broker::Broker::start(args.flush, &extra)?
            }
        }
    };
    access::setup(broker.addr(), args.users).await?;
    if args.protocol != Protocol::Native {
        // The other faces answer "opening its storage" until it is open; the native
        // port takes its first request only then.
        txmq_client::Admin::connect(broker.addr(), "")
            .await?
            .topics()
            .await?;
    }
    let cpu_before = broker.cpu_seconds();
    let probe = stalls::StallProbe::start();
    let report = if args.scenario == Scenario::Retention {
        retention::retention(&args, broker.addr(), broker.data_dir()).await?
    } else if args.scenario == Scenario::Failover {
        failover::failover(&args, &mut broker).await?
    } else {
        match args.protocol {
            Protocol::Native => scenarios::run(&args, broker.addr()).await?,
            Protocol::Remoting => {
                let at = broker
                    .faces()
                    .remoting
                    .context("the Remoting face did not listen")?;
                match args.scenario {
                    Scenario::Send => remoting::send(&args, &at, "bench-send", false).await?,
                    Scenario::Txn => remoting::txn(&args, &at).await?,
                    _ => remoting::e2e(&args, &at).await?,
                }
            }
            Protocol::Grpc => {
                let at = broker
                    .faces()
                    .grpc
                    .context("the gRPC face did not listen")?;
                match args.scenario {
                    Scenario::Send => grpc::send(&args, &at, "bench-send", false).await?,
                    Scenario::Txn => grpc::txn(&args, &at).await?,
                    _ => grpc::e2e(&args, &at).await?,
                }
            }
        }
    };
    let stalls = probe.finish();
    let cpu = broker.cpu_seconds().zip(cpu_before).map(|(a, b)| a - b);
    let rss = broker.peak_rss_mb();
    print(&args, &report, stalls, cpu, rss);
    Ok(())
}

fn print(args: &Args, r: &Report, stalls: stalls::Stalls, cpu: Option<f64>, rss: Option<f64>) {
    let secs = r.elapsed.as_secs_f64();
    let rate = r.done as f64 / secs;
    let mb = rate * args.size as f64 / 1e6;
    let q = |p: f64| r.latency.value_at_quantile(p);
    let scenario = format!("{:?}", args.scenario).to_lowercase();
    if args.json {
        let mut line = serde_json::json!({
                "scenario": scenario, "protocol": format!("{:?}", args.protocol).to_lowercase(),
                "messages": r.done, "size": args.size,
                "producers": args.producers, "consumers": args.consumers, "window": args.window,
                "flush": format!("{:?}", args.flush).to_lowercase(), "group": args.group.max(1),
                "secs": secs, "msgs_per_sec": rate, "mb_per_sec": mb,
                "p50_us": q(0.5), "p99_us": q(0.99), "p999_us": q(0.999), "max_us": r.latency.max(),
                "latency_of": r.latency_of,
                "broker_cpu_s": cpu, "broker_peak_rss_mb": rss,
                "stalls_over_2ms": stalls.count, "stalled_ms": stalls.total.as_secs_f64() * 1e3,
                "longest_stall_ms": stalls.longest.as_secs_f64() * 1e3,
        });
        line.as_object_mut()
            .expect("an object")
            .extend(r.extra.clone());
        println!("{line}");
    } else {
        println!(
            "scenario      {scenario} over {:?} ({} producer(s), {} consumer(s), window {}, flush {:?})",
            args.protocol, args.producers, args.consumers, args.window, args.flush
        );
        println!("done          {} in {secs:.2} s", r.done);
        println!("throughput    {rate:.0} msg/s, {mb:.1} MB/s");
        println!(
            "latency       p50 {} µs, p99 {} µs, p999 {} µs, max {} µs ({})",
            q(0.5),
            q(0.99),
            q(0.999),
            r.latency.max(),
            r.latency_of
        );
        println!(
            "stalls        {} wake-ups of an idle thread more than {} ms late, {:.0} ms in all, longest {:.1} ms",
            stalls.count,
            stalls::STALL.as_millis(),
            stalls.total.as_secs_f64() * 1e3,
            stalls.longest.as_secs_f64() * 1e3
        );
        match (cpu, rss) {
            (Some(c), Some(m)) => println!("broker        {c:.2} CPU s, peak RSS {m:.0} MiB"),
            _ => println!("broker        external (CPU and RSS not measured)"),
        }
        for (k, v) in &r.extra {
            println!("{k:<13} {v}");
        }
    }
}
