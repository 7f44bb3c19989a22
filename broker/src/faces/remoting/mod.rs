//! The RocketMQ Remoting face: the classic Java client (`DefaultMQProducer`,
//! `TransactionMQProducer`, `DefaultMQPushConsumer`, `DefaultLitePullConsumer`), Spring
//! Boot's starter, the Go client v2 and `mqadmin` talk to one txmq port
//! (`--remoting-listen`, default `127.0.0.1:10911`) as to a name server and a broker
//! at once, as RocketMQ 5's proxy does.
//!
//! It is a third face of the same broker: every request is translated into a call of
//! [`crate::service`] (one storage, one writer, one check-back scheduler, one set of
//! consumer groups, the same permissions and limits), so a message sent on any face is
//! received on every face. How RocketMQ's queues and offsets map onto txmq's log and
//! leases is in `docs/remoting.md`.
//!
//! - [`frame`]: RemotingCommand frames (JSON and binary headers).
//! - [`codes`]: request and response codes.
//! - [`record`]: properties, message records, message ids, batches, zlib bodies.
//! - `auth`: `AclClientRPCHook` signatures, checked against txmq's users.
//! - `connection`: one client connection: reading, answering, pushing.
//! - `clients`: who is connected: heartbeats, producer and consumer groups.
//! - `route`: the name-server part (routes, cluster info, topic lists).
//! - `send`: sends (single, batch, delayed, half messages) and END_TRANSACTION.
//! - `checks`: check-backs to Remoting producers, through the one scheduler.
//! - `pull`: pulls, offsets and send-backs, on the groups' leases; `lanes`: what each
//!   queue handed out, to which connection.
//! - `locks`: the queue locks orderly consumers hold.
//! - `admin`: what mqadmin asks a broker.
//!
//! What the clients expect, read from their sources, is in
//! `../shared/rocketmq-remoting.md`.

// A request's error is its answer (a `Command`), returned once per request: not
// worth a box.
#![allow(clippy::result_large_err)]

mod admin;
mod auth;
mod broadcast;
mod checks;
mod clients;
pub mod codes;
mod connection;
mod dlq;
pub mod frame;
mod lanes;
mod locks;
mod pop;
mod pull;
pub mod record;
mod route;
mod send;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::Error;
use crate::faces::native::Listener;
use crate::replication::node::Node;
use crate::service::Shared;
use frame::Command;

