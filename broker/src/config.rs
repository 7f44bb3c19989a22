//! Typed broker configuration: every setting with a default that works, validated once.
//!
//! Settings come in layers, each overriding the one before: built-in defaults, the TOML
//! file given by `--config` (keys are the flag names with `_`, see `txmq.sample.toml`),
//! `TXMQ_*` environment variables, then command-line flags. [`Config::layered`] merges
//! a file's table with the flags' table and deserializes the result once, so every
//! layer is checked by the same rules and an unknown key is an error, not a no-op.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a success reply relates to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    /// Most bytes of half messages one transaction may hold (its check-back and commit
    /// carry all of them).
    pub max_txn_bytes: usize,
    /// Most requests one connection may have in flight before the broker stops reading it.
    pub max_in_flight_per_connection: usize,
    /// Most bytes of requests one connection may have in flight before the broker stops
    /// reading it.
    pub max_in_flight_bytes_per_connection: usize,
    /// Most bytes of requests in flight over all connections; beyond it the broker stops
    /// reading connections until answers go out.
    pub max_in_flight_bytes: usize,
    /// Most concurrent connections.
    pub max_connections: usize,
    /// Most topics (each costs memory, keys and metric series for ever): creating one
    /// more, by a send or by an operator, is refused with `LIMIT_REACHED`.
    pub max_topics: usize,
    /// Most subscriptions one native connection holds (each a queue consumer with its
    /// own window): one more is refused with `LIMIT_REACHED`.
    pub max_subscriptions_per_connection: usize,
    /// Most calls (HTTP/2 streams) open at once on one gRPC connection.
    pub max_streams_per_connection: usize,
    /// Most consumer queues running, one per (group, topic) (each a task with its
    /// memory and metric series): starting one more is refused with `LIMIT_REACHED`.
    pub max_queues: usize,
    /// Most consumer groups with a running queue: a new one is refused with
    /// `LIMIT_REACHED`.
    pub max_groups: usize,
    /// How long a new connection may take to say Hello before it is closed.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// How long a connection may stay silent (no request, no ping) before it is closed.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Age of a prepared transaction at its first check-back.
    #[serde(with = "duration")]
    pub check_timeout: Duration,
    /// How often the check scheduler looks for due checks.
    #[serde(with = "duration")]
    pub check_interval: Duration,
    /// Counted check attempts before a transaction is discarded.
    pub check_max: u32,
    /// Waits between checks; the last one repeats.
    #[serde(with = "duration_list")]
    pub check_backoff: Vec<Duration>,
    /// How long the broker waits for a producer's answer to one check.
    #[serde(with = "duration")]
    pub check_reply_timeout: Duration,
    /// How long resolved transactions are remembered, so late duplicates are recognised.
    #[serde(with = "duration")]
    pub txn_retention: Duration,
    /// How long a discarded transaction (and its half messages) is kept for operators to
    /// re-arm or resolve, before it is purged.
    #[serde(with = "duration")]
    pub discarded_retention: Duration,
    /// How long messages are kept (per-topic overrides: `topic create|alter --retention`).
    #[serde(with = "duration")]
    pub retention: Duration,
    /// Most bytes a topic's log may take before its oldest messages go (0: no limit).
    pub retention_bytes: u64,
    /// How often retention looks for messages to remove.
    #[serde(with = "duration")]
    pub retention_interval: Duration,
    /// Disk use (of the data directory's file system, 0–1) above which new messages are
    /// refused with `DISK_FULL` (1: never).
    pub disk_high_watermark: f64,
    /// Disk use below which they are taken again.
    pub disk_low_watermark: f64,
    /// Furthest ahead of now a message may be scheduled for delivery.
    #[serde(with = "duration")]
    pub max_schedule_delay: Duration,
    /// How long a send's idempotency key is remembered: a repeat within it stores
    /// nothing and gets the first receipt (0: keys are not remembered).
    #[serde(with = "duration")]
    pub dedup_window: Duration,
    /// Default lease (invisible duration) of a delivered message.
    #[serde(with = "duration")]
    pub lease: Duration,
    /// Default window of unacknowledged deliveries per consumer.
    pub window: u32,
    /// Deliveries of one message before it goes to the dead-letter queue.
    pub max_attempts: u32,
    /// Redelivery delays after a nack without delay; the last one repeats.
    #[serde(with = "duration_list")]
    pub nack_backoff: Vec<Duration>,
    /// File holding the shared secret every client must present (`None`: open).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_token_file: Option<PathBuf>,
    /// The secret itself, read from `auth_token_file` at start; never printed.
    #[serde(skip)]
    pub auth_token: Option<String>,
    /// Where to serve Prometheus metrics and `/health` over HTTP (`None`: not served).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Where to serve the RocketMQ 5 gRPC endpoint (`none`: not served).
    pub grpc_listen: String,
    /// Where to serve the RocketMQ Remoting face (name server and broker on one port,
    /// for the classic Java and Go clients and mqadmin; `none`: not served).
    pub remoting_listen: String,
    /// The address Remoting routes and message ids name (unset: the bound address; a
    /// wildcard one becomes loopback).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remoting_advertise: Option<SocketAddr>,
    /// Queues each topic shows Remoting clients (readable and writable), so a group's
    /// push consumers each take a share in their rebalance.
    pub remoting_queues: usize,
    /// File of access key / secret pairs (one `KEY SECRET` a line, `#` comments) the
    /// gRPC clients sign their requests with (RocketMQ's HMAC-SHA1 `authorization`);
    /// unset: the endpoint takes unsigned requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_credentials_file: Option<PathBuf>,
    /// The pairs themselves, read at start; never printed.
    #[serde(skip)]
    pub grpc_credentials: Vec<(String, String)>,
    /// PEM certificate (chain) of every client face (native and gRPC): with `tls_key`,
    /// they serve TLS instead of plaintext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Both, read at start; the key is never printed.
    #[serde(skip)]
    pub tls: Option<crate::tls::Identity>,
    /// A PEM certificate authority for the node port: with it (and `tls_cert`), nodes
    /// speak mutual TLS to each other, each presenting its certificate and taking only
    /// peers whose certificate this authority signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_tls_ca: Option<PathBuf>,
    /// The authority, read at start.
    #[serde(skip)]
    pub node_tls_ca_pem: Option<Vec<u8>>,
    /// The node port's own certificate, over `tls_cert` (a group's nodes often hold
    /// certificates of a private authority, and clients a public one's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_tls_cert: Option<PathBuf>,
    /// PEM private key for `node_tls_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_tls_key: Option<PathBuf>,
    /// The node port's certificate and key, read at start (its own, or `tls`).
    #[serde(skip)]
    pub node_tls: Option<crate::tls::Identity>,
    /// PEM certificate (chain) of the gRPC endpoint, over `tls_cert`: with
    /// `grpc_tls_key`, it serves TLS instead of plaintext h2c.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// PEM private key for `grpc_tls_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_tls_key: Option<PathBuf>,
    /// Both, read at start (certificate, key); the key is never printed.
    #[serde(skip)]
    pub grpc_tls: Option<(Vec<u8>, Vec<u8>)>,
    /// This node's id in a broker group (with `peers`); unset: a single broker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u64>,
    /// The members of this node's broker group, `1=HOST:PORT,2=HOST:PORT,…`: each node's
    /// id and the address the nodes reach it at (not the client address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers: Option<String>,
    /// File holding the group's own secret, which nodes present to each other on the
    /// node port (required with `peers`; never a client's credential).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_secret_file: Option<PathBuf>,
    /// The secret itself, read from `cluster_secret_file` at start; never printed.
    #[serde(skip)]
    pub cluster_secret: Option<String>,
    /// File holding `NAME SECRET`: the first super user, made when the broker starts
    /// serving with no user stored (and ignored once users exist).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_admin_file: Option<PathBuf>,
    /// The user and secret themselves, read at start; never printed.
    #[serde(skip)]
    pub bootstrap_admin: Option<(String, String)>,
    /// Every request needs an authenticated user, even while none is stored.
    pub require_auth: bool,
    /// Serve anyone, without users, on a client listener off loopback. Without it such
    /// a broker refuses to start: open to the network by accident is the worst default.
    pub allow_anonymous: bool,
    /// A single broker's key file: users' secrets are kept sealed under a key derived
    /// from it (a group derives it from its cluster secret), so users can sign gRPC
    /// requests. Without one, users authenticate on the native face only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_key_file: Option<PathBuf>,
    /// The key file's secret, read at start; never printed.
    #[serde(skip)]
    pub broker_key: Option<String>,
    /// The host clients reach this group node at (a name or an address), told to the
    /// others for their `NOT_LEADER` answers and gRPC routes; unset: the listen address,
    /// or for a wildcard one the host of this node's peer address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_host: Option<String>,
    /// A group's node makes a snapshot (and trims its Raft log) every this many entries.
    pub snapshot_entries: u64,
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
            max_txn_bytes: 32 * 1024 * 1024,
            max_in_flight_per_connection: 4096,
            max_in_flight_bytes_per_connection: 64 << 20,
            max_in_flight_bytes: 512 << 20,
            max_connections: 10_000,
            max_topics: 10_000,
            max_subscriptions_per_connection: 1_000,
            max_streams_per_connection: 128,
            max_queues: 100_000,
            max_groups: 10_000,
            handshake_timeout: s(10),
            idle_timeout: s(60),
            check_timeout: s(6),
            check_interval: s(1),
            check_max: 15,
            check_backoff: vec![s(10), s(30), m(1), m(2), m(5), m(10)],
            check_reply_timeout: s(3),
            txn_retention: s(24 * 3600),
            discarded_retention: s(7 * 24 * 3600),
            max_schedule_delay: s(40 * 24 * 3600),
            dedup_window: s(24 * 3600),
            disk_high_watermark: 0.90,
            disk_low_watermark: 0.85,
            retention: s(72 * 3600),
            retention_bytes: 0,
            retention_interval: s(60),
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
            auth_token_file: None,
            auth_token: None,
            metrics_listen: None,
            grpc_listen: "127.0.0.1:8081".into(),
            remoting_listen: "127.0.0.1:10911".into(),
            remoting_advertise: None,
            remoting_queues: 8,
            grpc_credentials_file: None,
            grpc_credentials: Vec::new(),
            tls_cert: None,
            tls_key: None,
            tls: None,
            node_tls_ca: None,
            node_tls_ca_pem: None,
            node_tls_cert: None,
            node_tls_key: None,
            node_tls: None,
            grpc_tls_cert: None,
            grpc_tls_key: None,
            grpc_tls: None,
            node_id: None,
            advertise_host: None,
            peers: None,
            cluster_secret_file: None,
            bootstrap_admin_file: None,
            bootstrap_admin: None,
            require_auth: false,
            allow_anonymous: false,
            broker_key_file: None,
            broker_key: None,
            cluster_secret: None,
            snapshot_entries: 20_000,
        }
    }
}

