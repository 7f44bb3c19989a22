//! One multiplexed connection to a broker.
//!
//! Requests carry a correlation id and wait on a oneshot in the pending map; a reader task
//! completes them as responses arrive, in any order, and routes the broker's own frames
//! (deliveries, check-backs) to channels. When the connection ends, every waiting request
//! fails with [`Error::Disconnected`] and the push channels close.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use txmq_protocol::pb::{self, frame::Body};
use txmq_protocol::{ErrorCode, Frame, FrameCodec};

use crate::error::{Error, Result};
use crate::tls::Tls;

type Waiter = oneshot::Sender<Result<pb::Response>>;

/// Frames the broker sends on its own.
#[derive(Debug)]
pub struct Pushes {
    /// Deliveries to this connection's subscriptions.
    pub deliveries: mpsc::UnboundedReceiver<pb::Delivery>,
    /// Check-back requests: the frame id to answer with, and the request.
    pub checks: mpsc::UnboundedReceiver<(u64, pb::CheckRequest)>,
}

/// The largest frame limit a client adopts from a broker's handshake.
const MAX_NEGOTIATED_FRAME: usize = 1 << 30;

/// How long a call waits for its answer before the connection is given up.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long opening a connection to a broker group keeps looking for its leader.
pub const FOLLOW_WAIT: Duration = Duration::from_secs(30);

/// How often an open connection pings the broker: keeps it under the broker's idle
/// timeout (60 s by default) and finds a broker that stopped answering.
pub const PING_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Inner {
    out: mpsc::Sender<Frame>,
    /// The frame limit in force: the default until the broker's Hello answer names its own.
    frame_limit: Arc<AtomicUsize>,
    pending: Mutex<Option<HashMap<u64, Waiter>>>,
    next_id: AtomicU64,
    closed: Mutex<Option<Closed>>,
    /// Cancelled to close the connection from this side (a call or ping timed out).
    abandon: tokio_util::sync::CancellationToken,
    call_timeout: Duration,
    /// What the broker announced in its answer to Hello.
    announced: std::sync::OnceLock<pb::HelloOk>,
}

/// Why a connection ended: the broker's stated refusal, or a lost stream.
#[derive(Debug, Clone)]
struct Closed {
    code: Option<ErrorCode>,
    reason: String,
}

impl Closed {
    fn error(&self) -> Error {
        match self.code {
            Some(code) => Error::Broker {
                code,
                message: self.reason.clone(),
            },
            None => Error::Disconnected(self.reason.clone()),
        }
    }
}

/// A connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

impl Connection {
    /// Connects and performs the handshake.
    ///
    /// # Errors
    /// The broker is unreachable or refused the handshake.
    pub async fn open(addr: &str, hello: pb::Hello) -> Result<(Self, Pushes)> {
        Self::open_with(addr, hello, CALL_TIMEOUT).await
    }

    /// [`Connection::open`] with calls that give up after `call_timeout`.
    ///
    /// `addrs` is one broker's address, or a broker group's addresses separated by
    /// commas: the connection goes to the group's leader. A follower answers the
    /// handshake with `NOT_LEADER` and the leader's address, which is tried next; an
    /// address that cannot be reached gives way to the next. While the group elects a
    /// leader, the addresses are tried again with backoff for up to [`FOLLOW_WAIT`].
    ///
    /// # Errors
    /// The broker is unreachable or refused the handshake; for a group, no leader
    /// answered within [`FOLLOW_WAIT`].
    pub async fn open_with(
        addrs: &str,
        hello: pb::Hello,
        call_timeout: Duration,
    ) -> Result<(Self, Pushes)> {
        Self::open_as(addrs, hello, None, None, call_timeout).await
    }

