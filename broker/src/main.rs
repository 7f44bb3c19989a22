//! `txmq-broker`: gather the settings (defaults, `--config` file, `TXMQ_*` environment,
//! flags), bind, print the bound address, serve until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use txmq_broker::config::{self, Config, FlushMode};

// Requests are decoded on the runtime's threads and freed on the writer's: mimalloc's
// per-thread free lists take that cross-thread churn far more cheaply than glibc's arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The txmq transactional message broker.
///
/// Every setting can also be given in the `--config` TOML file (key = flag name with `_`)
/// or as a `TXMQ_<NAME>` environment variable; flags override the environment, which
/// overrides the file. Unset settings take the defaults `--print-config` shows.
#[derive(Debug, Parser, Serialize)]
#[command(name = "txmq-broker", version, about)]
struct Flags {
    /// TOML file with settings (see txmq.sample.toml).
    #[arg(long, env = "TXMQ_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    #[serde(skip)]
    print_config: bool,
    /// Address to listen on; port 0 picks a free port (printed once bound) [default: 127.0.0.1:9876].
    #[arg(long, env = "TXMQ_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory for the broker's data [default: ./txmq-data].
    #[arg(long, env = "TXMQ_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// `sync`: replies wait for fsync (group commit). `async`: replies once in the OS page
    /// cache; survives a broker crash, not a machine crash [default: sync].
    #[arg(long, value_enum, env = "TXMQ_FLUSH")]
    flush: Option<FlushMode>,
    /// Create topics on first use [default: true].
    #[arg(long, env = "TXMQ_AUTO_CREATE_TOPICS")]
    auto_create_topics: Option<bool>,
    /// Age of a prepared transaction at its first check-back [default: 6s].
    #[arg(long, env = "TXMQ_CHECK_TIMEOUT", value_parser = duration_text)]
    check_timeout: Option<String>,
    /// How often the check scheduler runs [default: 1s].
    #[arg(long, env = "TXMQ_CHECK_INTERVAL", value_parser = duration_text)]
    check_interval: Option<String>,
    /// Counted check-backs before a transaction is discarded [default: 15].
    #[arg(long, env = "TXMQ_CHECK_MAX")]
    check_max: Option<u32>,
    /// Waits between check-backs, comma-separated; the last repeats [default: 10s,30s,1m,2m,5m,10m].
    #[arg(long, env = "TXMQ_CHECK_BACKOFF", value_parser = duration_list_text)]
    check_backoff: Option<String>,
    /// How long to wait for a producer's answer to one check [default: 3s].
    #[arg(long, env = "TXMQ_CHECK_REPLY_TIMEOUT", value_parser = duration_text)]
    check_reply_timeout: Option<String>,
    /// How long resolved transactions are remembered [default: 24h].
    #[arg(long, env = "TXMQ_TXN_RETENTION", value_parser = duration_text)]
    txn_retention: Option<String>,
    /// How long a discarded transaction is kept for operators, then purged [default: 7days].
    #[arg(long, env = "TXMQ_DISCARDED_RETENTION", value_parser = duration_text)]
    discarded_retention: Option<String>,
    /// Disk use (0–1) above which new messages are refused with DISK_FULL; 1: never
    /// [default: 0.9].
    #[arg(long, env = "TXMQ_DISK_HIGH_WATERMARK")]
    disk_high_watermark: Option<f64>,
    /// Disk use (0–1) below which new messages are taken again [default: 0.85].
    #[arg(long, env = "TXMQ_DISK_LOW_WATERMARK")]
    disk_low_watermark: Option<f64>,
    /// How long messages are kept; topics may override it [default: 72h].
    #[arg(long, env = "TXMQ_RETENTION", value_parser = duration_text)]
    retention: Option<String>,
    /// Most bytes a topic's log may take before its oldest messages go (0: no limit)
    /// [default: 0].
    #[arg(long, env = "TXMQ_RETENTION_BYTES")]
    retention_bytes: Option<u64>,
    /// How often retention looks for messages to remove [default: 1m].
    #[arg(long, env = "TXMQ_RETENTION_INTERVAL", value_parser = duration_text)]
    retention_interval: Option<String>,
    /// Furthest ahead a message may be scheduled for delivery [default: 40days].
    #[arg(long, env = "TXMQ_MAX_SCHEDULE_DELAY", value_parser = duration_text)]
    max_schedule_delay: Option<String>,
    /// How long a send's idempotency key is remembered: a repeat within it stores
    /// nothing and is answered with the first receipt (0: not remembered) [default: 24h].
    #[arg(long, env = "TXMQ_DEDUP_WINDOW", value_parser = duration_text)]
    dedup_window: Option<String>,
    /// Default lease (invisible duration) of a delivery [default: 30s].
    #[arg(long, env = "TXMQ_LEASE", value_parser = duration_text)]
    lease: Option<String>,
    /// Default window of unacknowledged deliveries per consumer [default: 256].
    #[arg(long, env = "TXMQ_WINDOW")]
    window: Option<u32>,
    /// Deliveries of a message before it goes to the dead-letter queue [default: 16].
    #[arg(long, env = "TXMQ_MAX_ATTEMPTS")]
    max_attempts: Option<u32>,
    /// Redelivery delays after a nack without delay, comma-separated; the last repeats
    /// [default: 1s,5s,10s,30s,1m,2m,…,10m,20m,30m,1h,2h].
    #[arg(long, env = "TXMQ_NACK_BACKOFF", value_parser = duration_list_text)]
    nack_backoff: Option<String>,
    /// Largest message body in bytes [default: 4194304].
    #[arg(long, env = "TXMQ_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<usize>,
    /// Most bytes of half messages in one transaction [default: 33554432].
    #[arg(long, env = "TXMQ_MAX_TXN_BYTES")]
    max_txn_bytes: Option<usize>,
    /// Largest frame on the wire in bytes [default: 16777216].
    #[arg(long, env = "TXMQ_MAX_FRAME_LEN")]
    max_frame_len: Option<usize>,
    /// Most concurrent connections; further ones are refused with TOO_MANY_CONNECTIONS
    /// [default: 10000].
    #[arg(long, env = "TXMQ_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Most topics; creating one more (a send to a new topic, `topic create`) is refused
    /// with LIMIT_REACHED [default: 10000].
    #[arg(long, env = "TXMQ_MAX_TOPICS")]
    max_topics: Option<usize>,
    /// Most subscriptions one connection holds; one more is refused with LIMIT_REACHED
    /// [default: 1000].
    #[arg(long, env = "TXMQ_MAX_SUBSCRIPTIONS_PER_CONNECTION")]
    max_subscriptions_per_connection: Option<usize>,
    /// Most calls (HTTP/2 streams) open at once on one gRPC connection [default: 128].
    #[arg(long, env = "TXMQ_MAX_STREAMS_PER_CONNECTION")]
    max_streams_per_connection: Option<usize>,
    /// Most consumer queues running, one per (group, topic) [default: 100000].
    #[arg(long, env = "TXMQ_MAX_QUEUES")]
    max_queues: Option<usize>,
    /// Most consumer groups with a running queue [default: 10000].
    #[arg(long, env = "TXMQ_MAX_GROUPS")]
    max_groups: Option<usize>,
    /// Time a new connection has to say Hello before it is closed [default: 10s].
    #[arg(long, env = "TXMQ_HANDSHAKE_TIMEOUT", value_parser = duration_text)]
    handshake_timeout: Option<String>,
    /// Time a connection may stay silent (clients ping every 10 s while idle) before it
    /// is closed [default: 60s].
    #[arg(long, env = "TXMQ_IDLE_TIMEOUT", value_parser = duration_text)]
    idle_timeout: Option<String>,
    /// Most requests one connection may have waiting; beyond it the broker stops reading
    /// that connection until answers go out (backpressure) [default: 4096].
    #[arg(long, env = "TXMQ_MAX_IN_FLIGHT")]
    #[serde(rename = "max_in_flight_per_connection")]
    max_in_flight: Option<usize>,
    /// Most bytes of requests one connection may have waiting [default: 67108864].
    #[arg(long, env = "TXMQ_MAX_IN_FLIGHT_BYTES_PER_CONNECTION")]
    max_in_flight_bytes_per_connection: Option<usize>,
    /// Most bytes of requests waiting over all connections [default: 536870912].
    #[arg(long, env = "TXMQ_MAX_IN_FLIGHT_BYTES")]
    max_in_flight_bytes: Option<usize>,
    /// File holding a shared secret that every client must present.
    #[arg(long, env = "TXMQ_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// Serve Prometheus metrics (`/metrics`) and `/health` over HTTP on this address.
    #[arg(long, env = "TXMQ_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Serve the RocketMQ 5 gRPC endpoint (the official Java, Go, Python, Node.js and C#
    /// clients) on this address, or `none` [default: 127.0.0.1:8081].
    #[arg(long, env = "TXMQ_GRPC_LISTEN")]
    grpc_listen: Option<String>,
    /// Serve the RocketMQ Remoting face (classic Java and Go clients, Spring Boot,
    /// mqadmin: name server and broker on one port) on this address, or `none`
    /// [default: 127.0.0.1:10911].
    #[arg(long, env = "TXMQ_REMOTING_LISTEN")]
    remoting_listen: Option<String>,
    /// The address Remoting routes name [default: the bound address].
    #[arg(long, env = "TXMQ_REMOTING_ADVERTISE")]
    remoting_advertise: Option<SocketAddr>,
    /// Queues each topic shows Remoting clients [default: 8].
    #[arg(long, env = "TXMQ_REMOTING_QUEUES")]
    remoting_queues: Option<usize>,
    /// File of `ACCESS_KEY SECRET` lines the gRPC clients must sign their requests with.
    #[arg(long, env = "TXMQ_GRPC_CREDENTIALS_FILE")]
    grpc_credentials_file: Option<PathBuf>,
    /// PEM certificate of every client face, native and gRPC (with --tls-key: TLS, not
    /// plaintext).
    #[arg(long, env = "TXMQ_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "TXMQ_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM certificate authority of a group's nodes: with --tls-cert/--tls-key, the
    /// node port speaks mutual TLS (each node presents its certificate; peers must hold
    /// one this authority signed, naming the host the others reach them at).
    #[arg(long, env = "TXMQ_NODE_TLS_CA")]
    node_tls_ca: Option<PathBuf>,
    /// The node port's own PEM certificate, instead of --tls-cert (with --node-tls-key
    /// and --node-tls-ca).
    #[arg(long, env = "TXMQ_NODE_TLS_CERT")]
    node_tls_cert: Option<PathBuf>,
    /// PEM private key of --node-tls-cert.
    #[arg(long, env = "TXMQ_NODE_TLS_KEY")]
    node_tls_key: Option<PathBuf>,
    /// PEM certificate of the gRPC endpoint, instead of --tls-cert (with --grpc-tls-key).
    #[arg(long, env = "TXMQ_GRPC_TLS_CERT")]
    grpc_tls_cert: Option<PathBuf>,
    /// PEM private key of the gRPC endpoint's certificate.
    #[arg(long, env = "TXMQ_GRPC_TLS_KEY")]
    grpc_tls_key: Option<PathBuf>,
    /// This node's id in a broker group (with --peers); unset: a single broker.
    #[arg(long, env = "TXMQ_NODE_ID")]
    node_id: Option<u64>,
    /// The group's members, `1=HOST:PORT,2=HOST:PORT,3=HOST:PORT`: each node's id and
    /// the address the nodes reach each other at (not the client address).
    #[arg(long, env = "TXMQ_PEERS")]
    peers: Option<String>,
    /// File holding the group's own secret, the same on every node: the nodes present it
    /// to each other on the node port (required with --peers; never a client's token).
    #[arg(long, env = "TXMQ_CLUSTER_SECRET_FILE")]
    cluster_secret_file: Option<PathBuf>,
    /// File holding `NAME SECRET`: the first super user, made at first start (when no
    /// user is stored). There is no default user or password.
    #[arg(long, env = "TXMQ_BOOTSTRAP_ADMIN_FILE")]
    bootstrap_admin_file: Option<PathBuf>,
    /// Every request needs an authenticated user, even before the first one exists.
    #[arg(long, env = "TXMQ_REQUIRE_AUTH", num_args = 0..=1, default_missing_value = "true")]
    require_auth: Option<bool>,
    /// Serve anyone, with no users, on a client listener off loopback (native or gRPC);
    /// without it such a broker refuses to start.
    #[arg(long, env = "TXMQ_ALLOW_ANONYMOUS", num_args = 0..=1, default_missing_value = "true")]
    allow_anonymous: Option<bool>,
    /// A single broker's key file (a random secret, kept apart from the data
    /// directory): users' secrets are sealed under it so they can sign gRPC requests.
    /// A group uses its cluster secret instead.
    #[arg(long, env = "TXMQ_BROKER_KEY_FILE")]
    broker_key_file: Option<PathBuf>,
    /// The host clients reach this group node at (a DNS name for TLS, or the address a
    /// NAT maps to): the others name it to clients they refuse, and gRPC routes name it
    /// [default: the listen address, or the peer host for a wildcard one].
    #[arg(long, env = "TXMQ_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// A group's node snapshots its state and trims its Raft log every this many
    /// entries [default: 20000].
    #[arg(long, env = "TXMQ_SNAPSHOT_ENTRIES")]
    snapshot_entries: Option<u64>,
}

