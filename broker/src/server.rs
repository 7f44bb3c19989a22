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

use crate::cmd::Shared;
use crate::config::Config;
use crate::connection;
use crate::delivery::Groups;
use crate::error::{Error, Result};
use crate::ids::IdGen;
use crate::metrics::{self, Metrics};
use crate::replication::lease::Serving;
use crate::replication::node::{Addresses, Leadership, Node};
use crate::retention::Sweeper;
use crate::storage::writer::{Command, Op, Replicator, Writer};
use crate::storage::{Cf, keys};
use crate::storage::{Owner, Storage, StorageHandle};
use crate::timer::Timer;
use crate::topics::{Topic, Topics};
use crate::txn::checker::Checker;
use crate::txn::producers::Producers;

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
    let grpc = match config.grpc_addr().map_err(Error::Invalid)? {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Internal(format!("cannot listen on {addr}: {e}")))?,
        ),
        None => None,
    };
    let listeners = Listeners {
        native: listener,
        metrics,
        grpc,
    };
    serve(listeners, config, shutdown).await
}

/// The sockets a broker serves, bound before it starts (so a caller can report them).
#[derive(Debug)]
pub struct Listeners {
    /// The native protocol.
    pub native: TcpListener,
    /// Prometheus metrics and `/health`, if served.
    pub metrics: Option<TcpListener>,
    /// The RocketMQ 5 gRPC endpoint, if served.
    pub grpc: Option<TcpListener>,
}

/// [`run`] with the metrics listener already bound (so a caller can report both
/// addresses before serving).
///
/// If a sync of the write-ahead log fails, storage is failed for good (every write is
/// refused, `/health` says why): the broker then stops every task and connection, closes
/// the database and opens it again, recovering to what is on disk, and serves on the same
/// listener. Clients reconnect. Reopening is retried with backoff while it fails.
///
/// # Errors
/// Opening storage fails at start.
pub async fn serve(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let Listeners {
        native: listener,
        metrics: metrics_listener,
        grpc: grpc_listener,
    } = listeners;
    let config = Arc::new(config);
    let grpc_live = Arc::new(crate::grpc::Live::default());
    let metrics = Arc::new(Metrics::new());
    let live = Arc::new(metrics::Live::default());
    let endpoint_stop = CancellationToken::new();
    let endpoint = match metrics_listener {
        Some(listener) => {
            tracing::info!(addr = %listener.local_addr().map_err(|e| Error::Internal(e.to_string()))?, "metrics endpoint");
            Some(tokio::spawn(metrics::serve(
                listener,
                metrics.clone(),
                live.clone(),
                endpoint_stop.clone(),
            )))
        }
        None => None,
    };
    // Where the gRPC endpoint really listens (a port 0 in the configuration is chosen
    // at bind): a broker group's routes name it.
    let grpc_bound = grpc_listener.as_ref().and_then(|l| l.local_addr().ok());
    let grpc = grpc_listener.map(|listener| {
        tokio::spawn(crate::grpc::serve(
            listener,
            grpc_live.clone(),
            config.clone(),
            endpoint_stop.clone(),
        ))
    });
    let mut shutdown = std::pin::pin!(shutdown);
    let faces = Faces {
        live: &live,
        grpc: &grpc_live,
    };
    let result = match config.group().map_err(Error::Invalid)? {
        Some(peers) => {
            serve_group(
                &listener,
                peers,
                grpc_bound,
                &config,
                &metrics,
                faces,
                &mut shutdown,
            )
            .await
        }
        None => serve_single(&listener, &config, &metrics, faces, &mut shutdown).await,
    };
    endpoint_stop.cancel();
    if let Some(endpoint) = endpoint {
        let _ = endpoint.await;
    }
    if let Some(mut grpc) = grpc {
        // Its graceful stop waits for open calls; a client that stopped reading would
        // hold it forever.
        if tokio::time::timeout(Duration::from_secs(5), &mut grpc)
            .await
            .is_err()
        {
            tracing::warn!("grpc endpoint did not stop within 5 s; closing it");
            grpc.abort();
        }
    }
    if result.is_ok() {
        tracing::info!("stopped");
    }
    result
}

