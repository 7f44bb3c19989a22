//! SEND_MESSAGE (long field names: Go's single sends), SEND_MESSAGE_V2 (short names:
//! Java's), SEND_BATCH_MESSAGE, and END_TRANSACTION.
//!
//! A RocketMQ message becomes a txmq message: `KEYS` (space-separated) is the key,
//! `TAGS` the tag, `UNIQ_KEY` (the id the client made) stays a property and names the
//! message for the broker's dedup (scoped by producer group, compared by content: a
//! client's resend after a lost answer is stored once); `DELAY` levels 1–18 and the
//! 5.x `TIMER_DELIVER_MS` / `TIMER_DELAY_SEC` / `TIMER_DELAY_MS` (and
//! `__STARTDELIVERTIME`) become the delivery time; `__SHARDINGKEY` the message group.
//! A zlib-compressed body (Java compresses above 4 KiB) is stored inflated, so every
//! face's consumer gets the body that was meant. A half message (`TRAN_MSG`, sysFlag
//! 4) starts a transaction of its producer group, whose id is the `transactionId` of
//! the answer: END_TRANSACTION names it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use txmq_protocol::pb as native;

use super::codes;
use super::connection::Conn;
use super::frame::Command;
use super::record::{self, sys_flag};
use super::{Endpoint, invalid, number_or, refusal, required};
use crate::ids::Id;
use crate::service::{Principal, Shared, admin, send, txn};

/// The property with the client's own message id.
pub const UNIQ_KEY: &str = "UNIQ_KEY";
/// The property that keeps a message's user flag (`Message.flag`) when not 0.
pub const FLAG: &str = "__RMQ_FLAG";

/// RocketMQ's delay levels 1–18 (`messageDelayLevel`).
pub const DELAY_LEVELS: [Duration; 18] = {
    const fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }
    [
        s(1),
        s(5),
        s(10),
        s(30),
        s(60),
        s(120),
        s(180),
        s(240),
        s(300),
        s(360),
        s(420),
        s(480),
        s(540),
        s(600),
        s(1200),
        s(1800),
        s(3600),
        s(7200),
    ]
};

/// The delay of level `level` (0: none; above 18: 18).
pub fn delay_of(level: i64) -> Option<Duration> {
    (level > 0).then(|| DELAY_LEVELS[(level.min(18) - 1) as usize])
}

/// Properties the broker reads or that belong to one hop only: not stored.
const NOT_STORED: [&str; 19] = [
    "KEYS",
    "TAGS",
    "WAIT",
    "DELAY",
    "TRAN_MSG",
    "PGROUP",
    "TIMER_DELIVER_MS",
    "TIMER_DELAY_SEC",
    "TIMER_DELAY_MS",
    "__STARTDELIVERTIME",
    "__SHARDINGKEY",
    "MIN_OFFSET",
    "MAX_OFFSET",
    "CONSUME_START_TIME",
    "__transactionId__",
    "REAL_TOPIC",
    "REAL_QID",
    "POP_CK",
    "1ST_POP_TIME",
];

/// A send's header, from either spelling.
#[derive(Debug)]
struct Header {
    group: String,
    topic: String,
    queue_id: i32,
    sys_flag: i32,
    born_ms: u64,
    flag: i32,
    properties: String,
}

fn header(req: &Command) -> Result<Header, Command> {
    let short = req.code != codes::SEND_MESSAGE;
    let name = |long: &'static str, short_name: &'static str| if short { short_name } else { long };
    Ok(Header {
        group: required(req, name("producerGroup", "a"))?.to_string(),
        topic: required(req, name("topic", "b"))?.to_string(),
        queue_id: number_or(req, name("queueId", "e"), -1)?,
        sys_flag: number_or(req, name("sysFlag", "f"), 0)?,
        born_ms: number_or::<i64>(req, name("bornTimestamp", "g"), 0)?.max(0) as u64,
        flag: number_or(req, name("flag", "h"), 0)?,
        properties: req
            .field(name("properties", "i"))
            .unwrap_or_default()
            .to_string(),
    })
}

/// One message as txmq stores it.
struct Converted {
    message: native::Message,
    uniq: String,
    half: bool,
}

/// One message as the request carries it.
struct Incoming<'a> {
    topic: &'a str,
    body: Bytes,
    sys: i32,
    flag: i32,
    born_ms: u64,
    properties: &'a str,
}

