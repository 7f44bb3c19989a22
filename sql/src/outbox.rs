//! The outbox relay (the local message table): messages written into `txmq_outbox` in
//! the caller's own database transaction (`enqueue`), then sent by a relay that keeps
//! working while the broker is down and comes back.
//!
//! The relay takes pending rows in id order, sends a batch as one request (stored in
//! order) with each row's idempotency key `outbox/<epoch>/<id>`, then marks the rows
//! sent. A crash between the send and the mark resends them, and the broker answers
//! the repeats with their first receipts (`dedup-window`, 24 h): every row is
//! delivered, none is stored twice. `epoch` is a random id made with the table, so two
//! databases (or a recreated one) never share keys. While the broker cannot be reached
//! the relay retries with backoff; rows wait in the table.
//!
//! It wakes on PostgreSQL `NOTIFY txmq_outbox` (sent by `enqueue` in the same
//! transaction, so it arrives at the commit) and also polls, with backoff, in case a
//! notification was lost; SQLite has no notifications and is polled.
//!
//! A batch is cut by rows ([`RelayOptions::batch`]) and by bytes: what fits in one frame
//! of the broker's (the limit it announces at the handshake). Every refusal falls in one
//! of three groups ([`Refusal`]):
//!
//! - **retry**: the broker cannot take the rows now and may later (disk full, not the
//!   leader, shutting down, unreachable, busy, a schedule beyond its limit today). The
//!   relay backs off (up to 5 s) and sends the same rows again. A row scheduled further
//!   ahead than the broker takes today (its `max-schedule-delay`) waits here too, before
//!   it is sent: it becomes sendable as time passes; but one beyond the limit by more
//!   than [`SCHEDULE_SLACK`] (a day) is set aside, since waiting for it would hold up
//!   every row after it for longer than anyone meant.
//! - **stop**: the relay cannot work with this broker as it is configured (it remembers
//!   no idempotency keys, so a resend could store twice; the relay is not
//!   authenticated). The relay returns [`crate::Error::RelayStopped`] saying what to
//!   fix; nothing is set aside.
//! - **set aside**: no later attempt can pass this row (too large for the broker or its
//!   frame, an invalid name, a topic that does not exist, an idempotency key used for
//!   another message). It is marked failed with the broker's sentence and the rows
//!   after it go on.
//!
//! Rows are sent in id order, so rows behind a row that waits (a retry, or a schedule
//! beyond the limit) wait with it: an outbox keeps its order. The age of the oldest
//! pending row ([`RelayStatus::oldest_pending_age`]) tells how far behind the relay is;
//! export it to your metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use txmq_client::{Limits, Message, Producer};

use crate::{Error, Result};

/// A row of the outbox, as the relay reads it.
#[derive(Debug, Clone)]
pub struct Row {
    /// Its id: the order rows are sent in.
    pub id: i64,
    /// When it was written (ms): part of its idempotency key, so a row id reused after
    /// a database restore is a new message.
    pub created_ms: i64,
    /// The message.
    pub topic: String,
    /// Its key (empty: none).
    pub key: String,
    /// Its tag (empty: none).
    pub tag: String,
    /// Its message group (empty: none).
    pub message_group: String,
    /// Its user properties.
    pub properties: std::collections::HashMap<String, String>,
    /// Deliver no earlier than this (ms since the Unix epoch; 0: now).
    pub deliver_at_ms: u64,
    /// Its body.
    pub body: Vec<u8>,
}

impl Row {
    /// The columns of a message to enqueue: properties as JSON text.
    pub(crate) fn columns(message: &Message) -> (String, i64) {
        let properties = serde_json::to_string(&message.properties).expect("strings encode");
        (properties, message.deliver_at_ms as i64)
    }

    /// Properties read back from their JSON text (a row written by hand with bad JSON
    /// sends none).
    pub(crate) fn properties_of(text: &str) -> std::collections::HashMap<String, String> {
        serde_json::from_str(text).unwrap_or_default()
    }
}

