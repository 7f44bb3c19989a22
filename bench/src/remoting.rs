//! `--protocol remoting`: send, txn and e2e through the Remoting face, as the classic
//! RocketMQ clients use it. A small pipelined client of its own (JSON headers, requests
//! matched to answers by opaque), so the figures are the broker's and not a JVM's:
//! SEND_MESSAGE_V2 with the properties the Java client sets (`UNIQ_KEY`, `WAIT`), a
//! half message then END_TRANSACTION (sent two-way here, so that its latency is the
//! commit's; the Java client sends it one-way), and push-style pulls, one long poll per
//! queue, whose commit offsets ack what was consumed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::scenarios::{histogram, merged, now_us, payload, share};
use crate::{Args, Report};

const SEND_MESSAGE_V2: i32 = 310;
const END_TRANSACTION: i32 = 37;
const PULL_MESSAGE: i32 = 11;
const HEART_BEAT: i32 = 34;
const UPDATE_CONSUMER_OFFSET: i32 = 15;
const SUCCESS: i32 = 0;
const PULL_NOT_FOUND: i32 = 19;
const PULL_RETRY_IMMEDIATELY: i32 = 20;
/// A response's flag bit.
const RESPONSE: i32 = 1;
/// The queues the bench's topics are made with (the broker's default).
const QUEUES: i32 = 8;
/// Where a V1 message record's body length sits.
const BODY_LENGTH_AT: usize = 84;

/// An answer.
#[derive(Debug)]
struct Reply {
    code: i32,
    remark: String,
    ext: HashMap<String, String>,
    body: Bytes,
}

impl Reply {
    fn ok(self, what: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            self.code == SUCCESS,
            "{what}: code {} ({})",
            self.code,
            self.remark
        );
        Ok(self)
    }
}

type Pending = Arc<Mutex<HashMap<i32, oneshot::Sender<Reply>>>>;

/// One pipelined connection to the Remoting face.
struct Conn {
    frames: mpsc::UnboundedSender<Bytes>,
    pending: Pending,
    opaque: AtomicI32,
}

