//! One Remoting connection: frames are read in order and each request is answered in
//! a task of its own (a long poll holds up nothing else), with its `opaque`; answers
//! and the broker's own one-way requests (check-backs, rebalance notices) go out
//! through one writer task. A frame that does not parse closes the connection with a
//! logged reason; a request that parses but asks for something invalid gets an error
//! code; a one-way request gets no answer at all.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::checks::Link;
use super::frame::{Codec, Command, Encoding};
use super::{Endpoint, admin, auth, clients, codes, pull, route, send};
use crate::ids::Id;
use crate::service::{Principal, Shared, consume};

/// Answers and pushes queued for one connection's socket.
const OUTBOUND: usize = 1024;
/// Requests one connection may have in hand at once (pulls wait in them).
const MAX_IN_FLIGHT: usize = 256;
/// A connection silent this long is closed (RocketMQ's server closes at 120 s; the
/// clients send a heartbeat every 30 s).
const IDLE: Duration = Duration::from_secs(150);
/// How long an unauthenticated request waits before its refusal.
const REFUSAL_DELAY: Duration = Duration::from_millis(200);

static IDS: AtomicU64 = AtomicU64::new(1);

/// A client connection as the face's parts see it.
#[derive(Debug)]
pub struct Conn {
    /// Unique in this process.
    pub id: u64,
    /// Where the client is.
    pub peer: SocketAddr,
    outbound: mpsc::Sender<Command>,
    /// The serialisation of the client's last request: the broker's own requests use
    /// it too.
    encoding: AtomicU8,
    /// Opaque values of the broker's own requests.
    opaque: AtomicI32,
    /// The client id of its heartbeats.
    pub client_id: Mutex<String>,
    /// Its registration as a producer that answers check-backs.
    link: Mutex<Option<Arc<Link>>>,
    /// Cancelled when it closes: its long polls end with it (what they would take
    /// goes back to the group at once, rather than leased to no one).
    closed: tokio_util::sync::CancellationToken,
}

impl Conn {
    /// Queues `command` without waiting; `false` when the socket is not keeping up
    /// (the command is dropped) or gone.
    pub fn push(&self, mut command: Command) -> bool {
        command.opaque = self.opaque.fetch_add(1, Ordering::Relaxed);
        self.outbound.try_send(command).is_ok()
    }

    /// Who holds the queue locks this connection takes: its client (by its heartbeat's
    /// id), or the connection itself before any heartbeat.
    pub fn lock_owner(&self) -> String {
        let client = self.client_id.lock().expect("client lock");
        if client.is_empty() {
            format!("%connection{}", self.id)
        } else {
            client.clone()
        }
    }

    /// The serialisation to speak to the client in.
    pub fn encoding(&self) -> Encoding {
        match self.encoding.load(Ordering::Relaxed) {
            1 => Encoding::RocketMq,
            _ => Encoding::Json,
        }
    }

    /// Makes the connection one the check-backs of producer `group` may ask.
    ///
    /// # Errors
    /// Not permitted.
    pub fn answer_checks(
        self: &Arc<Self>,
        ep: &Endpoint,
        shared: &Arc<Shared>,
        who: &Principal,
        group: &str,
    ) -> crate::error::Result<()> {
        let link = {
            let mut slot = self.link.lock().expect("link lock");
            match slot.as_ref() {
                Some(l) if l.is_of(shared) => l.clone(),
                // None yet, or one of parts since replaced (a reopen, a new term).
                _ => {
                    let l = Link::new(shared, self, ep.advertised);
                    *slot = Some(l.clone());
                    l
                }
            }
        };
        link.answer_for(shared, who, group)
    }

    /// A check of `txn` sent on this connection was answered: its link's connection
    /// id, the check's id and its group.
    pub fn answered(&self, shared: &Arc<Shared>, txn: Id) -> Option<(u64, (u64, String))> {
        let link = self.link.lock().expect("link lock").clone()?;
        if !link.is_of(shared) {
            return None;
        }
        link.answered(txn).map(|a| (link.connection_id, a))
    }
}

