//! One consumer group on one topic: the task that owns its delivery state.
//!
//! Order of delivery on each wake-up: retries that are due (lease expired, nacked,
//! redriven), then new messages from the cursor. A message is leased to one consumer at a
//! time; the lease deadlines sit in a `BTreeSet` ordered by time, so expiring them costs
//! what is due, not what is in flight (I5).
//!
//! This file holds the task and its requests; `leases`, `acks`, `retry` and `pump`
//! hold the bookkeeping each part of a message's life needs.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use txmq_protocol::{Frame, now_ms, pb};

use super::{ConsumerSpec, LeaseRef, MAX_WINDOW, QueueMsg, SubscribeOptions};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::storage::records::{CursorRecord, DeadLetterRecord, RetryRecord};
use crate::storage::writer::{Command, Op, Outcome, WriterHandle};
use crate::storage::{Cf, Storage, StorageHandle, keys};
use crate::topics::Topic;

mod acks;
mod fifo;
mod leases;
mod pump;
pub use pump::tag_matches;
mod retry;

use fifo::Fifo;
use retry::{Kept, Redelivery};

use pump::parse_tags;

/// Most messages read from the log per wake-up.
const READ_BATCH: usize = 512;

/// Durable state read at start.
#[derive(Debug)]
pub struct Loaded {
    cursor: Option<CursorRecord>,
    acked: Vec<u64>,
    retries: Vec<(u64, RetryRecord)>,
    dead_letters: u64,
    /// For an ordered group: the message group of each message waiting for redelivery.
    retry_groups: Vec<(u64, String)>,
}

