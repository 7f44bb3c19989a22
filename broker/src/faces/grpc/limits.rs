//! The bounds the gRPC face takes, the native face's own: one broker-wide connection
//! cap (`max-connections`, counted over both faces) and one broker-wide byte budget
//! for requests in flight (`max-in-flight-bytes`), and a per-connection stream limit
//! (`max-streams-per-connection`, as HTTP/2's `SETTINGS_MAX_CONCURRENT_STREAMS`).
//!
//! The budget is taken per gRPC message, whole, before its bytes are read: the 5-byte
//! prefix of each message says its length, and the body is not read further until
//! that many KiB of the budget are held. While it waits, HTTP/2 flow control stops the
//! client, so what the broker buffers beyond the budget is bounded by the windows: a
//! stream's [`STREAM_WINDOW`], a connection's that times its stream limit (large enough
//! that calls waiting for the budget never starve the calls that hold it). A request holds its message's share until its answer is ready (for a send,
//! until it is stored); a stream (Telemetry) holds its latest message's only.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{AcquireError, OwnedSemaphorePermit};
use tonic::body::Body;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::service::limits::Limits;

/// Bytes a call's client may send ahead of what the broker has read (HTTP/2's
/// per-stream window).
pub const STREAM_WINDOW: u32 = 64 * 1024;

/// How long a message granted its share of the budget may take to arrive whole: a
/// client that announced a large message and sends nothing more holds the share no
/// longer than this.
pub const MESSAGE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// A connection that holds a share of the connection cap while it is open. It must
/// send its first bytes within the handshake timeout, or it is closed: a silent socket
/// does not keep a slot of the cap.
pub struct Capped {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    first_bytes: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Connected for Capped {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        match &read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => this.first_bytes = None,
            Poll::Pending => {
                if let Some(deadline) = this.first_bytes.as_mut()
                    && deadline.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no bytes within the handshake timeout",
                    )));
                }
            }
            _ => {}
        }
        read
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The connections of `listener` within the cap: one over it is closed at once (and
/// counted); accept errors (out of file descriptors) wait and retry.
pub fn incoming(
    listener: TcpListener,
    limits: Arc<Limits>,
    handshake: std::time::Duration,
) -> impl futures::Stream<Item = io::Result<Capped>> {
    futures::stream::unfold((listener, limits), move |(listener, limits)| async move {
        let mut backoff = std::time::Duration::from_millis(5);
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!("grpc accept failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                    continue;
                }
            };
            match limits.connections.clone().try_acquire_owned() {
                Ok(slot) => {
                    let _ = stream.set_nodelay(true);
                    // Finds clients whose host vanished (tonic's own keepalive setting
                    // does not reach sockets it did not accept).
                    let ka = socket2::TcpKeepalive::new()
                        .with_time(std::time::Duration::from_secs(30))
                        .with_interval(std::time::Duration::from_secs(10))
                        .with_retries(3);
                    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka);
                    let capped = Capped {
                        stream,
                        _slot: slot,
                        first_bytes: Some(Box::pin(tokio::time::sleep(handshake))),
                    };
                    return Some((Ok(capped), (listener, limits)));
                }
                Err(_) => {
                    limits.refused();
                    tracing::warn!(%peer, "grpc connection refused: too many connections");
                }
            }
        }
    })
}

/// How long an unauthenticated answer waits before it goes: guessing costs time, as on
/// the native face.
pub const REFUSAL_DELAY: std::time::Duration = std::time::Duration::from_millis(200);

/// Whether an answer refuses the call as unauthenticated (gRPC status 16, as the
/// interceptor answers a bad or missing signature).
fn unauthenticated<B>(answer: &http::Response<B>) -> bool {
    answer
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"16")
}

/// The tower layer that holds each request to the byte budget, and slows the answers
/// that refuse it as unauthenticated ([`REFUSAL_DELAY`], asleep: no worker is held).
#[derive(Clone)]
pub struct BudgetLayer {
    pub limits: Arc<Limits>,
    /// The largest message the endpoint decodes: no request holds more than this.
    pub max_message: usize,
}

impl<S> tower::Layer<S> for BudgetLayer {
    type Service = Budgeted<S>;

    fn layer(&self, inner: S) -> Budgeted<S> {
        Budgeted {
            inner,
            layer: self.clone(),
        }
    }
}

/// A service whose requests hold their share of the budget.
#[derive(Clone)]
pub struct Budgeted<S> {
    inner: S,
    layer: BudgetLayer,
}

/// A message's share of the budget, held by a request's body and its answer.
type Held = Arc<Mutex<Option<OwnedSemaphorePermit>>>;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A share of the budget on its way.
type Acquiring = BoxFuture<Result<OwnedSemaphorePermit, AcquireError>>;

impl<S, B> tower::Service<http::Request<Body>> for Budgeted<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<B>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<B>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let held: Held = Arc::default();
        let body = MeteredBody {
            inner: None,
            prefix: Vec::with_capacity(5),
            remaining: 0,
            waiting: None,
            deadline: None,
            limits: self.layer.limits.clone(),
            max_message: self.layer.max_message,
            held: held.clone(),
        };
        let request = request.map(|inner| {
            Body::new(MeteredBody {
                inner: Some(inner),
                ..body
            })
        });
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            drop(held);
            if answer.as_ref().is_ok_and(unauthenticated) {
                tokio::time::sleep(REFUSAL_DELAY).await;
            }
            answer
        })
    }
}

/// A request body read no faster than the budget allows.
struct MeteredBody {
    inner: Option<Body>,
    /// The prefix of the next message, as far as it has come.
    prefix: Vec<u8>,
    /// Bytes of the current message still to come.
    remaining: u64,
    /// A frame held back until its messages' share is granted.
    waiting: Option<(Frame<Bytes>, Acquiring)>,
    /// When the message holding a share must have arrived whole.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    limits: Arc<Limits>,
    max_message: usize,
    held: Held,
}

