//! A replicated broker group on Raft (openraft 0.10): the writer's batches go through a
//! replicated log before they are applied, so an OK means a majority has them on disk.
//!
//! ```text
//!  leader: writer ──batch──▶ raft (log store: append + fsync) ──▶ followers (the same)
//!                                   │ committed by a majority
//!                                   ▼
//!              state machine: the batch applied to the broker's RocksDB (every node)
//! ```
//!
//! - [`log_store`]: the Raft log in its own RocksDB (entries, vote, committed), fsynced
//!   once per group of appends, like the writer's syncer.
//! - [`state_machine`]: applies a committed batch to the broker's storage with the log id
//!   it came in, and makes snapshots (RocksDB checkpoints).
//! - [`network`]: node-to-node RPCs over TCP (or mutual TLS), length-prefixed frames of
//!   postcard.
//! - [`handshake`]: how two nodes prove to each other that they hold the group's
//!   secret, without sending it.
//! - [`node`]: starts Raft on a node, forms the group the first time, and tells the
//!   server when this node leads (serve clients) and when it stops leading.
//! - [`lease`]: the group's timing in one place, and the leader's lease that every
//!   request, delivery and check-back asks before it serves.
//! - [`clock`]: how far each member's wall clock is from the group's, measured by every
//!   append; a node beyond the bound refuses to lead.
//!
//! What the leader's writer decides in memory (offsets, transaction states) is decided
//! on the leader alone; followers apply bytes. A node that becomes leader therefore
//! starts its serving parts afresh from the applied state, after everything committed
//! in earlier terms is applied.

pub mod clock;
pub mod handshake;
pub mod lease;
pub mod log_store;
pub mod network;
pub mod node;
pub mod state_machine;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// The Raft types of a txmq broker group.
    pub TypeConfig:
        D = Batch,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
);

/// One write of the leader's writer: a RocksDB `WriteBatch`'s bytes.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// `WriteBatch::data()` of the staged batch.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Batch({} bytes)", self.data.len())
    }
}

impl fmt::Display for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What applying an entry answers: nothing but that it was applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied;

/// The Raft handle of a node.
pub type Raft = openraft::Raft<TypeConfig, state_machine::StateMachine>;
/// A log id of this group.
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;

/// The group as configured: this node's id and every member's node-to-node address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peers {
    /// This node.
    pub me: u64,
    /// Every member (this node too), by id.
    pub nodes: BTreeMap<u64, String>,
}

impl Peers {
    /// Parses `1=host:port,2=host:port,…` for node `me`.
    ///
    /// # Errors
    /// A malformed entry, a repeated id, an id 0, or `me` not among them.
    pub fn parse(me: u64, text: &str) -> Result<Self, String> {
        let mut nodes = BTreeMap::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, addr) = part
                .split_once('=')
                .ok_or_else(|| format!("peer {part:?} is not ID=HOST:PORT"))?;
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| format!("peer {part:?}: {id:?} is not a node id"))?;
            if id == 0 {
                return Err(format!("peer {part:?}: node ids start at 1"));
            }
            let addr = addr.trim();
            if addr
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(format!("peer {part:?}: {addr:?} is not HOST:PORT"));
            }
            if nodes.insert(id, addr.to_string()).is_some() {
                return Err(format!("node {id} is named twice in the peers"));
            }
        }
        if !nodes.contains_key(&me) {
            return Err(format!("node id {me} is not among the peers"));
        }
        Ok(Self { me, nodes })
    }

    /// This node's node-to-node address.
    pub fn my_addr(&self) -> &str {
        &self.nodes[&self.me]
    }
}

/// An `io::Error` for what went wrong, for openraft's storage traits.
pub(crate) fn io_err(e: impl fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::Peers;

    #[test]
    fn peers_are_parsed_and_checked() {
        let p = Peers::parse(2, "1=127.0.0.1:9911, 2=127.0.0.1:9912,3=h:9913").unwrap();
        assert_eq!(p.nodes.len(), 3);
        assert_eq!(p.my_addr(), "127.0.0.1:9912");
        for (me, bad, why) in [
            (4, "1=a:1,2=b:2", "not among"),
            (1, "1=a:1,1=b:2", "twice"),
            (1, "1=a", "HOST:PORT"),
            (1, "x=a:1", "node id"),
            (1, "0=a:1,1=b:1", "start at 1"),
            (1, "1=a:99999", "HOST:PORT"),
        ] {
            let e = Peers::parse(me, bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
