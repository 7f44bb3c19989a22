//! The transaction state machine (I2), as plain functions over a transaction's record:
//! who may add to or end a transaction, and what an end request does in each state. The
//! writer applies these decisions; nothing here touches storage.
//!
//! ```text
//!   prepared ──commit──▶ committed      (repeat: no-op success; rollback: refused)
//!      │  ▲  └─rollback─▶ rolled back   (repeat: no-op success; commit: refused)
//!      │  └──── rearm ───┐
//!      └─ check-max ──▶ discarded ──commit/rollback (operator or producer)──▶ …
//! ```

use txmq_protocol::pb::{TxnOutcome, TxnState};

use crate::error::{Error, Result};
use crate::ids::Id;
use crate::storage::records::TxnRecord;

/// Who asks to end a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolver {
    /// A producer connection of this group (its Hello's group).
    Producer(String),
    /// An operator through the admin path; recorded in the transaction's history.
    Operator,
    /// The check-back scheduler, on the answer of the group's own producer.
    CheckBack,
}

impl Resolver {
    /// What the transaction's history says resolved it.
    pub fn note(&self) -> &'static str {
        match self {
            Resolver::Producer(_) => "resolved by the producer",
            Resolver::Operator => "resolved by an operator",
            Resolver::CheckBack => "resolved by check-back",
        }
    }
}

/// What an end request does to a transaction in its current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// `unknown`: only the answer is recorded (the state stays).
    RecordUnknown,
    /// Already in the wanted state: a no-op success (I2).
    Repeat(TxnState),
    /// Move to this state (committed or rolled back).
    Apply(TxnState),
}

/// Whether `who` may end a transaction whose record is `rec`: only its own producer group,
/// an operator, or the check-back of its group.
///
/// # Errors
/// [`Error::WrongProducerGroup`] naming both groups.
pub fn may_end(txn: Id, rec: &TxnRecord, who: &Resolver) -> Result<()> {
    match who {
        Resolver::Producer(group) if *group != rec.group => {
            Err(Error::WrongProducerGroup(format!(
                "transaction {txn} belongs to producer group {:?}; this connection is {}",
                rec.group,
                if group.is_empty() {
                    "not a producer of any group".to_string()
                } else {
                    format!("of group {group:?}")
                }
            )))
        }
        _ => Ok(()),
    }
}

/// What `outcome` does to a transaction in `state` (I2).
///
/// # Errors
/// [`Error::TxnCommitted`] / [`Error::TxnRolledBack`] for a conflicting resolution.
pub fn resolve(txn: Id, state: TxnState, outcome: TxnOutcome) -> Result<Resolution> {
    let wanted = match outcome {
        TxnOutcome::Commit => TxnState::Committed,
        TxnOutcome::Rollback => TxnState::RolledBack,
        _ => return Ok(Resolution::RecordUnknown),
    };
    match (state, wanted) {
        (TxnState::Committed, TxnState::Committed)
        | (TxnState::RolledBack, TxnState::RolledBack) => Ok(Resolution::Repeat(state)),
        (TxnState::Committed, _) => Err(Error::TxnCommitted(txn.to_string())),
        (TxnState::RolledBack, _) => Err(Error::TxnRolledBack(txn.to_string())),
        _ => Ok(Resolution::Apply(wanted)),
    }
}

/// Whether more half messages may join an open transaction, sent by `group`.
///
/// # Errors
/// The transaction is resolved or discarded, or belongs to another group.
pub fn can_add(txn: Id, rec: &TxnRecord, group: &str) -> Result<()> {
    match TxnState::try_from(rec.state) {
        Ok(TxnState::Prepared) => {}
        Ok(TxnState::Committed) => return Err(Error::TxnCommitted(txn.to_string())),
        Ok(TxnState::RolledBack) => return Err(Error::TxnRolledBack(txn.to_string())),
        _ => {
            return Err(Error::Invalid(format!(
                "transaction {txn} is discarded and takes no more messages"
            )));
        }
    }
    may_end(txn, rec, &Resolver::Producer(group.to_string()))
}

