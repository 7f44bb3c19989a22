//! SendMessage and EndTransaction.
//!
//! A gRPC message becomes a txmq message: keys joined by spaces as the key (RocketMQ's
//! own `KEYS` form), the tag, the user properties, the message group (FIFO), the
//! delivery time (DELAY), the born time; the client's message id is kept as the
//! `UNIQ_KEY` property (RocketMQ's name for it) and echoed back. TRANSACTION messages
//! become half messages of a new transaction whose producer group is `%GRPC%<topic>`
//! (gRPC clients declare no group: the Java proxy keys them by topic too; `%` is not in
//! any name a native client can give, so no native producer can answer or end them); its
//! id is the transaction id the client ends it with.

use bytes::Bytes;
use txmq_protocol::pb as native;

use super::{Endpoint, pb, status};
use crate::service::{Principal, scheduled, send, txn};

/// The property that keeps a gRPC client's own message id.
pub const CLIENT_ID_PROPERTY: &str = "UNIQ_KEY";

/// The producer group of `who`'s gRPC transactions on `topic`: `%GRPC%<topic>` as
/// rules name it, bound to the user (see [`txn::OwnGroup`]).
pub fn txn_group(topic: &str, who: &Principal) -> txn::OwnGroup {
    txn::OwnGroup::of(format!("%GRPC%{topic}"), who)
}

/// A message as the client sent it, checked and converted.
struct Incoming {
    message: native::Message,
    client_id: String,
    transactional: bool,
}

fn conflict(text: impl Into<String>) -> pb::Status {
    status::of(pb::Code::MessagePropertyConflictWithType, text)
}

fn millis(t: &prost_types::Timestamp) -> u64 {
    let ms = t
        .seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos / 1_000_000));
    u64::try_from(ms).unwrap_or(0)
}

/// A gzip body inflated, to at most `max` bytes.
fn gunzip(body: &[u8], max: usize) -> Result<Vec<u8>, pb::Status> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            status::of(
                pb::Code::BadRequest,
                format!("the gzip-compressed body does not inflate: {e}"),
            )
        })?;
    if out.len() > max {
        return Err(status::of(
            pb::Code::MessageBodyTooLarge,
            format!("the body inflates to more than the {max}-byte message limit"),
        ));
    }
    Ok(out)
}

/// Checks what the gRPC form adds (types, encodings, the delivery time's range) and
/// converts; a gzip body is stored inflated (every
/// face's consumer gets the body that was meant), to at most `max_body` bytes.
fn incoming(m: pb::Message, latest_ms: u64, max_body: usize) -> Result<Incoming, pb::Status> {
    let topic = m
        .topic
        .map(|t| t.name)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| status::of(pb::Code::IllegalTopic, "a message needs a topic"))?;
    let sys = m.system_properties.unwrap_or_default();
    if sys.message_id.is_empty() {
        return Err(status::of(
            pb::Code::IllegalMessageId,
            "a message needs its message_id",
        ));
    }
    let body = if sys.body_encoding == pb::Encoding::Gzip as i32 {
        gunzip(&m.body, max_body)?
    } else {
        m.body
    };
    let kind = pb::MessageType::try_from(sys.message_type).unwrap_or(pb::MessageType::Normal);
    let group = sys.message_group.clone().unwrap_or_default();
    let deliver_at_ms = sys.delivery_timestamp.as_ref().map_or(0, millis);
    if deliver_at_ms > latest_ms {
        return Err(status::of(
            pb::Code::IllegalDeliveryTime,
            format!(
                "delivery time {deliver_at_ms} is beyond max-schedule-delay (latest {latest_ms})"
            ),
        ));
    }
    match kind {
        pb::MessageType::Fifo if group.is_empty() => {
            return Err(conflict("a FIFO message needs a message group"));
        }
        pb::MessageType::Delay if sys.delivery_timestamp.is_none() => {
            return Err(conflict("a DELAY message needs a delivery timestamp"));
        }
        pb::MessageType::Transaction if !group.is_empty() || deliver_at_ms > 0 => {
            return Err(conflict(
                "a TRANSACTION message takes neither a message group nor a delivery time",
            ));
        }
        pb::MessageType::Normal | pb::MessageType::Unspecified
            if !group.is_empty() || deliver_at_ms > 0 =>
        {
            return Err(conflict(
                "a NORMAL message takes neither a message group (FIFO) nor a delivery time \
                 (DELAY)",
            ));
        }
        pb::MessageType::Lite | pb::MessageType::Priority => {
            return Err(status::of(
                pb::Code::Unsupported,
                "LITE and PRIORITY messages are not supported",
            ));
        }
        _ => {}
    }
    if m.user_properties
        .contains_key(txmq_protocol::CHECK_SCOPE_PROPERTY)
    {
        // Only a native producer that declares it may scope its check-backs.
        return Err(status::of(
            pb::Code::BadRequest,
            format!(
                "the property {} is reserved",
                txmq_protocol::CHECK_SCOPE_PROPERTY
            ),
        ));
    }
    let mut properties = m.user_properties;
    properties.insert(CLIENT_ID_PROPERTY.into(), sys.message_id.clone());
    let transactional = kind == pb::MessageType::Transaction;
    // The clients make a message id once and keep it across their retries: it is the
    // send's idempotency key, scoped by the client (a transaction's halves are resolved
    // by its id instead).
    let idempotency_key =
        if transactional || sys.message_id.len() > send::MAX_KEY || sys.message_id.contains('\0') {
            String::new()
        } else {
            sys.message_id.clone()
        };
    Ok(Incoming {
        message: native::Message {
            topic,
            body: Bytes::from(body),
            key: sys.keys.join(" "),
            tag: sys.tag.unwrap_or_default(),
            properties,
            born_ms: sys.born_timestamp.as_ref().map_or(0, millis),
            deliver_at_ms,
            message_group: group,
            idempotency_key,
        },
        client_id: sys.message_id,
        transactional,
    })
}

