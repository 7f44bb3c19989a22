//! A broker group of `txmq-broker` processes on this machine (issue 17): each node on
//! its own data directory, client port and node-to-node port, all on loopback.

use std::time::Duration;

use crate::{TestBroker, free_port};

/// A running group.
pub struct TestGroup {
    /// Node `i` has node id `i + 1`.
    pub nodes: Vec<TestBroker>,
    /// The `--peers` every node was started with.
    pub peers: String,
}

/// The broker group's own secret every test node is started with (a file written once
/// per test process), as `--cluster-secret-file` takes it.
pub fn cluster_secret_file() -> &'static str {
    static FILE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        // Kept for the process: every group of it uses it.
        let dir = tempfile::tempdir().expect("temp dir").keep();
        let file = dir.join("cluster-secret");
        std::fs::write(&file, format!("test-group-{}\n", std::process::id()))
            .expect("write the cluster secret");
        file.display().to_string()
    })
}

/// The arguments of node `id` of a group with `peers`: its id, the members and the
/// group's secret.
pub fn node_args<'a>(id: &'a str, peers: &'a str) -> Vec<&'a str> {
    vec![
        "--node-id",
        id,
        "--peers",
        peers,
        "--cluster-secret-file",
        cluster_secret_file(),
    ]
}

/// What a node answers a handshake: `Ok(())` when it leads, else its refusal's code and
/// the leader it named.
pub async fn hello(addr: &str) -> Result<(), (i32, String)> {
    use futures::{SinkExt, StreamExt};
    let attempt = async {
        let s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| (-1, e.to_string()))?;
        let mut framed = tokio_util::codec::Framed::new(s, txmq_protocol::FrameCodec::default());
        let hello = txmq_protocol::pb::Hello {
            protocol_version: txmq_protocol::PROTOCOL_VERSION,
            ..Default::default()
        };
        framed
            .send(txmq_protocol::Frame {
                id: 1,
                body: Some(txmq_protocol::Body::Hello(hello)),
            })
            .await
            .map_err(|e| (-1, e.to_string()))?;
        match framed.next().await {
            Some(Ok(txmq_protocol::Frame {
                body: Some(txmq_protocol::Body::Response(r)),
                ..
            })) if r.code == 0 => Ok(()),
            Some(Ok(txmq_protocol::Frame {
                body: Some(txmq_protocol::Body::Response(r)),
                ..
            })) => Err((r.code, r.leader)),
            other => Err((-1, format!("{other:?}"))),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err((-1, "no answer".into())))
}

/// Whether the node at `addr` leads: it takes a handshake, or refuses an anonymous one
/// only for want of a user (a follower refuses with `NOT_LEADER`).
pub async fn leads(addr: &str) -> bool {
    match hello(addr).await {
        Ok(()) => true,
        Err((code, _)) => code == txmq_protocol::ErrorCode::NotAuthenticated as i32,
    }
}

impl TestGroup {
    /// Starts `n` nodes (ids 1 to `n`) on fresh data directories, each with `args`.
    pub fn start(n: usize, args: &[&str]) -> Self {
        Self::start_in(vec![None; n], args)
    }

    /// Starts a node on each data directory given (`None`: a fresh temporary one), with
    /// ids from 1, each with `args`.
    pub fn start_in(dirs: Vec<Option<std::path::PathBuf>>, args: &[&str]) -> Self {
        let peers = (1..=dirs.len())
            .map(|i| format!("{i}=127.0.0.1:{}", free_port()))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = dirs
            .into_iter()
            .enumerate()
            .map(|(i, dir)| {
                let id = (i + 1).to_string();
                let mut a = node_args(&id, &peers);
                a.extend_from_slice(args);
                TestBroker::start_on_fixed_port_in(dir, &a)
            })
            .collect();
        Self { nodes, peers }
    }

    /// Starts one more node (the next id) for the group to add: its `--peers` are the
    /// group's and itself; it waits to be added (`txmq cluster add`). Returns its
    /// index and its `ID=HOST:PORT` entry.
    pub fn start_extra(&mut self, args: &[&str]) -> (usize, String) {
        let id = self.nodes.len() + 1;
        let entry = format!("{id}=127.0.0.1:{}", free_port());
        let peers = format!("{},{entry}", self.peers);
        let id_text = id.to_string();
        let mut a = node_args(&id_text, &peers);
        a.extend_from_slice(args);
        self.nodes.push(TestBroker::start_on_fixed_port(&a));
        (id - 1, entry)
    }

    /// Every node's client address, separated by commas (what clients take).
    pub fn addrs(&self) -> String {
        self.nodes
            .iter()
            .map(TestBroker::addr)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node that leads (answers a handshake), waiting up to `limit`
    /// for one; nodes not running are skipped.
    pub async fn leader(&mut self, limit: Duration) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            for i in 0..self.nodes.len() {
                if self.nodes[i].is_running() && leads(self.nodes[i].addr()).await {
                    return Some(i);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs the `txmq` CLI against the group (its stdout).
    pub fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(crate::bin("txmq"))
            .arg("--broker")
            .arg(self.addrs())
            .args(args)
            .output()
            .expect("run txmq");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every node's log, headed by its index, for a failure's report.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("---- node {} ----\n{}", i + 1, n.log_text()))
            .collect()
    }
}
