//! Metadata operations: names, directories, links and attributes, passed straight to the
//! backing directory (metadata is treated as durable), keeping the inode table and the
//! pending data in step with them.

use std::ffi::OsStr;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, DirEntryExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use fuser::{FileAttr, FileType, RenameFlags, TimeOrNow};
use nix::sys::stat::UtimensatFlags;
use nix::sys::time::TimeSpec;

use crate::inodes::ROOT;
use crate::state::{DirEntry, Handle, State};

/// The attribute changes of one `setattr`, size aside.
#[derive(Debug, Default)]
pub struct AttrChange {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New access time.
    pub atime: Option<TimeOrNow>,
    /// New modification time.
    pub mtime: Option<TimeOrNow>,
}

impl State {
    /// `parent/name` as (relative, backing) paths.
    fn child(&self, parent: u64, name: &OsStr) -> io::Result<(PathBuf, PathBuf)> {
        let rel = self
            .inodes
            .path(parent)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))?
            .join(name);
        let full = self.backing.join(&rel);
        Ok((rel, full))
    }

    /// Attributes of the new or found `rel`, counting one kernel lookup of it.
    fn remember(&mut self, rel: PathBuf) -> io::Result<FileAttr> {
        let attr = self.attr_of(&self.backing.join(&rel).symlink_metadata()?);
        self.inodes.remember(attr.ino.0, rel);
        Ok(attr)
    }

    /// Drops the pending data of `ino` if its last name went and nothing holds it open.
    fn drop_if_freed(&mut self, ino: u64, nlink_before: u64) {
        let open = self
            .handles
            .values()
            .any(|h| matches!(h, Handle::File { ino: i, .. } if *i == ino));
        if nlink_before <= 1 && !open {
            self.pending.remove(&ino);
        }
    }

    /// Looks `name` up in `parent`.
    ///
    /// # Errors
    /// It does not exist, or the parent is gone.
    pub fn lookup(&mut self, parent: u64, name: &OsStr) -> io::Result<FileAttr> {
        let (rel, _) = self.child(parent, name)?;
        self.remember(rel)
    }

    /// The kernel dropped `n` lookups of `ino`.
    pub fn forget(&mut self, ino: u64, n: u64) {
        self.inodes.forget(ino, n);
    }

    /// Changes attributes; a size change stays pending like a write.
    ///
    /// # Errors
    /// The file is gone, or the backing change fails.
    pub fn setattr(
        &mut self,
        ino: u64,
        fh: Option<u64>,
        size: Option<u64>,
        change: &AttrChange,
    ) -> io::Result<FileAttr> {
        if let Some(size) = size {
            self.truncate(ino, fh, size)?;
        }
        let has_meta_change = change.mode.is_some()
            || change.uid.is_some()
            || change.gid.is_some()
            || change.atime.is_some()
            || change.mtime.is_some();
        if has_meta_change {
            let path = self.full_path(ino)?;
            if let Some(mode) = change.mode {
                fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777))?;
            }
            if change.uid.is_some() || change.gid.is_some() {
                std::os::unix::fs::lchown(&path, change.uid, change.gid)?;
            }
            if change.atime.is_some() || change.mtime.is_some() {
                nix::sys::stat::utimensat(
                    nix::fcntl::AT_FDCWD,
                    &path,
                    &timespec(change.atime),
                    &timespec(change.mtime),
                    UtimensatFlags::NoFollowSymlink,
                )?;
            }
        }
        self.getattr(ino, fh)
    }

    /// Creates and opens a regular file; returns its attributes and handle.
    ///
    /// # Errors
    /// It exists and `O_EXCL` was asked, or the backing create fails.
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> io::Result<(FileAttr, u64)> {
        let (rel, full) = self.child(parent, name)?;
        let exclusive = flags & libc::O_EXCL != 0;
        let existed = !exclusive && full.symlink_metadata().is_ok();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .create_new(exclusive)
            .mode(mode & 0o7777)
            .open(&full)?;
        let ino = self.inodes.fuse_ino(file.metadata()?.ino());
        if !existed {
            // A new backing inode may reuse the number of one whose pending data was never
            // dropped; it starts clean.
            self.pending.remove(&ino);
        }
        let fh = self.add_handle(Handle::File {
            ino,
            file,
            writable: true,
        });
        if existed && flags & libc::O_TRUNC != 0 {
            self.truncate(ino, Some(fh), 0)?;
        }
        let attr = self.remember(rel)?;
        Ok((attr, fh))
    }

    /// Creates a directory.
    ///
    /// # Errors
    /// The backing `mkdir` fails.
    pub fn mkdir(&mut self, parent: u64, name: &OsStr, mode: u32) -> io::Result<FileAttr> {
        let (rel, full) = self.child(parent, name)?;
        DirBuilder::new().mode(mode & 0o7777).create(&full)?;
        self.remember(rel)
    }

    /// Removes a file name; the file's pending data goes with its last name.
    ///
    /// # Errors
    /// The backing `unlink` fails.
    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> io::Result<()> {
        let (rel, full) = self.child(parent, name)?;
        let meta = full.symlink_metadata()?;
        fs::remove_file(&full)?;
        let ino = self.inodes.fuse_ino(meta.ino());
        self.drop_if_freed(ino, meta.nlink());
        self.inodes.detach(ino, &rel);
        Ok(())
    }

    /// Removes an empty directory.
    ///
    /// # Errors
    /// The backing `rmdir` fails.
    pub fn rmdir(&mut self, parent: u64, name: &OsStr) -> io::Result<()> {
        let (rel, full) = self.child(parent, name)?;
        let meta = full.symlink_metadata()?;
        fs::remove_dir(&full)?;
        self.inodes.detach(self.inodes.fuse_ino(meta.ino()), &rel);
        Ok(())
    }

    /// Renames; pending data stays with the inode, and a replaced file's goes with it.
    ///
    /// # Errors
    /// The backing rename fails, or `flags` asks for a whiteout.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> io::Result<()> {
        let (from_rel, from) = self.child(parent, name)?;
        let (to_rel, to) = self.child(new_parent, new_name)?;
        let source = from.symlink_metadata()?;
        let replaced = to.symlink_metadata().ok();
        if flags.is_empty() {
            fs::rename(&from, &to)?;
        } else {
            let flags = nix::fcntl::RenameFlags::from_bits(flags.bits())
                .filter(|f| !f.contains(nix::fcntl::RenameFlags::RENAME_WHITEOUT))
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            let at = nix::fcntl::AT_FDCWD;
            nix::fcntl::renameat2(at, &from, at, &to, flags)?;
        }
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            self.inodes.exchange(&from_rel, &to_rel);
            return Ok(());
        }
        if source.is_dir() && replaced.is_none() && flags.is_empty() {
            // Durable only once a directory holding it is fsynced (POSIX says no more;
            // ext4 happens to commit it with any fsync, other file systems do not).
            self.renamed.push((from_rel.clone(), to_rel.clone()));
        }
        if let Some(replaced) = replaced.filter(|r| r.ino() != source.ino()) {
            let ino = self.inodes.fuse_ino(replaced.ino());
            self.drop_if_freed(
                ino,
                if replaced.is_dir() {
                    1
                } else {
                    replaced.nlink()
                },
            );
            self.inodes.detach(ino, &to_rel);
        }
        self.inodes.relocate(&from_rel, &to_rel);
        Ok(())
    }

    /// Adds the hard link `new_parent/new_name` to `ino`.
    ///
    /// # Errors
    /// The backing `link` fails.
    pub fn link(&mut self, ino: u64, new_parent: u64, new_name: &OsStr) -> io::Result<FileAttr> {
        let source = self.full_path(ino)?;
        let (rel, full) = self.child(new_parent, new_name)?;
        fs::hard_link(source, full)?;
        self.remember(rel)
    }

    /// Creates the symbolic link `parent/name` pointing at `target`.
    ///
    /// # Errors
    /// The backing `symlink` fails.
    pub fn symlink(&mut self, parent: u64, name: &OsStr, target: &Path) -> io::Result<FileAttr> {
        let (rel, full) = self.child(parent, name)?;
        std::os::unix::fs::symlink(target, full)?;
        self.remember(rel)
    }

    /// The target of the symbolic link `ino`.
    ///
    /// # Errors
    /// It is gone or not a symbolic link.
    pub fn readlink(&self, ino: u64) -> io::Result<PathBuf> {
        fs::read_link(self.full_path(ino)?)
    }

    /// Opens a directory, taking its listing now so offsets stay stable while it is read.
    ///
    /// # Errors
    /// The backing directory cannot be read.
    pub fn opendir(&mut self, ino: u64) -> io::Result<u64> {
        let path = self.full_path(ino)?;
        let parent = if ino == ROOT {
            ROOT
        } else {
            self.inodes
                .fuse_ino(path.join("..").symlink_metadata()?.ino())
        };
        let mut entries = vec![
            DirEntry {
                ino,
                kind: FileType::Directory,
                name: ".".into(),
            },
            DirEntry {
                ino: parent,
                kind: FileType::Directory,
                name: "..".into(),
            },
        ];
        for entry in fs::read_dir(&path)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            entries.push(DirEntry {
                ino: self.inodes.fuse_ino(entry.ino()),
                kind: FileType::from_std(kind).unwrap_or(FileType::RegularFile),
                name: entry.file_name(),
            });
        }
        Ok(self.add_handle(Handle::Dir { entries }))
    }

    /// The listing taken by [`State::opendir`].
    ///
    /// # Errors
    /// `fh` is not an open directory.
    pub fn dir_entries(&self, fh: u64) -> io::Result<&[DirEntry]> {
        match self.handles.get(&fh) {
            Some(Handle::Dir { entries }) => Ok(entries),
            Some(Handle::File { .. }) => Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
            None => Err(io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    /// Closes a directory handle.
    pub fn releasedir(&mut self, fh: u64) {
        self.handles.remove(&fh);
    }

    /// Syncs a directory of the backing tree (its entries are already there).
    ///
    /// # Errors
    /// The backing directory cannot be opened or synced.
    pub fn fsyncdir(&mut self, ino: u64) -> io::Result<()> {
        fs::File::open(self.full_path(ino)?)?.sync_all()?;
        if let Some(dir) = self.inodes.path(ino).map(Path::to_path_buf) {
            // Renames into or out of it are durable now.
            self.renamed
                .retain(|(from, to)| from.parent() != Some(&dir) && to.parent() != Some(&dir));
        }
        Ok(())
    }

    /// Space figures of the backing file system.
    ///
    /// # Errors
    /// `statvfs` fails.
    pub fn statfs(&self) -> io::Result<nix::sys::statvfs::Statvfs> {
        Ok(nix::sys::statvfs::statvfs(&self.backing)?)
    }

    /// `access(2)` on the backing file.
    ///
    /// # Errors
    /// Access is denied or the file is gone.
    pub fn access(&self, ino: u64, mask: i32) -> io::Result<()> {
        let flags = nix::unistd::AccessFlags::from_bits_truncate(mask);
        Ok(nix::unistd::access(&self.full_path(ino)?, flags)?)
    }
}

/// A `setattr` time for `utimensat`: absent ones are left alone.
fn timespec(time: Option<TimeOrNow>) -> TimeSpec {
    match time {
        None => TimeSpec::UTIME_OMIT,
        Some(TimeOrNow::Now) => TimeSpec::UTIME_NOW,
        Some(TimeOrNow::SpecificTime(t)) => {
            TimeSpec::from_duration(t.duration_since(UNIX_EPOCH).unwrap_or_default())
        }
    }
}