/// Stores the messages of one request: the plain ones (normal, FIFO, delayed) in one
/// write, the transactional ones as one new transaction; each entry says how its
/// message fared, in the request's order.
///
/// A message id is unique only per client: sends are deduplicated on (client id,
/// message id, content), and not at all without a client id.
pub async fn send_message(
    endpoint: &Endpoint,
    who: &Principal,
    req: pb::SendMessageRequest,
) -> pb::SendMessageResponse {
    let shared = match endpoint.shared() {
        Ok(s) => s,
        Err(s) => {
            return pb::SendMessageResponse {
                status: Some(s),
                entries: Vec::new(),
            };
        }
    };
    if req.messages.is_empty() {
        return pb::SendMessageResponse {
            status: Some(status::of(pb::Code::BadRequest, "no messages")),
            entries: Vec::new(),
        };
    }
    let latest_ms =
        txmq_protocol::now_ms().saturating_add(shared.config.max_schedule_delay.as_millis() as u64);
    let mut entries: Vec<pb::SendResultEntry> = Vec::with_capacity(req.messages.len());
    let mut plain = Vec::new();
    let mut txn = Vec::new();
    for (i, m) in req.messages.into_iter().enumerate() {
        match incoming(m, latest_ms, shared.config.max_message_bytes) {
            Ok(mut inc) => {
                if shared.config.dedup_window.is_zero() || who.client_id.is_empty() {
                    // Not remembered here (dedup-window 0): a key would be refused.
                    // Without a client id, ids of two producers cannot be told apart.
                    inc.message.idempotency_key.clear();
                }
                entries.push(pb::SendResultEntry {
                    message_id: inc.client_id.clone(),
                    ..Default::default()
                });
                if inc.transactional {
                    txn.push((i, inc.message));
                } else {
                    plain.push((i, inc.message));
                }
            }
            Err(s) => entries.push(pb::SendResultEntry {
                status: Some(s),
                ..Default::default()
            }),
        }
    }
    if !plain.is_empty() {
        let (at, messages): (Vec<usize>, Vec<_>) = plain.into_iter().unzip();
        let stored = send::store(&shared, who, messages).await;
        fill(&mut entries, &at, stored, "");
    }
    if !txn.is_empty() {
        let (at, messages): (Vec<usize>, Vec<_>) = txn.into_iter().unzip();
        let group = txn_group(&messages[0].topic, who);
        // A gRPC transaction belongs to its topic's group: one topic per transaction.
        let one_topic = messages.iter().all(|m| m.topic == messages[0].topic);
        let prepared = if one_topic {
            send::prepare_as(&shared, who, group, messages).await
        } else {
            Err(crate::error::Error::Invalid(
                "the messages of one transaction go to one topic here".into(),
            ))
        };
        let (txn_id, stored) = match prepared {
            Ok((txn, receipts)) => (txn.to_string(), Ok(receipts)),
            Err(e) => (String::new(), Err(e)),
        };
        fill(&mut entries, &at, stored, &txn_id);
    }
    let status = entries
        .iter()
        .filter_map(|e| e.status.clone())
        .find(|s| !status::is_ok(s))
        .unwrap_or_else(status::ok);
    pb::SendMessageResponse {
        status: Some(status),
        entries,
    }
}

