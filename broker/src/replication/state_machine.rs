//! The state machine: a committed entry's batch applied to the broker's storage, together
//! with the entry's log id (and a membership, when the entry is one), in one write.
//!
//! The write is not synced: the Raft log holds the entry durably, and after a crash the
//! node applies again from the last log id the storage kept (RocksDB recovers a prefix of
//! its writes, so the log id and the batches it covers are lost or kept together).
//!
//! A snapshot is a RocksDB checkpoint of the storage (hard links, cheap); its log id and
//! membership are read from the checkpoint itself, so they are exactly what it holds.
//! Installing one closes the storage, puts the checkpoint in its place and opens it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, RaftSnapshotBuilder};
use rocksdb::{WriteBatch, WriteOptions};

use super::{Applied, LogId, TypeConfig, io_err};
use crate::storage::{Cf, Owner, Storage, StorageHandle, keys};

type Membership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotDir>;

/// A snapshot on disk: a directory holding a checkpoint of the storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotDir(pub PathBuf);

/// Where a node keeps the storage, shared by the state machine (which may replace it
/// with a snapshot) and the server (which serves from it while this node leads).
#[derive(Debug)]
pub struct StorageSlot {
    /// `None` only while a snapshot replaces it.
    current: RwLock<Option<Owner>>,
    /// The storage's directory.
    dir: PathBuf,
    /// Where snapshots are made and received.
    snapshots: PathBuf,
    /// Held by housekeeping while it works on the storage, and by a snapshot
    /// installation while it replaces it (see [`StorageSlot::housekeep`]).
    housekeeping: std::sync::Mutex<()>,
}

impl StorageSlot {
    /// A slot holding `storage`, opened from `dir`; snapshots go under `snapshots`.
    pub fn new(storage: Arc<Storage>, dir: PathBuf, snapshots: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Some(Owner::new(storage))),
            housekeeping: std::sync::Mutex::new(()),
            dir,
            snapshots,
        })
    }

    /// Runs `work` (a follower's compactions, which may take long) on the storage, if
    /// there is one; a snapshot installation waits for it to end, and it never holds the
    /// storage while one runs. Blocking: call it off the async threads.
    pub fn housekeep<T>(&self, work: impl FnOnce(&Storage) -> T) -> Option<T> {
        let _turn = self.housekeeping.lock().expect("housekeeping lock");
        let storage = self.get()?;
        Some(work(&storage))
    }

    /// A handle on the storage now (`None` while a snapshot replaces it).
    pub fn get(&self) -> Option<StorageHandle> {
        self.current
            .read()
            .expect("storage slot")
            .as_ref()
            .map(Owner::lend)
    }

    /// Whether handles on the storage are out (the parts of a leadership that just
    /// ended, while they stop; a read): a snapshot cannot replace it now.
    pub fn in_use(&self) -> bool {
        self.current
            .read()
            .expect("storage slot")
            .as_ref()
            .is_some_and(|owner| owner.lent() > 0)
    }

    fn storage(&self) -> std::io::Result<StorageHandle> {
        self.get()
            .ok_or_else(|| io_err("the storage is being replaced by a snapshot"))
    }

    /// A fresh directory for a snapshot being received or made.
    pub fn snapshot_dir(&self, name: &str) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.snapshots)?;
        let dir = self.snapshots.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        Ok(dir)
    }
}

/// The state machine of a node.
pub struct StateMachine {
    slot: Arc<StorageSlot>,
}

impl StateMachine {
    /// The state machine applying to the storage in `slot`.
    pub fn new(slot: Arc<StorageSlot>) -> Self {
        Self { slot }
    }
}

/// The applied log id and membership in the storage `db` (its meta family `meta`).
fn applied_in(
    db: &rocksdb::DB,
    meta: &rocksdb::ColumnFamily,
) -> std::io::Result<(Option<LogId>, Membership)> {
    let applied = match db.get_cf(meta, keys::RAFT_APPLIED).map_err(io_err)? {
        Some(v) => Some(postcard::from_bytes(&v).map_err(io_err)?),
        None => None,
    };
    let membership = match db.get_cf(meta, keys::RAFT_MEMBERSHIP).map_err(io_err)? {
        Some(v) => postcard::from_bytes(&v).map_err(io_err)?,
        None => Membership::default(),
    };
    Ok((applied, membership))
}

