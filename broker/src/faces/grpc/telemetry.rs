//! The Telemetry stream: every client opens one (or one per endpoint) and sends its
//! `Settings` first; the broker answers every Settings with `status OK` and the settings
//! merged with its own (retry policy, body size limit, batch sizes), and keeps the stream
//! open: clients wait for that answer before they start, and the broker later asks
//! producers about orphaned transactions on it. The stream's sender is kept in
//! [`Sessions`] while it is open.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::{Request, Status};

use super::BoxStream;
use super::checks::Link;
use super::{Endpoint, client_id, pb, status};
use crate::service::{Principal, Shared, consume};

/// Commands a session's stream may hold waiting for the client.
const OUTBOUND: usize = 64;
/// Most Telemetry streams open at once.
const MAX_SESSIONS: usize = 10_000;
/// Most topics one producer's Settings may declare.
const MAX_TOPICS: usize = 1_000;

/// One open Telemetry stream.
#[derive(Debug, Clone)]
pub struct Session {
    /// The client's id (`x-mq-client-id`).
    pub client_id: String,
    /// Who opened the stream.
    pub who: Principal,
    /// Its last settings.
    pub settings: pb::Settings,
    /// Topics it publishes (a producer's stream).
    pub topics: Vec<String>,
    /// Commands to the client.
    pub outbound: mpsc::Sender<Result<pb::TelemetryCommand, Status>>,
    /// Its registration as a producer for check-backs, with the broker's current parts.
    pub link: Option<Arc<Link>>,
}

/// The open Telemetry streams, by a number of their own (a client may open several).
#[derive(Debug, Default)]
pub struct Sessions {
    open: Mutex<HashMap<u64, Session>>,
    next: AtomicU64,
}

