//! The Remoting face on the wire (issue 27), with a raw client: every request answered
//! by its opaque and bad frames refused; a group shared by native and Remoting members;
//! lanes that move, shrink or are asked again; topics' queue counts; a broker group's
//! routes naming its leader.

use std::time::Duration;

use txmq_tests::TestBroker;
use txmq_tests::remoting::{Raw, broker};

#[test]
fn requests_are_answered_by_opaque_and_bad_frames_close_the_connection() {
    let b = broker();
    let at = b.remoting_addr().to_string();
    let mut c = Raw::connect(&at);
    // An unknown code: REQUEST_CODE_NOT_SUPPORTED, with the request's opaque.
    c.request(9999, 41, 0, &[], b"");
    let r = c.read(Duration::from_secs(5)).expect("an answer");
    assert_eq!((r.code, r.opaque, r.flag & 1), (3, 41, 1), "{r:?}");
    // A one-way request gets no answer; the connection goes on.
    c.request(9999, 42, 2, &[], b"");
    assert!(c.read(Duration::from_millis(700)).is_none());
    let mut c = Raw::connect(&at);
    // A route, created on demand, naming this broker as master (id 0).
    c.request(105, 7, 0, &[("topic", "raw-topic")], b"");
    let r = c.read(Duration::from_secs(5)).expect("a route");
    assert_eq!((r.code, r.opaque), (0, 7), "{r:?}");
    let route: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(route["brokerDatas"][0]["brokerAddrs"]["0"], at.as_str());
    assert_eq!(route["queueDatas"][0]["writeQueueNums"], 8);
    // A name txmq cannot take: TOPIC_NOT_EXIST, saying why.
    c.request(105, 8, 0, &[("topic", "bad topic")], b"");
    let r = c.read(Duration::from_secs(5)).unwrap();
    assert_eq!(r.code, 17, "{r:?}");
    assert!(r.remark.contains("character"), "{r:?}");
    // A send without its topic: INVALID_PARAMETER, and nothing stored.
    c.request(310, 9, 0, &[("a", "pg")], b"body");
    let r = c.read(Duration::from_secs(5)).unwrap();
    assert_eq!(r.code, 29, "{r:?}");
    assert!(r.remark.contains("field b"), "{r:?}");
    // A zlib flag on a body that is not zlib: MESSAGE_ILLEGAL.
    c.request(
        310,
        10,
        0,
        &[("a", "pg"), ("b", "raw-topic"), ("f", "1")],
        b"plain",
    );
    let r = c.read(Duration::from_secs(5)).unwrap();
    assert_eq!(r.code, 13, "{r:?}");
    // END_TRANSACTION naming no transaction of this broker: refused, counted.
    c.request(
        37,
        11,
        0,
        &[
            ("producerGroup", "pg"),
            ("transactionId", "nope"),
            ("commitOrRollback", "8"),
        ],
        b"",
    );
    assert_eq!(c.read(Duration::from_secs(5)).unwrap().code, 29);
    // A commit, then a rollback of the same transaction: the rollback is refused, and
    // since END_TRANSACTION is one-way for the clients, the refusal is on the
    // transaction's listing for operators (the one-way one too).
    let half = [
        ("a", "raw-pg"),
        ("b", "raw-txn"),
        ("f", "4"),
        ("i", "TRAN_MSG\u{1}true\u{2}PGROUP\u{1}raw-pg\u{2}"),
    ];
    c.request(310, 12, 0, &half, b"half");
    let r = c.read(Duration::from_secs(5)).unwrap();
    assert_eq!(r.code, 0, "{r:?}");
    let txn = r.ext["transactionId"].clone();
    let end = |outcome: &'static str| {
        [
            ("producerGroup", "raw-pg"),
            ("transactionId", txn.as_str()),
            ("commitOrRollback", outcome),
            ("fromTransactionCheck", "false"),
        ]
    };
    c.request(37, 13, 0, &end("8"), b"");
    assert_eq!(c.read(Duration::from_secs(5)).unwrap().code, 0);
    c.request(37, 14, 0, &end("12"), b"");
    assert_ne!(c.read(Duration::from_secs(5)).unwrap().code, 0);
    c.request(37, 15, 2, &end("12"), b"");
    let listed = txmq_tests::eventually_blocking(Duration::from_secs(10), || {
        let out = b.cli_ok(&["txn", "list", "--json"]);
        txmq_tests::json_lines(&out)
            .into_iter()
            .find(|t| t["id"] == txn.as_str() && t["refused_ends"] == 2)
    })
    .unwrap_or_else(|| panic!("{}", b.cli_ok(&["txn", "list"])));
    assert_eq!(listed["state"], "committed", "{listed}");
    let note = listed["refused_note"].as_str().unwrap();
    assert!(
        note.contains("one-way rollback") && note.contains("committed"),
        "{listed}"
    );

    // Frames that are not RemotingCommands close their connection, and only it.
    for bad in [
        &[0xFFu8, 0xFF, 0xFF, 0xFF][..],
        &[0, 0, 0, 6, 0, 0, 0, 9, b'{', b'}'][..],
        &[0, 0, 0, 6, 7, 0, 0, 2, b'{', b'}'][..],
        &[0, 0, 0, 7, 0, 0, 0, 3, b'[', b'1', b']'][..],
    ] {
        let mut c = Raw::connect(&at);
        c.write(bad);
        assert!(c.is_closed(Duration::from_secs(5)), "{bad:?}");
    }
    let mut c = Raw::connect(&at);
    c.request(105, 1, 0, &[("topic", "raw-topic")], b"");
    assert_eq!(c.read(Duration::from_secs(5)).unwrap().code, 0);

    // RocketMQ users type the name server's port out of habit: txmq's native port
    // names the Remoting face and closes.
    let mut native = Raw::connect(b.addr());
    native.request(105, 1, 0, &[("topic", "raw-topic")], b"");
    assert!(native.is_closed(Duration::from_secs(5)));
    let log = b.log_text();
    assert!(
        log.contains("a RocketMQ Remoting client came to txmq's native port") && log.contains(&at),
        "{log}"
    );
}

