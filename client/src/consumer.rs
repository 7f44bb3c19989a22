//! Receiving: a consumer in a group, as a `Stream` of leased deliveries.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use txmq_protocol::pb::{self, frame::Body};

use crate::batch::{self, Batcher};
use crate::connection::{self, Connection, Pushes};
use crate::error::{Error, Result};

/// Ack requests of one consumer connection in flight at once. The broker writes a
/// queue's acks one batch at a time and answers them once durable, so an answer can take
/// two group commits; with 4 in flight the e2e bench lost ~5 % and doubled its p50.
const ACK_BATCHES: usize = 16;

/// Where a new group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// The first message still in the topic.
    #[default]
    Earliest,
    /// Only messages sent after the group was created.
    Latest,
}

/// What a consumer subscribes to, and how.
#[derive(Debug, Clone, Default)]
pub struct ConsumerOptions {
    /// Consumer group: each message reaches one consumer of the group.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// `A||B` tag filter, applied on the broker; empty for all.
    pub tag_filter: String,
    /// Where a new group starts.
    pub start_from: StartFrom,
    /// Lease of each delivery (`None`: broker default, 30 s).
    pub lease: Option<Duration>,
    /// Unacknowledged deliveries held at most (0: broker default).
    pub window: u32,
    /// Group override of max attempts before the dead-letter queue (0: broker default).
    pub max_attempts: u32,
    /// Make `tag_filter` the group's filter on this topic even when the group already
    /// has another one. Without it, a differing filter is refused (`FILTER_CONFLICT`)
    /// instead of silently making the whole group skip what this consumer does not want.
    pub replace_filter: bool,
    /// An ordered (FIFO) group: the messages of one message group arrive in the order
    /// they were stored, the next only after the previous was acked (or dead-lettered).
    /// Fixed by the group's first subscription (`ORDERING_CONFLICT` otherwise).
    pub ordered: bool,
    /// Shared secret, when the broker requires one.
    pub auth_token: String,
    /// The user to authenticate as (a broker with users requires one).
    pub user: Option<crate::connection::User>,
    /// TLS to the broker (`None`: plain TCP).
    pub tls: Option<crate::tls::Tls>,
}

impl ConsumerOptions {
    /// Options for `group` on `topic`, defaults otherwise.
    pub fn new(group: impl Into<String>, topic: impl Into<String>) -> Self {
        Self {
            group: group.into(),
            topic: topic.into(),
            ..Self::default()
        }
    }

    /// Makes the group ordered (FIFO per message group): see [`ConsumerOptions::ordered`].
    #[must_use]
    pub fn ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }
}

/// One leased message. Ack it when done; otherwise it comes back when the lease expires.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub message: pb::StoredMessage,
    /// 1 for the first delivery, then one more for each redelivery.
    pub attempt: u32,
    /// Broker clock when the lease ends.
    pub lease_deadline_ms: u64,
    handle: pb::DeliveryHandle,
    conn: Connection,
    acks: Batcher<pb::DeliveryHandle, ()>,
}

impl Delivery {
    /// Broker-assigned message id.
    pub fn id(&self) -> &str {
        &self.message.message_id
    }
    /// Topic.
    pub fn topic(&self) -> &str {
        &self.message.topic
    }
    /// Offset in the topic.
    pub fn offset(&self) -> u64 {
        self.message.offset
    }
    /// Key.
    pub fn key(&self) -> &str {
        &self.message.key
    }
    /// Tag.
    pub fn tag(&self) -> &str {
        &self.message.tag
    }
    /// Payload.
    pub fn body(&self) -> &Bytes {
        &self.message.body
    }
    /// Its message group (empty: none).
    pub fn message_group(&self) -> &str {
        &self.message.message_group
    }
    /// For a scheduled message, the time it was scheduled for (ms since the Unix epoch);
    /// 0 for others.
    pub fn deliver_ms(&self) -> u64 {
        self.message.deliver_ms
    }
    /// The handle that names this lease.
    pub fn handle(&self) -> &pb::DeliveryHandle {
        &self.handle
    }

