//! One client connection.
//!
//! A reader loop decodes frames and hands each to [`super::dispatch`]; the answers are
//! futures collected in a `FuturesUnordered`, so one connection pipelines many requests
//! (and they share group commits). A separate writer task drains the bounded outbound
//! channel into the socket; deliveries and check requests use the same channel.
//!
//! A frame that cannot be decoded closes this connection only, after a `MALFORMED_FRAME`
//! response saying why; the reason is logged. When more than
//! `max-in-flight-per-connection` requests (or their bytes) wait, or the broker-wide byte
//! budget is spent, the loop stops reading the socket: backpressure rather than unbounded
//! buffering. Handshake and idle deadlines close silent connections; a writer blocked on
//! the socket marks the connection stalled for the consumer groups.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use txmq_protocol::{ErrorCode, Frame, FrameCodec};

use super::{Pending, Session, dispatch, error_frame};
use crate::service::Shared;
use crate::service::consume::{self, Stall};
use crate::service::txn;
use crate::tls::{Stream, Writer};

/// The frame codec, also telling each frame's length on the wire (what it holds of the
/// byte budgets) without measuring the decoded request again.
struct SizedCodec {
    codec: FrameCodec,
    /// Until the first frame: where the Remoting face listens, to name it to a
    /// RocketMQ client that came here (`:9876` is RocketMQ's name-server port).
    remoting: Option<String>,
}

/// Whether `buf` starts like a RocketMQ Remoting frame with a JSON header (what every
/// RocketMQ client sends by default): a length, a header length under it with a zero
/// top byte, and `{`. No native frame starts so: its body is a protobuf message, which
/// never opens with byte 0x7B.
fn looks_like_remoting(buf: &[u8]) -> bool {
    if buf.len() < 9 {
        return false;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let word = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    word >> 24 == 0 && (word & 0x00FF_FFFF) + 4 <= len && buf[8] == b'{'
}

impl tokio_util::codec::Decoder for SizedCodec {
    type Item = (Frame, usize);
    type Error = txmq_protocol::FrameError;

    fn decode(&mut self, src: &mut bytes::BytesMut) -> Result<Option<(Frame, usize)>, Self::Error> {
        if src.len() >= 9
            && let Some(remoting) = self.remoting.take()
            && looks_like_remoting(src)
        {
            return Err(txmq_protocol::FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "a RocketMQ Remoting client came to txmq's native port: point it \
                     (namesrvAddr) at the Remoting face, {remoting}"
                ),
            )));
        }
        let len = src.len();
        Ok(self
            .codec
            .decode(src)?
            .map(|frame| (frame, len - src.len())))
    }

    fn decode_eof(
        &mut self,
        src: &mut bytes::BytesMut,
    ) -> Result<Option<(Frame, usize)>, Self::Error> {
        let len = src.len();
        Ok(self
            .codec
            .decode_eof(src)?
            .map(|frame| (frame, len - src.len())))
    }
}

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

