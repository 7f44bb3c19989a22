//! The broker under test: started by the bench (one broker, or a group of nodes on this
//! machine), or external.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::Flush;

/// One broker process the bench started.
struct Node {
    child: Option<Child>,
    /// Its flags (the same at a restart).
    args: Vec<String>,
    addr: String,
    /// Its Remoting and gRPC faces' addresses, when they listen.
    faces: Faces,
    dir: tempfile::TempDir,
}

/// The other faces' addresses.
#[derive(Debug, Clone, Default)]
pub struct Faces {
    pub remoting: Option<String>,
    pub grpc: Option<String>,
}

/// A broker (or a group) the bench talks to.
pub struct Broker {
    addr: String,
    faces: Faces,
    nodes: Vec<Node>,
    /// A group's secret file (`--cluster-secret-file`), kept while the nodes run.
    _secret: Option<tempfile::TempDir>,
}

fn bin() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("txmq-broker");
    anyhow::ensure!(
        bin.exists(),
        "{} not found: build it with `cargo build --release --workspace`",
        bin.display()
    );
    Ok(bin)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Node {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut child = Command::new(bin()?)
            .args(&self.args)
            .arg("--data-dir")
            .arg(self.dir.path())
            .env("RUST_LOG", "warn,openraft=off")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting txmq-broker")?;
        let stdout = child.stdout.take().context("broker stdout")?;
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        self.addr = line
            .trim()
            .strip_prefix("txmq-broker listening on ")
            .with_context(|| format!("unexpected broker output {line:?}"))?
            .to_string();
        let listens = |flag: &str| {
            self.args
                .iter()
                .position(|a| a == flag)
                .and_then(|i| self.args.get(i + 1))
                .is_some_and(|v| v != "none")
        };
        let (want_remoting, want_grpc) = (listens("--remoting-listen"), listens("--grpc-listen"));
        self.faces = Faces::default();
        while (want_remoting && self.faces.remoting.is_none())
            || (want_grpc && self.faces.grpc.is_none())
        {
            line.clear();
            anyhow::ensure!(
                stdout.read_line(&mut line)? > 0,
                "the broker's output ended"
            );
            let line = line.trim();
            if let Some(a) = line.strip_prefix("txmq-broker remoting listening on ") {
                self.faces.remoting = Some(a.to_string());
            }
            if let Some(a) = line.strip_prefix("txmq-broker grpc listening on ") {
                self.faces.grpc = Some(a.to_string());
            }
        }
        self.child = Some(child);
        Ok(())
    }

    fn start(args: Vec<String>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("txmq-bench")
            .tempdir_in(std::env::var("TXMQ_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))?;
        let mut node = Self {
            child: None,
            args,
            addr: String::new(),
            faces: Faces::default(),
            dir,
        };
        node.spawn()?;
        Ok(node)
    }
}

/// The flags every node gets: its flush mode, and the faces `extra` does not open off.
fn common(flush: Flush, extra: &[String]) -> Vec<String> {
    let flush = match flush {
        Flush::Sync => "sync",
        Flush::Async => "async",
    };
    let mut args = vec!["--flush".to_string(), flush.into()];
    for face in ["--grpc-listen", "--remoting-listen"] {
        if !extra.iter().any(|a| a == face) {
            args.extend([face.to_string(), "none".into()]);
        }
    }
    args
}

impl Broker {
    /// A broker somebody else runs.
    pub fn external(addr: &str) -> Self {
        Self {
            addr: addr.to_string(),
            faces: Faces::default(),
            nodes: Vec::new(),
            _secret: None,
        }
    }

    /// Its Remoting and gRPC faces' addresses (those that listen).
    pub fn faces(&self) -> Faces {
        self.faces.clone()
    }

    /// Starts `txmq-broker` (next to this binary) on a temporary directory.
    pub fn start(flush: Flush, extra: &[String]) -> anyhow::Result<Self> {
        let mut args = vec!["--listen".to_string(), "127.0.0.1:0".into()];
        args.extend(common(flush, extra));
        args.extend_from_slice(extra);
        let node = Node::start(args)?;
        Ok(Self {
            addr: node.addr.clone(),
            faces: node.faces.clone(),
            nodes: vec![node],
            _secret: None,
        })
    }

    /// Starts a group of `n` nodes on this machine and waits for its leader.
    pub async fn start_group(n: usize, flush: Flush, extra: &[String]) -> anyhow::Result<Self> {
        let peers = (1..=n)
            .map(|i| Ok(format!("{i}=127.0.0.1:{}", free_port()?)))
            .collect::<anyhow::Result<Vec<_>>>()?
            .join(",");
        let secret = tempfile::tempdir()?;
        let secret_file = secret.path().join("cluster-secret");
        std::fs::write(
            &secret_file,
            format!("bench-{}-{}\n", std::process::id(), peers),
        )?;
        let mut nodes = Vec::new();
        for i in 1..=n {
            let mut args = vec![
                "--listen".to_string(),
                format!("127.0.0.1:{}", free_port()?),
                "--node-id".into(),
                i.to_string(),
                "--peers".into(),
                peers.clone(),
                "--cluster-secret-file".into(),
                secret_file.display().to_string(),
            ];
            args.extend(common(flush, extra));
            args.extend_from_slice(extra);
            nodes.push(Node::start(args)?);
        }
        let addr = nodes
            .iter()
            .map(|n| n.addr.clone())
            .collect::<Vec<_>>()
            .join(",");
        let broker = Self {
            addr,
            faces: Faces::default(),
            nodes,
            _secret: Some(secret),
        };
        broker.leader(Duration::from_secs(60)).await?;
        Ok(broker)
    }

    /// The index of the group's leader (by its status), waiting up to `limit`.
    pub async fn leader(&self, limit: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(admin) = txmq_client::Admin::connect(&self.addr, "").await
                && let Ok(s) = admin.cluster_status().await
                && s.leader > 0
            {
                return Ok(s.leader as usize - 1);
            }
            anyhow::ensure!(Instant::now() < deadline, "no leader within {limit:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again on its data directory and address.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].spawn()
    }

    /// Its address (a group's: every node's, separated by commas).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Its data directory (own single broker only).
    pub fn data_dir(&self) -> Option<std::path::PathBuf> {
        match self.nodes.as_slice() {
            [node] => Some(node.dir.path().to_path_buf()),
            _ => None,
        }
    }

    /// User + system CPU seconds so far, of every node together (own brokers only).
    pub fn cpu_seconds(&self) -> Option<f64> {
        if self.nodes.is_empty() {
            return None;
        }
        let mut total = 0.0;
        for node in &self.nodes {
            let pid = node.child.as_ref()?.id();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            total += ticks / 100.0;
        }
        Some(total)
    }

    /// Peak resident set size in MiB, the largest of the nodes (own brokers only).
    pub fn peak_rss_mb(&self) -> Option<f64> {
        let mut peak: Option<f64> = None;
        for node in &self.nodes {
            let pid = node.child.as_ref()?.id();
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let kb: f64 = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            peak = Some(peak.unwrap_or(0.0).max(kb / 1024.0));
        }
        peak
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
