//! Sending: plain messages, and transactions whose messages become visible together.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Mutex;
use txmq_protocol::ErrorCode;
use txmq_protocol::pb::{self, TxnOutcome, frame::Body};

use crate::batch::{self, Batcher};
use crate::connection::{self, Connection};
use crate::error::{Error, Result};

/// How many times a send whose messages all carry idempotency keys is made when its
/// answer is lost (the connection dropped, the call timed out, the leader changed).
const IDEMPOTENT_TRIES: u32 = 4;

/// A message to send.
#[derive(Debug, Clone, Default)]
pub struct Message {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub body: Bytes,
    /// Business key (for lookups and logs).
    pub key: String,
    /// Tag, for consumers' broker-side filters.
    pub tag: String,
    /// User properties.
    pub properties: HashMap<String, String>,
    /// Deliver no earlier than this (ms since the Unix epoch; 0: now).
    pub deliver_at_ms: u64,
    /// Message group (FIFO order for ordered consumer groups; empty: none).
    pub message_group: String,
    /// Idempotency key (empty: none): see [`Message::idempotency_key`].
    pub idempotency_key: String,
}

impl Message {
    /// A message with a topic and a body.
    pub fn new(topic: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            body: body.into(),
            ..Self::default()
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = key.into();
        self
    }

    /// Sets the tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = tag.into();
        self
    }

    /// Adds a property.
    pub fn property(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.properties.insert(k.into(), v.into());
        self
    }

    /// Puts the message in a message group: an ordered consumer group receives the
    /// messages of one group in the order they were stored, one at a time. In a
    /// transaction they take their place at commit, in the order they were sent.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.message_group = group.into();
        self
    }

    /// Makes the send idempotent: within the broker's dedup window (24 h by default) a
    /// second send of `key` to the same topic stores nothing and is answered with the
    /// first send's receipt. Use an id the message already has (an outbox row id, an
    /// order id with an event name), at most 256 bytes. The producer then resends on
    /// its own when a connection is lost before the answer (see [`Producer::send`]).
    /// Plain sends only: a transaction is stored once by its commit.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = key.into();
        self
    }

    /// Schedules the message: no consumer sees it before `at` (a time already past means
    /// now). In a transaction it is scheduled at commit and discarded by rollback. The
    /// broker refuses a time further ahead than its `max-schedule-delay` (40 days by
    /// default). The time is read against the broker's clock.
    pub fn deliver_at(mut self, at: std::time::SystemTime) -> Self {
        self.deliver_at_ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self
    }

    /// Schedules the message `after` from now (this machine's clock): see
    /// [`Message::deliver_at`].
    pub fn deliver_after(self, after: std::time::Duration) -> Self {
        // Past any representable time: far beyond the broker's maximum, which refuses it.
        let at = std::time::SystemTime::now()
            .checked_add(after)
            .unwrap_or(std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::MAX));
        self.deliver_at(at)
    }

    fn into_pb(self) -> pb::Message {
        pb::Message {
            topic: self.topic,
            body: self.body,
            key: self.key,
            tag: self.tag,
            properties: self.properties,
            born_ms: txmq_protocol::now_ms(),
            deliver_at_ms: self.deliver_at_ms,
            message_group: self.message_group,
            idempotency_key: self.idempotency_key,
        }
    }
}

/// Where a message was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Broker-assigned id.
    pub message_id: String,
    /// Topic.
    pub topic: String,
    /// Offset in the topic (0 for a half message or a scheduled one, which have none
    /// yet).
    pub offset: u64,
    /// For a message held back until later: its delivery time (ms since the Unix epoch).
    pub deliver_ms: u64,
}

impl From<pb::MessageReceipt> for Receipt {
    fn from(r: pb::MessageReceipt) -> Self {
        Self {
            message_id: r.message_id,
            topic: r.topic,
            offset: r.offset,
            deliver_ms: r.deliver_ms,
        }
    }
}

/// What became of a local transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Make the messages visible.
    Commit,
    /// Discard the messages.
    Rollback,
    /// Not known yet: the broker will check back later.
    Unknown,
}

