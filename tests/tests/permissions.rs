//! The permission table (issue 26): every operation of the broker's one list
//! (`broker/src/service/access.rs`, read here from its source) is driven through each
//! face that has it, as a user without rules (denied), with every permission the table
//! names (allowed), with all of them but one (denied: each one is checked), and
//! unauthenticated (refused). An operation added to the list without a driver here
//! fails the test, as does one whose service function forgets to ask.

use std::collections::BTreeMap;
use std::time::Duration;

use txmq_client::connection::{Connection, hello};
use txmq_client::{Admin, ErrorCode, RuleSpec, User};
use txmq_protocol::pb::{self, frame::Body};
use txmq_tests::TestBroker;

const ROOT_SECRET: &str = "root-s3cret-Perm";
const USER_SECRET: &str = "user-s3cret-Perm";

/// One row of the table: the operation's name and what it needs, as (action, kind).
#[derive(Debug, Clone)]
struct Row {
    variant: String,
    name: String,
    needs: Vec<(String, String)>,
}

/// The table, read from the one list in the broker's source.
fn table() -> Vec<Row> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../broker/src/service/access.rs"
    );
    let source = std::fs::read_to_string(path).expect("read access.rs");
    let start = source.find("operations! {").expect("the operations! list");
    let mut rows = Vec::new();
    for line in source[start..].lines().skip(1) {
        let line = line.trim();
        if line == "}" {
            break;
        }
        if line.starts_with("///") || line.is_empty() {
            continue;
        }
        // `Send = "send": [(Pub, Topic)],`
        let (variant, rest) = line.split_once(" = \"").expect("a row");
        let (name, rest) = rest.split_once("\": [").expect("a row's name");
        let needs = rest
            .trim_end_matches("],")
            .split("),")
            .map(|p| p.trim().trim_start_matches('(').trim_end_matches(')'))
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (a, k) = p.split_once(", ").expect("(action, kind)");
                (a.to_lowercase(), k.to_string())
            })
            .collect();
        rows.push(Row {
            variant: variant.to_string(),
            name: name.to_string(),
            needs,
        });
    }
    assert!(rows.len() >= 30, "the list was not read: {rows:?}");
    rows
}

/// A rule for `action` on every resource of `kind`.
fn grant(action: &str, kind: &str) -> RuleSpec {
    let resource = match kind {
        "Topic" => "topic:*",
        "Group" => "group:*",
        "ProducerGroup" => "producer-group:*",
        "Cluster" => "cluster",
        other => panic!("unknown kind {other}"),
    };
    RuleSpec {
        user: "u".into(),
        resource: resource.into(),
        actions: vec![action.into()],
        ..Default::default()
    }
}

fn msg(topic: &str) -> pb::Message {
    pb::Message {
        topic: topic.into(),
        body: bytes::Bytes::from_static(b"x"),
        ..Default::default()
    }
}

/// A txmq id that names nothing (the operation is checked before it is looked up).
const NOBODY: &str = "0000000000000000000000000000abcd";

/// Opens a native connection as the user, with `role` and producer group `group`,
/// answering checks or not; the handshake's error if refused.
async fn connect(
    addr: &str,
    user: Option<&User>,
    role: pb::Role,
    group: &str,
    answers_checks: bool,
) -> Result<Connection, txmq_client::Error> {
    let mut h = hello(role, group, "");
    h.answers_checks = answers_checks;
    Connection::open_as(addr, h, user, None, Duration::from_secs(10))
        .await
        .map(|(c, _)| c)
}

