//! The RocketMQ Remoting face (issue 27) with the official clients, unmodified: the
//! Java client (5.x and 4.9), a Spring Boot service, mqadmin, the Go client, and the
//! 5.x Java and Go clients on the gRPC face; what they store read back by native
//! consumers. The raw protocol's tests are in `remoting_wire.rs`.

use std::time::Duration;

use txmq_tests::TestBroker;
use txmq_tests::remoting::{Raw, broker, java, java_grpc, spring};

/// Everything a new group reads from `topic` (`count` at most, waiting `secs`), as the
/// CLI prints it.
fn read(b: &TestBroker, topic: &str, count: usize, secs: u64) -> Vec<serde_json::Value> {
    let out = b.cli_ok(&[
        "consume",
        "--topic",
        topic,
        "--group",
        "native-reader",
        "--count",
        &count.to_string(),
        "--timeout",
        &secs.to_string(),
        "--json",
    ]);
    txmq_tests::json_lines(&out)
}

fn kind_index(kind: &str) -> usize {
    ["sync", "async", "oneway", "batch"]
        .iter()
        .position(|k| *k == kind)
        .expect("a kind")
}

fn bodies(messages: &[serde_json::Value]) -> Vec<String> {
    let mut b: Vec<String> = messages
        .iter()
        .map(|m| m["body"].as_str().unwrap_or_default().to_string())
        .collect();
    b.sort();
    b
}

#[test]
fn java_producers_and_transactions_reach_native_consumers() {
    let b = broker();
    java(
        b.remoting_addr(),
        "p",
        "ProducerTest,TransactionTest",
        &[],
        Duration::from_secs(240),
    );
    let expect = |kind: &str| -> Vec<String> {
        let mut v: Vec<String> = (0..10).map(|i| format!("{kind}-{i}")).collect();
        v.sort();
        v
    };
    for kind in ["sync", "async", "oneway", "batch"] {
        let got = read(&b, &format!("java-{kind}-p"), 10, 10);
        assert_eq!(bodies(&got), expect(kind), "java-{kind}");
        for m in &got {
            assert!(m["key"].as_str().unwrap().starts_with("key-"), "{m}");
            assert_eq!(m["properties"]["face"], "remoting", "{m}");
            assert!(
                m["properties"]["UNIQ_KEY"]
                    .as_str()
                    .is_some_and(|u| u.len() >= 32),
                "the client's message id is kept: {m}"
            );
            let tag = format!("Tag{}", &"ABCD"[kind_index(kind)..=kind_index(kind)]);
            assert_eq!(m["tag"], tag.as_str(), "{m}");
        }
    }
    // The body the client compressed arrives as it was written.
    let big = read(&b, "java-big-p", 1, 5);
    assert_eq!(big[0]["body"].as_str().unwrap(), "0123456789".repeat(1024));
    // And by the official Python client, over gRPC.
    let py = txmq_tests::grpc::client(b.grpc_addr(), &["simple", "py-reader", "java-big-p", "1"]);
    assert_eq!(py[0]["body"].as_str().unwrap(), "0123456789".repeat(1024));
    // Delay level 2 is 5 s: it became visible no earlier.
    let delayed = read(&b, "java-delay-p", 1, 15);
    let (deliver, born) = (
        delayed[0]["deliver_ms"].as_u64().unwrap(),
        delayed[0]["store_ms"].as_u64().unwrap(),
    );
    assert!(deliver > 0 && born >= deliver, "{}", delayed[0]);
    // Commit, and the unknown one the check-back committed; never the rollback.
    let txn = read(&b, "java-txn-p", 3, 5);
    assert_eq!(bodies(&txn), ["txn-commit", "txn-unknown"]);
    let listed = b.cli_ok(&["txn", "list"]);
    assert!(listed.contains("rolled_back"), "{listed}");
    assert!(listed.contains("resolved by check-back"), "{listed}");
}

