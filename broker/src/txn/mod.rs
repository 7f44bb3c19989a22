//! Transactions beyond the write path: which producers can answer check-backs
//! ([`producers::Producers`]) and the task that asks them ([`checker::Checker`]).
//! Resolution itself is a writer command, so a check's answer and a producer's
//! EndTxn go through exactly the same code.

pub mod checker;
pub mod producers;