/// Does operation `variant` on the native face as `user`: the broker's error code
/// (`None`: done), or `Err` when the native face has no such operation.
async fn native(addr: &str, user: &User, variant: &str) -> Result<Option<ErrorCode>, ()> {
    use pb::acl_request::Action as Acl;
    use pb::user_request::Action as U;
    let handle = || pb::DeliveryHandle {
        group: "g1".into(),
        topic: "t1".into(),
        offset: 0,
        lease_id: 1,
    };
    let (role, group, checks) = match variant {
        "Prepare" | "EndTxn" => (pb::Role::Producer, "pg", false),
        "AnswerChecks" => (pb::Role::Producer, "pg", true),
        "ResolveTxn" => (pb::Role::Admin, "", false),
        _ => (pb::Role::Admin, "", false),
    };
    let body = match variant {
        "Send" => Body::Send(pb::SendRequest {
            messages: vec![msg("t1")],
            ..Default::default()
        }),
        "Prepare" => Body::Send(pb::SendRequest {
            messages: vec![msg("t1")],
            transactional: true,
            ..Default::default()
        }),
        "EndTxn" => Body::EndTxn(pb::EndTxnRequest {
            txn_id: NOBODY.into(),
            outcome: pb::TxnOutcome::Rollback as i32,
            operator: false,
        }),
        "ResolveTxn" => Body::EndTxn(pb::EndTxnRequest {
            txn_id: NOBODY.into(),
            outcome: pb::TxnOutcome::Rollback as i32,
            operator: true,
        }),
        "AnswerChecks" => {
            // Asked at the handshake: a producer that answers checks registers there.
            return Ok(connect(addr, Some(user), role, group, checks)
                .await
                .err()
                .map(|e| e.code().expect("a broker's refusal")));
        }
        "Recall" | "Route" | "DeadLetter" => return Err(()),
        "Subscribe" => Body::Subscribe(pb::SubscribeRequest {
            group: "g1".into(),
            topic: "t1".into(),
            ..Default::default()
        }),
        "Ack" => Body::Ack(pb::AckRequest {
            handles: vec![handle()],
        }),
        "Nack" => Body::Nack(pb::NackRequest {
            handle: Some(handle()),
            ..Default::default()
        }),
        "Extend" => Body::Extend(pb::ExtendRequest {
            handle: Some(handle()),
            lease_ms: 1000,
        }),
        "CreateTopic" => Body::CreateTopic(pb::CreateTopicRequest {
            topic: "t1".into(),
            ..Default::default()
        }),
        "AlterTopic" => Body::AlterTopic(pb::AlterTopicRequest {
            topic: "t1".into(),
            ..Default::default()
        }),
        "DeleteTopic" => Body::DeleteTopic(pb::DeleteTopicRequest {
            topic: "no-such-topic".into(),
            ..Default::default()
        }),
        "ListTopics" => Body::ListTopics(pb::ListTopicsRequest::default()),
        "ListGroups" => Body::ListGroups(pb::ListGroupsRequest::default()),
        "DescribeGroup" => Body::DescribeGroup(pb::DescribeGroupRequest { group: "g1".into() }),
        "ListDeadLetters" => Body::ListDeadLetters(pb::ListDeadLettersRequest {
            group: "g1".into(),
            ..Default::default()
        }),
        "Redrive" => Body::Redrive(pb::RedriveRequest {
            group: "g1".into(),
            message_id: NOBODY.into(),
        }),
        "ResetGroup" => Body::ResetGroup(pb::ResetGroupRequest {
            group: "g1".into(),
            topic: "t1".into(),
            to: Some(pb::reset_group_request::To::Latest(true)),
        }),
        "DeleteGroup" => Body::DeleteGroup(pb::DeleteGroupRequest {
            group: "no-such-group".into(),
        }),
        "ListTxns" => Body::ListTxns(pb::ListTxnsRequest::default()),
        "RearmTxn" => Body::RearmTxn(pb::RearmTxnRequest {
            txn_id: NOBODY.into(),
        }),
        "ShowMessage" => Body::ShowMessage(pb::ShowMessageRequest {
            message_id: NOBODY.into(),
            body: false,
        }),
        "FindMessages" => Body::FindMessages(pb::FindMessagesRequest {
            topic: "t1".into(),
            ..Default::default()
        }),
        "ListScheduled" => Body::ListScheduled(pb::ListScheduledRequest::default()),
        "CancelScheduled" => Body::CancelScheduled(pb::CancelScheduledRequest {
            message_id: NOBODY.into(),
        }),
        "Stats" => Body::Stats(pb::StatsRequest {}),
        "ClusterStatus" => Body::ClusterStatus(pb::ClusterStatusRequest {}),
        "ClusterChange" => Body::ClusterChange(pb::ClusterChangeRequest {
            action: pb::cluster_change_request::Action::Remove as i32,
            node_id: 9,
            peer_addr: String::new(),
        }),
        "UserChange" => Body::User(pb::UserRequest {
            action: U::Delete as i32,
            name: "no-such-user".into(),
            ..Default::default()
        }),
        "UserList" => Body::User(pb::UserRequest {
            action: U::List as i32,
            ..Default::default()
        }),
        "AclChange" => Body::Acl(pb::AclRequest {
            action: Acl::Revoke as i32,
            rule_id: 999_999,
            ..Default::default()
        }),
        "AclList" => Body::Acl(pb::AclRequest {
            action: Acl::List as i32,
            ..Default::default()
        }),
        "AclCheck" => Body::Acl(pb::AclRequest {
            action: Acl::Check as i32,
            user: "u".into(),
            resource: "topic:t1".into(),
            actions: vec!["pub".into()],
            ..Default::default()
        }),
        other => panic!(
            "operation {other} of the list has no native driver in this test: add one \
             (or say it has no native form)"
        ),
    };
    let conn = connect(addr, Some(user), role, group, checks)
        .await
        .expect("the user connects");
    Ok(conn
        .call(body)
        .await
        .err()
        .map(|e| e.code().unwrap_or(ErrorCode::Internal)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_on_the_native_face_asks_for_its_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let admin_file = dir.path().join("admin");
    std::fs::write(&admin_file, format!("root {ROOT_SECRET}\n")).unwrap();
    let b = TestBroker::start(&["--bootstrap-admin-file", admin_file.to_str().unwrap()]);
    let root_user = User::new("root", ROOT_SECRET);
    let root = txmq_tests::eventually(Duration::from_secs(10), || async {
        Admin::connect_as(b.addr(), "", Some(&root_user)).await.ok()
    })
    .await
    .expect("root logs in");
    root.create_topic("t1", false).await.unwrap();
    root.user_create("u", USER_SECRET, false).await.unwrap();
    let user = User::new("u", USER_SECRET);

    // Unauthenticated: nothing gets past the handshake.
    let anonymous = connect(b.addr(), None, pb::Role::Admin, "", false).await;
    assert_eq!(
        anonymous.err().and_then(|e| e.code()),
        Some(ErrorCode::NotAuthenticated)
    );

    let mut seen = BTreeMap::new();
    for row in table() {
        // No rule: denied.
        let Ok(none) = native(b.addr(), &user, &row.variant).await else {
            seen.insert(row.name.clone(), "not on this face");
            continue;
        };
        assert_eq!(
            none,
            Some(ErrorCode::PermissionDenied),
            "{} without permissions",
            row.name
        );
        // Every permission but one: still denied, for each one left out.
        if row.needs.len() > 1 {
            for left_out in 0..row.needs.len() {
                for (i, (action, kind)) in row.needs.iter().enumerate() {
                    if i != left_out {
                        root.acl_grant(&grant(action, kind)).await.unwrap();
                    }
                }
                let got = native(b.addr(), &user, &row.variant).await.unwrap();
                assert_eq!(
                    got,
                    Some(ErrorCode::PermissionDenied),
                    "{} without {:?}",
                    row.name,
                    row.needs[left_out]
                );
                for r in root.acl_list("u").await.unwrap() {
                    root.acl_revoke(&RuleSpec::default(), Some(r.id))
                        .await
                        .unwrap();
                }
            }
        }
        // Every permission the table names: past the check (the operation may still
        // fail on its own terms: no such transaction, not a group, …).
        for (action, kind) in &row.needs {
            root.acl_grant(&grant(action, kind)).await.unwrap();
        }
        let all = native(b.addr(), &user, &row.variant).await.unwrap();
        assert!(
            !matches!(
                all,
                Some(ErrorCode::PermissionDenied | ErrorCode::NotAuthenticated)
            ),
            "{} with {:?}: {all:?}",
            row.name,
            row.needs
        );
        for r in root.acl_list("u").await.unwrap() {
            root.acl_revoke(&RuleSpec::default(), Some(r.id))
                .await
                .unwrap();
        }
        seen.insert(row.name.clone(), "checked");
    }
    let checked = seen.values().filter(|v| **v == "checked").count();
    assert!(checked >= 30, "{seen:?}");
}

/// The operations of the list the gRPC face has, driven raw by the official Python
/// client's generated stubs: unsigned (refused as unauthenticated), as a user without
/// rules (each FORBIDDEN), and with every permission the table names for them (none
/// refused for a permission).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_on_the_grpc_face_asks_for_its_permissions() {
    const FORBIDDEN: i64 = 40300;
    const UNAUTHORIZED: i64 = 40100;
    let dir = tempfile::tempdir().unwrap();
    let admin_file = dir.path().join("admin");
    std::fs::write(&admin_file, format!("root {ROOT_SECRET}\n")).unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "permission-test-broker-key-0123456789\n").unwrap();
    let b = TestBroker::start(&[
        "--bootstrap-admin-file",
        admin_file.to_str().unwrap(),
        "--broker-key-file",
        key_file.to_str().unwrap(),
        "--grpc-listen",
        "127.0.0.1:0",
    ]);
    let root_user = User::new("root", ROOT_SECRET);
    let root = txmq_tests::eventually(Duration::from_secs(10), || async {
        Admin::connect_as(b.addr(), "", Some(&root_user)).await.ok()
    })
    .await
    .expect("root logs in");
    root.create_topic("t1", false).await.unwrap();
    root.user_create("u", USER_SECRET, false).await.unwrap();
    let rows = table();
    let names: Vec<String> = rows.iter().map(|r| r.variant.clone()).collect();
    let grpc = b.grpc_addr().to_string();
    let run = |ak: &'static str, sk: &'static str| {
        let (grpc, names) = (grpc.clone(), names.clone());
        tokio::task::spawn_blocking(move || {
            let mut args = vec!["ops"];
            args.extend(names.iter().map(String::as_str));
            let (ok, out, err) =
                txmq_tests::grpc::run(&grpc, &args, &[("TXMQ_AK", ak), ("TXMQ_SK", sk)]);
            assert!(ok, "the driver failed: {err}");
            txmq_tests::json_lines(&out)
                .into_iter()
                .map(|l| (l["op"].as_str().unwrap().to_string(), l))
                .collect::<BTreeMap<_, _>>()
        })
    };
    let unsigned = run("", "").await.unwrap();
    let denied = run("u", USER_SECRET).await.unwrap();
    let on_face: Vec<&Row> = rows
        .iter()
        .filter(|r| denied[&r.variant].get("face").is_none())
        .collect();
    assert!(on_face.len() >= 8, "{denied:?}");
    for row in &on_face {
        assert_eq!(
            unsigned[&row.variant]["rpc"], "UNAUTHENTICATED",
            "{} unsigned: {:?}",
            row.name, unsigned[&row.variant]
        );
        assert_eq!(
            denied[&row.variant]["code"].as_i64(),
            Some(FORBIDDEN),
            "{} without permissions: {:?}",
            row.name,
            denied[&row.variant]
        );
    }
    for row in &on_face {
        for (action, kind) in &row.needs {
            root.acl_grant(&grant(action, kind)).await.unwrap();
        }
    }
    let allowed = run("u", USER_SECRET).await.unwrap();
    for row in &on_face {
        let code = allowed[&row.variant]["code"].as_i64();
        assert!(
            code != Some(FORBIDDEN) && code != Some(UNAUTHORIZED),
            "{} with {:?}: {:?}",
            row.name,
            row.needs,
            allowed[&row.variant]
        );
    }
}

