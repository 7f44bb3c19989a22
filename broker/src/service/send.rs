//! Plain and transactional sends.

use std::sync::Arc;

use txmq_protocol::pb;

use super::Shared;
use super::access::{Operation, Resource, permit};
use super::{Answer, Principal, later, now};
use crate::error::{Error, Result};
use crate::storage::dedup::KeyScope;
use crate::storage::writer::{Command, Outcome};

/// Longest idempotency key, in bytes.
pub const MAX_KEY: usize = crate::storage::dedup::MAX_KEY;

/// Most messages in one send request.
pub const MAX_BATCH: usize = 10_000;

/// Longest message group name, in bytes (an ordered queue keeps one per group out).
pub const MAX_MESSAGE_GROUP: usize = 256;

/// Stores the messages (visible, or as half messages of a transaction) and answers once
/// they are durable.
pub fn send(shared: &Arc<Shared>, who: &Principal, req: pb::SendRequest) -> Answer<pb::SendOk> {
    let cmd = match command(req, who, shared) {
        Ok(cmd) => cmd,
        Err(e) => return now(Err(e)),
    };
    let writer = shared.writer.clone();
    later(async move {
        let ok = send_ok(writer.submit(cmd).await)?;
        Ok(ok)
    })
}

/// The answer to a send, from what the writer made of it.
pub(super) fn send_ok(outcome: Result<Outcome>) -> Result<pb::SendOk> {
    match outcome? {
        Outcome::Stored(receipts) => Ok(pb::SendOk {
            receipts,
            txn_id: String::new(),
        }),
        Outcome::Prepared { txn, receipts } => Ok(pb::SendOk {
            receipts,
            txn_id: txn.to_string(),
        }),
        other => Err(Error::Internal(format!("send gave {other:?}"))),
    }
}

/// Checks a send request and turns it into the writer's command.
pub(super) fn command(req: pb::SendRequest, who: &Principal, shared: &Shared) -> Result<Command> {
    check_messages(&req.messages, shared)?;
    if !req.transactional {
        for topic in topics(&req.messages) {
            permit(shared, who, Operation::Send, &[Resource::Topic(topic)])?;
            super::access::may_create(shared, who, topic)?;
        }
        if !req.txn_id.is_empty() {
            return Err(Error::Invalid(
                "txn_id is set but transactional is not".into(),
            ));
        }
        return Ok(Command::Append {
            messages: req.messages,
            keys: key_scope(who),
        });
    }
    // The connection's own group (from Hello): only connections of that group may end
    // the transaction, so preparing for another group would leave it unendable.
    let group = who.producer_group.clone();
    if group.is_empty() {
        return Err(Error::Invalid(
            "a transactional send needs a producer group in Hello".into(),
        ));
    }
    if !req.producer_group.is_empty() && req.producer_group != group {
        return Err(Error::WrongProducerGroup(format!(
            "this connection is of producer group {group:?}, not {:?}",
            req.producer_group
        )));
    }
    super::name("producer group", &group)?;
    for topic in topics(&req.messages) {
        permit(
            shared,
            who,
            Operation::Prepare,
            &[Resource::Topic(topic), Resource::ProducerGroup(&group)],
        )?;
        super::access::may_create(shared, who, topic)?;
    }
    let txn = if req.txn_id.is_empty() {
        None
    } else {
        Some(super::txn_id(&req.txn_id)?)
    };
    prepare(txn, group, req.messages, req.check_delay_ms)
}

/// The distinct topics of `messages`, each once (a request names one or a few: a
/// short list, not a hash set, on the send path).
fn topics(messages: &[pb::Message]) -> impl Iterator<Item = &str> {
    let mut seen: Vec<&str> = Vec::new();
    messages.iter().map(|m| m.topic.as_str()).filter(move |t| {
        let new = !seen.contains(t);
        if new {
            seen.push(t);
        }
        new
    })
}

/// Where a principal's idempotency keys are unique: a native producer's across its
/// topic; a gRPC client's message ids only per client (two clients may make the same
/// id).
fn key_scope(who: &Principal) -> KeyScope {
    match who.face {
        super::Face::Native => KeyScope::Topic,
        super::Face::Grpc => KeyScope::GrpcClient(who.client_id.clone()),
        // UNIQ_KEY is made by the client; its resends (a lost answer, a retry on
        // another queue) come on new connections, before any heartbeat: one scope per
        // producer group, and a different message under one id is stored.
        super::Face::Remoting => KeyScope::GrpcClient(format!("%remoting%{}", who.producer_group)),
    }
}

/// Stores plain messages (visible at once, or scheduled) from a face that has checked
/// what its own form adds; answers their receipts, in order, once durable.
pub fn store(
    shared: &Arc<Shared>,
    who: &Principal,
    messages: Vec<pb::Message>,
) -> Answer<Vec<pb::MessageReceipt>> {
    let permitted = check_messages(&messages, shared).and_then(|()| {
        topics(&messages).try_for_each(|t| {
            permit(shared, who, Operation::Send, &[Resource::Topic(t)])?;
            super::access::may_create(shared, who, t)
        })
    });
    if let Err(e) = permitted {
        return now(Err(e));
    }
    let keys = key_scope(who);
    let writer = shared.writer.clone();
    later(async move {
        match writer.submit(Command::Append { messages, keys }).await? {
            Outcome::Stored(receipts) => Ok(receipts),
            other => Err(Error::Internal(format!("send gave {other:?}"))),
        }
    })
}

