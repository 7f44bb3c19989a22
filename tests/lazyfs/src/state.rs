//! Everything the file system holds, behind one lock: inodes, open handles, pending data and
//! the fail-fsync switch. The FUSE glue and the signal thread both go through it.
//!
//! This module covers file data (open, read, write, truncate, fsync); `namespace.rs` adds
//! the metadata operations, which pass straight through (a directory's rename is also
//! remembered until its parent directory is fsynced), and `power.rs` the power cut.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use crate::backing;
use crate::inodes::Inodes;
use crate::overlay::Overlay;

/// An open file or directory of the mount.
#[derive(Debug)]
pub(crate) enum Handle {
    /// A file, opened read-write on the backing side when it can be, so fsync can apply.
    File {
        ino: u64,
        file: File,
        writable: bool,
    },
    /// A directory listing taken at opendir, so readdir offsets stay stable.
    Dir { entries: Vec<DirEntry> },
}

/// One entry of a directory listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// FUSE inode number.
    pub ino: u64,
    /// Kind of file.
    pub kind: FileType,
    /// Name in the directory.
    pub name: OsString,
}

/// The whole state of a mounted lazy file system.
#[derive(Debug)]
pub struct State {
    /// The backing directory, absolute.
    pub(crate) backing: PathBuf,
    pub(crate) inodes: Inodes,
    pub(crate) handles: HashMap<u64, Handle>,
    next_fh: u64,
    /// Unsynced changes by FUSE inode number; a file without an entry reads as its backing
    /// copy.
    pub(crate) pending: HashMap<u64, Overlay>,
    pub(crate) fail_fsync: bool,
    /// Directories renamed since the directories holding them were last fsynced, in
    /// order (paths relative to the root): a power cut puts them back.
    pub(crate) renamed: Vec<(PathBuf, PathBuf)>,
}

impl State {
    /// A state serving `backing`.
    ///
    /// # Errors
    /// `backing` cannot be read.
    pub fn new(backing: PathBuf) -> io::Result<Self> {
        let root = std::fs::metadata(&backing)?;
        if !root.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        Ok(Self {
            inodes: Inodes::new(root.ino()),
            backing,
            handles: HashMap::new(),
            next_fh: 1,
            pending: HashMap::new(),
            fail_fsync: false,
            renamed: Vec::new(),
        })
    }

    /// The backing path of `ino`.
    ///
    /// # Errors
    /// `ESTALE` when no name is known for it (it was unlinked or forgotten).
    pub fn full_path(&self, ino: u64) -> io::Result<PathBuf> {
        match self.inodes.path(ino) {
            Some(rel) => Ok(self.backing.join(rel)),
            None => Err(io::Error::from_raw_os_error(libc::ESTALE)),
        }
    }