impl Conn {
    async fn connect(addr: &str) -> anyhow::Result<Arc<Self>> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the Remoting face at {addr}"))?;
        stream.set_nodelay(true)?;
        let (read, mut write) = stream.into_split();
        let (frames, mut outgoing) = mpsc::unbounded_channel::<Bytes>();
        let pending: Pending = Arc::default();
        // The writer: whatever is queued goes out in one write.
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            while let Some(f) = outgoing.recv().await {
                buf.extend_from_slice(&f);
                while let Ok(f) = outgoing.try_recv() {
                    buf.extend_from_slice(&f);
                }
                if write.write_all(&buf).await.is_err() {
                    break;
                }
                buf.clear();
            }
        });
        let answers = pending.clone();
        tokio::spawn(async move {
            let mut read = BufReader::with_capacity(1 << 16, read);
            while let Ok(frame) = read_frame(&mut read).await {
                // The broker's own one-way requests (NOTIFY_CONSUMER_IDS_CHANGED) ask
                // nothing of the bench.
                let Some((opaque, reply)) = frame else {
                    continue;
                };
                if let Some(tx) = answers.lock().expect("pending").remove(&opaque) {
                    let _ = tx.send(reply);
                }
            }
            // Whoever still waits learns the connection is gone.
            answers.lock().expect("pending").clear();
        });
        Ok(Arc::new(Self {
            frames,
            pending,
            opaque: AtomicI32::new(1),
        }))
    }

    async fn call(&self, code: i32, ext: &[(&str, &str)], body: &[u8]) -> anyhow::Result<Reply> {
        let opaque = self.opaque.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending").insert(opaque, tx);
        self.frames
            .send(frame(code, opaque, ext, body))
            .map_err(|_| anyhow::anyhow!("the Remoting connection closed"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the Remoting connection closed before answering"))
    }
}

/// A request frame: length, JSON header length, header, body.
fn frame(code: i32, opaque: i32, ext: &[(&str, &str)], body: &[u8]) -> Bytes {
    let fields: serde_json::Map<String, serde_json::Value> = ext
        .iter()
        .map(|(k, v)| ((*k).to_string(), serde_json::Value::from(*v)))
        .collect();
    let header = serde_json::json!({
        "code": code, "flag": 0, "language": "JAVA", "opaque": opaque,
        "serializeTypeCurrentRPC": "JSON", "version": 479, "extFields": fields,
    })
    .to_string();
    let mut out = BytesMut::with_capacity(8 + header.len() + body.len());
    out.put_u32((4 + header.len() + body.len()) as u32);
    out.put_u32(header.len() as u32);
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
    out.freeze()
}

/// The next frame: an answer and its opaque, or `None` for a request of the broker's.
async fn read_frame(
    read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> anyhow::Result<Option<(i32, Reply)>> {
    let total = read.read_u32().await? as usize;
    anyhow::ensure!(total >= 4, "a frame of {total} bytes");
    let mut rest = vec![0; total];
    read.read_exact(&mut rest).await?;
    let mut rest = Bytes::from(rest);
    let header_len = (rest.get_u32() & 0x00ff_ffff) as usize;
    anyhow::ensure!(header_len <= rest.len(), "a header past its frame");
    let header: serde_json::Value = serde_json::from_slice(&rest[..header_len])?;
    let body = rest.slice(header_len..);
    let int = |k: &str| {
        header
            .get(k)
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0) as i32
    };
    if int("flag") & RESPONSE == 0 {
        return Ok(None);
    }
    let ext = header
        .get("extFields")
        .and_then(|e| e.as_object())
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let reply = Reply {
        code: int("code"),
        remark: header
            .get("remark")
            .and_then(|r| r.as_str())
            .unwrap_or_default()
            .to_string(),
        ext,
        body,
    };
    Ok(Some((int("opaque"), reply)))
}

/// A Java client's message properties: its own id, a key when asked, `WAIT`.
fn properties(producer: usize, k: u64, keyed: bool, extra: &str) -> String {
    let mut p = format!(
        "UNIQ_KEY\u{1}{:016X}{producer:08X}{k:08X}\u{2}WAIT\u{1}true\u{2}",
        now_us()
    );
    if keyed {
        p.push_str(&format!("KEYS\u{1}order-{producer}-{k}\u{2}"));
    }
    p.push_str(extra);
    p
}

/// SEND_MESSAGE_V2 of `body` to `topic` (queue `k % 8`), answered once durable.
async fn send_one(
    conn: &Conn,
    group: &str,
    topic: &str,
    k: u64,
    props: &str,
    sys_flag: &str,
    body: &[u8],
) -> anyhow::Result<Reply> {
    let queue = ((k % QUEUES as u64) as i32).to_string();
    let born = now_us().div_euclid(1000).to_string();
    let fields = [
        ("a", group),
        ("b", topic),
        ("c", "TBW102"),
        ("d", "8"),
        ("e", queue.as_str()),
        ("f", sys_flag),
        ("g", born.as_str()),
        ("h", "0"),
        ("i", props),
        ("j", "0"),
        ("k", "false"),
        ("m", "false"),
    ];
    conn.call(SEND_MESSAGE_V2, &fields, body).await?.ok("send")
}

/// `send` (and e2e's producers): `--messages` over `--producers` connections, each with
/// `--window` in flight.
pub async fn send(args: &Args, addr: &str, topic: &str, stamp: bool) -> anyhow::Result<Report> {
    let mut conns = Vec::new();
    for _ in 0..args.producers {
        conns.push(Conn::connect(addr).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let n = share(args.messages, args.producers, i);
        let (size, window, keyed, topic) =
            (args.size, args.window.max(1), args.keyed, topic.to_string());
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut in_flight = FuturesUnordered::new();
            let mut sent = 0;
            while sent < n || !in_flight.is_empty() {
                while sent < n && in_flight.len() < window {
                    let (conn, topic) = (conn.clone(), topic.clone());
                    let props = properties(i, sent, keyed, "");
                    let k = sent;
                    in_flight.push(async move {
                        let t = Instant::now();
                        let body = payload(size, stamp);
                        send_one(&conn, "bench", &topic, k, &props, "0", &body).await?;
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
        latency_of: "send until durable reply",
        extra: Default::default(),
    })
}

/// `txn`: a half message (TRAN_MSG, sysFlag 4), then END_TRANSACTION with commit.
pub async fn txn(args: &Args, addr: &str) -> anyhow::Result<Report> {
    let mut conns = Vec::new();
    for _ in 0..args.producers {
        conns.push(Conn::connect(addr).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let n = share(args.messages, args.producers, i);
        let (size, window, keyed) = (args.size, args.window.max(1), args.keyed);
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut in_flight = FuturesUnordered::new();
            let mut begun = 0;
            while begun < n || !in_flight.is_empty() {
                while begun < n && in_flight.len() < window {
                    let conn = conn.clone();
                    let props = properties(
                        i,
                        begun,
                        keyed,
                        "TRAN_MSG\u{1}true\u{2}PGROUP\u{1}bench\u{2}",
                    );
                    let k = begun;
                    in_flight.push(async move {
                        let t = Instant::now();
                        let body = payload(size, false);
                        let half =
                            send_one(&conn, "bench", "bench-txn", k, &props, "4", &body).await?;
                        let get = |f: &str| half.ext.get(f).cloned().unwrap_or_default();
                        let (msg_id, txn_id, offset) =
                            (get("msgId"), get("transactionId"), get("queueOffset"));
                        let end = [
                            ("producerGroup", "bench"),
                            ("tranStateTableOffset", offset.as_str()),
                            ("commitLogOffset", "0"),
                            ("commitOrRollback", "8"),
                            ("fromTransactionCheck", "false"),
                            ("msgId", msg_id.as_str()),
                            ("transactionId", txn_id.as_str()),
                        ];
                        conn.call(END_TRANSACTION, &end, b"")
                            .await?
                            .ok("end transaction")?;
                        anyhow::Ok(t.elapsed())
                    });
                    begun += 1;
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
        latency_of: "half message + END_TRANSACTION commit, until both are answered",
        extra: Default::default(),
    })
}

/// The V1 records of a pull's body: each body's first 8 bytes (the send stamp).
fn stamps(mut body: &[u8]) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::new();
    while body.len() >= 4 {
        let total = u32::from_be_bytes(body[..4].try_into()?) as usize;
        anyhow::ensure!(
            total <= body.len() && total > BODY_LENGTH_AT + 4,
            "a short record"
        );
        let at = BODY_LENGTH_AT;
        let len = u32::from_be_bytes(body[at..at + 4].try_into()?) as usize;
        anyhow::ensure!(
            len >= 8 && at + 4 + len <= total,
            "a record's body past its end"
        );
        out.push(u64::from_be_bytes(body[at + 4..at + 12].try_into()?));
        body = &body[total..];
    }
    Ok(out)
}

/// `e2e`: consumers that pull (one long poll per queue, each pull committing what came
/// before it) while the producers send.
pub async fn e2e(args: &Args, addr: &str) -> anyhow::Result<Report> {
    let topic = "bench-e2e";
    let received = Arc::new(AtomicU64::new(0));
    let total = args.messages;
    let mut tasks = Vec::new();
    for c in 0..args.consumers {
        let conn = Conn::connect(addr).await?;
        let beat = serde_json::json!({
            "clientID": format!("127.0.0.1@bench-{c}"),
            "consumerDataSet": [{"groupName": "bench", "consumeType": "CONSUME_PASSIVELY",
                "messageModel": "CLUSTERING", "consumeFromWhere": "CONSUME_FROM_FIRST_OFFSET",
                "subscriptionDataSet": [{"topic": topic, "subString": "*", "expressionType": "TAG"}]}],
            "producerDataSet": [],
        });
        conn.call(HEART_BEAT, &[], &serde_json::to_vec(&beat)?)
            .await?
            .ok("heartbeat")?;
        for queue in (0..QUEUES).filter(|q| *q as usize % args.consumers == c) {
            let (conn, received) = (conn.clone(), received.clone());
            let max = args.window.clamp(1, 1024).to_string();
            tasks.push(tokio::spawn(async move {
                let mut hist = histogram();
                let (queue, mut next) = (queue.to_string(), 0u64);
                while received.load(Ordering::Relaxed) < total {
                    let (offset, commit) = (next.to_string(), next.to_string());
                    let pull = [
                        ("consumerGroup", "bench"),
                        ("topic", topic),
                        ("queueId", queue.as_str()),
                        ("queueOffset", offset.as_str()),
                        ("maxMsgNums", max.as_str()),
                        ("sysFlag", "3"),
                        ("commitOffset", commit.as_str()),
                        ("suspendTimeoutMillis", "1000"),
                        ("subscription", "*"),
                        ("subVersion", "0"),
                    ];
                    let r = tokio::time::timeout(
                        Duration::from_secs(30),
                        conn.call(PULL_MESSAGE, &pull, b""),
                    )
                    .await
                    .context("a pull stalled")??;
                    match r.code {
                        SUCCESS => {
                            for sent in stamps(&r.body)? {
                                hist.saturating_record(now_us().saturating_sub(sent));
                                received.fetch_add(1, Ordering::Relaxed);
                            }
                            next = r
                                .ext
                                .get("nextBeginOffset")
                                .and_then(|n| n.parse().ok())
                                .unwrap_or(next);
                        }
                        PULL_NOT_FOUND | PULL_RETRY_IMMEDIATELY => {}
                        code => anyhow::bail!("pull: code {code} ({})", r.remark),
                    }
                }
                // What the last pull handed out is consumed: commit it.
                let commit = [
                    ("consumerGroup", "bench"),
                    ("topic", topic),
                    ("queueId", queue.as_str()),
                    ("commitOffset", &next.to_string()),
                ];
                conn.call(UPDATE_CONSUMER_OFFSET, &commit, b"")
                    .await?
                    .ok("commit")?;
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
        latency_of: "send until pulled by a consumer",
        extra: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_length_header_length_header_body() {
        let f = frame(310, 7, &[("a", "g")], b"xy");
        let total = u32::from_be_bytes(f[..4].try_into().unwrap()) as usize;
        assert_eq!(total, f.len() - 4);
        let header_len = u32::from_be_bytes(f[4..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&f[8..8 + header_len]).unwrap();
        assert_eq!(
            (header["code"].as_i64(), header["opaque"].as_i64()),
            (Some(310), Some(7))
        );
        assert_eq!(header["extFields"]["a"], "g");
        assert_eq!(&f[8 + header_len..], b"xy");
    }

    #[test]
    fn stamps_come_from_each_records_body() {
        let record = |stamp: u64| {
            let body = [&stamp.to_be_bytes()[..], b"rest"].concat();
            let mut r = vec![0u8; BODY_LENGTH_AT];
            r.extend_from_slice(&(body.len() as u32).to_be_bytes());
            r.extend_from_slice(&body);
            r.extend_from_slice(&[0, 0, 0]);
            let total = r.len() as u32;
            r[..4].copy_from_slice(&total.to_be_bytes());
            r
        };
        let body = [record(5), record(9)].concat();
        assert_eq!(stamps(&body).unwrap(), [5, 9]);
        assert!(stamps(&body[..body.len() - 1]).is_err(), "a cut record");
    }
}
