//! `--protocol grpc`: send, txn and e2e through the RocketMQ 5 gRPC face, as the 5.x
//! clients use it: SendMessage with the system properties they set (a message id, the
//! born time and host), a TRANSACTION message then EndTransaction, and consumers that
//! long-poll ReceiveMessage and ack each batch with one AckMessage.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tonic::Request;
use tonic::transport::Channel;

use crate::scenarios::{histogram, merged, now_us, payload, share};
use crate::{Args, Report};

#[allow(clippy::all, clippy::pedantic, missing_docs)]
mod pb {
    tonic::include_proto!("apache.rocketmq.v2");
}

type Client = pb::messaging_service_client::MessagingServiceClient<Channel>;

/// Receives each consumer keeps in flight.
const RECEIVES: usize = 4;

async fn connect(addr: &str) -> anyhow::Result<Client> {
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .with_context(|| format!("connecting to the gRPC face at {addr}"))?;
    Ok(pb::messaging_service_client::MessagingServiceClient::new(
        channel,
    ))
}

/// A request with the headers a 5.x client sends.
fn request<T>(client_id: &str, body: T) -> Request<T> {
    let mut r = Request::new(body);
    let m = r.metadata_mut();
    m.insert("x-mq-client-id", client_id.parse().expect("an ASCII id"));
    m.insert("x-mq-language", "JAVA".parse().expect("ASCII"));
    m.insert("x-mq-protocol", "v2".parse().expect("ASCII"));
    r.set_timeout(Duration::from_secs(30));
    r
}

fn resource(name: &str) -> Option<pb::Resource> {
    Some(pb::Resource {
        name: name.to_string(),
        ..Default::default()
    })
}

fn ok(status: Option<pb::Status>, what: &str) -> anyhow::Result<()> {
    let s = status.unwrap_or_default();
    anyhow::ensure!(
        s.code == pb::Code::Ok as i32,
        "{what}: code {} ({})",
        s.code,
        s.message
    );
    Ok(())
}

/// A message as the Java client builds it.
fn message(
    topic: &str,
    id: String,
    body: Vec<u8>,
    key: Option<String>,
    kind: pb::MessageType,
) -> pb::Message {
    let born = now_us();
    pb::Message {
        topic: resource(topic),
        system_properties: Some(pb::SystemProperties {
            message_id: id,
            keys: key.into_iter().collect(),
            body_encoding: pb::Encoding::Identity as i32,
            message_type: kind as i32,
            born_timestamp: Some(prost_types::Timestamp {
                seconds: (born / 1_000_000) as i64,
                nanos: ((born % 1_000_000) * 1000) as i32,
            }),
            born_host: "127.0.0.1".into(),
            ..Default::default()
        }),
        body,
        ..Default::default()
    }
}

/// Sends one message; answers its entry.
async fn send_one(
    client: &mut Client,
    client_id: &str,
    m: pb::Message,
) -> anyhow::Result<pb::SendResultEntry> {
    let r = client
        .send_message(request(
            client_id,
            pb::SendMessageRequest { messages: vec![m] },
        ))
        .await?
        .into_inner();
    ok(r.status, "send")?;
    let entry = r.entries.into_iter().next().context("no send entry")?;
    ok(entry.status.clone(), "send entry")?;
    Ok(entry)
}

/// The producers' loop: `--messages` over `--producers` clients, `--window` in flight
/// each; `end` commits a transaction after its message (`txn`).
async fn produce(
    args: &Args,
    addr: &str,
    topic: &str,
    stamp: bool,
    txn: bool,
) -> anyhow::Result<Report> {
    let mut clients = Vec::new();
    for _ in 0..args.producers {
        clients.push(connect(addr).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let n = share(args.messages, args.producers, i);
        let (size, window, keyed, topic) =
            (args.size, args.window.max(1), args.keyed, topic.to_string());
        let client_id = format!("127.0.0.1@bench-producer-{i}");
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut in_flight = FuturesUnordered::new();
            let mut sent = 0;
            while sent < n || !in_flight.is_empty() {
                while sent < n && in_flight.len() < window {
                    let (mut client, topic, client_id) =
                        (client.clone(), topic.clone(), client_id.clone());
                    let id = format!("{:016X}{i:08X}{sent:08X}", now_us());
                    let key = keyed.then(|| format!("order-{i}-{sent}"));
                    in_flight.push(async move {
                        let t = Instant::now();
                        let kind = if txn {
                            pb::MessageType::Transaction
                        } else {
                            pb::MessageType::Normal
                        };
                        let m = message(&topic, id, payload(size, stamp).to_vec(), key, kind);
                        let entry = send_one(&mut client, &client_id, m).await?;
                        if txn {
                            let end = pb::EndTransactionRequest {
                                topic: resource(&topic),
                                message_id: entry.message_id,
                                transaction_id: entry.transaction_id,
                                resolution: pb::TransactionResolution::Commit as i32,
                                source: pb::TransactionSource::SourceClient as i32,
                                ..Default::default()
                            };
                            let r = client
                                .end_transaction(request(&client_id, end))
                                .await?
                                .into_inner();
                            ok(r.status, "end transaction")?;
                        }
                        anyhow::Ok(t.elapsed())
                    });
                    sent += 1;
                }
                if let Some(r) = in_flight.next().await {
                    hist.saturating_record(r?.as_micros() as u64);
                }
            }
            anyhow::Ok(hist)
        }));
    }
    let latency = merged(tasks).await?;
    Ok(Report {
        done: args.messages,
        elapsed: started.elapsed(),
        latency,
        latency_of: if txn {
            "TRANSACTION message + EndTransaction commit, until both are answered"
        } else {
            "send until durable reply"
        },
        extra: Default::default(),
    })
}