/// A group with a native and a Remoting member at once: each message goes to one of
/// them (one delivery per group), the Remoting member's committed offset acks what it
/// was handed, and together they leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_native_and_remoting_members_shares_one_delivery() {
    let b = broker();
    let p = txmq_tests::producer(&b).await;
    for i in 0..20 {
        p.send(txmq_client::Message::new("mixed", format!("m{i}")))
            .await
            .unwrap();
    }
    let mut options = txmq_client::ConsumerOptions::new("mixed-group", "mixed");
    options.window = 5;
    let mut native = txmq_client::Consumer::subscribe(b.addr(), options)
        .await
        .unwrap();
    let mut held = Vec::new();
    while held.len() < 5 {
        let d = txmq_tests::next(&mut native, Duration::from_secs(10))
            .await
            .expect("the native member's share");
        held.push(d);
    }
    let at = b.remoting_addr().to_string();
    let pulled = tokio::task::spawn_blocking(move || {
        let mut raw = Raw::connect(&at);
        let beat = serde_json::json!({
            "clientID": "10.0.0.9@mixed",
            "consumerDataSet": [{"groupName": "mixed-group", "consumeType": "CONSUME_PASSIVELY",
                "messageModel": "CLUSTERING", "consumeFromWhere": "CONSUME_FROM_FIRST_OFFSET",
                "subscriptionDataSet": [{"topic": "mixed", "subString": "*", "expressionType": "TAG"}]}],
            "producerDataSet": [],
        });
        raw.request(34, 1, 0, &[], &serde_json::to_vec(&beat).unwrap());
        assert_eq!(raw.answer(1, Duration::from_secs(5)).unwrap().code, 0);
        // A new group on a young topic starts at its first message, as on Apache's
        // broker (a LAST_OFFSET consumer started beside its producer misses nothing);
        // on a topic with nothing yet the client chooses (22).
        for (topic, code, offset) in [("mixed", 0, Some("0")), ("nothing-yet", 22, None)] {
            let query = [("consumerGroup", "new-group"), ("topic", topic), ("queueId", "1")];
            raw.request(14, 9, 0, &query, b"");
            let r = raw.answer(9, Duration::from_secs(5)).unwrap();
            assert_eq!(r.code, code, "{topic}: {r:?}");
            assert_eq!(r.ext.get("offset").map(String::as_str), offset, "{topic}: {r:?}");
        }
        let pull = [
            ("consumerGroup", "mixed-group"),
            ("topic", "mixed"),
            ("queueId", "3"),
            ("queueOffset", "0"),
            ("maxMsgNums", "32"),
            ("sysFlag", "2"),
            ("commitOffset", "0"),
            ("suspendTimeoutMillis", "1000"),
        ];
        raw.request(11, 2, 0, &pull, b"");
        let r = raw.answer(2, Duration::from_secs(10)).unwrap();
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(r.ext["nextBeginOffset"], "15", "{r:?}");
        // The records' bodies (a V1 record: the body follows 4+4+4+4+4+8+8+4+8+8+8+8+4+8
        // bytes and its 4-byte length).
        let mut bodies = Vec::new();
        let mut rest = &r.body[..];
        while rest.len() >= 4 {
            let total = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            let record = &rest[..total];
            let at = 4 + 4 + 4 + 4 + 4 + 8 + 8 + 4 + 8 + 8 + 8 + 8 + 4 + 8;
            let len = u32::from_be_bytes(record[at..at + 4].try_into().unwrap()) as usize;
            bodies.push(String::from_utf8(record[at + 4..at + 4 + len].to_vec()).unwrap());
            rest = &rest[total..];
        }
        // Its committed offset acks them.
        let commit = [
            ("consumerGroup", "mixed-group"),
            ("topic", "mixed"),
            ("queueId", "3"),
            ("commitOffset", "15"),
        ];
        raw.request(15, 3, 0, &commit, b"");
        assert_eq!(raw.answer(3, Duration::from_secs(5)).unwrap().code, 0);
        bodies
    })
    .await
    .unwrap();
    let mut all: Vec<String> = pulled.clone();
    for d in held {
        all.push(String::from_utf8(d.body().to_vec()).unwrap());
        d.ack().await.unwrap();
    }
    assert_eq!(pulled.len(), 15, "{pulled:?}");
    all.sort();
    let mut expect: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    expect.sort();
    assert_eq!(all, expect, "each message to exactly one member");
    let described = b.cli_ok(&["group", "describe", "mixed-group", "--json"]);
    let g = &txmq_tests::json_lines(&described)[0];
    assert_eq!(
        (g["ack_floor"].as_u64(), g["in_flight"].as_u64()),
        (Some(20), Some(0)),
        "{g}"
    );
}

