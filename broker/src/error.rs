//! The broker's error type, and how each error reads on the wire.

use txmq_protocol::ErrorCode;

/// Everything that can go wrong serving a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A request that is well-formed protobuf but not valid.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A bad topic or group name.
    #[error("{0}")]
    InvalidName(String),
    /// Unknown topic with auto-creation off.
    #[error("topic {0:?} does not exist")]
    TopicNotFound(String),
    /// Topic exists already.
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    /// Body or properties over the limit.
    #[error("{0}")]
    TooLarge(String),
    /// No such transaction.
    #[error("transaction {0} not found")]
    TxnNotFound(String),
    /// Rollback after commit.
    #[error("transaction {0} is already committed")]
    TxnCommitted(String),
    /// Commit after rollback.
    #[error("transaction {0} is already rolled back")]
    TxnRolledBack(String),
    /// Re-arm of a transaction in a state that cannot be re-armed.
    #[error("transaction {0} cannot be re-armed: it is {1}")]
    TxnNotRearmable(String, &'static str),
    /// Ack/nack/extend of a handle the broker holds no lease for.
    #[error("no lease for {0}: it expired and was redelivered, or was never delivered")]
    LeaseNotFound(String),
    /// RocksDB failed.
    #[error("storage: {0}")]
    Storage(#[from] rocksdb::Error),
    /// A sync of the write-ahead log failed; no write is taken until storage is reopened.
    #[error("storage failed: {0}; writes are refused until the broker has reopened its storage")]
    StorageFailed(String),
    /// The broker is stopping.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// The broker has not opened its storage yet (or is reopening it).
    #[error("the broker is opening its storage; retry in a moment")]
    Opening,
    /// A request before the handshake.
    #[error("send Hello first")]
    HandshakeRequired,
    /// Wrong or missing shared secret.
    #[error("authentication failed: {0}")]
    NotAuthenticated(&'static str),
    /// Authenticated, but no rule allows the operation (or one denies it).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Protocol version mismatch.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u32),
    /// A transaction ended or extended by a connection of another producer group.
    #[error("{0}")]
    WrongProducerGroup(String),
    /// Ack/nack/extend for a consumer group that never subscribed to the topic.
    #[error("consumer group {0:?} has no subscription to topic {1:?}")]
    GroupNotFound(String, String),
    /// A subscription whose filter differs from its group's.
    #[error("{0}")]
    FilterConflict(String),
    /// New messages refused above the disk's high-water mark.
    #[error("{0}")]
    DiskFull(String),
    /// An ordered subscription to an unordered group, or the other way round.
    #[error("{0}")]
    OrderingConflict(String),
    /// Cancel of a scheduled message that is not waiting.
    #[error(
        "no scheduled message {0} is waiting: it was never scheduled, is still in an \
         uncommitted transaction, or was delivered or cancelled over a day ago"
    )]
    ScheduledNotFound(String),
    /// Cancel of a scheduled message that was delivered already.
    #[error("scheduled message {0} was already delivered (topic {1:?}, offset {2})")]
    AlreadyDelivered(String, String, u64),
    /// No message with that id is kept.
    #[error(
        "no message {0} is kept: never stored, removed by retention, its topic deleted, or \
         a half message of an open transaction (see txmq txn list)"
    )]
    MessageNotFound(String),
    /// This node does not lead its broker group (the leader's address when known).
    #[error("{}", not_leader(.0.as_deref()))]
    NotLeader(Option<String>),
    /// An idempotency key reused, within the window, for another message.
    #[error("{0}")]
    IdempotencyConflict(String),
    /// A delivery time further ahead than max-schedule-delay.
    #[error("{0}")]
    ScheduleTooFar(String),
    /// A cap of the broker's was reached (which, and its setting, in the message).
    #[error("{0}")]
    LimitReached(String),
    /// An idempotency key sent to a broker that remembers none.
    #[error(
        "this broker does not remember idempotency keys (dedup-window 0): send without \
         one, or set a dedup window"
    )]
    IdempotencyDisabled,
    /// A broken internal invariant: a bug, reported rather than crashing the broker.
    #[error("internal: {0}")]
    Internal(String),
}

fn not_leader(leader: Option<&str>) -> String {
    match leader {
        Some(addr) => format!("this broker does not lead its group; the leader is at {addr}"),
        None => "this broker does not lead its group, and no leader is known yet; retry shortly"
            .to_string(),
    }
}

impl Error {
    /// The stable wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Invalid(_) => ErrorCode::InvalidRequest,
            Error::InvalidName(_) => ErrorCode::InvalidName,
            Error::TopicNotFound(_) => ErrorCode::TopicNotFound,
            Error::TopicExists(_) => ErrorCode::TopicExists,
            Error::TooLarge(_) => ErrorCode::MessageTooLarge,
            Error::TxnNotFound(_) => ErrorCode::TxnNotFound,
            Error::TxnCommitted(_) => ErrorCode::TxnAlreadyCommitted,
            Error::TxnRolledBack(_) => ErrorCode::TxnAlreadyRolledBack,
            Error::TxnNotRearmable(..) => ErrorCode::TxnNotRearmable,
            Error::LeaseNotFound(_) => ErrorCode::LeaseNotFound,
            Error::Storage(_) | Error::StorageFailed(_) | Error::Opening => ErrorCode::StorageError,
            Error::ShuttingDown => ErrorCode::ShuttingDown,
            Error::HandshakeRequired => ErrorCode::HandshakeRequired,
            Error::NotAuthenticated(_) => ErrorCode::NotAuthenticated,
            Error::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Error::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            Error::WrongProducerGroup(_) => ErrorCode::WrongProducerGroup,
            Error::GroupNotFound(..) => ErrorCode::GroupNotFound,
            Error::FilterConflict(_) => ErrorCode::FilterConflict,
            Error::OrderingConflict(_) => ErrorCode::OrderingConflict,
            Error::DiskFull(_) => ErrorCode::DiskFull,
            Error::ScheduledNotFound(_) => ErrorCode::ScheduledNotFound,
            Error::AlreadyDelivered(..) => ErrorCode::AlreadyDelivered,
            Error::MessageNotFound(_) => ErrorCode::MessageNotFound,
            Error::NotLeader(_) => ErrorCode::NotLeader,
            Error::IdempotencyConflict(_) => ErrorCode::IdempotencyConflict,
            Error::IdempotencyDisabled => ErrorCode::IdempotencyDisabled,
            Error::ScheduleTooFar(_) => ErrorCode::ScheduleTooFar,
            Error::LimitReached(_) => ErrorCode::LimitReached,
            Error::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// Result with the broker's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
