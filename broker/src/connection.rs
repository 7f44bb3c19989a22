//! One client connection.
//!
//! A reader loop decodes frames and dispatches each to [`crate::cmd`]; the answers are
//! futures collected in a `FuturesUnordered`, so one connection pipelines many requests
//! (and they share group commits). A separate writer task drains the bounded outbound
//! channel into the socket; deliveries and check requests use the same channel.
//!
//! A frame that cannot be decoded closes this connection only, after a `MALFORMED_FRAME`
//! response saying why; the reason is logged. When more than
//! `max-in-flight-per-connection` requests wait, the loop stops reading the socket:
//! backpressure rather than unbounded buffering.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use txmq_protocol::pb::{self, frame::Body};
use txmq_protocol::{ErrorCode, Frame, FrameCodec};

use crate::cmd::{self, Pending};
use crate::delivery::QueueMsg;
use crate::error::Error;
use crate::server::Shared;
use crate::topics::Topic;

/// An answer on its way, with the bytes its request holds of the budgets.
type Admitted = std::pin::Pin<Box<dyn std::future::Future<Output = (usize, Frame)> + Send>>;

/// A request waiting for the broker-wide byte budget.
struct Admitting {
    frame: Frame,
    bytes: usize,
    permit: std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError>,
                > + Send,
        >,
    >,
}

/// The broker-wide budget counts KiB.
pub const BUDGET_UNIT: usize = 1024;

/// KiB of budget `bytes` take (at least one).
fn budget_units(bytes: usize) -> u32 {
    bytes.div_ceil(BUDGET_UNIT).max(1) as u32
}

/// The answer to an admitted request, releasing its share of the broker-wide budget when
/// it is ready.
fn admitted(answer: Pending, bytes: usize, permit: tokio::sync::OwnedSemaphorePermit) -> Admitted {
    Box::pin(async move {
        let frame = answer.await;
        drop(permit);
        (bytes, frame)
    })
}

/// How often a connection checks its handshake and idle deadlines (so they hold to
/// within this much).
const LIVENESS_TICK: Duration = Duration::from_millis(250);

/// Frames that may wait for the socket. Larger than the largest consumer window plus
/// the in-flight limit, so deliveries never find it full.
const OUTBOUND: usize = 16 * 1024;

/// Whether this connection's socket takes what the broker writes: a client that stopped
/// reading blocks the writer task, and deliveries queued behind it never arrive.
#[derive(Debug, Default)]
pub struct Stall {
    /// Broker clock when the current write started waiting for the socket (0: none).
    blocked_since_ms: std::sync::atomic::AtomicU64,
}

impl Stall {
    /// A write has waited for the socket longer than [`STALL_AFTER`].
    pub fn is_stalled(&self) -> bool {
        let since = self.blocked_since_ms.load(Ordering::Relaxed);
        since != 0 && txmq_protocol::now_ms().saturating_sub(since) > STALL_AFTER.as_millis() as u64
    }
}

/// How long a write may wait for the socket before the connection counts as stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(1);

/// What the connection knows about its client.
#[derive(Debug)]
pub struct Session {
    /// Broker-wide connection id.
    pub id: u64,
    /// Set once Hello succeeded.
    pub hello: Option<pb::Hello>,
    /// Where frames to this client go.
    pub outbound: mpsc::Sender<Frame>,
    /// Active subscriptions: id to (group, topic).
    pub subscriptions: HashMap<u64, (String, Arc<Topic>)>,
    /// Set when the client failed authentication: answer, then close.
    pub refused: bool,
    /// Whether the socket takes what is written to it.
    pub stall: Arc<Stall>,
}

