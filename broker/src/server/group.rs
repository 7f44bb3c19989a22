//! A node of a broker group: follows until it leads, serves while it leads (see
//! [`super::serving`]), and runs a follower's housekeeping meanwhile.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::watch::WatchReceiver;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::serving::run_once;
use super::{Faces, Stop};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::faces::native::{Listener, connection};
use crate::metrics::Metrics;
use crate::replication::node::{Addresses, Leadership, Node};

/// A node of a broker group: follows (answering clients `NOT_LEADER`) until it leads,
/// serves while it leads, and follows again when its leadership ends.
pub(super) async fn serve_group(
    listener: &Listener,
    peers: crate::replication::Peers,
    bound: super::Bound,
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
        grpc: bound.grpc.map(advertise),
        remoting: bound.remoting.map(|a| {
            config
                .remoting_advertise
                .map_or_else(|| advertise(a), |at| at.to_string())
        }),
    };
    let node = Node::start(config, peers, addresses).await?;
    faces.grpc.join_group(node.clone());
    faces.remoting.join_group(node.clone());
    faces.live.join_group(node.clone());
    let housekeeping_stop = CancellationToken::new();
    let housekeeping = tokio::spawn(keep_house(
        node.clone(),
        config.retention_interval,
        housekeeping_stop.clone(),
    ));
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
    housekeeping_stop.cancel();
    let _ = housekeeping.await;
    node.shutdown().await;
    result
}

/// Answers every connection `NOT_LEADER` (with the leader's address when known), until
/// dropped.
async fn refuse_followers(listener: &Listener, node: &Arc<Node>, limit: usize) {
    let open = Arc::new(Semaphore::new(limit));
    loop {
        if let Ok((incoming, peer)) = listener.accept().await {
            let Ok(permit) = open.clone().try_acquire_owned() else {
                drop(incoming);
                continue;
            };
            let node = node.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let Some(socket) = incoming.open().await else {
                    return;
                };
                let leader = node.leader_address().await;
                connection::refuse_not_leader(socket, peer, leader).await;
            });
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What [`run_once`] needs to serve as a broker group's leader.
pub(super) struct Leading<'a> {
    pub(super) node: &'a Arc<Node>,
    pub(super) leadership: Leadership,
}

/// A follower's housekeeping, every `every` (the retention sweep's interval), until
/// `stop`: its indexes follow the floors the leader's retention moved, and what retention
/// removed is compacted on this disk too (see [`crate::retention::follower_compaction`]).
/// The leader's own retention sweep does its part.
async fn keep_house(node: Arc<Node>, every: Duration, stop: CancellationToken) {
    let mut compacted = HashMap::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        if node.raft.metrics().borrow_watched().state == ServerState::Leader {
            continue;
        }
        let mut progress = std::mem::take(&mut compacted);
        let (slot, stop) = (node.slot.clone(), stop.clone());
        compacted = tokio::task::spawn_blocking(move || {
            let done = slot.housekeep(|storage| {
                crate::retention::follower_compaction(storage, &mut progress, &stop)
            });
            if let Some(Err(e)) = done {
                tracing::warn!("follower housekeeping failed: {e}");
            }
            progress
        })
        .await
        .unwrap_or_default();
    }
}
