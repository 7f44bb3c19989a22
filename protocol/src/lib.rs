//! The txmq wire contract.
//!
//! `proto/txmq.proto` is the source of truth; this crate compiles it with prost and adds
//! the framed, checksummed [`codec::FrameCodec`] that both the broker and the client use.
//!
//! # Layout
//! - [`pb`]: the generated protobuf types (`Frame`, requests, responses, `ErrorCode`).
//! - [`codec`]: `len | crc32 | body` framing on `tokio_util::codec`.
//! - [`names`]: the one rule for valid topic and group names.

#![warn(missing_docs)]

pub mod codec;
#[doc(hidden)]
pub mod fuzzing;
pub mod names;
pub mod scram;

/// Generated protobuf types of `proto/txmq.proto` (package `txmq.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/txmq.v1.rs"));
}

pub use codec::{FrameCodec, FrameError};
pub use pb::{ErrorCode, Frame, frame::Body};

/// The protocol version this crate speaks; sent in `Hello`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The message property that scopes a transaction's check-back to the producers that
/// declared the same value in `Hello.check_scopes` (a database's identity).
pub const CHECK_SCOPE_PROPERTY: &str = "txmq-check-scope";

/// The default maximum frame body length: 16 MiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Milliseconds since the Unix epoch on this machine's clock.
///
/// In debug builds only, `TXMQ_CLOCK_OFFSET_MS` (signed milliseconds, read once) moves
/// this process's clock: the tests of a broker group give one node a clock that is ahead
/// or behind. Release builds read the clock as it is.
pub fn now_ms() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    #[cfg(debug_assertions)]
    let now = now.saturating_add_signed(test_clock_offset_ms());
    now
}

/// The debug-only clock offset of [`now_ms`] (0 when unset or unreadable).
#[cfg(debug_assertions)]
fn test_clock_offset_ms() -> i64 {
    static OFFSET: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| {
        std::env::var("TXMQ_CLOCK_OFFSET_MS")
            .ok()
            .and_then(|v| v.trim().trim_start_matches('+').parse().ok())
            .unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    /// Error codes are part of the protocol: a client built against an older crate must
    /// read the same number as the same error. This pins every one.
    #[test]
    fn error_codes_are_stable() {
        let pinned = [
            (ErrorCode::Ok, 0),
            (ErrorCode::InvalidRequest, 1),
            (ErrorCode::UnsupportedVersion, 2),
            (ErrorCode::HandshakeRequired, 3),
            (ErrorCode::NotAuthenticated, 4),
            (ErrorCode::InvalidName, 5),
            (ErrorCode::TopicNotFound, 6),
            (ErrorCode::MessageTooLarge, 7),
            (ErrorCode::StorageError, 8),
            (ErrorCode::ShuttingDown, 9),
            (ErrorCode::TxnNotFound, 10),
            (ErrorCode::TxnAlreadyCommitted, 11),
            (ErrorCode::TxnAlreadyRolledBack, 12),
            (ErrorCode::LeaseNotFound, 13),
            (ErrorCode::TooManyInFlight, 14),
            (ErrorCode::TooManyConnections, 15),
            (ErrorCode::Internal, 16),
            (ErrorCode::MalformedFrame, 17),
            (ErrorCode::TxnNotRearmable, 18),
            (ErrorCode::TopicExists, 19),
            (ErrorCode::WrongProducerGroup, 20),
            (ErrorCode::GroupNotFound, 21),
            (ErrorCode::FilterConflict, 22),
            (ErrorCode::ScheduledNotFound, 23),
            (ErrorCode::AlreadyDelivered, 24),
            (ErrorCode::OrderingConflict, 25),
            (ErrorCode::DiskFull, 26),
            (ErrorCode::MessageNotFound, 27),
            (ErrorCode::NotLeader, 28),
            (ErrorCode::IdempotencyConflict, 29),
            (ErrorCode::IdempotencyDisabled, 30),
            (ErrorCode::ScheduleTooFar, 31),
            (ErrorCode::LimitReached, 32),
            (ErrorCode::PermissionDenied, 33),
        ];
        for (code, number) in pinned {
            assert_eq!(code as i32, number, "{code:?} moved");
            assert_eq!(ErrorCode::try_from(number), Ok(code));
        }
        assert!(
            ErrorCode::try_from(34).is_err(),
            "a new code was added: pin it here"
        );
    }
}
