//! `txmq-lazyfs`: a FUSE pass-through file system that loses unsynced data on demand, for
//! power-loss tests (in the spirit of Jepsen's LazyFS).
//!
//! ```text
//! txmq-lazyfs --backing DIR --mount MNT
//! ```
//!
//! Mounts DIR at MNT and prints `lazyfs mounted MNT` once the mount serves. Metadata goes to
//! DIR at once; file data written through MNT stays in memory until the file is fsynced.
//! Signals drive it:
//!
//! - `SIGUSR1`: power cut. Every unsynced write and truncation is dropped, so each file is
//!   back to its last fsynced content, and each directory renamed since its parent was
//!   last fsynced is back under its old name; prints `lazyfs power cut: dropped N bytes,
//!   undid M directory renames`.
//! - `SIGUSR2`: toggles fail-fsync mode, where fsync fails with `EIO` and drops the file's
//!   unsynced data (as Linux does after a failed writeback); prints `lazyfs fail-fsync on|off`.
//! - `SIGHUP`: toggles stall-fsync mode, where an fsync waits until the mode is switched
//!   off, and every request after it with it (a hung disk); prints `lazyfs stall-fsync on|off`.
//! - `SIGTERM`/`SIGINT`: unmounts, writes what is still pending to DIR (as a clean shutdown
//!   of a real machine would), prints `lazyfs unmounted MNT: flushed N bytes` and exits 0.
//!
//! # Layout
//!
//! - `overlay`: the pending writes and truncations of one file, pure logic; `backing`: how
//!   it reads the synced content and writes back.
//! - `inodes`: inode number to backing path.
//! - `state`: all state behind one lock; file data and fsync.
//! - `namespace`: metadata operations, passed through to the backing directory.
//! - `power`: power cut, fail-fsync and write-back at unmount.
//! - `fs`: the `fuser::Filesystem` glue.

mod backing;
mod fs;
mod inodes;
mod namespace;
mod overlay;
mod power;
mod state;

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use anyhow::{Context, bail};
use clap::Parser;
use fuser::{Config, MountOption, Session};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;

use crate::fs::{LazyFs, Stall};
use crate::state::State;

/// Command line.
#[derive(Debug, Parser)]
#[command(
    name = "txmq-lazyfs",
    about = "A FUSE file system that loses unsynced data on SIGUSR1"
)]
struct Args {
    /// Directory whose content the mount shows and where synced data lands.
    #[arg(long)]
    backing: PathBuf,
    /// Empty directory to mount on.
    #[arg(long)]
    mount: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let backing = args
        .backing
        .canonicalize()
        .with_context(|| format!("backing directory {}", args.backing.display()))?;
    if let Ok(mount) = args.mount.canonicalize()
        && (backing.starts_with(&mount) || mount.starts_with(&backing))
    {
        // Either way some backing path would lead through the mount back into this process,
        // which serves one request at a time: it would wait on itself.
        bail!("the backing directory and the mount point must not contain each other");
    }
    // The kernel has already applied the caller's umask to the modes of create and mkdir;
    // ours must not cut them again.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    // Handlers go in before the mount exists, so no signal can kill us with it up.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGUSR2, SIGHUP])?;

    let state = Arc::new(Mutex::new(State::new(backing.clone())?));
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("lazyfs:{}", backing.display())),
        MountOption::Subtype("txmq-lazyfs".into()),
        MountOption::RW,
    ];
    // Session::new returns after the FUSE handshake, so the mount serves from here on.
    let stall = Arc::new(Stall::default());
    let fs = LazyFs::new(Arc::clone(&state), Arc::clone(&stall));
    let mut session = Session::new(fs, &args.mount, &config)
        .with_context(|| format!("mount {}", args.mount.display()))?;
    let mut unmounter = session.unmount_callable();
    let server = thread::Builder::new()
        .name("lazyfs-serve".into())
        .spawn(move || {
            let result = session.run();
            // Unmounted from outside: wake the signal loop so the process ends too.
            let _ = signal_hook::low_level::raise(SIGTERM);
            result
        })?;
    say(&format!("lazyfs mounted {}", args.mount.display()));

    for signal in signals.forever() {
        match signal {
            SIGUSR1 => {
                let (dropped, undone) = lock(&state).power_cut();
                say(&format!(
                    "lazyfs power cut: dropped {dropped} bytes, undid {undone} directory renames"
                ));
            }
            SIGUSR2 => {
                let on = lock(&state).toggle_fail_fsync();
                say(&format!(
                    "lazyfs fail-fsync {}",
                    if on { "on" } else { "off" }
                ));
            }
            SIGHUP => {
                let on = stall.toggle();
                say(&format!(
                    "lazyfs stall-fsync {}",
                    if on { "on" } else { "off" }
                ));
            }
            _ => break,
        }
    }
    // A stalled fsync would hold the unmount up forever.
    stall.set(false);

    match unmounter.unmount() {
        Ok(()) => match server.join() {
            Ok(result) => result.context("serving the mount")?,
            Err(_) => bail!("the serving thread panicked"),
        },
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            // Files are still open on the mount; detach it so new lookups fail, and let the
            // process exit end the connection (the open files then see ENOTCONN).
            eprintln!("lazyfs: {} is busy, detaching it", args.mount.display());
            nix::mount::umount2(&args.mount, nix::mount::MntFlags::MNT_DETACH)
                .context("lazy unmount")?;
        }
        Err(e) => return Err(e).context("unmount"),
    }
    let flushed = lock(&state)
        .flush_all()
        .context("writing pending data back")?;
    say(&format!(
        "lazyfs unmounted {}: flushed {flushed} bytes",
        args.mount.display()
    ));
    Ok(())
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Prints one status line. A reader that went away must not take the mount down with a
/// panic, so write errors are ignored.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}
