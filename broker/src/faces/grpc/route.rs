//! Routes and liveness: one broker with one queue per topic, at the address the client
//! dialed (in a broker group, at the leader's gRPC endpoint); heartbeats; a client's
//! goodbye.

use tonic::Request;

use super::{Endpoint, client_id, pb, status};
use crate::replication::node::Node;
use crate::service::{Principal, admin, cluster};

/// Every message type a topic takes here (a txmq topic is not typed).
const ACCEPTS: [pb::MessageType; 4] = [
    pb::MessageType::Normal,
    pb::MessageType::Fifo,
    pb::MessageType::Delay,
    pb::MessageType::Transaction,
];

/// Where clients reach this broker: the endpoints they dialed (so a route through a
/// proxy or a name stays valid), else the address it listens on.
fn endpoints(endpoint: &Endpoint, dialed: Option<pb::Endpoints>) -> pb::Endpoints {
    if let Some(e) = dialed
        .filter(|e| !e.addresses.is_empty() && e.scheme != pb::AddressScheme::Unspecified as i32)
    {
        return e;
    }
    let addr = endpoint
        .addr
        .unwrap_or_else(|| ([127, 0, 0, 1], 8081).into());
    let (host, port) = (addr.ip().to_string(), addr.port());
    endpoints_of(&host, port, addr.is_ipv4())
}

fn endpoints_of(host: &str, port: u16, ipv4: bool) -> pb::Endpoints {
    let scheme = match host.parse::<std::net::IpAddr>() {
        Ok(_) if ipv4 => pb::AddressScheme::IPv4,
        Ok(_) => pb::AddressScheme::IPv6,
        Err(_) => pb::AddressScheme::DomainName,
    };
    pb::Endpoints {
        scheme: scheme as i32,
        addresses: vec![pb::Address {
            host: host.to_string(),
            port: i32::from(port),
        }],
    }
}

/// A node's advertised gRPC address (`IPv4:PORT`, `[IPv6]:PORT` or `NAME:PORT`) as the
/// endpoints a route names; `None` when it is not one.
fn advertised(host_port: &str) -> Option<pb::Endpoints> {
    if let Ok(addr) = host_port.parse::<std::net::SocketAddr>() {
        return Some(endpoints_of(
            &addr.ip().to_string(),
            addr.port(),
            addr.is_ipv4(),
        ));
    }
    let (host, port) = host_port.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    crate::config::is_host_name(host).then(|| endpoints_of(host, port, false))
}

/// In a broker group, the gRPC endpoint of the node that leads: this one's own
/// advertised address while it serves (`serving`), else the leader's as it tells it.
/// A client that dialed any node is thus sent to the one that serves.
async fn group_leader(node: &Node, serving: bool) -> Result<pb::Endpoints, pb::Status> {
    let not_available = |why: String| status::of(pb::Code::HaNotAvailable, why);
    let grpc = if serving {
        node.addresses().grpc.clone()
    } else {
        let Some(leader) = node.leader_info().await else {
            return Err(not_available(
                "the broker group has no leader at the moment (an election is under way); \
                 retry"
                    .into(),
            ));
        };
        leader.grpc_addr
    };
    let Some(grpc) = grpc else {
        return Err(not_available(
            "the group's leader serves no gRPC endpoint (start it with --grpc-listen)".into(),
        ));
    };
    advertised(&grpc).ok_or_else(|| {
        not_available(format!(
            "the group's leader advertises {grpc:?}, which is no HOST:PORT"
        ))
    })
}