impl Sessions {
    /// Adds a stream unless [`MAX_SESSIONS`] are open: the count and the insert under
    /// one lock, so concurrent opens cannot pass the cap. `None` when full.
    fn add(&self, session: Session) -> Option<u64> {
        let mut open = self.open.lock().expect("sessions lock");
        if open.len() >= MAX_SESSIONS {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        open.insert(id, session);
        Some(id)
    }

    fn update(
        &self,
        id: u64,
        settings: pb::Settings,
        topics: Vec<String>,
        shared: Option<Arc<Shared>>,
    ) {
        if let Some(s) = self.open.lock().expect("sessions lock").get_mut(&id) {
            s.settings = settings;
            s.link = match shared {
                Some(shared) if !topics.is_empty() => {
                    Some(Link::attach(shared, &s.who, s.outbound.clone(), &topics))
                }
                _ => None,
            };
            s.topics = topics;
        }
    }

    /// Registers every producer's stream with `shared` (the broker's new parts), or
    /// drops their registrations (`None`: storage is closed).
    pub fn attach_all(&self, shared: Option<Arc<Shared>>) {
        for s in self.open.lock().expect("sessions lock").values_mut() {
            s.link = match &shared {
                Some(shared) if !s.topics.is_empty() => Some(Link::attach(
                    shared.clone(),
                    &s.who,
                    s.outbound.clone(),
                    &s.topics,
                )),
                _ => None,
            };
        }
    }

    /// Whether a client has a stream open.
    pub fn has_client(&self, client_id: &str) -> bool {
        self.open
            .lock()
            .expect("sessions lock")
            .values()
            .any(|s| s.client_id == client_id)
    }

    fn remove(&self, id: u64) {
        self.open.lock().expect("sessions lock").remove(&id);
    }

    /// Drops the streams of the client that says it terminates: those with its client
    /// id that it opened itself, on the same connection (peer address) as the same
    /// principal. Another caller naming its client id drops nothing: it would otherwise
    /// stop the client's check-backs. Answers how many went.
    pub fn remove_client(&self, client_id: &str, caller: &Principal) -> usize {
        let mut open = self.open.lock().expect("sessions lock");
        let before = open.len();
        open.retain(|_, s| {
            !(s.client_id == client_id
                && s.who.peer == caller.peer
                && s.who.identity == caller.identity)
        });
        before - open.len()
    }

    /// The topics a stream publishes.
    fn topics_of(&self, id: u64) -> Vec<String> {
        self.open
            .lock()
            .expect("sessions lock")
            .get(&id)
            .map(|s| s.topics.clone())
            .unwrap_or_default()
    }

    /// The producer registrations of a client's streams opened by `caller`'s identity
    /// (another principal naming the client's id gets none of them).
    pub fn links_of(&self, client_id: &str, caller: &Principal) -> Vec<Arc<Link>> {
        self.open
            .lock()
            .expect("sessions lock")
            .values()
            .filter(|s| s.client_id == client_id && s.who.identity == caller.identity)
            .filter_map(|s| s.link.clone())
            .collect()
    }
}

/// Opens a Telemetry stream: answers each Settings the client sends until it closes.
pub fn open(
    endpoint: &Endpoint,
    request: Request<tonic::Streaming<pb::TelemetryCommand>>,
) -> Result<BoxStream<pb::TelemetryCommand>, Status> {
    let Some(client) = client_id(&request) else {
        return Err(Status::invalid_argument("x-mq-client-id is required"));
    };
    let who = super::principal(&request);
    let mut inbound = request.into_inner();
    let (tx, rx) = mpsc::channel(OUTBOUND);
    let sessions = endpoint.sessions.clone();
    let max_body = i32::try_from(endpoint.config.max_message_bytes).unwrap_or(i32::MAX);
    let max_attempts = endpoint.config.max_attempts;
    let backoff = endpoint.config.nack_backoff.clone();
    let stop = endpoint.stop.clone();
    let live = endpoint.live.clone();
    let mut auth_changes = live.get().map(|s| s.auth.changes());
    let me = who.clone();
    let Some(id) = sessions.add(Session {
        client_id: client.clone(),
        who,
        settings: pb::Settings::default(),
        topics: Vec::new(),
        outbound: tx.clone(),
        link: None,
    }) else {
        return Err(Status::resource_exhausted(format!(
            "the broker holds {MAX_SESSIONS} Telemetry streams already"
        )));
    };
    tokio::spawn(async move {
        // Without parts to watch (none yet, or they went with a reopen or a change of
        // leader), look for the next ones once a second, and check the stream again
        // against their users and rules.
        let mut look = tokio::time::interval(Duration::from_secs(1));
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The endpoint's stop ends every stream (the server waits for them).
            let command = tokio::select! {
                () = stop.cancelled() => break,
                _ = look.tick(), if auth_changes.is_none() => {
                    let Some(shared) = live.get() else { continue };
                    auth_changes = Some(shared.auth.changes());
                    let topics = sessions.topics_of(id);
                    if let Err(e) = super::checks::still_allowed(&shared, &me, &topics) {
                        close_for(&tx, &client, &e);
                        break;
                    }
                    continue;
                }
                changed = auth_changed(&mut auth_changes) => {
                    if changed.is_err() {
                        // Those parts are gone: watch the next ones (above).
                        auth_changes = None;
                        continue;
                    }
                    // Users or rules changed: a stream that lost its user, or `txn` on a
                    // topic's group it takes check-backs for, is closed, as a native
                    // connection is.
                    let topics = sessions.topics_of(id);
                    if let Some(shared) = live.get()
                        && let Err(e) = super::checks::still_allowed(&shared, &me, &topics)
                    {
                        close_for(&tx, &client, &e);
                        break;
                    }
                    continue;
                }
                command = inbound.next() => command,
            };
            let Some(Ok(command)) = command else { break };
            // Answers to commands the broker does not send (thread stacks, message
            // verification) need nothing.
            if let Some(pb::telemetry_command::Command::Settings(settings)) = command.command {
                let shared = live.get();
                let fifo = match (&settings.pub_sub, &shared) {
                    (Some(pb::settings::PubSub::Subscription(s)), Some(shared)) => {
                        ordered(shared, s).await
                    }
                    _ => false,
                };
                let merged = merge(settings, max_body, max_attempts, &backoff, fifo);
                // A producer's stream takes the check-backs of its topics.
                let topics: Vec<String> = match &merged.pub_sub {
                    Some(pb::settings::PubSub::Publishing(p)) => p
                        .topics
                        .iter()
                        .take(MAX_TOPICS)
                        .map(|t| t.name.clone())
                        .collect(),
                    _ => Vec::new(),
                };
                sessions.update(id, merged.clone(), topics, shared);
                let reply = pb::TelemetryCommand {
                    status: Some(status::ok()),
                    command: Some(pb::telemetry_command::Command::Settings(merged)),
                };
                if tx.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
        }
        sessions.remove(id);
        tracing::debug!(client = %client, "telemetry stream closed");
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// Tells the client why its stream closes: it lost its user or a permission it holds.
fn close_for(
    tx: &mpsc::Sender<Result<pb::TelemetryCommand, Status>>,
    client: &str,
    e: &crate::error::Error,
) {
    tracing::info!(client = %client, "closing telemetry stream: {e}");
    let _ = tx.try_send(Ok(pb::TelemetryCommand {
        status: Some(status::of_error(e)),
        command: None,
    }));
}

/// Waits for a change of users or rules; `Err` when the parts that announce them are
/// gone; never, without them.
async fn auth_changed(
    changes: &mut Option<tokio::sync::watch::Receiver<u64>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match changes {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

/// Whether the group of a subscription is ordered on any of its topics.
async fn ordered(shared: &Arc<Shared>, s: &pb::Subscription) -> bool {
    let Some(group) = s.group.as_ref().map(|g| g.name.clone()) else {
        return false;
    };
    let topics = s
        .subscriptions
        .iter()
        .filter_map(|e| e.topic.as_ref())
        .take(MAX_TOPICS);
    for topic in topics {
        if consume::is_ordered(shared, &group, &topic.name).await {
            return true;
        }
    }
    false
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The client's settings with the broker's added: what a producer may send and how it
/// retries; how a consumer receives and how often a message is redelivered (the
/// broker's nack backoff and max attempts).
fn merge(
    mut settings: pb::Settings,
    max_body: i32,
    max_attempts: u32,
    backoff: &[Duration],
    fifo: bool,
) -> pb::Settings {
    use pb::retry_policy::Strategy;
    match &mut settings.pub_sub {
        Some(pb::settings::PubSub::Publishing(p)) => {
            p.max_body_size = max_body;
            p.validate_message_type = true;
            settings.backoff_policy = Some(pb::RetryPolicy {
                max_attempts: 3,
                strategy: Some(Strategy::ExponentialBackoff(pb::ExponentialBackoff {
                    initial: Some(duration(Duration::from_millis(10))),
                    max: Some(duration(Duration::from_secs(1))),
                    multiplier: 2.0,
                })),
            });
        }
        Some(pb::settings::PubSub::Subscription(s)) => {
            s.receive_batch_size = Some(s.receive_batch_size.unwrap_or(32).clamp(1, 1024));
            s.long_polling_timeout = Some(duration(Duration::from_secs(20)));
            // The group's own ordering (a consumer learns it from the broker).
            s.fifo = Some(fifo);
            settings.backoff_policy = Some(pb::RetryPolicy {
                max_attempts: i32::try_from(max_attempts).unwrap_or(i32::MAX),
                strategy: Some(Strategy::CustomizedBackoff(pb::CustomizedBackoff {
                    next: backoff.iter().map(|d| duration(*d)).collect(),
                })),
            });
        }
        None => {}
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 26: a termination drops only the caller's own streams: another peer, or
    /// another user on the same peer, that names the client's id drops nothing.
    #[test]
    fn a_termination_drops_only_the_callers_own_streams() {
        use crate::service::principal::Identity;
        let sessions = Sessions::default();
        let (tx, _rx) = mpsc::channel(1);
        let at = |port: u16| Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        let alice = |port| {
            let identity = Identity::User {
                name: "alice".into(),
                since_ms: 1,
            };
            Principal::grpc(identity, at(port), Some("victim".into()))
        };
        sessions.add(Session {
            client_id: "victim".into(),
            who: alice(5000),
            settings: pb::Settings::default(),
            topics: Vec::new(),
            outbound: tx,
            link: None,
        });
        assert_eq!(sessions.remove_client("victim", &alice(6000)), 0);
        let mallory = Principal::grpc(Identity::Anonymous, at(5000), Some("victim".into()));
        assert_eq!(sessions.remove_client("victim", &mallory), 0);
        assert!(sessions.has_client("victim"));
        assert_eq!(sessions.remove_client("victim", &alice(5000)), 1);
        assert!(!sessions.has_client("victim"));
    }

    /// Issue 25, item 15: the cap is checked where the stream is added, so opens racing
    /// on several threads never pass it (the count and the insert were two steps).
    #[test]
    fn concurrent_opens_never_pass_the_cap() {
        let sessions = Arc::new(Sessions::default());
        let (tx, _rx) = mpsc::channel(1);
        let session = move || Session {
            client_id: "c".into(),
            who: Principal::grpc(
                crate::service::principal::Identity::Anonymous,
                None,
                Some("c".into()),
            ),
            settings: pb::Settings::default(),
            topics: Vec::new(),
            outbound: tx.clone(),
            link: None,
        };
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (sessions, session) = (sessions.clone(), session.clone());
                std::thread::spawn(move || {
                    (0..MAX_SESSIONS / 2)
                        .filter(|_| sessions.add(session()).is_some())
                        .count()
                })
            })
            .collect();
        let added: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(added, MAX_SESSIONS);
        assert_eq!(sessions.open.lock().unwrap().len(), MAX_SESSIONS);
    }
}