    /// [`Connection::open_with`] as `user` (SCRAM-SHA-256 before the Hello: the secret
    /// is not sent), or without one (`None`); over TLS with `tls`.
    ///
    /// # Errors
    /// As [`Connection::open_with`]; [`Error::Broker`] `NOT_AUTHENTICATED` for a bad
    /// user or secret, [`Error::Unexpected`] when the broker's signature does not prove
    /// it knew the user.
    pub async fn open_as(
        addrs: &str,
        hello: pb::Hello,
        user: Option<&User>,
        tls: Option<&Tls>,
        call_timeout: Duration,
    ) -> Result<(Self, Pushes)> {
        let list: Vec<&str> = addrs
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        if list.is_empty() {
            return Err(Error::Invalid(format!("no broker address in {addrs:?}")));
        }
        let deadline = tokio::time::Instant::now() + FOLLOW_WAIT;
        let mut backoff = Duration::from_millis(100);
        let mut hint: Option<String> = None;
        let mut next = 0;
        loop {
            let followed = hint.is_some();
            let addr = hint.take().unwrap_or_else(|| {
                next += 1;
                list[(next - 1) % list.len()].to_string()
            });
            // A group's member that was cut off drops connection attempts silently: try
            // the next one soon.
            let connect_timeout = if list.len() > 1 {
                Duration::from_secs(3)
            } else {
                Duration::from_secs(10)
            };
            let error = match Self::open_one(
                &addr,
                hello.clone(),
                (user, tls),
                call_timeout,
                connect_timeout,
            )
            .await
            {
                Ok(opened) => {
                    if list.len() > 1 || followed {
                        tracing::info!("connected to {addr}, the group's leader");
                    }
                    return Ok(opened);
                }
                Err(Error::NotLeader { leader, message }) => {
                    match &leader {
                        Some(l) => tracing::info!(
                            "{addr} does not lead its group; following the leader at {l}"
                        ),
                        None => {
                            tracing::info!("{addr} does not lead its group and knows no leader yet")
                        }
                    }
                    hint = leader.filter(|l| *l != addr);
                    Error::NotLeader {
                        message,
                        leader: None,
                    }
                }
                // A leader a follower named may be gone already: back to the list.
                Err(e @ (Error::Connect { .. } | Error::Disconnected(_) | Error::Timeout(_)))
                    if list.len() > 1 || followed =>
                {
                    tracing::info!("broker {addr} not reachable: {e}");
                    e
                }
                Err(e) => return Err(e),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(error);
            }
            // Each address once, then wait: an election takes a few seconds.
            if hint.is_none() && next % list.len() == 0 {
                tokio::time::sleep(backoff).await;
                // An election takes about three seconds: looking four times a second
                // finds the new leader within a quarter of a second of it.
                backoff = (backoff * 2).min(Duration::from_millis(250));
            }
        }
    }

    async fn open_one(
        addr: &str,
        hello: pb::Hello,
        (user, tls): (Option<&User>, Option<&Tls>),
        call_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<(Self, Pushes)> {
        let socket = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| Error::Connect {
                addr: addr.to_string(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
            })?
            .map_err(|source| Error::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let _ = socket.set_nodelay(true);
        keepalive(&socket);
        let (rd, wr) = match tls {
            None => crate::tls::plain(socket),
            Some(tls) => tokio::time::timeout(connect_timeout, tls.connect(socket, addr))
                .await
                .map_err(|_| Error::Connect {
                    addr: addr.to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no TLS handshake in time",
                    ),
                })?
                .map_err(|source| Error::Connect {
                    addr: addr.to_string(),
                    source,
                })?,
        };
        let codec = FrameCodec::default();
        let (out, out_rx) = mpsc::channel(4096);
        let (dtx, deliveries) = mpsc::unbounded_channel();
        let (ctx, checks) = mpsc::unbounded_channel();
        let frame_limit = Arc::new(AtomicUsize::new(codec.max_len()));
        let inner = Arc::new(Inner {
            out,
            frame_limit: frame_limit.clone(),
            pending: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(1),
            closed: Mutex::new(None),
            abandon: tokio_util::sync::CancellationToken::new(),
            call_timeout,
            announced: std::sync::OnceLock::new(),
        });
        tokio::spawn(write_loop(
            FramedWrite::new(wr, codec.clone()),
            out_rx,
            frame_limit.clone(),
        ));
        tokio::spawn(read_loop(
            FramedRead::new(rd, codec),
            Arc::downgrade(&inner),
            frame_limit,
            dtx,
            ctx,
        ));
        let conn = Self { inner };
        if let Some(user) = user {
            conn.authenticate(user).await?;
        }
        match conn.call(Body::Hello(hello)).await? {
            pb::response::Result::Hello(ok) => {
                let _ = conn.inner.announced.set(ok);
                tokio::spawn(ping_loop(conn.downgrade()));
                Ok((conn, Pushes { deliveries, checks }))
            }
            other => Err(Error::Unexpected(format!("{other:?}"))),
        }
    }

    /// Proves `user` to the broker, and the broker's knowledge of the user to us.
    async fn authenticate(&self, user: &User) -> Result<()> {
        use txmq_protocol::scram::ClientExchange;
        let (exchange, client_first) = ClientExchange::start(&user.name, &nonce());
        let server_first = match self
            .call(Body::AuthStart(pb::AuthStart { client_first }))
            .await?
        {
            pb::response::Result::AuthChallenge(c) => c.server_first,
            other => return Err(Error::Unexpected(format!("{other:?}"))),
        };
        let answer = exchange
            .answer(&server_first, user.secret.as_bytes())
            .map_err(|e| Error::Unexpected(format!("the broker's challenge: {e}")))?;
        let server_final = match self
            .call(Body::AuthFinish(pb::AuthFinish {
                client_final: answer.message.clone(),
            }))
            .await?
        {
            pb::response::Result::AuthOk(ok) => ok.server_final,
            other => return Err(Error::Unexpected(format!("{other:?}"))),
        };
        answer.verify(&server_final).map_err(|_| {
            Error::Unexpected(
                "the broker's SCRAM signature is wrong: it does not know this user".into(),
            )
        })
    }

    /// Sends a request and waits for its answer.
    ///
    /// # Errors
    /// The broker's refusal, or [`Error::Disconnected`].
    pub async fn call(&self, body: Body) -> Result<pb::response::Result> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = Frame {
            id,
            body: Some(body),
        };
        // Refused here, and the connection kept: the encoder would fail on it and close
        // the connection under every other call on it (a producer's check answers too).
        let (len, max) = (prost::Message::encoded_len(&frame), self.max_frame_len());
        if len > max {
            return Err(Error::Frame(txmq_protocol::FrameError::TooLarge {
                len,
                max,
            }));
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.inner.pending.lock().expect("pending lock");
            match pending.as_mut() {
                Some(map) => map.insert(id, tx),
                None => return Err(self.disconnected()),
            };
        }
        // The timeout covers the whole call, the wait for room in the outbound queue
        // included: a broker that stopped reading is as gone as one that stopped answering.
        let exchange = async {
            if self.inner.out.send(frame).await.is_err() {
                return Err(self.disconnected());
            }
            rx.await.map_err(|_| self.disconnected())?
        };
        let response = match tokio::time::timeout(self.inner.call_timeout, exchange).await {
            Ok(answer) => answer?,
            Err(_) => {
                // A broker that does not answer within the timeout is treated as gone:
                // the connection closes, so every caller learns it and reconnects.
                self.inner.abandon.cancel();
                return Err(Error::Timeout(self.inner.call_timeout));
            }
        };
        if response.code == ErrorCode::NotLeader as i32 {
            return Err(Error::NotLeader {
                message: response.message,
                leader: Some(response.leader).filter(|l| !l.is_empty()),
            });
        }
        refusal(response.code, response.message)?;
        response
            .result
            .ok_or_else(|| Error::Unexpected("empty response".into()))
    }

