//! The inode table: which backing path each inode known to the kernel stands for.
//!
//! Inode numbers are the backing file's own `st_ino`, with the backing root's number and
//! the FUSE root id 1 swapped. Being stable across `forget` and a later lookup, they also key
//! the pending data, which must outlive the kernel forgetting an inode.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The FUSE inode number of the mount's root.
pub const ROOT: u64 = 1;

#[derive(Debug)]
struct Node {
    /// Path relative to the backing root; `None` once no known name leads to it (unlinked).
    path: Option<PathBuf>,
    /// Lookups the kernel holds; the node goes when `forget` brings this to zero.
    lookups: u64,
}

/// Inode number to path, with the kernel's lookup counts.
#[derive(Debug)]
pub struct Inodes {
    root_st_ino: u64,
    nodes: HashMap<u64, Node>,
}

impl Inodes {
    /// A table holding only the root, whose backing directory has inode `root_st_ino`.
    pub fn new(root_st_ino: u64) -> Self {
        let root = Node {
            path: Some(PathBuf::new()),
            lookups: 1,
        };
        Self {
            root_st_ino,
            nodes: HashMap::from([(ROOT, root)]),
        }
    }

    /// The FUSE inode number of the backing inode `st_ino` (and back: the map is its own
    /// inverse).
    pub fn fuse_ino(&self, st_ino: u64) -> u64 {
        if st_ino == self.root_st_ino {
            ROOT
        } else if st_ino == ROOT {
            self.root_st_ino
        } else {
            st_ino
        }
    }

    /// The path of `ino` relative to the backing root, if it still has one.
    pub fn path(&self, ino: u64) -> Option<&Path> {
        self.nodes.get(&ino)?.path.as_deref()
    }

    /// Records that the kernel looked `ino` up under `path` (one more lookup to forget).
    pub fn remember(&mut self, ino: u64, path: PathBuf) {
        let node = self.nodes.entry(ino).or_insert(Node {
            path: None,
            lookups: 0,
        });
        node.path = Some(path);
        node.lookups += 1;
    }

    /// The kernel dropped `n` lookups of `ino`; at zero the node goes (never the root).
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
            if node.lookups == 0 {
                self.nodes.remove(&ino);
            }
        }
    }

    /// The name `path` no longer leads to `ino` (unlinked, removed or replaced).
    pub fn detach(&mut self, ino: u64, path: &Path) {
        if let Some(node) = self.nodes.get_mut(&ino)
            && node.path.as_deref() == Some(path)
        {
            node.path = None;
        }
    }

    /// `from` was renamed to `to`: it and everything under it move.
    pub fn relocate(&mut self, from: &Path, to: &Path) {
        for node in self.nodes.values_mut() {
            if let Some(moved) = node.path.as_deref().and_then(|p| moved(p, from, to)) {
                node.path = Some(moved);
            }
        }
    }

    /// `a` and `b` were exchanged (`RENAME_EXCHANGE`).
    pub fn exchange(&mut self, a: &Path, b: &Path) {
        for node in self.nodes.values_mut() {
            let path = node.path.as_deref();
            let moved = path
                .and_then(|p| moved(p, a, b))
                .or_else(|| path.and_then(|p| moved(p, b, a)));
            if let Some(moved) = moved {
                node.path = Some(moved);
            }
        }
    }
}

/// Where `path` is after `from` moved to `to`, if it was under `from`.
fn moved(path: &Path, from: &Path, to: &Path) -> Option<PathBuf> {
    path.strip_prefix(from).ok().map(|rest| {
        if rest.as_os_str().is_empty() {
            to.to_path_buf()
        } else {
            to.join(rest)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_swap_the_root_with_one() {
        let inodes = Inodes::new(500);
        assert_eq!(inodes.fuse_ino(500), ROOT);
        assert_eq!(inodes.fuse_ino(ROOT), 500);
        assert_eq!(inodes.fuse_ino(42), 42);
        assert_eq!(inodes.path(ROOT), Some(Path::new("")));
    }

    #[test]
    fn forget_drops_a_node_only_when_all_lookups_are_gone() {
        let mut inodes = Inodes::new(500);
        inodes.remember(7, "a".into());
        inodes.remember(7, "a".into());
        inodes.forget(7, 1);
        assert_eq!(inodes.path(7), Some(Path::new("a")));
        inodes.forget(7, 1);
        assert_eq!(inodes.path(7), None);
        inodes.forget(ROOT, 10);
        assert_eq!(inodes.path(ROOT), Some(Path::new("")));
    }

    #[test]
    fn renaming_a_directory_moves_what_is_under_it() {
        let mut inodes = Inodes::new(500);
        inodes.remember(2, "d".into());
        inodes.remember(3, "d/f".into());
        inodes.remember(4, "dx".into());
        inodes.relocate(Path::new("d"), Path::new("e/d2"));
        assert_eq!(inodes.path(2), Some(Path::new("e/d2")));
        assert_eq!(inodes.path(3), Some(Path::new("e/d2/f")));
        // "dx" only shares a string prefix, not a path component.
        assert_eq!(inodes.path(4), Some(Path::new("dx")));
    }

    #[test]
    fn exchange_swaps_both_names() {
        let mut inodes = Inodes::new(500);
        inodes.remember(2, "a".into());
        inodes.remember(3, "b".into());
        inodes.remember(4, "b/c".into());
        inodes.exchange(Path::new("a"), Path::new("b"));
        assert_eq!(inodes.path(2), Some(Path::new("b")));
        assert_eq!(inodes.path(3), Some(Path::new("a")));
        assert_eq!(inodes.path(4), Some(Path::new("a/c")));
    }

    #[test]
    fn detach_only_clears_the_matching_name() {
        let mut inodes = Inodes::new(500);
        inodes.remember(2, "link2".into());
        inodes.detach(2, Path::new("link1"));
        assert_eq!(inodes.path(2), Some(Path::new("link2")));
        inodes.detach(2, Path::new("link2"));
        assert_eq!(inodes.path(2), None);
    }
}