/// Whether `more` bytes of half messages still fit the transaction's cap (so a check-back
/// can carry it and a commit stays one reasonable write).
///
/// # Errors
/// [`Error::TooLarge`] naming the size and the limit.
pub fn fits(txn: Id, rec: &TxnRecord, more: u64, max: usize) -> Result<()> {
    let total = rec.bytes.saturating_add(more);
    if total > max as u64 {
        return Err(Error::TooLarge(format!(
            "transaction {txn} would hold {total} bytes of messages; the limit is {max} \
             (max-txn-bytes)"
        )));
    }
    Ok(())
}

/// The check-back's view: is this record still waiting for a check due at `due_ms`? A due
/// entry for which this is false is left over (resolved meanwhile, moved, or never
/// completed) and may be deleted.
pub fn awaits_check(rec: Option<&TxnRecord>, due_ms: u64) -> bool {
    rec.is_some_and(|r| r.state == TxnState::Prepared as i32 && r.next_check_ms == due_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Id = Id { boot: 1, seq: 2 };

    fn rec(group: &str, state: TxnState) -> TxnRecord {
        TxnRecord {
            group: group.into(),
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn resolution_is_idempotent_and_conflicts_are_refused() {
        use TxnOutcome::{Commit, Rollback, Unknown};
        use TxnState::*;
        let ok = |s, o| resolve(T, s, o).unwrap();
        assert_eq!(ok(Prepared, Commit), Resolution::Apply(Committed));
        assert_eq!(ok(Prepared, Rollback), Resolution::Apply(RolledBack));
        assert_eq!(ok(Discarded, Commit), Resolution::Apply(Committed));
        assert_eq!(ok(Committed, Commit), Resolution::Repeat(Committed));
        assert_eq!(ok(RolledBack, Rollback), Resolution::Repeat(RolledBack));
        assert_eq!(ok(Prepared, Unknown), Resolution::RecordUnknown);
        assert!(matches!(
            resolve(T, Committed, Rollback),
            Err(Error::TxnCommitted(_))
        ));
        assert!(matches!(
            resolve(T, RolledBack, Commit),
            Err(Error::TxnRolledBack(_))
        ));
    }

    #[test]
    fn only_the_owning_group_an_operator_or_the_check_may_end() {
        let r = rec("orders", TxnState::Prepared);
        assert!(may_end(T, &r, &Resolver::Producer("orders".into())).is_ok());
        assert!(may_end(T, &r, &Resolver::Operator).is_ok());
        assert!(may_end(T, &r, &Resolver::CheckBack).is_ok());
        let e = may_end(T, &r, &Resolver::Producer("evil".into())).unwrap_err();
        assert!(matches!(e, Error::WrongProducerGroup(_)));
        assert!(e.to_string().contains("\"orders\""), "{e}");
        assert!(may_end(T, &r, &Resolver::Producer(String::new())).is_err());
    }

    #[test]
    fn adding_needs_an_open_transaction_of_the_same_group() {
        assert!(can_add(T, &rec("g", TxnState::Prepared), "g").is_ok());
        assert!(can_add(T, &rec("g", TxnState::Prepared), "h").is_err());
        assert!(can_add(T, &rec("g", TxnState::Committed), "g").is_err());
        assert!(can_add(T, &rec("g", TxnState::Discarded), "g").is_err());
    }

    #[test]
    fn a_transaction_is_capped_in_bytes() {
        let mut r = rec("g", TxnState::Prepared);
        r.bytes = 900;
        assert!(fits(T, &r, 100, 1000).is_ok());
        let e = fits(T, &r, 101, 1000).unwrap_err();
        assert!(e.to_string().contains("1001") && e.to_string().contains("1000"));
        r.bytes = u64::MAX;
        assert!(fits(T, &r, 1, 1000).is_err());
    }

    #[test]
    fn a_due_entry_is_live_only_for_its_prepared_record_and_time() {
        let mut r = rec("g", TxnState::Prepared);
        r.next_check_ms = 50;
        assert!(awaits_check(Some(&r), 50));
        assert!(!awaits_check(Some(&r), 40));
        assert!(!awaits_check(None, 50));
        r.state = TxnState::Committed as i32;
        assert!(!awaits_check(Some(&r), 50));
    }
}
