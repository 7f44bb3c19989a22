//! The backbone against the real broker: durable topics, consumer groups across restarts
//! and crashes (I3, I6), hostile frames (I7), and the CLI flow a new user tries first.

use std::collections::HashSet;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use txmq_client::{Admin, Consumer, ConsumerOptions, ErrorCode, Message};
use txmq_tests::{TestBroker, json_lines, producer};

/// Receives exactly `n` deliveries, acking each; panics if they do not come.
async fn consume_n(b: &TestBroker, group: &str, topic: &str, n: usize) -> Vec<(u64, String)> {
    let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new(group, topic))
        .await
        .expect("subscribe");
    let mut got = Vec::new();
    while got.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(20), c.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} delivered", got.len()))
            .expect("stream open")
            .expect("delivery");
        d.ack().await.expect("ack");
        got.push((d.offset(), d.id().to_string()));
    }
    got
}

/// Asserts nothing is delivered to `group` within `wait`.
async fn assert_nothing(b: &TestBroker, group: &str, topic: &str, wait: Duration) {
    let mut c = Consumer::subscribe(b.addr(), ConsumerOptions::new(group, topic))
        .await
        .expect("subscribe");
    if let Ok(Some(d)) = tokio::time::timeout(wait, c.next()).await {
        panic!("unexpected delivery: {:?}", d.map(|d| d.message));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_consume_restart_and_new_group() {
    let mut b = TestBroker::start(&[]);
    let p = producer(&b).await;
    let n = 300;
    let mut sent = Vec::new();
    for i in 0..n {
        let r = p
            .send(Message::new("orders", format!("order {i}")).key(format!("k{i}")))
            .await
            .expect("send");
        sent.push(r);
    }
    let offsets: Vec<u64> = sent.iter().map(|r| r.offset).collect();
    assert_eq!(
        offsets,
        (0..n).collect::<Vec<_>>(),
        "offsets are dense and ordered"
    );
    let ids: HashSet<_> = sent.iter().map(|r| r.message_id.clone()).collect();
    assert_eq!(ids.len(), n as usize, "message ids are unique");

    let got = consume_n(&b, "g1", "orders", n as usize).await;
    let mut got_offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
    got_offsets.sort_unstable();
    assert_eq!(got_offsets, offsets);

    b.restart();
    assert_nothing(&b, "g1", "orders", Duration::from_secs(2)).await;
    let again = consume_n(&b, "g2", "orders", n as usize).await;
    let again_offsets: Vec<u64> = again.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        again_offsets, offsets,
        "a new group reads everything, in order"
    );
    let again_ids: HashSet<_> = again.into_iter().map(|(_, id)| id).collect();
    assert_eq!(again_ids, ids, "ids survive the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_sends_and_acks_survive_kill_9() {
    let mut b = TestBroker::start(&[]);
    let p = producer(&b).await;
    let batch: Vec<Message> = (0..200)
        .map(|i| Message::new("t", format!("m{i}")))
        .collect();
    let receipts = p.send_batch(batch).await.expect("send batch");
    assert_eq!(receipts.len(), 200);
    consume_n(&b, "g", "t", 120).await;
    drop(p);
    b.kill9();
    b.start_again();
    // Every acknowledged send is there for a new group, and the acks of `g` held.
    let all = consume_n(&b, "fresh", "t", 200).await;
    assert_eq!(all.len(), 200);
    let rest = consume_n(&b, "g", "t", 80).await;
    let mut rest: Vec<u64> = rest.into_iter().map(|(o, _)| o).collect();
    rest.sort_unstable();
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    let g = admin.describe_group("g").await.unwrap();
    assert_eq!(g.topics[0].ack_floor, 200, "{g:?}");
    assert_eq!(g.topics[0].lag, 0);
    assert_eq!(
        rest,
        (120..200).collect::<Vec<_>>(),
        "acked messages were delivered again"
    );
}

fn frame_header(len: u32, crc: u32) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(len);
    b.put_u32(crc);
    b
}

/// Reads until the broker closes the socket; returns what it sent.
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return all,
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => panic!("broker kept a hostile connection open"),
        }
    }
}

