//! Who is connected to the Remoting face: each client's heartbeats (its client id, the
//! producer groups it answers check-backs for, the consumer groups it is a member of
//! with their subscriptions), kept until the client says goodbye, its connection
//! closes, or it is silent for [`EXPIRY`].
//!
//! A rebalance is the clients' own: each lists the group's members
//! (GET_CONSUMER_LIST_BY_GROUP) and takes its share of the queues, so the list must
//! hold exactly the ids the members sent, the caller's own included. When a group's
//! members change, each member is told at once (NOTIFY_CONSUMER_IDS_CHANGED), as
//! RocketMQ's broker does; without that the clients look every 20 s.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::Endpoint;
use super::codes;
use super::connection::Conn;
use super::frame::Command;

/// A client silent this long is gone (RocketMQ's `channelExpiredTimeout`).
pub const EXPIRY: Duration = Duration::from_secs(120);

/// Most consumer groups one heartbeat may name, and subscriptions per group.
pub const MAX_GROUPS_PER_CLIENT: usize = 256;

/// How a member consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// The group shares the messages (RocketMQ's default).
    Clustering,
    /// Every member receives every message.
    Broadcasting,
}

/// A member's subscription to one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// `*`, or tags joined by `||`.
    pub expression: String,
    /// `TAG` or `SQL92`.
    pub kind: String,
}

/// A consumer group member.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its connection (the latest it sent a heartbeat on).
    pub conn: Weak<Conn>,
    /// Its connection's id.
    pub conn_id: u64,
    /// Broker clock of its last heartbeat.
    pub seen_ms: u64,
    /// Where it connects from, in its language and version (shown to operators).
    pub addr: std::net::SocketAddr,
    pub language: String,
    pub version: i32,
    /// Its `consumeFromWhere`, as it said it.
    pub from_where: String,
    pub model: Model,
    /// `CONSUME_PASSIVELY` (push), `CONSUME_ACTIVELY` (pull) or `CONSUME_POP`
    /// (shown to operators: mqadmin's consumerConnection).
    pub consume_type: String,
    /// Topic → subscription.
    pub subscriptions: BTreeMap<String, Subscription>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Group → client id → member.
    groups: HashMap<String, BTreeMap<String, Member>>,
}

/// The registry.
#[derive(Debug, Default)]
pub struct Clients {
    inner: Mutex<Inner>,
}

/// A heartbeat's consumer group, as the client sent it.
#[derive(Debug, Clone)]
pub struct GroupBeat {
    pub group: String,
    pub member: Member,
}

/// What a heartbeat body says.
#[derive(Debug, Clone, Default)]
pub struct Beat {
    pub client_id: String,
    pub producer_groups: Vec<String>,
    pub consumers: Vec<GroupBeat>,
}

fn text<'a>(v: &'a serde_json::Value, name: &str) -> &'a str {
    v.get(name).and_then(|s| s.as_str()).unwrap_or_default()
}

/// Reads a heartbeat body (Java's and Go's forms).
///
/// # Errors
/// A sentence for the client.
pub fn parse(req: &super::frame::Command, conn: &Arc<Conn>, now_ms: u64) -> Result<Beat, String> {
    let body = &req.body;
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("heartbeat body does not parse: {e}"))?;
    let client_id = text(&v, "clientID").to_string();
    if client_id.is_empty() || client_id.len() > 256 {
        return Err("a heartbeat needs a clientID of at most 256 bytes".into());
    }
    let list = |name: &str| {
        v.get(name)
            .and_then(|s| s.as_array())
            .cloned()
            .unwrap_or_default()
    };
    let producer_groups: Vec<String> = list("producerDataSet")
        .iter()
        .map(|p| text(p, "groupName").to_string())
        .filter(|g| !g.is_empty())
        .collect();
    let consumer_data = list("consumerDataSet");
    if consumer_data.len() > MAX_GROUPS_PER_CLIENT || producer_groups.len() > MAX_GROUPS_PER_CLIENT
    {
        return Err(format!(
            "a heartbeat names at most {MAX_GROUPS_PER_CLIENT} groups of each kind"
        ));
    }
    let mut consumers = Vec::new();
    for c in &consumer_data {
        let group = text(c, "groupName").to_string();
        let subs = c
            .get("subscriptionDataSet")
            .and_then(|s| s.as_array())
            .cloned()
            .unwrap_or_default();
        if subs.len() > MAX_GROUPS_PER_CLIENT {
            return Err(format!(
                "group {group:?} has more than {MAX_GROUPS_PER_CLIENT} subscriptions"
            ));
        }
        let subscriptions = subs
            .iter()
            .map(|s| {
                let expression = match text(s, "subString") {
                    "" => "*".to_string(),
                    e => e.to_string(),
                };
                let kind = match text(s, "expressionType") {
                    "" => "TAG".to_string(),
                    k => k.to_string(),
                };
                (
                    text(s, "topic").to_string(),
                    Subscription { expression, kind },
                )
            })
            .collect();
        let member = Member {
            conn: Arc::downgrade(conn),
            conn_id: conn.id,
            seen_ms: now_ms,
            addr: conn.peer,
            language: req.language.clone(),
            version: req.version,
            from_where: text(c, "consumeFromWhere").to_string(),
            model: if text(c, "messageModel") == "BROADCASTING" {
                Model::Broadcasting
            } else {
                Model::Clustering
            },
            consume_type: text(c, "consumeType").to_string(),
            subscriptions,
        };
        consumers.push(GroupBeat { group, member });
    }
    Ok(Beat {
        client_id,
        producer_groups,
        consumers,
    })
}