impl Config {
    /// Builds the configuration from a TOML file's table (if any) overlaid by the
    /// flags' table (flags and environment variables), over the defaults; then reads
    /// the auth token file and validates.
    ///
    /// # Errors
    /// A sentence naming the bad key or value, or the unreadable file.
    pub fn layered(file: Option<&Path>, flags: toml::Table) -> Result<Self, String> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
                text.parse::<toml::Table>()
                    .map_err(|e| format!("config file {}: {e}", path.display()))?
            }
            None => toml::Table::new(),
        };
        table.extend(flags);
        let mut config = Config::deserialize(toml::Value::Table(table)).map_err(|e| {
            let origin = file.map_or("settings".to_string(), |p| p.display().to_string());
            format!("{origin}: {}", e.message())
        })?;
        config.auth_token = match &config.auth_token_file {
            Some(path) => Some(read_secret(path, "auth-token-file")?),
            None => None,
        };
        config.cluster_secret = match &config.cluster_secret_file {
            Some(path) => Some(read_secret(path, "cluster-secret-file")?),
            None => None,
        };
        config.broker_key = match &config.broker_key_file {
            Some(path) => Some(read_secret(path, "broker-key-file")?),
            None => None,
        };
        if let Some(path) = &config.bootstrap_admin_file {
            config.bootstrap_admin = Some(read_admin(path)?);
        }
        if let Some(path) = &config.grpc_credentials_file {
            config.grpc_credentials = read_credentials(path)?;
        }
        config.tls = match (&config.tls_cert, &config.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(crate::tls::Identity {
                cert: read_pem(cert, "tls-cert", "CERTIFICATE")?,
                key: read_pem(key, "tls-key", "PRIVATE KEY")?,
            }),
            _ => return Err("tls-cert and tls-key go together".into()),
        };
        config.grpc_tls = match (&config.grpc_tls_cert, &config.grpc_tls_key) {
            (None, None) => config.tls.as_ref().map(|t| (t.cert.clone(), t.key.clone())),
            (Some(cert), Some(key)) => Some((
                read_pem(cert, "grpc-tls-cert", "CERTIFICATE")?,
                read_pem(key, "grpc-tls-key", "PRIVATE KEY")?,
            )),
            _ => return Err("grpc-tls-cert and grpc-tls-key go together".into()),
        };
        config.node_tls = match (&config.node_tls_cert, &config.node_tls_key) {
            (None, None) => config.tls.clone(),
            (Some(cert), Some(key)) => Some(crate::tls::Identity {
                cert: read_pem(cert, "node-tls-cert", "CERTIFICATE")?,
                key: read_pem(key, "node-tls-key", "PRIVATE KEY")?,
            }),
            _ => return Err("node-tls-cert and node-tls-key go together".into()),
        };
        if let Some(ca) = &config.node_tls_ca {
            if config.node_tls.is_none() {
                return Err("node-tls-ca needs a certificate for the node port \
                            (node-tls-cert and node-tls-key, or tls-cert and tls-key): \
                            each node presents its certificate to the others"
                    .into());
            }
            config.node_tls_ca_pem = Some(read_pem(ca, "node-tls-ca", "CERTIFICATE")?);
        } else if config.node_tls_cert.is_some() {
            return Err("node-tls-cert needs node-tls-ca: the authority the nodes' \
                        certificates are checked against"
                .into());
        }
        config.validate()?;
        Ok(config)
    }

    /// The effective configuration as TOML, as `--print-config` shows it (the auth
    /// token is never shown, only its file).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("every setting serializes")
    }

    /// Checks the settings that can be wrong together.
    ///
    /// # Errors
    /// A sentence naming the bad setting.
    /// The broker group this node belongs to, `None` for a single broker.
    ///
    /// # Errors
    /// Only one of `node-id` and `peers` is set, or the peers are malformed.
    pub fn group(&self) -> Result<Option<crate::replication::Peers>, String> {
        match (self.node_id, &self.peers) {
            (None, None) => Ok(None),
            (Some(id), Some(peers)) => crate::replication::Peers::parse(id, peers)
                .map(Some)
                .map_err(|e| format!("peers: {e}")),
            (Some(_), None) => Err("node-id needs peers (the group's members)".into()),
            (None, Some(_)) => Err("peers needs node-id (which of them this node is)".into()),
        }
    }

    /// The address of the gRPC endpoint, `None` when it is off.
    ///
    /// # Errors
    /// Neither `none` nor an address.
    pub fn grpc_addr(&self) -> Result<Option<SocketAddr>, String> {
        match self.grpc_listen.trim() {
            "none" | "" => Ok(None),
            text => text.parse().map(Some).map_err(|e| {
                format!("grpc-listen {text:?} is neither an address (HOST:PORT) nor none: {e}")
            }),
        }
    }

    /// The address of the Remoting face, `None` when it is off.
    ///
    /// # Errors
    /// Neither `none` nor an address.
    pub fn remoting_addr(&self) -> Result<Option<SocketAddr>, String> {
        match self.remoting_listen.trim() {
            "none" | "" => Ok(None),
            text => text.parse().map(Some).map_err(|e| {
                format!("remoting-listen {text:?} is neither an address (HOST:PORT) nor none: {e}")
            }),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(1..=crate::service::admin::MAX_QUEUES as usize).contains(&self.remoting_queues) {
            return Err(format!(
                "remoting-queues is {}; it is 1 to 64",
                self.remoting_queues
            ));
        }
        if self.group()?.is_some() {
            let Some(secret) = &self.cluster_secret else {
                return Err(
                    "a broker group's node needs cluster-secret-file: a file holding the \
                     group's own secret, the same on every node, which the nodes present to \
                     each other on the node port (not a client's token; a running group is \
                     stopped once to add it)"
                        .into(),
                );
            };
            let clients = self
                .auth_token
                .iter()
                .chain(self.grpc_credentials.iter().map(|(_, s)| s));
            if clients.into_iter().any(|c| c == secret) {
                return Err(
                    "cluster-secret-file holds a client's credential (the auth token or a \
                     gRPC secret): the node port must not take what clients hold"
                        .into(),
                );
            }
        } else if self.cluster_secret_file.is_some() {
            return Err("cluster-secret-file is for a broker group's node (with peers)".into());
        }
        if let Some(host) = &self.advertise_host {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            if !(is_host_name(bare) || bare.parse::<std::net::IpAddr>().is_ok()) {
                return Err(format!(
                    "advertise-host {host:?} is neither a host name nor an IP address (no port: \
                     each listener's own is used)"
                ));
            }
            if self.node_id.is_none() {
                return Err("advertise-host is for a broker group's node (with node-id)".into());
            }
        }
        if self.snapshot_entries == 0 {
            return Err("snapshot-entries must be at least 1".into());
        }
        if self.grpc_addr()?.is_some()
            && self.auth_token_file.is_some()
            && self.grpc_credentials_file.is_none()
        {
            return Err(
                "auth-token-file protects the native port only: give the gRPC endpoint its \
                 credentials too (grpc-credentials-file), or turn it off \
                 (grpc-listen = \"none\")"
                    .into(),
            );
        }
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
        if !(0.0..=1.0).contains(&self.disk_high_watermark)
            || !(0.0..=1.0).contains(&self.disk_low_watermark)
            || self.disk_low_watermark > self.disk_high_watermark
        {
            return Err(format!(
                "disk-low-watermark ({}) and disk-high-watermark ({}) must be fractions \
                 between 0 and 1, low not above high",
                self.disk_low_watermark, self.disk_high_watermark
            ));
        }
        if self.retention.is_zero() || self.retention_interval.is_zero() {
            return Err("retention and retention-interval must be more than zero".into());
        }
        if self.handshake_timeout.is_zero() || self.idle_timeout.is_zero() {
            return Err("handshake-timeout and idle-timeout must be more than zero".into());
        }
        if self.max_connections == 0 {
            return Err("max-connections must be at least 1".into());
        }
        if self.max_topics == 0 {
            return Err("max-topics must be at least 1".into());
        }
        if self.max_queues == 0 || self.max_groups == 0 {
            return Err("max-queues and max-groups must be at least 1".into());
        }
        if !(1..=4096).contains(&self.max_streams_per_connection) {
            return Err("max-streams-per-connection must be between 1 and 4096".into());
        }
        if self.max_subscriptions_per_connection == 0 {
            return Err("max-subscriptions-per-connection must be at least 1".into());
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
        if self.max_in_flight_bytes < self.max_frame_len
            || self.max_in_flight_bytes_per_connection == 0
        {
            return Err(format!(
                "max-in-flight-bytes ({}) must be at least max-frame-len ({}), and \
                 max-in-flight-bytes-per-connection more than 0",
                self.max_in_flight_bytes, self.max_frame_len
            ));
        }
        if self.max_txn_bytes < self.max_message_bytes {
            return Err(format!(
                "max-txn-bytes ({}) must be at least max-message-bytes ({})",
                self.max_txn_bytes, self.max_message_bytes
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

/// Serde for a duration as text (`"6s"`, `"1h 30m"`).
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Serde for a list of durations: an array of texts or one comma-separated text.
mod duration_list {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(list: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        let text: Vec<String> = list
            .iter()
            .map(|d| humantime::format_duration(*d).to_string())
            .collect();
        s.serialize_str(&text.join(","))
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Text(String),
        List(Vec<String>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let text = match Form::deserialize(d)? {
            Form::Text(t) => t,
            Form::List(l) => l.join(","),
        };
        super::parse_duration_list(&text).map_err(serde::de::Error::custom)
    }
}

/// Reads a PEM file that must hold a `what` block.
fn read_pem(path: &std::path::Path, setting: &str, what: &str) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("cannot read {setting} {}: {e}", path.display()))?;
    if !String::from_utf8_lossy(&pem).contains(what) {
        return Err(format!("{setting} {} holds no PEM {what}", path.display()));
    }
    Ok(pem)
}

/// Reads a secret from the file of setting `name`: its content without surrounding
/// white space, not empty.
fn read_secret(path: &std::path::Path, name: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {name} {}: {e}", path.display()))?;
    let secret = text.trim().to_string();
    if secret.is_empty() {
        return Err(format!("{name} {} is empty", path.display()));
    }
    Ok(secret)
}

/// Reads a credentials file: one `ACCESS_KEY SECRET` a line; blank lines and `#`
/// comments are skipped.
fn read_credentials(path: &std::path::Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read grpc-credentials-file {}: {e}", path.display()))?;
    let mut pairs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some(key), Some(secret), None) => pairs.push((key.to_string(), secret.to_string())),
            _ => {
                return Err(format!(
                    "grpc-credentials-file {} line {}: expected ACCESS_KEY SECRET",
                    path.display(),
                    n + 1
                ));
            }
        }
    }
    if pairs.is_empty() {
        return Err(format!(
            "grpc-credentials-file {} holds no ACCESS_KEY SECRET line",
            path.display()
        ));
    }
    Ok(pairs)
}

/// Reads the bootstrap admin file: one `NAME SECRET` line (`#` comments).
fn read_admin(path: &std::path::Path) -> Result<(String, String), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read bootstrap-admin-file {}: {e}", path.display()))?;
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let bad = || {
        format!(
            "bootstrap-admin-file {} must hold one line NAME SECRET",
            path.display()
        )
    };
    let line = lines.next().ok_or_else(bad)?;
    if lines.next().is_some() {
        return Err(bad());
    }
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(name), Some(secret), None) => {
            crate::auth::check_user_name(name)
                .map_err(|e| format!("bootstrap-admin-file {}: {e}", path.display()))?;
            if secret.len() < crate::auth::MIN_SECRET {
                return Err(format!(
                    "bootstrap-admin-file {}: the secret is shorter than {} bytes",
                    path.display(),
                    crate::auth::MIN_SECRET
                ));
            }
            Ok((name.to_string(), secret.to_string()))
        }
        _ => Err(bad()),
    }
}

