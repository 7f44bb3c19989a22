//! Ending transactions, operator views and control, and producers' check answers.

use std::sync::Arc;

use txmq_protocol::ErrorCode;
use txmq_protocol::pb::{self, TxnOutcome, TxnState};

use super::Session;
use super::Shared;
use super::{Pending, later, ready};
use crate::error::{Error, Result};
use crate::ids::Id;
use crate::storage::records::TxnRecord;
use crate::storage::writer::{Command, Outcome};
use crate::txn::checker::CheckAnswer;
use crate::txn::state::Resolver;

/// Commit or roll back (or record `unknown`). Repeats are no-op successes; a conflicting
/// resolution is refused with its own code (I2).
pub fn end(id: u64, req: pb::EndTxnRequest, session: &Session, shared: &Arc<Shared>) -> Pending {
    let (txn, cmd) = match end_command(&req, session) {
        Ok(checked) => checked,
        Err(e) => return ready(id, Err(e)),
    };
    let writer = shared.writer.clone();
    later(id, async move {
        let ok = end_ok(txn, writer.submit(cmd).await)?;
        Ok(pb::response::Result::EndTxn(ok))
    })
}

/// Most calls in one [`pb::TxnBatchRequest`].
pub const MAX_CALLS: usize = 10_000;

/// Prepares and ends of many transactions in one request (what a client coalesces from
/// concurrent transactions): every call is checked and answered on its own, and all of
/// them are stored in one write.
pub fn batch(
    id: u64,
    req: pb::TxnBatchRequest,
    session: &Session,
    shared: &Arc<Shared>,
) -> Pending {
    if req.calls.is_empty() {
        return ready(id, Err(Error::Invalid("txn batch carries no calls".into())));
    }
    if req.calls.len() > MAX_CALLS {
        return ready(
            id,
            Err(Error::Invalid(format!(
                "txn batch carries {} calls; the limit is {MAX_CALLS}",
                req.calls.len()
            ))),
        );
    }
    let mut commands = Vec::with_capacity(req.calls.len());
    let checked: Vec<Result<Call>> = req
        .calls
        .into_iter()
        .map(|c| {
            let (call, cmd) = check_call(c, session, shared)?;
            commands.push(cmd);
            Ok(call)
        })
        .collect();
    let writer = shared.writer.clone();
    later(id, async move {
        let mut outcomes = if commands.is_empty() {
            Vec::new()
        } else {
            match writer.submit(Command::Many(commands)).await? {
                Outcome::Many(outcomes) => outcomes,
                other => return Err(Error::Internal(format!("txn batch gave {other:?}"))),
            }
        }
        .into_iter();
        let results = checked
            .into_iter()
            .map(|call| {
                let answer = call.and_then(|call| {
                    let outcome = outcomes
                        .next()
                        .ok_or_else(|| Error::Internal("txn batch lost an outcome".into()))?;
                    Ok(match call {
                        Call::Prepare => Answer::Prepared(super::send::send_ok(outcome)?),
                        Call::End(txn) => Answer::Ended(end_ok(txn, outcome)?),
                    })
                });
                call_result(answer)
            })
            .collect();
        Ok(pb::response::Result::TxnBatch(pb::TxnBatchOk { results }))
    })
}

/// A checked call of a batch, remembering what its outcome means.
enum Call {
    Prepare,
    End(Id),
}

fn check_call(call: pb::TxnCall, session: &Session, shared: &Shared) -> Result<(Call, Command)> {
    match call.call {
        Some(pb::txn_call::Call::Prepare(req)) => {
            if !req.transactional {
                return Err(Error::Invalid(
                    "a send in a txn batch must be transactional".into(),
                ));
            }
            Ok((Call::Prepare, super::send::command(req, session, shared)?))
        }
        Some(pb::txn_call::Call::End(req)) => {
            let (txn, cmd) = end_command(&req, session)?;
            Ok((Call::End(txn), cmd))
        }
        None => Err(Error::Invalid(
            "a txn batch call is neither prepare nor end".into(),
        )),
    }
}

type Answer = pb::txn_call_result::Result;

fn call_result(answer: Result<Answer>) -> pb::TxnCallResult {
    match answer {
        Ok(answer) => pb::TxnCallResult {
            code: ErrorCode::Ok as i32,
            message: String::new(),
            result: Some(answer),
        },
        Err(e) => pb::TxnCallResult {
            code: e.code() as i32,
            message: e.to_string(),
            result: None,
        },
    }
}

