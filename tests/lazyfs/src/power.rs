//! What happens to pending data beyond fsync: a power cut drops it, a failing disk makes
//! fsync fail, and a clean unmount writes it back.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::inodes::Inodes;
use crate::overlay::Overlay;
use crate::state::State;

impl State {
    /// Power cut: forgets every pending change of every file, and puts back directories
    /// renamed since their parent was last fsynced; returns the bytes dropped and the
    /// renames undone.
    pub fn power_cut(&mut self) -> (u64, u64) {
        let bytes = self.pending.drain().map(|(_, o)| o.pending_bytes()).sum();
        let mut undone = 0;
        for (from, to) in std::mem::take(&mut self.renamed).into_iter().rev() {
            let (back, now) = (self.backing.join(&from), self.backing.join(&to));
            // Only what can be put back as it was: the directory is still where it went,
            // and nothing took its old name since.
            if now.is_dir()
                && !back.exists()
                && back.parent().is_some_and(Path::is_dir)
                && std::fs::rename(&now, &back).is_ok()
            {
                self.inodes.relocate(&to, &from);
                undone += 1;
            }
        }
        (bytes, undone)
    }

    /// Turns fail-fsync mode on or off; returns whether it is now on.
    pub fn toggle_fail_fsync(&mut self) -> bool {
        self.fail_fsync = !self.fail_fsync;
        self.fail_fsync
    }

    /// Writes every pending change to the backing files and syncs them, as a clean unmount
    /// of a real file system would; returns the pending bytes written.
    ///
    /// # Errors
    /// The first file that could not be written; the others are still tried.
    pub fn flush_all(&mut self) -> io::Result<u64> {
        let pending: Vec<(u64, Overlay)> = self.pending.drain().collect();
        let mut unknown: Vec<u64> = pending
            .iter()
            .map(|(ino, _)| *ino)
            .filter(|&ino| self.inodes.path(ino).is_none())
            .collect();
        // The kernel may have forgotten a file whose data is still pending; find it by
        // inode number in the backing tree.
        let found = find_inodes(&self.backing, &mut unknown, &self.inodes);
        let mut first_error = None;
        let mut bytes = 0;
        for (ino, overlay) in pending {
            let path = self
                .full_path(ino)
                .ok()
                .or_else(|| found.get(&ino).cloned());
            // No path: unlinked while open; its data dies with it.
            let Some(path) = path else { continue };
            let result = OpenOptions::new().write(true).open(&path).and_then(|file| {
                overlay.apply(&mut &file)?;
                file.sync_all()
            });
            match result {
                Ok(()) => bytes += overlay.pending_bytes(),
                Err(e) => {
                    first_error.get_or_insert(io::Error::new(
                        e.kind(),
                        format!("{}: {e}", path.display()),
                    ));
                }
            }
        }
        first_error.map_or(Ok(bytes), Err)
    }
}

