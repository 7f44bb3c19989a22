//! The native face: txmq's own framed protocol, a frame in and a frame out.
//!
//! [`connection`] reads frames, [`dispatch`] routes each to the service, and
//! `session` holds what one connection knows of its client.

pub mod connection;
pub mod hello;
pub mod listener;
mod session;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use txmq_protocol::pb::frame::Body;
use txmq_protocol::{Frame, pb};

use crate::error::{Error, Result};
use crate::service::consume::{self, Handle, Join, LeaseRef, Sink, SubscribeOptions};
use crate::service::{
    Answer, Principal, Shared, admin, cluster, delete, messages, scheduled, send, txn, users,
    validate,
};

pub use listener::{Incoming, Listener};
pub use session::{Session, error_frame, error_response, response};

/// A response on its way.
pub type Pending = Pin<Box<dyn Future<Output = Frame> + Send>>;

/// A response that is known now.
pub fn ready(id: u64, result: Result<pb::response::Result>) -> Pending {
    Box::pin(std::future::ready(response(id, result)))
}

/// The response to a service call, made by `wrap` from its outcome.
fn answer<T: Send + 'static>(
    id: u64,
    outcome: Answer<T>,
    wrap: impl FnOnce(T) -> pb::response::Result + Send + 'static,
) -> Pending {
    Box::pin(async move { response(id, outcome.await.map(wrap)) })
}

/// A response that comes when `work` finishes.
pub fn later(
    id: u64,
    work: impl Future<Output = Result<pb::response::Result>> + Send + 'static,
) -> Pending {
    Box::pin(async move { response(id, work.await) })
}

/// Routes one frame: the one place every frame passes, so the handshake gate applies to
/// each of them (check answers included). Returns the pending answer, if the frame
/// expects one.
pub async fn dispatch(
    frame: Frame,
    session: &mut Session,
    shared: &Arc<Shared>,
) -> Option<Pending> {
    use pb::response::Result as R;
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
    if let Body::AuthStart(start) = &body {
        return Some(ready(id, hello::auth_start(start, session, shared)));
    }
    if let Body::AuthFinish(finish) = &body {
        let result = hello::auth_finish(finish, session, shared).await;
        session.refused = matches!(result, Err(Error::NotAuthenticated(_)));
        return Some(ready(id, result));
    }
    let Some(who) = session.who.clone() else {
        return Some(ready(id, Err(Error::HandshakeRequired)));
    };
    let who = &who;
    if let Body::CheckReply(reply) = body {
        // An answer expects no response; the checker accepts it only from the
        // connection it asked and for the transaction it asked about.
        txn::check_reply(shared, who, id, reply).await;
        return None;
    }
    Some(match body {
        Body::Send(req) => answer(id, send::send(shared, who, req), R::Send),
        Body::EndTxn(req) => answer(id, txn::end(shared, who, req), R::EndTxn),
        Body::TxnBatch(req) => answer(id, txn::batch(shared, who, req), R::TxnBatch),
        // A ping proves the connection still belongs to a user that exists.
        Body::Ping(_) => ready(
            id,
            shared
                .auth
                .check_identity(&who.identity)
                .map(|()| R::Pong(pb::PongOk {})),
        ),
        Body::ListTxns(req) => answer(id, txn::list(shared, who, req), R::Txns),
        Body::RearmTxn(req) => answer(id, txn::rearm(shared, who, req), R::Txn),
        Body::Subscribe(req) => subscribe(id, req, session, shared).await,
        Body::Unsubscribe(req) => unsubscribe(id, req, session, shared).await,
        Body::Ack(req) => {
            let handles = req.handles.into_iter().map(handle).collect();
            let acked = consume::ack(shared, who, handles).await;
            answer(id, acked, |acked| R::Ack(pb::AckOk { acked }))
        }
        Body::Nack(req) => nack(id, req, who, shared).await,
        Body::Extend(req) => extend(id, req, who, shared).await,
        Body::CreateTopic(req) => answer(id, admin::create_topic(shared, who, req), R::Topic),
        Body::AlterTopic(req) => {
            // An older client's: both retention values, the queue count untouched.
            let change = pb::ChangeTopicRequest {
                topic: req.topic,
                retention_ms: Some(req.retention_ms),
                retention_bytes: Some(req.retention_bytes),
                queues: None,
            };
            answer(id, admin::alter_topic(shared, who, change), R::Topic)
        }
        Body::ChangeTopic(req) => answer(id, admin::alter_topic(shared, who, req), R::Topic),
        Body::ListTopics(req) => answer(id, admin::list_topics(shared, who, req), R::Topics),
        Body::DescribeGroup(req) => answer(id, admin::describe_group(shared, who, req), R::Group),
        Body::ListDeadLetters(req) => answer(
            id,
            admin::list_dead_letters(shared, who, req),
            R::DeadLetters,
        ),
        Body::Redrive(req) => answer(id, admin::redrive(shared, who, req), R::Redrive),
        Body::ResetGroup(req) => answer(id, admin::reset_group(shared, who, req), R::ResetGroup),
        Body::DeleteGroup(req) => {
            answer(id, delete::delete_group(shared, who, req), R::DeleteGroup)
        }
        Body::DeleteTopic(req) => {
            answer(id, delete::delete_topic(shared, who, req), R::DeleteTopic)
        }
        Body::ShowMessage(req) => {
            answer(id, messages::show_message(shared, who, req), R::ShowMessage)
        }
        Body::FindMessages(req) => answer(
            id,
            messages::find_messages(shared, who, req),
            R::FindMessages,
        ),
        Body::ListGroups(req) => answer(id, admin::list_groups(shared, who, req), R::Groups),
        Body::Stats(_) => answer(id, admin::stats(shared, who), R::Stats),
        Body::ClusterStatus(_) => answer(id, cluster::status(shared, who), R::Cluster),
        Body::ClusterChange(req) => answer(id, cluster::change(shared, who, req), R::Cluster),
        Body::CancelScheduled(req) => {
            answer(id, scheduled::cancel(shared, who, req), R::CancelScheduled)
        }
        Body::ListScheduled(req) => answer(id, scheduled::list(shared, who, req), R::Scheduled),
        Body::User(req) => answer(id, users::user(shared, who, req), R::Users),
        Body::Acl(req) => answer(id, users::acl(shared, who, req), |a| match a {
            users::AclAnswer::Rules(r) => R::Rules(r),
            users::AclAnswer::Check(c) => R::AclCheck(c),
        }),
        Body::Hello(_) | Body::CheckReply(_) | Body::AuthStart(_) | Body::AuthFinish(_) => {
            unreachable!("handled above")
        }
        Body::Response(_) | Body::Delivery(_) | Body::Check(_) => ready(
            id,
            Err(Error::Invalid(
                "that frame is sent by the broker, not to it".into(),
            )),
        ),
    })
}

