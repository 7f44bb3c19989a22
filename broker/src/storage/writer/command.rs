//! What the writer is asked to do ([`Command`], [`Op`]) and what it answers ([`Outcome`]).

use std::sync::Arc;

use txmq_protocol::pb::{self, TxnOutcome, TxnState};

use super::super::Cf;
use crate::error::Result;
use crate::ids::Id;
use crate::storage::records::TxnRecord;
use crate::topics::Topic;
use crate::txn::state::Resolver;

/// A write to make.
#[derive(Debug)]
pub enum Command {
    /// Append visible messages to their topics.
    Append {
        /// The messages, already validated for size.
        messages: Vec<pb::Message>,
        /// Whose their idempotency keys are.
        keys: crate::storage::dedup::KeyScope,
    },
    /// Store half messages of a new or open transaction.
    Prepare {
        /// Open transaction to add to; `None` starts one.
        txn: Option<Id>,
        /// Producer group that owns it.
        group: String,
        /// The messages.
        messages: Vec<pb::Message>,
        /// Their encoded size (counted against max-txn-bytes), measured by the caller so
        /// the writer thread does not.
        bytes: u64,
        /// First check delay override.
        check_delay_ms: u64,
    },
    /// Commit or roll back.
    End {
        /// Which transaction.
        txn: Id,
        /// Commit or rollback (unknown only records the answer).
        outcome: TxnOutcome,
        /// Who asks: checked against the transaction's group, and recorded.
        by: Resolver,
    },
    /// Record a check attempt and move the check's due time.
    RecordCheck {
        /// Which transaction.
        txn: Id,
        /// A producer received the request: the attempt counts.
        counted: bool,
        /// The answer so far.
        result: TxnOutcome,
        /// For operators.
        note: String,
        /// When to check next (`None`: leave the schedule as it is).
        next_check_ms: Option<u64>,
    },
    /// Record an end refused without the client knowing (one-way), for operators.
    NoteRefusedEnd {
        /// Which transaction.
        txn: Id,
        /// What was refused and why.
        note: String,
    },
    /// Give up on a transaction after `check-max` attempts; it stays listed.
    Discard {
        /// Which transaction.
        txn: Id,
    },
    /// Make a discarded (or prepared) transaction due for a check now, with a fresh count.
    Rearm {
        /// Which transaction.
        txn: Id,
    },
    /// Delete a check's due entry that no prepared transaction waits on (its record is
    /// gone, resolved, or due at another time); a live entry is left alone.
    DropDueCheck {
        /// The transaction the entry names.
        txn: Id,
        /// The entry's due time.
        due_ms: u64,
    },
    /// Forget a resolved transaction whose retention ended.
    Purge {
        /// Which transaction.
        txn: Id,
        /// The due entry that triggered it.
        due_ms: u64,
    },
    /// Deliver a scheduled message whose time has come (from the timer's due entry).
    Deliver {
        /// The message.
        id: Id,
        /// The due entry that triggered it.
        due_ms: u64,
    },
    /// Cancel a scheduled message that is not yet due.
    CancelScheduled {
        /// The message.
        id: Id,
    },
    /// Remove the record of a delivered or cancelled scheduled message.
    ForgetScheduled {
        /// The message.
        id: Id,
        /// The due entry that triggered it.
        due_ms: u64,
    },
    /// Create a topic.
    CreateTopic {
        /// Its name, validated.
        name: String,
        /// Refuse when it exists.
        fail_if_exists: bool,
        /// Retention overrides (0: the broker's): age in ms, size in bytes.
        retention: (u64, u64),
        /// Its queues (0: the broker's).
        queues: u32,
    },
    /// Change what is given of a topic's settings (0: the broker's).
    AlterTopic {
        /// The topic.
        topic: Arc<Topic>,
        /// Retention by age, ms.
        retention_ms: Option<u64>,
        /// Retention by size, bytes.
        retention_bytes: Option<u64>,
        /// Its queues.
        queues: Option<u32>,
    },
    /// Remove a topic's messages below `to` (retention): one range delete.
    Retain {
        /// The topic.
        topic: Arc<Topic>,
        /// Its new first offset.
        to: u64,
    },
    /// Delete a topic: its record and its log; its id is never used again.
    DeleteTopic {
        /// The topic.
        topic: Arc<Topic>,
        /// Its open transactions are to be rolled back by its cleanup.
        force: bool,
        /// Without `force`: the transactions made before this id were checked already
        /// (none is open on the topic, and all were written): the deletion's step looks
        /// only at later ones. `None`: at all of them.
        checked_below: Option<Id>,
    },
    /// Record a deleted topic's cleanup as done.
    FinishDeletion {
        /// Its id.
        id: u32,
        /// Its deletion's record (written back with `cleaned` set).
        record: crate::storage::records::DeletedTopicRecord,
    },
    /// Plain puts and deletes prepared by an owner of other state (consumer groups).
    Raw(Vec<Op>),
    /// Several commands from one request, applied in order; each has its own outcome
    /// ([`Outcome::Many`]), and a refused one leaves the others be. They share a write
    /// batch until it is full; the rest go in the next ones, and the request is answered
    /// once, after the last is durable.
    Many(Vec<Command>),
}