/// Whether `text` is a host name clients can be given (letters, digits, `-` and `.`).
pub fn is_host_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
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
    fn layers_override_in_order_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("txmq.toml");
        std::fs::write(
            &file,
            "lease = \"10s\"\nwindow = 64\ncheck_backoff = [\"1s\", \"2s\"]\nflush = \"async\"\n",
        )
        .unwrap();
        let mut flags = toml::Table::new();
        flags.insert("window".into(), toml::Value::Integer(8));
        let c = Config::layered(Some(&file), flags).unwrap();
        assert_eq!(c.lease, Duration::from_secs(10), "file over default");
        assert_eq!(c.window, 8, "flag over file");
        assert_eq!(c.flush, FlushMode::Async);
        assert_eq!(
            c.check_backoff,
            vec![Duration::from_secs(1), Duration::from_secs(2)]
        );
        assert_eq!(c.max_attempts, 16, "default kept");
        // What --print-config shows reads back to the same settings.
        let printed = dir.path().join("printed.toml");
        std::fs::write(&printed, c.to_toml()).unwrap();
        let again = Config::layered(Some(&printed), toml::Table::new()).unwrap();
        assert_eq!(again.to_toml(), c.to_toml());

        std::fs::write(&file, "leese = \"10s\"\n").unwrap();
        let err = Config::layered(Some(&file), toml::Table::new()).unwrap_err();
        assert!(err.contains("unknown field `leese`"), "{err}");
        std::fs::write(&file, "lease = \"soon\"\n").unwrap();
        let err = Config::layered(Some(&file), toml::Table::new()).unwrap_err();
        assert!(err.contains("bad duration \"soon\""), "{err}");
    }

    #[test]
    fn the_sample_file_is_the_defaults() {
        // Run time, not build time: the build cache may be shared by several clones.
        let root = std::env::var("CARGO_MANIFEST_DIR").unwrap_or(env!("CARGO_MANIFEST_DIR").into());
        let sample = Path::new(&root).join("../txmq.sample.toml");
        let c = Config::layered(Some(&sample), toml::Table::new()).unwrap();
        assert_eq!(c.to_toml(), Config::default().to_toml());
    }

    /// Issue 26, item 4: a group's node needs its own secret, never a client's.
    #[test]
    fn a_group_node_needs_a_cluster_secret_of_its_own() {
        let node = Config {
            node_id: Some(1),
            peers: Some("1=127.0.0.1:9911".into()),
            ..Config::default()
        };
        let err = node.validate().unwrap_err();
        assert!(err.contains("cluster-secret-file"), "{err}");
        let clients = Config {
            cluster_secret: Some("s3cret".into()),
            auth_token: Some("s3cret".into()),
            ..node.clone()
        };
        let err = clients.validate().unwrap_err();
        assert!(err.contains("client's credential"), "{err}");
        let good = Config {
            cluster_secret: Some("group-secret".into()),
            auth_token: Some("s3cret".into()),
            grpc_listen: "none".into(),
            ..node
        };
        assert_eq!(good.validate(), Ok(()));
        let single = Config {
            cluster_secret_file: Some("/etc/txmq/cluster-secret".into()),
            ..Config::default()
        };
        assert!(single.validate().is_err());
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