/// A delivery handle of the native form.
fn handle(h: pb::DeliveryHandle) -> Handle {
    Handle {
        group: h.group,
        topic: h.topic,
        lease: LeaseRef::new(h.offset, h.lease_id),
    }
}

fn handle_of(h: Option<pb::DeliveryHandle>) -> Result<Handle> {
    h.map(handle)
        .ok_or_else(|| Error::Invalid("missing delivery handle".into()))
}

/// Adds this connection as a consumer of (group, topic): deliveries follow on the same
/// connection, tagged with the subscription id. A connection holds at most
/// `max-subscriptions-per-connection` of them.
async fn subscribe(
    id: u64,
    req: pb::SubscribeRequest,
    session: &mut Session,
    shared: &Arc<Shared>,
) -> Pending {
    let cap = shared.config.max_subscriptions_per_connection;
    if session.subscriptions.len() >= cap {
        shared
            .metrics
            .limit_refusals
            .with_label_values(&["subscriptions"])
            .inc();
        return ready(
            id,
            Err(Error::LimitReached(format!(
                "this connection holds {} subscriptions, its \
                 max-subscriptions-per-connection ({cap}); unsubscribe one, or use another \
                 connection",
                session.subscriptions.len()
            ))),
        );
    }
    let lease = match req.lease_ms {
        0 => None,
        ms => match validate::lease_ms("lease_ms", ms) {
            Ok(d) => Some(d),
            Err(e) => return ready(id, Err(e)),
        },
    };
    let join = Join {
        group: req.group,
        topic: req.topic,
        window: req.window,
        lease,
        options: SubscribeOptions {
            tag_filter: req.tag_filter,
            from_latest: req.start_from == pb::StartFrom::Latest as i32,
            max_attempts: req.max_attempts,
            replace_filter: req.replace_filter,
            ordered: req.ordered,
        },
    };
    let sink = Sink {
        outbound: session.outbound.clone(),
        stall: session.stall.clone(),
    };
    let Some(who) = session.who.clone() else {
        return ready(id, Err(Error::HandshakeRequired));
    };
    match consume::join(shared, &who, join, sink).await {
        Ok((membership, joined)) => {
            let subscription_id = membership.subscription_id;
            // Recorded now, so a disconnect before the answer still releases it.
            session.subscriptions.insert(subscription_id, membership);
            answer(id, joined, move |()| {
                pb::response::Result::Subscribe(pb::SubscribeOk { subscription_id })
            })
        }
        Err(e) => ready(id, Err(e)),
    }
}

/// Removes one subscription; its leases are released at once.
async fn unsubscribe(
    id: u64,
    req: pb::UnsubscribeRequest,
    session: &mut Session,
    shared: &Arc<Shared>,
) -> Pending {
    let Some(membership) = session.subscriptions.remove(&req.subscription_id) else {
        return ready(
            id,
            Err(Error::Invalid(format!(
                "no subscription {} on this connection",
                req.subscription_id
            ))),
        );
    };
    let left = consume::leave(shared, &membership, true, Vec::new()).await;
    ready(
        id,
        left.map(|()| pb::response::Result::Ack(pb::AckOk { acked: 0 })),
    )
}

async fn nack(id: u64, req: pb::NackRequest, who: &Principal, shared: &Arc<Shared>) -> Pending {
    let handle = match handle_of(req.handle) {
        Ok(h) => h,
        Err(e) => return ready(id, Err(e)),
    };
    let delay = if req.use_backoff {
        None
    } else {
        match validate::duration_ms(
            "delay_ms",
            req.delay_ms,
            Duration::ZERO,
            validate::MAX_NACK_DELAY,
        ) {
            Ok(d) => Some(d),
            Err(e) => return ready(id, Err(e)),
        }
    };
    let done = consume::nack(shared, who, handle, delay).await;
    answer(id, done, |()| {
        pb::response::Result::Ack(pb::AckOk { acked: 0 })
    })
}

async fn extend(id: u64, req: pb::ExtendRequest, who: &Principal, shared: &Arc<Shared>) -> Pending {
    let handle = match handle_of(req.handle) {
        Ok(h) => h,
        Err(e) => return ready(id, Err(e)),
    };
    let lease_for = match validate::lease_ms("lease_ms", req.lease_ms) {
        Ok(d) => d,
        Err(e) => return ready(id, Err(e)),
    };
    let extended = consume::extend(shared, who, handle, lease_for).await;
    answer(id, extended, |lease_deadline_ms| {
        pb::response::Result::Extend(pb::ExtendOk { lease_deadline_ms })
    })
}
