//! A node of a broker group: its Raft, the group's forming, and leadership.
//!
//! **Forming the group.** Every node is started with the same `--peers`. A node with an
//! empty log waits to be sent entries. The node with the lowest id forms the group
//! (`initialize` with every peer as a voter) once every other peer answers that it is
//! empty too: so a node whose data directory was lost never forms a second group of
//! its own, it waits for the leader to bring it up to date.
//!
//! **Leadership.** [`Node::leading`] completes when this node leads with a committed
//! vote and has applied everything committed before its term; [`Node::lost`]
//! completes when that term's leadership ends. The server serves clients in between.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::Instant as _;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::type_config::TypeConfigExt;
use openraft::vote::RaftLeaderId;
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::clock::{self, Clocks};
use super::log_store::LogStore;
use super::network::{self, Network, NodeInfo};
use super::state_machine::{StateMachine, StorageSlot};
use super::{Peers, Raft, TypeConfig};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::storage::Storage;
use txmq_protocol::pb;

use super::lease::{
    ELECTION_TIMEOUT_MAX_MS, ELECTION_TIMEOUT_MIN_MS, HEARTBEAT_MS, Lease, QUORUM_SILENCE,
};

/// How long a leader that handed its leadership over takes no lease renewal in its term:
/// time for the target, or after its election timeout another node, to be elected.
pub const RESIGN_FOR: Duration = Duration::from_secs(5);

/// How long a member's client address, once asked, is told without asking again (a
/// restarted member may listen elsewhere).
const KNOWN_FOR: Duration = Duration::from_secs(10);

