//! `txmq topic`: create, alter (retention, queues), list and delete topics.

use std::time::{Duration, UNIX_EPOCH};

use clap::Subcommand;
use serde_json::json;

use crate::view::View;

#[derive(Debug, Subcommand)]
pub enum TopicCmd {
    /// Create a topic.
    Create {
        /// Name.
        topic: String,
        #[command(flatten)]
        retention: Retention,
        /// The queues RocketMQ clients see on the Remoting face (1 to 64; unset: the
        /// broker's remoting-queues), as `mqadmin updateTopic -r` sets.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
        queues: Option<u32>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Change what is given of a topic's settings; the rest stays.
    Alter {
        /// Name.
        topic: String,
        #[command(flatten)]
        retention: Retention,
        /// The queues RocketMQ clients see on the Remoting face (1 to 64; 0: the
        /// broker's remoting-queues).
        #[arg(long, value_parser = clap::value_parser!(u32).range(0..=64))]
        queues: Option<u32>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// List topics.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a topic: its messages, its groups' positions, retries and dead letters,
    /// and its scheduled messages.
    Delete {
        /// Name.
        topic: String,
        /// Also while transactions on it are open (they are rolled back) or consumers
        /// are subscribed (they receive nothing more).
        #[arg(long)]
        force: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// A topic's retention overrides.
#[derive(Debug, clap::Args)]
pub struct Retention {
    /// Keep messages this long (`7d`, `12h`; `0`: the broker's); unset: the broker's
    /// when creating, unchanged when altering.
    #[arg(long, value_parser = parse_age)]
    retention: Option<Duration>,
    /// Keep at most this much of the topic's log (`10GiB`, `500MB`, bytes; `0`: the
    /// broker's); unset: the broker's when creating, unchanged when altering.
    #[arg(long, value_parser = parse_bytes)]
    retention_bytes: Option<u64>,
}

impl Retention {
    fn ms_and_bytes(&self) -> (u64, u64) {
        (
            self.retention.map_or(0, |d| d.as_millis() as u64),
            self.retention_bytes.unwrap_or(0),
        )
    }
}

fn parse_age(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text.trim()).map_err(|e| format!("bad duration {text:?}: {e}"))
}

/// `10GiB`, `500MB`, `4096`: a size in bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("bad size {text:?}: a number then a unit, like 10GiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "bad size unit {other:?} in {text:?} (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)"
            ));
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

fn age(ms: u64) -> String {
    if ms == 0 {
        "default".into()
    } else {
        humantime::format_duration(Duration::from_millis(ms)).to_string()
    }
}

/// How long ago the oldest message was stored, in whole units (`-` for none).
fn oldest(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let secs = now.saturating_sub(ms) / 1000;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

fn bytes(b: u64) -> String {
    if b == 0 {
        "default".into()
    } else {
        b.to_string()
    }
}

fn print_one(t: &txmq_client::pb::TopicInfo, what: &str, json: bool) {
    if json {
        println!(
            "{}",
            json!({what: t.name, "created_ms": t.created_ms, "retention_ms": t.retention_ms,
                "retention_bytes": t.retention_bytes, "start_offset": t.start_offset,
                "next_offset": t.next_offset, "queues": t.queues})
        );
    } else {
        println!(
            "{what} topic {} (retention {}, retention bytes {}, queues {})",
            t.name,
            age(t.retention_ms),
            bytes(t.retention_bytes),
            queues(t.queues)
        );
    }
}

fn queues(q: u32) -> String {
    if q == 0 {
        "default".into()
    } else {
        q.to_string()
    }
}

pub async fn run(addr: &str, token: &str, cmd: TopicCmd) -> anyhow::Result<()> {
    let admin = crate::access::admin(addr, token).await?;
    match cmd {
        TopicCmd::Create {
            topic,
            retention,
            queues,
            json,
        } => {
            let t = admin
                .create_topic_with(&topic, true, retention.ms_and_bytes(), queues.unwrap_or(0))
                .await?;
            print_one(&t, "created", json);
        }
        TopicCmd::Alter {
            topic,
            retention,
            queues,
            json,
        } => {
            let change = txmq_client::TopicChange {
                retention_ms: retention.retention.map(|d| d.as_millis() as u64),
                retention_bytes: retention.retention_bytes,
                queues,
            };
            if change == txmq_client::TopicChange::default() {
                anyhow::bail!("nothing to change: give --retention, --retention-bytes or --queues");
            }
            let t = admin.alter_topic(&topic, change).await?;
            print_one(&t, "altered", json);
        }
        TopicCmd::Delete { topic, force, json } => {
            let d = admin.delete_topic(&topic, force).await?;
            if json {
                println!(
                    "{}",
                    json!({"deleted": topic, "messages": d.messages, "groups": d.groups,
                        "rolled_back": d.rolled_back,
                        "scheduled_cancelled": d.scheduled_cancelled})
                );
            } else {
                println!(
                    "deleted topic {topic}: {} message(s), {} group(s), {} transaction(s) \
                     rolled back, {} scheduled message(s) cancelled",
                    d.messages, d.groups, d.rolled_back, d.scheduled_cancelled
                );
            }
        }
        TopicCmd::List { json } => {
            let topics = admin.topics().await?;
            let mut view = View::new(
                json,
                &[
                    ("TOPIC", -32),
                    ("START", 10),
                    ("NEXT", 10),
                    ("BYTES", 10),
                    ("OLDEST", 10),
                    ("RETENTION", 10),
                    ("QUEUES", 7),
                    ("CREATED", 24),
                ],
            );
            for t in topics {
                let created = UNIX_EPOCH + Duration::from_millis(t.created_ms);
                view.row(
                    &[
                        t.name.clone(),
                        t.start_offset.to_string(),
                        t.next_offset.to_string(),
                        bytes(t.bytes),
                        oldest(t.oldest_ms),
                        age(t.retention_ms),
                        queues(t.queues),
                        humantime::format_rfc3339_seconds(created).to_string(),
                    ],
                    json!({"name": t.name, "messages": t.next_offset - t.start_offset,
                        "start_offset": t.start_offset, "next_offset": t.next_offset,
                        "retention_ms": t.retention_ms, "retention_bytes": t.retention_bytes,
                        "queues": t.queues,
                        "created_ms": t.created_ms, "bytes": t.bytes, "oldest_ms": t.oldest_ms}),
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(parse_bytes("10GiB"), Ok(10 << 30));
        assert_eq!(parse_bytes("500MB"), Ok(500_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("ten").is_err());
        assert!(parse_bytes("1PB").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
    }
}
