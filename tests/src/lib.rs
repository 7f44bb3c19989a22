//! Harness for black-box tests: starts the real `txmq-broker` binary on an ephemeral
//! port with a temporary data directory, restarts it, kills it with SIGKILL, and runs the
//! `txmq` CLI against it. Every process it starts is stopped when the harness is dropped,
//! and the broker's log is printed when a test fails.

pub mod certs;
pub mod dispatch;
pub mod group;
pub mod grpc;
pub mod lazyfs;
pub mod netns;
pub mod postgres;
pub mod proxy;
pub mod remoting;
pub mod torture;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Path of a binary built by this workspace (`txmq-broker`, `txmq`, `txmq-bench`).
///
/// Cargo puts binaries next to the `deps` folder that holds this test executable;
/// `TXMQ_BIN_DIR` overrides that.
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("TXMQ_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("deps dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("profile dir")
    } else {
        dir
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run the tests with `cargo nextest run --workspace`",
        path.display()
    );
    path
}

/// A running broker under test.
pub struct TestBroker {
    child: Option<Child>,
    addr: String,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    args: Vec<String>,
    log: PathBuf,
    listen: String,
    /// Environment of the next starts.
    envs: Vec<(String, String)>,
    /// Where its gRPC endpoint listens, when a test asked for one.
    grpc_addr: Option<String>,
    remoting_addr: Option<String>,
    /// Where its metrics and `/health` are served, when asked for.
    metrics_addr: Option<String>,
    /// Runs the broker inside this network namespace.
    netns: Option<String>,
}

impl TestBroker {
    /// Starts a broker on a fresh data directory with extra flags.
    pub fn start(args: &[&str]) -> Self {
        Self::start_in(None, args)
    }

