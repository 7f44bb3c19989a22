//! The writer's part for topics: creating them, offsets, and appending visible messages.

use std::sync::Arc;

use prost::Message;
use txmq_protocol::pb;

use super::{Outcome, Stage, Writer};
use crate::error::{Error, Result};
use crate::ids::Id;
use crate::storage::Cf;
use crate::storage::records::{DeletedTopicRecord, TopicRecord};
use crate::storage::{dedup, keys};
use crate::topics::Topic;

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
        stage: &mut Stage,
    ) -> Result<Outcome> {
        Self::alive(topic)?;
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
            deleted_ms: txmq_protocol::now_ms(),
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
        if force {
            self.doomed.insert(topic.name.clone(), fence);
        }
        stage.removed += end.saturating_sub(topic.start());
        Ok(Outcome::TopicDeleted {
            messages: end.saturating_sub(topic.start()),
            fence,
        })
    }

    pub(super) fn create_topic(&mut self, name: String, stage: &mut Stage) -> Arc<Topic> {
        stage.first_topic_id.get_or_insert(self.next_topic_id);
        let record = TopicRecord {
            id: self.next_topic_id,
            created_ms: txmq_protocol::now_ms(),
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
            self.create_topic(name, stage);
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
        stage: &mut Stage,
    ) -> Result<Outcome> {
        let topics = self.topics_for(&messages, stage)?;
        let now = txmq_protocol::now_ms();
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
        // Every lookup before anything is staged: a failed read leaves the batch as it
        // was.
        let mut keys = Vec::with_capacity(messages.len());
        let mut seen = Vec::with_capacity(messages.len());
        for (m, t) in messages.iter_mut().zip(&topics) {
            let key = std::mem::take(&mut m.idempotency_key);
            // A key this batch stored is looked up below, once this request's earlier
            // messages are staged.
            let in_storage =
                window > 0 && !key.is_empty() && !stage.dedup.contains_key(&(t.id, key.clone()));
            let earlier = if in_storage {
                self.storage.dedup_lookup(t.id, &key, now)?
            } else {
                None
            };
            keys.push((window > 0 && !key.is_empty()).then_some(key));
            seen.push(earlier);
        }
        let mut receipts = Vec::with_capacity(messages.len());
        for (((m, t), key), earlier) in messages.into_iter().zip(topics).zip(keys).zip(seen) {
            let earlier = earlier.or_else(|| {
                key.as_ref()
                    .and_then(|k| stage.dedup.get(&(t.id, k.clone())).cloned())
            });
            if let Some(receipt) = earlier {
                stage.tally.deduplicated += 1;
                receipts.push(receipt);
                continue;
            }
            let stored = self.stored(m, now);
            let receipt = self.append_or_schedule(&t, stored, now, stage);
            stage.tally.sent += 1;
            if let Some(key) = key {
                stage.batch.put_cf(
                    self.storage.cf(Cf::Dedup),
                    dedup::key(t.id, &key),
                    dedup::value(now, &receipt),
                );
                stage.dedup.insert((t.id, key), receipt.clone());
            }
            receipts.push(receipt);
        }
        Ok(Outcome::Stored(receipts))
    }
}