impl Outcome {
    fn to_pb(self) -> TxnOutcome {
        match self {
            Outcome::Commit => TxnOutcome::Commit,
            Outcome::Rollback => TxnOutcome::Rollback,
            Outcome::Unknown => TxnOutcome::Unknown,
        }
    }
}

/// The broker asking what became of a transaction.
#[derive(Debug, Clone)]
pub struct CheckRequest {
    /// The transaction.
    pub txn_id: String,
    /// Its producer group.
    pub producer_group: String,
    /// Its half messages.
    pub messages: Vec<pb::StoredMessage>,
    /// Which check this is (1 for the first).
    pub attempt: u32,
    /// The transaction's bodies were too large for one frame, so `messages` carry ids,
    /// keys, tags and properties but empty bodies.
    pub bodies_omitted: bool,
    /// How many of the transaction's last half messages were left out because even
    /// without bodies they would not fit in one frame (0 nearly always; `messages` always
    /// holds the first).
    pub messages_omitted: u32,
}

/// Answers the broker's check-backs, typically by looking the transaction up in the
/// local database. An error or a panic answers [`Outcome::Unknown`].
pub trait TransactionChecker: Send + Sync + 'static {
    /// What became of `request.txn_id`?
    fn check(&self, request: CheckRequest) -> Pin<Box<dyn Future<Output = Outcome> + Send>>;

    /// What this checker can answer for (a database's identity, say): the broker sends
    /// it only the checks of transactions whose messages carry one of these in the
    /// property [`crate::CHECK_SCOPE_PROPERTY`], and (with none declared) those
    /// that carry none. Default: none.
    fn scopes(&self) -> Vec<String> {
        Vec::new()
    }
}

impl<F, Fut> TransactionChecker for F
where
    F: Fn(CheckRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    fn check(&self, request: CheckRequest) -> Pin<Box<dyn Future<Output = Outcome> + Send>> {
        Box::pin(self(request))
    }
}

/// How a producer connects.
#[derive(Clone, Default)]
pub struct ProducerOptions {
    /// Producer group: the broker sends check-backs for the group's transactions to its
    /// connected members. Required for transactions.
    pub group: String,
    /// Answers check-backs.
    pub checker: Option<Arc<dyn TransactionChecker>>,
    /// Shared secret, when the broker requires one.
    pub auth_token: String,
    /// The user to authenticate as (a broker with users requires one).
    pub user: Option<connection::User>,
    /// TLS to the broker (`None`: plain TCP).
    pub tls: Option<crate::tls::Tls>,
    /// How long a call waits for the broker's answer (`None`: 30 s). A call that times
    /// out fails with [`Error::Timeout`] and the connection is dialled again.
    pub call_timeout: Option<std::time::Duration>,
}

impl std::fmt::Debug for ProducerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerOptions")
            .field("group", &self.group)
            .field("checker", &self.checker.is_some())
            .finish()
    }
}

impl ProducerOptions {
    /// Options for a producer of `group` with a checker.
    pub fn transactional(group: impl Into<String>, checker: impl TransactionChecker) -> Self {
        Self {
            group: group.into(),
            checker: Some(Arc::new(checker)),
            auth_token: String::new(),
            user: None,
            tls: None,
            call_timeout: None,
        }
    }
}

/// Send requests of one producer in flight at once.
const SEND_BATCHES: usize = 4;

/// Transactional requests of one producer in flight at once. More than for plain sends:
/// every transaction makes two round trips, and the broker stores and syncs each request
/// in a pipeline, so requests in flight are what keeps it full (the txn bench: 31,600
/// txn/s with 4, 43,500 with 16, no more with 32 or 64).
const TXN_BATCHES: usize = 16;

