//! Black-box tests of the `txmq-lazyfs` binary: mount a temp dir, write through it, cut the
//! power with SIGUSR1, fail fsyncs with SIGUSR2, unmount with SIGTERM. Needs root and
//! /dev/fuse; without them each test says so and passes without checking anything.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(20);

/// A running lazyfs over a temp backing dir. Dropping it kills the process and lazily
/// unmounts, so a failing test leaves no mount or process behind.
struct Lazyfs {
    child: Child,
    lines: Receiver<String>,
    backing: PathBuf,
    mount: PathBuf,
    // Dropped after `drop` has unmounted, so the temp dir is removed off the mount.
    _dir: TempDir,
}

impl Lazyfs {
    /// Mounts, or says why not and returns `None`.
    fn start(test: &str) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
            println!("skipping {test}: needs root and /dev/fuse");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        let mount = dir.path().join("mnt");
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mount).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_txmq-lazyfs"))
            .arg("--backing")
            .arg(&backing)
            .arg("--mount")
            .arg(&mount)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let fs = Self {
            child,
            lines,
            backing,
            mount,
            _dir: dir,
        };
        fs.expect_line("lazyfs mounted ");
        assert!(is_mounted(&fs.mount), "the mount is not in /proc/mounts");
        Some(fs)
    }

    /// Waits for the next line printed and checks it starts with `prefix`.
    fn expect_line(&self, prefix: &str) -> String {
        let line = self
            .lines
            .recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("no line {prefix:?} from lazyfs: {e}"));
        assert!(
            line.starts_with(prefix),
            "expected {prefix:?}, got {line:?}"
        );
        line
    }

    fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        kill(pid, signal).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mount.join(name)
    }

    /// Sends SIGTERM and waits for the process to exit.
    fn stop(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "lazyfs did not exit on SIGTERM");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Lazyfs {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mounted(&self.mount) {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
    }
}

fn is_mounted(mount: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    let mount = mount.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(mount))
}

/// Dropped bytes reported by a `lazyfs power cut: dropped N bytes, undid M directory
/// renames` line.
fn dropped(line: &str) -> u64 {
    let n = line.trim_start_matches("lazyfs power cut: dropped ");
    n.split(" bytes").next().unwrap().parse().unwrap()
}

#[test]
fn power_cut_keeps_only_fsynced_data_and_fail_fsync_reports_eio() {
    let Some(mut lazy) = Lazyfs::start("power_cut_keeps_only_fsynced_data") else {
        return;
    };
    let mut a = File::create(lazy.path("a")).unwrap();
    a.write_all(b"synced part\n").unwrap();
    a.sync_all().unwrap();
    drop(a);
    fs::write(lazy.path("b"), b"never synced").unwrap();
    let mut a = OpenOptions::new()
        .append(true)
        .open(lazy.path("a"))
        .unwrap();
    a.write_all(b"appended, not synced\n").unwrap();
    drop(a);

    // Before the cut the mount shows everything, the backing dir only what was synced.
    assert_eq!(
        fs::read(lazy.path("a")).unwrap(),
        b"synced part\nappended, not synced\n"
    );
    assert_eq!(fs::read(lazy.path("b")).unwrap(), b"never synced");
    assert_eq!(fs::read(lazy.backing.join("a")).unwrap(), b"synced part\n");
    assert_eq!(fs::read(lazy.backing.join("b")).unwrap(), b"");

    lazy.signal(Signal::SIGUSR1);
    let line = lazy.expect_line("lazyfs power cut: dropped ");
    assert_eq!(dropped(&line), 12 + 21);
    assert_eq!(fs::read(lazy.path("a")).unwrap(), b"synced part\n");
    assert_eq!(fs::metadata(lazy.path("a")).unwrap().len(), 12);
    // Metadata is durable: b still exists, but none of its data made it.
    assert_eq!(fs::metadata(lazy.path("b")).unwrap().len(), 0);
    assert_eq!(fs::read(lazy.path("b")).unwrap(), b"");

    lazy.signal(Signal::SIGUSR2);
    lazy.expect_line("lazyfs fail-fsync on");
    let mut c = File::create(lazy.path("c")).unwrap();
    c.write_all(b"doomed").unwrap();
    let err = c
        .sync_all()
        .expect_err("fsync must fail in fail-fsync mode");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    drop(c);
    // Like Linux after a failed writeback, the data is gone rather than retried.
    assert_eq!(fs::read(lazy.path("c")).unwrap(), b"");
    lazy.signal(Signal::SIGUSR2);
    lazy.expect_line("lazyfs fail-fsync off");

    let status = lazy.stop();
    assert!(status.success(), "lazyfs exited with {status}");
    lazy.expect_line("lazyfs unmounted ");
    assert!(!is_mounted(&lazy.mount), "still mounted after SIGTERM");
}