fn duration_text(text: &str) -> Result<String, String> {
    config::parse_duration(text).map(|_| text.to_string())
}

fn duration_list_text(text: &str) -> Result<String, String> {
    config::parse_duration_list(text).map(|_| text.to_string())
}

impl Flags {
    fn into_config(self) -> anyhow::Result<(Config, bool)> {
        // Unset flags serialize to nothing, so the file's values show through.
        let table = toml::Table::try_from(&self).context("flags")?;
        let config = Config::layered(self.config.as_deref(), table).map_err(anyhow::Error::msg)?;
        Ok((config, self.print_config))
    }
}

#[tokio::main]
async fn main() {
    // Before anything else: from here on SIGTERM and SIGINT are caught and remembered, so
    // a signal that arrives while storage opens (before the server first polls its
    // shutdown future) still ends in a clean stop and exit 0, not death by the signal.
    let shutdown = match Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("txmq-broker: cannot install signal handlers: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = serve(shutdown).await {
        eprintln!("txmq-broker: {e:#}");
        std::process::exit(1);
    }
}

async fn serve(signals: Signals) -> anyhow::Result<()> {
    let (config, print) = Flags::parse().into_config()?;
    if print {
        print!("{}", config.to_toml());
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let metrics = match config.metrics_listen {
        Some(at) => Some(txmq_broker::metrics::bind(at).await?),
        None => None,
    };
    txmq_broker::faces::grpc::check_tls(&config).map_err(anyhow::Error::msg)?;
    let grpc = match config.grpc_addr().map_err(anyhow::Error::msg)? {
        Some(at) => Some(
            tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("cannot listen on {at} (grpc-listen)"))?,
        ),
        None => None,
    };
    let grpc_addr = grpc.as_ref().map(|l| l.local_addr()).transpose()?;
    let remoting = match config.remoting_addr().map_err(anyhow::Error::msg)? {
        Some(at) => Some(
            tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("cannot listen on {at} (remoting-listen)"))?,
        ),
        None => None,
    };
    let remoting_addr = remoting.as_ref().map(|l| l.local_addr()).transpose()?;
    let metrics_addr = metrics.as_ref().map(|l| l.local_addr()).transpose()?;
    let data_dir = config.data_dir.clone();
    let flush = config.flush;
    let listeners = txmq_broker::server::Listeners {
        native: listener,
        metrics,
        grpc,
        remoting,
    };
    let serve = txmq_broker::server::serve(listeners, config, signals.wait());
    // Printed once the socket is bound, which is when clients can connect; requests
    // wait for storage inside `run`.
    println!("txmq-broker listening on {addr}");
    if let Some(at) = grpc_addr {
        println!("txmq-broker grpc listening on {at}");
    }
    if let Some(at) = remoting_addr {
        println!("txmq-broker remoting listening on {at}");
    }
    if let Some(at) = metrics_addr {
        println!("txmq-broker metrics listening on {at}");
    }
    tracing::info!(%addr, data_dir = %data_dir.display(), ?flush, "txmq-broker started");
    serve.await.map_err(|e| match e {
        txmq_broker::Error::Storage(e) if e.to_string().contains("lock") => anyhow::anyhow!(
            "data directory {} is in use by another broker ({e})",
            data_dir.display()
        ),
        other => anyhow::Error::new(other),
    })
}

/// SIGTERM and SIGINT, caught from the moment [`Signals::install`] returns.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Replaces the default (fatal) handling of both signals at once; unlike
    /// `tokio::signal::ctrl_c`, which registers only when first polled.
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Completes at the first of either signal, including one that came before this was
    /// first polled.
    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