fn decode_frames(mut bytes: &[u8]) -> Vec<txmq_protocol::Frame> {
    use tokio_util_codec::decode_all;
    decode_all(&mut bytes)
}

mod tokio_util_codec {
    use bytes::BytesMut;
    use txmq_protocol::FrameCodec;

    pub fn decode_all(bytes: &mut &[u8]) -> Vec<txmq_protocol::Frame> {
        use tokio_util::codec::Decoder;
        let mut buf = BytesMut::from(*bytes);
        let mut codec = FrameCodec::default();
        let mut out = Vec::new();
        while let Ok(Some(f)) = codec.decode(&mut buf) {
            out.push(f);
        }
        out
    }
}

fn malformed_reply(frames: &[txmq_protocol::Frame]) -> bool {
    frames.iter().any(|f| {
        matches!(&f.body, Some(txmq_protocol::Body::Response(r)) if r.code == ErrorCode::MalformedFrame as i32)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_close_only_their_connection() {
    let b = TestBroker::start(&[]);
    let p = producer(&b).await;
    p.send(Message::new("t", "before")).await.expect("send");

    // A header announcing 4 GiB: refused before anything is allocated.
    let mut huge = TcpStream::connect(b.addr()).await.unwrap();
    huge.write_all(&frame_header(u32::MAX, 0)).await.unwrap();
    let reply = read_until_closed(&mut huge).await;
    assert!(
        malformed_reply(&decode_frames(&reply)),
        "no MALFORMED_FRAME reply"
    );

    // Random garbage.
    let mut junk = TcpStream::connect(b.addr()).await.unwrap();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = junk.write_all(&garbage).await;
    // Garbage may announce a plausible length and wait for more; the end of the stream
    // in the middle of a frame must then close it.
    let _ = junk.shutdown().await;
    read_until_closed(&mut junk).await;

    // A well-sized frame whose CRC does not match its body.
    let mut bad = TcpStream::connect(b.addr()).await.unwrap();
    let body = b"\x08\x01";
    let mut f = frame_header(body.len() as u32, crc32(body) ^ 1);
    f.extend_from_slice(body);
    bad.write_all(&f).await.unwrap();
    let reply = read_until_closed(&mut bad).await;
    let frames = decode_frames(&reply);
    assert!(malformed_reply(&frames), "bad CRC not refused: {frames:?}");

    // The well-behaved client on its own connection never noticed.
    let r = p
        .send(Message::new("t", "after"))
        .await
        .expect("send after");
    assert_eq!(r.offset, 1);
    assert!(
        b.log_text().contains("closing connection"),
        "reason not logged"
    );
}

fn crc32(bytes: &[u8]) -> u32 {
    // Same polynomial as the codec (IEEE); computed bitwise to stay independent of it.
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_error_replies_and_lose_nothing() {
    let b = TestBroker::start(&["--auto-create-topics", "false"]);
    let p = producer(&b).await;
    let err = p.send(Message::new("bad topic!", "x")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidName), "{err}");
    let err = p.send(Message::new("nope", "x")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TopicNotFound), "{err}");
    let admin = Admin::connect(b.addr(), "").await.unwrap();
    admin.create_topic("yes", true).await.unwrap();
    let err = admin.create_topic("yes", true).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TopicExists));
    // The same connection still works after the refusals.
    assert_eq!(p.send(Message::new("yes", "x")).await.unwrap().offset, 0);
    let err = p.send_batch(vec![]).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidRequest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_hello_are_refused() {
    use futures::SinkExt;
    use tokio_util::codec::Framed;
    use txmq_protocol::{Body, Frame, FrameCodec, pb};
    let b = TestBroker::start(&[]);
    let s = TcpStream::connect(b.addr()).await.unwrap();
    let mut framed = Framed::new(s, FrameCodec::default());
    framed
        .send(Frame {
            id: 5,
            body: Some(Body::ListTopics(pb::ListTopicsRequest::default())),
        })
        .await
        .unwrap();
    let reply = framed.next().await.unwrap().unwrap();
    assert_eq!(reply.id, 5);
    let Some(Body::Response(r)) = reply.body else {
        panic!("{reply:?}")
    };
    assert_eq!(r.code, ErrorCode::HandshakeRequired as i32);
    framed
        .send(Frame {
            id: 6,
            body: Some(Body::Hello(pb::Hello {
                protocol_version: 99,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    let Some(Body::Response(r)) = framed.next().await.unwrap().unwrap().body else {
        panic!()
    };
    assert_eq!(r.code, ErrorCode::UnsupportedVersion as i32);
}

#[test]
fn cli_produce_consume_restart_flow() {
    let mut b = TestBroker::start(&[]);
    let out = b.cli_ok(&[
        "produce", "--topic", "t", "--count", "1000", "--size", "100", "--json",
    ]);
    let acked = json_lines(&out);
    assert_eq!(acked.len(), 1000);
    let out = b.cli_ok(&[
        "consume", "--topic", "t", "--group", "g", "--count", "1000", "--json",
    ]);
    let got = json_lines(&out);
    assert_eq!(got.len(), 1000);
    let ids: HashSet<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1000, "distinct ids");
    for m in &got {
        for field in ["topic", "offset", "id", "key", "tag", "attempt", "body"] {
            assert!(m.get(field).is_some(), "{field} missing in {m}");
        }
        assert_eq!(m["body"].as_str().unwrap().len(), 100);
    }
    b.restart();
    let out = b.cli_ok(&["consume", "--topic", "t", "--group", "g", "--timeout", "2"]);
    assert_eq!(out, "", "group g got messages again after restart");
    let out = b.cli_ok(&[
        "consume",
        "--topic",
        "t",
        "--group",
        "g2",
        "--timeout",
        "2",
        "--json",
    ]);
    let all = json_lines(&out);
    assert_eq!(all.len(), 1000);
    let offsets: Vec<u64> = all.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, (0..1000).collect::<Vec<_>>());
}

#[test]
fn cli_errors_are_one_clear_line() {
    let b = TestBroker::start(&[]);
    let out = b.cli(&["produce", "--topic", "no spaces", "--body", "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("InvalidName"), "{err}");
    let out = std::process::Command::new(txmq_tests::bin("txmq"))
        .args(["--broker", "127.0.0.1:1", "topic", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

/// I3: `kill -9` of the broker in the middle of a produce run loses none of the messages
/// the producer printed as acknowledged.
#[test]
fn kill_9_mid_produce_loses_nothing_acknowledged() {
    use std::io::BufRead;
    let mut b = TestBroker::start(&[]);
    let mut producer = b.cli_spawn(&[
        "produce", "--topic", "t", "--count", "100000", "--size", "64", "--json",
    ]);
    let stdout = producer.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut acked = Vec::new();
    while acked.len() < 3000 {
        match lines.next() {
            Some(Ok(l)) => acked.push(l),
            _ => panic!("producer stopped after {} acks", acked.len()),
        }
    }
    b.kill9();
    // Whatever else it printed before noticing the broker died was acknowledged too.
    acked.extend(lines.map_while(Result::ok));
    let status = txmq_tests::wait_timeout(&mut producer, Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| !s.success()),
        "producer should fail once the broker is gone"
    );
    let acked_ids: HashSet<String> = json_lines(&acked.join("\n"))
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(acked_ids.len(), acked.len());

    b.start_again();
    let out = b.cli_ok(&[
        "consume",
        "--topic",
        "t",
        "--group",
        "audit",
        "--timeout",
        "3",
        "--json",
    ]);
    let stored: HashSet<String> = json_lines(&out)
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    let lost: Vec<_> = acked_ids.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
}
