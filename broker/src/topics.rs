//! The registry of topics: name to id, and a watch on each topic's end offset that the
//! writer moves after every durable append, so delivery wakes up without polling.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

/// One topic.
#[derive(Debug)]
pub struct Topic {
    /// Its name.
    pub name: String,
    /// Short id used in storage keys.
    pub id: u32,
    /// Broker clock at creation.
    pub created_ms: u64,
    end: watch::Sender<u64>,
    /// First offset still in the log (retention removed what is below).
    start: AtomicU64,
    /// Retention overrides (0: the broker's): age in ms, size in bytes.
    retention_ms: AtomicU64,
    retention_bytes: AtomicU64,
    /// The queues RocketMQ clients see (0: the broker's).
    queues: AtomicU32,
    /// Deleted: whoever still holds it must not write for it.
    deleted: std::sync::atomic::AtomicBool,
}

impl Topic {
    /// A topic whose log ends at `end`.
    pub fn new(name: String, id: u32, created_ms: u64, end: u64) -> Self {
        Self {
            name,
            id,
            created_ms,
            end: watch::Sender::new(end),
            start: AtomicU64::new(0),
            retention_ms: AtomicU64::new(0),
            retention_bytes: AtomicU64::new(0),
            queues: AtomicU32::new(0),
            deleted: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The topic as stored: its record and where its log ends.
    pub fn from_record(
        name: String,
        record: &crate::storage::records::TopicRecord,
        end: u64,
    ) -> Self {
        let t = Self::new(name, record.id, record.created_ms, end.max(record.start));
        t.start.store(record.start, Ordering::Relaxed);
        t.set_retention(record.retention_ms, record.retention_bytes);
        t.set_queues(record.queues);
        t
    }

    /// Its record, as the writer stores it.
    pub fn record(&self) -> crate::storage::records::TopicRecord {
        crate::storage::records::TopicRecord {
            id: self.id,
            created_ms: self.created_ms,
            start: self.start(),
            retention_ms: self.retention_ms.load(Ordering::Relaxed),
            retention_bytes: self.retention_bytes.load(Ordering::Relaxed),
            queues: self.queues(),
        }
    }

    /// First offset still in the log.
    pub fn start(&self) -> u64 {
        self.start.load(Ordering::Relaxed)
    }

    /// Moves the start on (retention removed the offsets below `start`).
    pub(crate) fn set_start(&self, start: u64) {
        self.start.fetch_max(start, Ordering::Relaxed);
    }

    /// Its retention overrides: age in ms and size in bytes, 0 for the broker's.
    pub fn retention(&self) -> (u64, u64) {
        (
            self.retention_ms.load(Ordering::Relaxed),
            self.retention_bytes.load(Ordering::Relaxed),
        )
    }

    /// Sets its retention overrides (0: the broker's).
    pub(crate) fn set_retention(&self, ms: u64, bytes: u64) {
        self.retention_ms.store(ms, Ordering::Relaxed);
        self.retention_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The queues RocketMQ clients see (0: the broker's).
    pub fn queues(&self) -> u32 {
        self.queues.load(Ordering::Relaxed)
    }

    /// Sets the queues RocketMQ clients see (0: the broker's).
    pub(crate) fn set_queues(&self, queues: u32) {
        self.queues.store(queues, Ordering::Relaxed);
    }

    /// Whether it was deleted (a topic created later under its name is another one).
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Relaxed)
    }

    /// Marks it deleted (the writer, as it stages the deletion).
    pub(crate) fn set_deleted(&self) {
        self.deleted.store(true, Ordering::Relaxed);
    }

    /// One past the last durable offset.
    pub fn end(&self) -> u64 {
        *self.end.borrow()
    }

    /// A receiver that changes whenever the end moves.
    pub fn watch_end(&self) -> watch::Receiver<u64> {
        self.end.subscribe()
    }

    /// Publishes a new durable end (called by the writer after the fsync).
    pub(crate) fn set_end(&self, end: u64) {
        self.end.send_if_modified(|cur| {
            let moved = end > *cur;
            if moved {
                *cur = end;
            }
            moved
        });
    }
}

/// All topics, by name and by id.
#[derive(Debug, Default)]
pub struct Topics {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_name: HashMap<String, Arc<Topic>>,
    by_id: HashMap<u32, Arc<Topic>>,
}

impl Topics {
    /// Adds a topic.
    pub fn insert(&self, topic: Arc<Topic>) {
        let mut inner = self.inner.write().expect("topics lock");
        inner.by_id.insert(topic.id, topic.clone());
        inner.by_name.insert(topic.name.clone(), topic);
    }

    /// Removes a deleted topic (its name stays with a newer topic of that name, if any).
    pub fn remove(&self, topic: &Topic) {
        let mut inner = self.inner.write().expect("topics lock");
        inner.by_id.remove(&topic.id);
        if inner
            .by_name
            .get(&topic.name)
            .is_some_and(|t| t.id == topic.id)
        {
            inner.by_name.remove(&topic.name);
        }
    }

    /// How many topics there are.
    pub fn len(&self) -> usize {
        self.inner.read().expect("topics lock").by_name.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A topic by name.
    pub fn get(&self, name: &str) -> Option<Arc<Topic>> {
        self.inner
            .read()
            .expect("topics lock")
            .by_name
            .get(name)
            .cloned()
    }

    /// A topic by id.
    pub fn by_id(&self, id: u32) -> Option<Arc<Topic>> {
        self.inner
            .read()
            .expect("topics lock")
            .by_id
            .get(&id)
            .cloned()
    }

    /// Every topic, sorted by name.
    pub fn all(&self) -> Vec<Arc<Topic>> {
        let mut all: Vec<_> = self
            .inner
            .read()
            .expect("topics lock")
            .by_name
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The largest id in use (0 when there is none).
    pub fn max_id(&self) -> u32 {
        self.inner
            .read()
            .expect("topics lock")
            .by_id
            .keys()
            .copied()
            .max()
            .unwrap_or(0)
    }
}
