//! Requests, one module per family. Each validates its request once, here at the
//! boundary, and returns a [`Pending`] answer: a future that resolves to the response
//! frame once the work is durable.

pub mod admin;
pub mod cluster;
pub mod consume;
pub mod delete;
pub mod hello;
pub mod messages;
pub mod scheduled;
pub mod send;
mod session;
mod shared;
pub mod txn;
pub mod validate;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use txmq_protocol::pb::frame::Body;
use txmq_protocol::{Frame, pb};

use crate::error::{Error, Result};
use crate::ids::Id;

pub use session::{Session, error_frame, error_response, response};
pub use shared::Shared;

/// A response on its way.
pub type Pending = Pin<Box<dyn Future<Output = Frame> + Send>>;

/// A response that is known now.
pub fn ready(id: u64, result: Result<pb::response::Result>) -> Pending {
    Box::pin(std::future::ready(response(id, result)))
}

/// A response that comes when `work` finishes.
pub fn later(
    id: u64,
    work: impl Future<Output = Result<pb::response::Result>> + Send + 'static,
) -> Pending {
    Box::pin(async move { response(id, work.await) })
}

/// Runs a storage read off the async workers.
///
/// # Errors
/// The read's error, or an internal one when its task panicked.
pub async fn blocking<T: Send + 'static>(
    storage: &crate::storage::StorageHandle,
    read: impl FnOnce(&crate::storage::Storage) -> Result<T> + Send + 'static,
) -> Result<T> {
    let storage = storage.clone();
    tokio::task::spawn_blocking(move || read(&storage))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
}

/// Most entries in one page of any listing.
pub const MAX_PAGE: usize = 1000;

/// A listing's page size: `limit`, or [`MAX_PAGE`] when 0 or more.
pub fn page(limit: u32) -> usize {
    match limit as usize {
        0 => MAX_PAGE,
        n => n.min(MAX_PAGE),
    }
}

/// Checks a topic or group name.
///
/// # Errors
/// [`Error::InvalidName`] saying what is wrong.
pub fn name(kind: &str, name: &str) -> Result<()> {
    txmq_protocol::names::validate(kind, name).map_err(Error::InvalidName)
}

/// Parses a transaction id.
///
/// # Errors
/// [`Error::Invalid`] when it is not 32 hex digits.
pub fn txn_id(text: &str) -> Result<Id> {
    Id::parse(text).ok_or_else(|| {
        Error::Invalid(format!(
            "{text:?} is not a transaction id (32 hexadecimal digits)"
        ))
    })
}

/// Routes one frame: the one place every frame passes, so the handshake gate applies to
/// each of them (check answers included). Returns the pending answer, if the frame
/// expects one.
pub async fn dispatch(
    frame: Frame,
    session: &mut Session,
    shared: &Arc<Shared>,
) -> Option<Pending> {
    let id = frame.id;
    let Some(body) = frame.body else {
        return Some(ready(id, Err(Error::Invalid("frame has no body".into()))));
    };
    if id == 0 {
        return Some(ready(
            0,
            Err(Error::Invalid("requests need a non-zero id".into())),
        ));
    }
    if !shared.serving.holds() && !matches!(body, Body::CheckReply(_)) {
        // A group leader whose lease lapsed (it was paused, or cut off): another node
        // may lead and have written since, so nothing is answered from this state.
        // (A check answer goes to the scheduler, whose writes a deposed leader cannot
        // commit.)
        return Some(ready(id, Err(Error::NotLeader(None))));
    }
    if let Body::Hello(hello) = body {
        let result = hello::hello(hello, session, shared);
        session.refused = matches!(result, Err(Error::NotAuthenticated(_)));
        return Some(ready(id, result));
    }
    if session.hello.is_none() {
        return Some(ready(id, Err(Error::HandshakeRequired)));
    }
    if let Body::CheckReply(reply) = body {
        // An answer expects no response; the checker accepts it only from the
        // connection it asked and for the transaction it asked about.
        txn::check_reply(id, reply, session, shared).await;
        return None;
    }
    Some(match body {
        Body::Send(req) => send::send(id, req, session, shared),
        Body::EndTxn(req) => txn::end(id, req, session, shared),
        Body::TxnBatch(req) => txn::batch(id, req, session, shared),
        Body::Ping(_) => ready(id, Ok(pb::response::Result::Pong(pb::PongOk {}))),
        Body::ListTxns(req) => txn::list(id, req, shared),
        Body::RearmTxn(req) => txn::rearm(id, req, shared),
        Body::Subscribe(req) => consume::subscribe(id, req, session, shared).await,
        Body::Unsubscribe(req) => consume::unsubscribe(id, req, session, shared).await,
        Body::Ack(req) => consume::ack(id, req, shared).await,
        Body::Nack(req) => consume::nack(id, req, shared).await,
        Body::Extend(req) => consume::extend(id, req, shared).await,
        Body::CreateTopic(req) => admin::create_topic(id, req, shared),
        Body::AlterTopic(req) => admin::alter_topic(id, req, shared),
        Body::ListTopics(req) => admin::list_topics(id, req, shared),
        Body::DescribeGroup(req) => admin::describe_group(id, req, shared),
        Body::ListDeadLetters(req) => admin::list_dead_letters(id, req, shared),
        Body::Redrive(req) => admin::redrive(id, req, shared),
        Body::ResetGroup(req) => admin::reset_group(id, req, shared),
        Body::DeleteGroup(req) => delete::delete_group(id, req, shared),
        Body::DeleteTopic(req) => delete::delete_topic(id, req, shared),
        Body::ShowMessage(req) => messages::show_message(id, req, shared),
        Body::FindMessages(req) => messages::find_messages(id, req, shared),
        Body::ListGroups(req) => admin::list_groups(id, req, shared),
        Body::Stats(_) => admin::stats(id, shared),
        Body::ClusterStatus(_) => cluster::status(id, shared),
        Body::ClusterChange(req) => cluster::change(id, req, shared),
        Body::CancelScheduled(req) => scheduled::cancel(id, req, shared),
        Body::ListScheduled(req) => scheduled::list(id, req, shared),
        Body::Hello(_) | Body::CheckReply(_) => unreachable!("handled above"),
        Body::Response(_) | Body::Delivery(_) | Body::Check(_) => ready(
            id,
            Err(Error::Invalid(
                "that frame is sent by the broker, not to it".into(),
            )),
        ),
    })
}
