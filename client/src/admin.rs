//! Operator views and control: topics, transactions, groups, dead letters.

use txmq_protocol::pb::{self, frame::Body};

use crate::connection::{self, Connection};
use crate::error::{Error, Result};

/// Entries asked for per page of a listing (the broker's most).
const PAGE: u32 = 1000;

/// What to change of a topic's settings (`None`: it stays; 0: the broker's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopicChange {
    /// Retention by age, ms.
    pub retention_ms: Option<u64>,
    /// Retention by size, bytes.
    pub retention_bytes: Option<u64>,
    /// The queues RocketMQ clients see (1 to 64).
    pub queues: Option<u32>,
}

/// An operator's connection.
#[derive(Debug, Clone)]
pub struct Admin {
    pub(crate) conn: Connection,
}

macro_rules! expect {
    ($value:expr, $variant:ident) => {
        match $value {
            pb::response::Result::$variant(x) => Ok(x),
            other => Err(Error::Unexpected(format!("{other:?}"))),
        }
    };
}

impl Admin {
    /// Connects.
    ///
    /// # Errors
    /// Unreachable broker or refused handshake.
    pub async fn connect(addr: &str, auth_token: &str) -> Result<Self> {
        Self::connect_as(addr, auth_token, None).await
    }

    /// Connects as `user` (SCRAM-SHA-256), or without one.
    ///
    /// # Errors
    /// Unreachable broker, a bad user or secret, or a refused handshake.
    pub async fn connect_as(
        addr: &str,
        auth_token: &str,
        user: Option<&connection::User>,
    ) -> Result<Self> {
        Self::connect_secure(addr, auth_token, user, None).await
    }

    /// [`Admin::connect_as`] over TLS with `tls`.
    ///
    /// # Errors
    /// As [`Admin::connect_as`]; an untrusted or misnamed broker certificate.
    pub async fn connect_secure(
        addr: &str,
        auth_token: &str,
        user: Option<&connection::User>,
        tls: Option<&crate::tls::Tls>,
    ) -> Result<Self> {
        let hello = connection::hello(pb::Role::Admin, "", auth_token);
        let (conn, _) =
            Connection::open_as(addr, hello, user, tls, connection::CALL_TIMEOUT).await?;
        Ok(Self { conn })
    }

    /// Creates a topic.
    ///
    /// # Errors
    /// Bad name, or `TOPIC_EXISTS` with `fail_if_exists`.
    pub async fn create_topic(&self, topic: &str, fail_if_exists: bool) -> Result<pb::TopicInfo> {
        self.create_topic_with(topic, fail_if_exists, (0, 0), 0)
            .await
    }

    /// Creates a topic with its own settings: retention by age in ms and by size in
    /// bytes, and the queues RocketMQ clients see (each 0: the broker's).
    ///
    /// # Errors
    /// Bad name, more than 64 queues, or `TOPIC_EXISTS` with `fail_if_exists`.
    pub async fn create_topic_with(
        &self,
        topic: &str,
        fail_if_exists: bool,
        (retention_ms, retention_bytes): (u64, u64),
        queues: u32,
    ) -> Result<pb::TopicInfo> {
        let r = self
            .conn
            .call(Body::CreateTopic(pb::CreateTopicRequest {
                topic: topic.to_string(),
                fail_if_exists,
                retention_ms,
                retention_bytes,
                queues,
            }))
            .await?;
        expect!(r, Topic)
    }

    /// Changes what `change` sets of a topic's settings; the rest stays.
    ///
    /// # Errors
    /// `TOPIC_NOT_FOUND`, more than 64 queues.
    pub async fn alter_topic(&self, topic: &str, change: TopicChange) -> Result<pb::TopicInfo> {
        let r = self
            .conn
            .call(Body::ChangeTopic(pb::ChangeTopicRequest {
                topic: topic.to_string(),
                retention_ms: change.retention_ms,
                retention_bytes: change.retention_bytes,
                queues: change.queues,
            }))
            .await?;
        expect!(r, Topic)
    }