/// The issue's "done when": an unmodified Spring Boot service (RocketMQTemplate
/// transactions, a @RocketMQTransactionListener, a @RocketMQMessageListener) does its
/// order → points flow against txmq. The topic holds exactly the committed orders: the
/// refused ones and the one lost before its database commit were rolled back, the two
/// that stopped after it were committed by check-back.
#[test]
fn a_spring_boot_service_with_rocketmq_transactions() {
    let b = broker();
    let out = spring(b.remoting_addr(), "sb", Duration::from_secs(240));
    assert!(
        out.contains("txmq-spring: 12 orders earned points"),
        "{out}"
    );
    let mut expect: Vec<String> = (0..10)
        .map(|i| format!("order-{i},customer-{},{}", i % 3, 10 + i))
        .collect();
    expect.push("order-crash-1,crash,7".into());
    expect.push("order-crash-2,crash,8".into());
    expect.sort();
    assert_eq!(bodies(&read(&b, "orders-sb", 20, 5)), expect);
    let listed = b.cli_ok(&["txn", "list", "--json"]);
    let txns = txmq_tests::json_lines(&listed);
    let count = |state: &str, note: &str| {
        txns.iter()
            .filter(|t| t["state"] == state && t["last_check_note"] == note)
            .count()
    };
    assert_eq!(
        count("committed", "resolved by the producer"),
        10,
        "{listed}"
    );
    assert_eq!(
        count("rolled_back", "resolved by the producer"),
        2,
        "{listed}"
    );
    assert_eq!(count("committed", "resolved by check-back"), 2, "{listed}");
    assert_eq!(
        count("rolled_back", "resolved by check-back"),
        1,
        "{listed}"
    );
    assert!(
        txns.iter().all(|t| t["group"] == "order-service-sb"),
        "{listed}"
    );
}