/// Serves one connection until it closes, misbehaves, idles or the face stops.
pub async fn serve(ep: Arc<Endpoint>, stream: crate::tls::Stream, peer: SocketAddr) {
    let (reader, writer) = stream.split();
    let codec = Codec::new(ep.config.max_frame_len.min(super::frame::MAX_FRAME));
    let mut frames = FramedRead::new(reader, codec);
    let (tx, mut rx) = mpsc::channel::<Command>(OUTBOUND);
    let conn = Arc::new(Conn {
        id: IDS.fetch_add(1, Ordering::Relaxed),
        peer,
        outbound: tx.clone(),
        encoding: AtomicU8::new(0),
        opaque: AtomicI32::new(1),
        client_id: Mutex::new(String::new()),
        link: Mutex::new(None),
        closed: tokio_util::sync::CancellationToken::new(),
    });
    // A write that fails (the socket, or an answer too large to frame) closes the
    // connection: the client would otherwise wait for answers that never come.
    let broken = conn.closed.clone();
    let writing = tokio::spawn(async move {
        let mut sink = FramedWrite::new(writer, codec);
        while let Some(command) = rx.recv().await {
            if let Err(e) = sink.send(command).await {
                tracing::info!(%peer, "remoting connection closed: a write failed: {e}");
                break;
            }
        }
        broken.cancel();
    });
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let next = tokio::select! {
            n = tokio::time::timeout(IDLE, frames.next()) => n,
            () = ep.stop.cancelled() => break,
            () = conn.closed.cancelled() => break,
        };
        let request = match next {
            Err(_) => {
                tracing::info!(%peer, "remoting connection closed: silent for {IDLE:?}");
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                tracing::warn!(%peer, "remoting connection closed: {e}");
                break;
            }
            Ok(Some(Ok(c))) => c,
        };
        if request.is_response() {
            // The broker's own requests are one-way: no answer is waited for.
            continue;
        }
        conn.encoding.store(
            u8::from(request.encoding == Encoding::RocketMq),
            Ordering::Relaxed,
        );
        // A request takes one of the connection's slots and its share of the broker's
        // byte budget before it is handled; meanwhile nothing more is read.
        let units = ep.limits.units_for(request.body.len() as u64 + 1024);
        let admitted = tokio::select! {
            p = in_flight.clone().acquire_owned() => p.ok(),
            () = ep.stop.cancelled() => None,
            () = conn.closed.cancelled() => None,
        };
        let Some(permit) = admitted else {
            break;
        };
        let budget = tokio::select! {
            b = ep.limits.budget.clone().acquire_many_owned(units) => b.ok(),
            () = ep.stop.cancelled() => None,
            () = conn.closed.cancelled() => None,
        };
        let Some(budget) = budget else {
            break;
        };
        let (ep, conn, tx) = (ep.clone(), conn.clone(), tx.clone());
        tasks.spawn(async move {
            let _permit = (permit, budget);
            let oneway = request.is_oneway();
            let answer = dispatch(&ep, &conn, &request).await;
            if !oneway {
                let _ = tx.send(answer).await;
            }
        });
    }
    conn.closed.cancel();
    pull::closed(&ep, conn.id);
    // Its groups lose a member; its check-backs go elsewhere.
    let changed = ep.clients.closed(conn.id);
    ep.clients.notify(&changed);
    conn.link.lock().expect("link lock").take();
    tasks.close();
    drop(tx);
    // Requests in hand end with the socket: their answers have nowhere to go.
    let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
    writing.abort();
}