/// The applied log id and membership of the checkpoint in `dir`.
fn applied_in_checkpoint(dir: &Path) -> std::io::Result<(Option<LogId>, Membership)> {
    let db = rocksdb::DB::open_cf_for_read_only(
        &rocksdb::Options::default(),
        dir,
        [Cf::Meta.name()],
        false,
    )
    .map_err(io_err)?;
    let meta = db
        .cf_handle(Cf::Meta.name())
        .ok_or_else(|| io_err("a checkpoint without its meta family"))?;
    applied_in(&db, meta)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotDir;
    type SnapshotBuilder = Builder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), std::io::Error> {
        let storage = self.slot.storage()?;
        applied_in(storage.db(), storage.cf(Cf::Meta))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), std::io::Error>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, std::io::Error>> + Unpin + Send,
    {
        let storage = self.slot.storage()?;
        let meta = storage.cf(Cf::Meta);
        let wo = WriteOptions::default();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let mut batch = match &entry.payload {
                EntryPayload::Normal(b) => WriteBatch::from_data(&b.data),
                _ => WriteBatch::default(),
            };
            if let EntryPayload::Membership(m) = &entry.payload {
                let stored = Membership::new(Some(entry.log_id), m.clone());
                batch.put_cf(
                    meta,
                    keys::RAFT_MEMBERSHIP,
                    postcard::to_allocvec(&stored).map_err(io_err)?,
                );
            }
            batch.put_cf(
                meta,
                keys::RAFT_APPLIED,
                postcard::to_allocvec(&entry.log_id).map_err(io_err)?,
            );
            if let Err(e) = storage.db().write_opt(batch, &wo) {
                // The node cannot go on: openraft stops it; a restart applies again
                // from what the storage kept.
                storage.fail(format!("applying a replicated write failed: {e}"));
                return Err(io_err(e));
            }
            if let Some(responder) = responder {
                responder.send(Applied);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        Builder {
            slot: self.slot.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotDir,
    ) -> Result<(), std::io::Error> {
        let slot = self.slot.clone();
        let dir = snapshot.0;
        let (applied, _) = applied_in_checkpoint(&dir)?;
        if applied != meta.last_log_id {
            return Err(io_err(format!(
                "snapshot holds log id {applied:?}, its meta says {:?}",
                meta.last_log_id
            )));
        }
        tokio::task::spawn_blocking(move || replace(&slot, &dir))
            .await
            .map_err(io_err)?
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, std::io::Error> {
        let Some(dir) = latest_snapshot(&self.slot.snapshots)? else {
            return Ok(None);
        };
        // From the file written when it was made: opening the checkpoint with RocksDB
        // would write its info log into a directory a follower may be receiving.
        let meta = std::fs::read(dir.join(META_FILE))?;
        let (last_log_id, last_membership) = postcard::from_bytes(&meta).map_err(io_err)?;
        Ok(Some(Snapshot {
            meta: SnapshotMeta {
                last_log_id,
                last_membership,
            },
            snapshot: SnapshotDir(dir),
        }))
    }
}

/// Made snapshots are named `made-<index:020>`; the greatest is the current one.
const MADE: &str = "made-";
/// In a made snapshot: its log id and membership (postcard).
const META_FILE: &str = "txmq-snapshot.meta";

/// A fresh name for a directory being built or received.
pub(crate) fn unique(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}{}-{n}", std::process::id())
}

/// Removes what a crash left half built or half received under `snapshots`.
pub fn clean_up(snapshots: &Path) -> std::io::Result<()> {
    if !snapshots.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(snapshots)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(BUILDING) || name.starts_with(RECEIVED) {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}

/// Prefix of a snapshot being made.
const BUILDING: &str = "building-";
/// Prefix of a snapshot being received.
pub(crate) const RECEIVED: &str = "received-";

/// The newest snapshot made under `dir`, if any.
fn latest_snapshot(dir: &Path) -> std::io::Result<Option<PathBuf>> {
    if !dir.exists() {
        return Ok(None);
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(MADE))
        .collect();
    names.sort();
    Ok(names.pop().map(|n| dir.join(n)))
}

/// Makes a checkpoint of `storage` as the newest snapshot and removes all but the one
/// before it (which a follower may still be receiving).
fn make_snapshot(slot: &StorageSlot) -> std::io::Result<(PathBuf, Option<LogId>, Membership)> {
    let storage = slot.storage()?;
    let building = slot.snapshot_dir(&unique(BUILDING))?;
    rocksdb::checkpoint::Checkpoint::new(storage.db())
        .and_then(|c| c.create_checkpoint(&building))
        .map_err(io_err)?;
    drop(storage);
    let (applied, membership) = applied_in_checkpoint(&building)?;
    {
        use std::io::Write;
        let meta = postcard::to_allocvec(&(applied, &membership)).map_err(io_err)?;
        let mut f = std::fs::File::create(building.join(META_FILE))?;
        f.write_all(&meta)?;
        f.sync_all()?;
    }
    let index = applied.as_ref().map_or(0, |id| id.index);
    let dir = slot.snapshot_dir(&format!("{MADE}{index:020}"))?;
    std::fs::rename(&building, &dir)?;
    sync_dir(&slot.snapshots)?;
    let mut names: Vec<String> = std::fs::read_dir(&slot.snapshots)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(MADE))
        .collect();
    names.sort();
    let keep = names.len().saturating_sub(2);
    for old in &names[..keep] {
        std::fs::remove_dir_all(slot.snapshots.join(old))?;
    }
    Ok((dir, applied, membership))
}

/// Makes the entries of directory `dir` durable (a rename into or out of it, say).
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Builds snapshots for openraft.
pub struct Builder {
    slot: Arc<StorageSlot>,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    type SnapshotData = SnapshotDir;

    async fn build_snapshot(&mut self) -> Result<Snapshot, std::io::Error> {
        let slot = self.slot.clone();
        let (dir, last_log_id, last_membership) =
            tokio::task::spawn_blocking(move || make_snapshot(&slot))
                .await
                .map_err(io_err)??;
        tracing::info!(snapshot = %dir.display(), ?last_log_id, "snapshot made");
        Ok(Snapshot {
            meta: SnapshotMeta {
                last_log_id,
                last_membership,
            },
            snapshot: SnapshotDir(dir),
        })
    }
}

/// Opens the storage just put in place, trying again for a second: nothing should hold
/// the old one's lock any more, and failing here stops Raft.
fn open_again(dir: &Path) -> std::io::Result<Arc<Storage>> {
    let mut tries = 0;
    loop {
        match Storage::open(dir) {
            Ok(storage) => return Ok(storage),
            Err(e) if tries < 10 => {
                tracing::warn!("opening the installed snapshot failed, trying again: {e}");
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(io_err(e)),
        }
    }
}

/// Closes the storage in `slot`, puts the checkpoint `dir` in its place, opens it, and
/// keeps a checkpoint of it as this node's current snapshot.
fn replace(slot: &StorageSlot, dir: &Path) -> std::io::Result<()> {
    {
        // Housekeeping in progress ends first (it holds the storage meanwhile).
        let _housekeeping = slot.housekeeping.lock().map_err(io_err)?;
        let mut current = slot.current.write().map_err(io_err)?;
        let Some(owner) = current.take() else {
            return Err(io_err("no storage to replace"));
        };
        let dedup_window = std::time::Duration::from_millis(owner.dedup_window_ms());
        // The server's parts hold the storage only while this node leads, and a leader
        // is not sent snapshots; a read may still hold it for a moment.
        if !owner.wait_returned(Duration::from_secs(30)) {
            *current = Some(owner);
            return Err(io_err(
                "the storage is still in use; cannot install a snapshot",
            ));
        }
        // Every handle is back: dropping the owner closes the database.
        drop(owner);
        let old = slot.dir.with_extension("replaced");
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(&slot.dir, &old)?;
        std::fs::rename(dir, &slot.dir)?;
        // Both renames durable before anything else happens: Raft purges its log once
        // the snapshot is installed, and a power cut that put the old state back then
        // would leave a node that cannot re-apply what it no longer has. A crash before
        // this point is repaired at start (`Dirs::recover`).
        if let Some(parent) = slot.dir.parent() {
            sync_dir(parent)?;
        }
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        let opened = open_again(&slot.dir)?;
        opened.set_dedup_window(dedup_window);
        *current = Some(Owner::new(opened));
        std::fs::remove_dir_all(&old)?;
    }
    make_snapshot(slot)?;
    Ok(())
}