    /// Every topic, by name (fetched a page at a time).
    ///
    /// # Errors
    /// Connection lost.
    pub async fn topics(&self) -> Result<Vec<pb::TopicInfo>> {
        let mut all: Vec<pb::TopicInfo> = Vec::new();
        loop {
            let after = all.last().map(|t| t.name.clone()).unwrap_or_default();
            let r = self
                .conn
                .call(Body::ListTopics(pb::ListTopicsRequest {
                    after,
                    limit: PAGE,
                }))
                .await?;
            let page = expect!(r, Topics)?.topics;
            let done = page.len() < PAGE as usize;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// Transactions in a state (`Unspecified`: all) and group (empty: all), at most
    /// `limit` of them (0: the broker's default, 1,000), oldest id first.
    ///
    /// # Errors
    /// Connection lost.
    pub async fn transactions(
        &self,
        state: pb::TxnState,
        group: &str,
        limit: u32,
    ) -> Result<pb::ListTxnsOk> {
        self.transactions_after(state, group, limit, "").await
    }

    /// The page of [`Admin::transactions`] after transaction `after` (the last id of the
    /// previous page; empty for the first page).
    ///
    /// # Errors
    /// Connection lost, or `after` is not a transaction id.
    pub async fn transactions_after(
        &self,
        state: pb::TxnState,
        group: &str,
        limit: u32,
        after: &str,
    ) -> Result<pb::ListTxnsOk> {
        let r = self
            .conn
            .call(Body::ListTxns(pb::ListTxnsRequest {
                state: state as i32,
                producer_group: group.to_string(),
                limit,
                after_txn_id: after.to_string(),
            }))
            .await?;
        expect!(r, Txns)
    }

    /// Commits or rolls back a transaction as an operator.
    ///
    /// # Errors
    /// Not found, or a conflicting resolution.
    pub async fn resolve(&self, txn_id: &str, commit: bool) -> Result<pb::EndTxnOk> {
        let outcome = if commit {
            pb::TxnOutcome::Commit
        } else {
            pb::TxnOutcome::Rollback
        };
        let r = self
            .conn
            .call(Body::EndTxn(pb::EndTxnRequest {
                txn_id: txn_id.to_string(),
                outcome: outcome as i32,
                operator: true,
            }))
            .await?;
        expect!(r, EndTxn)
    }

    /// Re-arms a discarded transaction: checked again from a count of zero.
    ///
    /// # Errors
    /// Not found, or already resolved.
    pub async fn rearm(&self, txn_id: &str) -> Result<pb::TxnInfo> {
        let r = self
            .conn
            .call(Body::RearmTxn(pb::RearmTxnRequest {
                txn_id: txn_id.to_string(),
            }))
            .await?;
        expect!(r, Txn)
    }

    /// A group's state per topic.
    ///
    /// # Errors
    /// Unknown group.
    pub async fn describe_group(&self, group: &str) -> Result<pb::DescribeGroupOk> {
        let r = self
            .conn
            .call(Body::DescribeGroup(pb::DescribeGroupRequest {
                group: group.to_string(),
            }))
            .await?;
        expect!(r, Group)
    }

    /// Scheduled messages waiting for their time (of `topic` only, unless empty),
    /// earliest first, at most `limit` of them (0: all), fetched a page at a time.
    ///
    /// # Errors
    /// Connection lost, bad topic name.
    pub async fn scheduled(&self, topic: &str, limit: usize) -> Result<Vec<pb::ScheduledInfo>> {
        let mut all = Vec::new();
        let (mut after_deliver_ms, mut after_message_id) = (0, String::new());
        loop {
            let r = self
                .conn
                .call(Body::ListScheduled(pb::ListScheduledRequest {
                    topic: topic.to_string(),
                    limit: PAGE,
                    after_deliver_ms,
                    after_message_id: after_message_id.clone(),
                }))
                .await?;
            let page = expect!(r, Scheduled)?;
            all.extend(page.scheduled);
            if limit > 0 && all.len() >= limit {
                all.truncate(limit);
                return Ok(all);
            }
            if !page.more {
                return Ok(all);
            }
            // From the last entry the broker looked at, which a topic filter may have
            // skipped.
            (after_deliver_ms, after_message_id) = (page.resume_deliver_ms, page.resume_message_id);
        }
    }

    /// A group's dead letters, at most `limit` of them (0: all), fetched a page at a time.
    ///
    /// # Errors
    /// Connection lost.
    pub async fn dead_letters(&self, group: &str, limit: usize) -> Result<Vec<pb::DeadLetter>> {
        let mut all: Vec<pb::DeadLetter> = Vec::new();
        loop {
            let (after_topic, after_offset) = all
                .last()
                .map(|d| (d.topic.clone(), d.offset))
                .unwrap_or_default();
            let r = self
                .conn
                .call(Body::ListDeadLetters(pb::ListDeadLettersRequest {
                    group: group.to_string(),
                    limit: PAGE,
                    after_topic,
                    after_offset,
                }))
                .await?;
            let page = expect!(r, DeadLetters)?;
            // A page may stop short of the limit (in bytes): only `more` says it is the end.
            let done = !page.more;
            all.extend(page.dead_letters);
            if limit > 0 && all.len() >= limit {
                all.truncate(limit);
                return Ok(all);
            }
            if done {
                return Ok(all);
            }
        }
    }

    /// Moves a group's position on a topic (stop its consumers first): everything from
    /// there on is delivered again, nothing below. Returns the offset it starts from.
    ///
    /// # Errors
    /// `GROUP_NOT_FOUND`, `TOPIC_NOT_FOUND`, `INVALID_REQUEST` while consumers are
    /// connected.
    pub async fn reset_group(&self, group: &str, topic: &str, to: ResetTo) -> Result<u64> {
        use pb::reset_group_request::To;
        let to = match to {
            ResetTo::Earliest => To::Earliest(true),
            ResetTo::Latest => To::Latest(true),
            ResetTo::Offset(o) => To::Offset(o),
            ResetTo::Time(at) => To::TimeMs(
                at.duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            ),
        };
        let r = self
            .conn
            .call(Body::ResetGroup(pb::ResetGroupRequest {
                group: group.to_string(),
                topic: topic.to_string(),
                to: Some(to),
            }))
            .await?;
        Ok(expect!(r, ResetGroup)?.offset)
    }

    /// Deletes a consumer group (stop its consumers first): its position, acks, retries
    /// and dead letters on every topic. Returns how many topics it was on.
    ///
    /// # Errors
    /// `GROUP_NOT_FOUND`, `INVALID_REQUEST` while consumers are connected.
    pub async fn delete_group(&self, group: &str) -> Result<u32> {
        let r = self
            .conn
            .call(Body::DeleteGroup(pb::DeleteGroupRequest {
                group: group.to_string(),
            }))
            .await?;
        Ok(expect!(r, DeleteGroup)?.topics)
    }

    /// Deletes a topic: its messages, every group's position, acks, retries and dead
    /// letters on it, and its scheduled messages not yet due. Refused while transactions
    /// with messages for it are open or consumers are subscribed to it, unless `force`
    /// (then those transactions are rolled back and those consumers dropped).
    ///
    /// # Errors
    /// `TOPIC_NOT_FOUND`; `INVALID_REQUEST` naming what is open.
    pub async fn delete_topic(&self, topic: &str, force: bool) -> Result<pb::DeleteTopicOk> {
        let r = self
            .conn
            .call(Body::DeleteTopic(pb::DeleteTopicRequest {
                topic: topic.to_string(),
                force,
            }))
            .await?;
        expect!(r, DeleteTopic)
    }

    /// A message by id, with its life: the transaction it came from and what each group
    /// of its topic did with it. Its body comes only with `body`.
    ///
    /// # Errors
    /// `MESSAGE_NOT_FOUND`; `INVALID_REQUEST` for a malformed id.
    pub async fn show_message(&self, message_id: &str, body: bool) -> Result<pb::ShowMessageOk> {
        let r = self
            .conn
            .call(Body::ShowMessage(pb::ShowMessageRequest {
                message_id: message_id.to_string(),
                body,
            }))
            .await?;
        expect!(r, ShowMessage)
    }

    /// One page of a topic's messages by key and stored time (see
    /// [`Admin::find_messages`] for all of them).
    ///
    /// # Errors
    /// `TOPIC_NOT_FOUND`; `INVALID_REQUEST` for an empty time range.
    pub async fn find_messages_page(
        &self,
        query: pb::FindMessagesRequest,
    ) -> Result<pb::FindMessagesOk> {
        let r = self.conn.call(Body::FindMessages(query)).await?;
        expect!(r, FindMessages)
    }

    /// A topic's messages matching `query` (its key, since and until), in offset order,
    /// at most `limit` (0: all), fetched a page at a time.
    ///
    /// # Errors
    /// As [`Admin::find_messages_page`].
    pub async fn find_messages(
        &self,
        mut query: pb::FindMessagesRequest,
        limit: usize,
    ) -> Result<Vec<pb::FoundMessage>> {
        let mut out = Vec::new();
        loop {
            let page = self.find_messages_page(query.clone()).await?;
            out.extend(page.messages);
            if limit > 0 && out.len() >= limit {
                out.truncate(limit);
                return Ok(out);
            }
            if !page.more {
                return Ok(out);
            }
            query.from_offset = page.next_offset;
        }
    }

    /// Puts dead letters back for delivery: one by message id, or all.
    ///
    /// # Errors
    /// Connection lost.
    pub async fn redrive(&self, group: &str, message_id: Option<&str>) -> Result<u32> {
        let r = self
            .conn
            .call(Body::Redrive(pb::RedriveRequest {
                group: group.to_string(),
                message_id: message_id.unwrap_or_default().to_string(),
            }))
            .await?;
        Ok(expect!(r, Redrive)?.redriven)
    }

    /// Every consumer group on every topic it subscribed to, with its lag.
    ///
    /// # Errors
    /// Connection lost.
    pub async fn groups(&self) -> Result<Vec<pb::GroupSummary>> {
        let mut all: Vec<pb::GroupSummary> = Vec::new();
        loop {
            let (after_group, after_topic) = all
                .last()
                .map(|g| (g.group.clone(), g.topic.clone()))
                .unwrap_or_default();
            let r = self
                .conn
                .call(Body::ListGroups(pb::ListGroupsRequest {
                    after_group,
                    after_topic,
                    limit: PAGE,
                }))
                .await?;
            let page = expect!(r, Groups)?.groups;
            let done = page.len() < PAGE as usize;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// Broker-wide figures (counters since the broker started).
    ///
    /// # Errors
    /// Connection lost.
    pub async fn stats(&self) -> Result<pb::StatsOk> {
        let r = self.conn.call(Body::Stats(pb::StatsRequest {})).await?;
        expect!(r, Stats)
    }

    /// The broker group as its leader sees it: members, term, progress and lag.
    ///
    /// # Errors
    /// The broker is not part of a group (`INVALID_REQUEST`).
    pub async fn cluster_status(&self) -> Result<pb::ClusterStatusOk> {
        let r = self
            .conn
            .call(Body::ClusterStatus(pb::ClusterStatusRequest {}))
            .await?;
        expect!(r, Cluster)
    }

    /// Adds node `id`, which the nodes reach at `peer_addr` (its `--peers` entry): a
    /// learner at once, a voter once it has caught up. Start it first, with the group's
    /// peers and itself in `--peers`.
    ///
    /// # Errors
    /// Already a member, or the broker is not part of a group.
    pub async fn cluster_add(&self, id: u64, peer_addr: &str) -> Result<pb::ClusterStatusOk> {
        self.cluster_change(pb::cluster_change_request::Action::Add, id, peer_addr)
            .await
    }

    /// Removes node `id` from the group.
    ///
    /// # Errors
    /// Not a member, the last voter, or the broker is not part of a group.
    pub async fn cluster_remove(&self, id: u64) -> Result<pb::ClusterStatusOk> {
        self.cluster_change(pb::cluster_change_request::Action::Remove, id, "")
            .await
    }

    /// Hands the group's leadership to voter `id` (before maintenance of the leader);
    /// the connection then ends, as the old leader stops serving.
    ///
    /// # Errors
    /// Not a voter, or the broker is not part of a group.
    pub async fn cluster_transfer(&self, id: u64) -> Result<pb::ClusterStatusOk> {
        self.cluster_change(pb::cluster_change_request::Action::Transfer, id, "")
            .await
    }

    async fn cluster_change(
        &self,
        action: pb::cluster_change_request::Action,
        node_id: u64,
        peer_addr: &str,
    ) -> Result<pb::ClusterStatusOk> {
        let r = self
            .conn
            .call(Body::ClusterChange(pb::ClusterChangeRequest {
                action: action as i32,
                node_id,
                peer_addr: peer_addr.to_string(),
            }))
            .await?;
        expect!(r, Cluster)
    }
}

/// Where [`Admin::reset_group`] moves a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The oldest message kept.
    Earliest,
    /// After the newest: only what comes from now on.
    Latest,
    /// This offset.
    Offset(u64),
    /// The first message stored at or after this time.
    Time(std::time::SystemTime),
}