fn convert(m: Incoming<'_>, max_body: usize, dedup: bool) -> Result<Converted, String> {
    let Incoming {
        topic,
        body,
        sys,
        flag,
        born_ms,
        properties,
    } = m;
    let body = if sys & sys_flag::COMPRESSED != 0 {
        Bytes::from(record::inflate(&body, sys, max_body)?)
    } else {
        body
    };
    let props: HashMap<String, String> = record::properties(properties).into_iter().collect();
    let get = |k: &str| props.get(k).map(String::as_str).unwrap_or_default();
    let number = |k: &str| -> Result<i64, String> {
        match get(k) {
            "" => Ok(0),
            v => v
                .trim()
                .parse()
                .map_err(|_| format!("the property {k} ({v:?}) is not a number")),
        }
    };
    let now = txmq_protocol::now_ms();
    let after = |d: Duration| now.saturating_add(d.as_millis() as u64);
    let level = number("DELAY")?;
    // A delay level wins over the timer properties, as RocketMQ's broker decides.
    let deliver_at_ms = if let Some(d) = delay_of(level) {
        after(d)
    } else if let Ok(at @ 1..) = number("TIMER_DELIVER_MS") {
        at as u64
    } else if let Ok(s @ 1..) = number("TIMER_DELAY_SEC") {
        after(Duration::from_secs(s as u64))
    } else if let Ok(ms @ 1..) = number("TIMER_DELAY_MS") {
        after(Duration::from_millis(ms as u64))
    } else if let Ok(at @ 1..) = number("__STARTDELIVERTIME") {
        at as u64
    } else {
        0
    };
    let half = sys & sys_flag::TRANSACTION == sys_flag::PREPARED || get("TRAN_MSG") == "true";
    let uniq = get(UNIQ_KEY).to_string();
    let mut properties: HashMap<String, String> = props
        .iter()
        .filter(|(k, _)| !NOT_STORED.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if flag != 0 {
        properties.insert(FLAG.into(), flag.to_string());
    }
    let message = native::Message {
        topic: topic.to_string(),
        body,
        key: get("KEYS").to_string(),
        tag: get("TAGS").to_string(),
        properties,
        born_ms,
        deliver_at_ms: if half { 0 } else { deliver_at_ms },
        message_group: get("__SHARDINGKEY").to_string(),
        idempotency_key: if dedup && !half {
            uniq.clone()
        } else {
            String::new()
        },
    };
    Ok(Converted {
        message,
        uniq,
        half,
    })
}

/// The properties of a stored message as a RocketMQ client reads them, with `extra`.
pub fn outgoing_properties(m: &native::StoredMessage, extra: &[(&str, &str)]) -> String {
    let mut props: Vec<(&str, &str)> = m
        .properties
        .iter()
        .filter(|(k, _)| k.as_str() != FLAG)
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if !m.key.is_empty() {
        props.push(("KEYS", &m.key));
    }
    if !m.tag.is_empty() {
        props.push(("TAGS", &m.tag));
    }
    if !m.properties.contains_key(UNIQ_KEY) {
        props.push((UNIQ_KEY, &m.message_id));
    }
    if !m.message_group.is_empty() {
        props.push(("__SHARDINGKEY", &m.message_group));
    }
    props.extend_from_slice(extra);
    record::properties_text(props)
}

/// A stored message's user flag.
pub fn user_flag(m: &native::StoredMessage) -> i32 {
    m.properties
        .get(FLAG)
        .and_then(|f| f.parse().ok())
        .unwrap_or(0)
}

/// The messages of a send request.
fn messages(
    req: &Command,
    h: &Header,
    max_body: usize,
    dedup: bool,
) -> Result<Vec<Converted>, Command> {
    let bad = |why: String| Command::answer(req, codes::MESSAGE_ILLEGAL, Some(why));
    if req.code != codes::SEND_BATCH_MESSAGE {
        let one = convert(
            Incoming {
                topic: &h.topic,
                body: req.body.clone(),
                sys: h.sys_flag,
                flag: h.flag,
                born_ms: h.born_ms,
                properties: &h.properties,
            },
            max_body,
            dedup,
        )
        .map_err(bad)?;
        return Ok(vec![one]);
    }
    let batch = record::batch(req.body.clone(), send::MAX_BATCH).map_err(bad)?;
    if batch.is_empty() {
        return Err(bad("the batch holds no message".into()));
    }
    let mut out = Vec::with_capacity(batch.len());
    for m in batch {
        // Batches are not compressed (the clients never do) and carry no half messages.
        let one = convert(
            Incoming {
                topic: &h.topic,
                body: m.body,
                sys: 0,
                flag: m.flag,
                born_ms: h.born_ms,
                properties: &m.properties,
            },
            max_body,
            dedup,
        )
        .map_err(bad)?;
        if one.half {
            return Err(bad("a batch cannot carry half messages".into()));
        }
        out.push(one);
    }
    Ok(out)
}

/// The answer to a stored send.
fn stored(
    ep: &Endpoint,
    shared: &Shared,
    req: &Command,
    queue_id: i32,
    receipts: &[native::MessageReceipt],
    uniq: &[String],
    txn: Option<Id>,
) -> Command {
    let ids: Vec<String> = receipts
        .iter()
        .map(|r| {
            let handle = match (r.offset, admin::topic_id(shared, &r.topic)) {
                (o, Some(id)) if o > 0 || r.deliver_ms == 0 => record::handle(id, o),
                _ => 0,
            };
            record::message_id(ep.advertised, handle)
        })
        .collect();
    let offset = receipts.first().map_or(0, |r| r.offset);
    let transaction_id = match txn {
        Some(t) => t.to_string(),
        None => uniq.first().cloned().unwrap_or_default(),
    };
    Command::answer(req, codes::SUCCESS, None)
        .with("msgId", ids.join(","))
        .with("queueId", queue_id)
        .with("queueOffset", offset)
        .with("transactionId", transaction_id)
        .with("MSG_REGION", "DefaultRegion")
        .with("TRACE_ON", "false")
}

/// SEND_MESSAGE, SEND_MESSAGE_V2 and SEND_BATCH_MESSAGE.
pub async fn send(ep: &Endpoint, conn: &Arc<Conn>, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let h = match header(req) {
        Ok(h) => h,
        Err(answer) => return answer,
    };
    if h.topic.starts_with("%RETRY%") || h.topic.starts_with("%DLQ%") {
        return invalid(
            req,
            "retry and dead-letter topics are the broker's; a consumer sends a message back \
             with CONSUMER_SEND_MSG_BACK",
        );
    }
    // The name before anything is made of it (a batch would copy it per message).
    if let Err(e) = crate::service::name("topic", &h.topic) {
        return refusal(req, &e);
    }
    if let Err(e) = crate::service::name("producer group", &h.group) {
        return refusal(req, &e);
    }
    let dedup = !shared.config.dedup_window.is_zero();
    let converted = match messages(req, &h, shared.config.max_message_bytes, dedup) {
        Ok(m) => m,
        Err(answer) => return answer,
    };
    let queues = i32::try_from(ep.queues(&shared, &h.topic)).unwrap_or(i32::MAX);
    let queue_id = if (0..queues).contains(&h.queue_id) {
        h.queue_id
    } else {
        0
    };
    let uniq: Vec<String> = converted.iter().map(|c| c.uniq.clone()).collect();
    let half = converted.iter().any(|c| c.half);
    let messages: Vec<native::Message> = converted.into_iter().map(|c| c.message).collect();
    let mut who = who.clone();
    who.producer_group = h.group.clone();
    if half {
        // The connection that prepares answers the group's checks, even before its
        // first heartbeat (which can come 30 s after the producer starts).
        if let Err(e) = conn.answer_checks(ep, &shared, &who, &h.group) {
            return refusal(req, &e);
        }
        let group = txn::OwnGroup::declared(&h.group);
        return match send::prepare_as(&shared, &who, group, messages).await {
            Ok((txn, receipts)) => stored(ep, &shared, req, queue_id, &receipts, &uniq, Some(txn)),
            Err(e) => refusal(req, &e),
        };
    }
    match send::store(&shared, &who, messages).await {
        Ok(receipts) => stored(ep, &shared, req, queue_id, &receipts, &uniq, None),
        Err(e) => refusal(req, &e),
    }
}

/// END_TRANSACTION: the producer's outcome, or its answer to a check. It is one-way:
/// what cannot be done (a commit after a rollback, an unknown transaction) is logged
/// and counted, and the client learns nothing.
pub async fn end(ep: &Endpoint, conn: &Arc<Conn>, who: &Principal, req: &Command) -> Command {
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return refusal(req, &e),
    };
    let group = match required(req, "producerGroup") {
        Ok(g) => g.to_string(),
        Err(answer) => return answer,
    };
    let Some(txn) = req.field("transactionId").and_then(Id::parse) else {
        ended(&shared, "no transaction of this broker named");
        return invalid(
            req,
            "transactionId names no transaction of this broker (32 hexadecimal digits)",
        );
    };
    let outcome = match req.field("commitOrRollback").map(str::trim) {
        Some("8") => native::TxnOutcome::Commit,
        Some("12") => native::TxnOutcome::Rollback,
        Some("0") => native::TxnOutcome::Unknown,
        other => {
            ended(&shared, "bad commitOrRollback");
            return invalid(
                req,
                format!("commitOrRollback {other:?} is none of 8 (commit), 12 (rollback), 0"),
            );
        }
    };
    let mut who = who.clone();
    who.producer_group = group.clone();
    let from_check = req.field("fromTransactionCheck") == Some("true");
    if from_check && let Some((link, (check_id, asked))) = conn.answered(&shared, txn) {
        let reply = native::CheckReply {
            txn_id: txn.to_string(),
            outcome: outcome as i32,
        };
        let own = txn::OwnGroup::declared(&asked);
        return match txn::answer_check(&shared, &who, &own, link, check_id, reply).await {
            Ok(()) => Command::answer(req, codes::SUCCESS, None),
            Err(e) => {
                ended(&shared, "check answer refused");
                tracing::warn!(%txn, "a check answer was not taken: {e}");
                refusal(req, &e)
            }
        };
    }
    if outcome == native::TxnOutcome::Unknown {
        // The producer does not know yet: the check-back will ask.
        return Command::answer(req, codes::SUCCESS, None);
    }
    let own = txn::OwnGroup::declared(&group);
    match txn::end_as(&shared, &who, txn, outcome, own).await {
        Ok(()) => Command::answer(req, codes::SUCCESS, None),
        Err(e) => {
            ended(&shared, "end refused");
            tracing::warn!(%txn, group = %group, ?outcome, "END_TRANSACTION not done: {e}");
            let what = format!(
                "a one-way {} (Remoting END_TRANSACTION) from {}",
                if outcome == native::TxnOutcome::Commit {
                    "commit"
                } else {
                    "rollback"
                },
                conn.peer
            );
            txn::note_refused_end(&shared, txn, &e, what).await;
            refusal(req, &e)
        }
    }
}