/// What the relay needs of a database.
pub trait Store: Send {
    /// The table's epoch (see the module docs).
    fn epoch(&mut self) -> impl Future<Output = Result<String>> + Send;
    /// Up to `limit` unsent rows, in id order.
    fn pending(&mut self, limit: usize) -> impl Future<Output = Result<Vec<Row>>> + Send;
    /// Marks rows sent.
    fn mark_sent(&mut self, ids: &[i64]) -> impl Future<Output = Result<()>> + Send;
    /// Sets a row aside that the broker refuses for good (too large, a bad name, a topic
    /// that does not exist), with why: it is no longer pending.
    fn mark_failed(&mut self, id: i64, why: &str) -> impl Future<Output = Result<()>> + Send;
    /// Waits until rows may have been added, or `at_most` passed.
    fn wait(&mut self, at_most: Duration) -> impl Future<Output = ()> + Send;
}

/// How a relay runs.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Most rows sent in one request (fewer when their bytes would not fit a frame).
    pub batch: usize,
    /// Longest wait between two looks at the table when nothing wakes the relay.
    pub max_poll: Duration,
    /// Stop once the table has no row that can be sent now (tests, one-shot jobs).
    pub until_empty: bool,
    /// What the relay reports while it runs.
    pub status: Arc<RelayStatus>,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            batch: 100,
            max_poll: Duration::from_secs(5),
            until_empty: false,
            status: Arc::default(),
        }
    }
}

/// What a running relay reports, for metrics and health checks.
#[derive(Debug, Default)]
pub struct RelayStatus {
    oldest_pending_ms: AtomicU64,
}

impl RelayStatus {
    /// How long the oldest row not yet sent has waited, as of the relay's last look at
    /// the table (zero when none waits).
    pub fn oldest_pending_age(&self) -> Duration {
        match self.oldest_pending_ms.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            at => Duration::from_millis(crate::now_ms().saturating_sub(at as i64) as u64),
        }
    }

    fn saw(&self, oldest_created_ms: Option<i64>) {
        let at = oldest_created_ms.map_or(0, |ms| ms.max(1) as u64);
        self.oldest_pending_ms.store(at, Ordering::Relaxed);
    }
}

/// What a broker's refusal means for the rows refused (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The broker may take them later: send them again after a pause.
    Retry,
    /// The relay cannot work with this broker as configured: stop, and say what to fix.
    Stop,
    /// No later attempt can pass the row: set it aside.
    SetAside,
}

impl Refusal {
    /// The group `e` falls in.
    pub fn of(e: &txmq_client::Error) -> Self {
        use txmq_client::ErrorCode;
        if e.is_frame_too_large() {
            return Self::SetAside;
        }
        match e.code() {
            // Beyond the broker's limit today (its clock ahead of ours, say): later it
            // fits.
            Some(ErrorCode::ScheduleTooFar) => Self::Retry,
            // A cap of the broker's (max-topics): it lifts when the operator raises it
            // or removes topics; the rows wait, nothing is lost.
            Some(ErrorCode::LimitReached) => Self::Retry,
            Some(
                ErrorCode::InvalidName
                | ErrorCode::MessageTooLarge
                | ErrorCode::TopicNotFound
                | ErrorCode::InvalidRequest
                | ErrorCode::IdempotencyConflict,
            ) => Self::SetAside,
            Some(
                ErrorCode::IdempotencyDisabled
                | ErrorCode::NotAuthenticated
                | ErrorCode::HandshakeRequired
                | ErrorCode::UnsupportedVersion,
            ) => Self::Stop,
            _ => Self::Retry,
        }
    }

    /// What the operator should do about a refusal that stops the relay.
    fn advice(e: &txmq_client::Error) -> &'static str {
        match e.code() {
            Some(txmq_client::ErrorCode::IdempotencyDisabled) => {
                "the relay needs the broker to remember idempotency keys (a resend after a \
                 lost answer would otherwise store a row twice): run the broker with a \
                 dedup-window above zero (24h by default)"
            }
            Some(txmq_client::ErrorCode::NotAuthenticated) => {
                "the broker refused the relay's credentials: give the relay's producer the \
                 broker's token"
            }
            _ => "the broker and this relay do not speak the same protocol: upgrade one",
        }
    }
}

