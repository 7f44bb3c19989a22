//! A broker group's leader: the writer's batch goes through the Raft log instead of
//! straight into RocksDB, and comes back applied (on every node) once a majority has it
//! on disk.

use openraft::impls::ProgressResponder;
use rocksdb::WriteBatch;
use tokio_util::sync::CancellationToken;

use crate::replication::node::LeaderId;
use crate::replication::{Batch, Raft, TypeConfig};

/// Where a leader's writer sends its batches.
pub struct Replicator {
    /// The node's Raft.
    pub raft: Raft,
    /// The leader (term) this writer writes for: a write reaching Raft under another
    /// leader fails instead of landing on state this writer did not see.
    pub leader: LeaderId,
    /// The runtime the writer thread waits on.
    pub runtime: tokio::runtime::Handle,
    /// Cancelled when a write could not be replicated, or when the server stops
    /// serving: this writer's leadership is over, and a write still waiting (a leader
    /// cut off from the others) gives up.
    pub deposed: CancellationToken,
}

impl Replicator {
    /// Replicates `batch` and waits until it is applied here (a majority has it).
    ///
    /// # Errors
    /// This node no longer leads for the writer's term, or Raft stopped: the write may
    /// or may not have been committed (a later leader decides).
    pub fn replicate(&self, batch: &WriteBatch) -> Result<(), String> {
        let data = Batch {
            data: batch.data().to_vec(),
        };
        let (responder, rx) = ProgressResponder::<TypeConfig, _>::complete_only();
        let write = async {
            self.raft
                .write(data)
                .with_leader(self.leader)
                .responder(responder)
                .await
                .map_err(|e| e.to_string())?;
            match rx.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("raft dropped the write".to_string()),
            }
        };
        let result = self.runtime.block_on(async {
            tokio::select! {
                r = write => r,
                () = self.deposed.cancelled() => Err("this node stopped serving as the leader".to_string()),
            }
        });
        if let Err(e) = &result {
            tracing::warn!("a write could not be replicated, leadership is over: {e}");
            self.deposed.cancel();
        }
        result
    }
}
