//! The writer's part for topics: creating them, offsets, and appending visible messages.

use std::sync::Arc;

use prost::Message;
use rustc_hash::FxHashMap;
use txmq_protocol::pb;

use super::{Outcome, Stage, Writer};
use crate::error::{Error, Result};
use crate::ids::Id;
use crate::storage::Cf;
use crate::storage::dedup::{self, KeyScope};
use crate::storage::keys;
use crate::storage::records::{DeletedTopicRecord, TopicRecord};
use crate::topics::Topic;
use txmq_protocol::pb::TxnState;

impl Writer {
    pub(super) fn topic(&self, name: &str, stage: &Stage) -> Option<Arc<Topic>> {
        // A topic deleted in this batch is gone already; one created after it is found.
        self.topics
            .get(name)
            .filter(|t| !t.is_deleted())
            .or_else(|| {
                stage
                    .new_topics
                    .iter()
                    .find(|t| t.name == name && !t.is_deleted())
                    .cloned()
            })
    }

    /// Refuses a command for a topic that was deleted (held by someone since).
    pub(super) fn alive(topic: &Topic) -> Result<()> {
        if topic.is_deleted() {
            return Err(Error::TopicNotFound(topic.name.clone()));
        }
        Ok(())
    }

    /// Deletes a topic: its record goes, its log in one range delete, and its id is
    /// recorded as dead, never to be used again (what groups, indexes and retries kept
    /// under it is then garbage, not data of a newer topic of the same name).
    pub(super) fn delete_topic(
        &mut self,
        topic: &Arc<Topic>,
        force: bool,
        checked_below: Option<Id>,
        stage: &mut Stage,
    ) -> Result<Outcome> {
        Self::alive(topic)?;
        if !force {
            // Checked here, in the step that deletes: a transaction prepared between a
            // check made before and the deletion would outlive its topic, and its commit
            // would make a new one of that name.
            let is_open = |r: &crate::storage::records::TxnRecord| {
                r.state == TxnState::Prepared as i32 || r.state == TxnState::Discarded as i32
            };
            // Prepared in this batch (not in storage yet), or stored and not resolved in
            // this batch.
            let staged = stage
                .txns
                .values()
                .any(|r| is_open(r) && r.topics.iter().any(|t| *t == topic.name));
            // Those made before `checked_below` were looked at before the request came
            // here; reading only later ones keeps this step (every write waits for it)
            // short whatever the number of transactions kept.
            let open = self.storage.open_txns_on_from(&topic.name, checked_below)?;
            let open: Vec<&Id> = open
                .iter()
                .filter(|t| stage.txns.get(*t).is_none_or(is_open))
                .collect();
            if staged || !open.is_empty() {
                let first = open
                    .first()
                    .map_or_else(String::new, |t| format!(" (the first: {t})"));
                return Err(Error::Invalid(format!(
                    "open transaction(s) have messages for topic {:?}{first}: resolve them \
                     (txmq txn commit|rollback), or delete with --force to roll them back",
                    topic.name
                )));
            }
        }
        let end = stage
            .next_offset
            .get(&topic.id)
            .or_else(|| self.next_offset.get(&topic.id))
            .copied()
            .unwrap_or(0);
        let meta = self.storage.cf(Cf::Meta);
        stage.batch.delete_cf(meta, keys::topic(&topic.name));
        let fence = self.ids.next_secret();
        let dead = DeletedTopicRecord {
            name: topic.name.clone(),
            deleted_ms: self.clock.now(),
            fence: fence.to_bytes().to_vec(),
            force,
            cleaned: false,
        };
        stage
            .batch
            .put_cf(meta, keys::deleted_topic(topic.id), dead.encode_to_vec());
        let log = self.storage.cf(Cf::Log);
        let last = keys::log(topic.id, u64::MAX);
        stage
            .batch
            .delete_range_cf(log, keys::log(topic.id, 0), last);
        stage.batch.delete_cf(log, last);
        topic.set_deleted();
        stage.deleted.push(topic.clone());
        self.doomed.insert(topic.name.clone(), (fence, force));
        stage.removed += end.saturating_sub(topic.start());
        Ok(Outcome::TopicDeleted {
            messages: end.saturating_sub(topic.start()),
            fence,
        })
    }

    /// [`Writer::create_topic`] for a client (a send to a new topic, an operator's
    /// `topic create`): refused at `max-topics`. (A commit or a scheduled delivery into a
    /// topic deleted meanwhile re-creates it regardless: what was accepted is not lost.)
    pub(super) fn create_topic_capped(
        &mut self,
        name: String,
        stage: &mut Stage,
    ) -> Result<Arc<Topic>> {
        let count =
            (self.topics.len() + stage.new_topics.len()).saturating_sub(stage.deleted.len());
        if count >= self.config.max_topics {
            self.metrics
                .limit_refusals
                .with_label_values(&["topics"])
                .inc();
            return Err(Error::LimitReached(format!(
                "topic {name:?} not created: the broker has {count} topics, its max-topics \
                 ({}); delete topics or raise the setting",
                self.config.max_topics
            )));
        }
        Ok(self.create_topic(name, stage))
    }

