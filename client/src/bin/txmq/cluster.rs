//! `txmq cluster`: a broker group's members, and adding or removing one.

use clap::Subcommand;
use serde_json::json;
use txmq_client::pb;

use crate::view::View;

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// The group's leader, term, log indexes, and each node's progress and lag.
    Status {
        /// JSON: one object for the group, then one line per node.
        #[arg(long)]
        json: bool,
    },
    /// Add a node: start it first (same --peers plus itself), then add it here. It
    /// catches up from a snapshot and the log as a learner, then becomes a voter.
    Add {
        /// The node as `ID=HOST:PORT` (its node-to-node address).
        node: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Remove a node from the group.
    Remove {
        /// Its node id.
        id: u64,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Hand the leadership to another voter (before maintenance of the leader).
    Transfer {
        /// The voter to lead.
        id: u64,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(addr: &str, token: &str, cmd: ClusterCmd) -> anyhow::Result<()> {
    let admin = crate::access::admin(addr, token).await?;
    let (status, json) = match cmd {
        ClusterCmd::Status { json } => (admin.cluster_status().await?, json),
        ClusterCmd::Add { node, json } => {
            let (id, peer) = node
                .split_once('=')
                .and_then(|(id, peer)| Some((id.trim().parse::<u64>().ok()?, peer.trim())))
                .ok_or_else(|| anyhow::anyhow!("{node:?} is not ID=HOST:PORT"))?;
            (admin.cluster_add(id, peer).await?, json)
        }
        ClusterCmd::Remove { id, json } => (admin.cluster_remove(id).await?, json),
        ClusterCmd::Transfer { id, json } => (admin.cluster_transfer(id).await?, json),
    };
    print(&status, json);
    Ok(())
}

fn print(s: &pb::ClusterStatusOk, json: bool) {
    let group = json!({"leader": s.leader, "term": s.term, "last_log_index": s.last_log_index,
        "committed_index": s.committed_index, "applied_index": s.applied_index,
        "purged_index": s.purged_index, "snapshot_index": s.snapshot_index});
    if json {
        println!("{group}");
    } else {
        println!(
            "leader {}  term {}  log {} (committed {}, applied {}, snapshot {}, purged {})",
            s.leader,
            s.term,
            s.last_log_index,
            s.committed_index,
            s.applied_index,
            s.snapshot_index,
            s.purged_index
        );
    }
    let mut view = View::new(
        json,
        &[
            ("NODE", 4),
            ("ROLE", -8),
            ("PEER", -22),
            ("CLIENT", -22),
            ("MATCHED", 10),
            ("LAG", 8),
            ("CLOCK", 9),
        ],
    );
    for n in &s.nodes {
        let role = match (n.id == s.leader, n.voter) {
            (true, _) => "leader",
            (false, true) => "voter",
            (false, false) => "learner",
        };
        let client = if n.reachable {
            n.client_addr.clone()
        } else {
            "(unreachable)".into()
        };
        view.row(
            &[
                n.id.to_string(),
                role.into(),
                n.peer_addr.clone(),
                client,
                n.matched_index.to_string(),
                n.lag.to_string(),
                n.clock_skew_ms
                    .map_or_else(|| "-".into(), |ms| format!("{ms:+}ms")),
            ],
            json!({"id": n.id, "role": role, "peer_addr": n.peer_addr,
                "client_addr": n.client_addr, "reachable": n.reachable, "voter": n.voter,
                "matched_index": n.matched_index, "lag": n.lag,
                "clock_skew_ms": n.clock_skew_ms}),
        );
    }
}
