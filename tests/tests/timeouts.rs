//! Timeouts and liveness (issue 13, item 9): a socket that never says Hello cannot hold a
//! connection slot, a producer that went silent leaves the check-back rotation, and a
//! client whose broker stops answering gets a clear error instead of hanging.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;
use txmq_client::pb::TxnState;
use txmq_client::{Admin, Error, ErrorCode, Message, Outcome, Producer, ProducerOptions};
use txmq_protocol::{Body, Frame, FrameCodec, pb};
use txmq_tests::{TestBroker, eventually, producer, raw_producer};

/// Waits for the broker to close a raw connection; its last word, if any.
async fn closed_by_broker(framed: &mut Framed<TcpStream, FrameCodec>) -> Option<pb::Response> {
    let mut last = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), framed.next()).await {
            Err(_) => panic!("the broker kept a silent connection open"),
            Ok(None | Some(Err(_))) => return last,
            Ok(Some(Ok(frame))) => {
                if let Some(Body::Response(r)) = frame.body {
                    last = Some(r);
                }
            }
        }
    }
}

/// Sockets that connect and say nothing are closed at the handshake deadline, so they
/// cannot lock everyone out by holding every connection slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_are_closed_at_the_handshake_deadline() {
    let b = TestBroker::start(&["--handshake-timeout", "1s", "--max-connections", "4"]);
    let mut silent = Vec::new();
    for _ in 0..4 {
        let s = TcpStream::connect(b.addr()).await.unwrap();
        silent.push(Framed::new(s, FrameCodec::default()));
    }
    for framed in &mut silent {
        let last = closed_by_broker(framed)
            .await
            .expect("a reason before closing");
        assert_eq!(last.code, ErrorCode::HandshakeRequired as i32, "{last:?}");
        assert!(last.message.contains("no Hello"), "{last:?}");
    }
    let p = producer(&b).await;
    p.send(Message::new("t", "in"))
        .await
        .expect("a slot is free again");
}

/// A producer that said Hello (with a checker) and then went silent, as one whose host
/// died without a FIN does, is closed at the idle timeout and leaves its group's rotation:
/// checks then find nobody and do not count, instead of timing out against it and
/// counting until the transaction is discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_producer_leaves_the_check_rotation() {
    let b = TestBroker::start(&[
        "--idle-timeout",
        "1s",
        "--check-timeout",
        "4s",
        "--check-interval",
        "100ms",
        "--check-backoff",
        "300ms",
        "--check-max",
        "1",
    ]);
    let mut ghost = raw_producer(b.addr(), "orders", true, 1).await;
    let sender = Producer::connect(
        b.addr(),
        ProducerOptions {
            group: "orders".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (_, txn) = sender
        .send_in_transaction(vec![Message::new("orders", "o-1")], |_| async {
            Outcome::Unknown
        })
        .await
        .unwrap();
    let id = txn.id().unwrap().to_string();
    // The ghost never reads, never pings; the broker closes it.
    closed_by_broker(&mut ghost).await;
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let info = eventually(Duration::from_secs(30), || async {
        let list = admin
            .transactions(TxnState::Unspecified, "", 0)
            .await
            .ok()?;
        list.txns
            .into_iter()
            .find(|t| t.txn_id == id && t.last_check_note.contains("no producer"))
    })
    .await
    .expect("the scheduler never looked at the transaction");
    assert_eq!(info.check_count, 0, "{info:?}");
    assert_eq!(info.state, TxnState::Prepared as i32, "{info:?}");
}

/// A broker that accepts the handshake and then answers nothing: the client's call fails
/// with a clear timeout instead of hanging forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_broker_never_answers_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mute = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let mut framed = Framed::new(s, FrameCodec::default());
            let hello = framed.next().await.unwrap().unwrap();
            let ok = pb::Response {
                code: 0,
                message: String::new(),
                leader: String::new(),
                result: Some(pb::response::Result::Hello(pb::HelloOk {
                    protocol_version: txmq_protocol::PROTOCOL_VERSION,
                    max_frame_len: 16 << 20,
                    ..Default::default()
                })),
            };
            framed
                .send(Frame {
                    id: hello.id,
                    body: Some(Body::Response(ok)),
                })
                .await
                .unwrap();
            held.push(framed);
        }
    });
    let options = ProducerOptions {
        call_timeout: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    let p = Producer::connect(&addr, options).await.unwrap();
    let sent = tokio::time::timeout(Duration::from_secs(30), p.send(Message::new("t", "x")))
        .await
        .expect("the send hung");
    let e = sent.unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e:?}");
    assert!(e.to_string().contains("no answer from the broker"), "{e}");
    mute.abort();
}
