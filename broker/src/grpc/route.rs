//! Routes and liveness: one broker with one queue per topic, at the address the client
//! dialed; heartbeats; a client's goodbye.

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
    let scheme = if addr.is_ipv4() {
        pb::AddressScheme::IPv4
    } else {
        pb::AddressScheme::IPv6
    };
    pb::Endpoints {
        scheme: scheme as i32,
        addresses: vec![pb::Address {
            host: addr.ip().to_string(),
            port: i32::from(addr.port()),
        }],
    }
}

/// A topic's one queue: readable and writable, on this broker. A topic that does not
/// exist is created where topics are created on demand.
async fn queue(
    endpoint: &Endpoint,
    topic: Option<pb::Resource>,
    dialed: Option<pb::Endpoints>,
) -> Result<pb::MessageQueue, pb::Status> {
    let shared = endpoint.shared()?;
    let Some(topic) = topic else {
        return Err(status::of(pb::Code::IllegalTopic, "a topic is needed"));
    };
    crate::cmd::name("topic", &topic.name).map_err(|e| status::of_error(&e))?;
    shared
        .groups
        .topic(&topic.name)
        .await
        .map_err(|e| status::of_error(&e))?;
    Ok(pb::MessageQueue {
        topic: Some(topic),
        id: 0,
        permission: pb::Permission::ReadWrite as i32,
        broker: Some(pb::Broker {
            name: "txmq".into(),
            id: 0,
            endpoints: Some(endpoints(endpoint, dialed)),
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