    /// Acknowledges: the group never receives this message again.
    ///
    /// # Errors
    /// `LEASE_NOT_FOUND` when the lease expired and the message went to another consumer.
    ///
    /// Concurrent acks on one connection go to the broker together as one request (see
    /// [`crate::batch`]); each still gets its own answer.
    pub async fn ack(&self) -> Result<()> {
        self.acks.submit(self.handle.clone()).await
    }

    /// Refuses: redelivered after `delay`, or after the broker's backoff schedule (1 s,
    /// 5 s, 10 s, 30 s, …) when `None`; dead-lettered once out of attempts.
    ///
    /// # Errors
    /// As [`Delivery::ack`].
    pub async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        self.conn
            .call(Body::Nack(pb::NackRequest {
                handle: Some(self.handle.clone()),
                delay_ms: delay.map_or(0, |d| d.as_millis() as u64),
                use_backoff: delay.is_none(),
            }))
            .await
            .map(drop)
    }

    /// Extends the lease to `lease` from now; returns the new deadline (broker clock, ms).
    ///
    /// # Errors
    /// As [`Delivery::ack`].
    pub async fn extend(&self, lease: Duration) -> Result<u64> {
        match self
            .conn
            .call(Body::Extend(pb::ExtendRequest {
                handle: Some(self.handle.clone()),
                lease_ms: lease.as_millis() as u64,
            }))
            .await?
        {
            pb::response::Result::Extend(ok) => Ok(ok.lease_deadline_ms),
            other => Err(Error::Unexpected(format!("{other:?}"))),
        }
    }
}

