//! The txmq broker.
//!
//! # Layout
//!
//! ```text
//!   server ── accepts, limits connections ──▶ connection (one task per client)
//!                                               │ decodes frames, dispatches to cmd/*
//!            ┌──────────────────────────────────┼───────────────────────────┐
//!            ▼                                  ▼                           ▼
//!   storage::writer (one thread,       delivery::Groups ─▶ queue     txn::checker (one task:
//!   group commit, all writes)          (one task per group+topic:    due checks, purges)
//!            │                          leases, acks, retries)             │
//!            ▼                                                             ▼
//!         RocksDB  ◀──────────── reads (spawn_blocking) ───────── txn::producers (who to ask)
//! ```
//!
//! - [`config`]: typed settings with working defaults.
//! - [`server`]: the accept loop and graceful shutdown; [`run`] is the entry point that
//!   tests and `main` share.
//! - [`connection`]: one client connection, frames in and out, byte budgets, deadlines.
//! - [`cmd`]: the one dispatch every frame passes (the handshake gate), then one module
//!   per request family, validating at the boundary ([`cmd::validate`] for numbers).
//! - [`storage`]: column families, reads, and the [`storage::writer`] (its own folder:
//!   commands, handle, staging of topics and transactions, the syncer).
//! - [`delivery`]: consumer groups.
//! - [`txn`]: the transaction state machine, check-backs and the producers that answer them.
//! - [`timer`]: delivers scheduled messages at their time.
//! - [`retention`]: removes old messages in bulk; [`disk`]: the disk watermarks.
//! - [`metrics`]: Prometheus counters and the `/metrics` + `/health` endpoint.
//!
//! Dependencies run one way: `server → connection → cmd → {storage, delivery, txn}`
//! (`server` also starts the [`timer`] and the [`retention`] sweep, which drive only the
//! writer); a
//! failed fsync makes `server` reopen storage in the same process.

pub mod cmd;
pub mod config;
pub mod connection;
pub mod delivery;
pub mod disk;
pub mod error;
pub mod grpc;
pub mod ids;
pub mod metrics;
pub mod replication;
pub mod retention;
pub mod server;
pub mod storage;
pub mod timer;
pub mod topics;
pub mod txn;

pub use config::{Config, FlushMode};
pub use error::{Error, Result};
pub use server::run;