/// Sends messages; reconnects with backoff when the connection is lost.
#[derive(Debug, Clone)]
pub struct Producer {
    addr: String,
    options: ProducerOptions,
    /// The current connection: a plain mutex held only to clone it, so concurrent sends
    /// do not queue behind each other.
    conn: Arc<std::sync::Mutex<Option<Connection>>>,
    /// Held while reconnecting, so only one caller dials.
    dialing: Arc<Mutex<()>>,
    /// Coalesces concurrent [`Producer::send`] calls into one request (see
    /// [`crate::batch`]). `None` in the batcher's own handle, which must not keep itself
    /// alive.
    sends: Option<Batcher<pb::Message, Receipt>>,
    /// Coalesces the prepares and ends of concurrent transactions into one request, the
    /// same way; `None` likewise in the batcher's own handle, and without a group.
    txn_calls: Option<Batcher<pb::TxnCall, pb::TxnCallResult>>,
    /// Held by the handles the user has (and their transactions), not by the producer's
    /// own tasks: once the last is dropped, check-backs get no answer, not even from a
    /// checker call already running, however long the tasks take to wind down.
    owner: Option<Arc<()>>,
    /// The same, for the tasks: they answer only while an owner lives.
    owned: std::sync::Weak<()>,
}

impl Producer {
    /// Connects to the broker at `addr`.
    ///
    /// # Errors
    /// The broker is unreachable or refuses the handshake.
    pub async fn connect(addr: &str, options: ProducerOptions) -> Result<Self> {
        if !options.group.is_empty() {
            txmq_protocol::names::validate("producer group", &options.group)
                .map_err(Error::Invalid)?;
        }
        let owner = Arc::new(());
        let mut p = Self {
            addr: addr.to_string(),
            options,
            conn: Arc::default(),
            dialing: Arc::default(),
            sends: None,
            txn_calls: None,
            owned: Arc::downgrade(&owner),
            owner: None,
        };
        p.connection().await?;
        if p.options.checker.is_some() {
            // A producer that answers check-backs must be reachable even when it sends
            // nothing: after the broker restarts or the network breaks, this task dials
            // again on its own (with backoff) so the group's checks find it.
            tokio::spawn(keep_connected(
                Arc::downgrade(&p.conn),
                Arc::downgrade(&p.dialing),
                p.addr.clone(),
                p.options.clone(),
                p.owned.clone(),
            ));
        }
        // The batchers' own handle: no owner, so it does not keep checks answered.
        let link = p.clone();
        p.sends = Some({
            let link = link.clone();
            Batcher::spawn(SEND_BATCHES, prost::Message::encoded_len, move |messages| {
                send_coalesced(link.clone(), messages)
            })
        });
        if !p.options.group.is_empty() {
            p.txn_calls = Some(Batcher::spawn(
                TXN_BATCHES,
                prost::Message::encoded_len,
                move |calls| txn_calls_coalesced(link.clone(), calls),
            ));
        }
        p.owner = Some(owner);
        Ok(p)
    }

