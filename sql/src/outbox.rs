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

use std::time::Duration;

use txmq_client::{Message, Producer};

use crate::Result;

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
    /// Rows sent in one request.
    pub batch: usize,
    /// Longest wait between two looks at the table when nothing wakes the relay.
    pub max_poll: Duration,
    /// Stop once the table has no unsent row (tests, one-shot jobs).
    pub until_empty: bool,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            batch: 100,
            max_poll: Duration::from_secs(5),
            until_empty: false,
        }
    }
}

/// What one pass of the relay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Rows sent and marked.
    pub sent: u64,
    /// Rows the broker refused for good, set aside.
    pub failed: u64,
}

/// Sends pending rows until `stop` completes (or the table is empty, with
/// [`RelayOptions::until_empty`]); broker failures are retried with backoff (up to
/// 5 s), database failures end it.
///
/// # Errors
/// The database's error.
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

async fn relay_loop<S: Store>(
    store: &mut S,
    producer: &Producer,
    options: &RelayOptions,
) -> Result<Relayed> {
    let epoch = store.epoch().await?;
    let mut done = Relayed::default();
    let mut idle = Duration::from_millis(50);
    let mut broker_backoff = Duration::from_millis(100);
    loop {
        let rows = store.pending(options.batch.max(1)).await?;
        if rows.is_empty() {
            if options.until_empty {
                return Ok(done);
            }
            store.wait(idle).await;
            idle = (idle * 2).min(options.max_poll);
            continue;
        }
        idle = Duration::from_millis(50);
        let messages: Vec<Message> = rows.iter().map(|r| message(&epoch, r)).collect();
        match producer.send_batch(messages).await {
            Ok(_) => {
                broker_backoff = Duration::from_millis(100);
                let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
                store.mark_sent(&ids).await?;
                done.sent += ids.len() as u64;
                tracing::debug!(rows = ids.len(), "outbox relay: sent");
            }
            Err(e) if refused_for_good(&e) => {
                // Row by row: the good ones go, in order; the bad one is set aside.
                for r in &rows {
                    match producer.send(message(&epoch, r)).await {
                        Ok(_) => {
                            store.mark_sent(&[r.id]).await?;
                            done.sent += 1;
                        }
                        Err(e) if refused_for_good(&e) => {
                            tracing::error!(row = r.id, topic = %r.topic, "outbox relay: the broker refuses this row for good ({e}); set aside");
                            store.mark_failed(r.id, &e.to_string()).await?;
                            done.failed += 1;
                        }
                        Err(_) => break,
                    }
                }
            }
            Err(e) => {
                tracing::warn!(
                    "outbox relay: sending {} rows failed ({e}); retrying in {broker_backoff:?}",
                    rows.len()
                );
                tokio::time::sleep(broker_backoff).await;
                broker_backoff = (broker_backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
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

/// Whether the broker refused a send before storing anything, for a reason that sending
/// again cannot change.
fn refused_for_good(e: &txmq_client::Error) -> bool {
    use txmq_client::ErrorCode;
    matches!(
        e.code(),
        Some(
            ErrorCode::InvalidName
                | ErrorCode::MessageTooLarge
                | ErrorCode::TopicNotFound
                | ErrorCode::InvalidRequest
        )
    )
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
