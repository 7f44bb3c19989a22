//! Driving the broker's dispatch with arbitrary requests (issue 13, item 22): the property
//! the `dispatch` fuzz target checks and `tests/tests/dispatch_corpus.rs` replays.
//!
//! An input is a sequence of chunks, each a little-endian `u16` length and that many
//! bytes; every chunk that decodes as a protobuf `Frame` is sent, after a Hello as a
//! producer. Whatever the frames, the broker must then still answer a Ping on a new
//! connection and store a durable send: no request may crash it, stop its writer, or
//! leave it unable to serve.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use prost::Message;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use txmq_protocol::{Body, Frame, FrameCodec, pb};

/// The topic the liveness check sends to (create it when topics are not auto-created).
pub const ALIVE_TOPIC: &str = "fuzz-alive";

/// Most frames taken from one input.
const MAX_FRAMES: usize = 64;

/// The frames an input stands for.
pub fn frames(input: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut rest = input;
    while rest.len() >= 2 && out.len() < MAX_FRAMES {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
        let chunk = &rest[..len.min(rest.len())];
        rest = &rest[chunk.len()..];
        if let Ok(frame) = Frame::decode(chunk) {
            out.push(frame);
        }
    }
    out
}

/// Encodes frames as an input (for seeds).
pub fn input(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        let bytes = f.encode_to_vec();
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

async fn connect(addr: &str, group: &str) -> Result<Framed<TcpStream, FrameCodec>, String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut framed = Framed::new(s, FrameCodec::default());
    let hello = pb::Hello {
        protocol_version: txmq_protocol::PROTOCOL_VERSION,
        role: pb::Role::Producer as i32,
        producer_group: group.into(),
        ..Default::default()
    };
    framed
        .send(Frame {
            id: 1,
            body: Some(Body::Hello(hello)),
        })
        .await
        .map_err(|e| format!("hello: {e}"))?;
    Ok(framed)
}

/// The answer to request `id`, skipping other frames; `None` if the connection closed.
async fn answer(
    framed: &mut Framed<TcpStream, FrameCodec>,
    id: u64,
) -> Result<Option<pb::Response>, String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), framed.next()).await {
            Err(_) => return Err(format!("no answer to request {id} within 20 s")),
            Ok(None | Some(Err(_))) => return Ok(None),
            Ok(Some(Ok(frame))) => {
                if frame.id == id
                    && let Some(Body::Response(r)) = frame.body
                {
                    return Ok(Some(r));
                }
            }
        }
    }
}

