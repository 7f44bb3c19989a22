//! Outcomes as the `Status { code, message }` every response carries. Only codes every
//! official client can parse are sent (the Rust client 5.0.0 panics on some others).

use super::pb;
use crate::error::Error;

/// A status.
pub fn of(code: pb::Code, message: impl Into<String>) -> pb::Status {
    pb::Status {
        code: code as i32,
        message: message.into(),
    }
}

/// OK.
pub fn ok() -> pb::Status {
    of(pb::Code::Ok, "OK")
}

/// Whether a status is OK.
pub fn is_ok(status: &pb::Status) -> bool {
    status.code == pb::Code::Ok as i32
}

/// The code a client understands for one of txmq's errors.
pub fn code(e: &Error) -> pb::Code {
    match e {
        Error::Invalid(_)
        | Error::FilterConflict(_)
        | Error::OrderingConflict(_)
        | Error::IdempotencyConflict(_)
        | Error::IdempotencyDisabled => pb::Code::BadRequest,
        Error::ScheduleTooFar(_) => pb::Code::IllegalDeliveryTime,
        Error::InvalidName(_) => pb::Code::IllegalTopic,
        Error::TopicNotFound(_) | Error::TopicExists(_) => pb::Code::TopicNotFound,
        Error::TooLarge(text) if text.starts_with("message body") => pb::Code::MessageBodyTooLarge,
        Error::TooLarge(_) => pb::Code::MessagePropertiesTooLarge,
        Error::TxnNotFound(_) | Error::TxnNotRearmable(..) => pb::Code::InvalidTransactionId,
        // RocketMQ's codes have no pair for these two: one code every client parses, and
        // the message names the state (pinned below).
        Error::TxnCommitted(_) | Error::TxnRolledBack(_) => pb::Code::PreconditionFailed,
        // Not to be retried as it is: the operator raises the cap, or removes what
        // counts against it.
        Error::WrongProducerGroup(_) | Error::LimitReached(_) => pb::Code::Forbidden,
        Error::NotAuthenticated(_) => pb::Code::Unauthorized,
        Error::PermissionDenied(_) => pb::Code::Forbidden,
        Error::LeaseNotFound(_) => pb::Code::InvalidReceiptHandle,
        Error::GroupNotFound(..) => pb::Code::ConsumerGroupNotFound,
        Error::MessageNotFound(_) | Error::ScheduledNotFound(_) => pb::Code::MessageNotFound,
        Error::AlreadyDelivered(..) => pb::Code::PreconditionFailed,
        // Back-pressure: clients back off and retry.
        Error::DiskFull(_) => pb::Code::TooManyRequests,
        // A broker group's follower, or a leader that just lost its leadership.
        Error::NotLeader(_) | Error::Opening => pb::Code::HaNotAvailable,
        Error::Storage(_)
        | Error::StorageFailed(_)
        | Error::ShuttingDown
        | Error::HandshakeRequired
        | Error::UnsupportedVersion(_)
        | Error::Internal(_) => pb::Code::InternalServerError,
    }
}

/// The status of one of txmq's errors.
pub fn of_error(e: &Error) -> pb::Status {
    of(code(e), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 25, item 11: commit after rollback and rollback after commit share a code a
    /// client parses; the message tells them apart, naming the state.
    #[test]
    fn the_two_refused_ends_share_a_code_and_name_their_state() {
        let committed = of_error(&Error::TxnCommitted("T1".into()));
        let rolled = of_error(&Error::TxnRolledBack("T1".into()));
        assert_eq!(committed.code, pb::Code::PreconditionFailed as i32);
        assert_eq!(rolled.code, pb::Code::PreconditionFailed as i32);
        assert_eq!(committed.message, "transaction T1 is already committed");
        assert_eq!(rolled.message, "transaction T1 is already rolled back");
    }

    /// Issue 26, item 7: a cap reached is refused on the gRPC face with a code the
    /// clients do not retry as it is (RocketMQ's FORBIDDEN), naming the setting.
    #[test]
    fn a_cap_reached_is_forbidden_and_says_which() {
        let s = of_error(&Error::LimitReached("… its max-topics (3) …".into()));
        assert_eq!(s.code, pb::Code::Forbidden as i32);
        assert!(s.message.contains("max-topics"));
    }
}