/// Refuses, before it is written, a message the relay could never send to a broker
/// with `limits` (from [`Producer::limits`]): one scheduled further ahead than the
/// broker takes, or too large for its frame. A service that holds a producer calls it
/// before `enqueue`, so such a row is refused to the caller instead of being set aside
/// (or waiting for its schedule window) later.
///
/// # Errors
/// [`Error::Broker`] with the reason, as the broker would give it.
pub fn check(message: &Message, limits: &Limits) -> Result<()> {
    let refuse =
        |code, message: String| Err(Error::Broker(txmq_client::Error::Broker { code, message }));
    if let Some(max) = limits.max_schedule_delay {
        let latest = crate::now_ms().saturating_add(max.as_millis() as i64);
        if message.deliver_at_ms as i64 > latest {
            return refuse(
                txmq_client::ErrorCode::InvalidRequest,
                format!(
                    "deliver_at_ms {} is further ahead than the broker takes ({max:?} from now)",
                    message.deliver_at_ms
                ),
            );
        }
    }
    let len = Limits::message_len(message);
    if len > limits.room() {
        return refuse(
            txmq_client::ErrorCode::MessageTooLarge,
            format!(
                "the message takes {len} bytes; one frame of the broker's takes {}",
                limits.room()
            ),
        );
    }
    Ok(())
}

/// What one pass of the relay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Rows sent and marked.
    pub sent: u64,
    /// Rows the broker refused for good, set aside.
    pub failed: u64,
    /// Rows left waiting for their schedule window when the relay stopped
    /// ([`RelayOptions::until_empty`]).
    pub waiting: u64,
}

/// Sends pending rows until `stop` completes (or no row can be sent now, with
/// [`RelayOptions::until_empty`]); broker failures are retried with backoff (up to
/// 5 s), database failures end it, and so does a broker the relay cannot work with.
///
/// # Errors
/// The database's error; [`Error::RelayStopped`] for a broker configured so that the
/// relay cannot work with it (see [`Refusal::Stop`]).
pub async fn relay<S: Store>(
    store: &mut S,
    producer: &Producer,
    options: &RelayOptions,
    stop: impl Future<Output = ()>,
) -> Result<Relayed> {
    let mut stop = std::pin::pin!(stop);
    tokio::select! {
        r = relay_loop(store, producer, options) => r,
        () = &mut stop => Ok(Relayed::default()),
    }
}

/// Backoff of a relay that waits for the broker.
struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);

    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
    }
}

async fn relay_loop<S: Store>(
    store: &mut S,
    producer: &Producer,
    options: &RelayOptions,
) -> Result<Relayed> {
    let epoch = store.epoch().await?;
    let mut done = Relayed::default();
    let mut idle = Duration::from_millis(50);
    let mut backoff = Backoff(Backoff::FIRST);
    loop {
        let rows = store.pending(options.batch.max(1)).await?;
        options.status.saw(rows.iter().map(|r| r.created_ms).min());
        if rows.is_empty() {
            if options.until_empty {
                return Ok(done);
            }
            store.wait(idle).await;
            idle = (idle * 2).min(options.max_poll);
            continue;
        }
        idle = Duration::from_millis(50);
        let limits = match producer.limits().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(
                    "outbox relay: the broker cannot be reached ({e}); retrying in {:?}",
                    backoff.0
                );
                backoff.wait().await;
                continue;
            }
        };
        if let Some(r) = unreachable_schedule(&rows[0], &limits) {
            // Scheduled so far ahead that waiting cannot be what was meant (ms written as
            // µs, say): set aside, so that it does not hold up the rows behind it.
            let why = format!(
                "deliver_at_ms {} is more than a day beyond the broker's max-schedule-delay \
                 ({:?}): set aside rather than hold up the rows after it",
                r.deliver_at_ms, limits.max_schedule_delay
            );
            tracing::error!(row = r.id, "outbox relay: {why}");
            store.mark_failed(r.id, &why).await?;
            done.failed += 1;
            continue;
        }
        let (batch, waits) = sendable(&epoch, &rows, &limits);
        if batch.is_empty() {
            // The first row is scheduled further ahead than the broker takes today; it
            // and the rows behind it wait until it is within reach.
            let r = &rows[0];
            if options.until_empty {
                done.waiting = rows.len() as u64;
                return Ok(done);
            }
            tracing::info!(
                row = r.id,
                deliver_at_ms = r.deliver_at_ms,
                "outbox relay: the next row is scheduled beyond the broker's max-schedule-delay; it waits (and the rows after it)"
            );
            store.wait(options.max_poll).await;
            continue;
        }
        let n = batch.len();
        match producer.send_batch(batch).await {
            Ok(_) => {
                backoff = Backoff(Backoff::FIRST);
                let ids: Vec<i64> = rows[..n].iter().map(|r| r.id).collect();
                store.mark_sent(&ids).await?;
                done.sent += ids.len() as u64;
                tracing::debug!(rows = ids.len(), waits, "outbox relay: sent");
            }
            Err(e) => match Refusal::of(&e) {
                Refusal::Stop => return Err(stopped(e)),
                Refusal::Retry => {
                    tracing::warn!(
                        "outbox relay: sending {n} rows failed ({e}); retrying in {:?}",
                        backoff.0
                    );
                    backoff.wait().await;
                }
                Refusal::SetAside => {
                    // Row by row: the good ones go, in order; a bad one is set aside.
                    for r in &rows[..n] {
                        match producer.send(message(&epoch, r)).await {
                            Ok(_) => {
                                store.mark_sent(&[r.id]).await?;
                                done.sent += 1;
                            }
                            Err(e) => match Refusal::of(&e) {
                                Refusal::SetAside => {
                                    tracing::error!(row = r.id, topic = %r.topic, "outbox relay: the broker refuses this row for good ({e}); set aside");
                                    store.mark_failed(r.id, &e.to_string()).await?;
                                    done.failed += 1;
                                }
                                Refusal::Stop => return Err(stopped(e)),
                                Refusal::Retry => {
                                    tracing::warn!(
                                        "outbox relay: row {} not sent ({e}); retrying in {:?}",
                                        r.id,
                                        backoff.0
                                    );
                                    backoff.wait().await;
                                    break;
                                }
                            },
                        }
                    }
                }
            },
        }
    }
}