/// Checks an end request and turns it into the writer's command. A producer may end only
/// its own group's transactions (the writer compares); `operator` needs an admin
/// connection.
fn end_command(req: &pb::EndTxnRequest, session: &Session) -> Result<(Id, Command)> {
    let txn = super::txn_id(&req.txn_id)?;
    let outcome = match TxnOutcome::try_from(req.outcome) {
        Ok(o @ (TxnOutcome::Commit | TxnOutcome::Rollback | TxnOutcome::Unknown)) => o,
        _ => {
            return Err(Error::Invalid(
                "outcome must be COMMIT, ROLLBACK or UNKNOWN".into(),
            ));
        }
    };
    let hello = session.hello.as_ref().ok_or(Error::HandshakeRequired)?;
    let by = if req.operator {
        if hello.role != pb::Role::Admin as i32 {
            return Err(Error::Invalid(
                "operator resolution needs an admin connection (txmq txn commit|rollback)".into(),
            ));
        }
        Resolver::Operator
    } else {
        Resolver::Producer(hello.producer_group.clone())
    };
    Ok((txn, Command::End { txn, outcome, by }))
}

/// The answer to an end, from what the writer made of it.
fn end_ok(txn: Id, outcome: Result<Outcome>) -> Result<pb::EndTxnOk> {
    match outcome? {
        Outcome::Ended {
            state,
            repeated,
            receipts,
        } => Ok(pb::EndTxnOk {
            txn_id: txn.to_string(),
            state: state as i32,
            repeated,
            receipts,
        }),
        other => Err(Error::Internal(format!("end gave {other:?}"))),
    }
}

/// Lists transactions for operators.
pub fn list(id: u64, req: pb::ListTxnsRequest, shared: &Arc<Shared>) -> Pending {
    let storage = shared.storage.clone();
    let after = if req.after_txn_id.is_empty() {
        None
    } else {
        match super::txn_id(&req.after_txn_id) {
            Ok(id) => Some(id),
            Err(e) => return ready(id, Err(e)),
        }
    };
    later(id, async move {
        let limit = super::page(req.limit);
        let state = req.state;
        let group = req.producer_group;
        let txns = tokio::task::spawn_blocking(move || {
            storage.list_txns(
                after,
                |r| {
                    (state == TxnState::Unspecified as i32 || r.state == state)
                        && (group.is_empty() || r.group == group)
                },
                limit,
            )
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        Ok(pb::response::Result::Txns(pb::ListTxnsOk {
            txns: txns.into_iter().map(|(id, r)| info(id, r)).collect(),
            now_ms: txmq_protocol::now_ms(),
        }))
    })
}

/// Re-arms a discarded transaction: check count back to zero, checked at once.
pub fn rearm(id: u64, req: pb::RearmTxnRequest, shared: &Arc<Shared>) -> Pending {
    let txn = match super::txn_id(&req.txn_id) {
        Ok(t) => t,
        Err(e) => return ready(id, Err(e)),
    };
    let writer = shared.writer.clone();
    later(id, async move {
        match writer.submit(Command::Rearm { txn }).await? {
            Outcome::Txn(rec) => Ok(pb::response::Result::Txn(info(txn, *rec))),
            other => Err(Error::Internal(format!("rearm gave {other:?}"))),
        }
    })
}

/// Routes a producer's answer to a check to the scheduler.
pub async fn check_reply(
    check_id: u64,
    reply: pb::CheckReply,
    session: &Session,
    shared: &Arc<Shared>,
) {
    tracing::debug!(connection = session.id, check_id, txn = %reply.txn_id, outcome = reply.outcome, "check answer");
    let answer = CheckAnswer {
        connection_id: session.id,
        check_id,
        reply,
        proven: false,
    };
    let _ = shared.answers.send(answer).await;
}

/// A transaction record as operators see it.
pub fn info(id: Id, r: TxnRecord) -> pb::TxnInfo {
    pb::TxnInfo {
        txn_id: id.to_string(),
        producer_group: r.group,
        state: r.state,
        topics: r.topics,
        message_count: r.message_count,
        created_ms: r.created_ms,
        check_count: r.check_count,
        last_check_result: r.last_result,
        last_check_note: r.last_note,
        next_check_ms: r.next_check_ms,
        resolved_ms: r.resolved_ms,
    }
}
