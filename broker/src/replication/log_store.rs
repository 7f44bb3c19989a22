//! The Raft log in its own RocksDB: entries by index, and the vote, the committed log id
//! and the last purged log id.
//!
//! An append writes its entries at once (so they can be read back and sent to followers
//! while the disk syncs) and hands the completion to the log's syncer thread, which
//! fsyncs the WAL once for every append written meanwhile and then reports each one
//! flushed: the group commit of the writer, for the log. A vote is written with a sync
//! of its own: granting it must survive a crash before it is answered.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;

use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};
use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{LogId, TypeConfig, io_err};

type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;

const LOG: &str = "log";
const META: &str = "meta";
const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";

/// The log store; clones share the database (a clone is the log reader).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: DB,
    /// Appends written, waiting for the syncer's fsync.
    flushes: std::sync::Mutex<mpsc::Sender<IOFlushed<TypeConfig>>>,
}

impl LogStore {
    /// Opens (or creates) the log in `dir` and starts its syncer thread, which stops when
    /// the last clone is dropped.
    ///
    /// # Errors
    /// The database cannot be opened.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(2);
        // Entries are written once and read back soon (to followers) or never: a small
        // memtable, flushed often, keeps the WAL short.
        opts.set_max_total_wal_size(256 << 20);
        let cfs = [LOG, META].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(io_err)?;
        let (tx, rx) = mpsc::channel::<IOFlushed<TypeConfig>>();
        let inner = Arc::new(Inner {
            db,
            flushes: std::sync::Mutex::new(tx),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("txmq-raft-syncer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut done = vec![first];
                    done.extend(rx.try_iter());
                    let synced = match weak.upgrade() {
                        Some(inner) => inner.db.flush_wal(true).map_err(io_err),
                        None => Err(io_err("the raft log is closed")),
                    };
                    for flushed in done {
                        flushed.io_completed(
                            synced
                                .as_ref()
                                .map(|_| ())
                                .map_err(|e| std::io::Error::new(e.kind(), e.to_string())),
                        );
                    }
                }
            })
            .map_err(io_err)?;
        Ok(Self { inner })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.inner.db.cf_handle(name).expect("column family opened")
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &[u8]) -> std::io::Result<Option<T>> {
        match self.inner.db.get_cf(self.cf(META), key).map_err(io_err)? {
            Some(v) => postcard::from_bytes(&v).map(Some).map_err(io_err),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T, sync: bool) -> std::io::Result<()> {
        let bytes = postcard::to_allocvec(value).map_err(io_err)?;
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.inner
            .db
            .put_cf_opt(self.cf(META), key, bytes, &wo)
            .map_err(io_err)
    }

    fn last_entry_id(&self) -> std::io::Result<Option<LogId>> {
        let mut it = self.inner.db.iterator_cf(self.cf(LOG), IteratorMode::End);
        match it.next() {
            Some(item) => {
                let (_, v) = item.map_err(io_err)?;
                let entry: Entry = postcard::from_bytes(&v).map_err(io_err)?;
                Ok(Some(entry.log_id))
            }
            None => Ok(None),
        }
    }

    /// How many bytes the log's files take (estimated by RocksDB).
    pub fn size_bytes(&self) -> u64 {
        let live = self
            .inner
            .db
            .property_int_value_cf(self.cf(LOG), "rocksdb.total-sst-files-size")
            .ok()
            .flatten()
            .unwrap_or(0);
        let mem = self
            .inner
            .db
            .property_int_value_cf(self.cf(LOG), "rocksdb.size-all-mem-tables")
            .ok()
            .flatten()
            .unwrap_or(0);
        live + mem
    }
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, std::io::Error> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        let it = self.inner.db.iterator_cf(
            self.cf(LOG),
            IteratorMode::From(&key(start), Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(io_err)?;
            let index = u64::from_be_bytes(k.as_ref().try_into().map_err(io_err)?);
            if !range.contains(&index) {
                break;
            }
            out.push(postcard::from_bytes(&v).map_err(io_err)?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, std::io::Error> {
        self.get_meta(VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, std::io::Error> {
        let last_purged_log_id: Option<LogId> = self.get_meta(PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), std::io::Error> {
        self.put_meta(VOTE, vote, true)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), std::io::Error> {
        // Without a sync: after a crash a node applies less at first, never more.
        match committed {
            Some(id) => self.put_meta(COMMITTED, &id, false),
            None => Ok(()),
        }
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, std::io::Error> {
        self.get_meta(COMMITTED)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), std::io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        for entry in entries {
            let bytes = postcard::to_allocvec(&entry).map_err(io_err)?;
            batch.put_cf(self.cf(LOG), key(entry.log_id.index), bytes);
        }
        self.inner.db.write(batch).map_err(io_err)?;
        let flushes = self.inner.flushes.lock().map_err(io_err)?;
        flushes
            .send(callback)
            .map_err(|_| io_err("the raft log's syncer stopped"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), std::io::Error> {
        let from = last_log_id.map_or(0, |id| id.index + 1);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(LOG), key(from), key(u64::MAX));
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.inner.db.write_opt(batch, &wo).map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), std::io::Error> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(META),
            PURGED,
            postcard::to_allocvec(&log_id).map_err(io_err)?,
        );
        batch.delete_range_cf(self.cf(LOG), key(0), key(log_id.index + 1));
        self.inner.db.write(batch).map_err(io_err)
    }
}
