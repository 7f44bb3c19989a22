//! `txmq-lazyfs` driven from a test: a FUSE mount that keeps written data in memory until
//! fsync, and on demand cuts power (drops what is not synced), fails fsyncs or stalls them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{bin, signal, wait_timeout};

/// A mounted `txmq-lazyfs`, unmounted when dropped.
pub struct LazyFs {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    mount: PathBuf,
    _dirs: tempfile::TempDir,
}

impl LazyFs {
    /// Mounts a fresh one on a temporary directory; panics unless /dev/fuse and root are
    /// there (CI has both).
    pub fn mount() -> Self {
        assert!(
            Path::new("/dev/fuse").exists(),
            "this test needs /dev/fuse (CI has it)"
        );
        // SAFETY-free check of root: mount(2) of a FUSE filesystem needs it here.
        let uid = std::fs::metadata("/proc/self").map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid()
        });
        assert_eq!(
            uid.ok(),
            Some(0),
            "this test mounts FUSE and needs root (CI runs as root)"
        );
        let dirs = tempfile::tempdir().unwrap();
        let backing = dirs.path().join("backing");
        let mount = dirs.path().join("mnt");
        std::fs::create_dir_all(&backing).unwrap();
        std::fs::create_dir_all(&mount).unwrap();
        let mut child = Command::new(bin("txmq-lazyfs"))
            .arg("--backing")
            .arg(&backing)
            .arg("--mount")
            .arg(&mount)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start txmq-lazyfs");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let fs = Self {
            child,
            lines,
            mount,
            _dirs: dirs,
        };
        fs.expect_line("lazyfs mounted");
        fs
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Makes the next fsync hang, and with it every later request on the mount (which
    /// serves one at a time): a disk that stops answering, until the guard is dropped.
    /// Bind the guard after the broker: dropped first, also when the test panics, it lets
    /// the broker's hung threads go, so the broker can be killed and reaped.
    pub fn stall_fsync(&self) -> Stalled<'_> {
        signal(&self.child, libc::SIGHUP);
        let line = self.expect_line("lazyfs stall-fsync");
        assert!(line.ends_with("on"), "{line}");
        Stalled(self)
    }

    fn expect_line(&self, prefix: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("txmq-lazyfs did not say {prefix:?}"));
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    /// Makes every fsync fail with EIO (dropping the data, as Linux does), or stops that.
    pub fn fail_fsync(&self, on: bool) {
        signal(&self.child, libc::SIGUSR2);
        let line = self.expect_line("lazyfs fail-fsync");
        assert!(line.ends_with(if on { "on" } else { "off" }), "{line}");
    }

    /// Drops every write not fsynced since it was made; returns how many bytes.
    pub fn power_cut(&self) -> u64 {
        self.power_cut_counting().0
    }

    /// [`LazyFs::power_cut`], which also puts back directories renamed since their
    /// parent was last fsynced: the bytes dropped and the renames undone.
    pub fn power_cut_counting(&self) -> (u64, u64) {
        signal(&self.child, libc::SIGUSR1);
        let line = self.expect_line("lazyfs power cut");
        let mut numbers = line.split_whitespace().filter_map(|w| w.parse().ok());
        (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        signal(&self.child, libc::SIGTERM);
        if wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
    }
}

/// A stalled [`LazyFs`]; dropping it lets fsyncs through again.
#[must_use = "dropping the guard ends the stall at once"]
pub struct Stalled<'a>(&'a LazyFs);

impl Drop for Stalled<'_> {
    fn drop(&mut self) {
        signal(&self.0.child, libc::SIGHUP);
        // Not expect_line: a panic here, while a test already panics, would abort.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.0.lines.recv_timeout(left) {
                Ok(line) if line.starts_with("lazyfs stall-fsync") => return,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        eprintln!("txmq-lazyfs did not say the stall ended");
    }
}
