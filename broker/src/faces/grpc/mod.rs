//! The RocketMQ 5 gRPC endpoint: the official Java, Go, Python, Node.js and C# clients
//! speak `apache.rocketmq.v2.MessagingService` to it, unmodified.
//!
//! It is a second face of the same broker, not a second broker: every request goes
//! through the same [`Shared`] parts as the native protocol (the writer, the topics, the
//! consumer groups), so what one face stores the other sees. Each RPC answers gRPC OK
//! and carries its outcome in the body's `Status` (clients treat gRPC-level errors as
//! transport failures).
//!
//! - `route`: QueryRoute, Heartbeat, NotifyClientTermination (one broker, one queue;
//!   in a broker group, the leader's).
//! - `telemetry`: the Settings handshake on the Telemetry stream, and the sessions.
//! - `send`: SendMessage (normal, FIFO, delayed, transactional) and EndTransaction.
//! - `receive`: ReceiveMessage, AckMessage, ChangeInvisibleDuration (simple consumers).
//! - `checks`: check-backs to gRPC producers, through the one check-back scheduler.
//! - `convert`: stored messages in the gRPC form.
//! - [`status`]: txmq's errors as the codes clients know.
//! - `auth`: the clients' HMAC-SHA1 signatures, with `grpc-credentials-file`.
//!
//! What the clients expect, read from their source, is in `../shared/rocketmq-grpc.md`.

mod auth;
mod checks;
mod convert;
mod limits;
mod receipts;
mod receive;
mod route;
mod send;
pub mod status;
mod telemetry;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::config::Config;
use crate::faces::renew::Renewals;
use crate::replication::node::Node;
use crate::service::principal::Identity;
use crate::service::{Principal, Shared};

/// The code generated from the vendored protocol.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
#[doc(hidden)]
pub mod pb {
    tonic::include_proto!("apache.rocketmq.v2");
}

use pb::messaging_service_server::{MessagingService, MessagingServiceServer};

