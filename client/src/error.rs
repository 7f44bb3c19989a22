//! The client's error type.

use txmq_protocol::ErrorCode;

/// What can go wrong talking to a broker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker refused the request.
    #[error("broker refused ({code:?}): {message}")]
    Broker {
        /// Stable error code.
        code: ErrorCode,
        /// The broker's explanation.
        message: String,
    },
    /// The broker does not lead its group. Refusing a handshake, it served nothing, and
    /// [`crate::connection::Connection::open`] follows `leader` on its own. Answering a
    /// request, it lost its leadership while writing it: the write may or may not be
    /// committed by the next leader, as when a connection is lost.
    #[error("broker refused (NotLeader): {message}")]
    NotLeader {
        /// The broker's explanation.
        message: String,
        /// The leader's client address, when the broker knew it.
        leader: Option<String>,
    },
    /// Could not reach the broker.
    #[error("cannot connect to {addr}")]
    Connect {
        /// Where we tried.
        addr: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The connection dropped before the answer came; the request may or may not have
    /// taken effect.
    #[error("connection lost: {0}")]
    Disconnected(String),
    /// No answer came within the call timeout; the request may or may not have taken
    /// effect, and the connection is closed (a broker that answers nothing is treated as
    /// gone).
    #[error("no answer from the broker within {0:?}")]
    Timeout(std::time::Duration),
    /// The stream of frames broke.
    #[error("protocol: {0}")]
    Frame(#[from] txmq_protocol::FrameError),
    /// The broker answered something this client did not expect.
    #[error("unexpected answer from the broker: {0}")]
    Unexpected(String),
    /// A bad argument, caught before anything was sent.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// The request may or may not have taken effect: its answer was lost (the
    /// connection dropped or timed out, or the leader changed while writing it).
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            Self::Disconnected(_) | Self::Timeout(_) | Self::NotLeader { .. }
        )
    }

    /// A request over the frame limit the broker announced, refused by this client
    /// before anything was sent (the connection stays open).
    pub fn is_frame_too_large(&self) -> bool {
        matches!(
            self,
            Self::Frame(txmq_protocol::FrameError::TooLarge { .. })
        )
    }

    /// The broker's error code, when the broker refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Broker { code, .. } => Some(*code),
            Error::NotLeader { .. } => Some(ErrorCode::NotLeader),
            _ => None,
        }
    }
}

/// Result with the client's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
