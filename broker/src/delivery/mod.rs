//! Consumer groups: who gets which message, leases, acks, redelivery and dead letters.
//!
//! Each (group, topic) pair has one [`queue::Queue`] task that owns all of that pair's
//! state: the ack floor and acks above it, the leases in flight with a time-ordered index
//! of their deadlines, the messages waiting for redelivery, and the subscribed consumers
//! with their windows. Connections talk to it through a bounded channel; nothing else
//! touches that state, so there are no locks on the delivery path.
//!
//! The durable part of the state is written through the writer: the cursor (ack floor,
//! filter), acks above the floor, retry records (attempt count and due time) and dead
//! letters. Leases live in memory only: after a crash every unacknowledged message is
//! simply delivered again, which is what at-least-once promises.

pub mod queue;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use txmq_protocol::{Frame, pb};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::replication::lease::Serving;
use crate::storage::StorageHandle;
use crate::storage::writer::{Command, Outcome, WriterHandle};
use crate::topics::{Topic, Topics};

/// Most unacknowledged deliveries one consumer may hold, whatever it asks for.
pub const MAX_WINDOW: u32 = 4096;

/// Whether this connection's socket takes what the broker writes: a client that stopped
/// reading blocks the writer task, and deliveries queued behind it never arrive.
#[derive(Debug, Default)]
pub struct Stall {
    /// Broker clock when the current write started waiting for the socket (0: none).
    blocked_since_ms: std::sync::atomic::AtomicU64,
}

impl Stall {
    /// A write to the socket starts waiting (`true`) or is done (`false`).
    pub fn writing(&self, waiting: bool) {
        let at = if waiting { txmq_protocol::now_ms() } else { 0 };
        self.blocked_since_ms
            .store(at, std::sync::atomic::Ordering::Relaxed);
    }

    /// Something could not be written (a full buffer): blocked from now, unless it was
    /// blocked already (then from then).
    pub fn blocked(&self) {
        let _ = self.blocked_since_ms.compare_exchange(
            0,
            txmq_protocol::now_ms(),
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// A write has waited for the socket longer than [`STALL_AFTER`].
    pub fn is_stalled(&self) -> bool {
        let since = self
            .blocked_since_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        since != 0 && txmq_protocol::now_ms().saturating_sub(since) > STALL_AFTER.as_millis() as u64
    }
}

/// How long a write may wait for the socket before its connection counts as stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(1);

/// A consumer as the queue sees it.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Unique per subscription.
    pub subscription_id: u64,
    /// Where its deliveries go.
    pub outbound: mpsc::Sender<Frame>,
    /// Unacknowledged deliveries it may hold.
    pub window: u32,
    /// How long each delivery is leased.
    pub lease: Duration,
    /// Whether its connection takes what is written to it.
    pub stall: Arc<Stall>,
    /// The native connection it came on (0: a face that binds its handles otherwise):
    /// its leases are that connection's, and no other's acks, nacks or extends touch
    /// them.
    pub connection_id: u64,
}

/// What a subscription asks for beyond the consumer itself.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// Tag filter (`A||B`; empty or `*` for all).
    pub tag_filter: String,
    /// Start a new group at the end of the topic instead of the beginning.
    pub from_latest: bool,
    /// Group override of max attempts (0: broker default).
    pub max_attempts: u32,
    /// Make `tag_filter` the group's filter even though it differs from the stored one.
    pub replace_filter: bool,
    /// An ordered (FIFO) group; fixed by the group's first subscription.
    pub ordered: bool,
}

/// A lease named by a delivery handle.
#[derive(Debug, Clone, Copy)]
pub struct LeaseRef {
    /// Offset of the message.
    pub offset: u64,
    /// Which lease of it.
    pub lease_id: u64,
    /// The native connection that names it, which must be the one the lease was given
    /// to (`None`: the face proved the handle otherwise, as gRPC's MAC does, or the
    /// broker itself).
    pub holder: Option<u64>,
}

impl LeaseRef {
    /// The lease `lease_id` of the message at `offset`, named by no connection.
    pub fn new(offset: u64, lease_id: u64) -> Self {
        Self {
            offset,
            lease_id,
            holder: None,
        }
    }
}