/// The broker's parts the endpoint serves from: set while a storage is open, cleared
/// while the broker (re)opens it (requests then get a status saying so). Setting them
/// registers every producer's Telemetry stream with the new parts' check-back
/// scheduler (a stream whose Settings came while storage was closed, or before a
/// reopen, is not left out).
#[derive(Default)]
pub struct Live {
    shared: RwLock<Option<Arc<Shared>>>,
    sessions: Arc<telemetry::Sessions>,
    /// The broker group this node belongs to, if any: routes name its leader.
    group: std::sync::OnceLock<Arc<Node>>,
    /// The users and rules of the last parts served: a node between terms (or a
    /// follower that led before) still checks signatures with them.
    last_auth: RwLock<Option<Arc<crate::auth::Auth>>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("serving", &self.get().is_some())
            .field("in_group", &self.group.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Live {
    /// Makes this endpoint a broker group node's: while another node leads, routes name
    /// that node's gRPC endpoint, and while this one leads, its own advertised one.
    pub fn join_group(&self, node: Arc<Node>) {
        let _ = self.group.set(node);
    }

    /// Sets (or clears) the current parts.
    pub fn set(&self, shared: Option<Arc<Shared>>) {
        if let Some(s) = &shared {
            *self.last_auth.write().expect("live lock") = Some(s.auth.clone());
        }
        *self.shared.write().expect("live lock") = shared.clone();
        self.sessions.attach_all(shared);
    }

    pub(crate) fn get(&self) -> Option<Arc<Shared>> {
        self.shared.read().expect("live lock").clone()
    }

    /// The users and rules to check a call's signature with: the serving parts', else
    /// the last ones served.
    pub(crate) fn auth(&self) -> Option<Arc<crate::auth::Auth>> {
        self.get()
            .map(|s| s.auth.clone())
            .or_else(|| self.last_auth.read().expect("live lock").clone())
    }
}

/// Checks the TLS certificate and key of the configuration (what the endpoint would
/// serve with), so a bad pair stops the broker at start instead of leaving it without
/// its endpoint.
///
/// # Errors
/// What is wrong with them.
pub fn check_tls(config: &Config) -> Result<(), String> {
    let Some((cert, key)) = &config.grpc_tls else {
        return Ok(());
    };
    let identity = tonic::transport::Identity::from_pem(cert, key);
    tonic::transport::Server::builder()
        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
        .map(|_| ())
        .map_err(|e| format!("grpc-tls-cert / grpc-tls-key: {e}"))
}

/// Serves the endpoint on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    live: Arc<Live>,
    config: Arc<Config>,
    limits: Arc<crate::service::limits::Limits>,
    stop: CancellationToken,
) {
    let addr = listener.local_addr().ok();
    let renewals = Arc::new(Renewals::default());
    let (from, sessions) = (live.clone(), live.sessions.clone());
    tokio::spawn(crate::faces::renew::run(
        move || from.get(),
        renewals.clone(),
        move |client| sessions.has_client(client),
        stop.clone(),
    ));
    let endpoint = Endpoint {
        sessions: live.sessions.clone(),
        renewals,
        live,
        addr,
        config,
        stop: stop.clone(),
        receipts: receipts::Receipts::default(),
    };
    // A request is at most what a native frame may be; a receive's answer is bounded by
    // its byte budget (`receive`), a message by max-message-bytes.
    let max = endpoint.config.max_frame_len;
    let endpoint_config = endpoint.config.clone();
    let credentials = Arc::new(endpoint.config.grpc_credentials.clone());
    let tls = endpoint.config.grpc_tls.clone();
    let endpoint_live = endpoint.live.clone();
    // Told to have users (or to make the first): without users and rules at hand (a
    // node that has not served yet), unsigned calls are refused, not taken.
    let closed = endpoint.config.require_auth || endpoint.config.bootstrap_admin.is_some();
    let service = MessagingServiceServer::new(endpoint)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max.saturating_mul(2));
    let service = tonic::service::interceptor::InterceptedService::new(
        service,
        auth::interceptor(credentials, endpoint_live, closed),
    );
    tracing::info!(addr = ?addr, tls = tls.is_some(), "grpc endpoint");
    let incoming = limits::incoming(listener, limits.clone(), endpoint_config.handshake_timeout);
    // A call waiting for the budget is not read: what its client sent meanwhile stays
    // in its stream's window, and counts against the connection's. The connection's
    // window holds every stream's, so that waiting calls never starve those that hold
    // their share (they would wait for each other for ever).
    let streams = u32::try_from(endpoint_config.max_streams_per_connection).unwrap_or(u32::MAX);
    let connection_window = streams.saturating_mul(limits::STREAM_WINDOW);
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = &tls {
        let identity = tonic::transport::Identity::from_pem(cert, key);
        builder =
            match builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity)) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!("grpc endpoint not served: its TLS certificate or key: {e}");
                    return;
                }
            };
    }
    // Keepalives find clients that vanished (their streams then end).
    let served = builder
        .tcp_keepalive(Some(std::time::Duration::from_secs(60)))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .max_concurrent_streams(streams)
        .initial_stream_window_size(limits::STREAM_WINDOW)
        .initial_connection_window_size(connection_window)
        .layer(limits::BudgetLayer {
            limits,
            max_message: max,
        })
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::error!("grpc endpoint stopped: {e}");
    }
}

/// The service.
struct Endpoint {
    live: Arc<Live>,
    sessions: Arc<telemetry::Sessions>,
    /// Push consumers' leases the broker renews.
    renewals: Arc<Renewals>,
    /// The address it listens on (routes name it when a client did not say which
    /// endpoint it dialed).
    addr: Option<SocketAddr>,
    config: Arc<Config>,
    /// Ends the streams the endpoint holds open.
    stop: CancellationToken,
    /// Makes and checks receipt handles.
    receipts: receipts::Receipts,
}

impl Endpoint {
    /// The broker's parts, or the status that says they are not there.
    /// The broker's parts, while it may serve from them: for a group leader, while its
    /// lease holds (a paused leader answers nothing from its old state).
    fn shared(&self) -> Result<Arc<Shared>, pb::Status> {
        self.live
            .get()
            .filter(|s| s.serving.holds())
            .ok_or_else(|| self.not_serving())
    }

