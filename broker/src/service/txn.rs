//! Ending transactions, operator views and control, and producers' check answers.

use std::sync::Arc;

use txmq_protocol::ErrorCode;
use txmq_protocol::pb::{self, TxnOutcome, TxnState};

use super::Shared;
use super::access::{Operation, Resource, permit};
use super::{Answer, Principal, later, now};
use crate::error::{Error, Result};
use crate::ids::Id;
use crate::storage::records::TxnRecord;
use crate::storage::writer::{Command, Outcome};
use crate::txn::checker::CheckAnswer;
use crate::txn::state::Resolver;

/// Commit or roll back (or record `unknown`). Repeats are no-op successes; a conflicting
/// resolution is refused with its own code (I2).
pub fn end(shared: &Arc<Shared>, who: &Principal, req: pb::EndTxnRequest) -> Answer<pb::EndTxnOk> {
    let (txn, cmd) = match end_command(&req, who, shared) {
        Ok(checked) => checked,
        Err(e) => return now(Err(e)),
    };
    let writer = shared.writer.clone();
    later(async move {
        let ok = end_ok(txn, writer.submit(cmd).await)?;
        Ok(ok)
    })
}

/// Most calls in one [`pb::TxnBatchRequest`].
pub const MAX_CALLS: usize = 10_000;

/// Prepares and ends of many transactions in one request (what a client coalesces from
/// concurrent transactions): every call is checked and answered on its own, and all of
/// them are stored in one write.
pub fn batch(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::TxnBatchRequest,
) -> Answer<pb::TxnBatchOk> {
    if req.calls.is_empty() {
        return now(Err(Error::Invalid("txn batch carries no calls".into())));
    }
    if req.calls.len() > MAX_CALLS {
        return now(Err(Error::Invalid(format!(
            "txn batch carries {} calls; the limit is {MAX_CALLS}",
            req.calls.len()
        ))));
    }
    let mut commands = Vec::with_capacity(req.calls.len());
    let checked: Vec<Result<Call>> = req
        .calls
        .into_iter()
        .map(|c| {
            let (call, cmd) = check_call(c, who, shared)?;
            commands.push(cmd);
            Ok(call)
        })
        .collect();
    let writer = shared.writer.clone();
    later(async move {
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
                        Call::Prepare => CallAnswer::Prepared(super::send::send_ok(outcome)?),
                        Call::End(txn) => CallAnswer::Ended(end_ok(txn, outcome)?),
                    })
                });
                call_result(answer)
            })
            .collect();
        Ok(pb::TxnBatchOk { results })
    })
}

/// A checked call of a batch, remembering what its outcome means.
enum Call {
    Prepare,
    End(Id),
}

fn check_call(call: pb::TxnCall, who: &Principal, shared: &Shared) -> Result<(Call, Command)> {
    match call.call {
        Some(pb::txn_call::Call::Prepare(req)) => {
            if !req.transactional {
                return Err(Error::Invalid(
                    "a send in a txn batch must be transactional".into(),
                ));
            }
            Ok((Call::Prepare, super::send::command(req, who, shared)?))
        }
        Some(pb::txn_call::Call::End(req)) => {
            let (txn, cmd) = end_command(&req, who, shared)?;
            Ok((Call::End(txn), cmd))
        }
        None => Err(Error::Invalid(
            "a txn batch call is neither prepare nor end".into(),
        )),
    }
}

type CallAnswer = pb::txn_call_result::Result;

