//! `txmq scheduled`: what waits for its delivery time, and cancelling it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use serde_json::json;

use crate::view::View;

#[derive(Debug, Subcommand)]
pub enum ScheduledCmd {
    /// List scheduled messages not yet due, earliest first.
    List {
        /// Only this topic's.
        #[arg(long)]
        topic: Option<String>,
        /// Show at most this many (0: all; fetched a page at a time).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a scheduled message before its time.
    Cancel {
        /// Message id (from the send's receipt or `scheduled list`).
        id: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// `--deliver-after`: a duration such as `30s`, `30m`, `1h30m`.
pub fn parse_after(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("bad duration {text:?}: {e}"))
}

/// `--deliver-at`: an RFC 3339 time such as `2026-12-01T09:00:00Z`.
pub fn parse_at(text: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(text.trim())
        .map_err(|e| format!("bad time {text:?} (RFC 3339, e.g. 2026-12-01T09:00:00Z): {e}"))
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub async fn run(addr: &str, token: &str, cmd: ScheduledCmd) -> anyhow::Result<()> {
    match cmd {
        ScheduledCmd::List { topic, limit, json } => {
            let waiting = crate::access::admin(addr, token)
                .await?
                .scheduled(topic.as_deref().unwrap_or(""), limit)
                .await?;
            let mut view = View::new(
                json,
                &[
                    ("ID", -32),
                    ("TOPIC", -20),
                    ("DELIVER-AT", -24),
                    ("KEY", -16),
                    ("BYTES", 8),
                ],
            );
            for s in waiting {
                view.row(
                    &[
                        s.message_id.clone(),
                        s.topic.clone(),
                        rfc3339(s.deliver_ms),
                        s.key.clone(),
                        s.body_len.to_string(),
                    ],
                    json!({"id": s.message_id, "topic": s.topic, "deliver_ms": s.deliver_ms,
                        "key": s.key, "tag": s.tag, "bytes": s.body_len, "txn": s.txn_id}),
                );
            }
            Ok(())
        }
        ScheduledCmd::Cancel { id, json } => {
            let producer = crate::plain_producer(addr, token).await?;
            let ok = producer.cancel_scheduled(&id).await?;
            if json {
                println!(
                    "{}",
                    json!({"cancelled": id, "topic": ok.topic, "deliver_ms": ok.deliver_ms})
                );
            } else {
                println!(
                    "cancelled {id} (topic {}, was due {})",
                    ok.topic,
                    rfc3339(ok.deliver_ms)
                );
            }
            Ok(())
        }
    }
}
