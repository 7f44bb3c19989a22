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

/// Longest subscription expression taken.
pub const MAX_EXPRESSION: usize = 4096;

/// Most group memberships the registry keeps, over every client (I9): beyond, a new
/// member is not taken until others leave or expire.
pub const MAX_MEMBERS: usize = 100_000;

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
    /// Memberships over every group.
    count: usize,
    /// Warned that the registry was full (once until it has room again).
    warned: bool,
}

impl Inner {
    /// Drops the members of the groups `scope` picks that `gone` picks; answers the
    /// groups that changed.
    fn drop_where(
        &mut self,
        scope: impl Fn(&str) -> bool,
        gone: impl Fn(&str, &Member) -> bool,
    ) -> Vec<String> {
        let mut changed = Vec::new();
        let mut dropped = 0;
        self.groups.retain(|name, members| {
            if !scope(name) {
                return true;
            }
            let before = members.len();
            members.retain(|id, m| !gone(id, m));
            if members.len() != before {
                dropped += before - members.len();
                changed.push(name.clone());
            }
            !members.is_empty()
        });
        self.count -= dropped;
        changed
    }
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
        if crate::service::name("group", &group).is_err() {
            // RocketMQ takes names txmq does not (a namespace's `%`): not a member.
            continue;
        }
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
        let subscriptions: BTreeMap<String, Subscription> = subs
            .iter()
            .filter(|s| {
                let topic = text(s, "topic");
                text(s, "subString").len() <= MAX_EXPRESSION
                    && (crate::service::name("topic", topic).is_ok()
                        // Its own retry topic; any group's dead letters (an operator's
                        // reader; what it may read is checked when it pulls).
                        || super::route::group_topic(topic)
                            .is_some_and(|(kind, g)| g == group || kind == "%DLQ%"))
            })
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
        // A member consumes some topic of its own (not only its retry topic).
        if subscriptions
            .keys()
            .all(|t| matches!(super::route::group_topic(t), Some(("%RETRY%", _))))
        {
            continue;
        }
        let short = |k: &str| text(c, k).chars().take(64).collect::<String>();
        let member = Member {
            conn: Arc::downgrade(conn),
            conn_id: conn.id,
            seen_ms: now_ms,
            addr: conn.peer,
            language: req.language.clone(),
            version: req.version,
            from_where: short("consumeFromWhere"),
            model: if text(c, "messageModel") == "BROADCASTING" {
                Model::Broadcasting
            } else {
                Model::Clustering
            },
            consume_type: short("consumeType"),
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
    /// Takes a heartbeat's consumer groups from connection `conn_id`; answers the
    /// groups whose member list changed (their members are to be told). A connection
    /// is one client: what it held under another client id, or in groups this heartbeat
    /// no longer names, ends.
    pub fn beat(&self, client_id: &str, conn_id: u64, consumers: Vec<GroupBeat>) -> Vec<String> {
        let mut inner = self.inner.lock().expect("clients lock");
        let named: std::collections::HashSet<String> =
            consumers.iter().map(|g| g.group.clone()).collect();
        let mut changed =
            inner.drop_where(|_| true, |id, m| m.conn_id == conn_id && (id != client_id));
        changed.extend(inner.drop_where(|g| !named.contains(g), |id, _| id == client_id));
        for GroupBeat { group, member } in consumers {
            let present = inner
                .groups
                .get(&group)
                .is_some_and(|m| m.contains_key(client_id));
            if !present && inner.count >= MAX_MEMBERS {
                if !inner.warned {
                    inner.warned = true;
                    tracing::warn!("{MAX_MEMBERS} Remoting group memberships held: new ones wait");
                }
                continue;
            }
            inner.warned = false;
            let members = inner.groups.entry(group.clone()).or_default();
            if members.insert(client_id.to_string(), member).is_none() {
                inner.count += 1;
                changed.push(group);
            }
        }
        changed.sort();
        changed.dedup();
        changed
    }

    /// Client `client_id`, on connection `conn_id`, left (UNREGISTER_CLIENT), from
    /// `group` or from every group. Only its own connection can say so.
    pub fn leave(&self, client_id: &str, conn_id: u64, group: Option<&str>) -> Vec<String> {
        let mut inner = self.inner.lock().expect("clients lock");
        inner.drop_where(
            |name| group.is_none_or(|g| g == name),
            |id, m| id == client_id && m.conn_id == conn_id,
        )
    }

    /// Connection `conn_id` closed: its members are gone.
    pub fn closed(&self, conn_id: u64) -> Vec<String> {
        let mut inner = self.inner.lock().expect("clients lock");
        inner.drop_where(|_| true, |_, m| m.conn_id == conn_id)
    }

    /// Members silent since before `horizon_ms` are gone.
    fn expired(&self, horizon_ms: u64) -> Vec<String> {
        let mut inner = self.inner.lock().expect("clients lock");
        inner.drop_where(|_| true, |_, m| m.seen_ms < horizon_ms)
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

    /// Client `client`'s subscription to `topic` in `group` (else another member's):
    /// what its heartbeat said (a pull without its own expression filters by it).
    pub fn subscription(
        &self,
        group: &str,
        topic: &str,
        client: &str,
    ) -> Option<(Member, Subscription)> {
        let inner = self.inner.lock().expect("clients lock");
        let members = inner.groups.get(group)?;
        if let Some(m) = members.get(client)
            && let Some(s) = m.subscriptions.get(topic)
        {
            return Some((m.clone(), s.clone()));
        }
        members
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
        let changed = endpoint.clients.expired(horizon);
        if !changed.is_empty() {
            endpoint.clients.notify(&changed);
        }
    }
}