impl Loaded {
    /// Reads a group's state on a topic.
    ///
    /// # Errors
    /// Storage failure.
    pub fn load(storage: &Storage, group: &str, topic: &Topic) -> Result<Self> {
        let cursor = storage.cursor(group, topic.id)?;
        let retries = storage.retries(group, topic.id)?;
        let mut retry_groups = Vec::new();
        if cursor.as_ref().is_some_and(|c| c.ordered) {
            // A head waiting for redelivery must lead its group from the first read on.
            for (offset, _) in &retries {
                if let Some(m) = storage.read_message(topic.id, *offset)? {
                    retry_groups.push((*offset, m.message_group));
                }
            }
        }
        Ok(Self {
            cursor,
            acked: storage.acked(group, topic.id)?,
            retries,
            dead_letters: storage.dead_letters(group, topic.id)?.len() as u64,
            retry_groups,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    lease_id: u64,
    subscription_id: u64,
    /// The native connection it was given to (0: none; see [`ConsumerSpec`]).
    holder: u64,
    deadline_ms: u64,
    attempt: u32,
    /// An ack for it arrived and waits for its write: the consumer already got its credit
    /// back, and neither expiry nor the consumer leaving may release it meanwhile.
    acking: bool,
}

#[derive(Debug)]
struct Consumer {
    spec: ConsumerSpec,
    in_flight: u32,
}

impl Consumer {
    /// Connected, and its socket takes what is written to it: deliveries queued behind a
    /// client that stopped reading would only expire there.
    fn takes_deliveries(&self) -> bool {
        !self.spec.outbound.is_closed() && !self.spec.stall.is_stalled()
    }
}

/// The task state.
#[derive(Debug)]
pub struct Queue {
    group: String,
    topic: Arc<Topic>,
    storage: StorageHandle,
    writer: WriterHandle,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// `None` until the first subscription makes the group durable.
    cursor: Option<CursorRecord>,
    tags: Option<HashSet<String>>,
    /// Next offset never handed out since start.
    next: u64,
    acked: BTreeSet<u64>,
    leases: HashMap<u64, Lease>,
    deadlines: BTreeSet<(u64, u64)>,
    /// Offsets to deliver again, each saying whether it is stored (see `retry`).
    retry: HashMap<u64, Redelivery>,
    retry_due: BTreeSet<(u64, u64)>,
    consumers: Vec<Consumer>,
    round_robin: usize,
    lease_ids: Arc<super::LeaseIds>,
    dead_letters: u64,
    /// Lease deadlines handled by expiry passes: the work counter behind I5's proof.
    expiry_visits: u64,
    /// Acks received since the last [`Queue::start_acks`], written together.
    pending_acks: Vec<AckRequest>,
    /// The write of acks on its way, if any (at most one).
    ack_flight: Option<acks::AckFlight>,
    /// Message-group ordering, for an ordered group.
    fifo: Option<Fifo>,
    /// Dead-lettered heads whose write is on its way: their groups move on once an ack
    /// flight written after it has succeeded (writes are durable in order).
    dead_unreleased: Vec<u64>,
    /// Offsets this queue dead-lettered lately (the last `acks::RECENT_DEAD`), whose write
    /// may not be stored yet: an ack of one of their expired leases is refused.
    dead_recent: std::collections::VecDeque<u64>,
    /// This queue's share of the blocked-message-groups gauge, as last reported.
    reported_blocked: i64,
    /// The group was deleted on this topic: the task ends.
    deleted: bool,
    /// Whether this node may deliver from its state now (a group leader's lease).
    serving: crate::replication::lease::Serving,
}

/// One ack request waiting for its write: the leases and where its answer goes.
type AckRequest = (Vec<LeaseRef>, oneshot::Sender<Result<Outcome>>);

impl Queue {
    /// A queue over loaded state.
    pub fn new(
        group: String,
        topic: Arc<Topic>,
        loaded: Loaded,
        storage: StorageHandle,
        writer: WriterHandle,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let floor = loaded.cursor.as_ref().map_or(0, |c| c.ack_floor);
        let mut fifo = loaded
            .cursor
            .as_ref()
            .is_some_and(|c| c.ordered)
            .then(Fifo::default);
        let mut held = HashSet::new();
        if let Some(fifo) = fifo.as_mut() {
            let mut known = loaded.retry_groups;
            known.sort_unstable_by_key(|(offset, _)| *offset);
            for (offset, group) in &known {
                if fifo.restore(group, *offset) {
                    held.insert(*offset);
                }
            }
        }
        let mut q = Self {
            group,
            topic,
            storage,
            writer,
            config,
            metrics,
            tags: loaded
                .cursor
                .as_ref()
                .and_then(|c| parse_tags(&c.tag_filter)),
            cursor: loaded.cursor,
            next: floor,
            acked: loaded.acked.into_iter().filter(|o| *o >= floor).collect(),
            leases: HashMap::new(),
            deadlines: BTreeSet::new(),
            retry: HashMap::new(),
            retry_due: BTreeSet::new(),
            consumers: Vec::new(),
            round_robin: 0,
            // Lease ids must not repeat across restarts, or a handle kept from before one
            // could ack the new lease of the same offset: the registry's sequence of this
            // boot replaces this one (`Queue::lease_ids`).
            lease_ids: Arc::new(super::LeaseIds::new(0)),
            dead_letters: loaded.dead_letters,
            expiry_visits: 0,
            pending_acks: Vec::new(),
            ack_flight: None,
            fifo,
            dead_unreleased: Vec::new(),
            dead_recent: std::collections::VecDeque::new(),
            reported_blocked: 0,
            deleted: false,
            serving: crate::replication::lease::Serving::always(),
        };
        for (offset, rec) in loaded.retries {
            if !held.contains(&offset) {
                // Held ones are due when their head is done, not at a time.
                q.retry_due.insert((rec.due_ms, offset));
            }
            q.retry.insert(offset, Redelivery::from_record(&rec));
        }
        q
    }

    /// Delivers only while `serving` holds (a group leader's lease).
    #[must_use]
    pub fn serving(self, serving: crate::replication::lease::Serving) -> Self {
        Self { serving, ..self }
    }

    /// Takes lease ids from `ids` (the registry's, of this boot).
    #[must_use]
    pub fn lease_ids(self, lease_ids: Arc<super::LeaseIds>) -> Self {
        Self { lease_ids, ..self }
    }

    fn floor(&self) -> u64 {
        self.cursor.as_ref().map_or(0, |c| c.ack_floor)
    }

    fn max_attempts(&self) -> u32 {
        match self.cursor.as_ref().map_or(0, |c| c.max_attempts) {
            0 => self.config.max_attempts,
            n => n,
        }
    }

    /// Runs until cancelled or every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<QueueMsg>, cancel: CancellationToken) {
        let mut end = self.topic.watch_end();
        loop {
            self.follow_retention().await;
            self.expire(now_ms()).await;
            // A dead-lettered head's write must be durable before its group moves on:
            // an ack flight (empty if need be) tells when (see `start_acks`).
            self.start_acks().await;
            if let Err(e) = self.pump().await {
                tracing::warn!(group = %self.group, topic = %self.topic.name, "delivery paused: {e}");
            }
            self.report_blocked();
            end.borrow_and_update();
            // A due retry wakes the queue only when some consumer could take it; the
            // queue wakes anyway when credit comes back (an ack, a subscription).
            let retry_wake = if self.has_credit() {
                self.retry_due.first()
            } else {
                None
            };
            // A stalled consumer recovers without telling the queue: look again then.
            let stalled = self
                .consumers
                .iter()
                .any(|c| c.spec.stall.is_stalled())
                .then(|| (now_ms() + super::STALL_AFTER.as_millis() as u64, 0));
            // A leader whose lease lapsed (handing over, say) delivers nothing, and its
            // due retries would wake it at once for nothing: it looks again in a while
            // (or on a request), in case it serves again.
            let lapsed = (!self.serving.holds()).then(|| (now_ms() + 100, 0));
            let wake = if lapsed.is_some() {
                lapsed.map(|(at, _)| at)
            } else {
                [self.deadlines.first(), retry_wake, stalled.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(|(at, _)| *at)
                    .min()
            };
            let sleep = async {
                match wake {
                    Some(at) => {
                        let wait = at.saturating_sub(now_ms());
                        tokio::time::sleep(Duration::from_millis(wait.max(1))).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                msg = rx.recv() => match msg {
                    Some(msg) => {
                        self.handle(msg).await;
                        // Take every request already waiting (typically acks) before the
                        // next pump, so one log read refills many credits at once.
                        for _ in 0..READ_BATCH {
                            if self.deleted {
                                break;
                            }
                            match rx.try_recv() {
                                Ok(msg) => self.handle(msg).await,
                                Err(_) => break,
                            }
                        }
                        if self.deleted {
                            // Its state is gone; a later subscription starts afresh
                            // (the registry starts a new queue for a closed one).
                            break;
                        }
                        self.start_acks().await;
                    }
                    None => break,
                },
                written = async {
                    match self.ack_flight.as_mut() {
                        Some(flight) => (&mut flight.rx).await,
                        None => std::future::pending().await,
                    }
                } => {
                    // Its answer never came (the writer gave up the write): in a group,
                    // the next leader may or may not have it.
                    let written = written.unwrap_or(Err(if self.serving.replicated() {
                        Error::NotLeader(None)
                    } else {
                        Error::ShuttingDown
                    }));
                    self.finish_acks(written);
                    self.start_acks().await;
                }
                changed = end.changed() => if changed.is_err() { break },
                () = sleep => {}
            }
        }
        // This queue's groups are no one's to count any more.
        self.metrics
            .ordered_blocked_groups
            .sub(self.reported_blocked);
    }

    /// Moves the blocked-message-groups gauge by what changed in this queue.
    fn report_blocked(&mut self) {
        let now = self.fifo.as_ref().map_or(0, |f| i64::from(f.blocked().0));
        self.metrics
            .ordered_blocked_groups
            .add(now - self.reported_blocked);
        self.reported_blocked = now;
    }

    async fn handle(&mut self, msg: QueueMsg) {
        match msg {
            QueueMsg::Subscribe {
                consumer,
                options,
                reply,
            } => {
                let _ = reply.send(self.subscribe(consumer, options).await);
            }
            QueueMsg::Unsubscribe {
                subscription_id,
                graceful,
                keep,
            } => self.unsubscribe(subscription_id, graceful, &keep).await,
            QueueMsg::Ack { leases, reply } => {
                for r in &leases {
                    self.mark_acking(*r);
                }
                self.pending_acks.push((leases, reply));
            }
            QueueMsg::Nack {
                lease,
                delay,
                reply,
            } => match self.take_lease(lease) {
                Ok(l) => {
                    self.metrics.nacks.inc();
                    let ops = self.fail(lease.offset, l, delay, "nacked");
                    self.writer.submit_to(Command::Raw(ops), reply).await;
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            QueueMsg::DeadLetter {
                lease,
                reason,
                reply,
            } => match self.take_lease(lease) {
                Ok(l) => {
                    let ops = self.dead_letter(lease.offset, l, &reason);
                    self.writer.submit_to(Command::Raw(ops), reply).await;
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            QueueMsg::Extend {
                lease,
                lease_for,
                reply,
            } => {
                let _ = reply.send(self.extend(lease, lease_for));
            }
            QueueMsg::Describe { reply } => {
                let _ = reply.send(self.describe());
            }
            QueueMsg::Peek { offset, reply } => {
                let lease = self.leases.get(&offset).map(|l| (l.attempt, l.deadline_ms));
                let _ = reply.send(lease);
            }
            QueueMsg::Redrive { message_id, reply } => {
                let _ = reply.send(self.redrive(message_id).await);
            }
            QueueMsg::Reset { to, reply } => {
                let _ = reply.send(self.reset(to).await);
            }
            QueueMsg::Delete { force, reply } => {
                let deleted = self.delete(force).await;
                self.deleted = deleted.is_ok();
                let _ = reply.send(deleted);
            }
        }
    }

    async fn subscribe(&mut self, spec: ConsumerSpec, options: SubscribeOptions) -> Result<()> {
        let mut cursor = self.cursor.clone().unwrap_or_else(|| {
            let first = if options.from_latest {
                self.topic.end()
            } else {
                // The oldest message kept: what retention removed was never this
                // group's to skip.
                self.topic.start()
            };
            CursorRecord {
                ack_floor: first,
                first_offset: first,
                ..Default::default()
            }
        });
        // One filter per group and topic: a consumer whose filter differs would make the
        // group skip (mark done) every message it does not want, for every member and for
        // good. So a differing filter is refused unless the change is asked for.
        if self.cursor.is_some()
            && parse_tags(&cursor.tag_filter) != parse_tags(&options.tag_filter)
            && !options.replace_filter
        {
            return Err(Error::FilterConflict(format!(
                "group {:?} receives tags {:?} of topic {:?}; this consumer asks for {:?}. \
                 Subscribe with the group's filter, use another group, or change the \
                 group's filter explicitly (txmq consume --replace-filter)",
                self.group,
                display_filter(&cursor.tag_filter),
                self.topic.name,
                display_filter(&options.tag_filter)
            )));
        }
        if self.cursor.is_none() || options.replace_filter {
            if options.replace_filter
                && parse_tags(&cursor.tag_filter) != parse_tags(&options.tag_filter)
            {
                tracing::info!(group = %self.group, topic = %self.topic.name, from = %cursor.tag_filter, to = %options.tag_filter, "tag filter replaced");
            }
            cursor.tag_filter = options.tag_filter;
        }
        if self.cursor.is_none() {
            cursor.ordered = options.ordered;
        } else if cursor.ordered != options.ordered {
            let (group_is, asks) = if cursor.ordered {
                ("ordered", "unordered")
            } else {
                ("unordered", "ordered")
            };
            return Err(Error::OrderingConflict(format!(
                "group {:?} is {group_is} on topic {:?}; this consumer subscribes {asks}. \
                 Subscribe as the group does, or use another group",
                self.group, self.topic.name
            )));
        }
        if options.max_attempts > 0 {
            cursor.max_attempts = options.max_attempts;
        }
        if self.cursor.as_ref() != Some(&cursor) {
            self.writer
                .submit(Command::Raw(vec![Op::Put(
                    Cf::Cursor,
                    keys::cursor(&self.group, self.topic.id),
                    cursor.encode_to_vec(),
                )]))
                .await?;
            if self.cursor.is_none() {
                self.next = cursor.ack_floor;
            }
            self.tags = parse_tags(&cursor.tag_filter);
            if cursor.ordered && self.fifo.is_none() {
                self.fifo = Some(Fifo::default());
            }
            self.cursor = Some(cursor);
        }
        let window = spec.window.clamp(1, MAX_WINDOW);
        self.consumers.push(Consumer {
            spec: ConsumerSpec { window, ..spec },
            in_flight: 0,
        });
        Ok(())
    }

    /// A consumer that leaves gives its leases back at once: waiting for them to expire
    /// would only delay messages nobody is working on. The delivery did happen, so it
    /// counts as an attempt (as a requeue on channel close does in RabbitMQ's quorum
    /// queues): a message that crashes every consumer still ends in the dead-letter queue.
    async fn unsubscribe(&mut self, subscription_id: u64, graceful: bool, keep: &[u64]) {
        self.consumers
            .retain(|c| c.spec.subscription_id != subscription_id);
        let released: Vec<(u64, Lease)> = self
            .leases
            .iter()
            .filter(|(o, l)| l.subscription_id == subscription_id && !keep.contains(o))
            .map(|(o, l)| (*o, *l))
            .collect();
        let mut ops = Vec::new();
        for (offset, lease) in released {
            if lease.acking {
                // Its ack is on the way: it decides.
                continue;
            }
            self.leases.remove(&offset);
            self.deadlines.remove(&(lease.deadline_ms, offset));
            if graceful {
                ops.extend(self.give_back(offset, lease));
            } else {
                ops.extend(self.fail(offset, lease, Some(Duration::ZERO), "consumer disconnected"));
            }
        }
        self.write_quietly(ops).await;
    }

    async fn write_quietly(&self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        let (tx, rx) = oneshot::channel();
        self.writer.submit_to(Command::Raw(ops), tx).await;
        let group = self.group.clone();
        tokio::spawn(async move {
            if let Ok(Err(e)) = rx.await {
                tracing::warn!(%group, "could not record a redelivery: {e}");
            }
        });
    }

    fn describe(&self) -> pb::GroupTopicInfo {
        let end = self.topic.end();
        let floor = self.floor();
        let acked_above = self.acked.iter().filter(|o| **o < end).count() as u64;
        pb::GroupTopicInfo {
            topic: self.topic.name.clone(),
            next_offset: end,
            ack_floor: floor,
            in_flight: self.leases.len() as u64,
            lag: end.saturating_sub(floor).saturating_sub(acked_above)
                + self.redriven_below_floor(),
            dead_letters: self.dead_letters,
            waiting_retry: self.retry.len() as u64,
            consumers: self.consumers.len() as u32,
            stalled_consumers: self
                .consumers
                .iter()
                .filter(|c| c.spec.stall.is_stalled())
                .count() as u32,
            tag_filter: self
                .cursor
                .as_ref()
                .map(|c| c.tag_filter.clone())
                .unwrap_or_default(),
            skipped_by_retention: self.cursor.as_ref().map_or(0, |c| c.skipped),
            ordered: self.fifo.is_some(),
            blocked_message_groups: self.fifo.as_ref().map_or(0, |f| f.blocked().0),
            held_messages: self.fifo.as_ref().map_or(0, |f| f.blocked().1),
        }
    }
}

/// A filter as users write it: empty means everything.
fn display_filter(filter: &str) -> &str {
    if filter.trim().is_empty() {
        "*"
    } else {
        filter
    }
}

#[cfg(test)]
mod tests;