/// A topic's one queue: readable and writable, on this broker (in a group, on its
/// leader). A topic that does not exist is created where topics are created on demand;
/// a follower reads whether it exists from its replicated state, and leaves creating it
/// to the leader.
async fn queue(
    endpoint: &Endpoint,
    who: &Principal,
    topic: Option<pb::Resource>,
    dialed: Option<pb::Endpoints>,
) -> Result<pb::MessageQueue, pb::Status> {
    let Some(topic) = topic else {
        return Err(status::of(pb::Code::IllegalTopic, "a topic is needed"));
    };
    crate::service::name("topic", &topic.name).map_err(|e| status::of_error(&e))?;
    // Read once: whether this node serves decides both where the route points and who
    // checks the topic.
    let serving = endpoint.live.get().filter(|s| s.serving.holds());
    let group = endpoint.live.group.get();
    let at = match group {
        Some(node) => group_leader(node, serving.is_some()).await?,
        None => endpoints(endpoint, dialed),
    };
    match (serving, group) {
        (Some(shared), _) => {
            admin::route_topic(&shared, who, &topic.name)
                .await
                .map_err(|e| status::of_error(&e))?;
        }
        (None, Some(node)) if !endpoint.config.auto_create_topics => {
            match cluster::follower_has_topic(node, topic.name.clone()).await {
                Some(Ok(true)) => {}
                Some(Ok(false)) => {
                    return Err(status::of_error(&crate::error::Error::TopicNotFound(
                        topic.name.clone(),
                    )));
                }
                Some(Err(e)) => return Err(status::of_error(&e)),
                None => return Err(endpoint.not_serving()),
            }
        }
        (None, Some(_)) => {}
        (None, None) => return Err(endpoint.not_serving()),
    }
    Ok(pb::MessageQueue {
        topic: Some(topic),
        id: 0,
        permission: pb::Permission::ReadWrite as i32,
        broker: Some(pb::Broker {
            name: "txmq".into(),
            id: 0,
            endpoints: Some(at),
        }),
        accept_message_types: ACCEPTS.iter().map(|t| *t as i32).collect(),
    })
}

/// The route of a topic: its one queue.
pub async fn query_route(
    endpoint: &Endpoint,
    who: &Principal,
    req: pb::QueryRouteRequest,
) -> pb::QueryRouteResponse {
    match queue(endpoint, who, req.topic, req.endpoints).await {
        Ok(q) => pb::QueryRouteResponse {
            status: Some(status::ok()),
            message_queues: vec![q],
        },
        Err(s) => pb::QueryRouteResponse {
            status: Some(s),
            message_queues: Vec::new(),
        },
    }
}

/// A push consumer's assignment: the topic's one queue (every consumer of a group reads
/// it; the group's queue shares the messages out).
pub async fn query_assignment(
    endpoint: &Endpoint,
    who: &Principal,
    req: pb::QueryAssignmentRequest,
) -> pb::QueryAssignmentResponse {
    let group = req.group.map(|g| g.name).unwrap_or_default();
    if let Err(e) = crate::service::name("group", &group) {
        return pb::QueryAssignmentResponse {
            status: Some(status::of(pb::Code::IllegalConsumerGroup, e.to_string())),
            assignments: Vec::new(),
        };
    }
    match queue(endpoint, who, req.topic, req.endpoints).await {
        Ok(q) => pb::QueryAssignmentResponse {
            status: Some(status::ok()),
            assignments: vec![pb::Assignment {
                message_queue: Some(q),
            }],
        },
        Err(s) => pb::QueryAssignmentResponse {
            status: Some(s),
            assignments: Vec::new(),
        },
    }
}

/// A heartbeat: the session lives on (sessions are the Telemetry streams).
pub fn heartbeat(
    _endpoint: &Endpoint,
    request: Request<pb::HeartbeatRequest>,
) -> pb::HeartbeatResponse {
    let status = match client_id(&request) {
        Some(_) => status::ok(),
        None => status::of(pb::Code::ClientIdRequired, "x-mq-client-id is required"),
    };
    pb::HeartbeatResponse {
        status: Some(status),
    }
}

/// A client says goodbye: its streams go.
pub fn terminate(
    endpoint: &Endpoint,
    request: Request<pb::NotifyClientTerminationRequest>,
) -> pb::NotifyClientTerminationResponse {
    if let Some(client) = client_id(&request) {
        let who = super::principal(&request);
        let dropped = endpoint.sessions.remove_client(&client, &who);
        tracing::debug!(%client, dropped, "grpc client terminated");
    }
    pb::NotifyClientTerminationResponse {
        status: Some(status::ok()),
    }
}
