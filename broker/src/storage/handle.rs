//! Who holds the open storage, and how it is given back.
//!
//! One [`Owner`] holds an open storage: the server for a single broker, the node's
//! storage slot in a group. Every part that reads or writes it (the writer, the queues,
//! the checker, a read on a blocking thread) holds a [`StorageHandle`] lent by the owner;
//! cloning a handle lends another, dropping one gives it back. Whoever must close the
//! storage (the server before reopening it after a failure; a snapshot installation
//! before it replaces it) waits until every handle is back, and is told if some never
//! came: nothing counts references by hand, and no side assumes how many the other
//! keeps.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::Storage;

/// The owner of an open storage: it lends handles and can wait for them to come back.
/// Dropped with every handle back, the storage closes.
#[derive(Debug)]
pub struct Owner {
    storage: Arc<Storage>,
    lent: Arc<Lent>,
}

/// A handle on the open storage, lent by its [`Owner`]; dropping it gives it back.
#[derive(Debug)]
pub struct StorageHandle {
    /// `None` only while it is dropped: the reference goes before the handle counts as
    /// given back, so that whoever waits for the handles can close the database.
    storage: Option<Arc<Storage>>,
    lent: Arc<Lent>,
}

/// How many handles are out, and who waits for them.
#[derive(Debug, Default)]
struct Lent {
    out: Mutex<usize>,
    /// For blocking waiters.
    back: Condvar,
    /// For async waiters.
    notify: tokio::sync::Notify,
}

impl Lent {
    fn lend(&self) {
        *self.out.lock().expect("storage handles") += 1;
    }

    fn give_back(&self) {
        let mut out = self.out.lock().expect("storage handles");
        *out -= 1;
        if *out == 0 {
            self.back.notify_all();
            self.notify.notify_waiters();
        }
    }

    fn out(&self) -> usize {
        *self.out.lock().expect("storage handles")
    }
}

impl Owner {
    /// The owner of `storage` (just opened: nothing else holds it).
    pub fn new(storage: Arc<Storage>) -> Self {
        Self {
            storage,
            lent: Arc::default(),
        }
    }

    /// Lends a handle.
    pub fn lend(&self) -> StorageHandle {
        self.lent.lend();
        StorageHandle {
            storage: Some(self.storage.clone()),
            lent: self.lent.clone(),
        }
    }

    /// Handles out now.
    pub fn lent(&self) -> usize {
        self.lent.out()
    }

    /// Waits (blocking) up to `limit` for every handle to come back; whether they did.
    pub fn wait_returned(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut out = self.lent.out.lock().expect("storage handles");
        while *out > 0 {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            out = self
                .lent
                .back
                .wait_timeout(out, left)
                .expect("storage handles")
                .0;
        }
        true
    }

    /// Waits up to `limit` for every handle to come back; whether they did.
    pub async fn returned(&self, limit: Duration) -> bool {
        returned(&self.lent, limit).await
    }
}

impl std::ops::Deref for Owner {
    type Target = Storage;

    fn deref(&self) -> &Storage {
        &self.storage
    }
}

async fn returned(lent: &Lent, limit: Duration) -> bool {
    let wait = async {
        loop {
            let notified = lent.notify.notified();
            tokio::pin!(notified);
            // Registered before the count is read: a give-back in between wakes it.
            notified.as_mut().enable();
            if lent.out() == 0 {
                return;
            }
            notified.await;
        }
    };
    tokio::time::timeout(limit, wait).await.is_ok()
}

impl StorageHandle {
    /// Gives this handle back and waits up to `limit` for every other handle of its
    /// owner to come back too; whether they did (the owner can then close the storage).
    pub async fn give_back_all(self, limit: Duration) -> bool {
        let lent = self.lent.clone();
        drop(self);
        returned(&lent, limit).await
    }

    /// A handle with no owner to wait for it (tests, which open storage directly).
    #[cfg(test)]
    pub fn alone(storage: Arc<Storage>) -> Self {
        Owner::new(storage).lend()
    }
}

impl Clone for StorageHandle {
    fn clone(&self) -> Self {
        self.lent.lend();
        Self {
            storage: self.storage.clone(),
            lent: self.lent.clone(),
        }
    }
}

impl Drop for StorageHandle {
    fn drop(&mut self) {
        // The database reference first: once the count says every handle is back, no
        // handle holds the database open.
        drop(self.storage.take());
        self.lent.give_back();
    }
}

impl std::ops::Deref for StorageHandle {
    type Target = Storage;

    fn deref(&self) -> &Storage {
        self.storage.as_ref().expect("a handle not being dropped")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_owner_waits_for_every_handle() {
        let dir = tempfile::tempdir().unwrap();
        let owner = Owner::new(Storage::open(dir.path()).unwrap());
        assert!(owner.wait_returned(Duration::ZERO));
        let a = owner.lend();
        let b = a.clone();
        assert_eq!(owner.lent(), 2);
        assert!(!owner.wait_returned(Duration::from_millis(20)));
        let back = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(b);
        });
        // a's own give-back, then b's from another thread.
        assert!(a.give_back_all(Duration::from_secs(5)).await);
        back.join().unwrap();
        assert_eq!(owner.lent(), 0);
        assert!(owner.returned(Duration::ZERO).await);
        let held = owner.lend();
        assert!(!owner.returned(Duration::from_millis(20)).await);
        drop(held);
        assert!(owner.wait_returned(Duration::ZERO));
    }

    /// Issue 25, "Shape": shutdown and snapshot installation once rested on polling
    /// `Arc::strong_count` for a magic number each side assumed of the other. Now no
    /// code outside tests counts references by hand.
    #[test]
    fn no_code_counts_references_by_hand() {
        fn visit(dir: &std::path::Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    visit(&path, found);
                    continue;
                }
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if !name.ends_with(".rs") || name.starts_with("tests") || name == "handle.rs" {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                // What comes before the file's inline tests.
                let code = text
                    .split("#[cfg(test)]\nmod tests {")
                    .next()
                    .unwrap_or_default();
                let needle = ["strong", "_count("].concat();
                if code.contains(&needle) {
                    found.push(path.display().to_string());
                }
            }
        }
        let mut found = Vec::new();
        visit(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        assert!(found.is_empty(), "reference counts read in {found:?}");
    }

    /// The last handle given back on another thread: the owner that saw every handle
    /// back closes the database at once (RocksDB's lock is free for the reopen).
    #[test]
    fn a_handle_counts_as_back_only_once_it_let_go_of_the_database() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..20 {
            let owner = Owner::new(Storage::open(dir.path()).unwrap());
            let handle = owner.lend();
            let t = std::thread::spawn(move || drop(handle));
            assert!(owner.wait_returned(Duration::from_secs(5)));
            drop(owner);
            Storage::open(dir.path()).expect("closed with every handle back");
            t.join().unwrap();
        }
    }

    /// Dropped with every handle back, the storage is closed: it opens again at once.
    #[test]
    fn with_every_handle_back_the_storage_closes() {
        let dir = tempfile::tempdir().unwrap();
        let owner = Owner::new(Storage::open(dir.path()).unwrap());
        drop(owner.lend());
        drop(owner);
        Owner::new(Storage::open(dir.path()).unwrap());
    }
}