/// Drives operation `variant` on the Remoting face, signed as `(ak, sk)` (`None`:
/// unsigned): the answer's code, or `Err` when the face has no such request.
fn remoting(at: &str, signer: Option<(&str, &str)>, variant: &str) -> Result<i64, ()> {
    const HALF: &str = "TRAN_MSG\u{1}true\u{2}PGROUP\u{1}pg\u{2}";
    let (code, fields, body): (i32, Vec<(&str, &str)>, &[u8]) = match variant {
        "Send" => (310, vec![("a", "pg"), ("b", "t1"), ("i", "")], b"x"),
        "Prepare" => (
            310,
            vec![("a", "pg"), ("b", "t1"), ("f", "4"), ("i", HALF)],
            b"x",
        ),
        "EndTxn" => (
            37,
            vec![
                ("producerGroup", "pg"),
                ("transactionId", NOBODY),
                ("commitOrRollback", "8"),
            ],
            b"",
        ),
        "Route" => (105, vec![("topic", "t1")], b""),
        "Subscribe" => (
            11,
            vec![
                ("consumerGroup", "g1"),
                ("topic", "t1"),
                ("queueId", "0"),
                ("queueOffset", "0"),
                ("maxMsgNums", "1"),
                ("sysFlag", "0"),
            ],
            b"",
        ),
        "CreateTopic" => (17, vec![("topic", "t-new")], b""),
        "AlterTopic" => (17, vec![("topic", "t1"), ("readQueueNums", "4")], b""),
        "DeleteTopic" => (215, vec![("topic", "t-del")], b""),
        "ListTopics" => (206, vec![], b""),
        "DescribeGroup" => (208, vec![("consumerGroup", "g1")], b""),
        "FindMessages" => (
            12,
            vec![("topic", "t1"), ("key", "k"), ("maxNum", "1")],
            b"",
        ),
        "Stats" => (28, vec![], b""),
        _ => return Err(()),
    };
    let mut raw = txmq_tests::remoting::Raw::connect(at);
    match signer {
        Some(s) => raw.signed(code, 1, &fields, body, s),
        None => raw.request(code, 1, 0, &fields, body),
    }
    Ok(raw
        .answer(1, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{variant}: no answer"))
        .code)
}

/// The operations of the list the Remoting face has, driven by raw requests signed as
/// `AclClientRPCHook` signs them: unsigned (refused), as a user without rules
/// (NO_PERMISSION), with every permission the table names but one (NO_PERMISSION, for
/// each one left out), and with all of them (past the check).
#[test]
fn every_operation_on_the_remoting_face_asks_for_its_permissions() {
    const NO_PERMISSION: i64 = 16;
    let dir = tempfile::tempdir().unwrap();
    let admin_file = dir.path().join("admin");
    std::fs::write(&admin_file, format!("root {ROOT_SECRET}\n")).unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "permission-test-broker-key-0123456789\n").unwrap();
    let b = TestBroker::start(&[
        "--bootstrap-admin-file",
        admin_file.to_str().unwrap(),
        "--broker-key-file",
        key_file.to_str().unwrap(),
        "--remoting-listen",
        "127.0.0.1:0",
    ]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let root_user = User::new("root", ROOT_SECRET);
    let root = rt
        .block_on(txmq_tests::eventually(Duration::from_secs(10), || async {
            Admin::connect_as(b.addr(), "", Some(&root_user)).await.ok()
        }))
        .expect("root logs in");
    rt.block_on(async {
        root.create_topic("t1", false).await.unwrap();
        root.create_topic("t-del", false).await.unwrap();
        root.user_create("u", USER_SECRET, false).await.unwrap();
    });
    let revoke_all = || {
        rt.block_on(async {
            for r in root.acl_list("u").await.unwrap() {
                root.acl_revoke(&RuleSpec::default(), Some(r.id))
                    .await
                    .unwrap();
            }
        });
    };
    let at = b.remoting_addr().to_string();
    let user = Some(("u", USER_SECRET));
    let mut checked = Vec::new();
    for row in table() {
        let Ok(unsigned) = remoting(&at, None, &row.variant) else {
            continue;
        };
        assert_eq!(unsigned, NO_PERMISSION, "{} unsigned", row.name);
        let none = remoting(&at, user, &row.variant).unwrap();
        assert_eq!(none, NO_PERMISSION, "{} without permissions", row.name);
        if row.needs.len() > 1 {
            for left_out in 0..row.needs.len() {
                for (i, (action, kind)) in row.needs.iter().enumerate() {
                    if i != left_out {
                        rt.block_on(root.acl_grant(&grant(action, kind))).unwrap();
                    }
                }
                let got = remoting(&at, user, &row.variant).unwrap();
                assert_eq!(
                    got, NO_PERMISSION,
                    "{} without {:?}",
                    row.name, row.needs[left_out]
                );
                revoke_all();
            }
        }
        for (action, kind) in &row.needs {
            rt.block_on(root.acl_grant(&grant(action, kind))).unwrap();
        }
        let all = remoting(&at, user, &row.variant).unwrap();
        assert_ne!(all, NO_PERMISSION, "{} with {:?}", row.name, row.needs);
        revoke_all();
        checked.push(row.name);
    }
    assert!(checked.len() >= 12, "{checked:?}");
    println!("checked on the Remoting face: {checked:?}");
    // A heartbeat does not make a user without rules a member of a group, not even
    // through a subscription to dead letters: the group's members stay hidden from it.
    let mut raw = txmq_tests::remoting::Raw::connect(&at);
    let beat = serde_json::json!({
        "clientID": "10.0.0.7@intruder",
        "consumerDataSet": [{"groupName": "victim", "consumeType": "CONSUME_PASSIVELY",
            "messageModel": "CLUSTERING", "consumeFromWhere": "CONSUME_FROM_LAST_OFFSET",
            "subscriptionDataSet": [{"topic": "%DLQ%x", "subString": "*", "expressionType": "TAG"}]}],
        "producerDataSet": [],
    });
    raw.signed(
        34,
        1,
        &[],
        &serde_json::to_vec(&beat).unwrap(),
        ("u", USER_SECRET),
    );
    assert_eq!(raw.answer(1, Duration::from_secs(5)).unwrap().code, 0);
    raw.signed(
        38,
        2,
        &[("consumerGroup", "victim")],
        b"",
        ("u", USER_SECRET),
    );
    let members = raw.answer(2, Duration::from_secs(5)).unwrap();
    assert_eq!(members.code, NO_PERMISSION, "{members:?}");
}
