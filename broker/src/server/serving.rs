//! Serving one opened storage: the parts wired together (writer, checker, timer,
//! sweeper, disk watch, consumer groups), the accept loop, and the way back down.
//!
//! Shutdown order: stop accepting, cancel every task, wait for them (bounded), then drop
//! the last writer handle so the writer drains its queue, flushes the WAL and exits, then
//! give the storage handle back and wait for every other to come back too.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::faces::native::Listener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::group::Leading;
use super::{Faces, Stop};
use crate::config::Config;
use crate::delivery::Groups;
use crate::error::{Error, Result};
use crate::faces::native::connection;
use crate::ids::IdGen;
use crate::metrics::Metrics;
use crate::replication::lease::Serving;
use crate::retention::Sweeper;
use crate::service::Shared;
use crate::storage::StorageHandle;
use crate::storage::writer::{Command, Op, Replicator, Writer};
use crate::storage::{Cf, keys};
use crate::timer::Timer;
use crate::topics::{Topic, Topics};
use crate::txn::checker::Checker;
use crate::txn::producers::Producers;

pub(super) async fn run_once(
    listener: &Listener,
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
            if boot > crate::ids::MAX_BOOT {
                return Err(Error::Internal(format!(
                    "boot number {boot} is past the {} that ids can hold",
                    crate::ids::MAX_BOOT
                )));
            }
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

    let auth = {
        // A broker told to make a first user is closed until it has (a failed bootstrap
        // leaves it closed, never open).
        let require = config.require_auth || config.bootstrap_admin.is_some();
        let storage = storage.clone();
        let seal = config
            .cluster_secret
            .as_deref()
            .or(config.broker_key.as_deref())
            .map(crate::auth::seal::SealKey::derive);
        tokio::task::spawn_blocking(move || crate::auth::Auth::load(&storage, require, seal))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??
    };
    // Before anything starts: a broker that may not serve stops here, holding nothing.
    refuse_anonymous_exposure(&auth, config, listener)?;

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
        auth: Arc::new(auth),
        groups: Groups::new(
            storage.clone(),
            writer.clone(),
            topics.clone(),
            config.clone(),
            metrics.clone(),
            tracker.clone(),
            cancel.clone(),
        )
        .serving(serving.clone())
        .boot(boot),
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
        limits: faces.limits.clone(),
        node: leading.as_ref().map(|l| l.node.clone()),
        ids,
        serving,
    });
    live.set(Some((storage.clone(), topics)));
    // The first user before any face serves: no call is taken while it is made.
    crate::service::users::bootstrap(&shared).await;
    crate::service::users::migrate_grpc_credentials(&shared).await;
    faces.grpc.set(Some(shared.clone()));
    faces.remoting.set(Some(shared.clone()));
    crate::service::delete::resume_cleanups(&shared).await;

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
    faces.remoting.set(None);
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

/// A broker with no users serves anyone who reaches it: fine on loopback, a hole on a
/// network. Each face is judged by what it takes: the native port is open without users
/// or a token, the gRPC endpoint without users or credentials. An open face off
/// loopback takes `--allow-anonymous` to say so; and a gRPC endpoint off loopback
/// whose calls are signed needs TLS (the signature is a bearer token on h2c).
/// Otherwise the broker does not serve, and says why.
///
/// # Errors
/// [`Error::Invalid`] naming the listener and the ways out.
fn refuse_anonymous_exposure(
    auth: &crate::auth::Auth,
    config: &Config,
    listener: &Listener,
) -> Result<()> {
    let off_loopback = |a: &std::net::SocketAddr| !a.ip().to_canonical().is_loopback();
    let native = listener.local_addr().ok().filter(off_loopback);
    let grpc = config.grpc_addr().ok().flatten().filter(off_loopback);
    let remoting = config.remoting_addr().ok().flatten().filter(off_loopback);
    let users = auth.active();
    let native_open = !users && config.auth_token.is_none();
    let grpc_open = !users && config.grpc_credentials.is_empty();
    if let Some(at) = grpc
        && !grpc_open
        && config.grpc_tls.is_none()
    {
        return Err(Error::Invalid(format!(
            "grpc-listen {at} is off loopback without TLS, and its calls are signed: the \
             signature covers only a date, so anyone who sees one call could replay it. \
             Give --tls-cert and --tls-key (or --grpc-tls-*), or listen on loopback"
        )));
    }
    if config.allow_anonymous {
        return Ok(());
    }
    let exposed: Vec<String> = [
        ("listen", native.filter(|_| native_open)),
        ("grpc-listen", grpc.filter(|_| grpc_open)),
        // Signed by the same users, or the gRPC credentials' pairs.
        ("remoting-listen", remoting.filter(|_| grpc_open)),
    ]
    .into_iter()
    .filter_map(|(name, addr)| addr.map(|a| format!("{name} {a}")))
    .collect();
    if exposed.is_empty() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{} is off loopback and takes anyone: whoever reaches it could do anything. Make \
         a first user (--bootstrap-admin-file FILE), require users (--require-auth), or \
         say that anonymous access is meant (--allow-anonymous)",
        exposed.join(" and ")
    )))
}

async fn accept(
    listener: &Listener,
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    let limit = shared.limits.connections.clone();
    let mut backoff = Duration::from_millis(5);
    loop {
        let (incoming, peer) = match listener.accept().await {
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
        let permit = limit.clone().try_acquire_owned().ok();
        if permit.is_none() && listener.is_tls() {
            // Over the cap, no TLS handshake is spent on it: closed at once, counted.
            shared.limits.refused();
            tracing::warn!(%peer, "connection refused: too many connections");
            drop(incoming);
            continue;
        }
        let shared = shared.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let Some(socket) = incoming.open().await else {
                return;
            };
            match permit {
                Some(_permit) => {
                    shared.metrics.connections.inc();
                    connection::serve(socket, peer, shared.clone(), cancel).await;
                    shared.metrics.connections.dec();
                }
                None => {
                    shared.limits.refused();
                    connection::refuse_full(socket, peer).await;
                }
            }
        });
    }
}