/// Walks `root` (not following symlinks) for the backing paths of the FUSE inodes `wanted`.
fn find_inodes(root: &Path, wanted: &mut Vec<u64>, inodes: &Inodes) -> HashMap<u64, PathBuf> {
    let mut found = HashMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if wanted.is_empty() {
            break;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let ino = inodes.fuse_ino(meta.ino());
            if let Some(i) = wanted.iter().position(|&w| w == ino) {
                wanted.swap_remove(i);
                found.insert(ino, entry.path());
            }
            if meta.is_dir() {
                dirs.push(entry.path());
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;
    use crate::inodes::ROOT;

    fn state() -> (tempfile::TempDir, State) {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path().to_path_buf()).unwrap();
        (dir, state)
    }

    /// Creates `name` in the root; returns its inode and handle.
    fn create(state: &mut State, name: &str) -> (u64, u64) {
        let (attr, fh) = state
            .create(
                ROOT,
                OsStr::new(name),
                0o644,
                libc::O_CREAT | libc::O_WRONLY,
            )
            .unwrap();
        (attr.ino.0, fh)
    }

    #[test]
    fn power_cut_drops_unsynced_data_and_reports_its_bytes() {
        let (dir, mut state) = state();
        let (ino, fh) = create(&mut state, "a");
        state.write(ino, fh, 0, b"synced").unwrap();
        state.fsync(ino, fh, false).unwrap();
        state.write(ino, fh, 6, b" lost").unwrap();
        state.truncate(ino, Some(fh), 3).unwrap();
        state.write(ino, fh, 3, b"ced and lost").unwrap();
        assert_eq!(state.read(ino, fh, 0, 100).unwrap(), b"synced and lost");
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"synced");

        assert_eq!(state.power_cut(), (5 + 12, 0));
        assert_eq!(state.read(ino, fh, 0, 100).unwrap(), b"synced");
        assert_eq!(state.getattr(ino, None).unwrap().size, 6);
        assert_eq!(state.power_cut(), (0, 0));
    }

    #[test]
    fn failed_fsync_reports_eio_and_loses_the_data() {
        let (dir, mut state) = state();
        let (ino, fh) = create(&mut state, "a");
        assert!(state.toggle_fail_fsync());
        state.write(ino, fh, 0, b"doomed").unwrap();
        let err = state.fsync(ino, fh, true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(!state.toggle_fail_fsync());
        // The retry "succeeds" with nothing to save: the trap fsync callers must not fall in.
        state.fsync(ino, fh, true).unwrap();
        assert_eq!(state.read(ino, fh, 0, 100).unwrap(), b"");
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"");
    }

    #[test]
    fn unlink_drops_pending_data_and_rename_carries_it() {
        let (_dir, mut state) = state();
        let (a, fh) = create(&mut state, "a");
        state.write(a, fh, 0, b"kept pending").unwrap();
        state.release(fh);
        let (c, fh) = create(&mut state, "c");
        state.write(c, fh, 0, b"unlinked").unwrap();
        state.release(fh);
        state.unlink(ROOT, OsStr::new("c")).unwrap();
        assert!(!state.pending.contains_key(&c));

        state
            .rename(
                ROOT,
                OsStr::new("a"),
                ROOT,
                OsStr::new("b"),
                fuser::RenameFlags::empty(),
            )
            .unwrap();
        let attr = state.lookup(ROOT, OsStr::new("b")).unwrap();
        assert_eq!(attr.ino.0, a);
        assert_eq!(attr.size, 12);
        let fh = state.open(a).unwrap();
        assert_eq!(state.read(a, fh, 0, 100).unwrap(), b"kept pending");
        assert_eq!(state.power_cut(), (12, 0));
    }

    /// A directory's rename is durable once its parent is fsynced; before, a power cut
    /// puts the directory back under its old name (what a snapshot installation that
    /// renames its state directories must fsync for).
    #[test]
    fn a_directory_rename_needs_its_parent_fsynced() {
        let (dir, mut state) = state();
        let a = state.mkdir(ROOT, OsStr::new("a"), 0o755).unwrap().ino.0;
        state.mkdir(ROOT, OsStr::new("c"), 0o755).unwrap();
        let rename = |state: &mut State, from: &str, to: &str| {
            state
                .rename(
                    ROOT,
                    OsStr::new(from),
                    ROOT,
                    OsStr::new(to),
                    fuser::RenameFlags::empty(),
                )
                .unwrap();
        };
        rename(&mut state, "a", "b");
        assert_eq!(state.power_cut(), (0, 1));
        assert!(dir.path().join("a").is_dir() && !dir.path().join("b").exists());
        assert_eq!(state.lookup(ROOT, OsStr::new("a")).unwrap().ino.0, a);
        rename(&mut state, "a", "b");
        state.fsyncdir(ROOT).unwrap();
        rename(&mut state, "c", "d");
        assert_eq!(
            state.power_cut(),
            (0, 1),
            "only the unsynced rename is undone"
        );
        assert!(dir.path().join("b").is_dir() && dir.path().join("c").is_dir());
    }

    #[test]
    fn clean_unmount_writes_back_even_files_the_kernel_forgot() {
        let (dir, mut state) = state();
        let (ino, fh) = create(&mut state, "a");
        state.write(ino, fh, 0, b"written back").unwrap();
        state.release(fh);
        state.forget(ino, 1);
        assert!(
            state.full_path(ino).is_err(),
            "the inode table still knows it"
        );
        assert_eq!(state.flush_all().unwrap(), 12);
        assert_eq!(
            std::fs::read(dir.path().join("a")).unwrap(),
            b"written back"
        );
        assert!(state.pending.is_empty());
    }
}
