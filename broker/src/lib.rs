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
//! - [`connection`]: one client connection, frames in and out.
//! - [`cmd`]: one module per request family, validating at the boundary.
//! - [`storage`]: column families, reads, and the [`storage::writer`].
//! - [`delivery`]: consumer groups.
//! - [`txn`]: check-backs and the producers that answer them.
//! - [`metrics`]: Prometheus counters and the `/metrics` + `/health` endpoint.

pub mod cmd;
pub mod config;
pub mod connection;
pub mod delivery;
pub mod error;
pub mod ids;
pub mod metrics;
pub mod server;
pub mod storage;
pub mod topics;
pub mod txn;

pub use config::{Config, FlushMode};
pub use error::{Error, Result};
pub use server::run;