/// Counts an END_TRANSACTION that did nothing (the client, one-way, never learns it).
fn ended(shared: &Shared, why: &'static str) {
    shared
        .metrics
        .remoting_ends_refused
        .with_label_values(&[why])
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming<'a>(body: &'static [u8], sys: i32, flag: i32, properties: &'a str) -> Incoming<'a> {
        Incoming {
            topic: "T",
            body: Bytes::from_static(body),
            sys,
            flag,
            born_ms: 5,
            properties,
        }
    }

    fn props(p: &[(&str, &str)]) -> String {
        record::properties_text(p.iter().copied())
    }

    #[test]
    fn a_rocketmq_message_becomes_a_txmq_message() {
        let p = props(&[
            ("KEYS", "k1 k2"),
            ("TAGS", "TagA"),
            (UNIQ_KEY, "ABC"),
            ("WAIT", "true"),
            ("color", "red"),
        ]);
        let c = convert(incoming(b"x", 0, 7, &p), 100, true).unwrap();
        assert_eq!(
            (c.message.key.as_str(), c.message.tag.as_str()),
            ("k1 k2", "TagA")
        );
        assert_eq!(c.message.properties.get("color").unwrap(), "red");
        assert_eq!(c.message.properties.get(UNIQ_KEY).unwrap(), "ABC");
        assert_eq!(c.message.properties.get(FLAG).unwrap(), "7");
        assert!(!c.message.properties.contains_key("WAIT"));
        assert_eq!(c.message.idempotency_key, "ABC");
        assert!(!c.half);
        let no_dedup = convert(incoming(b"", 0, 0, &p), 100, false).unwrap();
        assert!(no_dedup.message.idempotency_key.is_empty());
    }

    #[test]
    fn delays_map_to_delivery_times() {
        let now = txmq_protocol::now_ms();
        let at = |p: &[(&str, &str)]| {
            convert(incoming(b"", 0, 0, &props(p)), 10, false)
                .unwrap()
                .message
                .deliver_at_ms
        };
        assert!((now + 10_000..now + 12_000).contains(&at(&[("DELAY", "3")])));
        assert!(at(&[("DELAY", "99")]) >= now + 7_200_000);
        assert_eq!(at(&[("TIMER_DELIVER_MS", "123456")]), 123_456);
        assert!((now + 5_000..now + 7_000).contains(&at(&[("TIMER_DELAY_SEC", "5")])));
        // A level wins over a timer.
        assert!(at(&[("DELAY", "1"), ("TIMER_DELAY_SEC", "500")]) < now + 3_000);
        assert_eq!(at(&[]), 0);
        let bad = props(&[("DELAY", "x")]);
        assert!(convert(incoming(b"", 0, 0, &bad), 10, false).is_err());
    }

    #[test]
    fn half_messages_are_recognised_and_not_deduplicated() {
        let p = props(&[("TRAN_MSG", "true"), ("PGROUP", "pg"), (UNIQ_KEY, "U")]);
        let c = convert(incoming(b"", sys_flag::PREPARED, 0, &p), 10, true).unwrap();
        assert!(c.half);
        assert!(c.message.idempotency_key.is_empty());
        assert!(!c.message.properties.contains_key("PGROUP"));
    }
}