/// Stores half messages of a new transaction of `group`, which a face makes for its
/// clients (gRPC's `%GRPC%<topic>`, bound to the principal: see
/// [`super::txn::OwnGroup`]); answers the transaction's id and the receipts once
/// durable.
pub fn prepare_as(
    shared: &Arc<Shared>,
    who: &Principal,
    group: super::txn::OwnGroup,
    messages: Vec<pb::Message>,
) -> Answer<(crate::ids::Id, Vec<pb::MessageReceipt>)> {
    let permitted = check_messages(&messages, shared).and_then(|()| {
        topics(&messages).try_for_each(|t| {
            let on = [Resource::Topic(t), Resource::ProducerGroup(&group.name)];
            permit(shared, who, Operation::Prepare, &on)?;
            super::access::may_create(shared, who, t)
        })
    });
    let cmd = match permitted.and_then(|()| prepare(None, group.bound, messages, 0)) {
        Ok(cmd) => cmd,
        Err(e) => return now(Err(e)),
    };
    let writer = shared.writer.clone();
    later(async move {
        match writer.submit(cmd).await? {
            Outcome::Prepared { txn, receipts } => Ok((txn, receipts)),
            other => Err(Error::Internal(format!("prepare gave {other:?}"))),
        }
    })
}

/// The writer's command for half messages of a new (`txn` `None`) or open transaction
/// of producer group `group` (its name checked by the caller: the gRPC face uses names
/// no native client can claim); the messages checked already.
///
/// # Errors
/// A bad check delay.
fn prepare(
    txn: Option<crate::ids::Id>,
    group: String,
    messages: Vec<pb::Message>,
    check_delay_ms: u64,
) -> Result<Command> {
    if messages.iter().any(|m| !m.idempotency_key.is_empty()) {
        return Err(Error::Invalid(
            "idempotency_key is for plain sends: a transaction's messages are stored once \
             by its commit, which is idempotent by transaction id"
                .into(),
        ));
    }
    super::validate::duration_ms(
        "check_delay_ms",
        check_delay_ms,
        std::time::Duration::ZERO,
        super::validate::MAX_CHECK_DELAY,
    )?;
    let bytes = messages
        .iter()
        .map(|m| prost::Message::encoded_len(m) as u64)
        .sum();
    Ok(Command::Prepare {
        txn,
        group,
        bytes,
        messages,
        check_delay_ms,
    })
}

/// Checks messages to be stored, whatever the face they came through: count, disk,
/// names, sizes, schedule, message group.
///
/// # Errors
/// What is wrong, as the error the client gets.
fn check_messages(messages: &[pb::Message], shared: &Shared) -> Result<()> {
    if messages.is_empty() {
        return Err(Error::Invalid("send carries no messages".into()));
    }
    if shared.storage.disk_full() {
        return Err(Error::DiskFull(format!(
            "the broker's disk is above its high-water mark ({:.0} % used or more): new \
             messages are refused until it is below {:.0} %; commits, rollbacks and acks \
             still work",
            shared.config.disk_high_watermark * 100.0,
            shared.config.disk_low_watermark * 100.0
        )));
    }
    if messages.len() > MAX_BATCH {
        return Err(Error::Invalid(format!(
            "send carries {} messages; the limit is {MAX_BATCH}",
            messages.len()
        )));
    }
    let max = shared.config.max_message_bytes;
    let latest =
        txmq_protocol::now_ms().saturating_add(shared.config.max_schedule_delay.as_millis() as u64);
    for m in messages {
        if !m.idempotency_key.is_empty() && shared.config.dedup_window.is_zero() {
            // Storing it anyway would turn a client's safe resend into a duplicate.
            return Err(Error::IdempotencyDisabled);
        }
        if m.idempotency_key.contains('\0') {
            return Err(Error::Invalid(
                "idempotency_key holds a NUL character; keys are text without NUL".into(),
            ));
        }
        if m.idempotency_key.len() > crate::storage::dedup::MAX_KEY {
            return Err(Error::Invalid(format!(
                "idempotency_key is {} bytes; the limit is {}",
                m.idempotency_key.len(),
                crate::storage::dedup::MAX_KEY
            )));
        }
        if m.message_group.len() > MAX_MESSAGE_GROUP {
            return Err(Error::Invalid(format!(
                "message_group is {} bytes; the limit is {MAX_MESSAGE_GROUP}",
                m.message_group.len()
            )));
        }
        if m.deliver_at_ms > latest {
            return Err(Error::ScheduleTooFar(format!(
                "deliver_at_ms {} is more than max-schedule-delay ({}) ahead of the broker's \
                 clock; the latest allowed now is {latest}",
                m.deliver_at_ms,
                humantime::format_duration(shared.config.max_schedule_delay)
            )));
        }
        super::name("topic", &m.topic)?;
        if m.body.len() > max {
            return Err(Error::TooLarge(format!(
                "message body is {} bytes; the limit is {max}",
                m.body.len()
            )));
        }
        let props: usize = m.properties.iter().map(|(k, v)| k.len() + v.len()).sum();
        let props = props + m.key.len() + m.tag.len() + m.message_group.len();
        if props > 64 * 1024 {
            return Err(Error::TooLarge(format!(
                "key, tag, message group and properties take {props} bytes; the limit is 65536"
            )));
        }
    }
    Ok(())
}