/// The answer to one request.
async fn dispatch(ep: &Arc<Endpoint>, conn: &Arc<Conn>, req: &Command) -> Command {
    use codes::*;
    let shared = ep.live.get();
    // A broker group's follower, as a name server, tells anyone where the leader is (it
    // holds no users to check a signature against; the leader checks every request that
    // reads or writes anything, and a route from here says nothing of what exists).
    let following =
        ep.live.group.get().is_some() && !shared.as_ref().is_some_and(|s| s.serving.holds());
    if following && matches!(req.code, GET_ROUTEINFO_BY_TOPIC | GET_BROKER_CLUSTER_INFO) {
        let anyone = Principal::remoting(
            crate::auth::Identity::Anonymous,
            Some(conn.peer),
            String::new(),
        );
        return if req.code == GET_ROUTEINFO_BY_TOPIC {
            route::topic(ep, &anyone, req).await
        } else {
            route::cluster(ep, req).await
        };
    }
    let closed = ep.config.require_auth || ep.config.bootstrap_admin.is_some();
    let identity = match auth::identify(
        req,
        shared.as_ref().map(|s| s.auth.as_ref()),
        &ep.config.grpc_credentials,
        closed,
    ) {
        Ok(identity) => identity,
        Err(why) => {
            if let Some(s) = &shared {
                s.metrics
                    .auth_failures
                    .with_label_values(&["remoting"])
                    .inc();
            }
            tracing::warn!(target: crate::auth::AUDIT, face = "remoting", from = %conn.peer, code = req.code, "authentication failed: {why}");
            tokio::time::sleep(REFUSAL_DELAY).await;
            return Command::answer(req, NO_PERMISSION, Some(why.into()));
        }
    };
    let client_id = conn.client_id.lock().expect("client lock").clone();
    tracing::trace!(code = req.code, opaque = req.opaque, client = %client_id, fields = ?req.ext, "remoting request");
    let who = Principal::remoting(identity, Some(conn.peer), client_id);
    match req.code {
        GET_ROUTEINFO_BY_TOPIC => route::topic(ep, &who, req).await,
        GET_BROKER_CLUSTER_INFO => route::cluster(ep, req).await,
        QUERY_ASSIGNMENT => super::pop::assignment(ep, &who, req),
        super::pop::POP_MESSAGE => super::pop::pop(ep, conn, &who, req).await,
        super::pop::ACK_MESSAGE => super::pop::ack(ep, conn, &who, req).await,
        super::pop::CHANGE_MESSAGE_INVISIBLETIME => {
            super::pop::change_invisible(ep, conn, &who, req).await
        }
        GET_ALL_TOPIC_LIST_FROM_NAMESERVER => route::topics(ep, &who, req),
        HEART_BEAT => heartbeat(ep, conn, &who, req),
        UNREGISTER_CLIENT => unregister(ep, conn, req),
        GET_CONSUMER_LIST_BY_GROUP => consumers(ep, conn, &who, req),
        CHECK_CLIENT_CONFIG => check_client_config(req),
        SEND_MESSAGE | SEND_MESSAGE_V2 | SEND_BATCH_MESSAGE => {
            send::send(ep, conn, &who, req).await
        }
        END_TRANSACTION => send::end(ep, conn, &who, req).await,
        PULL_MESSAGE | LITE_PULL_MESSAGE => {
            tokio::select! {
                answer = pull::pull(ep, conn, &who, req) => answer,
                () = conn.closed.cancelled() => Command::answer(req, SYSTEM_ERROR, None),
            }
        }
        UPDATE_CONSUMER_OFFSET => pull::update_offset(ep, conn, &who, req).await,
        QUERY_CONSUMER_OFFSET => pull::query_offset(ep, conn, &who, req).await,
        GET_MAX_OFFSET | GET_MIN_OFFSET | SEARCH_OFFSET_BY_TIMESTAMP => {
            pull::offset_of(ep, &who, req)
        }
        GET_EARLIEST_MSG_STORETIME => Command::answer(req, SUCCESS, None).with("timestamp", 0),
        CONSUMER_SEND_MSG_BACK => pull::send_back(ep, conn, &who, req).await,
        LOCK_BATCH_MQ => match ep.shared() {
            Ok(shared) => ep.locks.lock(
                req,
                &conn.lock_owner(),
                |topic| ep.queues(&shared, topic),
                |group, topic| consume::may_consume(&shared, &who, group, topic).is_ok(),
            ),
            Err(e) => super::refusal(req, &e),
        },
        UNLOCK_BATCH_MQ => match ep.shared() {
            Ok(shared) => ep
                .locks
                .unlock(req, &conn.lock_owner(), |topic| ep.queues(&shared, topic)),
            Err(e) => super::refusal(req, &e),
        },
        GET_BROKER_RUNTIME_INFO => admin::runtime_info(ep, &who, req),
        UPDATE_AND_CREATE_TOPIC => admin::create_topic(ep, &who, req).await,
        DELETE_TOPIC_IN_BROKER => admin::delete_topic(ep, &who, req).await,
        DELETE_TOPIC_IN_NAMESRV | PUT_KV_CONFIG => Command::answer(req, SUCCESS, None),
        GET_TOPIC_STATS_INFO => admin::topic_stats(ep, &who, req),
        GET_TOPIC_CONFIG => admin::topic_config(ep, &who, req),
        UPDATE_AND_CREATE_SUBSCRIPTIONGROUP => admin::update_group(req),
        GET_CONSUME_STATS => admin::consume_stats(ep, &who, req).await,
        GET_CONSUMER_CONNECTION_LIST => admin::connections(ep, &who, req),
        VIEW_MESSAGE_BY_ID => admin::view_message(ep, &who, req).await,
        QUERY_MESSAGE => admin::query_message(ep, &who, req).await,
        QUERY_TOPIC_CONSUME_BY_WHO => admin::consumed_by(ep, &who, req).await,
        code => Command::answer(
            req,
            REQUEST_CODE_NOT_SUPPORTED,
            Some(format!(" request type {code} not supported")),
        ),
    }
}