/// A single broker: serves its storage, and reopens it after a failure.
async fn serve_single(
    listener: &TcpListener,
    config: &Arc<Config>,
    metrics: &Arc<Metrics>,
    faces: Faces<'_>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<()> {
    let mut storage = open(config).await;
    loop {
        let owner = match storage {
            Ok(owner) => owner,
            Err(e) => break Err(e),
        };
        let served = run_once(
            listener,
            owner.lend(),
            config,
            metrics,
            faces,
            shutdown,
            None,
        )
        .await;
        // Every handle is back (or `run_once` said it could not be): dropping the owner
        // closes the database, so that a reopen finds it unlocked.
        drop(owner);
        match served {
            Ok(Stop::Shutdown | Stop::Deposed) => break Ok(()),
            Ok(Stop::StorageFailed(why)) => {
                tracing::warn!("reopening storage to recover to what is on disk");
                storage = match reopen(listener, config, shutdown, &why).await {
                    Some(opened) => Ok(opened),
                    None => break Ok(()),
                };
            }
            Err(e) => break Err(e),
        }
    }
}

/// A node of a broker group: follows (answering clients `NOT_LEADER`) until it leads,
/// serves while it leads, and follows again when its leadership ends.
async fn serve_group(
    listener: &TcpListener,
    peers: crate::replication::Peers,
    grpc_addr: Option<std::net::SocketAddr>,
    config: &Arc<Config>,
    metrics: &Arc<Metrics>,
    faces: Faces<'_>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<()> {
    // What the others tell clients: a wildcard address (0.0.0.0) is no address to
    // give a client, so the host the nodes reach this one at stands in for it.
    let host = peers
        .my_addr()
        .rsplit_once(':')
        .map_or("127.0.0.1", |(h, _)| h)
        .to_string();
    let advertise = |a: std::net::SocketAddr| match &config.advertise_host {
        Some(h) if h.contains(':') && !h.starts_with('[') => format!("[{h}]:{}", a.port()),
        Some(h) => format!("{h}:{}", a.port()),
        None if a.ip().is_unspecified() => format!("{host}:{}", a.port()),
        None => a.to_string(),
    };
    let addresses = Addresses {
        client: advertise(
            listener
                .local_addr()
                .map_err(|e| Error::Internal(e.to_string()))?,
        ),
        grpc: grpc_addr.map(advertise),
    };
    let node = Node::start(config, peers, addresses).await?;
    faces.grpc.join_group(node.clone());
    faces.live.join_group(node.clone());
    let result = loop {
        let leadership = tokio::select! {
            leading = node.leading() => match leading {
                Some(l) => l,
                None => break Err(Error::Internal("raft stopped".into())),
            },
            () = shutdown.as_mut() => break Ok(()),
            () = refuse_followers(listener, &node, config.max_connections) => continue,
        };
        let Some(storage) = node.slot.get() else {
            continue;
        };
        let leading = Leading {
            node: &node,
            leadership,
        };
        match run_once(
            listener,
            storage,
            config,
            metrics,
            faces,
            shutdown,
            Some(leading),
        )
        .await
        {
            Ok(Stop::Shutdown) => break Ok(()),
            Ok(Stop::Deposed) => tracing::info!("no longer leading the group: following"),
            Ok(Stop::StorageFailed(why)) => break Err(Error::StorageFailed(why)),
            Err(e) => break Err(e),
        }
    };
    node.shutdown().await;
    result
}

/// Answers every connection `NOT_LEADER` (with the leader's address when known), until
/// dropped.
async fn refuse_followers(listener: &TcpListener, node: &Arc<Node>, limit: usize) {
    let open = Arc::new(Semaphore::new(limit));
    loop {
        if let Ok((socket, peer)) = listener.accept().await {
            let Ok(permit) = open.clone().try_acquire_owned() else {
                drop(socket);
                continue;
            };
            let node = node.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let leader = node.leader_address().await;
                connection::refuse_not_leader(socket, peer, leader).await;
            });
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What [`run_once`] needs to serve as a broker group's leader.
struct Leading<'a> {
    node: &'a Arc<Node>,
    leadership: Leadership,
}

