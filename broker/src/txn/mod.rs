//! Transactions: the state machine ([`state`]: who may end a transaction and what an end
//! does in each state), which producers can answer check-backs
//! ([`producers::Producers`]) and the task that asks them ([`checker::Checker`]).
//! Resolution itself is a writer command applying [`state`]'s decisions, so a check's
//! answer and a producer's EndTxn go through exactly the same code.

pub mod checker;
pub mod producers;
pub mod state;