/// How long a leader that did not answer about itself is not asked again.
const UNANSWERED_FOR: Duration = Duration::from_secs(1);

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
    /// The group's secret on the node network (the brokers' auth token, or empty).
    token: String,
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
        let token = config.auth_token.clone().unwrap_or_default();
        let clocks = Arc::new(Clocks::default());
        let network = Network {
            token: token.clone(),
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
            token: token.clone(),
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
                }
            })
        };
        node.tasks.spawn(network::serve(
            listener,
            raft.clone(),
            slot,
            info,
            token.clone(),
            clocks,
            node.stop.clone(),
        ));
        node.tasks
            .spawn(form_group(raft.clone(), peers, token, node.stop.clone()));
        node.tasks.spawn(keep_house(
            raft,
            node.slot.clone(),
            config.retention_interval,
            node.stop.clone(),
        ));
        tracing::info!(
            node = node.peers.me,
            addr = node.peers.my_addr(),
            "raft node started"
        );
        Ok(node)
    }

    /// Waits until this node leads (with a committed vote), has heard from a majority
    /// lately, and has applied everything committed before; `None` if its Raft stopped.
    pub async fn leading(&self) -> Option<Leadership> {
        let mut rx = self.raft.metrics();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            let lead = {
                let m = rx.borrow_watched();
                (m.state == ServerState::Leader
                    && m.current_leader == Some(self.peers.me)
                    && m.vote.is_committed()
                    && self.heard_from_majority(&m)
                    && *self.handed_over.lock().expect("handed over") != Some(m.current_term))
                .then(|| (m.current_term, m.vote.leader_id().to_committed()))
            };
            if let Some((term, leader)) = lead {
                // A blank entry at the end of the log, committed and applied: every
                // entry before it is applied too, those of earlier terms and those this
                // node wrote in this term before it last stopped serving (a write that
                // gave up may still commit). Only then is the state loaded.
                match self.raft.write_blank().await {
                    // Committed, the blank entry measured the clocks of a majority: a
                    // node whose clock is off serves nothing and hands over.
                    Ok(_) if self.hand_over_if_clock_off(term).await => {}
                    Ok(_) => {
                        // The blank entry was committed by a majority just now; a
                        // leadership handed over earlier is over.
                        self.lease.resume();
                        self.lease.renew(Duration::ZERO);
                        tracing::info!(term, "leading the group");
                        return Some(Leadership { term, leader });
                    }
                    Err(e) => tracing::info!(term, "elected, but not leading after all: {e}"),
                }
            }
            tokio::select! {
                changed = rx.changed() => changed.ok()?,
                _ = tick.tick() => {}
            }
        }
    }

    /// Completes when `leadership` ended (another term, or this node follows), or when
    /// this leader has not heard from a majority for [`QUORUM_SILENCE`]: cut off from
    /// the others, it can commit nothing, and they elect another leader meanwhile; so it
    /// stops serving rather than keep its clients waiting.
    ///
    /// Meanwhile it renews the [`Lease`] that requests, deliveries and check-backs ask
    /// before they serve; it ends the lease when it returns.
    pub async fn lost(&self, leadership: &Leadership) {
        self.keep_lease(leadership).await;
        self.lease.end();
    }

    async fn keep_lease(&self, leadership: &Leadership) {
        let mut rx = self.raft.metrics();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            {
                let m = rx.borrow_watched();
                if m.state != ServerState::Leader || m.current_term != leadership.term {
                    return;
                }
                match self.majority_contact(&m) {
                    // (Handing over, the lease takes no renewal: see `transfer`.)
                    Some(ago) if ago < QUORUM_SILENCE => self.lease.renew(ago),
                    _ => {
                        tracing::warn!(
                            term = leadership.term,
                            "no majority of the group heard from for {QUORUM_SILENCE:?}: not serving"
                        );
                        return;
                    }
                }
            }
            if self.hand_over_if_clock_off(leadership.term).await {
                return;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() {
                    return;
                },
                _ = tick.tick() => {}
            }
        }
    }

    /// As the leader of `term`: if this node's wall clock is more than
    /// [`clock::MAX_SKEW_MS`] from the group's, stops serving and hands the leadership to
    /// the member whose clock agrees best (see [`super::clock`]); true if it did. Not
    /// served again in this term; elected again later, it checks again.
    async fn hand_over_if_clock_off(&self, term: u64) -> bool {
        let Some(skew) = self.clocks.own_skew(true).filter(|s| clock::too_far(*s)) else {
            return false;
        };
        let voters: Vec<u64> = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        let Some(to) = self.clocks.best_successor(self.peers.me, &voters) else {
            // The only voter: no one to hand over to (the alarm is raised).
            return false;
        };
        *self.handed_over.lock().expect("handed over") = Some(term);
        self.lease.resign(RESIGN_FOR);
        tracing::warn!(
            term,
            skew_ms = skew,
            to,
            "this node's wall clock is off: not leading; handing the leadership over"
        );
        if let Err(e) = self.raft.trigger().transfer_leader(to).await {
            tracing::warn!(to, "handing the leadership over failed: {e}");
        }
        true
    }

    /// Whether a majority of the voters (this node among them) acknowledged this
    /// leader within [`QUORUM_SILENCE`]. Not a leader's metrics: true.
    fn heard_from_majority(&self, m: &openraft::RaftMetrics<TypeConfig>) -> bool {
        m.heartbeat.is_none()
            || self
                .majority_contact(m)
                .is_some_and(|ago| ago < QUORUM_SILENCE)
    }

    /// How long ago a majority of the voters (this node among them, now) had all
    /// acknowledged this leader: the time of the majority's oldest acknowledgement.
    /// `None` for metrics that are not a leader's, or with no majority heard from.
    fn majority_contact(&self, m: &openraft::RaftMetrics<TypeConfig>) -> Option<Duration> {
        let heard = m.heartbeat.as_ref()?;
        let now = TypeConfig::now();
        let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
        let mut ages: Vec<Duration> = voters
            .iter()
            .filter_map(|v| {
                if *v == self.peers.me {
                    return Some(Duration::ZERO);
                }
                heard
                    .get(v)
                    .cloned()
                    .flatten()
                    .map(|t| now.saturating_duration_since(t.into_inner()))
            })
            .collect();
        ages.sort_unstable();
        // The freshest majority: its oldest member's age.
        ages.get(voters.len() / 2).copied()
    }

    /// The leader's client address, when another node leads and it can be asked.
    pub async fn leader_address(&self) -> Option<String> {
        self.leader_info().await.map(|info| info.client_addr)
    }

    /// What the leader tells about itself (its client and gRPC addresses), when another
    /// node leads and it can be asked; remembered for a while.
    pub async fn leader_info(&self) -> Option<NodeInfo> {
        let (leader, addr) = {
            let m = self.raft.metrics().borrow_watched().clone();
            let leader = m.current_leader.filter(|&l| l != self.peers.me)?;
            let addr = m
                .membership_config
                .membership()
                .get_node(&leader)
                .map(|n| n.addr.clone())
                .or_else(|| self.peers.nodes.get(&leader).cloned())?;
            (leader, addr)
        };
        let cached = || {
            let known = self.known.lock().expect("known");
            known
                .get(&leader)
                .filter(|(_, at)| at.elapsed() < KNOWN_FOR)
                .map(|(info, _)| info.clone())
        };
        if let Some(info) = cached() {
            return Some(info);
        }
        // One question at a time (every refused client and route asks), and none again
        // for a second after the leader did not answer.
        let mut unanswered = self.asking.lock().await;
        if let Some(info) = cached() {
            return Some(info);
        }
        if let Some((id, at)) = *unanswered
            && id == leader
            && at.elapsed() < UNANSWERED_FOR
        {
            return None;
        }
        let info = self.ask_info(leader, &addr).await;
        *unanswered = info.is_none().then(|| (leader, std::time::Instant::now()));
        info
    }

    /// This node's addresses for clients, as it tells the others.
    pub fn addresses(&self) -> &Addresses {
        &self.addresses
    }

    /// The client address of node `id` reached at `peer`, asked of it now (and
    /// remembered for [`Node::leader_address`]).
    async fn client_address(&self, id: u64, peer: &str) -> Option<String> {
        if id == self.peers.me {
            return Some(self.addresses.client.clone());
        }
        self.ask_info(id, peer).await.map(|info| info.client_addr)
    }

    /// What node `id` reached at `peer` tells about itself, asked now and remembered.
    async fn ask_info(&self, id: u64, peer: &str) -> Option<NodeInfo> {
        match network::info(peer, &self.token, Duration::from_secs(1)).await {
            Ok(info) => {
                self.known
                    .lock()
                    .expect("known")
                    .insert(id, (info.clone(), std::time::Instant::now()));
                Some(info)
            }
            Err(_) => None,
        }
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
    /// The group as this node (its leader) sees it: members, progress, lag.
    pub async fn status(&self) -> pb::ClusterStatusOk {
        let m = self.raft.metrics().borrow_watched().clone();
        let last = m.last_log_index.unwrap_or(0);
        let membership = m.membership_config.membership().clone();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let mut nodes = Vec::new();
        for (id, node) in membership.nodes() {
            let matched = if *id == self.peers.me {
                Some(last)
            } else {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|l| l.index)
            };
            let client = self.client_address(*id, &node.addr).await;
            nodes.push(pb::ClusterNode {
                id: *id,
                peer_addr: node.addr.clone(),
                reachable: client.is_some(),
                client_addr: client.unwrap_or_default(),
                voter: voters.contains(id),
                matched_index: matched.unwrap_or(0),
                lag: last.saturating_sub(matched.unwrap_or(0)),
                clock_skew_ms: if *id == self.peers.me {
                    self.clocks.own_skew(true)
                } else {
                    self.clocks.skew_of(*id)
                },
            });
        }
        pb::ClusterStatusOk {
            leader: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_log_index: last,
            committed_index: m.local_committed.map_or(0, |l| l.index),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            nodes,
            purged_index: m.purged.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
        }
    }

    /// Adds node `id`, reached at `peer`: a learner at once, then (in the background,
    /// once it has caught up from a snapshot and the log) a voter.
    ///
    /// # Errors
    /// The node is already a member, this node does not lead, or Raft refused.
    pub async fn add(self: &Arc<Self>, id: u64, peer: String) -> Result<()> {
        let membership = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        if membership.membership().get_node(&id).is_some() {
            return Err(Error::Invalid(format!("node {id} is already a member")));
        }
        self.raft
            .add_learner(id, BasicNode { addr: peer.clone() }, false)
            .await
            .map_err(raft_error)?;
        tracing::info!(node = id, %peer, "node added as a learner; it becomes a voter once caught up");
        let node = self.clone();
        self.tasks.spawn(async move {
            let promote = async {
                // Blocking: returns once the learner's log is up to date.
                node.raft
                    .add_learner(id, BasicNode { addr: peer }, true)
                    .await
                    .map_err(raft_error)?;
                let ids = std::collections::BTreeSet::from([id]);
                node.raft
                    .change_membership(openraft::ChangeMembers::AddVoterIds(ids), false)
                    .await
                    .map_err(raft_error)
            };
            tokio::select! {
                () = node.stop.cancelled() => {}
                r = promote => match r {
                    Ok(_) => tracing::info!(node = id, "node caught up: now a voter"),
                    Err(e) => tracing::warn!(node = id, "node not made a voter: {e}"),
                },
            }
        });
        Ok(())
    }

    /// Removes node `id` from the group (voter or learner).
    ///
    /// # Errors
    /// It is not a member, it is the last voter, or Raft refused.
    pub async fn remove(&self, id: u64) -> Result<()> {
        let membership = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        let membership = membership.membership();
        let ids = std::collections::BTreeSet::from([id]);
        let change = if membership.voter_ids().any(|v| v == id) {
            if membership.voter_ids().count() == 1 {
                return Err(Error::Invalid(format!(
                    "node {id} is the group's last voter"
                )));
            }
            openraft::ChangeMembers::RemoveVoters(ids)
        } else if membership.get_node(&id).is_some() {
            openraft::ChangeMembers::RemoveNodes(ids)
        } else {
            return Err(Error::Invalid(format!("node {id} is not a member")));
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(raft_error)?;
        tracing::info!(node = id, "node removed from the group");
        Ok(())
    }

    /// Hands the leadership to voter `to` (planned maintenance): this node stops
    /// leading once `to` has the whole log and was elected.
    ///
    /// # Errors
    /// `to` is not a voter of the group, or is this node.
    pub async fn transfer(&self, to: u64) -> Result<()> {
        let membership = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        if to == self.peers.me {
            return Err(Error::Invalid(format!("node {to} already leads")));
        }
        if !membership.membership().voter_ids().any(|v| v == to) {
            return Err(Error::Invalid(format!(
                "node {to} is not a voter of the group"
            )));
        }
        // The target stands for election at once, not after the followers' patience
        // the lease counts on: this leader stops serving first (requests, deliveries and
        // check-backs all ask the lease), so the two never serve at once. Once asked,
        // openraft's leader sends no more heartbeats in this term: if the target is not
        // elected, the others elect a leader after their election timeout (this node
        // may win again, and then serves). RESIGN_FOR covers that.
        self.lease.resign(RESIGN_FOR);
        if let Err(e) = self.raft.trigger().transfer_leader(to).await {
            self.lease.resume();
            return Err(Error::Internal(e.to_string()));
        }
        tracing::info!(to, "handing the leadership over; serving nothing meanwhile");
        Ok(())
    }

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

/// A Raft refusal as the broker's error.
fn raft_error<E>(e: openraft::errors::RaftError<TypeConfig, E>) -> Error
where
    E: std::error::Error
        + openraft::TryAsRef<openraft::errors::ForwardToLeader<TypeConfig>>
        + 'static,
{
    match e.forward_to_leader() {
        Some(_) => Error::NotLeader(None),
        None => Error::Invalid(e.to_string()),
    }
}

/// One term of this node's leadership.
#[derive(Debug, Clone)]
pub struct Leadership {
    /// The term.
    pub term: u64,
    /// The leader id of the term: the writer's writes carry it.
    pub leader: LeaderId,
}

/// A follower's housekeeping, every `every` (the retention sweep's interval): its
/// indexes follow the floors the leader's retention moved, and what retention removed
/// is compacted on this disk too (see [`crate::retention::follower_compaction`]). The
/// leader does its own.
async fn keep_house(raft: Raft, slot: Arc<StorageSlot>, every: Duration, stop: CancellationToken) {
    let mut compacted = HashMap::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        if raft.metrics().borrow_watched().state == ServerState::Leader {
            continue;
        }
        let mut progress = std::mem::take(&mut compacted);
        let (slot, stop) = (slot.clone(), stop.clone());
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

/// Forms the group if this node has the lowest id and every peer is as new as it is.
async fn form_group(raft: Raft, peers: Peers, token: String, stop: CancellationToken) {
    let lowest = peers.nodes.keys().next().copied();
    loop {
        match raft.is_initialized().await {
            Ok(true) | Err(_) => return,
            Ok(false) => {}
        }
        if lowest == Some(peers.me) {
            let mut all_new = true;
            for (id, addr) in peers.nodes.iter().filter(|(id, _)| **id != peers.me) {
                match network::info(addr, &token, Duration::from_secs(1)).await {
                    Ok(info) if !info.initialized => {}
                    Ok(_) => {
                        tracing::info!(
                            peer = id,
                            "peer already belongs to a group: waiting to be brought up to date"
                        );
                        all_new = false;
                    }
                    Err(e) => {
                        tracing::info!(
                            peer = id,
                            "peer not reachable yet ({e}): the group forms once every peer answers"
                        );
                        all_new = false;
                    }
                }
            }
            if all_new {
                let members: BTreeMap<u64, BasicNode> = peers
                    .nodes
                    .iter()
                    .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                    .collect();
                match raft.initialize(members).await {
                    Ok(()) => {
                        tracing::info!(nodes = peers.nodes.len(), "group formed");
                        return;
                    }
                    Err(e) => tracing::warn!("forming the group failed: {e}"),
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