    pub(super) fn create_topic(&mut self, name: String, stage: &mut Stage) -> Arc<Topic> {
        stage.first_topic_id.get_or_insert(self.next_topic_id);
        let record = TopicRecord {
            id: self.next_topic_id,
            created_ms: self.clock.now(),
            ..Default::default()
        };
        self.next_topic_id += 1;
        let meta = self.storage.cf(Cf::Meta);
        stage
            .batch
            .put_cf(meta, keys::topic(&name), record.encode_to_vec());
        // Ids are never reused, also not the last one's after it is deleted.
        stage
            .batch
            .put_cf(meta, keys::NEXT_TOPIC_ID, self.next_topic_id.to_be_bytes());
        let topic = Arc::new(Topic::new(name, record.id, record.created_ms, 0));
        stage.new_topics.push(topic.clone());
        topic
    }

    /// Stores a topic's record with `start` as its first offset, or the start a
    /// retention staged in this batch, if later (memory moves only once it is written,
    /// and an older start stored after it would let a restart reuse offsets).
    pub(super) fn put_topic(&self, topic: &Topic, start: u64, stage: &mut Stage) {
        let staged = stage
            .starts
            .iter()
            .filter(|(t, _)| t.id == topic.id)
            .map(|(_, s)| *s)
            .max()
            .unwrap_or(0);
        let record = TopicRecord {
            start: start.max(staged),
            ..topic.record()
        };
        stage.batch.put_cf(
            self.storage.cf(Cf::Meta),
            keys::topic(&topic.name),
            record.encode_to_vec(),
        );
    }

    /// Removes a topic's messages below `to` in one range delete, and moves its start
    /// there. Never past what was written: a message not yet durable is not retention's.
    pub(super) fn retain(
        &mut self,
        topic: &Arc<Topic>,
        to: u64,
        stage: &mut Stage,
    ) -> Result<Outcome> {
        Self::alive(topic)?;
        let from = topic.start();
        let end = self.next_offset.get(&topic.id).copied().unwrap_or(0);
        let to = to.min(end);
        if to <= from {
            return Ok(Outcome::Done);
        }
        stage.batch.delete_range_cf(
            self.storage.cf(Cf::Log),
            keys::log(topic.id, from),
            keys::log(topic.id, to),
        );
        self.put_topic(topic, to, stage);
        stage.starts.push((topic.clone(), to));
        stage.removed += to - from;
        Ok(Outcome::Done)
    }

    /// Resolves every message's topic first, so a refusal stages nothing.
    pub(super) fn topics_for(
        &mut self,
        messages: &[pb::Message],
        stage: &mut Stage,
    ) -> Result<Vec<Arc<Topic>>> {
        let mut missing = Vec::new();
        for m in messages {
            if self.topic(&m.topic, stage).is_none() && !missing.contains(&m.topic) {
                if !self.config.auto_create_topics {
                    return Err(Error::TopicNotFound(m.topic.clone()));
                }
                missing.push(m.topic.clone());
            }
        }
        for name in missing {
            self.create_topic_capped(name, stage)?;
        }
        Ok(messages
            .iter()
            .map(|m| self.topic(&m.topic, stage).expect("resolved above"))
            .collect())
    }

    pub(super) fn next_offset(&self, topic: u32, stage: &mut Stage) -> u64 {
        let slot = stage
            .next_offset
            .entry(topic)
            .or_insert_with(|| self.next_offset.get(&topic).copied().unwrap_or(0));
        let offset = *slot;
        *slot += 1;
        offset
    }

    pub(super) fn append_one(
        &self,
        topic: &Topic,
        mut msg: pb::StoredMessage,
        stage: &mut Stage,
    ) -> pb::MessageReceipt {
        msg.offset = self.next_offset(topic.id, stage);
        stage.batch.put_cf(
            self.storage.cf(Cf::Log),
            keys::log(topic.id, msg.offset),
            msg.encode_to_vec(),
        );
        // The indexes, in the same batch: never behind the log.
        if let Some(id) = Id::parse(&msg.message_id) {
            stage.batch.put_cf(
                self.storage.cf(Cf::MsgId),
                id.to_bytes(),
                keys::location(topic.id, msg.offset),
            );
        }
        if !msg.key.is_empty() {
            stage.batch.put_cf(
                self.storage.cf(Cf::MsgKey),
                keys::msgkey(topic.id, &msg.key, msg.offset),
                [],
            );
        }
        pb::MessageReceipt {
            message_id: msg.message_id,
            topic: msg.topic,
            offset: msg.offset,
            deliver_ms: 0,
        }
    }