/// Lease ids of one boot: one broker-wide sequence from `boot × 2^40`. They never
/// repeat across restarts and failovers (the boot number grows, through a group's log),
/// nor across a queue's restarts within a boot, and a later lease has a larger id; they
/// are not taken from the clock. They are not secret: a gRPC receipt handle carries a
/// MAC, and a native lease answers only its own connection.
#[derive(Debug)]
pub struct LeaseIds(std::sync::atomic::AtomicU64);

impl LeaseIds {
    /// The sequence of boot `boot` (at most [`crate::ids::MAX_BOOT`], so it fits).
    pub fn new(boot: u64) -> Self {
        Self(std::sync::atomic::AtomicU64::new((boot << 40) | 1))
    }

    /// The next id.
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// Requests to a queue.
#[derive(Debug)]
pub enum QueueMsg {
    /// Add a consumer.
    Subscribe {
        /// The consumer.
        consumer: ConsumerSpec,
        /// Group settings.
        options: SubscribeOptions,
        /// Done once the cursor is durable.
        reply: oneshot::Sender<Result<()>>,
    },
    /// Remove a consumer and release its leases.
    Unsubscribe {
        /// Which one.
        subscription_id: u64,
        /// The consumer asked to leave: what it held but never processed goes back
        /// without counting an attempt. A lost connection counts one (so a message that
        /// crashes every consumer still reaches the dead-letter queue).
        graceful: bool,
        /// Offsets whose leases stay as they are (a gRPC receive handed them to its
        /// client, which acks them or lets them become visible again).
        keep: Vec<u64>,
    },
    /// Acknowledge deliveries.
    Ack {
        /// Which ones.
        leases: Vec<LeaseRef>,
        /// Answered once durable.
        reply: oneshot::Sender<Result<Outcome>>,
    },
    /// Negative acknowledgement.
    Nack {
        /// Which one.
        lease: LeaseRef,
        /// Redelivery delay; `None` uses the backoff schedule.
        delay: Option<Duration>,
        /// Answered once durable.
        reply: oneshot::Sender<Result<Outcome>>,
    },
    /// Dead-letter a delivery now, whatever its attempts (a consumer that gives up on it:
    /// the gRPC clients' ForwardMessageToDeadLetterQueue).
    DeadLetter {
        /// Which one.
        lease: LeaseRef,
        /// Why, for the dead letter's record.
        reason: String,
        /// Answered once durable.
        reply: oneshot::Sender<Result<Outcome>>,
    },
    /// Lengthen a lease.
    Extend {
        /// Which one.
        lease: LeaseRef,
        /// New lease, from now.
        lease_for: Duration,
        /// The new deadline.
        reply: oneshot::Sender<Result<u64>>,
    },
    /// Report state.
    Describe {
        /// The report.
        reply: oneshot::Sender<pb::GroupTopicInfo>,
    },
    /// Put dead letters back.
    Redrive {
        /// One message id, or all when `None`.
        message_id: Option<String>,
        /// How many went back.
        reply: oneshot::Sender<Result<u32>>,
    },
    /// Delete the group's state on this topic (no consumer may be connected, unless
    /// `force`: then they are dropped): cursor, acks, retries and dead letters. The
    /// queue stops once it is durable.
    Delete {
        /// Drop connected consumers instead of refusing (their topic is being deleted).
        force: bool,
        /// Done, or refused.
        reply: oneshot::Sender<Result<()>>,
    },
    /// The lease of one message, if it is in flight: its attempt and deadline.
    Peek {
        /// The message.
        offset: u64,
        /// Attempt number and lease deadline (ms).
        reply: oneshot::Sender<Option<(u32, u64)>>,
    },
    /// Move the group's position (no consumer may be connected): everything from
    /// `to` on is to be delivered again, nothing below.
    Reset {
        /// The new position (clamped to what the topic holds).
        to: u64,
        /// The position it moved to, once durable.
        reply: oneshot::Sender<Result<u64>>,
    },
}

/// The registry of running queues.
#[derive(Debug)]
pub struct Groups {
    storage: StorageHandle,
    writer: WriterHandle,
    topics: Arc<Topics>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    queues: Mutex<HashMap<(String, u32), mpsc::Sender<QueueMsg>>>,
    /// Queues in `queues` of each group (closed ones too, until the caps prune them);
    /// locked inside `queues`.
    group_queues: Mutex<HashMap<String, usize>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    serving: Serving,
    lease_ids: Arc<LeaseIds>,
}

impl Groups {
    /// An empty registry; queues start on first use.
    pub fn new(
        storage: StorageHandle,
        writer: WriterHandle,
        topics: Arc<Topics>,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            lease_ids: Arc::new(LeaseIds::new(0)),
            storage,
            writer,
            topics,
            config,
            metrics,
            queues: Mutex::new(HashMap::new()),
            group_queues: Mutex::new(HashMap::new()),
            serving: Serving::always(),
            tracker,
            cancel,
        }
    }