    /// The live connection, reconnecting (with backoff, a few tries) when it was lost.
    async fn connection(&self) -> Result<Connection> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let _dialing = self.dialing.lock().await;
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let mut attempt = 0;
        loop {
            match self.open().await {
                Ok(c) => {
                    *self.conn.lock().expect("connection lock") = Some(c.clone());
                    return Ok(c);
                }
                Err(e @ Error::Broker { .. }) => return Err(e),
                Err(e) if attempt >= 4 => return Err(e),
                Err(e) => {
                    tracing::debug!("reconnect to {} failed: {e}", self.addr);
                    connection::backoff(attempt).await;
                    attempt += 1;
                }
            }
        }
    }

    fn live(&self) -> Option<Connection> {
        let slot = self.conn.lock().expect("connection lock");
        slot.as_ref().filter(|c| !c.is_closed()).cloned()
    }

    async fn open(&self) -> Result<Connection> {
        open(&self.addr, &self.options, &self.owned).await
    }

    /// Sends one message; returns once the broker has stored it durably.
    ///
    /// # Errors
    /// The broker refused it, or the connection was lost (it may or may not be stored).
    ///
    /// Concurrent calls on one producer (clones included) are sent together as one
    /// request when they find each other waiting; each still gets its own receipt or error.
    pub async fn send(&self, message: Message) -> Result<Receipt> {
        match &self.sends {
            Some(batcher) => batcher.submit(message.into_pb()).await,
            None => self.send_one(message.into_pb()).await,
        }
    }

    async fn send_one(&self, message: pb::Message) -> Result<Receipt> {
        let req = pb::SendRequest {
            messages: vec![message],
            ..Default::default()
        };
        self.send_request(req)
            .await?
            .0
            .pop()
            .ok_or_else(|| Error::Unexpected("no receipt".into()))
    }

    /// Sends several messages in one request: stored together, in order.
    ///
    /// # Errors
    /// As [`Producer::send`].
    pub async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<Receipt>> {
        let req = pb::SendRequest {
            messages: messages.into_iter().map(Message::into_pb).collect(),
            ..Default::default()
        };
        Ok(self.send_request(req).await?.0)
    }

    async fn send_request(&self, req: pb::SendRequest) -> Result<(Vec<Receipt>, String)> {
        // Safe to send again when the broker would recognise every message of it: a
        // lost answer is then no longer an unknown outcome.
        let resendable =
            !req.transactional && req.messages.iter().all(|m| !m.idempotency_key.is_empty());
        let mut tries = 0;
        loop {
            tries += 1;
            match self.send_request_once(req.clone()).await {
                Err(e) if resendable && tries < IDEMPOTENT_TRIES && e.outcome_unknown() => {
                    tracing::info!(
                        "send with idempotency keys lost its answer ({e}); sending it again \
                         (try {} of {IDEMPOTENT_TRIES})",
                        tries + 1
                    );
                }
                other => return other,
            }
        }
    }

    async fn send_request_once(&self, req: pb::SendRequest) -> Result<(Vec<Receipt>, String)> {
        let conn = self.connection().await?;
        match conn.call(Body::Send(req)).await? {
            pb::response::Result::Send(ok) => Ok((
                ok.receipts.into_iter().map(Receipt::from).collect(),
                ok.txn_id,
            )),
            other => Err(Error::Unexpected(format!("{other:?}"))),
        }
    }

    /// What the broker announced at the handshake (connecting first if need be).
    ///
    /// # Errors
    /// The broker cannot be reached.
    pub async fn limits(&self) -> Result<Limits> {
        let conn = self.connection().await?;
        Ok(Limits {
            max_frame_len: conn.max_frame_len(),
            max_schedule_delay: conn.max_schedule_delay(),
        })
    }

    /// Starts a transaction. Nothing is sent until its first message.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the producer has no group.
    pub fn begin(&self) -> Result<Transaction> {
        if self.options.group.is_empty() {
            return Err(Error::Invalid(
                "transactions need a producer group (ProducerOptions::group)".into(),
            ));
        }
        Ok(Transaction {
            producer: self.clone(),
            txn_id: None,
            receipts: Vec::new(),
            check_delay_ms: 0,
        })
    }

    /// The whole flow: sends `messages` as half messages, runs `local` (the local
    /// database transaction), then commits or rolls back on its answer. `Unknown` leaves
    /// the transaction to the broker's check-back.
    ///
    /// # Errors
    /// A refused send or resolution; the local transaction is not run when the half
    /// messages could not be stored.
    pub async fn send_in_transaction<F, Fut>(
        &self,
        messages: Vec<Message>,
        local: F,
    ) -> Result<(Outcome, Transaction)>
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Outcome>,
    {
        let mut txn = self.begin()?;
        txn.send_batch(messages).await?;
        let id = txn.id().expect("sent").to_string();
        let outcome = local(id).await;
        match outcome {
            Outcome::Commit => txn.commit().await?,
            Outcome::Rollback => txn.rollback().await?,
            Outcome::Unknown => txn.end(Outcome::Unknown).await?,
        };
        Ok((outcome, txn))
    }

    /// Resolves a transaction of this producer's group by id (a producer that restarted).
    /// `operator` is refused on a producer's connection: operators resolve through
    /// [`crate::Admin`], which the transaction's history records.
    ///
    /// # Errors
    /// The broker's refusal (not found, another group's transaction, conflicting
    /// resolution).
    pub async fn end_transaction(
        &self,
        txn_id: &str,
        outcome: Outcome,
        operator: bool,
    ) -> Result<pb::EndTxnOk> {
        let req = pb::EndTxnRequest {
            txn_id: txn_id.to_string(),
            outcome: outcome.to_pb() as i32,
            operator,
        };
        if let Some(batcher) = &self.txn_calls {
            let call = pb::TxnCall {
                call: Some(pb::txn_call::Call::End(req)),
            };
            return match batcher.submit(call).await?.result {
                Some(pb::txn_call_result::Result::Ended(ok)) => Ok(ok),
                other => Err(Error::Unexpected(format!("{other:?}"))),
            };
        }
        let conn = self.connection().await?;
        match conn.call(Body::EndTxn(req)).await? {
            pb::response::Result::EndTxn(ok) => Ok(ok),
            other => Err(Error::Unexpected(format!("{other:?}"))),
        }
    }

    /// Cancels a scheduled message before its time (what RocketMQ 5.3 calls recall);
    /// returns its topic and the time it was scheduled for. Cancelling it again succeeds.
    ///
    /// # Errors
    /// `ALREADY_DELIVERED` (too late; the message says where it went),
    /// `SCHEDULED_NOT_FOUND` (never scheduled, or cancelled long ago), a bad id.
    pub async fn cancel_scheduled(&self, message_id: &str) -> Result<pb::CancelScheduledOk> {
        let conn = self.connection().await?;
        let req = pb::CancelScheduledRequest {
            message_id: message_id.to_string(),
        };
        match conn.call(Body::CancelScheduled(req)).await? {
            pb::response::Result::CancelScheduled(ok) => Ok(ok),
            other => Err(Error::Unexpected(format!("{other:?}"))),
        }
    }

    /// Stores half messages (a transactional send), coalesced with other transactions'
    /// calls when they find each other waiting.
    async fn prepare(&self, req: pb::SendRequest) -> Result<(Vec<Receipt>, String)> {
        let Some(batcher) = &self.txn_calls else {
            return self.send_request(req).await;
        };
        let call = pb::TxnCall {
            call: Some(pb::txn_call::Call::Prepare(req)),
        };
        match batcher.submit(call).await?.result {
            Some(pb::txn_call_result::Result::Prepared(ok)) => Ok((
                ok.receipts.into_iter().map(Receipt::from).collect(),
                ok.txn_id,
            )),
            other => Err(Error::Unexpected(format!("{other:?}"))),
        }
    }
}