/// Serves one connection until the client leaves, the stream breaks, or shutdown.
pub async fn serve(
    socket: Stream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let id = shared.connection_ids.fetch_add(1, Ordering::Relaxed);
    let (rd, wr) = socket.split();
    let codec = FrameCodec::new(shared.config.max_frame_len);
    let remoting = match shared.config.remoting_addr() {
        Ok(Some(at)) => format!("remoting-listen {at}"),
        _ => "which is off on this broker (--remoting-listen)".to_string(),
    };
    let mut frames = FramedRead::new(
        rd,
        SizedCodec {
            codec: codec.clone(),
            remoting: Some(remoting),
        },
    );
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
        peer,
        hello: None,
        who: None,
        identity: None,
        scram: None,
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
    let mut auth_changes = shared.auth.changes();
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
            Ok(()) = auth_changes.changed() => {
                // Users or rules changed: what this connection holds is checked again,
                // and a connection that lost any of it is closed (a subscription would
                // otherwise go on pushing messages its user may no longer read).
                if let Err(e) = super::hello::still_allowed(&session, &shared) {
                    tracing::info!(connection = id, %peer, "closing connection: {e}");
                    let _ = outbound.try_send(super::error_response(0, &e));
                    break;
                }
            }
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
                let _ = outbound.try_send(error_frame(0, code, &why));
                break;
            }
            // Answers are taken only while the outbound queue has room for them, so this
            // loop never blocks on a client that stopped reading: it keeps seeing
            // shutdown and its deadlines, and requests it cannot answer hold their
            // budget (it reads nothing new meanwhile).
            Some((bytes, frame)) = pending.next(), if !pending.is_empty() && outbound.capacity() > 0 => {
                in_flight_bytes -= bytes;
                if outbound.try_send(frame).is_err() {
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
                if let Some(p) = dispatch(a.frame, &mut session, &shared).await {
                    in_flight_bytes += a.bytes;
                    pending.push(admitted(p, a.bytes, permit));
                }
            }
            next = frames.next(), if admitting.is_none()
                && pending.len() < limit
                && in_flight_bytes < byte_limit
                && outbound.capacity() > pending.len() => match next {
                None => break,
                Some(Ok((frame, bytes))) => {
                    // Before Hello the deadline counts from the accept: frames that are
                    // refused do not keep an unauthenticated socket alive.
                    if session.hello.is_some() {
                        quiet_since = tokio::time::Instant::now();
                    }
                    let units = shared.limits.units_for(bytes as u64);
                    match shared.limits.budget.clone().try_acquire_many_owned(units) {
                        Ok(permit) => {
                            if let Some(p) = dispatch(frame, &mut session, &shared).await {
                                in_flight_bytes += bytes;
                                pending.push(admitted(p, bytes, permit));
                            }
                        }
                        Err(_) => {
                            let permit = Box::pin(shared.limits.budget.clone().acquire_many_owned(units));
                            admitting = Some(Admitting { frame, bytes, permit });
                        }
                    }
                    if session.refused {
                        tracing::warn!(connection = id, %peer, "closing connection: authentication failed");
                        break;
                    }
                }
                Some(Err(e)) => {
                    if let txmq_protocol::FrameError::Io(io) = &e
                        && io.kind() != std::io::ErrorKind::InvalidData
                    {
                        // A peer that vanished: routine, not worth a warning.
                        tracing::debug!(connection = id, %peer, "connection lost: {e}");
                        break;
                    }
                    tracing::warn!(connection = id, %peer, "closing connection: {e}");
                    let _ = outbound.try_send(error_frame(0, ErrorCode::MalformedFrame, &e.to_string()));
                    break;
                }
            },
        }
    }
    // Answer what was already accepted: those writes may be durable by now. Bounded, so
    // a client that stopped reading cannot hold the shutdown.
    while let Ok(Some((_, frame))) =
        tokio::time::timeout(Duration::from_secs(5), pending.next()).await
    {
        if tokio::time::timeout(Duration::from_secs(5), outbound.send(frame))
            .await
            .map_or(true, |sent| sent.is_err())
        {
            break;
        }
    }
    close(&mut session, &shared).await;
    closing.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    tracing::debug!(connection = id, %peer, "disconnected");
}

async fn close(session: &mut Session, shared: &Shared) {
    txn::stop_answering(shared, session.id);
    for (_, membership) in session.subscriptions.drain() {
        let _ = consume::leave(shared, &membership, false, Vec::new()).await;
    }
}

/// Writes frames until the connection closes; then writes what is already queued (the
/// last answers, a reason for closing) and stops.
async fn write_frames(
    mut sink: FramedWrite<Writer, FrameCodec>,
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
        stall.writing(true);
        let written = txmq_protocol::codec::write_ready(&mut sink, frame, &mut rx).await;
        stall.writing(false);
        match written {
            Ok(()) => {}
            Err(txmq_protocol::FrameError::Io(e)) => {
                tracing::debug!("connection write failed: {e}");
                return;
            }
            // A frame the broker built over the limit: say so, rather than have the
            // connection vanish without a word.
            Err(e) => {
                tracing::warn!("closing connection: cannot send a frame: {e}");
                return;
            }
        }
    }
}

/// Refuses a connection over the limit with a clear reason.
pub async fn refuse_full(socket: Stream, peer: SocketAddr) {
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
pub async fn refuse_recovering(socket: Stream, peer: SocketAddr, why: &str) {
    tracing::debug!(%peer, "connection refused: storage is being reopened");
    let mut sink = FramedWrite::new(socket, FrameCodec::default());
    let message =
        format!("the broker is reopening its storage after a failure ({why}); retry shortly");
    let _ = sink
        .send(error_frame(0, ErrorCode::StorageError, &message))
        .await;
}

/// Answers a connection to a follower of a broker group: its first request (the Hello)
/// gets `NOT_LEADER` naming the leader's address when known, then the connection closes.
pub async fn refuse_not_leader(socket: Stream, peer: SocketAddr, leader: Option<String>) {
    tracing::debug!(%peer, ?leader, "connection refused: not the leader");
    let mut framed = tokio_util::codec::Framed::new(socket, FrameCodec::default());
    let id = match tokio::time::timeout(Duration::from_secs(5), framed.next()).await {
        Ok(Some(Ok(frame))) => frame.id,
        _ => 0,
    };
    let _ = framed
        .send(crate::faces::native::error_response(
            id,
            &crate::error::Error::NotLeader(leader),
        ))
        .await;
}
