//! A node of a broker group: its Raft, its storage slot and the node network, started
//! here; the rest, one job a file:
//!
//! - `forming`: the group's first forming (the lowest id, once every peer is new);
//! - `leadership`: when this node serves as the leader, when it stops, handing over;
//! - `addresses`: where the leader and the other members take clients;
//! - `membership`: the group's status, adding and removing nodes.
//!
//! A follower's housekeeping (its compactions after the leader's retention) is the
//! server's to run: the node only lends its storage for it ([`StorageSlot::housekeep`]).

mod addresses;
mod forming;
mod leadership;
mod membership;

pub use leadership::{Leadership, RESIGN_FOR};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::{ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::clock::{self, Clocks};
use super::handshake::Credentials;
use super::log_store::LogStore;
use super::network::{self, Network, NodeInfo};
use super::state_machine::{StateMachine, StorageSlot};
use super::{Peers, Raft, TypeConfig};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::storage::Storage;

use super::lease::{ELECTION_TIMEOUT_MAX_MS, ELECTION_TIMEOUT_MIN_MS, HEARTBEAT_MS, Lease};

/// The leader id of a term, as writes name it (a write for another leader fails).
pub type LeaderId = openraft::type_config::alias::CommittedLeaderIdOf<TypeConfig>;

/// A running node.
#[derive(Debug)]
pub struct Node {
    /// Its Raft.
    pub raft: Raft,
    /// The storage it applies to.
    pub slot: Arc<StorageSlot>,
    /// The group as configured.
    pub peers: Peers,
    /// Where clients reach this node.
    addresses: Addresses,
    /// The group's secret on the node network (`--cluster-secret-file`), and its TLS.
    creds: Credentials,
    /// The node's own address book: what each member said of itself, and when.
    known: Mutex<HashMap<u64, (NodeInfo, std::time::Instant)>>,
    /// Held while the leader is asked about itself; the leader that last did not
    /// answer, and when.
    asking: tokio::sync::Mutex<Option<(u64, std::time::Instant)>>,
    stop: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
    /// While it holds, this node may serve as the leader (see [`super::lease`]).
    pub lease: Arc<Lease>,
    /// What this node knows of the members' wall clocks (see [`super::clock`]).
    clocks: Arc<Clocks>,
    /// The term this node handed over because its clock was off: it does not serve in it.
    handed_over: Mutex<Option<u64>>,
}

/// Where a node keeps its parts, under the data directory.
struct Dirs {
    state: PathBuf,
    raft: PathBuf,
    snapshots: PathBuf,
}

impl Dirs {
    fn new(data: &Path) -> Self {
        Self {
            state: data.join("state"),
            raft: data.join("raft"),
            snapshots: data.join("snapshots"),
        }
    }

    /// Finishes a snapshot installation a crash interrupted (see
    /// `state_machine::replace`): the old storage comes back if the new one never
    /// arrived, and is removed if it did.
    fn recover(&self) -> std::io::Result<()> {
        let old = self.state.with_extension("replaced");
        if old.exists() {
            if self.state.exists() {
                std::fs::remove_dir_all(&old)?;
            } else {
                std::fs::rename(&old, &self.state)?;
                if let Some(parent) = self.state.parent() {
                    super::state_machine::sync_dir(parent)?;
                }
            }
        }
        Ok(())
    }
}

pub use crate::metrics::Role;

/// This node's address for clients, told to the others.
#[derive(Debug, Clone)]
pub struct Addresses {
    /// The native protocol's listener.
    pub client: String,
    /// The gRPC endpoint's, if served.
    pub grpc: Option<String>,
    /// The Remoting endpoint's, if served.
    pub remoting: Option<String>,
}

impl Node {
    /// Opens the node's storage and log under the data directory, starts Raft and the
    /// node-to-node listener, and begins forming the group if it is new.
    ///
    /// # Errors
    /// Storage or the log cannot be opened, or the node address cannot be bound.
    pub async fn start(config: &Config, peers: Peers, addresses: Addresses) -> Result<Arc<Self>> {
        let dirs = Dirs::new(&config.data_dir);
        let opened = {
            let (state, raft, snapshots) = (
                dirs.state.clone(),
                dirs.raft.clone(),
                dirs.snapshots.clone(),
            );
            let window = config.dedup_window;
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&state).map_err(|e| {
                    Error::Internal(format!("cannot create {}: {e}", state.display()))
                })?;
                Dirs {
                    state: state.clone(),
                    raft: raft.clone(),
                    snapshots: snapshots.clone(),
                }
                .recover()
                .map_err(|e| Error::Internal(format!("recovering a snapshot installation: {e}")))?;
                super::state_machine::clean_up(&snapshots)
                    .map_err(|e| Error::Internal(format!("cleaning up snapshots: {e}")))?;
                let storage = Storage::open(&state)?;
                storage.set_dedup_window(window);
                let log = LogStore::open(&raft)
                    .map_err(|e| Error::Internal(format!("cannot open the raft log: {e}")))?;
                Ok::<_, Error>((storage, log))
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??
        };
        let (storage, log) = opened;
        let slot = StorageSlot::new(storage, dirs.state, dirs.snapshots);
        let raft_config = openraft::Config {
            cluster_name: "txmq".into(),
            // A follower stands for election when it has heard nothing for the leader's
            // lease (the maximum timeout) plus a random timeout: 2.4 to 2.8 s; a leader
            // that heard from no majority for QUORUM_SILENCE (1.2 s) has stopped serving
            // by then.
            heartbeat_interval: HEARTBEAT_MS,
            election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
            // A writer batch is up to about 96 MiB (its 64 MiB cap plus one transaction):
            // an append carries at most 8 of them, under the node network's 1 GiB frame.
            max_payload_entries: 8,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_entries),
            // What stays of the log behind a snapshot, for followers a little behind
            // (further behind, they get the snapshot).
            max_in_snapshot_log_to_keep: (config.snapshot_entries / 10).min(1000),
            // Sending a snapshot: an hour (about 200 GiB at 1 Gbit/s).
            install_snapshot_timeout: 3_600_000,
            // A leader restarted (after a crash or power cut) stands for election in a
            // new term like any other node. Resuming its old term (openraft's default)
            // is unsafe here: the state machine does not flush, and a power cut can
            // take entries the leader had already sent to followers off its own log;
            // leading the same term again, it would write different entries under the
            // log ids the followers hold (the power-cut test in tests/group.rs lost
            // acknowledged messages that way).
            enable_leader_restore: Some(false),
            ..Default::default()
        }
        .validate()
        .map_err(|e| Error::Invalid(format!("raft settings: {e}")))?;
        // The group's own secret (the config requires one with peers), never a client's.
        let creds = Credentials::of(config).map_err(Error::Invalid)?;
        let clocks = Arc::new(Clocks::default());
        let network = Network {
            creds: creds.clone(),
            clocks: clocks.clone(),
        };
        let raft = Raft::new(
            peers.me,
            Arc::new(raft_config),
            network,
            log,
            StateMachine::new(slot.clone()),
        )
        .await
        .map_err(|e| Error::Internal(format!("cannot start raft: {e}")))?;
        let listener = TcpListener::bind(peers.my_addr()).await.map_err(|e| {
            Error::Internal(format!(
                "cannot listen on {} (this node's peer address): {e}",
                peers.my_addr()
            ))
        })?;
        let node = Arc::new(Self {
            raft: raft.clone(),
            slot: slot.clone(),
            peers: peers.clone(),
            addresses: addresses.clone(),
            creds: creds.clone(),
            known: Mutex::new(HashMap::new()),
            asking: tokio::sync::Mutex::new(None),
            stop: CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
            lease: Arc::new(Lease::default()),
            clocks: clocks.clone(),
            handed_over: Mutex::new(None),
        });
        let info = {
            let raft = raft.clone();
            let me = peers.me;
            Arc::new(move || {
                let m = raft.metrics().borrow_watched().clone();
                NodeInfo {
                    id: me,
                    client_addr: addresses.client.clone(),
                    grpc_addr: addresses.grpc.clone(),
                    initialized: m.last_log_index.is_some(),
                    leader: m.current_leader,
                    remoting_addr: addresses.remoting.clone(),
                }
            })
        };
        node.tasks.spawn(network::serve(
            listener,
            raft.clone(),
            slot,
            info,
            creds.clone(),
            clocks,
            node.stop.clone(),
        ));
        node.tasks.spawn(forming::form_group(
            raft.clone(),
            peers,
            creds,
            node.stop.clone(),
        ));
        tracing::info!(
            node = node.peers.me,
            addr = node.peers.my_addr(),
            "raft node started"
        );
        Ok(node)
    }

    /// This node's part in the group now, as `/health` tells it.
    pub fn role(&self) -> Role {
        crate::metrics::Roles::role(self)
    }
}

impl crate::metrics::Roles for Node {
    fn role(&self) -> Role {
        let m = self.raft.metrics().borrow_watched().clone();
        let skew = self.clocks.own_skew(m.state == ServerState::Leader);
        Role {
            state: match m.state {
                ServerState::Leader => "leader",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Follower => "follower",
                ServerState::Shutdown => "shutdown",
            },
            id: self.peers.me,
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            clock_skew_ms: skew,
            clock_skewed: skew.is_some_and(clock::too_far),
        }
    }
}

impl Node {
    /// Stops Raft and the node's tasks.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("raft did not stop cleanly: {e}");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }
}