/// Sends the prepares and ends of concurrent transactions as one request; each caller gets
/// its own call's answer or refusal.
async fn txn_calls_coalesced(
    link: Producer,
    calls: Vec<pb::TxnCall>,
) -> Vec<Result<pb::TxnCallResult>> {
    let n = calls.len();
    let answer = async {
        let conn = link.connection().await?;
        conn.call(Body::TxnBatch(pb::TxnBatchRequest { calls }))
            .await
    };
    match answer.await {
        Ok(pb::response::Result::TxnBatch(ok)) if ok.results.len() == n => ok
            .results
            .into_iter()
            .map(|mut r| {
                connection::refusal(r.code, std::mem::take(&mut r.message))?;
                Ok(r)
            })
            .collect(),
        Ok(other) => {
            let e = Error::Unexpected(format!("a txn batch of {n} calls got {other:?}"));
            (0..n).map(|_| Err(batch::copy_error(&e))).collect()
        }
        Err(e) => (0..n).map(|_| Err(batch::copy_error(&e))).collect(),
    }
}

/// Sends a batch of plain messages from concurrent [`Producer::send`] calls as one
/// request. A batch refused as a whole before anything was stored (a bad name, a message
/// too large) is sent again message by message, so only the bad one fails.
async fn send_coalesced(link: Producer, messages: Vec<pb::Message>) -> Vec<Result<Receipt>> {
    let n = messages.len();
    let req = pb::SendRequest {
        messages: messages.clone(),
        ..Default::default()
    };
    match link.send_request(req).await {
        Ok((receipts, _)) if receipts.len() == n => receipts.into_iter().map(Ok).collect(),
        Ok((receipts, _)) => {
            let e = Error::Unexpected(format!("{} receipts for {n} messages", receipts.len()));
            (0..n).map(|_| Err(batch::copy_error(&e))).collect()
        }
        Err(Error::Broker { code, .. }) if n > 1 && refused_before_storing(code) => {
            futures::future::join_all(messages.into_iter().map(|m| link.send_one(m))).await
        }
        Err(e) => (0..n).map(|_| Err(batch::copy_error(&e))).collect(),
    }
}