    /// Starts a broker whose data directory is `data_dir` (for example on a small
    /// filesystem), or a fresh temporary one.
    pub fn start_in(data_dir: Option<PathBuf>, args: &[&str]) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = data_dir.unwrap_or_else(|| temp.path().join("data"));
        let log = temp.path().join("broker.log");
        let mut b = Self {
            child: None,
            addr: String::new(),
            dir,
            _temp: Some(temp),
            args: args.iter().map(|s| s.to_string()).collect(),
            log,
            listen: "127.0.0.1:0".into(),
            envs: Vec::new(),
            grpc_addr: None,
            remoting_addr: None,
            metrics_addr: None,
            netns: None,
        };
        b.spawn();
        b
    }

    /// Starts a broker inside network namespace `netns`, listening on `listen`
    /// (`HOST:PORT` of that namespace) across restarts.
    pub fn start_in_netns(netns: &str, listen: &str, args: &[&str]) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut b = Self {
            child: None,
            addr: String::new(),
            dir: temp.path().join("data"),
            log: temp.path().join("broker.log"),
            _temp: Some(temp),
            args: args.iter().map(|s| s.to_string()).collect(),
            listen: listen.into(),
            envs: Vec::new(),
            grpc_addr: None,
            remoting_addr: None,
            metrics_addr: None,
            netns: Some(netns.into()),
        };
        b.spawn();
        b
    }

    /// Starts a broker that keeps one port across restarts, so clients that reconnect
    /// find it again (port 0 would give a new port each start).
    pub fn start_on_fixed_port(args: &[&str]) -> Self {
        let mut b = Self::start(args);
        b.listen = b.addr.clone();
        b.fix_grpc_port();
        b
    }

    /// Keeps the gRPC endpoint's and the Remoting face's ports across restarts too
    /// (when the test asked for them).
    fn fix_grpc_port(&mut self) {
        for (addr, flag) in [
            (self.grpc_addr.clone(), "--grpc-listen"),
            (self.remoting_addr.clone(), "--remoting-listen"),
        ] {
            if let (Some(addr), Some(at)) = (addr, self.args.iter().position(|a| a == flag))
                && let Some(value) = self.args.get_mut(at + 1)
            {
                *value = addr;
            }
        }
    }

    /// [`TestBroker::start_on_fixed_port`] on a given data directory.
    pub fn start_on_fixed_port_in(data_dir: Option<PathBuf>, args: &[&str]) -> Self {
        let mut b = Self::start_in(data_dir, args);
        b.listen = b.addr.clone();
        b.fix_grpc_port();
        b
    }

    /// Sets (or with `None` removes) an environment variable for the next starts (a
    /// restart picks it up).
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.envs.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.envs.push((key.to_string(), v.to_string()));
        }
    }

    /// `HOST:PORT` its gRPC endpoint listens on (started with `--grpc-listen`).
    pub fn grpc_addr(&self) -> &str {
        self.grpc_addr
            .as_deref()
            .expect("started with --grpc-listen")
    }

    /// `HOST:PORT` its Remoting face listens on (started with `--remoting-listen`).
    pub fn remoting_addr(&self) -> &str {
        self.remoting_addr
            .as_deref()
            .expect("started with --remoting-listen")
    }

    /// `HOST:PORT` its metrics and `/health` are served on (started with
    /// `--metrics-listen`).
    pub fn metrics_addr(&self) -> &str {
        self.metrics_addr
            .as_deref()
            .expect("started with --metrics-listen")
    }

    /// `HOST:PORT` it listens on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Its data directory.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends `sig` to its process (`libc::SIGSTOP` and `libc::SIGCONT` pause and resume
    /// it; a paused broker is still killed when the test ends).
    pub fn signal(&self, sig: i32) {
        signal(self.child.as_ref().expect("running"), sig);
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        // The gRPC endpoint's fixed default port would collide between tests running
        // at once: off unless a test names an address (port 0 picks a free one).
        let mut grpc: Vec<String> = if self.args.iter().any(|a| a == "--grpc-listen") {
            Vec::new()
        } else {
            vec!["--grpc-listen".into(), "none".into()]
        };
        // The same for the Remoting face's (10911).
        if !self.args.iter().any(|a| a == "--remoting-listen") {
            grpc.extend(["--remoting-listen".into(), "none".into()]);
        }
        // `ip netns exec` execs the broker: the child's pid is the broker's.
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("txmq-broker"));
                c
            }
            None => Command::new(bin("txmq-broker")),
        };
        let mut child = command
            .arg("--listen")
            .arg(&self.listen)
            .arg("--data-dir")
            .arg(&self.dir)
            .args(&grpc)
            .args(&self.args)
            .env("RUST_LOG", "info,txmq_broker=debug")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn txmq-broker");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        let (grpc_tx, grpc_rx) = mpsc::channel();
        let (metrics_tx, metrics_rx) = mpsc::channel();
        let (remoting_tx, remoting_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("txmq-broker listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
                if let Some(addr) = line.strip_prefix("txmq-broker grpc listening on ") {
                    let _ = grpc_tx.send(addr.trim().to_string());
                }
                if let Some(addr) = line.strip_prefix("txmq-broker remoting listening on ") {
                    let _ = remoting_tx.send(addr.trim().to_string());
                }
                if let Some(addr) = line.strip_prefix("txmq-broker metrics listening on ") {
                    let _ = metrics_tx.send(addr.trim().to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => {
                self.addr = addr;
                if self.args.iter().any(|a| a == "--grpc-listen") {
                    self.grpc_addr = grpc_rx.recv_timeout(Duration::from_secs(5)).ok();
                }
                if self.args.iter().any(|a| a == "--remoting-listen") {
                    self.remoting_addr = remoting_rx.recv_timeout(Duration::from_secs(5)).ok();
                }
                if self.args.iter().any(|a| a == "--metrics-listen") {
                    self.metrics_addr = metrics_rx.recv_timeout(Duration::from_secs(5)).ok();
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("broker did not start:\n{}", self.log_text());
            }
        }
        self.child = Some(child);
    }

    /// Stops it with SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) {
        self.stop_with(libc::SIGTERM);
    }

    /// Stops it with `sig` (SIGTERM or SIGINT) and asserts it exits 0 within 30 s.
    pub fn stop_with(&mut self, sig: i32) {
        if let Some(mut child) = self.child.take() {
            signal(&child, sig);
            let status = wait_timeout(&mut child, Duration::from_secs(30));
            assert!(
                status.is_some_and(|s| s.success()),
                "broker did not exit cleanly on signal {sig} ({status:?}):\n{}",
                self.log_text()
            );
        }
    }

    /// Whether the broker process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// A line of `/proc/PID/status` such as `VmRSS` or `VmHWM`, in kB.
    pub fn memory_kb(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Kills it with SIGKILL: no shutdown, no flush.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same data directory (a new port).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    /// Clean stop, then start again.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Runs the `txmq` CLI against this broker.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("txmq"))
            .arg("--broker")
            .arg(&self.addr)
            .args(args)
            .output()
            .expect("run txmq")
    }

    /// Runs the CLI, asserts success, returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "txmq {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Starts the CLI without waiting (for processes a test kills).
    pub fn cli_spawn(&self, args: &[&str]) -> Child {
        Command::new(bin("txmq"))
            .arg("--broker")
            .arg(&self.addr)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn txmq")
    }

    /// The broker's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("---- broker log (last lines) ----");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Sends a signal to a child process.
pub fn signal(child: &Child, sig: i32) {
    // The pid is our own child's, which we have not yet waited for.
    let pid = child.id() as i32;
    #[allow(unsafe_code)]
    // SAFETY: kill(2) with a pid we own has no memory-safety effects.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Waits for a child for at most `limit`.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Parses JSON lines.
pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// Polls `f` until it returns `Some`, for at most `limit` (a bound, not a timing claim).
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`eventually`] for a test without a runtime: polls `f` (blocking) until it returns
/// `Some`, for at most `limit`.
pub fn eventually_blocking<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A plain producer connected to `b`.
pub async fn producer(b: &TestBroker) -> txmq_client::Producer {
    txmq_client::Producer::connect(b.addr(), txmq_client::ProducerOptions::default())
        .await
        .expect("connect producer")
}

/// The next delivery within `wait`, or `None`; a delivery error fails the test.
pub async fn next(c: &mut txmq_client::Consumer, wait: Duration) -> Option<txmq_client::Delivery> {
    use futures::StreamExt;
    match tokio::time::timeout(wait, c.next()).await {
        Ok(Some(d)) => Some(d.expect("delivery")),
        _ => None,
    }
}

/// Everything a new subscription of `group` receives from `topic` until `wait` passes with
/// nothing new, acked; the bodies in delivery order.
pub async fn drain(b: &TestBroker, group: &str, topic: &str, wait: Duration) -> Vec<Vec<u8>> {
    drain_from(b.addr(), group, topic, wait).await
}

/// [`drain`] from the broker (or the broker group's nodes, separated by commas) at
/// `addr`.
pub async fn drain_from(addr: &str, group: &str, topic: &str, wait: Duration) -> Vec<Vec<u8>> {
    let options = txmq_client::ConsumerOptions::new(group, topic);
    let mut c = txmq_client::Consumer::subscribe(addr, options)
        .await
        .expect("subscribe");
    let mut bodies = Vec::new();
    while let Some(d) = next(&mut c, wait).await {
        d.ack().await.expect("ack");
        bodies.push(d.body().to_vec());
    }
    bodies
}

/// A raw framed connection that has sent its Hello (id 1) with `token`; its answer is
/// still to be read.
pub async fn raw_hello(
    addr: &str,
    token: &str,
) -> tokio_util::codec::Framed<tokio::net::TcpStream, txmq_protocol::FrameCodec> {
    use futures::SinkExt;
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut framed = tokio_util::codec::Framed::new(s, txmq_protocol::FrameCodec::default());
    let hello = txmq_protocol::pb::Hello {
        protocol_version: txmq_protocol::PROTOCOL_VERSION,
        auth_token: token.into(),
        ..Default::default()
    };
    framed
        .send(txmq_protocol::Frame {
            id: 1,
            body: Some(txmq_protocol::Body::Hello(hello)),
        })
        .await
        .expect("send hello");
    framed
}

/// Sends one request on a raw connection and returns its response, skipping other frames
/// (the Hello's answer, deliveries).
pub async fn raw_call(
    framed: &mut tokio_util::codec::Framed<tokio::net::TcpStream, txmq_protocol::FrameCodec>,
    id: u64,
    body: txmq_protocol::Body,
) -> txmq_protocol::pb::Response {
    use futures::{SinkExt, StreamExt};
    framed
        .send(txmq_protocol::Frame {
            id,
            body: Some(body),
        })
        .await
        .expect("send request");
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(60), framed.next())
            .await
            .expect("no answer within 60 s")
            .expect("connection closed")
            .expect("bad frame");
        if frame.id == id
            && let Some(txmq_protocol::Body::Response(r)) = frame.body
        {
            return r;
        }
    }
}

