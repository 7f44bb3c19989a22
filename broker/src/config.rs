//! Typed broker configuration: every setting with a default that works, validated once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How a success reply relates to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FlushMode {
    /// Every reply to send, commit, rollback or ack waits for an fsync of the write-ahead
    /// log (many requests share one fsync). Nothing acknowledged is lost on a crash.
    Sync,
    /// Replies once the write is in the operating system's page cache. A broker process
    /// crash loses nothing; a machine crash or power loss can lose the last writes.
    Async,
}

/// Everything the broker can be told.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Where RocksDB keeps its files.
    pub data_dir: PathBuf,
    /// Durability of replies.
    pub flush: FlushMode,
    /// Create topics on first send instead of refusing unknown ones.
    pub auto_create_topics: bool,
    /// Largest frame body accepted on the wire.
    pub max_frame_len: usize,
    /// Largest message body.
    pub max_message_bytes: usize,
    /// Most requests one connection may have in flight before the broker stops reading it.
    pub max_in_flight_per_connection: usize,
    /// Most concurrent connections.
    pub max_connections: usize,
    /// Age of a prepared transaction at its first check-back.
    pub check_timeout: Duration,
    /// How often the check scheduler looks for due checks.
    pub check_interval: Duration,
    /// Counted check attempts before a transaction is discarded.
    pub check_max: u32,
    /// Waits between checks; the last one repeats.
    pub check_backoff: Vec<Duration>,
    /// How long the broker waits for a producer's answer to one check.
    pub check_reply_timeout: Duration,
    /// How long resolved transactions are remembered, so late duplicates are recognised.
    pub txn_retention: Duration,
    /// Default lease (invisible duration) of a delivered message.
    pub lease: Duration,
    /// Default window of unacknowledged deliveries per consumer.
    pub window: u32,
    /// Deliveries of one message before it goes to the dead-letter queue.
    pub max_attempts: u32,
    /// Redelivery delays after a nack without delay; the last one repeats.
    pub nack_backoff: Vec<Duration>,
    /// Shared secret every client must present in its handshake (`None`: open).
    pub auth_token: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        let s = Duration::from_secs;
        let m = |n: u64| Duration::from_secs(60 * n);
        Self {
            listen: "127.0.0.1:9876".parse().expect("valid address"),
            data_dir: PathBuf::from("./txmq-data"),
            flush: FlushMode::Sync,
            auto_create_topics: true,
            max_frame_len: txmq_protocol::DEFAULT_MAX_FRAME_LEN,
            max_message_bytes: 4 * 1024 * 1024,
            max_in_flight_per_connection: 4096,
            max_connections: 10_000,
            check_timeout: s(6),
            check_interval: s(1),
            check_max: 15,
            check_backoff: vec![s(10), s(30), m(1), m(2), m(5), m(10)],
            check_reply_timeout: s(3),
            txn_retention: s(24 * 3600),
            lease: s(30),
            window: 256,
            max_attempts: 16,
            nack_backoff: [
                1, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600,
            ]
            .into_iter()
            .map(s)
            .chain([m(20), m(30), m(60), m(120)])
            .collect(),
            auth_token: None,
        }
    }
}

impl Config {
    /// Checks the settings that can be wrong together.
    ///
    /// # Errors
    /// A sentence naming the bad setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.check_backoff.is_empty() {
            return Err("check-backoff needs at least one duration".into());
        }
        if self.nack_backoff.is_empty() {
            return Err("nack-backoff needs at least one duration".into());
        }
        if self.check_interval.is_zero() {
            return Err("check-interval must be more than zero".into());
        }
        if self.check_max == 0 {
            return Err("check-max must be at least 1".into());
        }
        if self.max_attempts == 0 {
            return Err("max-attempts must be at least 1".into());
        }
        if self.window == 0 {
            return Err("window must be at least 1".into());
        }
        if self.max_connections == 0 {
            return Err("max-connections must be at least 1".into());
        }
        if self.max_in_flight_per_connection == 0 {
            return Err("max-in-flight must be at least 1".into());
        }
        if self.max_message_bytes + 64 * 1024 > self.max_frame_len {
            return Err(format!(
                "max-message-bytes ({}) must leave 64 KiB of room under max-frame-len ({})",
                self.max_message_bytes, self.max_frame_len
            ));
        }
        Ok(())
    }

    /// The wait before check number `count + 1`, given `count` counted checks so far.
    pub fn check_wait(&self, count: u32) -> Duration {
        pick(&self.check_backoff, count)
    }

    /// The redelivery delay after the `failures`-th failed delivery (1-based).
    pub fn nack_wait(&self, failures: u32) -> Duration {
        pick(&self.nack_backoff, failures.saturating_sub(1))
    }
}

fn pick(list: &[Duration], index: u32) -> Duration {
    let i = (index as usize).min(list.len() - 1);
    list[i]
}

/// Parses `500ms`, `2s`, `1m`, `1h30m` style durations.
///
/// # Errors
/// A sentence quoting the bad value.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("bad duration {text:?}: {e}"))
}

/// Parses a comma-separated list of durations, e.g. `10s,30s,1m`.
///
/// # Errors
/// A sentence quoting the bad element.
pub fn parse_duration_list(text: &str) -> Result<Vec<Duration>, String> {
    let list = text
        .split(',')
        .map(parse_duration)
        .collect::<Result<Vec<_>, _>>()?;
    if list.is_empty() {
        return Err("empty duration list".into());
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_user_forms() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("soon").is_err());
        assert_eq!(
            parse_duration_list("10s,30s,1m").unwrap(),
            vec![
                Duration::from_secs(10),
                Duration::from_secs(30),
                Duration::from_secs(60)
            ]
        );
        assert!(parse_duration_list("10s,,1m").is_err());
    }

    #[test]
    fn backoff_schedules_repeat_their_last_step() {
        let c = Config::default();
        assert_eq!(c.check_wait(0), Duration::from_secs(10));
        assert_eq!(c.check_wait(5), Duration::from_secs(600));
        assert_eq!(c.check_wait(50), Duration::from_secs(600));
        assert_eq!(c.nack_wait(1), Duration::from_secs(1));
        assert_eq!(c.nack_wait(2), Duration::from_secs(5));
        assert_eq!(c.nack_wait(18), Duration::from_secs(7200));
        assert_eq!(c.nack_wait(99), Duration::from_secs(7200));
        assert_eq!(c.nack_backoff.len(), 18);
    }

    #[test]
    fn defaults_validate() {
        assert!(Config::default().validate().is_ok());
        let bad = Config {
            check_backoff: vec![],
            ..Config::default()
        };
        assert!(bad.validate().is_err());
    }
}
