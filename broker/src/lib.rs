//! The txmq broker.
//!
//! # Layout
//!
//! ```text
//!   server ── accepts, limits connections ──▶ faces (one per wire protocol)
//!                                               native: frames ⇄ service calls
//!                                               grpc:   RocketMQ 5 gRPC ⇄ service calls
//!                                               │ (principal, request)
//!                                               ▼
//!                                             service: one function per operation;
//!                                               names, limits, permissions (access)
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
//! - [`faces`]: the wire protocols. [`faces::native`] reads frames (byte budgets,
//!   deadlines, the handshake gate) and [`faces::grpc`] serves RocketMQ 5's gRPC; each
//!   turns a request into a call of the service and its outcome into its own answer,
//!   and touches nothing behind the service (a test keeps it so).
//! - [`service`]: the one door: every operation, taking a [`service::Principal`] and a
//!   request, validating at the boundary ([`service::validate`] for numbers) and asking
//!   [`service::access`] (the operation → permission table) before it acts.
//! - [`auth`]: users and rules in storage and memory, and how rules decide.
//! - [`storage`]: column families, reads, and the [`storage::writer`] (its own folder:
//!   commands, handle, staging of topics and transactions, the syncer).
//! - [`delivery`]: consumer groups.
//! - [`txn`]: the transaction state machine, check-backs and the producers that answer them.
//! - [`timer`]: delivers scheduled messages at their time.
//! - [`retention`]: removes old messages in bulk; [`disk`]: the disk watermarks.
//! - [`metrics`]: Prometheus counters and the `/metrics` + `/health` endpoint.
//!
//! Dependencies run one way: `server → faces → service → {storage, delivery, txn}`
//! (`server` also starts the [`timer`] and the [`retention`] sweep, which drive only the
//! writer); a failed fsync makes `server` reopen storage in the same process.

pub mod auth;
pub mod config;
pub mod delivery;
pub mod disk;
pub mod error;
pub mod faces;
pub mod ids;
pub mod metrics;
pub mod replication;
pub mod retention;
pub mod server;
pub mod service;
pub mod storage;
pub mod timer;
pub mod tls;
pub mod topics;
pub mod txn;

pub use config::{Config, FlushMode};
pub use error::{Error, Result};
pub use server::run;