    /// The attributes the kernel sees for backing metadata `meta`: the logical size of a
    /// file with pending data.
    pub fn attr_of(&self, meta: &Metadata) -> FileAttr {
        let ino = self.inodes.fuse_ino(meta.ino());
        let size = self.pending.get(&ino).map_or(meta.size(), Overlay::size);
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: meta.blocks().max(size.div_ceil(512)),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind: FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile),
            perm: (meta.mode() & 0o7777) as u16,
            nlink: u32::try_from(meta.nlink()).unwrap_or(u32::MAX),
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: u32::try_from(meta.rdev()).unwrap_or(0),
            blksize: u32::try_from(meta.blksize()).unwrap_or(4096),
            flags: 0,
        }
    }

    /// Backing metadata of `ino`: through the handle `fh` when given, else its path, else
    /// any handle open on it (an unlinked file that is still open has no path).
    ///
    /// # Errors
    /// The file is gone, or `stat` fails.
    pub fn backing_meta(&self, ino: u64, fh: Option<u64>) -> io::Result<Metadata> {
        if let Some(Handle::File { file, .. }) = fh.and_then(|fh| self.handles.get(&fh)) {
            return file.metadata();
        }
        match self.full_path(ino) {
            Ok(path) => path.symlink_metadata(),
            Err(e) => match self.open_file(ino) {
                Some(file) => file.metadata(),
                None => Err(e),
            },
        }
    }

    /// The attributes of `ino`, see [`State::backing_meta`].
    ///
    /// # Errors
    /// As [`State::backing_meta`].
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> io::Result<FileAttr> {
        Ok(self.attr_of(&self.backing_meta(ino, fh)?))
    }

    /// Some open handle's file of `ino`.
    fn open_file(&self, ino: u64) -> Option<&File> {
        self.handles.values().find_map(|h| match h {
            Handle::File { ino: i, file, .. } if *i == ino => Some(file),
            _ => None,
        })
    }

    /// Registers a handle and returns its number.
    pub(crate) fn add_handle(&mut self, handle: Handle) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, handle);
        fh
    }

    /// Opens `ino` for reading and writing (see [`Handle::File`]).
    ///
    /// # Errors
    /// The backing file cannot be opened.
    pub fn open(&mut self, ino: u64) -> io::Result<u64> {
        let (file, writable) = open_backing(&self.full_path(ino)?)?;
        Ok(self.add_handle(Handle::File {
            ino,
            file,
            writable,
        }))
    }

    /// Closes `fh`. The pending data of a file that is unlinked and no longer open goes,
    /// as its backing inode (and number) is then freed.
    pub fn release(&mut self, fh: u64) {
        if let Some(Handle::File { ino, file, .. }) = self.handles.remove(&fh) {
            let unlinked = file.metadata().is_ok_and(|m| m.nlink() == 0);
            if unlinked && self.open_file(ino).is_none() {
                self.pending.remove(&ino);
            }
        }
    }

    /// The pending state of `ino`, started from its backing size if it had none.
    fn overlay(&mut self, ino: u64, fh: Option<u64>) -> io::Result<&mut Overlay> {
        if !self.pending.contains_key(&ino) {
            let meta = self.backing_meta(ino, fh)?;
            if !meta.is_file() {
                return Err(io::Error::from_raw_os_error(if meta.is_dir() {
                    libc::EISDIR
                } else {
                    libc::EINVAL
                }));
            }
            self.pending.insert(ino, Overlay::new(meta.size()));
        }
        Ok(self.pending.get_mut(&ino).expect("inserted above"))
    }

    /// Reads up to `size` bytes at `offset` of the logical content.
    ///
    /// # Errors
    /// `fh` is not an open file, or reading the backing file fails.
    pub fn read(&self, ino: u64, fh: u64, offset: u64, size: usize) -> io::Result<Vec<u8>> {
        let (file, _) = file_of(&self.handles, fh)?;
        if let Some(overlay) = self.pending.get(&ino) {
            return overlay.read(file, offset, size);
        }
        let mut buf = vec![0u8; size];
        let n = backing::read_full(file, &mut buf, offset)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Keeps a write in memory until the next fsync of the file.
    ///
    /// # Errors
    /// `fh` is not an open file, or the write is past the largest file size.
    pub fn write(&mut self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        self.overlay(ino, Some(fh))?;
        let (file, _) = file_of(&self.handles, fh)?;
        let overlay = self.pending.get_mut(&ino).expect("created above");
        overlay.write(file, offset, data)
    }

    /// Keeps a truncation (`setattr` size) in memory until the next fsync of the file.
    ///
    /// # Errors
    /// The file is gone or not a regular file.
    pub fn truncate(&mut self, ino: u64, fh: Option<u64>, size: u64) -> io::Result<()> {
        self.overlay(ino, fh)?.truncate(size)
    }

    /// `fallocate`: growing the file is pending like a write; `KEEP_SIZE` only reserves
    /// space, which changes no content, so it goes to the backing file.
    ///
    /// # Errors
    /// Other modes (hole punching, zeroing ranges) are `EOPNOTSUPP`.
    pub fn fallocate(
        &mut self,
        ino: u64,
        fh: u64,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        if mode == 0 {
            return self.overlay(ino, Some(fh))?.extend_to(end);
        }
        if mode != libc::FALLOC_FL_KEEP_SIZE {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let (file, _) = file_of(&self.handles, fh)?;
        let too_big = |_| io::Error::from_raw_os_error(libc::EFBIG);
        nix::fcntl::fallocate(
            file,
            nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            i64::try_from(offset).map_err(too_big)?,
            i64::try_from(len).map_err(too_big)?,
        )
        .map_err(io::Error::from)
    }

    /// `fsync`/`fdatasync`: applies the pending changes of `ino` to its backing file, then
    /// syncs that. In fail-fsync mode it fails with `EIO` and drops the pending changes,
    /// as Linux drops dirty pages whose writeback failed: a retried fsync then succeeds
    /// without having saved them, the trap that makes fsync errors unrecoverable.
    ///
    /// # Errors
    /// `EIO` in fail-fsync mode, or an error writing or syncing the backing file (the
    /// pending changes are then dropped too).
    pub fn fsync(&mut self, ino: u64, fh: u64, datasync: bool) -> io::Result<()> {
        if self.fail_fsync {
            self.pending.remove(&ino);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let (file, writable) = file_of(&self.handles, fh)?;
        let pending = self.pending.remove(&ino);
        let reopened;
        let target = if pending.is_some() && !writable {
            // The application's handle may be read-only while other handles left pending
            // data; applying it needs a writable descriptor of the same inode.
            reopened = OpenOptions::new()
                .write(true)
                .open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
            &reopened
        } else {
            file
        };
        if let Some(overlay) = pending {
            overlay.apply(&mut &*target)?;
        }
        if datasync {
            target.sync_data()
        } else {
            target.sync_all()
        }
    }
}

/// The file and writability of the open file `fh`.
fn file_of(handles: &HashMap<u64, Handle>, fh: u64) -> io::Result<(&File, bool)> {
    match handles.get(&fh) {
        Some(Handle::File { file, writable, .. }) => Ok((file, *writable)),
        Some(Handle::Dir { .. }) => Err(io::Error::from_raw_os_error(libc::EISDIR)),
        None => Err(io::Error::from_raw_os_error(libc::EBADF)),
    }
}

/// Opens a backing file read-write when allowed (fsync must be able to apply pending data
/// through it), else read-only. Never with `O_APPEND`: the kernel already turned appends
/// into writes at the end offset, and `pwrite` on an `O_APPEND` descriptor ignores offsets.
fn open_backing(path: &Path) -> io::Result<(File, bool)> {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => Ok((file, true)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EACCES | libc::EROFS | libc::EISDIR | libc::ETXTBSY | libc::EPERM)
            ) =>
        {
            Ok((File::open(path)?, false))
        }
        Err(e) => Err(e),
    }
}

/// A `stat` time as a `SystemTime`.
fn time(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = Duration::from_nanos(u64::try_from(nsecs).unwrap_or(0));
    match u64::try_from(secs) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs) + nanos,
        Err(_) => UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos,
    }
}
