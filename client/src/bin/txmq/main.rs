//! `txmq`: produce, consume and operate a txmq broker from a shell.

mod access;
mod cluster;
mod message;
mod scheduled;
mod topic;
mod view;
mod webhook;

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde_json::json;
use txmq_client::pb::TxnState;
use txmq_client::{
    Consumer, ConsumerOptions, Delivery, Message, Outcome, Producer, ProducerOptions, StartFrom,
};
use view::{View, print_txn};

#[derive(Debug, Parser)]
#[command(
    name = "txmq",
    version,
    about = "Command-line client for the txmq broker"
)]
struct Cli {
    /// Broker address, or a broker group's addresses separated by commas (the
    /// leader is found).
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:9876",
        env = "TXMQ_BROKER"
    )]
    broker: String,
    /// Shared secret, when the broker requires one.
    #[arg(
        long,
        global = true,
        default_value = "",
        env = "TXMQ_AUTH_TOKEN",
        hide_env_values = true
    )]
    auth_token: String,
    /// The user to authenticate as (SCRAM-SHA-256; a broker with users requires one).
    #[arg(long, global = true, env = "TXMQ_USER")]
    user: Option<String>,
    /// File whose first line is the user's secret (or TXMQ_USER_SECRET holds it).
    #[arg(long, global = true, env = "TXMQ_USER_SECRET_FILE")]
    user_secret_file: Option<std::path::PathBuf>,
    /// Speak TLS to the broker, trusting the public web's authorities (or --ca's).
    #[arg(long, global = true, env = "TXMQ_TLS")]
    tls: bool,
    /// PEM file of the authorities to trust for the broker's certificate (implies
    /// --tls): a private authority, or the broker's self-signed certificate.
    #[arg(long, global = true, env = "TXMQ_CA")]
    ca: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send messages.
    Produce(ProduceArgs),
    /// Receive messages as a member of a consumer group.
    Consume(ConsumeArgs),
    /// Topics.
    #[command(subcommand)]
    Topic(topic::TopicCmd),
    /// Transactions (operator views and control).
    #[command(subcommand)]
    Txn(TxnCmd),
    /// Consumer groups.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Dead-letter queues.
    #[command(subcommand)]
    Dlq(DlqCmd),
    /// Scheduled messages waiting for their time.
    #[command(subcommand)]
    Scheduled(scheduled::ScheduledCmd),
    /// Find messages: by id with their life, or a topic's by key and time.
    #[command(subcommand)]
    Message(message::MessageCmd),
    /// A broker group: status, adding and removing nodes.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// The broker's users.
    #[command(subcommand)]
    User(access::UserCmd),
    /// The users' permissions: rules of allow and deny.
    #[command(subcommand)]
    Acl(access::AclCmd),
    /// Best-effort notification: POST every message of a topic to a URL, signed, with
    /// retries and a dead-letter queue; a signed query interface for the receiver.
    Webhook(webhook::WebhookArgs),
    /// Broker-wide figures: topics, messages, groups, pending half messages, counters.
    Stats {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Resolve {
    Commit,
    Rollback,
    Unknown,
}

impl From<Resolve> for Outcome {
    fn from(r: Resolve) -> Self {
        match r {
            Resolve::Commit => Outcome::Commit,
            Resolve::Rollback => Outcome::Rollback,
            Resolve::Unknown => Outcome::Unknown,
        }
    }
}

#[derive(Debug, clap::Args)]
struct ProduceArgs {
    /// Topic.
    #[arg(long)]
    topic: String,
    /// Message body.
    #[arg(long, conflicts_with = "size")]
    body: Option<String>,
    /// Generate bodies of this many bytes instead.
    #[arg(long)]
    size: Option<usize>,
    /// How many messages.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Message key.
    #[arg(long, default_value = "")]
    key: String,
    /// Message tag.
    #[arg(long, default_value = "")]
    tag: String,
    /// Message group: an ordered consumer group receives a group's messages in order.
    #[arg(long, default_value = "")]
    message_group: String,
    /// Idempotency key: sent again (by you, or after a lost connection), the message is
    /// stored once within the broker's dedup window. With --count N, message i gets
    /// `KEY-i`.
    #[arg(long, conflicts_with = "transactional")]
    idempotency_key: Option<String>,
    /// Deliver this long after sending (`30s`, `30m`, `2h`): a scheduled message.
    #[arg(long, value_parser = scheduled::parse_after, conflicts_with = "deliver_at")]
    deliver_after: Option<Duration>,
    /// Deliver at this time (RFC 3339, e.g. `2026-12-01T09:00:00Z`): a scheduled message.
    #[arg(long, value_parser = scheduled::parse_at)]
    deliver_at: Option<std::time::SystemTime>,
    /// Sends in flight at once.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// One JSON line per acknowledged message: id, topic, offset.
    #[arg(long)]
    json: bool,
    /// Send as a transaction (half message, then resolve).
    #[arg(long)]
    transactional: bool,
    /// Producer group (transactions).
    #[arg(long, required_if_eq("transactional", "true"))]
    group: Option<String>,
    /// How to resolve the transaction.
    #[arg(long, value_enum, default_value = "commit")]
    resolve: Resolve,
    /// Answer to the broker's check-backs.
    #[arg(long, value_enum, default_value = "unknown")]
    check_answer: Resolve,
    /// Keep answering check-backs for this many seconds after resolving.
    #[arg(long, default_value_t = 0.0)]
    linger: f64,
}

#[derive(Debug, clap::Args)]
struct ConsumeArgs {
    /// Topic.
    #[arg(long)]
    topic: String,
    /// Consumer group.
    #[arg(long)]
    group: String,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this many seconds without a message.
    #[arg(long)]
    timeout: Option<f64>,
    /// Do not acknowledge (messages come back when their lease expires).
    #[arg(long, conflicts_with = "nack")]
    no_ack: bool,
    /// Negatively acknowledge with this redelivery delay in seconds.
    #[arg(long)]
    nack: Option<f64>,
    /// Lease of each delivery, in seconds.
    #[arg(long)]
    lease: Option<f64>,
    /// Tag filter, e.g. `A||B`. It must match the group's filter on this topic.
    #[arg(long, default_value = "")]
    tag: String,
    /// Make --tag the group's filter on this topic, replacing the one it has (an
    /// explicit change: every member of the group then receives by the new filter).
    #[arg(long)]
    replace_filter: bool,
    /// An ordered (FIFO) group: each message group's messages one at a time, in order.
    #[arg(long)]
    ordered: bool,
    /// Where a new group starts.
    #[arg(long, value_enum, default_value = "earliest")]
    from: FromArg,
    /// Unacknowledged deliveries held at once.
    #[arg(long, default_value_t = 256)]
    window: u32,
    /// Group override of max attempts.
    #[arg(long, default_value_t = 0)]
    max_attempts: u32,
    /// One JSON object per message.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FromArg {
    Earliest,
    Latest,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StateArg {
    Prepared,
    Discarded,
    Committed,
    RolledBack,
}

#[derive(Debug, Subcommand)]
enum TxnCmd {
    /// List transactions.
    List {
        /// Only this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// Only this producer group.
        #[arg(long, default_value = "")]
        group: String,
        /// At most this many (oldest first).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// Start after this transaction id (the last one of the previous page).
        #[arg(long, default_value = "")]
        after: String,
        /// JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Commit a prepared or discarded transaction.
    Commit {
        /// Transaction id.
        id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Roll back a prepared or discarded transaction.
    Rollback {
        /// Transaction id.
        id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Re-arm a discarded transaction: check it again from a count of zero.
    Rearm {
        /// Transaction id.
        id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum GroupCmd {
    /// Create a consumer group on a topic before any consumer joins it: ordered (FIFO),
    /// starting from the latest, with a tag filter (what its first subscription would
    /// fix). For clients that cannot say so themselves, such as RocketMQ's gRPC clients.
    Create {
        /// Group.
        group: String,
        /// Topic.
        #[arg(long)]
        topic: String,
        /// An ordered group: each message group's messages one at a time, in order.
        #[arg(long)]
        ordered: bool,
        /// Start at the end of the topic instead of its oldest message.
        #[arg(long)]
        from_latest: bool,
        /// Tag filter (`A||B`; empty or `*`: all).
        #[arg(long, default_value = "")]
        tags: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Every group on every topic it subscribed to, with its lag.
    List {
        /// JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Per topic: next offset, ack floor, in flight, lag, dead letters.
    Describe {
        /// Group.
        group: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a group (its consumers stopped): positions, acks, retries, dead letters.
    Delete {
        /// Group.
        group: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Move a group's position on a topic (its consumers stopped): `earliest`, `latest`,
    /// an offset, or a time (RFC 3339, or `2h ago`).
    Reset {
        /// Group.
        group: String,
        /// Topic.
        #[arg(long)]
        topic: String,
        /// Where to.
        #[arg(long, value_parser = parse_reset_to)]
        to: txmq_client::ResetTo,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// `earliest`, `latest`, an offset, an RFC 3339 time or `<duration> ago`.
fn parse_reset_to(text: &str) -> Result<txmq_client::ResetTo, String> {
    use txmq_client::ResetTo;
    let t = text.trim();
    match t {
        "earliest" => return Ok(ResetTo::Earliest),
        "latest" => return Ok(ResetTo::Latest),
        _ => {}
    }
    if let Ok(offset) = t.parse::<u64>() {
        return Ok(ResetTo::Offset(offset));
    }
    message::parse_when(t).map(ResetTo::Time).map_err(|_| {
        format!("bad target {text:?}: earliest, latest, an offset, an RFC 3339 time or \"2h ago\"")
    })
}

#[derive(Debug, Subcommand)]
enum DlqCmd {
    /// List a group's dead letters.
    List {
        /// Group.
        #[arg(long)]
        group: String,
        /// Show at most this many (0: all; fetched a page at a time).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back for delivery.
    Redrive {
        /// Group.
        #[arg(long)]
        group: String,
        /// Only this message id.
        #[arg(long)]
        id: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("txmq: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    access::login(cli.user.clone(), cli.user_secret_file.clone())?;
    access::secure(cli.tls, cli.ca.as_deref())?;
    let addr = cli.broker.as_str();
    let token = cli.auth_token.as_str();
    match cli.command {
        Command::User(cmd) => access::user_cmd(addr, token, cmd).await,
        Command::Acl(cmd) => access::acl_cmd(addr, token, cmd).await,
        Command::Produce(a) if a.transactional => produce_txn(addr, token, a).await,
        Command::Produce(a) => produce(addr, token, a).await,
        Command::Consume(a) => consume(addr, token, a).await,
        Command::Webhook(a) => webhook::run(addr, token, a).await,
        Command::Topic(cmd) => topic::run(addr, token, cmd).await,
        Command::Cluster(cmd) => cluster::run(addr, token, cmd).await,
        Command::Group(GroupCmd::List { json }) => {
            let groups = crate::access::admin(addr, token).await?.groups().await?;
            let mut view = View::new(
                json,
                &[
                    ("GROUP", -24),
                    ("TOPIC", -24),
                    ("NEXT", 10),
                    ("ACK-FLOOR", 10),
                    ("LAG", 10),
                ],
            );
            for g in groups {
                view.row(
                    &[
                        g.group.clone(),
                        g.topic.clone(),
                        g.next_offset.to_string(),
                        g.ack_floor.to_string(),
                        g.lag.to_string(),
                    ],
                    json!({"group": g.group, "topic": g.topic, "next_offset": g.next_offset,
                        "ack_floor": g.ack_floor, "lag": g.lag}),
                );
            }
            Ok(())
        }
        Command::Stats { json } => {
            let s = crate::access::admin(addr, token).await?.stats().await?;
            let rows = [
                ("topics", s.topics),
                ("messages", s.messages),
                ("groups", s.groups),
                ("connections", s.connections),
                ("half_messages_pending", s.half_messages_pending),
                ("messages_sent", s.messages_sent),
                ("commits", s.commits),
                ("rollbacks", s.rollbacks),
                ("discarded", s.discarded),
                ("deliveries", s.deliveries),
                ("acks", s.acks),
                ("dead_letters", s.dead_letters),
            ];
            if json {
                let mut obj = serde_json::Map::new();
                obj.insert("broker_version".into(), json!(s.broker_version));
                obj.insert("uptime_ms".into(), json!(s.uptime_ms));
                for (k, v) in rows {
                    obj.insert(k.into(), json!(v));
                }
                println!("{}", serde_json::Value::Object(obj));
            } else {
                let uptime = humantime::format_duration(Duration::from_secs(s.uptime_ms / 1000));
                println!("broker {} up {uptime}", s.broker_version);
                println!("(counters since the broker started: messages_sent and below)");
                for (k, v) in rows {
                    println!("{k:<24} {v:>12}");
                }
            }
            Ok(())
        }
        Command::Txn(cmd) => txn(addr, token, cmd).await,
        Command::Group(GroupCmd::Describe { group, json }) => {
            let g = crate::access::admin(addr, token)
                .await?
                .describe_group(&group)
                .await?;
            let mut view = View::new(
                json,
                &[
                    ("TOPIC", -24),
                    ("NEXT", 10),
                    ("ACK-FLOOR", 10),
                    ("IN-FLIGHT", 9),
                    ("LAG", 10),
                    ("RETRY", 6),
                    ("DLQ", 6),
                    ("CONSUMERS", 9),
                    ("STALLED", 7),
                    ("BLOCKED", 7),
                ],
            );
            for t in g.topics {
                view.row(
                    &[
                        t.topic.clone(),
                        t.next_offset.to_string(),
                        t.ack_floor.to_string(),
                        t.in_flight.to_string(),
                        t.lag.to_string(),
                        t.waiting_retry.to_string(),
                        t.dead_letters.to_string(),
                        t.consumers.to_string(),
                        t.stalled_consumers.to_string(),
                        if t.ordered {
                            t.blocked_message_groups.to_string()
                        } else {
                            "-".to_string()
                        },
                    ],
                    json!({"group": g.group, "topic": t.topic, "next_offset": t.next_offset,
                        "ack_floor": t.ack_floor, "in_flight": t.in_flight, "lag": t.lag,
                        "waiting_retry": t.waiting_retry, "dead_letters": t.dead_letters,
                        "consumers": t.consumers, "stalled_consumers": t.stalled_consumers,
                        "tag_filter": t.tag_filter, "ordered": t.ordered,
                        "blocked_message_groups": t.blocked_message_groups,
                        "held_messages": t.held_messages,
                        "skipped_by_retention": t.skipped_by_retention}),
                );
            }
            Ok(())
        }
        Command::Scheduled(cmd) => scheduled::run(addr, token, cmd).await,
        Command::Message(cmd) => message::run(addr, token, cmd).await,
        Command::Group(GroupCmd::Create {
            group,
            topic,
            ordered,
            from_latest,
            tags,
            json,
        }) => {
            // A group is made by its first subscription: subscribe, then leave at once
            // (nothing is delivered before the consumer says it is ready).
            let options = ConsumerOptions {
                tag_filter: tags.clone(),
                start_from: if from_latest {
                    txmq_client::StartFrom::Latest
                } else {
                    txmq_client::StartFrom::Earliest
                },
                window: 1,
                auth_token: token.to_string(),
                user: crate::access::user(),
                tls: crate::access::tls(),
                ..ConsumerOptions::new(group.clone(), topic.clone()).ordered(ordered)
            };
            Consumer::subscribe(addr, options).await?.close().await?;
            if json {
                println!(
                    "{}",
                    json!({"created": group, "topic": topic, "ordered": ordered, "tags": tags})
                );
            } else {
                let kind = if ordered { "ordered" } else { "unordered" };
                println!("group {group} on {topic}: {kind}");
            }
            Ok(())
        }
        Command::Group(GroupCmd::Delete { group, json }) => {
            let topics = crate::access::admin(addr, token)
                .await?
                .delete_group(&group)
                .await?;
            if json {
                println!("{}", json!({"deleted": group, "topics": topics}));
            } else {
                println!("deleted group {group} ({topics} topic(s))");
            }
            Ok(())
        }
        Command::Group(GroupCmd::Reset {
            group,
            topic,
            to,
            json,
        }) => {
            let offset = crate::access::admin(addr, token)
                .await?
                .reset_group(&group, &topic, to)
                .await?;
            if json {
                println!(
                    "{}",
                    json!({"group": group, "topic": topic, "offset": offset})
                );
            } else {
                println!("group {group} on {topic} now starts at offset {offset}");
            }
            Ok(())
        }
        Command::Dlq(DlqCmd::List { group, limit, json }) => {
            let letters = crate::access::admin(addr, token)
                .await?
                .dead_letters(&group, limit)
                .await?;
            for d in letters {
                let m = d.message.unwrap_or_default();
                if json {
                    println!(
                        "{}",
                        json!({"group": d.group, "topic": m.topic, "offset": m.offset, "id": m.message_id,
                            "key": m.key, "tag": m.tag, "attempts": d.attempts, "reason": d.reason,
                            "dead_ms": d.dead_ms, "body": String::from_utf8_lossy(&m.body)})
                    );
                } else {
                    println!(
                        "{} {}@{} attempts={} reason={:?}",
                        m.message_id, m.topic, m.offset, d.attempts, d.reason
                    );
                }
            }
            Ok(())
        }
        Command::Dlq(DlqCmd::Redrive { group, id, json }) => {
            let n = crate::access::admin(addr, token)
                .await?
                .redrive(&group, id.as_deref())
                .await?;
            if json {
                println!("{}", json!({"group": group, "redriven": n}));
            } else {
                println!("redrove {n} message(s)");
            }
            Ok(())
        }
    }
}

fn body_of(a: &ProduceArgs, i: u64) -> Vec<u8> {
    match (&a.body, a.size) {
        (Some(b), _) => b.clone().into_bytes(),
        (None, Some(size)) => {
            let mut b = format!("{i:010} ").into_bytes();
            b.resize(size, b'x');
            b.truncate(size);
            b
        }
        (None, None) => format!("message {i}").into_bytes(),
    }
}

fn message_of(a: &ProduceArgs, i: u64) -> Message {
    let mut m = Message::new(a.topic.clone(), body_of(a, i))
        .key(a.key.clone())
        .tag(a.tag.clone())
        .group(a.message_group.clone());
    if let Some(key) = &a.idempotency_key {
        m = m.idempotency_key(if a.count == 1 {
            key.clone()
        } else {
            format!("{key}-{i}")
        });
    }
    match (a.deliver_at, a.deliver_after) {
        (Some(at), _) => m.deliver_at(at),
        (None, Some(after)) => m.deliver_after(after),
        (None, None) => m,
    }
}

/// A producer without a group (plain sends, cancels).
pub async fn plain_producer(addr: &str, token: &str) -> anyhow::Result<Producer> {
    let options = ProducerOptions {
        auth_token: token.to_string(),
        user: crate::access::user(),
        tls: crate::access::tls(),
        ..Default::default()
    };
    Ok(Producer::connect(addr, options).await?)
}

async fn produce(addr: &str, token: &str, a: ProduceArgs) -> anyhow::Result<()> {
    let producer = plain_producer(addr, token).await?;
    let started = Instant::now();
    // On a terminal only (indicatif draws nothing otherwise), and never over JSON lines.
    let progress = if a.json || a.count < 1000 {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(a.count).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} sent, {per_sec}, eta {eta}",
            )
            .expect("valid template"),
        )
    };
    let mut in_flight = FuturesUnordered::new();
    let mut sent = 0;
    let mut acked = 0u64;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    while acked < a.count {
        while sent < a.count && in_flight.len() < a.window.max(1) {
            let p = producer.clone();
            let m = message_of(&a, sent);
            in_flight.push(async move { p.send(m).await });
            sent += 1;
        }
        let Some(result) = in_flight.next().await else {
            break;
        };
        let r = result.context("send failed")?;
        acked += 1;
        progress.inc(1);
        if a.json {
            writeln!(
                out,
                "{}",
                json!({"id": r.message_id, "topic": r.topic, "offset": r.offset,
                    "deliver_ms": r.deliver_ms})
            )?;
            // Each line is a promise that the message is stored: never hold it back.
            out.flush()?;
        }
    }
    out.flush()?;
    progress.finish_and_clear();
    if !a.json {
        let secs = started.elapsed().as_secs_f64();
        println!(
            "sent {acked} message(s) to {} in {secs:.2}s ({:.0} msg/s)",
            a.topic,
            acked as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}

async fn produce_txn(addr: &str, token: &str, a: ProduceArgs) -> anyhow::Result<()> {
    let group = a.group.clone().context("--transactional needs --group")?;
    let answer: Outcome = a.check_answer.into();
    let json_out = a.json;
    let checker = move |req: txmq_client::CheckRequest| async move {
        let line = if json_out {
            json!({"check": req.txn_id, "attempt": req.attempt, "answer": format!("{answer:?}").to_lowercase()}).to_string()
        } else {
            format!(
                "check-back for {} (attempt {}): answering {answer:?}",
                req.txn_id, req.attempt
            )
        };
        println!("{line}");
        answer
    };
    let mut options = ProducerOptions::transactional(group, checker);
    options.auth_token = token.to_string();
    options.user = access::user();
    options.tls = access::tls();
    let producer = Producer::connect(addr, options).await?;
    for i in 0..a.count {
        let mut txn = producer.begin()?;
        txn.send(message_of(&a, i)).await?;
        let id = txn.id().unwrap_or_default().to_string();
        let outcome: Outcome = a.resolve.into();
        match outcome {
            Outcome::Commit => txn.commit().await?,
            Outcome::Rollback => txn.rollback().await?,
            Outcome::Unknown => {
                producer
                    .end_transaction(&id, Outcome::Unknown, false)
                    .await?;
            }
        }
        let state = format!("{outcome:?}").to_lowercase();
        if a.json {
            let r = txn.receipts().first().cloned();
            println!(
                "{}",
                json!({"txn": id, "resolve": state, "id": r.as_ref().map(|r| r.message_id.clone()),
                    "topic": a.topic, "offset": r.filter(|_| outcome == Outcome::Commit).map(|r| r.offset)})
            );
        } else {
            println!("transaction {id}: {state}");
        }
    }
    if a.linger > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(a.linger)).await;
    }
    Ok(())
}

async fn consume(addr: &str, token: &str, a: ConsumeArgs) -> anyhow::Result<()> {
    // Never lease more than will be processed: extra deliveries would sit idle until exit.
    let window = match a.count {
        Some(n) => a.window.min(n.max(1).min(u64::from(u32::MAX)) as u32),
        None => a.window,
    };
    let options = ConsumerOptions {
        group: a.group.clone(),
        topic: a.topic.clone(),
        tag_filter: a.tag.clone(),
        start_from: match a.from {
            FromArg::Earliest => StartFrom::Earliest,
            FromArg::Latest => StartFrom::Latest,
        },
        lease: a.lease.map(Duration::from_secs_f64),
        window,
        max_attempts: a.max_attempts,
        replace_filter: a.replace_filter,
        ordered: a.ordered,
        auth_token: token.to_string(),
        user: crate::access::user(),
        tls: crate::access::tls(),
    };
    let mut consumer = Consumer::subscribe(addr, options).await?;
    let idle = a.timeout.map(Duration::from_secs_f64);
    let mut received = 0u64;
    let mut settling = FuturesUnordered::new();
    let stdout = std::io::stdout();
    while a.count.is_none_or(|n| received < n) {
        let next = match idle {
            Some(t) => match tokio::time::timeout(t, consumer.next()).await {
                Ok(x) => x,
                Err(_) => break,
            },
            None => consumer.next().await,
        };
        let Some(d) = next else { break };
        let d = d?;
        received += 1;
        print_delivery(&mut stdout.lock(), &d, a.json)?;
        let nack = a.nack.map(Duration::from_secs_f64);
        if !a.no_ack {
            settling.push(async move {
                match nack {
                    Some(delay) => d.nack(Some(delay)).await,
                    None => d.ack().await,
                }
            });
        }
        while let Some(r) = futures::FutureExt::now_or_never(settling.next()).flatten() {
            r.context("acknowledgement failed")?;
        }
    }
    while let Some(r) = settling.next().await {
        r.context("acknowledgement failed")?;
    }
    // Leave cleanly: what the broker pushed after the last message we wanted goes back
    // to the group without counting an attempt. (--no-ack keeps the crash-like release,
    // so the unacked messages come back with their attempt counted.)
    if !a.no_ack {
        consumer.close().await.context("leaving the group")?;
    }
    Ok(())
}

fn print_delivery(out: &mut impl Write, d: &Delivery, json: bool) -> anyhow::Result<()> {
    let m = &d.message;
    if json {
        writeln!(
            out,
            "{}",
            json!({"topic": m.topic, "offset": m.offset, "id": m.message_id, "key": m.key,
                "tag": m.tag, "attempt": d.attempt, "properties": m.properties,
                "txn_id": m.txn_id, "store_ms": m.store_ms,
                "message_group": m.message_group, "deliver_ms": m.deliver_ms,
                "body": String::from_utf8_lossy(&m.body)})
        )?;
    } else {
        writeln!(
            out,
            "{}@{} id={} attempt={} {}",
            m.topic,
            m.offset,
            m.message_id,
            d.attempt,
            String::from_utf8_lossy(&m.body)
        )?;
    }
    out.flush()?;
    Ok(())
}

async fn txn(addr: &str, token: &str, cmd: TxnCmd) -> anyhow::Result<()> {
    let admin = crate::access::admin(addr, token).await?;
    let cmd_kind = match &cmd {
        TxnCmd::Commit { .. } => "commit",
        _ => "other",
    };
    match cmd {
        TxnCmd::List {
            state,
            group,
            limit,
            after,
            json,
        } => {
            let state = match state {
                None => TxnState::Unspecified,
                Some(StateArg::Prepared) => TxnState::Prepared,
                Some(StateArg::Discarded) => TxnState::Discarded,
                Some(StateArg::Committed) => TxnState::Committed,
                Some(StateArg::RolledBack) => TxnState::RolledBack,
            };
            let list = admin
                .transactions_after(state, &group, limit, &after)
                .await?;
            for t in list.txns {
                print_txn(&t, list.now_ms, json);
            }
        }
        TxnCmd::Commit { id, json } | TxnCmd::Rollback { id, json } => {
            let commit = matches!(cmd_kind, "commit");
            let r = admin.resolve(&id, commit).await?;
            let state = if commit { "committed" } else { "rolled_back" };
            if json {
                println!(
                    "{}",
                    json!({"txn": id, "state": state, "repeated": r.repeated})
                );
            } else {
                println!(
                    "{id}: {}{}",
                    state.replace('_', " "),
                    if r.repeated { " (already)" } else { "" }
                );
            }
        }
        TxnCmd::Rearm { id, json } => {
            admin.rearm(&id).await?;
            if json {
                println!(
                    "{}",
                    json!({"txn": id, "state": "prepared", "rearmed": true})
                );
            } else {
                println!("{id}: re-armed, checked again from now");
            }
        }
    }
    Ok(())
}
