//! Storage on RocksDB: the column families, opening them, and the reads (those of
//! consumer-group state in `groups`).
//!
//! All writes go through the single [`writer::Writer`] thread (group commit); everything
//! here only reads, and is called from blocking contexts (`spawn_blocking` or the writer).
//!
//! | column family | key | value |
//! |---|---|---|
//! | `meta` | `boot`, `topic/<name>`, `user/<name>`, `rule/<id>` | boot counter, [`records::TopicRecord`], [`records::UserRecord`], [`records::RuleRecord`] |
//! | `log` | topic id, offset | `pb::StoredMessage` |
//! | `half` | txn id, seq | `pb::StoredMessage` (offset 0) |
//! | `txn` | txn id | [`records::TxnRecord`] |
//! | `due` | kind, due ms, id | empty: the time-ordered index of checks, purges and scheduled deliveries |
//! | `cursor` | group, topic id | [`records::CursorRecord`] |
//! | `acked` | group, topic id, offset | empty: acks above the floor |
//! | `retry` | group, topic id, offset | [`records::RetryRecord`] |
//! | `dlq` | group, topic id, offset | [`records::DeadLetterRecord`] |
//! | `sched` | message id | [`records::SchedRecord`]: a scheduled message and its fate |
//! | `msgid` | message id | topic id, offset: where a visible message is |
//! | `msgkey` | topic id, key length, key, offset | empty: a topic's messages by key |
//! | `dedup` | topic id, idempotency key (a face's scoped, after a NUL) | when stored (ms), digest, `pb::MessageReceipt`: see `dedup` |
//! | `attempts` | group, topic id, offset | deliveries (BE u32) a message took before its ack, when more than one |

pub mod dedup;
mod deleting;
mod groups;
mod handle;
pub use handle::{Owner, StorageHandle};
mod index;
pub use index::Floors;
pub mod keys;
pub mod records;
mod scheduled;
pub use scheduled::ScheduledPage;
pub mod writer;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;
use rocksdb::{ColumnFamily, DB, Direction, IteratorMode, Options, ReadOptions};
use txmq_protocol::pb;

use crate::error::{Error, Result};
use crate::ids::Id;
use records::{TopicRecord, TxnRecord};

/// Column family names, in creation order.
pub const CFS: [&str; 14] = [
    "meta", "log", "half", "txn", "due", "cursor", "acked", "retry", "dlq", "sched", "msgid",
    "msgkey", "attempts", "dedup",
];

/// A column family of [`CFS`].
#[derive(Debug, Clone, Copy)]
pub enum Cf {
    /// Boot counter and topic records.
    Meta,
    /// Topic logs.
    Log,
    /// Half messages.
    Half,
    /// Transaction records.
    Txn,
    /// Due index.
    Due,
    /// Consumer group cursors.
    Cursor,
    /// Acks above the floor.
    Acked,
    /// Messages waiting for redelivery.
    Retry,
    /// Dead letters.
    Dlq,
    /// Scheduled messages.
    Sched,
    /// Where each visible message is, by id.
    MsgId,
    /// Each topic's messages by key.
    MsgKey,
    /// Deliveries an acked message took, when more than one.
    Attempts,
    /// Idempotency keys of sends, with their receipts.
    Dedup,
}

impl Cf {
    /// Its name in RocksDB.
    pub fn name(self) -> &'static str {
        CFS[self as usize]
    }
}

/// Work counters, read by tests that prove cost follows the work (I5).
#[derive(Debug, Default)]
pub struct Counters {
    /// Due-index entries visited by scheduler scans.
    pub due_visited: AtomicU64,
    /// Write batches committed.
    pub batches: AtomicU64,
    /// Write batches committed with fsync.
    pub fsyncs: AtomicU64,
    /// Jobs (requests) carried by those batches.
    pub jobs: AtomicU64,
}

/// Memory all memtables together may hold.
const MEMTABLES_BYTES: usize = 128 << 20;
/// Write-ahead log size at which RocksDB flushes the column families that pin its oldest file.
const WAL_BYTES: u64 = 512 << 20;

/// Memory the block cache, shared by every column family, may hold (RocksDB's default is
/// this much for each family).
const BLOCK_CACHE_BYTES: usize = 32 << 20;

