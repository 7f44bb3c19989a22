//! The accept loop, the wiring of the parts, and graceful shutdown.
//!
//! Shutdown order: stop accepting, cancel every task, wait for them (bounded), then drop
//! the last writer handle so the writer drains its queue, flushes the WAL and exits, and
//! finally close RocksDB.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::connection;
use crate::delivery::Groups;
use crate::error::{Error, Result};
use crate::ids::IdGen;
use crate::metrics::{self, Metrics};
use crate::storage::Storage;
use crate::storage::writer::{Writer, WriterHandle};
use crate::topics::{Topic, Topics};
use crate::txn::checker::{CheckAnswer, Checker};
use crate::txn::producers::Producers;

/// Everything a connection needs, shared.
#[derive(Debug)]
pub struct Shared {
    /// Settings.
    pub config: Arc<Config>,
    /// Reads.
    pub storage: Arc<Storage>,
    /// Writes.
    pub writer: WriterHandle,
    /// Topic registry.
    pub topics: Arc<Topics>,
    /// Consumer groups.
    pub groups: Groups,
    /// Producer connections by group.
    pub producers: Arc<Producers>,
    /// Where producers' check answers go.
    pub answers: mpsc::Sender<CheckAnswer>,
    /// Connection id source.
    pub connection_ids: AtomicU64,
    /// Subscription id source.
    pub subscription_ids: AtomicU64,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
}

/// Runs a broker on an already-bound listener until `shutdown` completes, binding the
/// metrics address of the configuration (if any) first.
///
/// # Errors
/// The metrics address cannot be bound, or opening storage fails (for example another
/// broker holds the data directory).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let metrics = match config.metrics_listen {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    serve(listener, metrics, config, shutdown).await
}

/// [`run`] with the metrics listener already bound (so a caller can report both
/// addresses before serving).
///
/// # Errors
/// Opening storage fails.
pub async fn serve(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let config = Arc::new(config);
    let dir = config.data_dir.clone();
    let (storage, boot, stored, halves) = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Internal(format!("cannot create {}: {e}", dir.display())))?;
        let storage = Storage::open(&dir)?;
        let boot = storage.next_boot()?;
        let topics = storage.topics()?;
        let halves = storage.count_halves()?;
        Ok::<_, Error>((storage, boot, topics, halves))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    let topics = Arc::new(Topics::default());
    for t in stored {
        topics.insert(Arc::new(Topic::new(
            t.name,
            t.record.id,
            t.record.created_ms,
            t.end,
        )));
    }
    tracing::info!(boot, topics = topics.all().len(), halves, "storage open");
    let metrics = Arc::new(Metrics::new());
    metrics.half_messages_pending.set(halves as i64);

    let (writer, writer_thread) = Writer::spawn(
        storage.clone(),
        topics.clone(),
        Arc::new(IdGen::new(boot)),
        config.clone(),
        metrics.clone(),
    );
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let producers = Arc::new(Producers::default());
    let (answers, answers_rx) = mpsc::channel(1024);
    let checker = Checker::new(
        storage.clone(),
        writer.clone(),
        producers.clone(),
        config.clone(),
        metrics.clone(),
    );
    tracker.spawn(checker.run(answers_rx, cancel.clone()));
    if let Some(listener) = metrics_listener {
        tracing::info!(addr = %listener.local_addr().map_err(|e| Error::Internal(e.to_string()))?, "metrics endpoint");
        tracker.spawn(metrics::serve(
            listener,
            metrics.clone(),
            storage.clone(),
            topics.clone(),
            cancel.clone(),
        ));
    }
    let shared = Arc::new(Shared {
        groups: Groups::new(
            storage.clone(),
            writer.clone(),
            topics.clone(),
            config.clone(),
            metrics.clone(),
            tracker.clone(),
            cancel.clone(),
        ),
        config: config.clone(),
        storage: storage.clone(),
        writer,
        topics,
        producers,
        answers,
        connection_ids: AtomicU64::new(1),
        subscription_ids: AtomicU64::new(1),
        metrics,
    });

    tokio::select! {
        () = accept(&listener, &shared, &tracker, &cancel) => {}
        () = shutdown => tracing::info!("shutting down"),
    }
    drop(listener);
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop within 10 s");
    }
    drop(shared);
    tokio::task::spawn_blocking(move || writer_thread.join())
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    let left = Arc::strong_count(&storage);
    if left > 1 {
        tracing::warn!("{} storage handles still held at close", left - 1);
    }
    drop(storage);
    tracing::info!("stopped");
    Ok(())
}

async fn accept(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
    let mut backoff = Duration::from_millis(5);
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(pair) => {
                backoff = Duration::from_millis(5);
                pair
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin or die.
                tracing::warn!("accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let permit = limit.clone().try_acquire_owned().ok();
        let shared = shared.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            match permit {
                Some(_permit) => {
                    shared.metrics.connections.inc();
                    connection::serve(socket, peer, shared.clone(), cancel).await;
                    shared.metrics.connections.dec();
                }
                None => {
                    shared.metrics.connections_refused.inc();
                    connection::refuse_full(socket, peer).await;
                }
            }
        });
    }
}