/// A subscribed consumer. Poll it as a `Stream`; dropping it unsubscribes, and the broker
/// releases its unacknowledged deliveries to the group's other consumers at once.
#[derive(Debug)]
pub struct Consumer {
    rx: mpsc::Receiver<Result<Delivery>>,
    task: tokio::task::JoinHandle<()>,
    close: mpsc::Sender<oneshot::Sender<Result<()>>>,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Consumer {
    /// Subscribes to `options.topic` in `options.group` at the broker at `addr`. When the
    /// connection is lost, it reconnects with backoff and subscribes again.
    ///
    /// # Errors
    /// The first connection or subscription failed.
    pub async fn subscribe(addr: &str, options: ConsumerOptions) -> Result<Self> {
        txmq_protocol::names::validate("group", &options.group).map_err(Error::Invalid)?;
        txmq_protocol::names::validate("topic", &options.topic).map_err(Error::Invalid)?;
        let first = open(addr, &options).await?;
        let (tx, rx) = mpsc::channel(1024);
        let (close, close_rx) = mpsc::channel(1);
        let addr = addr.to_string();
        let task = tokio::spawn(pump(addr, options, first, tx, close_rx));
        Ok(Self { rx, task, close })
    }

    /// Leaves the group cleanly: the broker stops delivering to this consumer and gives
    /// what it pushed but was never acked (or nacked) to the group's other consumers at
    /// once, without counting an attempt. Ack what you processed first. Dropping a
    /// consumer instead releases its deliveries as a crash would, counting an attempt.
    ///
    /// # Errors
    /// The broker could not be told (the connection was lost: then it releases the
    /// deliveries as for a crash).
    pub async fn close(self) -> Result<()> {
        let (reply, done) = oneshot::channel();
        if self.close.send(reply).await.is_err() {
            return Ok(());
        }
        done.await.unwrap_or(Ok(()))
    }
}

impl Stream for Consumer {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// A live subscription: its connection, the broker's pushes, its id.
type Subscribed = (Connection, Pushes, u64);

async fn open(addr: &str, o: &ConsumerOptions) -> Result<Subscribed> {
    let hello = connection::hello(pb::Role::Consumer, "", &o.auth_token);
    let (conn, pushes) = Connection::open_as(
        addr,
        hello,
        o.user.as_ref(),
        o.tls.as_ref(),
        crate::connection::CALL_TIMEOUT,
    )
    .await?;
    let ok = conn
        .call(Body::Subscribe(pb::SubscribeRequest {
            group: o.group.clone(),
            topic: o.topic.clone(),
            tag_filter: o.tag_filter.clone(),
            start_from: match o.start_from {
                StartFrom::Earliest => pb::StartFrom::Earliest,
                StartFrom::Latest => pb::StartFrom::Latest,
            } as i32,
            lease_ms: o.lease.map_or(0, |d| d.as_millis() as u64),
            window: o.window,
            max_attempts: o.max_attempts,
            replace_filter: o.replace_filter,
            ordered: o.ordered,
        }))
        .await?;
    let pb::response::Result::Subscribe(ok) = ok else {
        return Err(Error::Unexpected(format!("{ok:?}")));
    };
    Ok((conn, pushes, ok.subscription_id))
}

async fn pump(
    addr: String,
    options: ConsumerOptions,
    first: Subscribed,
    tx: mpsc::Sender<Result<Delivery>>,
    mut close: mpsc::Receiver<oneshot::Sender<Result<()>>>,
) {
    let mut current = Some(first);
    let mut attempt = 0;
    loop {
        let (conn, mut pushes, subscription_id) = match current.take() {
            Some(c) => c,
            // Closed while disconnected: there is no subscription to end.
            None if !close.is_empty() => {
                if let Ok(reply) = close.try_recv() {
                    let _ = reply.send(Ok(()));
                }
                return;
            }
            None => match open(&addr, &options).await {
                Ok(c) => {
                    attempt = 0;
                    c
                }
                Err(e) => {
                    if matches!(e, Error::Broker { .. }) && tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    connection::backoff(attempt).await;
                    attempt += 1;
                    continue;
                }
            },
        };
        let acks = {
            let conn = conn.clone();
            Batcher::spawn(ACK_BATCHES, prost::Message::encoded_len, move |handles| {
                ack_coalesced(conn.clone(), handles)
            })
        };
        loop {
            let d = tokio::select! {
                d = pushes.deliveries.recv() => match d {
                    Some(d) => d,
                    None => break,
                },
                Some(reply) = close.recv() => {
                    let _ = reply.send(unsubscribe(&conn, subscription_id).await);
                    return;
                }
            };
            let (Some(message), Some(handle)) = (d.message, d.handle) else {
                continue;
            };
            let delivery = Delivery {
                message,
                attempt: d.attempt,
                lease_deadline_ms: d.lease_deadline_ms,
                handle,
                conn: conn.clone(),
                acks: acks.clone(),
            };
            // A caller that stopped reading may be closing: listen for that too.
            tokio::select! {
                sent = tx.send(Ok(delivery)) => if sent.is_err() { return },
                Some(reply) = close.recv() => {
                    let _ = reply.send(unsubscribe(&conn, subscription_id).await);
                    return;
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        tracing::debug!("consumer connection lost; reconnecting");
    }
}

async fn unsubscribe(conn: &Connection, subscription_id: u64) -> Result<()> {
    conn.call(Body::Unsubscribe(pb::UnsubscribeRequest {
        subscription_id,
    }))
    .await
    .map(drop)
}

/// Acks a batch of handles in one request. When the broker refuses it (one lease had
/// expired, say), it has still recorded the others; asking again one by one gives each
/// handle its own answer (a repeated ack of a recorded one is a success).
async fn ack_coalesced(conn: Connection, handles: Vec<pb::DeliveryHandle>) -> Vec<Result<()>> {
    let n = handles.len();
    let ack = |handles| conn.call(Body::Ack(pb::AckRequest { handles }));
    match ack(handles.clone()).await {
        Ok(_) => (0..n).map(|_| Ok(())).collect(),
        Err(Error::Broker { .. }) if n > 1 => {
            futures::future::join_all(
                handles
                    .into_iter()
                    .map(|h| async { ack(vec![h]).await.map(drop) }),
            )
            .await
        }
        Err(e) => (0..n).map(|_| Err(batch::copy_error(&e))).collect(),
    }
}