/// A member's heartbeat as a raw client sends it.
fn join(raw: &mut Raw, client: &str, group: &str, topic: &str, opaque: i32) {
    let beat = serde_json::json!({
        "clientID": client,
        "consumerDataSet": [{"groupName": group, "consumeType": "CONSUME_PASSIVELY",
            "messageModel": "CLUSTERING", "consumeFromWhere": "CONSUME_FROM_FIRST_OFFSET",
            "subscriptionDataSet": [{"topic": topic, "subString": "*", "expressionType": "TAG"}]}],
        "producerDataSet": [],
    });
    raw.request(34, opaque, 0, &[], &serde_json::to_vec(&beat).unwrap());
    assert_eq!(
        raw.answer(i64::from(opaque), Duration::from_secs(5))
            .unwrap()
            .code,
        0
    );
}

/// Pulls lane `queue` from `offset` (at most `max`): the bodies and the next offset.
fn pull(
    raw: &mut Raw,
    group: &str,
    topic: &str,
    queue: u32,
    offset: u64,
    max: u32,
    opaque: i32,
) -> (Vec<String>, u64) {
    let (queue, offset, max) = (queue.to_string(), offset.to_string(), max.to_string());
    let fields = [
        ("consumerGroup", group),
        ("topic", topic),
        ("queueId", &queue),
        ("queueOffset", &offset),
        ("maxMsgNums", &max),
        ("sysFlag", "2"),
        ("suspendTimeoutMillis", "3000"),
    ];
    raw.request(11, opaque, 0, &fields, b"");
    let r = raw
        .answer(i64::from(opaque), Duration::from_secs(10))
        .unwrap();
    let next = r.ext["nextBeginOffset"].parse().unwrap();
    let mut bodies = Vec::new();
    let mut rest = &r.body[..];
    while rest.len() >= 4 {
        let total = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        let at = 84;
        let len = u32::from_be_bytes(rest[at..at + 4].try_into().unwrap()) as usize;
        bodies.push(String::from_utf8(rest[at + 4..at + 4 + len].to_vec()).unwrap());
        rest = &rest[total..];
    }
    (bodies, next)
}