/// Sets the entries at `at` from the writer's outcome for their messages.
fn fill(
    entries: &mut [pb::SendResultEntry],
    at: &[usize],
    stored: crate::error::Result<Vec<native::MessageReceipt>>,
    txn_id: &str,
) {
    let receipts = stored.map_err(|e| status::of_error(&e));
    for (n, &i) in at.iter().enumerate() {
        let entry = &mut entries[i];
        match &receipts {
            Ok(r) => {
                entry.status = Some(status::ok());
                entry.offset = r.get(n).map_or(0, |r| r.offset as i64);
                entry.transaction_id = txn_id.to_string();
                // A delayed message's txmq id cancels it (`txmq scheduled cancel`).
                if let Some(r) = r.get(n).filter(|r| r.deliver_ms > 0) {
                    entry.recall_handle = r.message_id.clone();
                }
            }
            Err(s) => entry.status = Some(s.clone()),
        }
    }
}

/// Ends a gRPC transaction: commit or rollback by the client (source CLIENT) or by its
/// checker's answer (source SERVER_CHECK), idempotent like every end; "unknown"
/// (resolution unspecified) changes nothing.
pub async fn end_transaction(
    endpoint: &Endpoint,
    request: tonic::Request<pb::EndTransactionRequest>,
) -> pb::EndTransactionResponse {
    let who = super::principal(&request);
    let req = request.into_inner();
    let reply = |s| pb::EndTransactionResponse { status: Some(s) };
    let shared = match endpoint.shared() {
        Ok(s) => s,
        Err(s) => return reply(s),
    };
    let Some(txn) = crate::ids::Id::parse(&req.transaction_id) else {
        return reply(status::of(
            pb::Code::InvalidTransactionId,
            format!(
                "{:?} is not a transaction id of this broker",
                req.transaction_id
            ),
        ));
    };
    let outcome = match pb::TransactionResolution::try_from(req.resolution) {
        Ok(pb::TransactionResolution::Commit) => native::TxnOutcome::Commit,
        Ok(pb::TransactionResolution::Rollback) => native::TxnOutcome::Rollback,
        _ => native::TxnOutcome::Unknown,
    };
    // The answer to a check this client's stream was sent (the stream asked is the only
    // one that can prove it) goes to the check-back scheduler, as a native producer's
    // does: it counts it, ends the transaction or (unknown) keeps its backoff, and stops
    // waiting for it. Unanswered, it once timed out there too.
    if req.source == pb::TransactionSource::SourceServerCheck as i32
        && !who.client_id.is_empty()
        && let Some((connection_id, check_id, topic)) = endpoint
            .sessions
            .links_of(&who.client_id, &who)
            .iter()
            .find_map(|l| {
                l.answered(txn)
                    .map(|(check, topic)| (l.connection_id, check, topic))
            })
    {
        // The group of the check that was sent, not of the topic the request names.
        let group = txn_group(&topic, &who);
        let answer = native::CheckReply {
            txn_id: txn.to_string(),
            outcome: outcome as i32,
        };
        return match txn::answer_check(&shared, &who, &group, connection_id, check_id, answer).await
        {
            Ok(()) => reply(status::ok()),
            Err(e) => reply(status::of_error(&e)),
        };
    }
    if outcome == native::TxnOutcome::Unknown {
        // Still unknown: the check-back asks again later.
        return reply(status::ok());
    }
    // The producer's own end, for the transactions of its topic's group. A topic that
    // is no topic name (a `%` could make another user's bound group) ends nothing.
    let topic = req.topic.map(|t| t.name).unwrap_or_default();
    if crate::service::name("topic", &topic).is_err() {
        return reply(status::of(
            pb::Code::IllegalTopic,
            format!("{topic:?} is not a topic name"),
        ));
    }
    let group = txn_group(&topic, &who);
    match txn::end_as(&shared, &who, txn, outcome, group).await {
        Ok(_) => reply(status::ok()),
        Err(e) => reply(status::of_error(&e)),
    }
}

/// Recalls (cancels) a delayed message before its time: its recall handle is its txmq
/// id (what `txmq scheduled cancel` takes too). A recall after delivery is refused.
pub async fn recall(
    endpoint: &Endpoint,
    who: &Principal,
    req: pb::RecallMessageRequest,
) -> pb::RecallMessageResponse {
    let reply = |s, id: String| pb::RecallMessageResponse {
        status: Some(s),
        message_id: id,
    };
    let shared = match endpoint.shared() {
        Ok(s) => s,
        Err(s) => return reply(s, String::new()),
    };
    // One answer for every refusal (unknown, another topic, delivered): a handle is a
    // secret id, and the answer must not say what another one is.
    let refused = || {
        reply(
            status::of(
                pb::Code::MessageNotFound,
                "no delayed message of this topic waits under that recall handle",
            ),
            String::new(),
        )
    };
    let Some(id) = crate::ids::Id::parse(&req.recall_handle) else {
        return refused();
    };
    let topic = req.topic.map(|t| t.name).unwrap_or_default();
    match scheduled::recall(&shared, who, topic, id).await {
        Ok(true) => reply(status::ok(), req.recall_handle),
        Ok(false) => refused(),
        Err(e) => reply(status::of_error(&e), String::new()),
    }
}