/// Refusals the broker gives after checking a request and before storing any of it.
fn refused_before_storing(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::InvalidName
            | ErrorCode::MessageTooLarge
            | ErrorCode::TopicNotFound
            | ErrorCode::InvalidRequest
            | ErrorCode::IdempotencyConflict
            | ErrorCode::IdempotencyDisabled
            | ErrorCode::ScheduleTooFar
            | ErrorCode::LimitReached
    )
}

/// Dials and says hello; a producer with a checker then answers the broker's checks on
/// this connection.
async fn open(
    addr: &str,
    options: &ProducerOptions,
    owned: &std::sync::Weak<()>,
) -> Result<Connection> {
    let mut hello = connection::hello(pb::Role::Producer, &options.group, &options.auth_token);
    hello.answers_checks = options.checker.is_some();
    hello.check_scopes = options
        .checker
        .as_ref()
        .map(|c| c.scopes())
        .unwrap_or_default();
    let timeout = options.call_timeout.unwrap_or(connection::CALL_TIMEOUT);
    let (conn, mut pushes) = Connection::open_as(
        addr,
        hello,
        options.user.as_ref(),
        options.tls.as_ref(),
        timeout,
    )
    .await?;
    if let Some(checker) = options.checker.clone() {
        // Weak: a dropped producer must close its connection, not keep answering.
        let weak = conn.downgrade();
        let owned = owned.clone();
        tokio::spawn(async move {
            while let Some((id, req)) = pushes.checks.recv().await {
                if weak.upgrade().is_none() || owned.strong_count() == 0 {
                    return;
                }
                let answer = answer_check(weak.clone(), owned.clone(), checker.clone(), id, req);
                tokio::spawn(answer);
            }
        });
    }
    Ok(conn)
}

/// Keeps a checker's connection open while the producer lives: every half second, a lost
/// connection is dialled again, backing off up to 5 s between failures.
async fn keep_connected(
    slot: std::sync::Weak<std::sync::Mutex<Option<Connection>>>,
    dialing: std::sync::Weak<Mutex<()>>,
    addr: String,
    options: ProducerOptions,
    owned: std::sync::Weak<()>,
) {
    let mut attempt = 0;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let live = |slot: &std::sync::Mutex<Option<Connection>>| {
            slot.lock()
                .expect("connection lock")
                .as_ref()
                .is_some_and(|c| !c.is_closed())
        };
        let (Some(slot), Some(dialing)) = (slot.upgrade(), dialing.upgrade()) else {
            return;
        };
        if owned.strong_count() == 0 {
            return;
        }
        if live(&slot) {
            attempt = 0;
            continue;
        }
        let _dialing = dialing.lock().await;
        if live(&slot) {
            continue;
        }
        match open(&addr, &options, &owned).await {
            Ok(conn) => {
                *slot.lock().expect("connection lock") = Some(conn);
                tracing::info!(group = %options.group, "reconnected to {addr} to answer check-backs");
                attempt = 0;
            }
            Err(e) => {
                tracing::warn!(group = %options.group, "cannot reach {addr} to answer check-backs: {e}");
                drop(_dialing);
                connection::backoff(attempt).await;
                attempt += 1;
            }
        }
    }
}

/// Runs the checker and answers on the connection, if it and the producer still live:
/// the check keeps neither open while the checker runs, and a producer dropped meanwhile
/// sends nothing (its owner may have dropped it precisely to stop answering).
async fn answer_check(
    conn: connection::WeakConnection,
    owned: std::sync::Weak<()>,
    checker: Arc<dyn TransactionChecker>,
    id: u64,
    req: pb::CheckRequest,
) {
    let request = CheckRequest {
        txn_id: req.txn_id.clone(),
        producer_group: req.producer_group,
        messages: req.messages,
        attempt: req.attempt,
        bodies_omitted: req.bodies_omitted,
        messages_omitted: req.messages_omitted,
    };
    // Run the user's checker in its own task: a panic there answers Unknown.
    let outcome = tokio::spawn(checker.check(request))
        .await
        .unwrap_or(Outcome::Unknown);
    let frame = txmq_protocol::Frame {
        id,
        body: Some(Body::CheckReply(pb::CheckReply {
            txn_id: req.txn_id,
            outcome: outcome.to_pb() as i32,
        })),
    };
    if owned.strong_count() == 0 {
        tracing::debug!("producer dropped: check answer not sent");
        return;
    }
    if let Some(conn) = conn.upgrade() {
        let _ = conn.send_frame(frame).await;
    }
}

