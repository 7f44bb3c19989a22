//! `txmq message`: one message by id with its life, or a topic's by key and time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use serde_json::{Value, json};
use txmq_client::pb;

use crate::view::View;

#[derive(Debug, Subcommand)]
pub enum MessageCmd {
    /// A message by id: where it is, its transaction, and what each group did with it.
    Show {
        /// Message id (from a receipt, a delivery or `message find`).
        id: String,
        /// Print its body too.
        #[arg(long)]
        body: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// A topic's messages by key and stored time, in offset order.
    Find {
        /// Topic.
        #[arg(long)]
        topic: String,
        /// Only those with this key.
        #[arg(long)]
        key: Option<String>,
        /// Stored at or after this time (RFC 3339, or `2h ago`).
        #[arg(long, value_parser = parse_when)]
        since: Option<SystemTime>,
        /// Stored before this time (RFC 3339, or `10m ago`).
        #[arg(long, value_parser = parse_when)]
        until: Option<SystemTime>,
        /// Show at most this many (0: all; fetched a page at a time).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print bodies too.
        #[arg(long)]
        body: bool,
        /// JSON lines.
        #[arg(long)]
        json: bool,
    },
}

/// A point in time: RFC 3339 (`2026-12-01T09:00:00Z`) or `<duration> ago`.
pub fn parse_when(text: &str) -> Result<SystemTime, String> {
    let t = text.trim();
    if let Some(ago) = t.strip_suffix("ago") {
        let d = humantime::parse_duration(ago.trim())
            .map_err(|e| format!("bad duration in {text:?}: {e}"))?;
        return SystemTime::now()
            .checked_sub(d)
            .ok_or_else(|| format!("{text:?} is before the epoch"));
    }
    humantime::parse_rfc3339_weak(t)
        .map_err(|_| format!("bad time {text:?}: an RFC 3339 time or \"2h ago\""))
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn message_json(f: &pb::FoundMessage, body: bool) -> Value {
    let m = f.message.clone().unwrap_or_default();
    let mut v = json!({"message_id": m.message_id, "topic": m.topic, "offset": m.offset,
        "store_ms": m.store_ms, "born_ms": m.born_ms, "key": m.key, "tag": m.tag,
        "properties": m.properties, "size": f.body_len, "txn_id": m.txn_id,
        "deliver_ms": m.deliver_ms, "message_group": m.message_group});
    if body {
        v["body"] = json!(String::from_utf8_lossy(&m.body));
    }
    v
}

pub async fn run(addr: &str, token: &str, cmd: MessageCmd) -> anyhow::Result<()> {
    let admin = crate::access::admin(addr, token).await?;
    match cmd {
        MessageCmd::Show { id, body, json } => {
            let shown = admin.show_message(&id, body).await?;
            let found = shown.message.clone().unwrap_or_default();
            if json {
                let mut v = message_json(&found, body);
                v["state"] = json!(shown.state);
                v["txn_state"] = json!(shown.txn_state);
                v["groups_omitted"] = json!(shown.groups_omitted);
                v["groups"] = shown
                    .groups
                    .iter()
                    .map(|g| {
                        json!({"group": g.group, "state": g.state, "attempts": g.attempts,
                            "at_ms": g.at_ms, "reason": g.reason})
                    })
                    .collect();
                println!("{v}");
                return Ok(());
            }
            let m = found.message.clone().unwrap_or_default();
            println!("message    {}", m.message_id);
            println!("state      {}", shown.state);
            println!("topic      {} offset {}", m.topic, m.offset);
            println!("stored     {}", rfc3339(m.store_ms));
            if m.deliver_ms > 0 {
                println!("scheduled  {}", rfc3339(m.deliver_ms));
            }
            println!("key        {}", m.key);
            println!("tag        {}", m.tag);
            if !m.message_group.is_empty() {
                println!("group      {}", m.message_group);
            }
            for (k, v) in &m.properties {
                println!("property   {k}={v}");
            }
            println!("size       {} bytes", found.body_len);
            if !m.txn_id.is_empty() {
                println!("txn        {} ({})", m.txn_id, shown.txn_state);
            }
            for g in &shown.groups {
                let mut line = format!("consumer   {}: {}", g.group, g.state);
                if g.attempts > 0 {
                    line += &format!(", {} attempt(s)", g.attempts);
                }
                if g.at_ms > 0 {
                    line += &format!(", at {}", rfc3339(g.at_ms));
                }
                if !g.reason.is_empty() {
                    line += &format!(" ({})", g.reason);
                }
                println!("{line}");
            }
            if shown.groups_omitted > 0 {
                println!(
                    "consumer   ({} more groups not shown)",
                    shown.groups_omitted
                );
            }
            if body {
                println!("body       {}", String::from_utf8_lossy(&m.body));
            }
        }
        MessageCmd::Find {
            topic,
            key,
            since,
            until,
            limit,
            body,
            json,
        } => {
            let query = pb::FindMessagesRequest {
                topic,
                key: key.unwrap_or_default(),
                since_ms: since.map_or(0, ms),
                until_ms: until.map_or(0, ms),
                body,
                ..Default::default()
            };
            let found = admin.find_messages(query, limit).await?;
            let mut view = View::new(
                json,
                &[
                    ("OFFSET", 10),
                    ("ID", -32),
                    ("STORED", -24),
                    ("KEY", -16),
                    ("TAG", -12),
                    ("SIZE", 8),
                ],
            );
            for f in &found {
                let m = f.message.clone().unwrap_or_default();
                view.row(
                    &[
                        m.offset.to_string(),
                        m.message_id.clone(),
                        rfc3339(m.store_ms),
                        m.key.clone(),
                        m.tag.clone(),
                        f.body_len.to_string(),
                    ],
                    message_json(f, body),
                );
            }
        }
    }
    Ok(())
}