/// `send`.
pub async fn send(args: &Args, addr: &str, topic: &str, stamp: bool) -> anyhow::Result<Report> {
    produce(args, addr, topic, stamp, false).await
}

/// `txn`.
pub async fn txn(args: &Args, addr: &str) -> anyhow::Result<Report> {
    produce(args, addr, "bench-txn", false, true).await
}

/// One long-polling receive of up to `batch`: the deliveries' send stamps, acked.
async fn receive(
    client: &mut Client,
    client_id: &str,
    topic: &str,
    batch: i32,
) -> anyhow::Result<Vec<u64>> {
    let req = pb::ReceiveMessageRequest {
        group: resource("bench"),
        message_queue: Some(pb::MessageQueue {
            topic: resource(topic),
            id: 0,
            permission: pb::Permission::ReadWrite as i32,
            ..Default::default()
        }),
        filter_expression: Some(pb::FilterExpression {
            r#type: pb::FilterType::Tag as i32,
            expression: "*".into(),
        }),
        batch_size: batch,
        invisible_duration: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        auto_renew: false,
        long_polling_timeout: Some(prost_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
        ..Default::default()
    };
    let mut stream = client
        .receive_message(request(client_id, req))
        .await?
        .into_inner();
    let mut stamps = Vec::new();
    let mut entries = Vec::new();
    while let Some(r) = stream.next().await {
        match r?.content {
            Some(pb::receive_message_response::Content::Message(m)) => {
                anyhow::ensure!(m.body.len() >= 8, "a body shorter than its stamp");
                stamps.push(u64::from_be_bytes(m.body[..8].try_into()?));
                let sys = m.system_properties.unwrap_or_default();
                entries.push(pb::AckMessageEntry {
                    message_id: sys.message_id,
                    receipt_handle: sys.receipt_handle.unwrap_or_default(),
                    ..Default::default()
                });
            }
            Some(pb::receive_message_response::Content::Status(s))
                if s.code != pb::Code::Ok as i32 && s.code != pb::Code::MessageNotFound as i32 =>
            {
                anyhow::bail!("receive: code {} ({})", s.code, s.message);
            }
            _ => {}
        }
    }
    if !entries.is_empty() {
        let ack = pb::AckMessageRequest {
            group: resource("bench"),
            topic: resource(topic),
            entries,
        };
        let r = client
            .ack_message(request(client_id, ack))
            .await?
            .into_inner();
        ok(r.status, "ack")?;
        for e in r.entries {
            ok(e.status, "ack entry")?;
        }
    }
    Ok(stamps)
}

/// `e2e`: consumers long-polling while the producers send.
pub async fn e2e(args: &Args, addr: &str) -> anyhow::Result<Report> {
    let topic = "bench-e2e";
    let received = Arc::new(AtomicU64::new(0));
    let total = args.messages;
    let batch = i32::try_from(args.window.clamp(1, 32)).unwrap_or(32);
    let mut tasks = Vec::new();
    for c in 0..args.consumers {
        let client = connect(addr).await?;
        for _ in 0..RECEIVES {
            let (mut client, received) = (client.clone(), received.clone());
            let client_id = format!("127.0.0.1@bench-consumer-{c}");
            tasks.push(tokio::spawn(async move {
                let mut hist = histogram();
                while received.load(Ordering::Relaxed) < total {
                    let got = tokio::time::timeout(
                        Duration::from_secs(30),
                        receive(&mut client, &client_id, topic, batch),
                    )
                    .await
                    .context("a receive stalled")??;
                    for sent in got {
                        hist.saturating_record(now_us().saturating_sub(sent));
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(hist)
            }));
        }
    }
    let started = Instant::now();
    send(args, addr, topic, true).await?;
    let latency = merged(tasks).await?;
    Ok(Report {
        done: total,
        elapsed: started.elapsed(),
        latency,
        latency_of: "send until received by a consumer",
        extra: Default::default(),
    })
}