/// An open transaction: messages sent on it stay invisible until [`Transaction::commit`].
#[derive(Debug)]
pub struct Transaction {
    producer: Producer,
    txn_id: Option<String>,
    receipts: Vec<Receipt>,
    check_delay_ms: u64,
}

impl Transaction {
    /// The broker's id, once the first message is sent.
    pub fn id(&self) -> Option<&str> {
        self.txn_id.as_deref()
    }

    /// Receipts of the half messages sent so far (or, after commit, where they landed).
    pub fn receipts(&self) -> &[Receipt] {
        &self.receipts
    }

    /// Overrides the first check-back delay (before the first send).
    pub fn check_after(&mut self, delay: std::time::Duration) {
        self.check_delay_ms = delay.as_millis() as u64;
    }

    /// Adds a message (stored durably as a half message).
    ///
    /// # Errors
    /// The broker refused it.
    pub async fn send(&mut self, message: Message) -> Result<Receipt> {
        let mut r = self.send_batch(vec![message]).await?;
        r.pop()
            .ok_or_else(|| Error::Unexpected("no receipt".into()))
    }

    /// Adds several messages.
    ///
    /// # Errors
    /// The broker refused them.
    pub async fn send_batch(&mut self, messages: Vec<Message>) -> Result<Vec<Receipt>> {
        let req = pb::SendRequest {
            messages: messages.into_iter().map(Message::into_pb).collect(),
            transactional: true,
            txn_id: self.txn_id.clone().unwrap_or_default(),
            producer_group: self.producer.options.group.clone(),
            check_delay_ms: self.check_delay_ms,
        };
        let (receipts, id) = self.producer.prepare(req).await?;
        self.txn_id = Some(id);
        self.receipts.extend(receipts.iter().cloned());
        Ok(receipts)
    }

    /// Commits: every message becomes visible at once. Returns after the broker has
    /// durably resolved the transaction. Repeating it is harmless.
    ///
    /// # Errors
    /// The transaction was rolled back (`TXN_ALREADY_ROLLED_BACK`), or not found.
    pub async fn commit(&mut self) -> Result<()> {
        self.end(Outcome::Commit).await
    }

    /// Rolls back: the messages are discarded and never delivered.
    ///
    /// # Errors
    /// The transaction was committed (`TXN_ALREADY_COMMITTED`), or not found.
    pub async fn rollback(&mut self) -> Result<()> {
        self.end(Outcome::Rollback).await
    }

    async fn end(&mut self, outcome: Outcome) -> Result<()> {
        let Some(id) = self.txn_id.clone() else {
            // Nothing was ever sent: there is nothing to resolve.
            return Ok(());
        };
        let ok = self.producer.end_transaction(&id, outcome, false).await?;
        if !ok.receipts.is_empty() {
            self.receipts = ok.receipts.into_iter().map(Receipt::from).collect();
        }
        Ok(())
    }
}

/// Limits a broker announces when a connection opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest frame it takes (a request's encoded size, header excluded).
    pub max_frame_len: usize,
    /// How far ahead a message may be scheduled; `None` from a broker that does not say.
    pub max_schedule_delay: Option<std::time::Duration>,
}

impl Limits {
    /// What `message` adds to a send request's frame: its encoding, its field's tag
    /// and its length.
    pub fn message_len(message: &Message) -> usize {
        prost::Message::encoded_len(&message.clone().into_pb()) + 6
    }

    /// Room a send request's frame has for its messages (the request's own fields
    /// and the frame's taken off).
    pub fn room(&self) -> usize {
        self.max_frame_len.saturating_sub(256)
    }
}