impl MeteredBody {
    /// Bytes of the messages that begin in `data` (their prefix completes in it).
    fn starting_in(&mut self, data: &[u8]) -> u64 {
        let mut starting = 0u64;
        let mut at = 0usize;
        while at < data.len() {
            if self.remaining > 0 {
                let skip = (self.remaining).min((data.len() - at) as u64);
                self.remaining -= skip;
                at += skip as usize;
                continue;
            }
            let take = (5 - self.prefix.len()).min(data.len() - at);
            self.prefix.extend_from_slice(&data[at..at + take]);
            at += take;
            if self.prefix.len() == 5 {
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]);
                self.prefix.clear();
                self.remaining = u64::from(len);
                starting += u64::from(len) + 5;
            }
        }
        starting
    }
}

impl MeteredBody {
    /// Holds `permit` for the message that starts now (the last one's share goes), and
    /// gives that message [`MESSAGE_DEADLINE`] to arrive when it is not whole yet.
    fn grant(&mut self, permit: OwnedSemaphorePermit) {
        *self.held.lock().expect("held lock") = Some(permit);
        self.deadline =
            (self.remaining > 0).then(|| Box::pin(tokio::time::sleep(MESSAGE_DEADLINE)));
    }
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        if let Some((_, acquiring)) = this.waiting.as_mut() {
            let permit = match acquiring.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(permit)) => permit,
                Poll::Ready(Err(_)) => {
                    this.waiting = None;
                    this.inner = None;
                    return Poll::Ready(Some(Err(tonic::Status::unavailable(
                        "the broker is stopping",
                    ))));
                }
            };
            // The share of the message that starts now replaces the last one's.
            this.grant(permit);
            let (frame, _) = this.waiting.take().expect("waiting");
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Pending => {
                if let Some(deadline) = this.deadline.as_mut()
                    && deadline.as_mut().poll(cx).is_ready()
                {
                    this.inner = None;
                    this.held.lock().expect("held lock").take();
                    return Poll::Ready(Some(Err(tonic::Status::deadline_exceeded(
                        "the message did not arrive within 60 s of its announcement",
                    ))));
                }
                return Poll::Pending;
            }
            other => return other,
        };
        let starting = match frame.data_ref() {
            Some(data) => this.starting_in(data),
            None => 0,
        };
        if this.remaining == 0 {
            // The messages begun so far are whole.
            this.deadline = None;
        }
        if starting == 0 {
            return Poll::Ready(Some(Ok(frame)));
        }
        let units = this
            .limits
            .units_for(starting.min(this.max_message as u64 + 5));
        let budget = this.limits.budget.clone();
        let mut acquiring: BoxFuture<_> = Box::pin(budget.acquire_many_owned(units));
        match acquiring.as_mut().poll(cx) {
            Poll::Ready(Ok(permit)) => {
                this.grant(permit);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Err(_)) => {
                this.inner = None;
                Poll::Ready(Some(Err(tonic::Status::unavailable(
                    "the broker is stopping",
                ))))
            }
            Poll::Pending => {
                this.waiting = Some((frame, acquiring));
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.waiting.is_none() && self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(http_body::SizeHint::default, HttpBody::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> MeteredBody {
        MeteredBody {
            inner: None,
            prefix: Vec::new(),
            remaining: 0,
            waiting: None,
            deadline: None,
            limits: Arc::new(Limits::new(
                1 << 20,
                10,
                Arc::new(crate::metrics::Metrics::new()),
            )),
            max_message: 1 << 20,
            held: Arc::default(),
        }
    }

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len as usize));
        m
    }

    /// A refusal for want of a valid signature is answered only after the delay; any
    /// other answer at once. (Tokio's clock is paused: no wall-clock timing.)
    #[tokio::test(start_paused = true)]
    async fn unauthenticated_answers_are_slowed_and_others_are_not() {
        #[derive(Clone)]
        struct Answers(&'static str);
        impl tower::Service<http::Request<Body>> for Answers {
            type Response = http::Response<()>;
            type Error = std::convert::Infallible;
            type Future = std::future::Ready<Result<http::Response<()>, Self::Error>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: http::Request<Body>) -> Self::Future {
                let answer = http::Response::builder()
                    .header("grpc-status", self.0)
                    .body(())
                    .unwrap();
                std::future::ready(Ok(answer))
            }
        }
        let layer = BudgetLayer {
            limits: Arc::new(Limits::new(
                1 << 20,
                10,
                Arc::new(crate::metrics::Metrics::new()),
            )),
            max_message: 1 << 20,
        };
        for (status, slowed) in [("16", true), ("0", false), ("7", false)] {
            let mut service = tower::Layer::layer(&layer, Answers(status));
            let start = tokio::time::Instant::now();
            let call = tower::Service::call(&mut service, http::Request::new(Body::empty()));
            call.await.unwrap();
            assert_eq!(start.elapsed() >= REFUSAL_DELAY, slowed, "status {status}");
        }
    }

    #[test]
    fn messages_are_found_whatever_the_frames() {
        let mut stream = message(3000);
        stream.extend(message(10));
        stream.extend(message(0));
        // Whole, then cut into frames of every small size: the same messages start.
        let mut whole = body();
        assert_eq!(whole.starting_in(&stream), 3005 + 15 + 5);
        for size in [1, 2, 3, 5, 7, 4096] {
            let mut b = body();
            let total: u64 = stream.chunks(size).map(|c| b.starting_in(c)).sum();
            assert_eq!(total, 3025, "frames of {size}");
            assert_eq!((b.remaining, b.prefix.len()), (0, 0));
        }
    }
}