    pub(super) fn stored(&self, m: pb::Message, now: u64) -> pb::StoredMessage {
        pb::StoredMessage {
            topic: m.topic,
            offset: 0,
            // A scheduled message can be cancelled by id: not a guessable one.
            message_id: if m.deliver_at_ms > now {
                self.ids.next_secret()
            } else {
                self.ids.next()
            }
            .to_string(),
            key: m.key,
            tag: m.tag,
            properties: m.properties,
            body: m.body,
            born_ms: m.born_ms,
            store_ms: now,
            txn_id: String::new(),
            deliver_ms: m.deliver_at_ms,
            message_group: m.message_group,
        }
    }

    pub(super) fn append(
        &mut self,
        mut messages: Vec<pb::Message>,
        scope: &KeyScope,
        stage: &mut Stage,
    ) -> Result<Outcome> {
        let topics = self.topics_for(&messages, stage)?;
        let now = self.clock.now();
        let window = self.storage.dedup_window_ms();
        if window == 0 || messages.iter().all(|m| m.idempotency_key.is_empty()) {
            // No keys (the common case): nothing to look up or record.
            let receipts: Vec<_> = messages
                .into_iter()
                .zip(topics)
                .map(|(m, t)| {
                    let stored = self.stored(m, now);
                    self.append_or_schedule(&t, stored, now, stage)
                })
                .collect();
            stage.tally.sent += receipts.len() as u64;
            return Ok(Outcome::Stored(receipts));
        }
        // Every lookup and every refusal before anything is staged: a failed read or a
        // conflict leaves the batch as it was.
        let mut keyed: Vec<Option<(Vec<u8>, dedup::Digest)>> = Vec::with_capacity(messages.len());
        let mut earlier = Vec::with_capacity(messages.len());
        let mut in_request: FxHashMap<Vec<u8>, dedup::Digest> = FxHashMap::default();
        for (m, t) in messages.iter_mut().zip(&topics) {
            let name = std::mem::take(&mut m.idempotency_key);
            if name.is_empty() {
                keyed.push(None);
                earlier.push(None);
                continue;
            }
            let key = dedup::key(t.id, scope, &name);
            let digest = dedup::digest(m);
            // Stored by this batch, or earlier: either is what a repeat repeats.
            let seen = match stage.dedup.get(&key) {
                Some((receipt, d)) => Some(dedup::Entry {
                    stored_ms: now,
                    digest: Some(*d),
                    receipt: receipt.clone(),
                }),
                None => self.storage.dedup_lookup(&key, now)?,
            };
            let first_in_request = in_request.get(&key).copied();
            let conflict = seen.as_ref().is_some_and(|e| !e.same(&digest))
                || first_in_request.is_some_and(|d| d != digest);
            if conflict && *scope == KeyScope::Topic {
                let named = seen.as_ref().map_or_else(
                    || "an earlier message of this request".to_string(),
                    |e| {
                        format!(
                            "message {} (offset {})",
                            e.receipt.message_id, e.receipt.offset
                        )
                    },
                );
                return Err(Error::IdempotencyConflict(format!(
                    "idempotency key {name:?} of topic {:?} was used for {named} with other \
                     content (body, properties, key, tag, message group or delivery time) \
                     within the dedup window; a repeat must be the same message. Nothing \
                     of this request was stored",
                    t.name
                )));
            }
            in_request.entry(key.clone()).or_insert(digest);
            if conflict {
                // Another client's message under the same id: a message of its own.
                stage.tally.dedup_conflicts += 1;
                keyed.push(None);
                earlier.push(None);
                continue;
            }
            keyed.push(Some((key, digest)));
            earlier.push(seen.map(|e| e.receipt));
        }
        let mut receipts = Vec::with_capacity(messages.len());
        for (((m, t), key), earlier) in messages.into_iter().zip(topics).zip(keyed).zip(earlier) {
            // A repeat within this request is found staged by its first.
            let earlier = earlier.or_else(|| {
                key.as_ref()
                    .and_then(|(k, _)| stage.dedup.get(k).map(|(r, _)| r.clone()))
            });
            if let Some(receipt) = earlier {
                stage.tally.deduplicated += 1;
                receipts.push(receipt);
                continue;
            }
            let stored = self.stored(m, now);
            let receipt = self.append_or_schedule(&t, stored, now, stage);
            stage.tally.sent += 1;
            if let Some((key, digest)) = key {
                stage.batch.put_cf(
                    self.storage.cf(Cf::Dedup),
                    &key,
                    dedup::value(now, &digest, &receipt),
                );
                stage.dedup.insert(key, (receipt.clone(), digest));
            }
            receipts.push(receipt);
        }
        Ok(Outcome::Stored(receipts))
    }
}
