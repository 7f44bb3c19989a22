//! Users and rules (issue 26, items 2 and 3): the bootstrap super user, SCRAM on the
//! native face, rules checked on every request (a revoke or a new secret takes effect
//! on the open connection), the CLI's `user` and `acl`, and no secret on disk.

use std::path::Path;
use std::time::Duration;

use txmq_client::{
    Admin, Consumer, ConsumerOptions, ErrorCode, Message, Producer, ProducerOptions, RuleSpec, User,
};
use txmq_tests::{TestBroker, http_get, next};

const ADMIN_SECRET: &str = "admin-s3cret-7Qx";
const APP_SECRET: &str = "app-s3cret-9Lm";

fn admin_user() -> User {
    User::new("root", ADMIN_SECRET)
}

fn app_user() -> User {
    User::new("app", APP_SECRET)
}

/// A broker whose first super user comes from a bootstrap file.
fn broker(dir: &Path) -> TestBroker {
    let file = dir.join("admin");
    std::fs::write(&file, format!("root {ADMIN_SECRET}\n")).unwrap();
    TestBroker::start(&[
        "--bootstrap-admin-file",
        file.to_str().unwrap(),
        "--metrics-listen",
        "127.0.0.1:0",
    ])
}

fn rule(resource: &str, actions: &str) -> RuleSpec {
    RuleSpec {
        user: "app".into(),
        resource: resource.into(),
        actions: actions.split(',').map(String::from).collect(),
        ..Default::default()
    }
}

async fn app_producer(b: &TestBroker, group: &str) -> Producer {
    Producer::connect(
        b.addr(),
        ProducerOptions {
            group: group.into(),
            user: Some(app_user()),
            ..Default::default()
        },
    )
    .await
    .expect("app connects")
}

/// A broker with a bootstrap super user, a key to seal secrets under (so users sign
/// gRPC calls) and a gRPC endpoint; its files in `dir`.
fn grpc_broker(dir: &Path) -> TestBroker {
    let admin_file = dir.join("admin");
    std::fs::write(&admin_file, format!("root {ADMIN_SECRET}\n")).unwrap();
    let key_file = dir.join("broker-key");
    std::fs::write(&key_file, "a-long-random-broker-key-1234567890\n").unwrap();
    TestBroker::start(&[
        "--bootstrap-admin-file",
        admin_file.to_str().unwrap(),
        "--broker-key-file",
        key_file.to_str().unwrap(),
        "--grpc-listen",
        "127.0.0.1:0",
    ])
}