/// Runs `command` (a broker expected to refuse to start) for at most `limit`, its
/// stdout dropped: how it exited (`None`: still running then, and killed) and its
/// stderr.
pub fn run_refusal(
    command: &mut Command,
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    use std::io::Read;
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let exited = wait_timeout(&mut child, limit);
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut err = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    (exited, err)
}

/// A TCP port free on loopback now, for a listener started later (a group's node
/// ports, a broker that keeps its port across restarts).
///
/// Taken below the kernel's ephemeral range (32768 and up by default), at a place that
/// depends on the process and a count: the kernel never hands those ports to a `:0`
/// bind or an outgoing connection, which, in the ephemeral range, took such a port
/// between this check and the broker's bind often enough to fail a group test now and
/// then ("Address already in use", under load).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let pid = std::process::id();
    for _ in 0..1_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW
            + (pid
                .wrapping_mul(7_919)
                .wrapping_add(n.wrapping_mul(104_729)))
                % SPAN;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("local addr")
        .port()
}

/// `GET path` over HTTP/1.1: (status code, body).
///
/// # Errors
/// A sentence saying what went wrong (connect, timeout, malformed answer).
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// A raw framed connection that has sent a producer's Hello (frame `id`) for `group`,
/// saying whether it answers check-backs; its answer is still to be read.
pub async fn raw_producer(
    addr: &str,
    group: &str,
    answers_checks: bool,
    id: u64,
) -> tokio_util::codec::Framed<tokio::net::TcpStream, txmq_protocol::FrameCodec> {
    use futures::SinkExt;
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut framed = tokio_util::codec::Framed::new(s, txmq_protocol::FrameCodec::default());
    let hello = txmq_protocol::pb::Hello {
        protocol_version: txmq_protocol::PROTOCOL_VERSION,
        role: txmq_protocol::pb::Role::Producer as i32,
        producer_group: group.into(),
        answers_checks,
        ..Default::default()
    };
    framed
        .send(txmq_protocol::Frame {
            id,
            body: Some(txmq_protocol::Body::Hello(hello)),
        })
        .await
        .expect("send hello");
    framed
}

/// Bytes the files under `path` take on disk (allocated blocks, as `du` counts them).
pub fn du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(path)
            .map(|d| d.flatten().map(|e| du(&e.path())).sum())
            .unwrap_or(0)
    } else {
        meta.blocks() * 512
    }
}
