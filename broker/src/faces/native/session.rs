//! What one connection knows about its client, and how answers are framed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use txmq_protocol::pb::{self, frame::Body};
use txmq_protocol::{ErrorCode, Frame};

use crate::error::Error;
use crate::service::Principal;
use crate::service::consume::Membership;
use crate::service::consume::Stall;

/// What the connection knows about its client.
#[derive(Debug)]
pub struct Session {
    /// Broker-wide connection id.
    pub id: u64,
    /// Where the client connected from.
    pub peer: SocketAddr,
    /// Set once Hello succeeded.
    pub hello: Option<pb::Hello>,
    /// Who the client is, once Hello succeeded: what every service call takes.
    pub who: Option<Arc<Principal>>,
    /// The user a SCRAM authentication proved (before Hello).
    pub identity: Option<crate::auth::Identity>,
    /// A SCRAM authentication in progress.
    pub scram: Option<crate::service::users::Scram>,
    /// Where frames to this client go.
    pub outbound: mpsc::Sender<Frame>,
    /// Active subscriptions by id.
    pub subscriptions: HashMap<u64, Membership>,
    /// Set when the client failed authentication: answer, then close.
    pub refused: bool,
    /// Whether the socket takes what is written to it.
    pub stall: Arc<Stall>,
}

/// An error response frame.
pub fn error_frame(id: u64, code: ErrorCode, message: &str) -> Frame {
    Frame {
        id,
        body: Some(Body::Response(pb::Response {
            code: code as i32,
            message: message.to_string(),
            leader: String::new(),
            result: None,
        })),
    }
}

/// The response frame of an error: [`error_frame`], naming the leader for
/// [`Error::NotLeader`].
pub fn error_response(id: u64, e: &Error) -> Frame {
    let mut frame = error_frame(id, e.code(), &e.to_string());
    if let (Error::NotLeader(Some(leader)), Some(Body::Response(r))) = (e, frame.body.as_mut()) {
        r.leader.clone_from(leader);
    }
    frame
}

/// A response frame for a result.
pub fn response(id: u64, result: Result<pb::response::Result, Error>) -> Frame {
    match result {
        Ok(r) => Frame {
            id,
            body: Some(Body::Response(pb::Response {
                code: ErrorCode::Ok as i32,
                message: String::new(),
                leader: String::new(),
                result: Some(r),
            })),
        },
        Err(e) => error_response(id, &e),
    }
}