    /// What a request gets while the broker's parts are not there.
    fn not_serving(&self) -> pb::Status {
        if self.config.peers.is_some() {
            // A broker group's follower (or a node between terms).
            status::of(
                pb::Code::HaNotAvailable,
                "this broker does not lead its group; connect to the leader",
            )
        } else {
            status::of(
                pb::Code::InternalServerError,
                "the broker is starting or recovering its storage; retry",
            )
        }
    }
}

/// Who asks: the identity the call's signature proved (`auth`), its client id and its
/// peer.
fn principal<T>(request: &Request<T>) -> Principal {
    let identity = request
        .extensions()
        .get::<auth::Signed>()
        .map_or(Identity::Anonymous, |s| s.0.clone());
    Principal::grpc(identity, request.remote_addr(), client_id(request))
}

/// The client id every request carries in its metadata.
fn client_id<T>(request: &Request<T>) -> Option<String> {
    request
        .metadata()
        .get("x-mq-client-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

type Reply<T> = Result<Response<T>, Status>;

/// A server stream, as the generated service wants it.
pub type BoxStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl MessagingService for Endpoint {
    async fn query_route(
        &self,
        request: Request<pb::QueryRouteRequest>,
    ) -> Reply<pb::QueryRouteResponse> {
        Ok(Response::new(
            route::query_route(self, &principal(&request), request.into_inner()).await,
        ))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Reply<pb::HeartbeatResponse> {
        Ok(Response::new(route::heartbeat(self, request)))
    }

    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Reply<pb::SendMessageResponse> {
        Ok(Response::new(
            send::send_message(self, &principal(&request), request.into_inner()).await,
        ))
    }

    async fn end_transaction(
        &self,
        request: Request<pb::EndTransactionRequest>,
    ) -> Reply<pb::EndTransactionResponse> {
        Ok(Response::new(send::end_transaction(self, request).await))
    }

    async fn telemetry(
        &self,
        request: Request<tonic::Streaming<pb::TelemetryCommand>>,
    ) -> Reply<BoxStream<pb::TelemetryCommand>> {
        telemetry::open(self, request).map(Response::new)
    }

    async fn receive_message(
        &self,
        request: Request<pb::ReceiveMessageRequest>,
    ) -> Reply<BoxStream<pb::ReceiveMessageResponse>> {
        receive::receive(self, request).await.map(Response::new)
    }

    async fn ack_message(
        &self,
        request: Request<pb::AckMessageRequest>,
    ) -> Reply<pb::AckMessageResponse> {
        Ok(Response::new(
            receive::ack(self, &principal(&request), request.into_inner()).await,
        ))
    }

    async fn change_invisible_duration(
        &self,
        request: Request<pb::ChangeInvisibleDurationRequest>,
    ) -> Reply<pb::ChangeInvisibleDurationResponse> {
        Ok(Response::new(
            receive::change_invisible(self, &principal(&request), request.into_inner()).await,
        ))
    }

    async fn query_assignment(
        &self,
        request: Request<pb::QueryAssignmentRequest>,
    ) -> Reply<pb::QueryAssignmentResponse> {
        Ok(Response::new(
            route::query_assignment(self, &principal(&request), request.into_inner()).await,
        ))
    }

    async fn forward_message_to_dead_letter_queue(
        &self,
        request: Request<pb::ForwardMessageToDeadLetterQueueRequest>,
    ) -> Reply<pb::ForwardMessageToDeadLetterQueueResponse> {
        Ok(Response::new(
            receive::forward_to_dead_letters(self, &principal(&request), request.into_inner())
                .await,
        ))
    }

    async fn recall_message(
        &self,
        request: Request<pb::RecallMessageRequest>,
    ) -> Reply<pb::RecallMessageResponse> {
        Ok(Response::new(
            send::recall(self, &principal(&request), request.into_inner()).await,
        ))
    }

    async fn notify_client_termination(
        &self,
        request: Request<pb::NotifyClientTerminationRequest>,
    ) -> Reply<pb::NotifyClientTerminationResponse> {
        Ok(Response::new(route::terminate(self, request)))
    }
}