/// Serves one connection until the client leaves, the stream breaks, or shutdown.
pub async fn serve(
    socket: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let id = shared.connection_ids.fetch_add(1, Ordering::Relaxed);
    let (rd, wr) = socket.into_split();
    let codec = FrameCodec::new(shared.config.max_frame_len);
    let mut frames = FramedRead::new(rd, codec.clone());
    let (outbound, out_rx) = mpsc::channel(OUTBOUND);
    let closing = CancellationToken::new();
    let stall = Arc::new(Stall::default());
    let writer = tokio::spawn(write_frames(
        FramedWrite::new(wr, codec),
        out_rx,
        closing.clone(),
        stall.clone(),
    ));
    let mut session = Session {
        id,
        hello: None,
        outbound: outbound.clone(),
        subscriptions: HashMap::new(),
        refused: false,
        stall,
    };
    tracing::debug!(connection = id, %peer, "connected");
    let mut pending: FuturesUnordered<Admitted> = FuturesUnordered::new();
    let limit = shared.config.max_in_flight_per_connection;
    // Requests in flight are also held to bytes: this connection's own budget, and the
    // broker-wide one (a semaphore of KiB). A frame that finds the broker-wide budget
    // spent waits in `admitting`, and this connection is not read meanwhile.
    let byte_limit = shared.config.max_in_flight_bytes_per_connection;
    let mut in_flight_bytes = 0usize;
    let mut admitting: Option<Admitting> = None;
    // A client must say Hello within the handshake timeout, and then send something (a
    // ping at least) within every idle timeout: silent sockets cannot hold connection
    // slots, and a producer that vanished without a FIN leaves the check-back rotation.
    // One coarse timer per connection rather than one per frame (a timer armed and
    // dropped on every request showed in the e2e bench).
    let mut quiet_since = tokio::time::Instant::now();
    let mut watch = tokio::time::interval(LIVENESS_TICK);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let allowed = if session.hello.is_none() {
            shared.config.handshake_timeout
        } else {
            shared.config.idle_timeout
        };
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = watch.tick(), if pending.is_empty() => {
                if quiet_since.elapsed() < allowed {
                    continue;
                }
                let why = if session.hello.is_none() {
                    format!("no Hello within {allowed:?}")
                } else {
                    format!("nothing received for {allowed:?} (clients ping while idle)")
                };
                tracing::info!(connection = id, %peer, "closing connection: {why}");
                let code = if session.hello.is_none() {
                    ErrorCode::HandshakeRequired
                } else {
                    ErrorCode::InvalidRequest
                };
                let _ = outbound.send(error_frame(0, code, &why)).await;
                break;
            }
            Some((bytes, frame)) = pending.next(), if !pending.is_empty() => {
                in_flight_bytes -= bytes;
                if outbound.send(frame).await.is_err() {
                    break;
                }
            }
            permit = async {
                match admitting.as_mut() {
                    Some(a) => a.permit.as_mut().await,
                    None => std::future::pending().await,
                }
            } => {
                let Some(a) = admitting.take() else { continue };
                let Ok(permit) = permit else { break };
                in_flight_bytes += a.bytes;
                if let Some(p) = dispatch(a.frame, &mut session, &shared).await {
                    pending.push(admitted(p, a.bytes, permit));
                }
            }
            next = frames.next(), if admitting.is_none() && pending.len() < limit && in_flight_bytes < byte_limit => match next {
                None => break,
                Some(Ok(frame)) => {
                    quiet_since = tokio::time::Instant::now();
                    let bytes = prost::Message::encoded_len(&frame);
                    let units = budget_units(bytes);
                    match shared.budget.clone().try_acquire_many_owned(units) {
                        Ok(permit) => {
                            in_flight_bytes += bytes;
                            if let Some(p) = dispatch(frame, &mut session, &shared).await {
                                pending.push(admitted(p, bytes, permit));
                            }
                        }
                        Err(_) => {
                            let permit = Box::pin(shared.budget.clone().acquire_many_owned(units));
                            admitting = Some(Admitting { frame, bytes, permit });
                        }
                    }
                    if session.refused {
                        tracing::warn!(connection = id, %peer, "closing connection: authentication failed");
                        break;
                    }
                }
                Some(Err(e)) => {
                    if matches!(e, txmq_protocol::FrameError::Io(_)) {
                        // A peer that vanished: routine, not worth a warning.
                        tracing::debug!(connection = id, %peer, "connection lost: {e}");
                        break;
                    }
                    tracing::warn!(connection = id, %peer, "closing connection: {e}");
                    let _ = outbound
                        .send(error_frame(0, ErrorCode::MalformedFrame, &e.to_string()))
                        .await;
                    break;
                }
            },
        }
    }
    // Answer what was already accepted: those writes may be durable by now.
    while let Ok(Some((_, frame))) =
        tokio::time::timeout(Duration::from_secs(5), pending.next()).await
    {
        if outbound.send(frame).await.is_err() {
            break;
        }
    }
    close(&mut session, &shared).await;
    closing.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    tracing::debug!(connection = id, %peer, "disconnected");
}

async fn close(session: &mut Session, shared: &Shared) {
    shared.producers.unregister(session.id);
    for (subscription_id, (group, topic)) in session.subscriptions.drain() {
        let _ = shared
            .groups
            .send(
                &group,
                topic,
                QueueMsg::Unsubscribe {
                    subscription_id,
                    graceful: false,
                },
            )
            .await;
    }
}

/// Writes frames until the connection closes; then writes what is already queued (the
/// last answers, a reason for closing) and stops.
async fn write_frames(
    mut sink: FramedWrite<tokio::net::tcp::OwnedWriteHalf, FrameCodec>,
    mut rx: mpsc::Receiver<Frame>,
    closing: CancellationToken,
    stall: Arc<Stall>,
) {
    loop {
        let frame = tokio::select! {
            f = rx.recv() => f,
            () = closing.cancelled() => rx.try_recv().ok(),
        };
        let Some(frame) = frame else {
            let _ = sink.flush().await;
            return;
        };
        stall
            .blocked_since_ms
            .store(txmq_protocol::now_ms(), Ordering::Relaxed);
        let written = txmq_protocol::codec::write_ready(&mut sink, frame, &mut rx).await;
        stall.blocked_since_ms.store(0, Ordering::Relaxed);
        if written.is_err() {
            return;
        }
    }
}