impl Clients {
    /// Takes a heartbeat's consumer groups; answers the groups whose member list
    /// changed (their members are to be told).
    pub fn beat(&self, client_id: &str, consumers: Vec<GroupBeat>) -> Vec<String> {
        let mut inner = self.inner.lock().expect("clients lock");
        let mut changed = Vec::new();
        for GroupBeat { group, member } in consumers {
            let members = inner.groups.entry(group.clone()).or_default();
            let new = members.insert(client_id.to_string(), member).is_none();
            if new {
                changed.push(group);
            }
        }
        changed
    }

    /// The client left (UNREGISTER_CLIENT), from `group` or from every group.
    pub fn leave(&self, client_id: &str, group: Option<&str>) -> Vec<String> {
        let mut inner = self.inner.lock().expect("clients lock");
        let mut changed = Vec::new();
        inner.groups.retain(|name, members| {
            if group.is_none_or(|g| g == name) && members.remove(client_id).is_some() {
                changed.push(name.clone());
            }
            !members.is_empty()
        });
        changed
    }

    /// Connection `conn_id` closed: its members are gone.
    pub fn closed(&self, conn_id: u64) -> Vec<String> {
        self.drop_where(|m| m.conn_id == conn_id)
    }

    fn drop_where(&self, gone: impl Fn(&Member) -> bool) -> Vec<String> {
        let mut inner = self.inner.lock().expect("clients lock");
        let mut changed = Vec::new();
        inner.groups.retain(|name, members| {
            let before = members.len();
            members.retain(|_, m| !gone(m));
            if members.len() != before {
                changed.push(name.clone());
            }
            !members.is_empty()
        });
        changed
    }

    /// A group's member ids, sorted.
    pub fn members(&self, group: &str) -> Vec<String> {
        let inner = self.inner.lock().expect("clients lock");
        inner
            .groups
            .get(group)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// A member's subscription to `topic` in `group`: what its heartbeat said (a pull
    /// without its own expression filters by it).
    pub fn subscription(&self, group: &str, topic: &str) -> Option<(Member, Subscription)> {
        let inner = self.inner.lock().expect("clients lock");
        inner
            .groups
            .get(group)?
            .values()
            .find_map(|m| m.subscriptions.get(topic).map(|s| (m.clone(), s.clone())))
    }

    /// A group's members, by client id.
    pub fn group(&self, group: &str) -> BTreeMap<String, Member> {
        let inner = self.inner.lock().expect("clients lock");
        inner.groups.get(group).cloned().unwrap_or_default()
    }

    /// Whether client `client_id` is a member of some group over an open connection.
    pub fn is_connected(&self, client_id: &str) -> bool {
        let inner = self.inner.lock().expect("clients lock");
        inner.groups.values().any(|members| {
            members
                .get(client_id)
                .is_some_and(|m| m.conn.upgrade().is_some())
        })
    }

    /// Tells every member of `groups` that the group's members changed (one-way).
    pub fn notify(&self, groups: &[String]) {
        let inner = self.inner.lock().expect("clients lock");
        for group in groups {
            let Some(members) = inner.groups.get(group) else {
                continue;
            };
            for member in members.values() {
                if let Some(conn) = member.conn.upgrade() {
                    conn.push(
                        Command::oneway(codes::NOTIFY_CONSUMER_IDS_CHANGED, 0, conn.encoding())
                            .with("consumerGroup", group),
                    );
                }
            }
        }
    }
}

/// Forgets members silent for [`EXPIRY`], every 10 s, until the face stops.
pub async fn expire(endpoint: Arc<Endpoint>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = endpoint.stop.cancelled() => return,
        }
        let now = txmq_protocol::now_ms();
        let horizon = now.saturating_sub(EXPIRY.as_millis() as u64);
        let changed = endpoint.clients.drop_where(|m| m.seen_ms < horizon);
        if !changed.is_empty() {
            endpoint.clients.notify(&changed);
        }
    }
}