/// The RocketMQ 5 gRPC Java client (rocketmq-client-java 5.0.8, `tests/java-grpc`) on
/// the gRPC face: sync and async sends, a simple consumer whose unacked message comes
/// again, a push consumer that fails one once, a delivery timestamp, a transactional
/// producer whose checker commits the open one, FIFO message groups.
#[test]
fn the_java_grpc_client() {
    let b = broker();
    // FIFO: the group is ordered before the client joins it (its settings say so).
    b.cli_ok(&[
        "group",
        "create",
        "j5-fifo-j",
        "--topic",
        "j5-fifo-j",
        "--ordered",
    ]);
    java_grpc(b.grpc_addr(), "j", Duration::from_secs(300));
    let listed = b.cli_ok(&["txn", "list", "--json"]);
    let txns = txmq_tests::json_lines(&listed);
    let on_topic: Vec<_> = txns
        .iter()
        .filter(|t| t["topics"][0] == "j5-txn-j")
        .map(|t| {
            (
                t["state"].as_str().unwrap().to_string(),
                t["last_check_note"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut on_topic = on_topic;
    on_topic.sort();
    assert_eq!(
        on_topic,
        [
            ("committed".into(), "resolved by check-back".into()),
            ("committed".into(), "resolved by the producer".into()),
            ("rolled_back".into(), "resolved by the producer".into()),
        ],
        "{listed}"
    );
}

#[test]
fn java_push_and_lite_pull_consumers_share_retry_and_dead_letter() {
    let b = broker();
    java(
        b.remoting_addr(),
        "c",
        "ConsumerTest,BroadcastTest,PopTest",
        &[],
        Duration::from_secs(300),
    );
    // The POP consumers acked everything they popped, one ACK_MESSAGE each.
    let described = b.cli_ok(&["group", "describe", "java-pop-group-c", "--json"]);
    let g = &txmq_tests::json_lines(&described)[0];
    assert_eq!(
        (g["ack_floor"].as_u64(), g["in_flight"].as_u64()),
        (Some(30), Some(0)),
        "{g}"
    );
    // The broadcasting consumers read the log: the group has no delivery of its own.
    let groups = b.cli_ok(&["group", "list", "--json"]);
    assert!(
        txmq_tests::json_lines(&groups)
            .iter()
            .all(|g| g["group"] != "java-bc-group-c"),
        "{groups}"
    );
    // The four push consumers acked everything (their committed offsets are acks).
    let described = b.cli_ok(&["group", "describe", "java-push-group-c", "--json"]);
    let g = &txmq_tests::json_lines(&described)[0];
    assert_eq!(
        (g["ack_floor"].as_u64(), g["in_flight"].as_u64()),
        (Some(200), Some(0)),
        "{g}"
    );
    // The message the listener kept failing is in the group's dead letters, after
    // three deliveries (once, and maxReconsumeTimes = 2 more).
    let dlq = b.cli_ok(&["dlq", "list", "--group", "java-retry-group-c"]);
    assert!(dlq.contains("attempts=3"), "{dlq}");
    assert_eq!(dlq.lines().count(), 1, "{dlq}");
}

/// The mqadmin subset of item 8, against a single broker.
#[test]
fn mqadmin_commands() {
    use txmq_tests::remoting::mqadmin;
    let b = broker();
    let at = b.remoting_addr().to_string();
    let ok = |args: &[&str]| {
        let (ok, out) = mqadmin(&at, args);
        assert!(ok, "mqadmin {args:?}:\n{out}");
        out
    };
    let clusters = ok(&["clusterList"]);
    assert!(
        clusters.contains("DefaultCluster") && clusters.contains(&at),
        "{clusters}"
    );
    let update = [
        "updateTopic",
        "-c",
        "DefaultCluster",
        "-t",
        "adm",
        "-r",
        "3",
        "-w",
        "3",
    ];
    assert!(ok(&update).contains("success"));
    assert!(ok(&["topicList"]).lines().any(|l| l.trim() == "adm"));
    assert!(ok(&["topicRoute", "-t", "adm"]).contains(&at));
    // Two messages with key k1, sent raw: the answers carry their offset message ids.
    let mut raw = Raw::connect(&at);
    let mut ids = Vec::new();
    for i in 0..2 {
        let props = "KEYS\u{1}k1\u{2}";
        raw.request(
            310,
            i,
            0,
            &[("a", "pg"), ("b", "adm"), ("i", props)],
            b"admin body",
        );
        let r = raw.read(Duration::from_secs(5)).unwrap();
        assert_eq!(r.code, 0, "{r:?}");
        ids.push(r.ext["msgId"].clone());
    }
    b.cli_ok(&[
        "consume",
        "--topic",
        "adm",
        "--group",
        "g-adm",
        "--count",
        "1",
        "--timeout",
        "5",
    ]);
    let status = ok(&["topicStatus", "-t", "adm"]);
    assert_eq!(
        status.lines().filter(|l| l.starts_with("txmq")).count(),
        3,
        "updateTopic -r 3: {status}"
    );
    let progress = ok(&["consumerProgress", "-g", "g-adm"]);
    assert!(progress.contains("Consume Diff Total: 1"), "{progress}");
    // A Remoting member of a group, by its heartbeat.
    let beat = serde_json::json!({
        "clientID": "10.0.0.9@raw-member",
        "consumerDataSet": [{"groupName": "g-raw", "consumeType": "CONSUME_PASSIVELY",
            "messageModel": "CLUSTERING", "consumeFromWhere": "CONSUME_FROM_LAST_OFFSET",
            "subscriptionDataSet": [{"topic": "adm", "subString": "*", "expressionType": "TAG"}]}],
        "producerDataSet": [],
    });
    raw.request(34, 9, 0, &[], &serde_json::to_vec(&beat).unwrap());
    assert_eq!(raw.answer(9, Duration::from_secs(5)).unwrap().code, 0);
    let connection = ok(&["consumerConnection", "-g", "g-raw"]);
    assert!(connection.contains("10.0.0.9@raw-member"), "{connection}");
    let (online, out) = mqadmin(&at, &["consumerConnection", "-g", "g-nobody"]);
    assert!(!online && out.contains("206"), "{out}");
    assert!(ok(&["updateSubGroup", "-c", "DefaultCluster", "-g", "g-new"]).contains("success"));
    let by_key = ok(&["queryMsgByKey", "-t", "adm", "-k", "k1"]);
    assert_eq!(by_key.lines().count(), 3, "{by_key}");
    let by_id = ok(&["queryMsgById", "-t", "adm", "-i", &ids[1]]);
    assert!(
        by_id.contains("Keys:                [k1]") && by_id.contains(&ids[1]),
        "{by_id}"
    );
    assert!(ok(&["deleteTopic", "-c", "DefaultCluster", "-t", "adm"]).contains("success"));
    assert!(!ok(&["topicList"]).lines().any(|l| l.trim() == "adm"));
}

/// Item 7: `AclClientRPCHook` signatures checked against txmq's users; the rules decide
/// as on every face; an unsigned request is refused where users exist.
#[test]
fn signed_requests_as_users() {
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin");
    std::fs::write(&admin, "root root-secret-123\n").unwrap();
    let key = dir.path().join("broker-key");
    std::fs::write(&key, "a-long-random-broker-key-1234567890\n").unwrap();
    let app = dir.path().join("app");
    std::fs::write(&app, "app-secret-456\n").unwrap();
    let root = dir.path().join("root");
    std::fs::write(&root, "root-secret-123\n").unwrap();
    let b = TestBroker::start(&[
        "--remoting-listen",
        "127.0.0.1:0",
        "--bootstrap-admin-file",
        admin.to_str().unwrap(),
        "--broker-key-file",
        key.to_str().unwrap(),
    ]);
    let as_root = |args: &[&str]| {
        let mut all = vec![
            "--user",
            "root",
            "--user-secret-file",
            root.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        b.cli_ok(&all)
    };
    // The bootstrap user is made as the broker starts serving.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while b
        .cli(&[
            "--user",
            "root",
            "--user-secret-file",
            root.to_str().unwrap(),
            "user",
            "list",
        ])
        .status
        .code()
        != Some(0)
    {
        assert!(
            std::time::Instant::now() < until,
            "the bootstrap user never came"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    as_root(&[
        "user",
        "create",
        "app",
        "--new-secret-file",
        app.to_str().unwrap(),
    ]);
    as_root(&["topic", "create", "acl-ok"]);
    as_root(&["topic", "create", "acl-other"]);
    as_root(&["acl", "grant", "app", "pub,sub", "topic:acl-ok"]);
    as_root(&["acl", "grant", "app", "sub", "group:acl-group"]);

    let mut raw = Raw::connect(b.remoting_addr());
    raw.request(105, 1, 0, &[("topic", "acl-ok")], b"");
    let r = raw.read(Duration::from_secs(5)).unwrap();
    assert_eq!(r.code, 16, "{r:?}");
    assert!(r.remark.contains("signed"), "{r:?}");

    java(
        b.remoting_addr(),
        "acl",
        "AclTest",
        &[("txmq.ak", "app"), ("txmq.sk", "app-secret-456")],
        Duration::from_secs(180),
    );
    let bodies = read_as(&b, &root, "acl-ok");
    assert_eq!(bodies, ["signed"]);
}

fn read_as(b: &TestBroker, secret: &std::path::Path, topic: &str) -> Vec<String> {
    let out = b.cli_ok(&[
        "--user",
        "root",
        "--user-secret-file",
        secret.to_str().unwrap(),
        "consume",
        "--topic",
        topic,
        "--group",
        "audit",
        "--count",
        "10",
        "--timeout",
        "3",
        "--json",
    ]);
    bodies(&txmq_tests::json_lines(&out))
}

/// The Go client v2 on the Remoting face and the 5.x Go client on the gRPC face (which
/// always dials TLS: the endpoint gets a certificate of its own): what they send is read
/// back by a native consumer.
#[test]
fn go_clients_on_both_protocols() {
    let pki = txmq_tests::certs::Pki::new();
    let b = TestBroker::start(&[
        "--remoting-listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
        "--grpc-tls-cert",
        pki.cert.to_str().unwrap(),
        "--grpc-tls-key",
        pki.key.to_str().unwrap(),
        "--check-timeout",
        "2s",
        "--check-interval",
        "500ms",
    ]);
    txmq_tests::remoting::go(
        "TestRemoting|TestGrpc",
        &[
            ("TXMQ_NAMESRV", b.remoting_addr()),
            ("TXMQ_GRPC", b.grpc_addr()),
            ("TXMQ_RUN", "go"),
        ],
        Duration::from_secs(400),
    );
    let mut expect: Vec<String> = (0..15).map(|i| format!("go-{i}")).collect();
    expect.sort();
    assert_eq!(bodies(&read(&b, "go-remoting-go", 20, 5)), expect);
    assert_eq!(
        bodies(&read(&b, "go-txn-go", 5, 5)),
        ["go-txn-commit", "go-txn-unknown"]
    );
    let mut grpc: Vec<String> = (0..5).map(|i| format!("grpc-{i}")).collect();
    grpc.push("grpc-txn".into());
    grpc.sort();
    assert_eq!(bodies(&read(&b, "go-grpc-go", 10, 5)), grpc);
}

/// The 4.9 line of the Java client (4.9.8), the same producer, transaction and consumer
/// scenarios as the 5.x client's.
#[test]
fn the_java_4_9_client() {
    let b = broker();
    txmq_tests::remoting::java_client(
        Some("client49"),
        b.remoting_addr(),
        "v49",
        "ProducerTest,TransactionTest,ConsumerTest",
        &[],
        Duration::from_secs(400),
    );
    let got = read(&b, "java-sync-v49", 10, 5);
    assert_eq!(got.len(), 10);
    let txn = read(&b, "java-txn-v49", 3, 5);
    assert_eq!(bodies(&txn), ["txn-commit", "txn-unknown"]);
    let dlq = b.cli_ok(&["dlq", "list", "--group", "java-retry-group-v49"]);
    assert!(dlq.contains("attempts=3"), "{dlq}");
}

/// Item 7: `setUseTLS(true)`. With `--tls-cert/--tls-key` the Remoting port speaks TLS
/// only (name-server requests too): the Java producer and push consumer over TLS, and
/// what they sent read back by the native CLI over TLS.
#[test]
fn the_java_client_over_tls() {
    let pki = txmq_tests::certs::Pki::new();
    let b = TestBroker::start(&[
        "--remoting-listen",
        "127.0.0.1:0",
        "--tls-cert",
        pki.cert.to_str().unwrap(),
        "--tls-key",
        pki.key.to_str().unwrap(),
    ]);
    // A plaintext client gets nothing from it.
    let mut plain = Raw::connect(b.remoting_addr());
    plain.request(105, 1, 0, &[("topic", "java-tls-t")], b"");
    assert!(plain.answer(1, Duration::from_secs(3)).is_none());
    java(
        b.remoting_addr(),
        "t",
        "TlsTest",
        &[],
        Duration::from_secs(180),
    );
    let out = b.cli_ok(&[
        "--ca",
        pki.ca.to_str().unwrap(),
        "consume",
        "--topic",
        "java-tls-t",
        "--group",
        "native-reader",
        "--count",
        "3",
        "--timeout",
        "5",
        "--json",
    ]);
    assert_eq!(
        bodies(&txmq_tests::json_lines(&out)),
        ["tls-0", "tls-1", "tls-2"]
    );
}