fn call_result(answer: Result<CallAnswer>) -> pb::TxnCallResult {
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
fn end_command(req: &pb::EndTxnRequest, who: &Principal, shared: &Shared) -> Result<(Id, Command)> {
    let txn = super::txn_id(&req.txn_id)?;
    let outcome = match TxnOutcome::try_from(req.outcome) {
        Ok(o @ (TxnOutcome::Commit | TxnOutcome::Rollback | TxnOutcome::Unknown)) => o,
        _ => {
            return Err(Error::Invalid(
                "outcome must be COMMIT, ROLLBACK or UNKNOWN".into(),
            ));
        }
    };
    let by = if req.operator {
        if !who.admin {
            return Err(Error::Invalid(
                "operator resolution needs an admin connection (txmq txn commit|rollback)".into(),
            ));
        }
        // Any producer group's transaction, named by its id alone.
        permit(
            shared,
            who,
            Operation::ResolveTxn,
            &[Resource::ProducerGroup("")],
        )?;
        Resolver::Operator
    } else {
        let group = &who.producer_group;
        permit(
            shared,
            who,
            Operation::EndTxn,
            &[Resource::ProducerGroup(group)],
        )?;
        Resolver::Producer(group.clone())
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
pub fn list(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::ListTxnsRequest,
) -> Answer<pb::ListTxnsOk> {
    if let Err(e) = permit(
        shared,
        who,
        Operation::ListTxns,
        &[Resource::ProducerGroup(&req.producer_group)],
    ) {
        return now(Err(e));
    }
    let storage = shared.storage.clone();
    let after = if req.after_txn_id.is_empty() {
        None
    } else {
        match super::txn_id(&req.after_txn_id) {
            Ok(id) => Some(id),
            Err(e) => return now(Err(e)),
        }
    };
    later(async move {
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
        Ok(pb::ListTxnsOk {
            txns: txns.into_iter().map(|(id, r)| info(id, r)).collect(),
            now_ms: txmq_protocol::now_ms(),
        })
    })
}

/// Re-arms a discarded transaction: check count back to zero, checked at once.
pub fn rearm(
    shared: &Arc<Shared>,
    who: &Principal,
    req: pb::RearmTxnRequest,
) -> Answer<pb::TxnInfo> {
    if let Err(e) = permit(
        shared,
        who,
        Operation::RearmTxn,
        &[Resource::ProducerGroup("")],
    ) {
        return now(Err(e));
    }
    let txn = match super::txn_id(&req.txn_id) {
        Ok(t) => t,
        Err(e) => return now(Err(e)),
    };
    let writer = shared.writer.clone();
    later(async move {
        match writer.submit(Command::Rearm { txn }).await? {
            Outcome::Txn(rec) => Ok(info(txn, *rec)),
            other => Err(Error::Internal(format!("rearm gave {other:?}"))),
        }
    })
}

/// Routes a producer's answer to a check to the scheduler.
pub async fn check_reply(
    shared: &Arc<Shared>,
    who: &Principal,
    check_id: u64,
    reply: pb::CheckReply,
) {
    tracing::debug!(connection = who.connection_id, check_id, txn = %reply.txn_id, outcome = reply.outcome, "check answer");
    let group = &who.producer_group;
    if let Err(e) = permit(
        shared,
        who,
        Operation::AnswerChecks,
        &[Resource::ProducerGroup(group)],
    ) {
        tracing::warn!(connection = who.connection_id, "check answer refused: {e}");
        return;
    }
    let answer = CheckAnswer {
        connection_id: who.connection_id,
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
        refused_ends: r.refused_ends,
        refused_note: r.refused_note,
    }
}

/// Records on transaction `txn` an end that was refused with no client told (a
/// one-way END_TRANSACTION), so operators see it in its listing. Only a conflict with
/// how it ended is recorded: anything else (an unknown id, another group) names no
/// transaction of the sender's.
pub async fn note_refused_end(shared: &Arc<Shared>, txn: Id, refused: &Error, what: String) {
    if !matches!(refused, Error::TxnCommitted(_) | Error::TxnRolledBack(_)) {
        return;
    }
    let note = format!("{what} refused: {refused}");
    if let Err(e) = shared
        .writer
        .submit(Command::NoteRefusedEnd { txn, note })
        .await
    {
        tracing::warn!(%txn, "a refused end was not recorded: {e}");
    }
}

/// Makes connection `connection_id` one that the check-backs of producer `group` may
/// ask (a producer that answers checks), through `sink`; `scopes` narrow it to the
/// transactions that carry one of them (empty: all of the group's).
///
/// # Errors
/// Not permitted.
pub fn answer_checks(
    shared: &Shared,
    who: &Principal,
    group: &OwnGroup,
    connection_id: u64,
    scopes: Vec<String>,
    sink: &super::consume::Sink,
) -> Result<()> {
    permit(
        shared,
        who,
        Operation::AnswerChecks,
        &[Resource::ProducerGroup(&group.name)],
    )?;
    shared.producers.register_scoped(
        &group.bound,
        connection_id,
        sink.outbound.clone(),
        sink.stall.clone(),
        scopes,
    );
    Ok(())
}

/// Whether `who` may answer `group`'s checks (asked again when rules change).
///
/// # Errors
/// Not permitted.
pub fn may_answer_checks(shared: &Shared, who: &Principal, group: &OwnGroup) -> Result<()> {
    permit(
        shared,
        who,
        Operation::AnswerChecks,
        &[Resource::ProducerGroup(&group.name)],
    )
}

/// Connection `connection_id` answers no more checks (it closed).
pub fn stop_answering(shared: &Shared, connection_id: u64) {
    shared.producers.unregister(connection_id);
}

/// A producer group a face makes for its clients (gRPC's `%GRPC%<topic>`: they declare
/// none), as one principal's. Rules name it by `name`; its transactions are kept under
/// `bound`, which adds a user's name, so that only that user's connections end them or
/// are asked their checks: another publisher of the topic cannot (issue 26, item 5).
/// Without users (anonymous, or the shared token) there is no one to bind to, and
/// `bound` is `name`. `%` is in no name a client can give, so no one can claim a bound
/// group by naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnGroup {
    /// What rules name (`producer-group:%GRPC%orders`).
    pub name: String,
    /// What the transactions and check-back registrations are kept under.
    pub bound: String,
}

impl OwnGroup {
    /// The group `name` as `who`'s.
    pub fn of(name: String, who: &Principal) -> Self {
        let bound = match &who.identity {
            crate::auth::Identity::User { name: user, .. } => format!("{name}%{user}"),
            crate::auth::Identity::Anonymous | crate::auth::Identity::Token => name.clone(),
        };
        Self { name, bound }
    }

    /// A group a client named itself (a native producer's): shared by every
    /// connection that declares it and may.
    pub fn declared(name: &str) -> Self {
        Self {
            name: name.to_string(),
            bound: name.to_string(),
        }
    }
}

/// Ends transaction `txn` of `group` as its producer: commit or rollback, idempotent, a
/// conflicting end refused (I2). The faces that bind a transaction to a group of their
/// own making (gRPC's `%GRPC%<topic>`) name it here.
pub fn end_as(
    shared: &Arc<Shared>,
    who: &Principal,
    txn: Id,
    outcome: TxnOutcome,
    group: OwnGroup,
) -> Answer<()> {
    if let Err(e) = permit(
        shared,
        who,
        Operation::EndTxn,
        &[Resource::ProducerGroup(&group.name)],
    ) {
        return now(Err(e));
    }
    if !matches!(outcome, TxnOutcome::Commit | TxnOutcome::Rollback) {
        return now(Err(Error::Invalid(
            "outcome must be COMMIT or ROLLBACK".into(),
        )));
    }
    let writer = shared.writer.clone();
    later(async move {
        writer
            .submit(Command::End {
                txn,
                outcome,
                by: Resolver::Producer(group.bound),
            })
            .await
            .map(|_| ())
    })
}

/// Hands the answer to check `check_id` of connection `connection_id` to the scheduler,
/// from a face that proved the answer answers that check (a gRPC stream it was sent
/// to): counted, it ends the transaction or (unknown) keeps its backoff.
///
/// # Errors
/// The scheduler stopped.
pub async fn answer_check(
    shared: &Shared,
    who: &Principal,
    group: &OwnGroup,
    connection_id: u64,
    check_id: u64,
    reply: pb::CheckReply,
) -> Result<()> {
    permit(
        shared,
        who,
        Operation::AnswerChecks,
        &[Resource::ProducerGroup(&group.name)],
    )?;
    let answer = CheckAnswer {
        connection_id,
        check_id,
        reply,
        proven: true,
    };
    shared
        .answers
        .send(answer)
        .await
        .map_err(|_| Error::ShuttingDown)
}