impl Command {
    /// Appends `messages`, their idempotency keys (if any) the application's own.
    pub fn append(messages: Vec<pb::Message>) -> Self {
        Command::Append {
            messages,
            keys: crate::storage::dedup::KeyScope::Topic,
        }
    }

    /// Roughly the bytes this command writes: what bounds a write batch.
    pub fn bytes(&self) -> usize {
        let messages = |ms: &[pb::Message]| -> usize {
            ms.iter()
                .map(|m| m.body.len() + m.key.len() + m.tag.len() + 64)
                .sum()
        };
        match self {
            Command::Append { messages: ms, .. } | Command::Prepare { messages: ms, .. } => {
                messages(ms)
            }
            Command::Raw(ops) => ops
                .iter()
                .map(|op| match op {
                    Op::Put(_, k, v) => k.len() + v.len(),
                    Op::Delete(_, k) => k.len(),
                    Op::DeleteRange(_, a, b) => a.len() + b.len(),
                })
                .sum(),
            Command::Many(cmds) => cmds.iter().map(Command::bytes).sum(),
            _ => 64,
        }
    }
}

/// One raw write.
#[derive(Debug)]
pub enum Op {
    /// Put a value.
    Put(Cf, Vec<u8>, Vec<u8>),
    /// Delete a key.
    Delete(Cf, Vec<u8>),
    /// Delete every key from the first to before the second.
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
}

/// What a command produced.
#[derive(Debug)]
pub enum Outcome {
    /// Messages are visible at these places.
    Stored(Vec<pb::MessageReceipt>),
    /// Half messages stored.
    Prepared {
        /// The transaction they belong to.
        txn: Id,
        /// Their ids (offset 0).
        receipts: Vec<pb::MessageReceipt>,
    },
    /// A transaction's state after `End`.
    Ended {
        /// Its state now.
        state: TxnState,
        /// It was in that state already.
        repeated: bool,
        /// Where committed messages landed (empty unless this request committed).
        receipts: Vec<pb::MessageReceipt>,
    },
    /// A transaction record after `Rearm`.
    Txn(Box<TxnRecord>),
    /// A topic.
    Topic(Arc<Topic>),
    /// A scheduled message cancelled (now or before).
    Cancelled {
        /// Its topic.
        topic: String,
        /// The time it was scheduled for.
        deliver_ms: u64,
    },
    /// A topic deleted.
    TopicDeleted {
        /// Messages its log held.
        messages: u64,
        /// A transaction id made after the deletion was staged: every transaction and
        /// scheduled message made before it has a smaller id (they share that sequence).
        fence: Id,
    },
    /// Written; nothing to tell.
    Done,
    /// The outcomes of [`Command::Many`], in its order.
    Many(Vec<Result<Outcome>>),
}

/// Converts `End` outcomes for callers that only care about the receipts.
pub fn txn_state_name(state: TxnState) -> &'static str {
    match state {
        TxnState::Prepared => "prepared",
        TxnState::Committed => "committed",
        TxnState::RolledBack => "rolled back",
        TxnState::Discarded => "discarded",
        TxnState::Unspecified => "unknown",
    }
}