/// Refuses a connection over the limit with a clear reason.
pub async fn refuse_full(socket: TcpStream, peer: SocketAddr) {
    tracing::warn!(%peer, "connection refused: too many connections");
    let mut sink = FramedWrite::new(socket, FrameCodec::default());
    let _ = sink
        .send(error_frame(
            0,
            ErrorCode::TooManyConnections,
            "the broker has reached its connection limit",
        ))
        .await;
}

/// Refuses a connection while storage is being reopened after a failure, saying why.
pub async fn refuse_recovering(socket: TcpStream, peer: SocketAddr, why: &str) {
    tracing::debug!(%peer, "connection refused: storage is being reopened");
    let mut sink = FramedWrite::new(socket, FrameCodec::default());
    let message =
        format!("the broker is reopening its storage after a failure ({why}); retry shortly");
    let _ = sink
        .send(error_frame(0, ErrorCode::StorageError, &message))
        .await;
}

/// An error response frame.
pub fn error_frame(id: u64, code: ErrorCode, message: &str) -> Frame {
    Frame {
        id,
        body: Some(Body::Response(pb::Response {
            code: code as i32,
            message: message.to_string(),
            result: None,
        })),
    }
}

/// A response frame for a result.
pub fn response(id: u64, result: Result<pb::response::Result, Error>) -> Frame {
    match result {
        Ok(r) => Frame {
            id,
            body: Some(Body::Response(pb::Response {
                code: ErrorCode::Ok as i32,
                message: String::new(),
                result: Some(r),
            })),
        },
        Err(e) => error_frame(id, e.code(), &e.to_string()),
    }
}

/// Routes one frame. Returns the pending answer, if the frame expects one.
async fn dispatch(frame: Frame, session: &mut Session, shared: &Arc<Shared>) -> Option<Pending> {
    let id = frame.id;
    let Some(body) = frame.body else {
        return Some(cmd::ready(
            id,
            Err(Error::Invalid("frame has no body".into())),
        ));
    };
    if id == 0 {
        return Some(cmd::ready(
            0,
            Err(Error::Invalid("requests need a non-zero id".into())),
        ));
    }
    if let Body::Hello(hello) = body {
        let result = cmd::hello::hello(hello, session, shared);
        session.refused = matches!(result, Err(Error::NotAuthenticated(_)));
        return Some(cmd::ready(id, result));
    }
    if session.hello.is_none() {
        return Some(cmd::ready(id, Err(Error::HandshakeRequired)));
    }
    if let Body::CheckReply(reply) = body {
        // An answer expects no response; the checker accepts it only from the
        // connection it asked and for the transaction it asked about.
        cmd::txn::check_reply(id, reply, session, shared).await;
        return None;
    }
    Some(match body {
        Body::Send(req) => cmd::send::send(id, req, session, shared),
        Body::EndTxn(req) => cmd::txn::end(id, req, session, shared),
        Body::TxnBatch(req) => cmd::txn::batch(id, req, session, shared),
        Body::Ping(_) => cmd::ready(id, Ok(pb::response::Result::Pong(pb::PongOk {}))),
        Body::ListTxns(req) => cmd::txn::list(id, req, shared),
        Body::RearmTxn(req) => cmd::txn::rearm(id, req, shared),
        Body::Subscribe(req) => cmd::consume::subscribe(id, req, session, shared).await,
        Body::Unsubscribe(req) => cmd::consume::unsubscribe(id, req, session, shared).await,
        Body::Ack(req) => cmd::consume::ack(id, req, shared).await,
        Body::Nack(req) => cmd::consume::nack(id, req, shared).await,
        Body::Extend(req) => cmd::consume::extend(id, req, shared).await,
        Body::CreateTopic(req) => cmd::admin::create_topic(id, req, shared),
        Body::ListTopics(req) => cmd::admin::list_topics(id, req, shared),
        Body::DescribeGroup(req) => cmd::admin::describe_group(id, req, shared),
        Body::ListDeadLetters(req) => cmd::admin::list_dead_letters(id, req, shared),
        Body::Redrive(req) => cmd::admin::redrive(id, req, shared),
        Body::ListGroups(req) => cmd::admin::list_groups(id, req, shared),
        Body::Stats(_) => cmd::admin::stats(id, shared),
        Body::Hello(_) | Body::CheckReply(_) => unreachable!("handled above"),
        Body::Response(_) | Body::Delivery(_) | Body::Check(_) => cmd::ready(
            id,
            Err(Error::Invalid(
                "that frame is sent by the broker, not to it".into(),
            )),
        ),
    })
}