/// Sends the input's frames to the broker at `addr`, then checks it still serves.
///
/// # Errors
/// What the broker failed to do afterwards.
pub async fn drive(addr: &str, input: &[u8]) -> Result<(), String> {
    let mut framed = connect(addr, "fuzz").await?;
    for frame in frames(input) {
        if framed.send(frame).await.is_err() {
            // Closed by the broker (a refusal): allowed.
            break;
        }
    }
    // The connection itself may have been closed for a reason; the broker may not be.
    let ping = u64::MAX - 1;
    if framed
        .send(Frame {
            id: ping,
            body: Some(Body::Ping(pb::PingRequest {})),
        })
        .await
        .is_ok()
    {
        answer(&mut framed, ping).await?;
    }
    drop(framed);
    let mut fresh = connect(addr, "fuzz-check").await?;
    let send = Body::Send(pb::SendRequest {
        messages: vec![pb::Message {
            topic: ALIVE_TOPIC.into(),
            body: b"alive".to_vec().into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    fresh
        .send(Frame {
            id: 2,
            body: Some(send),
        })
        .await
        .map_err(|e| format!("send after the input: {e}"))?;
    match answer(&mut fresh, 2).await? {
        Some(r) if r.code == pb::ErrorCode::Ok as i32 => Ok(()),
        Some(r) => Err(format!("a send after the input was refused: {r:?}")),
        None => Err("the broker closed a fresh connection".into()),
    }
}

/// Seeds for the fuzzer and the replay test: the requests the code review found holes
/// in (items 3, 6 and 8 of issue 13) and their neighbours.
pub fn seeds() -> Vec<Vec<u8>> {
    let frame = |id: u64, body: Body| Frame {
        id,
        body: Some(body),
    };
    let msg = |topic: &str| pb::Message {
        topic: topic.into(),
        body: b"x".to_vec().into(),
        ..Default::default()
    };
    let handle = |group: &str| pb::DeliveryHandle {
        group: group.into(),
        topic: ALIVE_TOPIC.into(),
        offset: u64::MAX,
        lease_id: u64::MAX,
    };
    let txn_send = |topic: &str, delay: u64| pb::SendRequest {
        messages: vec![msg(topic)],
        transactional: true,
        check_delay_ms: delay,
        ..Default::default()
    };
    vec![
        // A transactional send to a missing topic (with auto-creation off), repeatedly.
        input(
            &(2..40)
                .map(|i| frame(i, Body::Send(txn_send("missing", 0))))
                .collect::<Vec<_>>(),
        ),
        input(&[frame(
            2,
            Body::TxnBatch(pb::TxnBatchRequest {
                calls: vec![
                    pb::TxnCall {
                        call: Some(pb::txn_call::Call::Prepare(txn_send("missing", 0)))
                    };
                    50
                ],
            }),
        )]),
        // Acks, nacks and extends naming invented groups.
        input(&[frame(
            2,
            Body::Ack(pb::AckRequest {
                handles: (0..200).map(|i| handle(&format!("g{i}"))).collect(),
            }),
        )]),
        input(&[
            frame(
                2,
                Body::Nack(pb::NackRequest {
                    handle: Some(handle("x")),
                    delay_ms: u64::MAX,
                    use_backoff: false,
                }),
            ),
            frame(
                3,
                Body::Extend(pb::ExtendRequest {
                    handle: Some(handle("x")),
                    lease_ms: u64::MAX,
                }),
            ),
        ]),
        // Durations at the edge.
        input(&[
            frame(2, Body::Send(txn_send(ALIVE_TOPIC, u64::MAX))),
            frame(
                3,
                Body::Subscribe(pb::SubscribeRequest {
                    group: "g".into(),
                    topic: ALIVE_TOPIC.into(),
                    lease_ms: u64::MAX,
                    window: u32::MAX,
                    max_attempts: u32::MAX,
                    ..Default::default()
                }),
            ),
            frame(
                4,
                Body::Subscribe(pb::SubscribeRequest {
                    group: "g".into(),
                    topic: ALIVE_TOPIC.into(),
                    tag_filter: "||".into(),
                    replace_filter: true,
                    ..Default::default()
                }),
            ),
        ]),
        // Check answers nobody asked for, ends of unknown transactions, huge listings.
        input(&[
            frame(
                0,
                Body::CheckReply(pb::CheckReply {
                    txn_id: "0".repeat(32),
                    outcome: 2,
                }),
            ),
            frame(
                7,
                Body::CheckReply(pb::CheckReply {
                    txn_id: "zz".into(),
                    outcome: 99,
                }),
            ),
            frame(
                8,
                Body::EndTxn(pb::EndTxnRequest {
                    txn_id: "F".repeat(32),
                    outcome: 1,
                    operator: true,
                }),
            ),
            frame(
                9,
                Body::ListTxns(pb::ListTxnsRequest {
                    limit: u32::MAX,
                    ..Default::default()
                }),
            ),
            frame(
                10,
                Body::ListTopics(pb::ListTopicsRequest {
                    after: "\u{10FFFF}".into(),
                    limit: u32::MAX,
                }),
            ),
            frame(
                11,
                Body::ListDeadLetters(pb::ListDeadLettersRequest {
                    group: "g".into(),
                    limit: u32::MAX,
                    after_topic: "nope".into(),
                    after_offset: u64::MAX,
                }),
            ),
            frame(
                12,
                Body::ListGroups(pb::ListGroupsRequest {
                    after_group: "g".into(),
                    after_topic: "nope".into(),
                    limit: 0,
                }),
            ),
        ]),
        // Scheduled messages at the edges: the furthest time, one past it, cancels of
        // bad and unknown ids, listings from nowhere (issue 14).
        input(&[
            frame(
                2,
                Body::Send(pb::SendRequest {
                    messages: vec![
                        pb::Message {
                            deliver_at_ms: u64::MAX,
                            ..msg(ALIVE_TOPIC)
                        },
                        pb::Message {
                            deliver_at_ms: 1,
                            ..msg(ALIVE_TOPIC)
                        },
                    ],
                    ..Default::default()
                }),
            ),
            frame(3, Body::Send(txn_send(ALIVE_TOPIC, 0))),
            frame(
                4,
                Body::CancelScheduled(pb::CancelScheduledRequest {
                    message_id: "F".repeat(32),
                }),
            ),
            frame(
                5,
                Body::CancelScheduled(pb::CancelScheduledRequest {
                    message_id: "\u{0}".into(),
                }),
            ),
            frame(
                6,
                Body::ListScheduled(pb::ListScheduledRequest {
                    topic: "no such".into(),
                    limit: u32::MAX,
                    after_deliver_ms: u64::MAX,
                    after_message_id: "F".repeat(32),
                }),
            ),
        ]),
        // Frames only the broker sends, a second Hello, an empty body.
        input(&[
            frame(2, Body::Delivery(pb::Delivery::default())),
            frame(3, Body::Check(pb::CheckRequest::default())),
            frame(4, Body::Hello(pb::Hello::default())),
            Frame { id: 5, body: None },
        ]),
    ]
}