/// Options of every column family. They must be given per family: RocksDB opens a named
/// family with its own options, not the database's.
fn cf_options(cache: &rocksdb::Cache) -> Options {
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(cache);
    let mut cf = Options::default();
    cf.set_block_based_table_factory(&table);
    cf.set_write_buffer_size(64 << 20);
    cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
    cf
}

/// The opened database.
pub struct Storage {
    db: DB,
    /// Work counters.
    pub counters: Counters,
    /// Set when a sync of the write-ahead log failed: from then on this database takes no
    /// writes (what it holds in memory may be ahead of the disk); the server reopens
    /// storage and recovers to what is on disk.
    failure: std::sync::Mutex<Option<String>>,
    failed: tokio_util::sync::CancellationToken,
    /// Rung once a batch that scheduled messages is durable: the timer may need to wake
    /// earlier than it planned.
    pub scheduled: tokio::sync::Notify,
    /// Above the disk's high-water mark: new messages are refused (see [`crate::disk`]).
    disk_full: std::sync::atomic::AtomicBool,
    /// Each topic's first kept offset, for the indexes' compaction filters.
    pub floors: Arc<Floors>,
    /// Index entries of removed messages not yet compacted away.
    index_garbage: AtomicU64,
    /// How long idempotency keys are remembered, in ms (see `dedup`).
    dedup_window_ms: Arc<AtomicU64>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("path", &self.db.path())
            .finish()
    }
}

/// A topic as stored, with the offset its log ends at.
#[derive(Debug, Clone)]
pub struct StoredTopic {
    /// Topic name.
    pub name: String,
    /// Its record.
    pub record: TopicRecord,
    /// One past the last offset in its log.
    pub end: u64,
}

