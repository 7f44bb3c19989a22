//! What every request handler may use: the broker's parts, shared by all connections.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::sync::mpsc;

use crate::config::Config;
use crate::delivery::Groups;
use crate::metrics::Metrics;
use crate::storage::StorageHandle;
use crate::storage::writer::WriterHandle;
use crate::topics::Topics;
use crate::txn::checker::CheckAnswer;
use crate::txn::producers::Producers;

/// Everything a connection needs, shared.
#[derive(Debug)]
pub struct Shared {
    /// Settings.
    pub config: Arc<Config>,
    /// Reads.
    pub storage: StorageHandle,
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
    /// Background work a request starts that must not end with its connection (a
    /// topic's cleanup after its deletion); waited for at shutdown.
    pub tasks: tokio_util::task::TaskTracker,
    /// The connection cap and the byte budget of requests in flight, broker-wide.
    pub limits: Arc<super::limits::Limits>,
    /// The broker group's node this broker leads from (`None`: a single broker).
    pub node: Option<Arc<crate::replication::node::Node>>,
    /// The writer's id source (ids are ordered by creation: a mark taken from it
    /// divides what was made before from what comes after).
    pub ids: Arc<crate::ids::IdGen>,
    /// Users and rules: who may do what.
    pub auth: Arc<crate::auth::Auth>,
    /// Whether it may serve from its state now (a group leader's lease holds): asked by
    /// every request before it is handled.
    pub serving: crate::replication::lease::Serving,
}