/// Until the broker has made its bootstrap user.
async fn root(b: &TestBroker) -> Admin {
    txmq_tests::eventually(Duration::from_secs(10), || async {
        Admin::connect_as(b.addr(), "", Some(&admin_user()))
            .await
            .ok()
    })
    .await
    .expect("the bootstrap super user logs in")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_decide_every_request_and_changes_take_effect_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let root = root(&b).await;

    // With a user stored, nobody else gets in.
    let anonymous = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap_err();
    assert_eq!(
        anonymous.code(),
        Some(ErrorCode::NotAuthenticated),
        "{anonymous}"
    );
    let wrong = Admin::connect_as(b.addr(), "", Some(&User::new("root", "not-the-secret")))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Some(ErrorCode::NotAuthenticated), "{wrong}");
    let nobody = Admin::connect_as(b.addr(), "", Some(&User::new("nobody", "whatever-1")))
        .await
        .unwrap_err();
    // An unknown user and a bad secret get the same answer.
    assert_eq!(nobody.to_string(), wrong.to_string());

    root.user_create("app", APP_SECRET, false).await.unwrap();
    root.create_topic("orders", false).await.unwrap();
    let p = app_producer(&b, "").await;
    let denied = p.send(Message::new("orders", "o-1")).await.unwrap_err();
    assert_eq!(denied.code(), Some(ErrorCode::PermissionDenied), "{denied}");
    assert!(denied.to_string().contains("no rule allows it"), "{denied}");

    let granted = root.acl_grant(&rule("topic:ord*", "pub")).await.unwrap();
    p.send(Message::new("orders", "o-1")).await.unwrap();
    let other = p.send(Message::new("billing", "b-1")).await.unwrap_err();
    assert_eq!(other.code(), Some(ErrorCode::PermissionDenied), "{other}");
    // A topic made on demand needs `create` on it too.
    let new = p.send(Message::new("ordinals", "n-1")).await.unwrap_err();
    assert!(
        new.to_string().contains("may not create on topic:ordinals"),
        "{new}"
    );

    // A deny wins over the allow, on the connection already open.
    let deny = RuleSpec {
        deny: true,
        ..rule("topic:orders", "pub")
    };
    let denying = root.acl_grant(&deny).await.unwrap();
    let e = p.send(Message::new("orders", "o-2")).await.unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("rule {} denies", denying.id)),
        "{e}"
    );
    root.acl_revoke(&deny, None).await.unwrap();
    p.send(Message::new("orders", "o-2")).await.unwrap();

    // Consuming needs sub on the topic and on the group.
    let options = ConsumerOptions {
        user: Some(app_user()),
        ..ConsumerOptions::new("points", "orders")
    };
    let e = Consumer::subscribe(b.addr(), options.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
    root.acl_grant(&rule("topic:orders", "sub")).await.unwrap();
    let e = Consumer::subscribe(b.addr(), options.clone())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("group:points"), "{e}");
    root.acl_grant(&rule("group:points", "sub")).await.unwrap();
    let mut c = Consumer::subscribe(b.addr(), options).await.unwrap();
    let d = next(&mut c, Duration::from_secs(10))
        .await
        .expect("a delivery");
    assert_eq!(&d.message.body[..], b"o-1");
    d.ack().await.unwrap();
    let d = next(&mut c, Duration::from_secs(10))
        .await
        .expect("a delivery");
    assert_eq!(&d.message.body[..], b"o-2");
    d.ack().await.unwrap();

    // Revoking `sub` on the group closes the subscribed connection: nothing more is
    // pushed to a consumer that may no longer read.
    root.acl_revoke(&rule("group:points", "sub"), None)
        .await
        .unwrap();
    let closed = txmq_tests::eventually(Duration::from_secs(10), || async {
        b.log_text()
            .lines()
            .any(|l| l.contains("closing connection") && l.contains("group:points"))
            .then_some(())
    })
    .await;
    assert!(closed.is_some(), "{}", b.log_text());
    p.send(Message::new("orders", "o-after")).await.unwrap();
    // The consumer hears why, then its stream ends; no message reaches it.
    let heard = tokio::time::timeout(Duration::from_secs(5), async {
        let mut errors = Vec::new();
        while let Some(item) = futures::StreamExt::next(&mut c).await {
            match item {
                Ok(d) => panic!("delivered after the revoke: {:?}", d.message.body),
                Err(e) => errors.push(e.to_string()),
            }
        }
        errors
    })
    .await;
    if let Ok(errors) = heard {
        assert!(
            errors.iter().all(|e| e.contains("permission denied")),
            "{errors:?}"
        );
    }
    root.acl_grant(&rule("group:points", "sub")).await.unwrap();

    // Transactions need txn on the producer group too.
    let tp = app_producer(&b, "orders-svc").await;
    let mut txn = tp.begin().unwrap();
    let e = txn.send(Message::new("orders", "t-1")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
    root.acl_grant(&rule("producer-group:orders-svc", "txn"))
        .await
        .unwrap();
    let mut txn = tp.begin().unwrap();
    txn.send(Message::new("orders", "t-1")).await.unwrap();
    txn.commit().await.unwrap();

    // Operators' requests need their own permissions.
    let as_app = Admin::connect_as(b.addr(), "", Some(&app_user()))
        .await
        .unwrap();
    let e = as_app.topics().await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
    let e = as_app.user_list().await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");

    // Revoking by id takes effect on the open connection.
    root.acl_revoke(&RuleSpec::default(), Some(granted.id))
        .await
        .unwrap();
    let e = p.send(Message::new("orders", "o-3")).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");

    // A new secret refuses the sessions of the old one; the new one gets in.
    root.user_passwd("app", "app-new-s3cret-2").await.unwrap();
    let e = tp
        .begin()
        .unwrap()
        .send(Message::new("orders", "t-2"))
        .await;
    assert_eq!(
        e.unwrap_err().code(),
        Some(ErrorCode::NotAuthenticated),
        "the old secret's session goes on"
    );
    let old = Admin::connect_as(b.addr(), "", Some(&app_user())).await;
    assert_eq!(old.unwrap_err().code(), Some(ErrorCode::NotAuthenticated));
    Admin::connect_as(b.addr(), "", Some(&User::new("app", "app-new-s3cret-2")))
        .await
        .unwrap();

    // Failures are counted.
    let (_, metrics) = http_get(b.metrics_addr(), "/metrics").await.unwrap();
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("txmq_auth_failures_total{face=\"native\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(failures >= 3, "{metrics}");
    assert!(metrics.contains("txmq_auth_denials_total{operation=\"send\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_rules_are_kept_across_a_restart_and_no_secret_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = broker(dir.path());
    let root = root(&b).await;
    root.user_create("app", APP_SECRET, false).await.unwrap();
    root.acl_grant(&rule("topic:*", "pub,read,create"))
        .await
        .unwrap();
    let revoked = root.acl_grant(&rule("group:*", "sub")).await.unwrap();
    root.acl_revoke(&RuleSpec::default(), Some(revoked.id))
        .await
        .unwrap();
    drop(root);
    b.restart();
    let p = app_producer(&b, "").await;
    p.send(Message::new("kept", "k-1")).await.unwrap();
    drop(p);
    // Rule ids are never given twice, across a restart too.
    let root = self::root(&b).await;
    let again = root.acl_grant(&rule("group:x", "sub")).await.unwrap();
    assert!(again.id > revoked.id, "{} after {}", again.id, revoked.id);
    drop(root);
    b.stop();
    for secret in [ADMIN_SECRET, APP_SECRET] {
        for entry in walk(b.data_dir()) {
            let bytes = std::fs::read(&entry).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds a secret in plain text",
                entry.display()
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_users_and_rules() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    root(&b).await;
    let secret_file = dir.path().join("root-secret");
    std::fs::write(&secret_file, format!("{ADMIN_SECRET}\n")).unwrap();
    let app_file = dir.path().join("app-secret");
    std::fs::write(&app_file, format!("{APP_SECRET}\n")).unwrap();
    let as_root = |args: &[&str]| {
        let mut all = vec![
            "--user",
            "root",
            "--user-secret-file",
            secret_file.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        b.cli(&all)
    };
    let ok = |args: &[&str]| {
        let out = as_root(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    ok(&[
        "user",
        "create",
        "app",
        "--new-secret-file",
        app_file.to_str().unwrap(),
    ]);
    ok(&["topic", "create", "orders"]);
    let users = txmq_tests::json_lines(&ok(&["user", "list", "--json"]));
    assert_eq!(users.len(), 2, "{users:?}");
    assert!(
        users
            .iter()
            .any(|u| u["name"] == "app" && u["super"] == false)
    );
    let granted = ok(&["acl", "grant", "app", "pub,sub", "topic:orders", "--json"]);
    let granted = &txmq_tests::json_lines(&granted)[0];
    assert_eq!(granted["decision"], "allow");
    let id = granted["id"].as_u64().unwrap();
    let check = ok(&["acl", "check", "app", "pub", "topic:orders"]);
    assert_eq!(check.trim(), format!("allowed by rule {id}"));
    let denied = as_root(&["acl", "check", "app", "pub", "topic:billing"]);
    assert_eq!(denied.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&denied.stdout).contains("denied: no rule"));
    let listed = txmq_tests::json_lines(&ok(&["acl", "list", "app", "--json"]));
    assert_eq!(listed.len(), 1);
    // The app's own CLI runs with its user from the environment.
    let out = std::process::Command::new(txmq_tests::bin("txmq"))
        .args([
            "--broker",
            b.addr(),
            "produce",
            "--topic",
            "orders",
            "--body",
            "x",
        ])
        .env("TXMQ_USER", "app")
        .env("TXMQ_USER_SECRET", APP_SECRET)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Without a user: one clear line.
    let out = b.cli(&["topic", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("this broker has users"), "{err}");
    ok(&["acl", "revoke-id", &id.to_string()]);
    assert!(ok(&["acl", "list", "app"]).trim().is_empty());
    ok(&["user", "delete", "app"]);
    let users = txmq_tests::json_lines(&ok(&["user", "list", "--json"]));
    assert_eq!(users.len(), 1);
}

/// Users on the gRPC face (the official Python client): the access key is the user's
/// name and the secret its own, kept sealed under the broker's key; the same rules
/// decide as on the native face; a wrong secret or no signature is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_clients_sign_as_users_and_the_same_rules_decide() {
    let dir = tempfile::tempdir().unwrap();
    let b = grpc_broker(dir.path());
    let root = root(&b).await;
    root.user_create("app", APP_SECRET, false).await.unwrap();
    root.create_topic("orders", false).await.unwrap();
    root.acl_grant(&rule("topic:orders", "pub")).await.unwrap();
    root.acl_grant(&rule("topic:orders", "sub")).await.unwrap();
    root.acl_grant(&rule("group:points", "sub")).await.unwrap();
    let grpc = b.grpc_addr().to_string();
    let run = move |args: &'static [&'static str], sk: &'static str| {
        let grpc = grpc.clone();
        move || txmq_tests::grpc::run(&grpc, args, &[("TXMQ_AK", "app"), ("TXMQ_SK", sk)])
    };
    let allowed = tokio::task::spawn_blocking(run(&["produce", "orders", "1"], APP_SECRET))
        .await
        .unwrap();
    assert!(allowed.0, "a permitted user was refused: {}", allowed.2);
    let denied = tokio::task::spawn_blocking(run(&["produce", "billing", "1"], APP_SECRET))
        .await
        .unwrap();
    assert!(
        !denied.0,
        "a send without pub on the topic was served: {}",
        denied.1
    );
    let wrong = tokio::task::spawn_blocking(run(&["produce", "orders", "1"], "a-wrong-secret"))
        .await
        .unwrap();
    assert!(!wrong.0, "a wrong secret was served");
    let consumed = tokio::task::spawn_blocking(run(
        &["simple", "points", "orders", "1", "--wait", "20"],
        APP_SECRET,
    ))
    .await
    .unwrap();
    assert!(
        consumed.0,
        "a permitted consumer was refused: {}",
        consumed.2
    );
    assert!(consumed.1.contains("py-0"), "{}", consumed.1);
    // Nothing of the refused sends was stored.
    let topics = root.topics().await.unwrap();
    assert!(topics.iter().all(|t| t.name != "billing"), "{topics:?}");
}

/// Issue 26, item 5: a gRPC transaction belongs to the user that prepared it. Another
/// user allowed to publish on the topic and to end its gRPC transactions cannot end it
/// (refused, and the half message stays invisible); its own user commits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_transaction_is_ended_only_by_the_user_that_prepared_it() {
    let dir = tempfile::tempdir().unwrap();
    let b = grpc_broker(dir.path());
    let root = root(&b).await;
    root.create_topic("t1", false).await.unwrap();
    for user in ["app", "other"] {
        root.user_create(user, APP_SECRET, false).await.unwrap();
        for (resource, actions) in [("topic:t1", "pub,sub"), ("producer-group:%GRPC%t1", "txn")] {
            root.acl_grant(&RuleSpec {
                user: user.into(),
                ..rule(resource, actions)
            })
            .await
            .unwrap();
        }
    }
    root.acl_grant(&RuleSpec {
        user: "app".into(),
        ..rule("group:g", "sub")
    })
    .await
    .unwrap();
    let grpc = b.grpc_addr().to_string();
    let ops = move |user: &'static str, op: &'static str, txn: String| {
        let grpc = grpc.clone();
        tokio::task::spawn_blocking(move || {
            let (ok, out, err) = txmq_tests::grpc::run(
                &grpc,
                &["ops", op],
                &[
                    ("TXMQ_AK", user),
                    ("TXMQ_SK", APP_SECRET),
                    ("TXMQ_TXN", &txn),
                ],
            );
            assert!(ok, "ops {op}: {err}");
            txmq_tests::json_lines(&out).remove(0)
        })
    };
    let prepared = ops("app", "PrepareId", String::new()).await.unwrap();
    assert_eq!(prepared["code"], 20000, "{prepared}");
    let txn = prepared["txn"].as_str().unwrap().to_string();
    let stolen = ops("other", "CommitThat", txn.clone()).await.unwrap();
    assert_ne!(
        stolen["code"], 20000,
        "another user ended the transaction: {stolen}"
    );
    let app = ConsumerOptions {
        user: Some(app_user()),
        ..ConsumerOptions::new("g", "t1")
    };
    let mut c = Consumer::subscribe(b.addr(), app).await.unwrap();
    assert!(
        next(&mut c, Duration::from_millis(500)).await.is_none(),
        "the refused commit made the message visible"
    );
    let own = ops("app", "CommitThat", txn).await.unwrap();
    assert_eq!(own["code"], 20000, "its own user could not commit: {own}");
    let d = next(&mut c, Duration::from_secs(10))
        .await
        .expect("the committed message");
    assert_eq!(d.body().as_ref(), b"x");
}

/// Issue 26: a gRPC producer's Telemetry stream takes its topics' check-backs; when its
/// user loses `txn` on that group, the broker closes the stream (as it closes a native
/// connection that lost what it holds), so no check-back goes to it any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_producer_stream_is_closed_when_its_check_permission_is_revoked() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let b = grpc_broker(dir.path());
    let root = root(&b).await;
    root.user_create("app", APP_SECRET, false).await.unwrap();
    root.acl_grant(&rule("topic:t1", "pub")).await.unwrap();
    let txn_rule = rule("producer-group:%GRPC%t1", "txn");
    root.acl_grant(&txn_rule).await.unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc/client.py");
    let mut child = std::process::Command::new(txmq_tests::grpc::python())
        .arg(script)
        .args([b.grpc_addr(), "telemetry-wait", "t1", "20"])
        .envs([("TXMQ_AK", "app"), ("TXMQ_SK", APP_SECRET)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = lines_tx.send(line);
        }
    });
    let line = |limit| {
        lines_rx
            .recv_timeout(limit)
            .map(|l| serde_json::from_str::<serde_json::Value>(&l).unwrap())
    };
    let settled = line(Duration::from_secs(60)).expect("the stream never settled");
    assert_eq!(settled["settled"], true, "{settled}");
    // Registered as the group's producer before the revoke.
    tokio::time::sleep(Duration::from_millis(500)).await;
    root.acl_revoke(&txn_rule, None).await.unwrap();
    let end = line(Duration::from_secs(40));
    let _ = child.kill();
    let _ = child.wait();
    let end = end.expect("the script said nothing more");
    assert_eq!(
        end["closed"],
        true,
        "the stream outlived the revoke of its check permission: {end}\n{}",
        b.log_text()
    );
    assert_ne!(end["code"], 20000, "{end}");
}

/// Issue 26, item 2 (migration): with a key to seal secrets under, each key of
/// `--grpc-credentials-file` becomes a super user of that name and secret at start:
/// it logs in on the native face with SCRAM, its gRPC client still signs as before,
/// and, users existing, an anonymous client is refused. A restart makes nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_credentials_become_users() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials");
    std::fs::write(&credentials, "team-a team-a-s3cret-1\n").unwrap();
    let key_file = dir.path().join("broker-key");
    std::fs::write(&key_file, "a-long-random-broker-key-1234567890\n").unwrap();
    let mut b = TestBroker::start(&[
        "--grpc-listen",
        "127.0.0.1:0",
        "--grpc-credentials-file",
        credentials.to_str().unwrap(),
        "--broker-key-file",
        key_file.to_str().unwrap(),
    ]);
    let team = User::new("team-a", "team-a-s3cret-1");
    let admin = txmq_tests::eventually(Duration::from_secs(10), || async {
        Admin::connect_as(b.addr(), "", Some(&team)).await.ok()
    })
    .await
    .unwrap_or_else(|| panic!("the migrated user cannot log in\n{}", b.log_text()));
    let users = admin.user_list().await.unwrap();
    assert_eq!(users.len(), 1, "{users:?}");
    assert!(users[0].name == "team-a" && users[0].superuser, "{users:?}");
    drop(admin);
    let anonymous = Producer::connect(b.addr(), ProducerOptions::default())
        .await
        .unwrap_err();
    assert_eq!(
        anonymous.code(),
        Some(ErrorCode::NotAuthenticated),
        "{anonymous}"
    );
    let grpc = b.grpc_addr().to_string();
    let signed = tokio::task::spawn_blocking(move || {
        txmq_tests::grpc::run(
            &grpc,
            &["produce", "migrated", "1"],
            &[("TXMQ_AK", "team-a"), ("TXMQ_SK", "team-a-s3cret-1")],
        )
    })
    .await
    .unwrap();
    assert!(
        signed.0,
        "the migrated key's gRPC client was refused: {}",
        signed.2
    );
    b.restart();
    let admin = txmq_tests::eventually(Duration::from_secs(10), || async {
        Admin::connect_as(b.addr(), "", Some(&team)).await.ok()
    })
    .await
    .expect("the migrated user after a restart");
    assert_eq!(admin.user_list().await.unwrap().len(), 1);
}
