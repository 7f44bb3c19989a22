//! Driving the broker's dispatch with arbitrary requests (issue 13, item 22): the property
//! the `dispatch` fuzz target checks and `tests/tests/dispatch_corpus.rs` replays.
//!
//! An input is a byte that picks who sends (issue 26: anonymous, the shared token, a
//! user with a few rules, a super user; see [`Who`]), then a sequence of chunks, each a
//! little-endian `u16` length and that many bytes; every chunk that decodes as a
//! protobuf `Frame` is sent, after a login and a Hello as a producer. Whatever the
//! frames, the broker must then still answer a Ping on a new connection and store a
//! durable send: no request may crash it, stop its writer, or leave it unable to serve.
//!
//! A *closed* broker ([`closed_args`], prepared by [`prepare`]) has the users and the
//! token the principals need; on an open one every principal is anonymous.

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

/// The shared token of a closed broker.
pub const TOKEN: &str = "fuzz-shared-token";
/// Its super user, made from `--bootstrap-admin-file`.
pub const ROOT: (&str, &str) = ("root", "fuzz-root-secret");
/// Its normal user, with the rules [`prepare`] gives.
pub const APP: (&str, &str) = ("app", "fuzz-app-secret");

/// Who sends an input's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// No login, no token.
    Anonymous,
    /// The shared token (a super user's rights).
    Token,
    /// [`APP`]: `pub` and `sub` on `fuzz-*` topics, `sub` on every group, `txn` on the
    /// `fuzz` producer group, and a deny on `topic:fuzz-secret`.
    App,
    /// [`ROOT`], a super user.
    Root,
}

impl Who {
    /// Each principal, as an input's first byte picks it.
    pub const ALL: [Who; 4] = [Who::Anonymous, Who::Token, Who::App, Who::Root];

    /// The principal byte `b` picks.
    pub fn of(b: u8) -> Self {
        Self::ALL[usize::from(b) % Self::ALL.len()]
    }

    /// The byte that picks it.
    pub fn byte(self) -> u8 {
        Self::ALL.iter().position(|w| *w == self).unwrap_or(0) as u8
    }
}

/// The flags of a closed broker (with `args`' others): the token and the super user.
/// Returns them and the directory holding their files (keep it while the broker runs).
pub fn closed_args() -> (Vec<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).expect("write the token");
    let admin = dir.path().join("admin");
    std::fs::write(&admin, format!("{} {}\n", ROOT.0, ROOT.1)).expect("write the admin");
    let args = vec![
        "--auth-token-file".into(),
        token.display().to_string(),
        "--bootstrap-admin-file".into(),
        admin.display().to_string(),
    ];
    (args, dir)
}

