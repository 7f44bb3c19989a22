//! What one connection knows about its client, and how answers are framed.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use txmq_protocol::pb::{self, frame::Body};
use txmq_protocol::{ErrorCode, Frame};

use crate::delivery::Stall;
use crate::error::Error;
use crate::topics::Topic;

/// What the connection knows about its client.
#[derive(Debug)]
pub struct Session {
    /// Broker-wide connection id.
    pub id: u64,
    /// Set once Hello succeeded.
    pub hello: Option<pb::Hello>,
    /// Where frames to this client go.
    pub outbound: mpsc::Sender<Frame>,
    /// Active subscriptions: id to (group, topic).
    pub subscriptions: HashMap<u64, (String, Arc<Topic>)>,
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
            result: None,
        })),
    }
}

/// A response frame for a result.
pub fn response(id: u64, result: Result<pb::response::Result, Error>) -> Frame {
    match result {
        Ok(r) => Frame {
            id,
            body: Some(Body::Response(pb::Response {
                code: ErrorCode::Ok as i32,
                message: String::new(),
                result: Some(r),
            })),
        },
        Err(e) => error_frame(id, e.code(), &e.to_string()),
    }
}
