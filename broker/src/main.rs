//! `txmq-broker`: parse flags, bind, print the bound address, serve until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use txmq_broker::config::{self, Config, FlushMode};

/// The txmq transactional message broker.
#[derive(Debug, Parser)]
#[command(name = "txmq-broker", version, about)]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed once bound).
    #[arg(long, default_value = "127.0.0.1:9876", env = "TXMQ_LISTEN")]
    listen: SocketAddr,
    /// Directory for the broker's data.
    #[arg(long, default_value = "./txmq-data", env = "TXMQ_DATA_DIR")]
    data_dir: PathBuf,
    /// `sync`: replies wait for fsync (group commit). `async`: replies once in the OS page
    /// cache; survives a broker crash, not a machine crash.
    #[arg(long, value_enum, default_value = "sync", env = "TXMQ_FLUSH")]
    flush: FlushMode,
    /// Create topics on first use.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    auto_create_topics: bool,
    /// Age of a prepared transaction at its first check-back.
    #[arg(long, default_value = "6s", value_parser = config::parse_duration)]
    check_timeout: Duration,
    /// How often the check scheduler runs.
    #[arg(long, default_value = "1s", value_parser = config::parse_duration)]
    check_interval: Duration,
    /// Counted check-backs before a transaction is discarded.
    #[arg(long, default_value_t = 15)]
    check_max: u32,
    /// Waits between check-backs, comma-separated; the last repeats.
    #[arg(long, default_value = "10s,30s,1m,2m,5m,10m", value_parser = config::parse_duration_list)]
    check_backoff: DurationList,
    /// How long to wait for a producer's answer to one check.
    #[arg(long, default_value = "3s", value_parser = config::parse_duration)]
    check_reply_timeout: Duration,
    /// How long resolved transactions are remembered.
    #[arg(long, default_value = "24h", value_parser = config::parse_duration)]
    txn_retention: Duration,
    /// Default lease (invisible duration) of a delivery.
    #[arg(long, default_value = "30s", value_parser = config::parse_duration)]
    lease: Duration,
    /// Default window of unacknowledged deliveries per consumer.
    #[arg(long, default_value_t = 256)]
    window: u32,
    /// Deliveries of a message before it goes to the dead-letter queue.
    #[arg(long, default_value_t = 16)]
    max_attempts: u32,
    /// Redelivery delays after a nack without delay, comma-separated; the last repeats.
    #[arg(long, value_parser = config::parse_duration_list)]
    nack_backoff: Option<DurationList>,
    /// Largest message body in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    max_message_bytes: usize,
    /// Most concurrent connections; further ones are refused with TOO_MANY_CONNECTIONS.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Most requests one connection may have waiting; beyond it the broker stops reading
    /// that connection until answers go out (backpressure).
    #[arg(long, default_value_t = 4096)]
    max_in_flight: usize,
    /// File holding a shared secret that every client must present.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
}

type DurationList = Vec<Duration>;

impl Args {
    fn into_config(self) -> anyhow::Result<Config> {
        let defaults = Config::default();
        let auth_token = match &self.auth_token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --auth-token-file {}", path.display()))?;
                let token = text.trim().to_string();
                anyhow::ensure!(!token.is_empty(), "{} is empty", path.display());
                Some(token)
            }
            None => None,
        };
        let config = Config {
            listen: self.listen,
            data_dir: self.data_dir,
            flush: self.flush,
            auto_create_topics: self.auto_create_topics,
            check_timeout: self.check_timeout,
            check_interval: self.check_interval,
            check_max: self.check_max,
            check_backoff: self.check_backoff,
            check_reply_timeout: self.check_reply_timeout,
            txn_retention: self.txn_retention,
            lease: self.lease,
            window: self.window,
            max_attempts: self.max_attempts,
            nack_backoff: self.nack_backoff.unwrap_or(defaults.nack_backoff),
            max_message_bytes: self.max_message_bytes,
            max_connections: self.max_connections,
            max_in_flight_per_connection: self.max_in_flight,
            auth_token,
            ..defaults
        };
        config.validate().map_err(anyhow::Error::msg)?;
        Ok(config)
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = serve().await {
        eprintln!("txmq-broker: {e:#}");
        std::process::exit(1);
    }
}

async fn serve() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = Args::parse().into_config()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let data_dir = config.data_dir.clone();
    let flush = config.flush;
    let serve = txmq_broker::run(listener, config, shutdown_signal());
    // Printed once storage is open? No: printed once the socket is bound, which is when
    // clients can connect; requests wait for storage inside `run`.
    println!("txmq-broker listening on {addr}");
    tracing::info!(%addr, data_dir = %data_dir.display(), ?flush, "txmq-broker started");
    serve.await.map_err(|e| match e {
        txmq_broker::Error::Storage(e) if e.to_string().contains("lock") => anyhow::anyhow!(
            "data directory {} is in use by another broker ({e})",
            data_dir.display()
        ),
        other => anyhow::Error::new(other),
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