    /// Queues deliver only while `serving` holds (a group leader's lease).
    #[must_use]
    pub fn serving(self, serving: Serving) -> Self {
        Self { serving, ..self }
    }

    /// Lease ids are of boot `boot` (see [`LeaseIds`]); a server always says which.
    #[must_use]
    pub fn boot(self, boot: u64) -> Self {
        Self {
            lease_ids: Arc::new(LeaseIds::new(boot)),
            ..self
        }
    }

    /// The topic of that name, created when auto-creation allows.
    ///
    /// # Errors
    /// [`Error::TopicNotFound`], or a storage failure creating it.
    pub async fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        if let Some(t) = self.topics.get(name) {
            return Ok(t);
        }
        if !self.config.auto_create_topics {
            return Err(Error::TopicNotFound(name.to_string()));
        }
        match self
            .writer
            .submit(Command::CreateTopic {
                retention: (0, 0),
                queues: 0,
                name: name.to_string(),
                fail_if_exists: false,
            })
            .await?
        {
            Outcome::Topic(t) => Ok(t),
            other => Err(Error::Internal(format!("create topic gave {other:?}"))),
        }
    }

    /// Topic by name, without creating it.
    ///
    /// # Errors
    /// [`Error::TopicNotFound`].
    pub fn existing_topic(&self, name: &str) -> Result<Arc<Topic>> {
        self.topics
            .get(name)
            .ok_or_else(|| Error::TopicNotFound(name.to_string()))
    }

    /// The queue of (group, topic), started if it is not running.
    ///
    /// # Errors
    /// A storage failure loading its state.
    pub async fn queue(&self, group: &str, topic: Arc<Topic>) -> Result<mpsc::Sender<QueueMsg>> {
        if topic.is_deleted() {
            // Held by someone since: a queue for it would write state under a dead id.
            return Err(Error::TopicNotFound(topic.name.clone()));
        }
        let key = (group.to_string(), topic.id);
        if let Some(q) = self.queues.lock().expect("queues lock").get(&key)
            && !q.is_closed()
        {
            return Ok(q.clone());
        }
        let storage = self.storage.clone();
        let g = group.to_string();
        let t = topic.clone();
        let state = tokio::task::spawn_blocking(move || queue::Loaded::load(&storage, &g, &t))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let mut queues = self.queues.lock().expect("queues lock");
        if topic.is_deleted() {
            // Deleted while this loaded: a topic's deletion stops the queues it finds
            // running after it marked the topic, so none may start after that.
            return Err(Error::TopicNotFound(topic.name.clone()));
        }
        if let Some(q) = queues.get(&key)
            && !q.is_closed()
        {
            // Another caller started it while this one loaded.
            return Ok(q.clone());
        }
        self.admit(&mut queues, &key)?;
        let (tx, rx) = mpsc::channel(1024);
        let q = queue::Queue::new(
            group.to_string(),
            topic,
            state,
            self.storage.clone(),
            self.writer.clone(),
            self.config.clone(),
            self.metrics.clone(),
        )
        .serving(self.serving.clone())
        .lease_ids(self.lease_ids.clone());
        let cancel = self.cancel.clone();
        self.tracker.spawn(q.run(rx, cancel));
        queues.insert(key, tx.clone());
        Ok(tx)
    }

    /// Whether queue `key` may start: at most `max-queues` queues run, of at most
    /// `max-groups` groups (each costs a task, memory and metric series). At a cap the
    /// stopped queues are dropped from the count first; then one more is refused with
    /// `LIMIT_REACHED`, counted.
    fn admit(
        &self,
        queues: &mut HashMap<(String, u32), mpsc::Sender<QueueMsg>>,
        key: &(String, u32),
    ) -> Result<()> {
        let mut groups = self.group_queues.lock().expect("group queues lock");
        let over = |queues: &HashMap<_, _>, groups: &HashMap<String, usize>| {
            if queues.len() >= self.config.max_queues && !queues.contains_key(key) {
                Some("queues")
            } else if groups.len() >= self.config.max_groups && !groups.contains_key(&key.0) {
                Some("groups")
            } else {
                None
            }
        };
        if over(queues, &groups).is_some() {
            queues.retain(|_, q| !q.is_closed());
            groups.clear();
            for (group, _) in queues.keys() {
                *groups.entry(group.clone()).or_default() += 1;
            }
        }
        if let Some(cap) = over(queues, &groups) {
            self.metrics.limit_refusals.with_label_values(&[cap]).inc();
            let (running, setting, limit) = match cap {
                "queues" => (queues.len(), "max-queues", self.config.max_queues),
                _ => (groups.len(), "max-groups", self.config.max_groups),
            };
            return Err(Error::LimitReached(format!(
                "group {:?} not served: the broker runs {running} {cap}, its {setting} \
                 ({limit}); delete groups or raise the setting",
                key.0
            )));
        }
        if !queues.contains_key(key) {
            *groups.entry(key.0.clone()).or_default() += 1;
        }
        Ok(())
    }

    /// Sends a message to a queue.
    ///
    /// # Errors
    /// [`Error::ShuttingDown`] when the queue has stopped.
    pub async fn send(&self, group: &str, topic: Arc<Topic>, msg: QueueMsg) -> Result<()> {
        let q = self.queue(group, topic).await?;
        q.send(msg).await.map_err(|_| Error::ShuttingDown)
    }

    /// Sends a message to the queue of a group that exists on `topic`: running, or with a
    /// cursor stored (it subscribed before). A group exists only once a consumer
    /// subscribed, so acks naming invented groups start nothing and store nothing.
    ///
    /// # Errors
    /// [`Error::GroupNotFound`], or [`Error::ShuttingDown`] when the queue has stopped.
    pub async fn send_existing(&self, group: &str, topic: Arc<Topic>, msg: QueueMsg) -> Result<()> {
        let running = {
            let queues = self.queues.lock().expect("queues lock");
            queues
                .get(&(group.to_string(), topic.id))
                .is_some_and(|q| !q.is_closed())
        };
        if !running {
            let storage = self.storage.clone();
            let (g, id) = (group.to_string(), topic.id);
            let cursor = tokio::task::spawn_blocking(move || storage.cursor(&g, id))
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
            if cursor.is_none() {
                return Err(Error::GroupNotFound(group.to_string(), topic.name.clone()));
            }
        }
        self.send(group, topic, msg).await
    }

    /// The running queues of a topic, by group.
    pub fn running_on(&self, topic_id: u32) -> Vec<(String, mpsc::Sender<QueueMsg>)> {
        let queues = self.queues.lock().expect("queues lock");
        queues
            .iter()
            .filter(|((_, id), q)| *id == topic_id && !q.is_closed())
            .map(|((group, _), q)| (group.clone(), q.clone()))
            .collect()
    }

    /// Topics a group has a cursor on.
    ///
    /// # Errors
    /// Storage failure.
    pub async fn topics_of(&self, group: &str) -> Result<Vec<Arc<Topic>>> {
        let storage = self.storage.clone();
        let g = group.to_string();
        let ids = tokio::task::spawn_blocking(move || storage.topics_of_group(&g))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        Ok(ids
            .into_iter()
            .filter_map(|id| self.topics.by_id(id))
            .collect())
    }
}
