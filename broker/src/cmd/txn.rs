//! Ending transactions, operator views and control, and producers' check answers.

use std::sync::Arc;

use txmq_protocol::pb::{self, TxnOutcome, TxnState};

use super::{Pending, later, ready};
use crate::connection::Session;
use crate::error::Error;
use crate::ids::Id;
use crate::server::Shared;
use crate::storage::records::TxnRecord;
use crate::storage::writer::{Command, Outcome};
use crate::txn::checker::CheckAnswer;

/// Commit or roll back (or record `unknown`). Repeats are no-op successes; a conflicting
/// resolution is refused with its own code (I2).
pub fn end(id: u64, req: pb::EndTxnRequest, shared: &Arc<Shared>) -> Pending {
    let txn = match super::txn_id(&req.txn_id) {
        Ok(t) => t,
        Err(e) => return ready(id, Err(e)),
    };
    let outcome = match TxnOutcome::try_from(req.outcome) {
        Ok(o @ (TxnOutcome::Commit | TxnOutcome::Rollback | TxnOutcome::Unknown)) => o,
        _ => {
            return ready(
                id,
                Err(Error::Invalid(
                    "outcome must be COMMIT, ROLLBACK or UNKNOWN".into(),
                )),
            );
        }
    };
    let note = if req.operator {
        "resolved by an operator"
    } else {
        "resolved by the producer"
    };
    let writer = shared.writer.clone();
    later(id, async move {
        match writer
            .submit(Command::End {
                txn,
                outcome,
                note: note.into(),
            })
            .await?
        {
            Outcome::Ended {
                state,
                repeated,
                receipts,
            } => Ok(pb::response::Result::EndTxn(pb::EndTxnOk {
                txn_id: txn.to_string(),
                state: state as i32,
                repeated,
                receipts,
            })),
            other => Err(Error::Internal(format!("end gave {other:?}"))),
        }
    })
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
        let limit = if req.limit == 0 {
            1000
        } else {
            req.limit as usize
        };
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
    let _ = shared.answers.send(CheckAnswer { check_id, reply }).await;
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