impl Storage {
    /// Opens (creating if needed) the database under `dir`.
    ///
    /// # Errors
    /// RocksDB's error, e.g. when another broker holds the directory's lock.
    pub fn open(dir: &Path) -> Result<Arc<Self>> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(4);
        // All memtables together stay under this: the broker's memory does not grow with
        // the number of column families that happen to be written.
        opts.set_db_write_buffer_size(MEMTABLES_BYTES);
        // Flush the column families that pin old WAL files once the WAL holds this much:
        // bounds the log replayed at restart.
        opts.set_max_total_wal_size(WAL_BYTES);
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let floors = Arc::new(Floors::default());
        let dedup_window_ms = Arc::new(AtomicU64::new(24 * 3600 * 1000));
        let cfs = CFS.iter().map(|name| {
            let mut cf = cf_options(&cache);
            match *name {
                "msgid" => cf.set_compaction_filter("txmq-msgid", index::id_filter(floors.clone())),
                "msgkey" => {
                    cf.set_compaction_filter("txmq-msgkey", index::key_filter(floors.clone()));
                }
                "dedup" => {
                    cf.set_compaction_filter(
                        "txmq-dedup",
                        dedup::filter(dedup_window_ms.clone(), floors.clone()),
                    );
                    // Most lookups miss (a key seen once): a filter answers them
                    // without reading a block.
                    let mut table = rocksdb::BlockBasedOptions::default();
                    table.set_block_cache(&cache);
                    table.set_bloom_filter(10.0, false);
                    cf.set_block_based_table_factory(&table);
                    // Keys that only grow (an outbox's row ids) leave files that automatic
                    // compactions only move: rewrite every file within a day, so the
                    // filter drops what expired.
                    cf.set_periodic_compaction_seconds(24 * 3600);
                }
                _ => {}
            }
            (*name, cf)
        });
        let db = DB::open_cf_with_opts(&opts, dir, cfs)?;
        let storage = Arc::new(Self {
            db,
            floors,
            index_garbage: AtomicU64::new(0),
            dedup_window_ms,
            counters: Counters::default(),
            failure: std::sync::Mutex::new(None),
            failed: tokio_util::sync::CancellationToken::new(),
            scheduled: tokio::sync::Notify::new(),
            disk_full: std::sync::atomic::AtomicBool::new(false),
        });
        storage.load_floors()?;
        Ok(storage)
    }

    /// Whether new messages are refused for want of disk.
    pub fn disk_full(&self) -> bool {
        self.disk_full.load(Ordering::Relaxed)
    }

    /// Sets whether new messages are refused for want of disk.
    pub fn set_disk_full(&self, full: bool) {
        self.disk_full.store(full, Ordering::Relaxed);
    }

    /// The path of the database's directory.
    pub fn path(&self) -> &Path {
        self.db.path()
    }

    /// Marks this database failed (sticky): every later write is refused with `why`.
    pub fn fail(&self, why: String) {
        let mut failure = self.failure.lock().expect("failure lock");
        if failure.is_none() {
            tracing::error!("storage failed, refusing writes until it is reopened: {why}");
            *failure = Some(why);
        }
        self.failed.cancel();
    }

    /// Why this database takes no more writes, if it failed.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().expect("failure lock").clone()
    }

    /// Completes when [`Storage::fail`] was called.
    pub fn failed(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.failed.clone().cancelled_owned()
    }

    pub(crate) fn db(&self) -> &DB {
        &self.db
    }

    pub(crate) fn cf(&self, cf: Cf) -> &ColumnFamily {
        self.db
            .cf_handle(cf.name())
            .expect("every column family is created at open")
    }

    /// The boot counter as stored (0 before the first boot).
    ///
    /// # Errors
    /// Storage failure.
    pub fn boot(&self) -> Result<u64> {
        Ok(self
            .db
            .get_cf(self.cf(Cf::Meta), keys::BOOT)?
            .and_then(|v| v.try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Whether a topic of that name exists (its record is stored).
    ///
    /// # Errors
    /// Storage failure.
    pub fn topic_exists(&self, name: &str) -> Result<bool> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(Cf::Meta), keys::topic(name))?
            .is_some())
    }

    /// Topic `name`'s stored record, if it exists.
    ///
    /// # Errors
    /// Storage failure, a record that does not decode.
    pub fn topic_record(&self, name: &str) -> Result<Option<TopicRecord>> {
        self.db
            .get_pinned_cf(self.cf(Cf::Meta), keys::topic(name))?
            .map(|v| decode::<TopicRecord>(&v))
            .transpose()
    }

    /// Increments and returns the durable boot counter: ids made in this boot are unique.
    ///
    /// # Errors
    /// Storage failure.
    pub fn next_boot(&self) -> Result<u64> {
        let cf = self.cf(Cf::Meta);
        let boot = self.boot()? + 1;
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db
            .put_cf_opt(cf, keys::BOOT, boot.to_be_bytes(), &wo)?;
        Ok(boot)
    }

    /// Every topic with the end of its log.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn topics(&self) -> Result<Vec<StoredTopic>> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(self.cf(Cf::Meta), b"topic/") {
            let (k, v) = item?;
            if !k.starts_with(b"topic/") {
                break;
            }
            let name = String::from_utf8_lossy(&k[6..]).into_owned();
            let record = decode::<TopicRecord>(&v)?;
            let end = self.log_end(record.id)?;
            out.push(StoredTopic { name, record, end });
        }
        Ok(out)
    }

    /// Every user, by name.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn users(&self) -> Result<Vec<(String, records::UserRecord)>> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(self.cf(Cf::Meta), keys::USER) {
            let (k, v) = item?;
            let Some(name) = k.strip_prefix(keys::USER) else {
                break;
            };
            out.push((String::from_utf8_lossy(name).into_owned(), decode(&v)?));
        }
        Ok(out)
    }

    /// The next rule id: past every id ever given.
    ///
    /// # Errors
    /// Storage failure.
    pub fn next_rule_id(&self) -> Result<u64> {
        Ok(self
            .db
            .get_cf(self.cf(Cf::Meta), keys::NEXT_RULE_ID)?
            .and_then(|v| v.try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(1))
    }

    /// Every permission rule, by id.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn rules(&self) -> Result<Vec<(u64, records::RuleRecord)>> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(self.cf(Cf::Meta), keys::RULE) {
            let (k, v) = item?;
            let Some(id) = k.strip_prefix(keys::RULE) else {
                break;
            };
            let id = u64::from_be_bytes(
                id.try_into()
                    .map_err(|_| Error::Internal("a rule key of the wrong length".into()))?,
            );
            out.push((id, decode(&v)?));
        }
        Ok(out)
    }

    /// Ids of deleted topics.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn deleted_topics(&self) -> Result<Vec<u32>> {
        Ok(self
            .deleted_topic_records()?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// Deleted topics with their records.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn deleted_topic_records(&self) -> Result<Vec<(u32, records::DeletedTopicRecord)>> {
        let mut out = Vec::new();
        for item in self
            .db
            .prefix_iterator_cf(self.cf(Cf::Meta), keys::DELETED_TOPIC)
        {
            let (k, v) = item?;
            let Some(id) = k.strip_prefix(keys::DELETED_TOPIC) else {
                break;
            };
            if let Ok(id) = <[u8; 4]>::try_from(id) {
                out.push((u32::from_be_bytes(id), decode(&v)?));
            }
        }
        Ok(out)
    }

    /// The smallest topic id never used by a topic that was deleted or recorded as the
    /// next one (1 on a new database). The live topics' ids are the writer's to add.
    pub fn next_topic_id(&self) -> u32 {
        let stored = self
            .db
            .get_cf(self.cf(Cf::Meta), keys::NEXT_TOPIC_ID)
            .ok()
            .flatten()
            .and_then(|v| v.try_into().ok().map(u32::from_be_bytes))
            .unwrap_or(1);
        let dead = self.deleted_topics().unwrap_or_default();
        dead.into_iter().map(|id| id + 1).fold(stored, u32::max)
    }

    fn log_end(&self, topic_id: u32) -> Result<u64> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(keys::log(topic_id, 0).to_vec());
        ro.set_iterate_upper_bound(keys::log(topic_id, u64::MAX).to_vec());
        let mut it = self.db.raw_iterator_cf_opt(self.cf(Cf::Log), ro);
        it.seek_to_last();
        it.status()?;
        Ok(match it.key() {
            Some(k) => keys::log_offset(k).map_or(0, |o| o + 1),
            None => 0,
        })
    }

    /// Up to `max` messages of a topic from `from` on, in offset order, below `end`.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn read_log(
        &self,
        topic_id: u32,
        from: u64,
        end: u64,
        max: usize,
    ) -> Result<Vec<pb::StoredMessage>> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::log(topic_id, end).to_vec());
        let start = keys::log(topic_id, from);
        let it = self.db.iterator_cf_opt(
            self.cf(Cf::Log),
            ro,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in it.take(max) {
            let (_, v) = item?;
            out.push(decode::<pb::StoredMessage>(&v)?);
        }
        Ok(out)
    }

    /// One message of a topic log.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn read_message(&self, topic_id: u32, offset: u64) -> Result<Option<pb::StoredMessage>> {
        self.db
            .get_pinned_cf(self.cf(Cf::Log), keys::log(topic_id, offset))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// The first offset in `start..end` of a topic whose message was stored at or after
    /// `at_ms` (`end` when none was): a binary search, since one writer stamps messages
    /// in offset order. A missing message counts as older.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn first_stored_at_or_after(
        &self,
        topic_id: u32,
        start: u64,
        end: u64,
        at_ms: u64,
    ) -> Result<u64> {
        let (mut lo, mut hi) = (start, end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let stored = self.read_message(topic_id, mid)?.map_or(0, |m| m.store_ms);
            if stored >= at_ms {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(lo)
    }

    /// The first offset in `start..end` of a topic from which its log takes at most
    /// `bytes` on disk, by RocksDB's estimate of its files (what is only in memory does
    /// not count yet).
    pub fn first_within_bytes(&self, topic_id: u32, start: u64, end: u64, bytes: u64) -> u64 {
        let size = |from: u64| {
            let (a, b) = (keys::log(topic_id, from), keys::log(topic_id, end));
            let range = rocksdb::Range::new(&a, &b);
            self.db
                .get_approximate_sizes_cf(self.cf(Cf::Log), &[range])
                .first()
                .copied()
                .unwrap_or(0)
        };
        let (mut lo, mut hi) = (start, end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if size(mid) <= bytes {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lo
    }

    /// What a topic's log `start..end` takes: bytes on disk (RocksDB's estimate of its
    /// files) and the store time of its oldest message (0 when it is empty).
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn topic_usage(&self, topic_id: u32, start: u64, end: u64) -> Result<(u64, u64)> {
        let (a, b) = (keys::log(topic_id, start), keys::log(topic_id, end));
        let bytes = self
            .db
            .get_approximate_sizes_cf(self.cf(Cf::Log), &[rocksdb::Range::new(&a, &b)])
            .first()
            .copied()
            .unwrap_or(0);
        let oldest = self.read_log(topic_id, start, end, 1)?;
        Ok((bytes, oldest.first().map_or(0, |m| m.store_ms)))
    }

    /// Writes the logs' memtable out to files, where their sizes are known (what
    /// [`Storage::first_within_bytes`] measures).
    ///
    /// # Errors
    /// Storage failure.
    pub fn flush_logs(&self) -> Result<()> {
        self.db.flush_cf(self.cf(Cf::Log))?;
        Ok(())
    }

    /// Compacts a topic's log below `to` (after retention deleted it): the files that
    /// held it go, and the space with them.
    pub fn compact_log(&self, topic_id: u32, to: u64) {
        let (a, b) = (keys::log(topic_id, 0), keys::log(topic_id, to));
        // Alongside the automatic compactions, not instead of them (the default blocks
        // them while it runs, and the writer would stall behind a growing level 0).
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_exclusive_manual_compaction(false);
        self.db
            .compact_range_cf_opt(self.cf(Cf::Log), Some(&a), Some(&b), &opts);
    }

    /// The messages at `offsets` of a topic (those that exist), in one call: what an
    /// ordered group reads when acks release the next message of many groups at once.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn read_messages(&self, topic_id: u32, offsets: &[u64]) -> Result<Vec<pb::StoredMessage>> {
        let mut out = Vec::with_capacity(offsets.len());
        for &offset in offsets {
            if let Some(m) = self.read_message(topic_id, offset)? {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// A transaction record.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn txn(&self, id: Id) -> Result<Option<TxnRecord>> {
        self.db
            .get_pinned_cf(self.cf(Cf::Txn), id.to_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    /// The half messages of a transaction, in the order they were sent.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn halves(&self, id: Id) -> Result<Vec<pb::StoredMessage>> {
        let prefix = id.to_bytes();
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(self.cf(Cf::Half), prefix) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    /// The `count` half messages of a transaction by their sequence numbers (a multi-get,
    /// no iterator); `staged` supplies those written in the batch being built.
    ///
    /// # Errors
    /// Storage failure, a corrupt record, or a missing half message.
    pub fn halves_by_seq(
        &self,
        id: Id,
        count: u32,
        mut staged: Vec<(u32, pb::StoredMessage)>,
    ) -> Result<Vec<pb::StoredMessage>> {
        let cf = self.cf(Cf::Half);
        let keys: Vec<_> = (0..count).map(|seq| (cf, keys::half(id, seq))).collect();
        let mut out = Vec::with_capacity(count as usize);
        for (seq, value) in (0..count).zip(self.db.multi_get_cf(keys)) {
            match value? {
                Some(v) => out.push(decode(&v)?),
                None => {
                    let at = staged.iter().position(|(s, _)| *s == seq).ok_or_else(|| {
                        Error::Internal(format!("half message {seq} of {id} missing"))
                    })?;
                    out.push(staged.swap_remove(at).1);
                }
            }
        }
        Ok(out)
    }

    /// Transactions matching `filter`, oldest first, at most `limit`.
    ///
    /// This walks the transaction records: an operator's listing, not a hot path.
    ///
    /// # Errors
    /// Storage failure or a corrupt record.
    pub fn list_txns(
        &self,
        after: Option<Id>,
        filter: impl Fn(&TxnRecord) -> bool,
        limit: usize,
    ) -> Result<Vec<(Id, TxnRecord)>> {
        let mut out = Vec::new();
        let start = after.map(|id| id.to_bytes());
        let mode = match &start {
            Some(key) => IteratorMode::From(key, rocksdb::Direction::Forward),
            None => IteratorMode::Start,
        };
        for item in self.db.iterator_cf(self.cf(Cf::Txn), mode) {
            let (k, v) = item?;
            let Some(id) = Id::from_bytes(&k) else {
                continue;
            };
            if Some(id) == after {
                continue;
            }
            let rec: TxnRecord = decode(&v)?;
            if filter(&rec) {
                out.push((id, rec));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Due-index entries of `kind` due at or before `now_ms`, earliest first, at most
    /// `limit`. Seeks straight to the kind's earliest entry and stops at the first one not
    /// yet due, so the cost is the number of due entries, never the backlog (I5).
    ///
    /// # Errors
    /// Storage failure.
    pub fn due(&self, kind: keys::DueKind, now_ms: u64, limit: usize) -> Result<Vec<(u64, Id)>> {
        let zero = Id { boot: 0, seq: 0 };
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::due(kind, now_ms.saturating_add(1), zero).to_vec());
        let start = keys::due(kind, 0, zero);
        let it = self.db.iterator_cf_opt(
            self.cf(Cf::Due),
            ro,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in it.take(limit) {
            let (k, _) = item?;
            self.counters.due_visited.fetch_add(1, Ordering::Relaxed);
            if let Some((_, at, id)) = keys::parse_due(&k) {
                out.push((at, id));
            }
        }
        Ok(out)
    }

    /// How many half messages are stored (prepared and discarded transactions). Read
    /// once at start for the metrics; a key-only scan of the `half` column family.
    ///
    /// # Errors
    /// Storage failure.
    pub fn count_halves(&self) -> Result<u64> {
        let mut n = 0;
        let mut it = self.db.raw_iterator_cf(self.cf(Cf::Half));
        it.seek_to_first();
        while it.valid() {
            n += 1;
            it.next();
        }
        it.status()?;
        Ok(n)
    }
}

/// Decodes a stored record, reporting corruption as an internal error.
pub(crate) fn decode<T: Message + Default>(bytes: &[u8]) -> Result<T> {
    T::decode(bytes).map_err(|e| Error::Internal(format!("corrupt record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keys::DueKind;

    fn put_due(storage: &Storage, entries: impl Iterator<Item = (u64, Id)>) {
        let mut wo = rocksdb::WriteOptions::default();
        wo.disable_wal(true);
        let mut batch = rocksdb::WriteBatch::default();
        for (at, id) in entries {
            batch.put_cf(storage.cf(Cf::Due), keys::due(DueKind::Check, at, id), []);
            if batch.len() >= 100_000 {
                storage
                    .db()
                    .write_opt(std::mem::take(&mut batch), &wo)
                    .unwrap();
            }
        }
        storage.db().write_opt(batch, &wo).unwrap();
    }

    /// Every column family runs with our options, not RocksDB's defaults: each reports the
    /// shared block cache, and the options file RocksDB writes at open lists each family's
    /// compression and memtable size.
    #[test]
    fn every_column_family_gets_its_options() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        for name in CFS {
            let cf = storage.db().cf_handle(name).unwrap();
            let capacity = storage
                .db()
                .property_int_value_cf(cf, "rocksdb.block-cache-capacity")
                .unwrap();
            assert_eq!(
                capacity,
                Some(BLOCK_CACHE_BYTES as u64),
                "{name}'s block cache"
            );
        }
        drop(storage);
        let options_file = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("OPTIONS-")
            })
            .max()
            .expect("RocksDB writes an options file");
        let text = std::fs::read_to_string(options_file).unwrap();
        let section = |header: String| {
            let rest = text
                .split_once(&header)
                .unwrap_or_else(|| panic!("no {header}"))
                .1;
            rest.split("\n[").next().unwrap().to_owned()
        };
        for name in CFS {
            let cf = section(format!("[CFOptions \"{name}\"]"));
            assert!(cf.contains("compression=kLZ4Compression"), "{name}");
            assert!(cf.contains("write_buffer_size=67108864"), "{name}");
        }
        assert!(text.contains(&format!("db_write_buffer_size={MEMTABLES_BYTES}")));
        assert!(text.contains(&format!("max_total_wal_size={WAL_BYTES}")));
    }

    /// I5: with a million prepared transactions of which none is due, a scheduler pass
    /// visits nothing; with some due, it visits exactly those.
    #[test]
    fn due_scan_costs_what_is_due_not_the_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let now = 1_000_000_000;
        let id = |seq| Id { boot: 1, seq };
        put_due(
            &storage,
            (0..1_000_000).map(|i| (now + 1 + (i % 5000), id(i))),
        );
        // Resolved transactions' purge entries sort before nothing of ours: a different kind.
        storage
            .db()
            .put_cf(storage.cf(Cf::Due), keys::due(DueKind::Purge, 1, id(7)), [])
            .unwrap();
        let visited = || storage.counters.due_visited.load(Ordering::Relaxed);

        assert!(storage.due(DueKind::Check, now, 4096).unwrap().is_empty());
        assert_eq!(visited(), 0, "a pass with nothing due visited entries");

        put_due(
            &storage,
            (0..37).map(|i| (now - 100 + i, id(2_000_000 + i))),
        );
        let due = storage.due(DueKind::Check, now, 4096).unwrap();
        assert_eq!(due.len(), 37);
        assert_eq!(visited(), 37, "visited more than what was due");
        assert!(
            due.windows(2).all(|w| w[0].0 <= w[1].0),
            "not in time order"
        );
        assert_eq!(storage.due(DueKind::Purge, now, 10).unwrap().len(), 1);
    }
}