/// Makes a closed broker ready for inputs: the liveness topic, the normal user and its
/// rules (as the super user); again, it changes nothing.
///
/// # Errors
/// What the broker refused.
pub async fn prepare(addr: &str) -> Result<(), String> {
    let root = txmq_client::User::new(ROOT.0, ROOT.1);
    let admin = txmq_client::Admin::connect_as(addr, "", Some(&root))
        .await
        .map_err(|e| format!("root login: {e}"))?;
    admin
        .create_topic(ALIVE_TOPIC, false)
        .await
        .map_err(|e| e.to_string())?;
    let users = admin.user_list().await.map_err(|e| e.to_string())?;
    if users.iter().any(|u| u.name == APP.0) {
        return Ok(());
    }
    admin
        .user_create(APP.0, APP.1, false)
        .await
        .map_err(|e| e.to_string())?;
    let rule = |resource: &str, actions: &[&str], deny: bool| txmq_client::RuleSpec {
        user: APP.0.into(),
        resource: resource.into(),
        actions: actions.iter().map(|a| a.to_string()).collect(),
        deny,
        ..Default::default()
    };
    for r in [
        rule("topic:fuzz-*", &["pub", "sub"], false),
        rule("group:*", &["sub"], false),
        rule("producer-group:fuzz", &["txn"], false),
        rule("topic:fuzz-secret", &["all"], true),
    ] {
        admin.acl_grant(&r).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The frames an input stands for (after its principal byte).
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

/// Logs in as `user` with SCRAM-SHA-256 on a raw connection.
async fn login(
    framed: &mut Framed<TcpStream, FrameCodec>,
    (user, secret): (&str, &str),
) -> Result<(), String> {
    use txmq_protocol::scram::ClientExchange;
    let (exchange, client_first) = ClientExchange::start(user, "fuzz-client-nonce-0123456789");
    let start = Body::AuthStart(pb::AuthStart { client_first });
    let server_first = match call(framed, 1, start).await? {
        Some(pb::response::Result::AuthChallenge(c)) => c.server_first,
        other => return Err(format!("{user}: no challenge: {other:?}")),
    };
    let answer = exchange
        .answer(&server_first, secret.as_bytes())
        .map_err(|e| format!("{user}: {e}"))?;
    let finish = Body::AuthFinish(pb::AuthFinish {
        client_final: answer.message.clone(),
    });
    match call(framed, 2, finish).await? {
        Some(pb::response::Result::AuthOk(_)) => Ok(()),
        other => Err(format!("{user}: not logged in: {other:?}")),
    }
}

/// Sends request `id` and waits for its answer's result.
async fn call(
    framed: &mut Framed<TcpStream, FrameCodec>,
    id: u64,
    body: Body,
) -> Result<Option<pb::response::Result>, String> {
    framed
        .send(Frame {
            id,
            body: Some(body),
        })
        .await
        .map_err(|e| format!("send: {e}"))?;
    match answer(framed, id).await? {
        Some(r) if r.code == pb::ErrorCode::Ok as i32 => Ok(r.result),
        Some(r) => Err(format!("refused: {r:?}")),
        None => Err("the connection closed".into()),
    }
}

async fn connect(
    addr: &str,
    group: &str,
    who: Who,
) -> Result<Framed<TcpStream, FrameCodec>, String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut framed = Framed::new(s, FrameCodec::default());
    // A user an earlier input deleted, or whose secret it changed, no longer logs
    // in: its frames go anonymous then, and must be refused as such.
    let _ = match who {
        Who::App => login(&mut framed, APP).await,
        Who::Root => login(&mut framed, ROOT).await,
        Who::Anonymous | Who::Token => Ok(()),
    };
    let hello = pb::Hello {
        protocol_version: txmq_protocol::PROTOCOL_VERSION,
        role: pb::Role::Producer as i32,
        producer_group: group.into(),
        auth_token: if who == Who::Token {
            TOKEN.into()
        } else {
            String::new()
        },
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

/// Sends the input's frames to the broker at `addr` as the principal its first byte
/// picks (on a `closed` broker; anonymous on an open one), then checks it still serves.
///
/// # Errors
/// What the broker failed to do afterwards.
pub async fn drive(addr: &str, input: &[u8], closed: bool) -> Result<(), String> {
    let Some((&first, rest)) = input.split_first() else {
        return Ok(());
    };
    let who = if closed {
        Who::of(first)
    } else {
        Who::Anonymous
    };
    // A principal refused at its login or Hello (anonymous on a closed broker) still
    // sends its frames: the broker must refuse them too.
    let mut framed = connect(addr, "fuzz", who).await?;
    for frame in frames(rest) {
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
    // The token, which no input can take away (users can be deleted or changed).
    let check = if closed { Who::Token } else { Who::Anonymous };
    let mut fresh = connect(addr, "fuzz-check", check).await?;
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
        // Authentication out of turn and malformed (issue 26): a finish with no start,
        // starts that are not SCRAM, a second start, a huge name.
        input(&[
            frame(
                2,
                Body::AuthFinish(pb::AuthFinish {
                    client_final: "c=biws,r=x,p=AAAA".into(),
                }),
            ),
            frame(
                3,
                Body::AuthStart(pb::AuthStart {
                    client_first: "p=tls-unique,,n=root,r=abc".into(),
                }),
            ),
            frame(
                4,
                Body::AuthStart(pb::AuthStart {
                    client_first: format!("n,,n={},r=abc", "x".repeat(60_000)),
                }),
            ),
            frame(
                5,
                Body::AuthStart(pb::AuthStart {
                    client_first: "n,,n=root,r=".into(),
                }),
            ),
            frame(
                6,
                Body::AuthFinish(pb::AuthFinish {
                    client_final: "\u{0}".repeat(1000),
                }),
            ),
        ]),
        // Users and rules: odd names, secrets and resources, a rule for nobody, the
        // last super user's deletion, listings (refused without `admin`).
        input(&[
            frame(
                2,
                Body::User(pb::UserRequest {
                    action: 1,
                    name: "bad name\u{0}".into(),
                    secret: "short".into(),
                    superuser: true,
                }),
            ),
            frame(
                3,
                Body::User(pb::UserRequest {
                    action: 2,
                    name: ROOT.0.into(),
                    ..Default::default()
                }),
            ),
            frame(
                4,
                Body::User(pb::UserRequest {
                    action: 99,
                    ..Default::default()
                }),
            ),
            frame(
                5,
                Body::Acl(pb::AclRequest {
                    action: 1,
                    user: "nobody".into(),
                    resource: "topic:**".into(),
                    actions: vec!["pub".into(), "everything".into()],
                    source: "10.0.0.0/99".into(),
                    ..Default::default()
                }),
            ),
            frame(
                6,
                Body::Acl(pb::AclRequest {
                    action: 4,
                    user: APP.0.into(),
                    resource: "cluster".into(),
                    actions: vec!["admin".into()],
                    ..Default::default()
                }),
            ),
            frame(
                7,
                Body::Acl(pb::AclRequest {
                    action: 3,
                    ..Default::default()
                }),
            ),
        ]),
    ]
}

/// Every seed as every principal: the principal byte, then the seed's frames.
pub fn seeds_as_everyone() -> Vec<Vec<u8>> {
    seeds()
        .into_iter()
        .flat_map(|seed| {
            Who::ALL.map(|who| {
                let mut input = vec![who.byte()];
                input.extend_from_slice(&seed);
                input
            })
        })
        .collect()
}