/// Why [`run_once`] returned.
enum Stop {
    /// The shutdown future completed.
    Shutdown,
    /// This node stopped leading its group.
    Deposed,
    /// Storage failed, for this reason: reopen it.
    StorageFailed(String),
}

/// Opens storage again after a failure, retrying with backoff; meanwhile every new
/// connection is told why and closed. `None` when shutdown came first.
async fn reopen(
    listener: &TcpListener,
    config: &Config,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    why: &str,
) -> Option<Owner> {
    let mut wait = Duration::from_millis(200);
    loop {
        let attempt = async {
            match open(config).await {
                Ok(storage) => Some(storage),
                Err(e) => {
                    tracing::error!("reopening storage failed: {e}; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                    None
                }
            }
        };
        tokio::select! {
            opened = attempt => if let Some(storage) = opened {
                tracing::info!("storage reopened");
                return Some(storage);
            },
            () = shutdown.as_mut() => return None,
            () = refuse_all(listener, why) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

/// Answers every connection with the reason writes are refused, until dropped.
async fn refuse_all(listener: &TcpListener, why: &str) {
    loop {
        if let Ok((socket, peer)) = listener.accept().await {
            let why = why.to_string();
            tokio::spawn(async move { connection::refuse_recovering(socket, peer, &why).await });
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Opens storage off the async threads.
async fn open(config: &Config) -> Result<Owner> {
    let (dir, window) = (config.data_dir.clone(), config.dedup_window);
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Internal(format!("cannot create {}: {e}", dir.display())))?;
        let storage = Storage::open(&dir)?;
        storage.set_dedup_window(window);
        Ok(Owner::new(storage))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
}

/// Serves one opened storage until shutdown or until it fails; then stops every task,
/// joins the writer and closes the database.
/// What outside the accept loop shows the broker's current parts: `/health` and the
/// gRPC endpoint (set while a storage is open, cleared while it is reopened).
#[derive(Clone, Copy)]
struct Faces<'a> {
    live: &'a metrics::Live,
    grpc: &'a crate::grpc::Live,
}

async fn run_once(
    listener: &TcpListener,
    storage: StorageHandle,
    config: &Arc<Config>,
    metrics: &Arc<Metrics>,
    faces: Faces<'_>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    leading: Option<Leading<'_>>,
) -> Result<Stop> {
    let live = faces.live;
    let replicated = leading.is_some();
    let (boot, stored, halves, scheduled) = {
        let storage = storage.clone();
        tokio::task::spawn_blocking(move || {
            // A group's leader writes its boot number through the log, below.
            let boot = if replicated {
                storage.boot()? + 1
            } else {
                storage.next_boot()?
            };
            let topics = storage.topics()?;
            let halves = storage.count_halves()?;
            let scheduled = storage.count_scheduled()?;
            Ok::<_, Error>((boot, topics, halves, scheduled))
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??
    };
    let topics = Arc::new(Topics::default());
    for t in stored {
        topics.insert(Arc::new(Topic::from_record(t.name, &t.record, t.end)));
    }
    tracing::info!(
        boot,
        topics = topics.all().len(),
        halves,
        scheduled,
        "storage open"
    );
    metrics.half_messages_pending.set(halves as i64);
    metrics.scheduled_pending.set(scheduled as i64);

    let deposed = CancellationToken::new();
    let replicator = leading.as_ref().map(|l| Replicator {
        raft: l.node.raft.clone(),
        leader: l.leadership.leader,
        runtime: tokio::runtime::Handle::current(),
        deposed: deposed.clone(),
    });
    let ids = Arc::new(IdGen::new(boot));
    let (writer, writer_thread) = Writer::spawn_with(
        storage.clone(),
        topics.clone(),
        ids.clone(),
        config.clone(),
        metrics.clone(),
        replicator,
    );
    if replicated {
        // Before any id of this boot is used: the next leader's boot starts past it.
        let put = Op::Put(Cf::Meta, keys::BOOT.to_vec(), boot.to_be_bytes().to_vec());
        if let Err(e) = writer.submit(Command::Raw(vec![put])).await {
            tracing::info!("could not start leading: {e}");
            drop(writer);
            tokio::task::spawn_blocking(move || writer_thread.join())
                .await
                .map_err(|e| Error::Internal(e.to_string()))?;
            return Ok(Stop::Deposed);
        }
    }
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let producers = Arc::new(Producers::default());
    let (answers, answers_rx) = mpsc::channel(1024);
    let serving = leading
        .as_ref()
        .map_or_else(Serving::always, |l| Serving::under(l.node.lease.clone()));
    let checker = Checker::new(
        storage.clone(),
        writer.clone(),
        producers.clone(),
        config.clone(),
        metrics.clone(),
    )
    .serving(serving.clone());
    tracker.spawn(checker.run(answers_rx, cancel.clone()));
    tracker.spawn(Timer::new(storage.clone(), writer.clone()).run(cancel.clone()));
    let sweeper = Sweeper::new(
        storage.clone(),
        writer.clone(),
        topics.clone(),
        config.clone(),
        metrics.clone(),
    );
    tracker.spawn(sweeper.run(cancel.clone()));
    tracker.spawn(crate::disk::watch(
        storage.clone(),
        config.clone(),
        metrics.clone(),
        cancel.clone(),
    ));
    let shared = Arc::new(Shared {
        groups: Groups::new(
            storage.clone(),
            writer.clone(),
            topics.clone(),
            config.clone(),
            metrics.clone(),
            tracker.clone(),
            cancel.clone(),
        )
        .serving(serving.clone()),
        config: config.clone(),
        storage: storage.clone(),
        writer,
        topics: topics.clone(),
        producers,
        answers,
        connection_ids: AtomicU64::new(1),
        subscription_ids: AtomicU64::new(1),
        metrics: metrics.clone(),
        tasks: tracker.clone(),
        budget: Arc::new(Semaphore::new(
            (config.max_in_flight_bytes / connection::BUDGET_UNIT).max(1),
        )),
        node: leading.as_ref().map(|l| l.node.clone()),
        ids,
        serving,
    });
    live.set(Some((storage.clone(), topics)));
    faces.grpc.set(Some(shared.clone()));
    crate::cmd::delete::resume_cleanups(&shared).await;

    let stop = tokio::select! {
        () = accept(listener, &shared, &tracker, &cancel) => Stop::Shutdown,
        () = shutdown.as_mut() => {
            tracing::info!("shutting down");
            Stop::Shutdown
        }
        () = storage.failed() => Stop::StorageFailed(storage.failure().unwrap_or_default()),
        () = deposed.cancelled() => Stop::Deposed,
        () = async {
            match &leading {
                Some(l) => l.node.lost(&l.leadership).await,
                None => std::future::pending().await,
            }
        } => Stop::Deposed,
    };
    if let Some(l) = &leading {
        // Whichever way this leadership ended, nothing serves from it any more.
        l.node.lease.end();
    }
    live.set(None);
    faces.grpc.set(None);
    // A leader's write still waiting for a majority gives up (its clients get an
    // error: the write may or may not be committed later).
    deposed.cancel();
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
    // Reads still running off the async threads hold the database: every handle comes
    // back before the owner closes it (a single broker's, to reopen it after a failure)
    // or a snapshot replaces it (a group's node).
    if !storage.give_back_all(Duration::from_secs(5)).await {
        tracing::warn!("storage handles still held 5 s after the broker stopped serving");
        if matches!(stop, Stop::StorageFailed(_)) {
            return Err(Error::Internal(
                "storage failed and could not be closed to reopen it".into(),
            ));
        }
    }
    Ok(stop)
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
        // Finds clients whose host vanished without a FIN, even while nothing is sent.
        let ka = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        let _ = socket2::SockRef::from(&socket).set_tcp_keepalive(&ka);
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
