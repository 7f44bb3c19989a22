//! Who is asking: the principal every service call takes, made by the face that
//! authenticated the request.

use std::net::SocketAddr;

pub use crate::auth::Identity;

/// The face a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Face {
    /// txmq's own framed protocol.
    Native,
    /// RocketMQ 5's gRPC protocol.
    Grpc,
    /// RocketMQ's Remoting protocol.
    Remoting,
}

impl Face {
    /// Its name in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Face::Native => "native",
            Face::Grpc => "grpc",
            Face::Remoting => "remoting",
        }
    }
}

/// The authenticated asker of one request.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Who it authenticated as.
    pub identity: Identity,
    /// The face that authenticated it.
    pub face: Face,
    /// Where the request came from, when the face knows it.
    pub peer: Option<SocketAddr>,
    /// The client's own id: a native Hello's `client_id`, a gRPC client's
    /// `x-mq-client-id` (empty when it sent none).
    pub client_id: String,
    /// The native connection's id (its producer registration, its check answers); 0 on
    /// faces without one.
    pub connection_id: u64,
    /// The producer group the connection declared (a native Hello): the group its
    /// transactions belong to. Empty when it declared none.
    pub producer_group: String,
    /// Whether it declared itself an operator (a native Hello's admin role): operator
    /// resolutions of transactions need it.
    pub admin: bool,
}

impl Principal {
    /// A native connection's client, after its Hello.
    pub fn native(
        identity: Identity,
        peer: Option<SocketAddr>,
        connection_id: u64,
        client_id: String,
        producer_group: String,
        admin: bool,
    ) -> Self {
        Self {
            identity,
            face: Face::Native,
            peer,
            client_id,
            connection_id,
            producer_group,
            admin,
        }
    }

    /// A gRPC client, for one call.
    pub fn grpc(identity: Identity, peer: Option<SocketAddr>, client_id: Option<String>) -> Self {
        Self {
            identity,
            face: Face::Grpc,
            peer,
            client_id: client_id.unwrap_or_default(),
            connection_id: 0,
            producer_group: String::new(),
            admin: false,
        }
    }

    /// A Remoting client, for one request (`client_id`: its heartbeats').
    pub fn remoting(identity: Identity, peer: Option<SocketAddr>, client_id: String) -> Self {
        Self {
            identity,
            face: Face::Remoting,
            peer,
            client_id,
            connection_id: 0,
            producer_group: String::new(),
            admin: false,
        }
    }
}