/// HEART_BEAT: the client's producer groups answer check-backs from this connection;
/// its consumer groups gain (or keep) it as a member.
fn heartbeat(ep: &Endpoint, conn: &Arc<Conn>, who: &Principal, req: &Command) -> Command {
    // Who is a member is decided with the serving parts' rules: none, none taken.
    let shared = match ep.shared() {
        Ok(s) => s,
        Err(e) => return super::refusal(req, &e),
    };
    let beat = match clients::parse(req, conn, txmq_protocol::now_ms()) {
        Ok(b) => b,
        Err(why) => return super::invalid(req, why),
    };
    *conn.client_id.lock().expect("client lock") = beat.client_id.clone();
    for group in &beat.producer_groups {
        // Every client instance declares this inner producer: it answers nothing.
        if group == "CLIENT_INNER_PRODUCER" || crate::service::name("group", group).is_err() {
            continue;
        }
        if let Err(e) = conn.answer_checks(ep, &shared, who, group) {
            tracing::info!(client = %beat.client_id, group, "not asked for checks: {e}");
        }
    }
    // A member of a group only where it may consume the group's topics.
    let mut consumers = beat.consumers;
    {
        consumers.retain(|g| {
            let refused = g.member.subscriptions.keys().find_map(|topic| {
                match super::route::group_topic(topic) {
                    // Another group's dead letters: an operator's reader, a member of
                    // its own group that may list them.
                    Some(("%DLQ%", dead_of)) => {
                        use crate::service::access::{Operation, Resource, permit};
                        consume::may_consume(&shared, who, &g.group, topic)
                            .and_then(|()| {
                                permit(
                                    &shared,
                                    who,
                                    Operation::ListDeadLetters,
                                    &[Resource::Group(dead_of), Resource::Topic("")],
                                )
                            })
                            .err()
                    }
                    Some(_) => None,
                    None => consume::may_consume(&shared, who, &g.group, topic).err(),
                }
            });
            if let Some(e) = &refused {
                tracing::info!(client = %beat.client_id, group = %g.group, "not a member: {e}");
            }
            refused.is_none()
        });
    }
    let changed = ep.clients.beat(&beat.client_id, conn.id, consumers);
    ep.clients.notify(&changed);
    Command::answer(req, codes::SUCCESS, None)
}

/// UNREGISTER_CLIENT: a client leaves its consumer group (or all of them).
fn unregister(ep: &Endpoint, conn: &Conn, req: &Command) -> Command {
    let Some(client) = req.field("clientID") else {
        return super::invalid(req, "the header field clientID is missing");
    };
    let changed = ep
        .clients
        .leave(client, conn.id, req.field("consumerGroup"));
    ep.clients.notify(&changed);
    Command::answer(req, codes::SUCCESS, None)
}

/// GET_CONSUMER_LIST_BY_GROUP: the exact ids of the group's members, to a member
/// (or to whoever may describe the group).
fn consumers(ep: &Endpoint, conn: &Conn, who: &Principal, req: &Command) -> Command {
    let Some(group) = req.field("consumerGroup") else {
        return super::invalid(req, "the header field consumerGroup is missing");
    };
    let ids = ep.clients.members(group);
    let member = {
        let me = conn.client_id.lock().expect("client lock");
        !me.is_empty() && ids.contains(&*me)
    };
    if !member {
        use crate::service::access::{Operation, Resource, permit};
        if let Err(e) = ep
            .shared()
            .and_then(|s| permit(&s, who, Operation::DescribeGroup, &[Resource::Group(group)]))
        {
            return super::refusal(req, &e);
        }
    }
    if ids.is_empty() {
        return Command::answer(
            req,
            codes::SYSTEM_ERROR,
            Some(format!("no consumer of group {group} is connected")),
        );
    }
    let body = serde_json::json!({ "consumerIdList": ids });
    Command::answer(req, codes::SUCCESS, None)
        .with_body(serde_json::to_vec(&body).unwrap_or_default())
}

/// CHECK_CLIENT_CONFIG: sent only for SQL92 subscriptions, which txmq does not take.
fn check_client_config(req: &Command) -> Command {
    let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
    let kind = body
        .pointer("/subscriptionData/expressionType")
        .and_then(|k| k.as_str())
        .unwrap_or("TAG");
    if kind.eq_ignore_ascii_case("TAG") {
        return Command::answer(req, codes::SUCCESS, None);
    }
    Command::answer(
        req,
        codes::SYSTEM_ERROR,
        Some(format!(
            "{kind} subscriptions are not supported by txmq: subscribe by tag (\"*\" or \
             \"a || b\")"
        )),
    )
}