/// The broker's parts the face serves from: set while a storage is open (and, in a
/// broker group, while this node leads), cleared while it is reopened.
#[derive(Default)]
pub struct Live {
    shared: RwLock<Option<Arc<Shared>>>,
    /// The broker group this node belongs to, if any.
    group: std::sync::OnceLock<Arc<Node>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("serving", &self.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Live {
    /// Makes this face a broker group node's.
    pub fn join_group(&self, node: Arc<Node>) {
        let _ = self.group.set(node);
    }

    /// Sets (or clears) the current parts.
    pub fn set(&self, shared: Option<Arc<Shared>>) {
        *self.shared.write().expect("live lock") = shared;
    }

    fn get(&self) -> Option<Arc<Shared>> {
        self.shared.read().expect("live lock").clone()
    }
}

/// The face's state, shared by its connections.
struct Endpoint {
    live: Arc<Live>,
    config: Arc<Config>,
    /// Where clients reach it: routes and message ids name it.
    advertised: SocketAddr,
    /// Who is connected.
    clients: clients::Clients,
    /// What the consumers were handed, by lane.
    pulls: lanes::Pulls,
    /// Orderly consumers' queue locks.
    locks: locks::Locks,
    /// The leases of what they were handed, renewed while they are connected.
    renewals: Arc<crate::faces::renew::Renewals>,
    /// Ends every connection.
    stop: CancellationToken,
    /// The byte budget of requests in flight, shared with every face.
    limits: Arc<crate::service::limits::Limits>,
}

impl Endpoint {
    /// The queues topic `topic` shows: its own count, else `--remoting-queues`.
    fn queues(&self, shared: &Shared, topic: &str) -> usize {
        let default = u32::try_from(self.config.remoting_queues).unwrap_or(u32::MAX);
        crate::service::admin::topic_queues(shared, topic, default) as usize
    }

    /// The broker's parts while it may serve from them (a group leader's lease holds).
    fn shared(&self) -> Result<Arc<Shared>, Error> {
        self.live
            .get()
            .filter(|s| s.serving.holds())
            .ok_or_else(|| {
                if self.config.peers.is_some() {
                    Error::NotLeader(None)
                } else {
                    Error::Opening
                }
            })
    }
}

/// The address a Remoting client is told to use: the bound one, unless it is a
/// wildcard (then loopback, which is only right on one host: a broker that listens on
/// every interface names its address with `--remoting-advertise`).
fn advertised(config: &Config, bound: SocketAddr) -> SocketAddr {
    if let Some(a) = config.remoting_advertise {
        return a;
    }
    if bound.ip().is_unspecified() {
        let ip: std::net::IpAddr = if bound.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        return SocketAddr::new(ip, bound.port());
    }
    bound
}

/// Serves the face on `listener` until `stop`.
pub async fn serve(
    listener: Listener,
    live: Arc<Live>,
    config: Arc<Config>,
    limits: Arc<crate::service::limits::Limits>,
    stop: CancellationToken,
) {
    let Ok(bound) = listener.local_addr() else {
        return;
    };
    let endpoint = Arc::new(Endpoint {
        live,
        advertised: advertised(&config, bound),
        config,
        clients: clients::Clients::default(),
        pulls: lanes::Pulls::default(),
        locks: locks::Locks::default(),
        renewals: Arc::default(),
        stop: stop.clone(),
        limits: limits.clone(),
    });
    tokio::spawn(clients::expire(endpoint.clone()));
    let (from, there) = (endpoint.clone(), endpoint.clone());
    tokio::spawn(crate::faces::renew::run(
        move || from.live.get(),
        endpoint.renewals.clone(),
        move |client| there.clients.is_connected(client),
        stop.clone(),
    ));
    tracing::info!(addr = %bound, tls = listener.is_tls(), "remoting endpoint");
    let tracker = tokio_util::task::TaskTracker::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => break,
        };
        let (incoming, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(5);
                pair
            }
            Err(e) => {
                tracing::warn!("remoting accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        // One cap over every face: over it, the connection is closed at once.
        let Ok(permit) = limits.connections.clone().try_acquire_owned() else {
            limits.refused();
            tracing::warn!(%peer, "remoting connection refused: too many connections");
            drop(incoming);
            continue;
        };
        let endpoint = endpoint.clone();
        tracker.spawn(async move {
            let _permit = permit;
            if let Some(stream) = incoming.open().await {
                connection::serve(endpoint, stream, peer).await;
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
}

/// The Remoting code and remark for a service error.
fn code_of(e: &Error) -> i32 {
    use codes::*;
    match e {
        Error::TopicNotFound(_) => TOPIC_NOT_EXIST,
        Error::PermissionDenied(_) | Error::NotAuthenticated(_) => NO_PERMISSION,
        Error::TooLarge(_) | Error::InvalidName(_) | Error::ScheduleTooFar(_) => MESSAGE_ILLEGAL,
        // SERVICE_NOT_AVAILABLE: the Java producer tries again (another broker) on it.
        Error::NotLeader(_) | Error::ShuttingDown | Error::StorageFailed(_) | Error::Opening => {
            SERVICE_NOT_AVAILABLE
        }
        Error::DiskFull(_) | Error::LimitReached(_) => SYSTEM_BUSY,
        Error::Invalid(_) | Error::IdempotencyConflict(_) | Error::WrongProducerGroup(_) => {
            INVALID_PARAMETER
        }
        _ => SYSTEM_ERROR,
    }
}

/// The answer to `request` for a service error.
fn refusal(request: &Command, e: &Error) -> Command {
    Command::answer(request, code_of(e), Some(e.to_string()))
}

/// The answer to `request` for a bad field.
fn invalid(request: &Command, why: impl Into<String>) -> Command {
    Command::answer(request, codes::INVALID_PARAMETER, Some(why.into()))
}

/// A header field that must be there.
fn required<'a>(request: &'a Command, name: &str) -> Result<&'a str, Command> {
    request
        .field(name)
        .ok_or_else(|| invalid(request, format!("the header field {name} is missing")))
}

/// A header field that must be an integer.
fn number<T: std::str::FromStr>(request: &Command, name: &str) -> Result<T, Command> {
    let text = required(request, name)?;
    text.trim().parse().map_err(|_| {
        invalid(
            request,
            format!("the header field {name} ({text:?}) is not a number"),
        )
    })
}

/// An optional integer field (absent: `default`).
fn number_or<T: std::str::FromStr>(
    request: &Command,
    name: &str,
    default: T,
) -> Result<T, Command> {
    match request.field(name) {
        None => Ok(default),
        Some(_) => number(request, name),
    }
}
