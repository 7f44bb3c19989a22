//! Routes and liveness: one broker with one queue per topic, at the address the client
//! dialed (in a broker group, at the leader's gRPC endpoint); heartbeats; a client's
//! goodbye.

use tonic::Request;

use super::{Endpoint, client_id, pb, status};

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
    advertised(&addr.to_string())
}

/// `HOST:PORT` (an IPv4 or `[IPv6]` address, or a name) as the endpoints a route names.
fn advertised(host_port: &str) -> pb::Endpoints {
    let (host, port) = host_port.rsplit_once(':').unwrap_or((host_port, "8081"));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let scheme = match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => pb::AddressScheme::IPv4,
        Ok(std::net::IpAddr::V6(_)) => pb::AddressScheme::IPv6,
        Err(_) => pb::AddressScheme::DomainName,
    };
    pb::Endpoints {
        scheme: scheme as i32,
        addresses: vec![pb::Address {
            host: host.to_string(),
            port: port.parse().unwrap_or(8081),
        }],
    }
}

/// In a broker group, the gRPC endpoint of the node that leads: this one's own
/// advertised address while it leads, else the leader's as it tells it. A client that
/// dialed several nodes (`a;b;c`) is thus sent to the one that serves, not to whichever
/// its channel picks. `None` for a single broker.
async fn group_leader(endpoint: &Endpoint) -> Option<Result<pb::Endpoints, pb::Status>> {
    let node = endpoint.live.group.get()?;
    let not_available = |why: &str| status::of(pb::Code::HaNotAvailable, why);
    if endpoint.live.get().is_some() {
        return Some(
            node.addresses()
                .grpc
                .as_deref()
                .map(advertised)
                .ok_or_else(|| not_available("this node serves no gRPC endpoint")),
        );
    }
    Some(match node.leader_info().await {
        Some(leader) => leader.grpc_addr.as_deref().map(advertised).ok_or_else(|| {
            not_available(
                "the group's leader serves no gRPC endpoint (start it with --grpc-listen)",
            )
        }),
        None => Err(not_available(
            "the broker group has no leader at the moment (an election is under way); retry",
        )),
    })
}

/// A topic's one queue: readable and writable, on this broker (in a group, on its
/// leader). A topic that does not exist is created where topics are created on demand
/// (a follower leaves that to the leader, which checks the topic when it is sent to).
async fn queue(
    endpoint: &Endpoint,
    topic: Option<pb::Resource>,
    dialed: Option<pb::Endpoints>,
) -> Result<pb::MessageQueue, pb::Status> {
    let Some(topic) = topic else {
        return Err(status::of(pb::Code::IllegalTopic, "a topic is needed"));
    };
    crate::cmd::name("topic", &topic.name).map_err(|e| status::of_error(&e))?;
    let at = match group_leader(endpoint).await {
        Some(leader) => leader?,
        None => endpoints(endpoint, dialed),
    };
    match endpoint.shared() {
        Ok(shared) => {
            shared
                .groups
                .topic(&topic.name)
                .await
                .map_err(|e| status::of_error(&e))?;
        }
        // A follower: the leader checks the topic.
        Err(_) if endpoint.live.group.get().is_some() => {}
        Err(s) => return Err(s),
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
    req: pb::QueryRouteRequest,
) -> pb::QueryRouteResponse {
    match queue(endpoint, req.topic, req.endpoints).await {
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
    req: pb::QueryAssignmentRequest,
) -> pb::QueryAssignmentResponse {
    let group = req.group.map(|g| g.name).unwrap_or_default();
    if let Err(e) = crate::cmd::name("group", &group) {
        return pb::QueryAssignmentResponse {
            status: Some(status::of(pb::Code::IllegalConsumerGroup, e.to_string())),
            assignments: Vec::new(),
        };
    }
    match queue(endpoint, req.topic, req.endpoints).await {
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
        endpoint.sessions.remove_client(&client);
        tracing::debug!(%client, "grpc client terminated");
    }
    pb::NotifyClientTerminationResponse {
        status: Some(status::ok()),
    }
}