/// The relay's error for a refusal that stops it.
fn stopped(e: txmq_client::Error) -> Error {
    let why = Refusal::advice(&e);
    tracing::error!("outbox relay stopped: {e}; {why}");
    Error::RelayStopped {
        why: why.to_string(),
        source: e,
    }
}

/// How far beyond the broker's schedule limit a row may be and still wait for it.
pub const SCHEDULE_SLACK: Duration = Duration::from_secs(24 * 3600);

/// `row`, when it is scheduled more than [`SCHEDULE_SLACK`] beyond what the broker
/// takes today.
fn unreachable_schedule<'a>(row: &'a Row, limits: &Limits) -> Option<&'a Row> {
    let max = limits.max_schedule_delay?;
    let latest = crate::now_ms().saturating_add((max + SCHEDULE_SLACK).as_millis() as i64);
    (row.deliver_at_ms as i64 > latest).then_some(row)
}

/// The messages of the first rows that can go now, in one request: as many as fit in
/// one frame (at least one: a row too large alone is the broker's to refuse), up to
/// the first row scheduled beyond the broker's limit. Also whether such a row stopped
/// the batch.
fn sendable(epoch: &str, rows: &[Row], limits: &Limits) -> (Vec<Message>, bool) {
    let latest = limits
        .max_schedule_delay
        .map(|d| crate::now_ms().saturating_add(d.as_millis() as i64));
    let mut batch = Vec::new();
    let mut bytes = 0;
    for r in rows {
        if latest.is_some_and(|l| r.deliver_at_ms as i64 > l) {
            return (batch, true);
        }
        let m = message(epoch, r);
        let len = Limits::message_len(&m);
        if !batch.is_empty() && bytes + len > limits.room() {
            break;
        }
        bytes += len;
        batch.push(m);
    }
    (batch, false)
}

/// The message a row holds, with its idempotency key.
fn message(epoch: &str, r: &Row) -> Message {
    Message {
        topic: r.topic.clone(),
        body: r.body.clone().into(),
        key: r.key.clone(),
        tag: r.tag.clone(),
        properties: r.properties.clone(),
        deliver_at_ms: r.deliver_at_ms,
        message_group: r.message_group.clone(),
        idempotency_key: format!("outbox/{epoch}/{}/{}", r.id, r.created_ms),
    }
}

/// A fresh epoch for a new table: 16 random hex digits (from the OS's random source
/// through std's hasher keys).
pub(crate) fn new_epoch() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:016x}", h.finish())
}
