//! Values the broker stores besides messages, as small protobuf records: cheap to encode,
//! and new fields can be added without a migration.

/// `meta` `topic/<name>`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TopicRecord {
    /// Short id used in log keys.
    #[prost(uint32, tag = "1")]
    pub id: u32,
    /// Broker clock at creation.
    #[prost(uint64, tag = "2")]
    pub created_ms: u64,
    /// First offset still in the log: retention removed everything below.
    #[prost(uint64, tag = "3")]
    pub start: u64,
    /// Retention by age for this topic, ms (0: the broker's).
    #[prost(uint64, tag = "4")]
    pub retention_ms: u64,
    /// Retention by size for this topic, bytes (0: the broker's).
    #[prost(uint64, tag = "5")]
    pub retention_bytes: u64,
    /// The queues RocketMQ clients see (0: the broker's `remoting-queues`).
    #[prost(uint32, tag = "6")]
    pub queues: u32,
}

/// `meta` `deleted-topic/<id>`: a topic that was deleted. Its id is never used again, and
/// whatever is still keyed by it is garbage.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeletedTopicRecord {
    /// The name it had.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Broker clock at deletion.
    #[prost(uint64, tag = "2")]
    pub deleted_ms: u64,
    /// A transaction id made right after it: every transaction and scheduled message
    /// made before the deletion has a smaller id (what its cleanup may touch).
    #[prost(bytes = "vec", tag = "3")]
    pub fence: Vec<u8>,
    /// Deleted with `--force`: its open transactions are rolled back.
    #[prost(bool, tag = "4")]
    pub force: bool,
    /// Its cleanup (groups' state, scheduled messages, transactions) is done; until
    /// then every start of the broker runs it again.
    #[prost(bool, tag = "5")]
    pub cleaned: bool,
}

/// `txn`: one transaction, whatever its state. The half messages live in `half` and are
/// never rewritten: a check updates only this small record and its due-index entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnRecord {
    /// Producer group that owns it.
    #[prost(string, tag = "1")]
    pub group: String,
    /// `pb::TxnState` as i32.
    #[prost(int32, tag = "2")]
    pub state: i32,
    /// Broker clock at the first half message.
    #[prost(uint64, tag = "3")]
    pub created_ms: u64,
    /// Counted check-backs (a producer received the request).
    #[prost(uint32, tag = "4")]
    pub check_count: u32,
    /// When the next check is due (0 when none is scheduled).
    #[prost(uint64, tag = "5")]
    pub next_check_ms: u64,
    /// `pb::TxnOutcome` of the last check, as i32.
    #[prost(int32, tag = "6")]
    pub last_result: i32,
    /// What happened at the last check, for operators.
    #[prost(string, tag = "7")]
    pub last_note: String,
    /// Distinct topics of its messages.
    #[prost(string, repeated, tag = "8")]
    pub topics: Vec<String>,
    /// Half messages held.
    #[prost(uint32, tag = "9")]
    pub message_count: u32,
    /// Broker clock at resolution (0 while prepared or discarded).
    #[prost(uint64, tag = "10")]
    pub resolved_ms: u64,
    /// When the purge of a resolved record is due.
    #[prost(uint64, tag = "11")]
    pub purge_ms: u64,
    /// Encoded size of its half messages, capped by `max-txn-bytes`.
    #[prost(uint64, tag = "12")]
    pub bytes: u64,
    /// Prepared by a broker that routes check-backs by scope (`txmq-check-scope`): an
    /// unscoped transaction is then checked only by producers that declared no scope.
    /// Older records (false) may be checked by any, as before.
    #[prost(bool, tag = "13")]
    pub scoped_checks: bool,
    /// Ends it refused that no client was told of (a one-way END_TRANSACTION that
    /// conflicts with how it ended).
    #[prost(uint32, tag = "14")]
    pub refused_ends: u32,
    /// The last of those, for operators.
    #[prost(string, tag = "15")]
    pub refused_note: String,
}

/// `cursor`: a consumer group's progress on one topic.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CursorRecord {
    /// Every offset below it is acknowledged.
    #[prost(uint64, tag = "1")]
    pub ack_floor: u64,
    /// Tag filter of the last subscription.
    #[prost(string, tag = "2")]
    pub tag_filter: String,
    /// Group override of max attempts (0: broker default).
    #[prost(uint32, tag = "3")]
    pub max_attempts: u32,
    /// An ordered (FIFO) group, fixed by its first subscription.
    #[prost(bool, tag = "4")]
    pub ordered: bool,
    /// Messages retention removed before this group acked them.
    #[prost(uint64, tag = "5")]
    pub skipped: u64,
    /// Where the group started (its first subscription, or its last reset): messages
    /// below were never this group's to receive.
    #[prost(uint64, tag = "6")]
    pub first_offset: u64,
}

