//! The broker's top: its listeners and faces, a single broker that reopens its storage
//! after a failure, or a group's node (`group`); each serves an opened storage through
//! `serving`.

mod group;
mod serving;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::faces::native::{Listener, connection};
use crate::metrics::{self, Metrics};
use crate::storage::{Owner, Storage};
use group::serve_group;
use serving::run_once;

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
    let remoting = match config.remoting_addr().map_err(Error::Invalid)? {
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
        remoting,
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
    /// The RocketMQ Remoting face, if served.
    pub remoting: Option<TcpListener>,
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
        remoting: remoting_listener,
    } = listeners;
    let listener = Listener::new(listener, &config).map_err(Error::Invalid)?;
    let remoting_listener = remoting_listener
        .map(|l| Listener::new(l, &config))
        .transpose()
        .map_err(Error::Invalid)?;
    let config = Arc::new(config);
    let grpc_live = Arc::new(crate::faces::grpc::Live::default());
    let remoting_live = Arc::new(crate::faces::remoting::Live::default());
    let metrics = Arc::new(Metrics::new());
    let limits = Arc::new(crate::service::limits::Limits::new(
        config.max_in_flight_bytes,
        config.max_connections,
        metrics.clone(),
    ));
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
    let bound = Bound {
        grpc: grpc_listener.as_ref().and_then(|l| l.local_addr().ok()),
        remoting: remoting_listener.as_ref().and_then(|l| l.local_addr().ok()),
    };
    let grpc = grpc_listener.map(|listener| {
        tokio::spawn(crate::faces::grpc::serve(
            listener,
            grpc_live.clone(),
            config.clone(),
            limits.clone(),
            endpoint_stop.clone(),
        ))
    });
    let remoting = remoting_listener.map(|listener| {
        tokio::spawn(crate::faces::remoting::serve(
            listener,
            remoting_live.clone(),
            config.clone(),
            limits.clone(),
            endpoint_stop.clone(),
        ))
    });
    let mut shutdown = std::pin::pin!(shutdown);
    let faces = Faces {
        live: &live,
        grpc: &grpc_live,
        remoting: &remoting_live,
        limits: &limits,
    };
    let result = match config.group().map_err(Error::Invalid)? {
        Some(peers) => {
            serve_group(
                &listener,
                peers,
                bound,
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
    if let Some(remoting) = remoting {
        let _ = tokio::time::timeout(Duration::from_secs(10), remoting).await;
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
    listener: &Listener,
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
    listener: &Listener,
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
async fn refuse_all(listener: &Listener, why: &str) {
    // Bounded, as the followers' refusals are: each may take a TLS handshake.
    let open = Arc::new(tokio::sync::Semaphore::new(256));
    loop {
        if let Ok((incoming, peer)) = listener.accept().await {
            let Ok(permit) = open.clone().try_acquire_owned() else {
                drop(incoming);
                continue;
            };
            let why = why.to_string();
            tokio::spawn(async move {
                let _permit = permit;
                if let Some(socket) = incoming.open().await {
                    connection::refuse_recovering(socket, peer, &why).await;
                }
            });
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
/// Where the gRPC and Remoting endpoints really listen (a port 0 in the configuration
/// is chosen at bind): a broker group's routes name them.
#[derive(Debug, Clone, Copy)]
struct Bound {
    grpc: Option<std::net::SocketAddr>,
    remoting: Option<std::net::SocketAddr>,
}

/// What outside the accept loop shows the broker's current parts: `/health` and the
/// gRPC endpoint (set while a storage is open, cleared while it is reopened).
#[derive(Clone, Copy)]
struct Faces<'a> {
    live: &'a metrics::Live,
    grpc: &'a crate::faces::grpc::Live,
    remoting: &'a crate::faces::remoting::Live,
    /// The connection cap and byte budget all faces share.
    limits: &'a Arc<crate::service::limits::Limits>,
}