/// A rebalance under load (found with the 4.9 Java client): when a queue moves from
/// one member to another, the new owner's committed offset must not ack what the old
/// owner was handed and never consumed; those messages come again once their leases
/// end.
#[test]
fn a_moved_queue_acks_only_what_its_new_owner_consumed() {
    let b = TestBroker::start(&["--remoting-listen", "127.0.0.1:0", "--lease", "2s"]);
    for i in 0..4 {
        b.cli_ok(&["produce", "--topic", "moved", "--body", &format!("m{i}")]);
    }
    let at = b.remoting_addr().to_string();
    let mut a = Raw::connect(&at);
    join(&mut a, "10.0.0.1@A", "moved-group", "moved", 1);
    let (got_a, next) = pull(&mut a, "moved-group", "moved", 0, 0, 2, 2);
    assert_eq!(
        (got_a.as_slice(), next),
        (&["m0".to_string(), "m1".to_string()][..], 2)
    );
    // The queue moves to B, which consumes and commits past A's numbers.
    let mut bee = Raw::connect(&at);
    join(&mut bee, "10.0.0.2@B", "moved-group", "moved", 1);
    let (got_b, next) = pull(&mut bee, "moved-group", "moved", 0, next, 2, 2);
    assert_eq!(got_b, ["m2", "m3"]);
    let commit = [
        ("consumerGroup", "moved-group"),
        ("topic", "moved"),
        ("queueId", "0"),
        ("commitOffset", "4"),
    ];
    bee.request(15, 3, 0, &commit, b"");
    assert_eq!(bee.answer(3, Duration::from_secs(5)).unwrap().code, 0);
    let floor = || {
        let out = b.cli_ok(&["group", "describe", "moved-group", "--json"]);
        txmq_tests::json_lines(&out)[0]["ack_floor"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(floor(), 0, "B's commit acked what only A was handed");
    // A never commits (its queue was taken); its two come again, to B.
    let mut again = Vec::new();
    let mut offset = next;
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while again.len() < 2 && std::time::Instant::now() < until {
        let (got, n) = pull(&mut bee, "moved-group", "moved", 0, offset, 2, 4);
        again.extend(got);
        offset = n;
    }
    again.sort();
    assert_eq!(again, ["m0", "m1"]);
}

/// The hostile review's loss through numbering: a client asks again from where it
/// asked before (its answer was lost, or it dropped its buffer), so it never received
/// what the lane handed out from there; its next commit must not ack those.
#[test]
fn a_pull_from_an_earlier_offset_lets_go_what_the_client_never_received() {
    let b = TestBroker::start(&["--remoting-listen", "127.0.0.1:0", "--lease", "2s"]);
    for i in 0..4 {
        b.cli_ok(&["produce", "--topic", "again", "--body", &format!("m{i}")]);
    }
    let mut c = Raw::connect(b.remoting_addr());
    join(&mut c, "10.0.0.1@C", "again-group", "again", 1);
    let (lost, _) = pull(&mut c, "again-group", "again", 0, 0, 2, 2);
    assert_eq!(lost, ["m0", "m1"]);
    // The answer "was lost": the client asks from 0 again.
    let (got, next) = pull(&mut c, "again-group", "again", 0, 0, 2, 3);
    assert_eq!(
        (got.as_slice(), next),
        (&["m2".to_string(), "m3".to_string()][..], 4)
    );
    let commit = [
        ("consumerGroup", "again-group"),
        ("topic", "again"),
        ("queueId", "0"),
        ("commitOffset", "4"),
    ];
    c.request(15, 4, 0, &commit, b"");
    assert_eq!(c.answer(4, Duration::from_secs(5)).unwrap().code, 0);
    let out = b.cli_ok(&["group", "describe", "again-group", "--json"]);
    let g = &txmq_tests::json_lines(&out)[0];
    assert_eq!(
        g["ack_floor"].as_u64(),
        Some(0),
        "acked what the client never had: {g}"
    );
    // They come again once their leases end.
    let mut again = Vec::new();
    let mut offset = 4;
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while again.len() < 2 && std::time::Instant::now() < until {
        let (got, n) = pull(&mut c, "again-group", "again", 0, offset, 2, 5);
        again.extend(got);
        offset = n;
    }
    again.sort();
    assert_eq!(again, ["m0", "m1"]);
}

/// The queues a route names: what the Raw client's GET_ROUTEINFO_BY_TOPIC answers.
fn route_queues(b: &TestBroker, topic: &str) -> (u64, u64) {
    let mut raw = Raw::connect(b.remoting_addr());
    raw.request(105, 1, 0, &[("topic", topic)], b"");
    let r = raw.answer(1, Duration::from_secs(5)).unwrap();
    assert_eq!(r.code, 0, "{topic}: {r:?}");
    let route: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let q = &route["queueDatas"][0];
    (
        q["readQueueNums"].as_u64().unwrap(),
        q["writeQueueNums"].as_u64().unwrap(),
    )
}

/// Item 5: a topic's queue count is its own (`txmq topic create/alter --queues`,
/// `mqadmin updateTopic -r/-w`), stored, and what every route names; a count out of
/// range is refused with a sentence.
#[test]
fn a_topic_keeps_its_queue_count() {
    let mut b = broker();
    let made = b.cli_ok(&[
        "topic",
        "create",
        "four",
        "--queues",
        "4",
        "--retention",
        "1d",
        "--json",
    ]);
    assert_eq!(txmq_tests::json_lines(&made)[0]["queues"], 4, "{made}");
    assert_eq!(route_queues(&b, "four"), (4, 4));
    // UPDATE_AND_CREATE_TOPIC, as mqadmin updateTopic sends it: an existing topic's
    // count changes; a new topic is made with its count.
    let mut raw = Raw::connect(b.remoting_addr());
    let update = |raw: &mut Raw, topic: &str, read: &str, opaque: i32| {
        let fields = [
            ("topic", topic),
            ("defaultTopic", "TBW102"),
            ("readQueueNums", read),
            ("writeQueueNums", read),
            ("perm", "6"),
            ("topicFilterType", "SINGLE_TAG"),
        ];
        raw.request(17, opaque, 0, &fields, b"");
        raw.answer(i64::from(opaque), Duration::from_secs(5))
            .unwrap()
    };
    assert_eq!(update(&mut raw, "four", "2", 1).code, 0);
    assert_eq!(route_queues(&b, "four"), (2, 2));
    assert_eq!(update(&mut raw, "sixteen", "16", 2).code, 0);
    assert_eq!(route_queues(&b, "sixteen"), (16, 16));
    let refused = update(&mut raw, "sixteen", "65", 3);
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(refused.remark.contains("1 to 64"), "{refused:?}");
    let refused = update(&mut raw, "sixteen", "many", 4);
    assert_ne!(refused.code, 0, "{refused:?}");
    assert_eq!(route_queues(&b, "sixteen"), (16, 16), "nothing changed");
    // The CLI's alter changes only what it is given: the retention stays.
    let altered = b.cli_ok(&["topic", "alter", "four", "--queues", "3", "--json"]);
    let altered = &txmq_tests::json_lines(&altered)[0];
    assert_eq!(
        (altered["queues"].as_u64(), altered["retention_ms"].as_u64()),
        (Some(3), Some(86_400_000)),
        "{altered}"
    );
    let nothing = b.cli(&["topic", "alter", "four"]);
    assert!(!nothing.status.success());
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("nothing to change"));
    assert!(
        !b.cli(&["topic", "create", "x", "--queues", "65"])
            .status
            .success()
    );
    // A pull of a queue the topic no longer has is refused, not served.
    let pull = [
        ("consumerGroup", "g"),
        ("topic", "four"),
        ("queueId", "3"),
        ("queueOffset", "0"),
        ("maxMsgNums", "1"),
        ("sysFlag", "0"),
    ];
    raw.request(11, 5, 0, &pull, b"");
    let r = raw.answer(5, Duration::from_secs(5)).unwrap();
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.remark.contains("0..3"), "{r:?}");
    // Stored: a restarted broker names the same counts; 0 is the broker's again.
    drop(raw);
    b.restart();
    // Served once the storage is open (the native port answers from then on).
    b.cli_ok(&["topic", "list"]);
    assert_eq!(route_queues(&b, "four"), (3, 3));
    assert_eq!(route_queues(&b, "sixteen"), (16, 16));
    b.cli_ok(&["topic", "alter", "four", "--queues", "0"]);
    assert_eq!(route_queues(&b, "four"), (8, 8));
    let listed = b.cli_ok(&["topic", "list", "--json"]);
    let sixteen = txmq_tests::json_lines(&listed)
        .into_iter()
        .find(|t| t["name"] == "sixteen")
        .unwrap();
    assert_eq!(sixteen["queues"], 16, "{listed}");
}