/// `retry`: a message that failed delivery and waits to be delivered again.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RetryRecord {
    /// Deliveries so far.
    #[prost(uint32, tag = "1")]
    pub attempts: u32,
    /// Not to be delivered before this time.
    #[prost(uint64, tag = "2")]
    pub due_ms: u64,
}

/// `dlq`: a message a group gave up on.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeadLetterRecord {
    /// Topic name (the message itself stays in the topic log).
    #[prost(string, tag = "1")]
    pub topic: String,
    /// Offset in the topic log.
    #[prost(uint64, tag = "2")]
    pub offset: u64,
    /// Why it was given up.
    #[prost(string, tag = "3")]
    pub reason: String,
    /// Deliveries made.
    #[prost(uint32, tag = "4")]
    pub attempts: u32,
    /// Broker clock when it was dead-lettered.
    #[prost(uint64, tag = "5")]
    pub dead_ms: u64,
}

/// `sched`: a scheduled message by id. While it waits, it holds the whole message; once
/// delivered or cancelled, only what became of it, until `forget_ms`, so that a late
/// cancel can say what happened.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SchedRecord {
    /// The message, while it waits (its `deliver_ms` set).
    #[prost(message, optional, tag = "1")]
    pub message: Option<txmq_protocol::pb::StoredMessage>,
    /// When it is (or was) due.
    #[prost(uint64, tag = "2")]
    pub deliver_ms: u64,
    /// Its topic.
    #[prost(string, tag = "3")]
    pub topic: String,
    /// [`SchedState`] as i32.
    #[prost(int32, tag = "4")]
    pub state: i32,
    /// Where it landed, once delivered.
    #[prost(uint64, tag = "5")]
    pub offset: u64,
    /// When the record of a delivered or cancelled message is removed.
    #[prost(uint64, tag = "6")]
    pub forget_ms: u64,
}

/// What became of a scheduled message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum SchedState {
    /// Not yet due.
    Waiting = 0,
    /// Appended to its topic at its time.
    Delivered = 1,
    /// Cancelled before its time.
    Cancelled = 2,
}

impl SchedRecord {
    /// Its state (an unknown number reads as waiting, which keeps the message).
    pub fn state(&self) -> SchedState {
        match self.state {
            1 => SchedState::Delivered,
            2 => SchedState::Cancelled,
            _ => SchedState::Waiting,
        }
    }
}

/// `meta` `user/<name>`: a user and what the broker keeps of its secret (the SCRAM
/// stored and server keys, never the secret).
#[derive(Clone, PartialEq, prost::Message)]
pub struct UserRecord {
    /// A super user holds every permission.
    #[prost(bool, tag = "1")]
    pub superuser: bool,
    /// SCRAM salt.
    #[prost(bytes = "vec", tag = "2")]
    pub salt: Vec<u8>,
    /// SCRAM iterations.
    #[prost(uint32, tag = "3")]
    pub iterations: u32,
    /// SCRAM stored key.
    #[prost(bytes = "vec", tag = "4")]
    pub stored_key: Vec<u8>,
    /// SCRAM server key.
    #[prost(bytes = "vec", tag = "5")]
    pub server_key: Vec<u8>,
    /// Broker clock at creation.
    #[prost(uint64, tag = "6")]
    pub created_ms: u64,
    /// Broker clock at the last change of its secret (sessions authenticated before it
    /// are refused).
    #[prost(uint64, tag = "7")]
    pub changed_ms: u64,
    /// The secret sealed under the broker's seal key, for the gRPC face's HMAC (empty
    /// when the broker had no key): see `auth::seal`.
    #[prost(bytes = "vec", tag = "8")]
    pub sealed_secret: Vec<u8>,
}

/// `meta` `rule/<id>`: one permission rule.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RuleRecord {
    /// The user it is for.
    #[prost(string, tag = "1")]
    pub user: String,
    /// `topic:NAME`, `group:NAME`, `producer-group:NAME` or `cluster` (NAME: exact, a
    /// prefix ending in `*`, or `*`).
    #[prost(string, tag = "2")]
    pub resource: String,
    /// Action names.
    #[prost(string, repeated, tag = "3")]
    pub actions: Vec<String>,
    /// A deny rule (a deny wins over any allow).
    #[prost(bool, tag = "4")]
    pub deny: bool,
    /// Only from this source (CIDR); empty: from anywhere.
    #[prost(string, tag = "5")]
    pub source: String,
    /// Broker clock at creation.
    #[prost(uint64, tag = "6")]
    pub created_ms: u64,
}
