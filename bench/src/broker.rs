//! The broker under test: started by the bench, or external.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

use crate::Flush;

/// A broker the bench talks to.
pub struct Broker {
    addr: String,
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
}

impl Broker {
    /// A broker somebody else runs.
    pub fn external(addr: &str) -> Self {
        Self {
            addr: addr.to_string(),
            child: None,
            dir: None,
        }
    }

    /// Starts `txmq-broker` (next to this binary) on a temporary directory.
    pub fn start(flush: Flush, extra: &[String]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let bin = exe.with_file_name("txmq-broker");
        anyhow::ensure!(
            bin.exists(),
            "{} not found: build it with `cargo build --release --workspace`",
            bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("txmq-bench")
            .tempdir_in(std::env::var("TXMQ_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))?;
        let flush = match flush {
            Flush::Sync => "sync",
            Flush::Async => "async",
        };
        let mut child = Command::new(&bin)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--grpc-listen",
                "none",
                "--flush",
                flush,
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("broker stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("txmq-broker listening on ")
            .with_context(|| format!("unexpected broker output {line:?}"))?
            .to_string();
        Ok(Self {
            addr,
            child: Some(child),
            dir: Some(dir),
        })
    }

    /// Its address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Its data directory (own broker only).
    pub fn data_dir(&self) -> Option<std::path::PathBuf> {
        self.dir.as_ref().map(|d| d.path().to_path_buf())
    }

    /// User + system CPU seconds so far (own broker only).
    pub fn cpu_seconds(&self) -> Option<f64> {
        let pid = self.child.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    }

    /// Peak resident set size in MiB (own broker only).
    pub fn peak_rss_mb(&self) -> Option<f64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