    /// Sends a frame that expects no answer (a check reply).
    ///
    /// # Errors
    /// [`Error::Disconnected`].
    pub async fn send_frame(&self, frame: Frame) -> Result<()> {
        self.inner
            .out
            .send(frame)
            .await
            .map_err(|_| self.disconnected())
    }

    /// A handle that does not keep the connection open.
    pub fn downgrade(&self) -> WeakConnection {
        WeakConnection {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// The largest frame this connection sends or accepts: the broker's, once the
    /// handshake named it.
    pub fn max_frame_len(&self) -> usize {
        self.inner.frame_limit.load(Ordering::Relaxed)
    }

    /// How far ahead the broker takes a scheduled message, when it said (brokers
    /// before this field did not).
    pub fn max_schedule_delay(&self) -> Option<Duration> {
        self.inner
            .announced
            .get()
            .map(|ok| ok.max_schedule_delay_ms)
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis)
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.lock().expect("closed lock").is_some()
    }

    fn disconnected(&self) -> Error {
        match &*self.inner.closed.lock().expect("closed lock") {
            Some(closed) => closed.error(),
            None => Error::Disconnected("connection closed".into()),
        }
    }
}

/// The broker's refusal carried by a response's (or a batched call's) code and message;
/// `Ok` for [`ErrorCode::Ok`].
///
/// # Errors
/// [`Error::Broker`] with the code (an unknown code reads as `INTERNAL`).
pub fn refusal(code: i32, message: String) -> Result<()> {
    match ErrorCode::try_from(code) {
        Ok(ErrorCode::Ok) => Ok(()),
        code => Err(Error::Broker {
            code: code.unwrap_or(ErrorCode::Internal),
            message,
        }),
    }
}

/// A [`Connection`] that does not keep it open (for tasks serving the broker's pushes).
#[derive(Debug, Clone)]
pub struct WeakConnection {
    inner: Weak<Inner>,
}

impl WeakConnection {
    /// The connection, while someone else still holds it.
    pub fn upgrade(&self) -> Option<Connection> {
        self.inner.upgrade().map(|inner| Connection { inner })
    }
}

async fn write_loop(
    mut sink: FramedWrite<crate::tls::Writer, FrameCodec>,
    mut rx: mpsc::Receiver<Frame>,
    frame_limit: Arc<AtomicUsize>,
) {
    while let Some(frame) = rx.recv().await {
        sink.encoder_mut()
            .set_max_len(frame_limit.load(Ordering::Relaxed));
        if txmq_protocol::codec::write_ready(&mut sink, frame, &mut rx)
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Holds the connection only weakly: when the last [`Connection`] is dropped, the writer
/// closes the socket, the broker closes its side, and this loop ends.
async fn read_loop(
    mut frames: FramedRead<crate::tls::Reader, FrameCodec>,
    inner: Weak<Inner>,
    frame_limit: Arc<AtomicUsize>,
    deliveries: mpsc::UnboundedSender<pb::Delivery>,
    checks: mpsc::UnboundedSender<(u64, pb::CheckRequest)>,
) {
    let lost = |reason: String| Closed { code: None, reason };
    let Some(abandon) = inner.upgrade().map(|i| i.abandon.clone()) else {
        return;
    };
    let closed = loop {
        let next = tokio::select! {
            next = frames.next() => next,
            () = abandon.cancelled() => break lost("the broker did not answer in time".to_string()),
        };
        match next {
            None => break lost("the broker closed the connection".to_string()),
            Some(Err(e)) => break lost(format!("bad frame from the broker: {e}")),
            Some(Ok(frame)) => match frame.body {
                Some(Body::Response(r)) if frame.id == 0 => {
                    // The broker explains why it is about to close this connection; every
                    // waiting call gets that refusal with its code.
                    break Closed {
                        code: Some(ErrorCode::try_from(r.code).unwrap_or(ErrorCode::Internal)),
                        reason: r.message,
                    };
                }
                Some(Body::Response(r)) => {
                    if let Some(pb::response::Result::Hello(ok)) = &r.result {
                        // From the next frame on, both directions use the broker's limit:
                        // a message it stores must also be deliverable to this client.
                        let limit = (ok.max_frame_len as usize).clamp(1024, MAX_NEGOTIATED_FRAME);
                        frames.decoder_mut().set_max_len(limit);
                        frame_limit.store(limit, Ordering::Relaxed);
                    }
                    let Some(inner) = inner.upgrade() else {
                        return;
                    };
                    let waiter = inner
                        .pending
                        .lock()
                        .expect("pending lock")
                        .as_mut()
                        .and_then(|m| m.remove(&frame.id));
                    if let Some(w) = waiter {
                        let _ = w.send(Ok(r));
                    }
                }
                Some(Body::Delivery(d)) => {
                    let _ = deliveries.send(d);
                }
                Some(Body::Check(c)) => {
                    let _ = checks.send((frame.id, c));
                }
                _ => tracing::debug!(id = frame.id, "ignoring unexpected frame"),
            },
        }
    };
    let Some(inner) = inner.upgrade() else {
        return;
    };
    *inner.closed.lock().expect("closed lock") = Some(closed.clone());
    let waiters = inner.pending.lock().expect("pending lock").take();
    for (_, w) in waiters.into_iter().flatten() {
        let _ = w.send(Err(closed.error()));
    }
}

/// TCP keepalive on a client socket: a broker host that vanished (power, network) is
/// noticed by the kernel even when nothing is being sent.
fn keepalive(socket: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = socket2::SockRef::from(socket).set_tcp_keepalive(&ka);
}

/// Pings every [`PING_EVERY`] while the connection lives; a ping without an answer
/// within the call timeout closes it (see [`Connection::call`]).
async fn ping_loop(conn: WeakConnection) {
    loop {
        tokio::time::sleep(PING_EVERY).await;
        let Some(conn) = conn.upgrade() else { return };
        if conn.is_closed() {
            return;
        }
        if let Err(e) = conn.call(Body::Ping(pb::PingRequest {})).await {
            tracing::debug!("ping failed: {e}");
            return;
        }
    }
}

/// A user to authenticate as (SCRAM-SHA-256: the secret stays here).
#[derive(Clone)]
pub struct User {
    /// The user's name.
    pub name: String,
    /// Its secret.
    pub secret: String,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User").field("name", &self.name).finish()
    }
}

impl User {
    /// A user named `name` with `secret`.
    pub fn new(name: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            secret: secret.into(),
        }
    }
}

/// A client nonce: 128 bits from the process's randomly keyed hashers and the clock.
fn nonce() -> String {
    use std::hash::{BuildHasher, Hasher};
    let part = |salt: u128| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(salt);
        h.finish()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{:016x}{:016x}", part(now), part(now.rotate_left(64)))
}

/// A `Hello` for this crate's protocol version.
pub fn hello(role: pb::Role, producer_group: &str, auth_token: &str) -> pb::Hello {
    pb::Hello {
        protocol_version: txmq_protocol::PROTOCOL_VERSION,
        client_id: format!("txmq-client-{}", std::process::id()),
        role: role as i32,
        producer_group: producer_group.to_string(),
        auth_token: auth_token.to_string(),
        answers_checks: false,
        check_scopes: Vec::new(),
    }
}

/// Waits `attempt`'s backoff step: 50 ms doubling to 5 s.
pub async fn backoff(attempt: u32) {
    let ms = 50u64.saturating_mul(1 << attempt.min(7)).min(5_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}