/// The route a node's Remoting port answers for `topic`: the broker address it names
/// and its read queue count (or the answer's code when it is no route).
fn routed(at: &str, topic: &str) -> Result<(String, u64), i64> {
    let mut raw = Raw::connect(at);
    raw.request(105, 1, 0, &[("topic", topic)], b"");
    let r = raw.answer(1, Duration::from_secs(10)).unwrap();
    if r.code != 0 {
        return Err(r.code);
    }
    let route: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    Ok((
        route["brokerDatas"][0]["brokerAddrs"]["0"]
            .as_str()
            .unwrap()
            .to_string(),
        route["queueDatas"][0]["readQueueNums"].as_u64().unwrap(),
    ))
}

/// Item 2 in a broker group: every node's Remoting port answers routes naming the
/// leader's Remoting address (a follower reads the topic and its queue count from its
/// replicated state), a follower answers a send with SERVICE_NOT_AVAILABLE (14: the
/// Java producer tries again after refreshing its route), mqadmin pointed at a follower
/// finds the leader, and after the leader dies the survivors' routes name the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_groups_routes_name_its_leader() {
    use txmq_tests::group::TestGroup;
    let mut args = txmq_tests::torture::FAST.to_vec();
    args.extend(["--remoting-listen", "127.0.0.1:0"]);
    let mut group = TestGroup::start(3, &args);
    let leader = group
        .leader(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no leader elected\n{}", group.logs()));
    let follower = (leader + 1) % 3;
    let created = group.cli(&["topic", "create", "grp", "--queues", "4"]);
    assert!(created.contains("created"), "{created}\n{}", group.logs());
    let leader_at = group.nodes[leader].remoting_addr().to_string();
    let follower_at = group.nodes[follower].remoting_addr().to_string();
    // The follower's state may trail the create by a moment.
    let (f, l) = (follower_at.clone(), leader_at.clone());
    let route = txmq_tests::eventually(Duration::from_secs(10), || {
        let f = f.clone();
        async move {
            tokio::task::spawn_blocking(move || routed(&f, "grp").ok())
                .await
                .unwrap()
        }
    })
    .await;
    assert_eq!(route, Some((l.clone(), 4)), "{}", group.logs());
    let (f, l2) = (follower_at.clone(), leader_at.clone());
    tokio::task::spawn_blocking(move || {
        assert_eq!(routed(&l2, "grp"), Ok((l2.clone(), 4)));
        assert_eq!(
            routed(&f, "nothing-yet").map(|r| r.0),
            Ok(l2.clone()),
            "made on demand"
        );
        let send = |at: &str| {
            let mut raw = Raw::connect(at);
            let fields = [("a", "pg"), ("b", "grp"), ("e", "0"), ("i", "")];
            raw.request(310, 2, 0, &fields, b"through the group");
            raw.answer(2, Duration::from_secs(10)).unwrap()
        };
        let refused = send(&f);
        assert_eq!(refused.code, 14, "{refused:?}");
        let stored = send(&l2);
        assert_eq!(stored.code, 0, "{stored:?}");
        // mqadmin, its name server a follower: the cluster's broker is the leader.
        let (ok, out) = txmq_tests::remoting::mqadmin(&f, &["clusterList"]);
        assert!(ok && out.contains(&l2), "{out}");
        // updateTopic sends to the broker the cluster names (the leader), and the
        // route a follower then answers has the new count.
        let update = [
            "updateTopic",
            "-c",
            "DefaultCluster",
            "-t",
            "grp2",
            "-r",
            "2",
            "-w",
            "2",
        ];
        let (ok, out) = txmq_tests::remoting::mqadmin(&f, &update);
        assert!(ok && out.contains("success"), "{out}");
        let (ok, out) = txmq_tests::remoting::mqadmin(&f, &["topicRoute", "-t", "grp2"]);
        assert!(
            ok && out.contains(&l2) && out.contains("\"readQueueNums\":2"),
            "{out}"
        );
    })
    .await
    .unwrap();
    group.nodes[leader].kill9();
    let next = group
        .leader(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no new leader\n{}", group.logs()));
    let next_at = group.nodes[next].remoting_addr().to_string();
    let other = (0..3).find(|i| *i != leader && *i != next).unwrap();
    let other_at = group.nodes[other].remoting_addr().to_string();
    let route = txmq_tests::eventually(Duration::from_secs(20), || {
        let o = other_at.clone();
        async move {
            tokio::task::spawn_blocking(move || routed(&o, "grp").ok())
                .await
                .unwrap()
        }
    })
    .await;
    assert_eq!(route, Some((next_at, 4)), "{}", group.logs());
}
