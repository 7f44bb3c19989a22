//! Prometheus metrics, and the HTTP endpoint (`--metrics-listen`) that serves them with
//! `/health`.
//!
//! Counters are bumped where the work is done — the writer after a batch is durable, the
//! group queues as they deliver and ack, the checker as checks end — so a counter never
//! counts what did not happen. Lag per group is computed when scraped, from the stored
//! ack floors and the topics' ends, so idle groups cost nothing between scrapes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

use crate::storage::{Storage, StorageHandle};
use crate::topics::Topics;

/// Every metric the broker exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    started: Instant,
    /// Plain messages stored (visible at once).
    pub messages_sent: IntCounter,
    /// Sends answered with an earlier send's receipt (a repeated idempotency key).
    pub sends_deduplicated: IntCounter,
    /// gRPC sends whose message id the same client used for another message: stored.
    pub sends_dedup_conflicts: IntCounter,
    /// Half messages stored.
    pub half_messages_sent: IntCounter,
    /// Half messages stored and not yet committed or rolled back (prepared or discarded).
    pub half_messages_pending: IntGauge,
    /// Transactions resolved, by outcome (`commit`, `rollback`).
    pub transactions_resolved: IntCounterVec,
    /// Transactions discarded after `check-max` checks.
    pub transactions_discarded: IntCounter,
    /// Scheduled messages waiting for their delivery time.
    pub scheduled_pending: IntGauge,
    /// Scheduled messages delivered at their time.
    pub scheduled_delivered: IntCounter,
    /// Seconds from a scheduled message's delivery time to its delivery into its topic.
    pub schedule_lateness_seconds: Histogram,
    /// Disk use of the data directory's file system (0–1).
    pub disk_used_ratio: prometheus::Gauge,
    /// 1 while new messages are refused above the disk's high-water mark.
    pub disk_full: IntGauge,
    /// Messages removed by retention, by topic.
    pub retention_removed: IntCounterVec,
    /// Messages retention removed before a group acked them, by group.
    pub retention_skipped: IntCounterVec,
    /// Bytes each topic's log takes on disk (RocksDB's estimate of its files), updated
    /// by every retention sweep.
    pub topic_bytes: prometheus::IntGaugeVec,
    /// Age of each topic's oldest kept message, updated by every retention sweep.
    pub topic_oldest_age_seconds: prometheus::GaugeVec,
    /// Message groups of ordered consumer groups whose next messages wait behind one
    /// that is out (over every ordered queue).
    pub ordered_blocked_groups: IntGauge,
    /// Check-backs by result: `commit`, `rollback`, `unknown`, `timeout`, `no_producer`,
    /// `busy`.
    pub checks: IntCounterVec,
    /// Deliveries to consumers (first and later attempts).
    pub deliveries: IntCounter,
    /// Deliveries after the first attempt.
    pub redeliveries: IntCounter,
    /// Acknowledged deliveries.
    pub acks: IntCounter,
    /// Negative acknowledgements.
    pub nacks: IntCounter,
    /// Messages moved to a dead-letter queue.
    pub dead_letters: IntCounter,
    /// Seconds to write one group-committed batch into RocksDB (WAL and memtable).
    pub write_seconds: Histogram,
    /// Seconds of one fsync of the WAL, covering every batch written since the last.
    pub fsync_seconds: Histogram,
    /// Requests folded into one group-committed batch.
    pub batch_requests: Histogram,
    /// Open client connections.
    pub connections: IntGauge,
    /// Connections refused at the limit.
    pub connections_refused: IntCounter,
    /// Requests refused at a cap, by cap (`topics`).
    pub limit_refusals: IntCounterVec,
    /// Authentications that proved a user, by face.
    pub auth_successes: IntCounterVec,
    /// Authentications that failed, by face.
    pub auth_failures: IntCounterVec,
    /// Requests refused for want of a permission, by operation.
    pub auth_denials: IntCounterVec,
    /// Remoting END_TRANSACTIONs that did nothing (one-way: the client never learns),
    /// by reason.
    pub remoting_ends_refused: IntCounterVec,
    /// A group node's wall clock minus the group's, in ms (set when scraped).
    clock_skew_ms: IntGauge,
    group_lag: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set, registered.
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("txmq".into()), None).expect("valid prefix");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let group_lag = IntGaugeVec::new(
            Opts::new(
                "group_lag",
                "Messages from a group's ack floor to the end of the topic",
            ),
            &["group", "topic"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(group_lag.clone()))
            .expect("unique metric");
        Self {
            started: Instant::now(),
            messages_sent: counter("messages_sent_total", "Plain messages stored"),
            sends_deduplicated: counter(
                "sends_deduplicated_total",
                "Sends of an idempotency key already stored: answered with the first receipt, \
                 nothing stored",
            ),
            sends_dedup_conflicts: counter(
                "sends_dedup_conflicts_total",
                "gRPC sends whose message id the same client id had used, within the dedup \
                 window, for a message with other content: stored as a message of its own",
            ),
            half_messages_sent: counter("half_messages_sent_total", "Half messages stored"),
            half_messages_pending: gauge(
                "half_messages_pending",
                "Half messages of prepared or discarded transactions",
            ),
            transactions_resolved: counter_vec(
                "transactions_resolved_total",
                "Transactions committed or rolled back",
                "outcome",
            ),
            transactions_discarded: counter(
                "transactions_discarded_total",
                "Transactions discarded after check-max checks",
            ),
            scheduled_pending: gauge(
                "scheduled_pending",
                "Scheduled messages waiting for their delivery time",
            ),
            scheduled_delivered: counter(
                "scheduled_delivered_total",
                "Scheduled messages delivered into their topic at their time",
            ),
            schedule_lateness_seconds: histogram(
                "schedule_lateness_seconds",
                "Time from a scheduled message's delivery time to its delivery",
                prometheus::exponential_buckets(0.001, 2.0, 16).expect("valid buckets"),
            ),
            disk_used_ratio: {
                let g = prometheus::Gauge::with_opts(Opts::new(
                    "disk_used_ratio",
                    "Disk use of the data directory's file system (0-1)",
                ))
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            disk_full: gauge(
                "disk_full",
                "1 while new messages are refused above the disk's high-water mark",
            ),
            retention_removed: counter_vec(
                "retention_removed_total",
                "Messages removed by retention",
                "topic",
            ),
            retention_skipped: counter_vec(
                "retention_skipped_total",
                "Messages retention removed before a group acked them",
                "group",
            ),
            topic_bytes: {
                let g = prometheus::IntGaugeVec::new(
                    Opts::new(
                        "topic_stored_bytes",
                        "Bytes a topic's log takes on disk (estimate, at the last sweep)",
                    ),
                    &["topic"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            topic_oldest_age_seconds: {
                let g = prometheus::GaugeVec::new(
                    Opts::new(
                        "topic_oldest_message_age_seconds",
                        "Age of a topic's oldest kept message (at the last sweep)",
                    ),
                    &["topic"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            ordered_blocked_groups: gauge(
                "ordered_blocked_message_groups",
                "Message groups of ordered consumer groups waiting behind a message that is out",
            ),
            checks: counter_vec("checks_total", "Check-backs by result", "result"),
            deliveries: counter("deliveries_total", "Deliveries to consumers"),
            redeliveries: counter("redeliveries_total", "Deliveries after the first attempt"),
            acks: counter("acks_total", "Acknowledged deliveries"),
            nacks: counter("nacks_total", "Negative acknowledgements"),
            dead_letters: counter(
                "dead_letters_total",
                "Messages moved to a dead-letter queue",
            ),
            write_seconds: histogram(
                "storage_write_seconds",
                "Time to write one group-committed batch into the WAL and memtable",
                prometheus::exponential_buckets(0.000_05, 2.0, 16).expect("valid buckets"),
            ),
            fsync_seconds: histogram(
                "storage_fsync_seconds",
                "Time of one WAL fsync, covering every batch written since the last",
                prometheus::exponential_buckets(0.000_05, 2.0, 16).expect("valid buckets"),
            ),
            batch_requests: histogram(
                "group_commit_requests",
                "Requests folded into one group-committed batch",
                prometheus::exponential_buckets(1.0, 2.0, 13).expect("valid buckets"),
            ),
            connections: gauge("connections", "Open client connections"),
            clock_skew_ms: gauge(
                "clock_skew_ms",
                "A broker group node's wall clock minus the group's (the median of the \
                 members'), in ms; beyond 500 either way the node refuses to lead",
            ),
            limit_refusals: counter_vec(
                "limit_refusals_total",
                "Requests refused at a cap (LIMIT_REACHED), by cap",
                "limit",
            ),
            auth_successes: counter_vec(
                "auth_successes_total",
                "Authentications that proved a user, by face",
                "face",
            ),
            auth_failures: counter_vec(
                "auth_failures_total",
                "Authentications that failed (bad user, secret or signature), by face",
                "face",
            ),
            remoting_ends_refused: counter_vec(
                "remoting_ends_refused_total",
                "Remoting END_TRANSACTIONs that did nothing (a conflicting or unknown \
                 transaction, a bad outcome), by reason",
                "reason",
            ),
            auth_denials: counter_vec(
                "auth_denials_total",
                "Requests refused (PERMISSION_DENIED or NOT_AUTHENTICATED) by the rules, by \
                 operation",
                "operation",
            ),
            connections_refused: counter(
                "connections_refused_total",
                "Connections refused at max-connections",
            ),
            group_lag,
            registry,
        }
    }

    /// The Prometheus text exposition of every metric, with lag computed now.
    pub fn render(&self, storage: &Storage, topics: &Topics) -> String {
        self.group_lag.reset();
        match storage.cursors() {
            Ok(cursors) => {
                for (group, topic_id, cursor) in cursors {
                    if let Some(topic) = topics.by_id(topic_id) {
                        let lag = topic.end().saturating_sub(cursor.ack_floor);
                        self.group_lag
                            .with_label_values(&[group.as_str(), topic.name.as_str()])
                            .set(lag as i64);
                    }
                }
            }
            Err(e) => tracing::warn!("group lag not computed: {e}"),
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("text format is UTF-8")
    }

    /// Time since the broker started.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    fn health(&self, live: &Live) -> (axum::http::StatusCode, String) {
        let role = live.group.get().map(|node| node.role());
        let (code, status, detail) = match (live.get(), &role) {
            (Some((storage, _)), _) => match storage.failure() {
                None => (axum::http::StatusCode::OK, "ok", String::new()),
                Some(why) => (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "storage_failed",
                    why,
                ),
            },
            // A group's node that does not serve: healthy while it follows a leader it
            // knows (clients it refuses are sent there).
            (None, Some(role)) => match (role.state, role.leader) {
                ("follower" | "learner", Some(leader)) if leader != role.id => (
                    axum::http::StatusCode::OK,
                    "following",
                    format!("node {leader} leads; this node replicates and refuses clients"),
                ),
                ("leader", _) => (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "starting",
                    "this node was elected and is taking over (or lost its majority)".to_string(),
                ),
                ("shutdown", _) => (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "stopped",
                    "this node's replication stopped".to_string(),
                ),
                _ => (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "no_leader",
                    "the group has no leader this node knows of (an election, or too few \
                     nodes reachable)"
                        .to_string(),
                ),
            },
            (None, None) if live.started() => (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "recovering",
                "storage is being reopened after a failure".to_string(),
            ),
            (None, None) => (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "starting",
                "storage is being opened".to_string(),
            ),
        };
        // A node whose clock is off refuses to lead: not a healthy member, whatever it
        // serves now.
        let (code, status, detail) = match &role {
            Some(r) if r.clock_skewed => (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "clock_skewed",
                format!(
                    "this node's wall clock is {} ms from the group's: it refuses to lead \
                     until it is corrected (check NTP)",
                    r.clock_skew_ms.unwrap_or(0)
                ),
            ),
            _ => (code, status, detail),
        };
        let mut body = serde_json::json!({
            "status": status,
            "detail": detail,
            "uptime_s": self.started.elapsed().as_secs(),
            "version": env!("CARGO_PKG_VERSION"),
        });
        if let Some(role) = role {
            body["group"] = serde_json::json!({
                "node": role.id,
                "role": role.state,
                "leader": role.leader,
                "term": role.term,
                "last_log_index": role.last_log_index,
                "applied_index": role.applied_index,
                "clock_skew_ms": role.clock_skew_ms,
            });
        }
        (code, format!("{body}\n"))
    }
}

/// A broker group node's part in its group at one moment, as `/health` tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub state: &'static str,
    /// This node's id.
    pub id: u64,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// The term it is in.
    pub term: u64,
    /// Its last log entry's index.
    pub last_log_index: u64,
    /// The last entry applied to its storage.
    pub applied_index: u64,
    /// How far its wall clock is from the group's, in ms (positive: ahead); `None` when
    /// not known.
    pub clock_skew_ms: Option<i64>,
    /// The skew is beyond the bound: it refuses to lead.
    pub clock_skewed: bool,
}

/// What tells a node's role (the broker group's node). Metrics depend on this, not on
/// the replication module: the node reports to metrics, not the other way round.
pub trait Roles: Send + Sync + std::fmt::Debug {
    /// The node's role now.
    fn role(&self) -> Role;
}

/// The storage and topics the broker serves now: `None` while storage is being reopened
/// after a failure.
#[derive(Debug, Default)]
pub struct Live {
    now: std::sync::RwLock<Option<(StorageHandle, Arc<Topics>)>>,
    started: std::sync::atomic::AtomicBool,
    /// The broker group this node belongs to, if any (`/health` tells its role).
    group: std::sync::OnceLock<Arc<dyn Roles>>,
}

impl Live {
    /// Makes this a broker group node's: `/health` tells its role, and a follower that
    /// knows its leader is healthy.
    pub fn join_group(&self, node: Arc<dyn Roles>) {
        let _ = self.group.set(node);
    }

    /// Serving these from now on (`None`: none).
    pub fn set(&self, live: Option<(StorageHandle, Arc<Topics>)>) {
        if live.is_some() {
            self.started
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        *self.now.write().expect("live lock") = live;
    }

    fn get(&self) -> Option<(StorageHandle, Arc<Topics>)> {
        self.now.read().expect("live lock").clone()
    }

    /// Storage was open once (so `None` now means it is being reopened).
    fn started(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Serves `GET /metrics` and `GET /health` until `cancel`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    live: Arc<Live>,
    cancel: CancellationToken,
) {
    use axum::routing::get;
    let scrape = {
        let (metrics, live) = (metrics.clone(), live.clone());
        move || async move {
            if let Some(node) = live.group.get() {
                metrics
                    .clock_skew_ms
                    .set(node.role().clock_skew_ms.unwrap_or(0));
            }
            let text = match live.get() {
                Some((storage, topics)) => {
                    tokio::task::spawn_blocking(move || metrics.render(&storage, &topics))
                        .await
                        .unwrap_or_default()
                }
                None => String::new(),
            };
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                text,
            )
        }
    };
    let health = move || async move {
        let (code, body) = metrics.health(&live);
        (
            code,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
    };
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .route("/health", get(health));
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        tracing::warn!("metrics endpoint stopped: {e}");
    }
}

/// Binds the metrics address (before storage opens, so a taken port fails fast).
///
/// # Errors
/// The address cannot be bound.
pub async fn bind(addr: SocketAddr) -> crate::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| crate::Error::Internal(format!("cannot listen for metrics on {addr}: {e}")))
}

#[cfg(test)]
mod layering {
    /// Issue 25, "Shape": metrics import nothing from the replication module (which
    /// imported metrics' neighbours in turn: a circle). The node reports its role through
    /// [`super::Roles`].
    #[test]
    fn metrics_import_nothing_from_replication() {
        let source = include_str!("metrics.rs");
        let code: String = source
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let needle = ["replication", "::"].concat();
        assert!(
            !code.contains(&needle),
            "metrics.rs names the replication module"
        );
    }
}