#[test]
fn rename_carries_pending_data_and_unlink_drops_it() {
    let Some(mut lazy) = Lazyfs::start("rename_carries_pending_data") else {
        return;
    };
    // The CURRENT-file pattern of RocksDB: write a temp file, fsync, rename over the target.
    fs::write(lazy.path("CURRENT"), b"MANIFEST-000001\n").unwrap();
    File::open(lazy.path("CURRENT"))
        .unwrap()
        .sync_all()
        .unwrap();
    let mut tmp = File::create(lazy.path("000002.dbtmp")).unwrap();
    tmp.write_all(b"MANIFEST-000002\n").unwrap();
    tmp.sync_data().unwrap();
    drop(tmp);
    fs::rename(lazy.path("000002.dbtmp"), lazy.path("CURRENT")).unwrap();
    File::open(&lazy.mount).unwrap().sync_all().unwrap();

    // Unsynced data moves with its inode on rename...
    fs::write(lazy.path("moved"), b"pending").unwrap();
    fs::rename(lazy.path("moved"), lazy.path("moved2")).unwrap();
    assert_eq!(fs::read(lazy.path("moved2")).unwrap(), b"pending");
    // ...and is gone with the file on unlink, so a new file never inherits it.
    fs::write(lazy.path("gone"), b"pending too").unwrap();
    fs::remove_file(lazy.path("gone")).unwrap();

    // A log appended page by page, synced at 1 MiB: only the synced prefix survives.
    let mut log = File::create(lazy.path("000003.log")).unwrap();
    let record: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    let mut synced = 0;
    for i in 0..400 {
        log.write_all(&record).unwrap();
        if i == 262 {
            log.sync_data().unwrap();
            synced = (i + 1) * record.len();
        }
    }
    drop(log);
    assert_eq!(
        fs::metadata(lazy.path("000003.log")).unwrap().len(),
        400 * 4000
    );

    lazy.signal(Signal::SIGUSR1);
    let line = lazy.expect_line("lazyfs power cut: dropped ");
    assert_eq!(dropped(&line), 7 + (400 * 4000 - synced) as u64);
    assert_eq!(
        fs::read(lazy.path("CURRENT")).unwrap(),
        b"MANIFEST-000002\n"
    );
    assert!(!lazy.path("000002.dbtmp").exists());
    assert_eq!(fs::read(lazy.path("moved2")).unwrap(), b"");
    assert!(!lazy.path("gone").exists());
    let log = fs::read(lazy.path("000003.log")).unwrap();
    assert_eq!(log.len(), synced);
    assert!(log.chunks(4000).all(|c| c == record.as_slice()));

    // Data still pending at a clean unmount is written back, as a clean shutdown would.
    fs::write(lazy.path("at-exit"), b"flushed on unmount").unwrap();
    assert!(lazy.stop().success());
    assert_eq!(
        fs::read(lazy.backing.join("at-exit")).unwrap(),
        b"flushed on unmount"
    );
}
