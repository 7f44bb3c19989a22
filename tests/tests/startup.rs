//! Start-up and stop: a signal at any moment of start-up is a clean stop (issue 13, item 16).

use std::time::Duration;

use txmq_client::Message;
use txmq_tests::{TestBroker, producer};

/// SIGTERM the moment the broker says it listens, before it has finished opening storage:
/// it must exit 0, on a fresh directory and on one with data left by a kill -9 (whose
/// opening takes longer). The broker used to die by the signal here in 4 of 4 rounds,
/// because nothing caught SIGTERM until the server first polled its shutdown future.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_start_is_a_clean_exit() {
    for round in 0..4 {
        let mut b = TestBroker::start(&[]);
        // `stop` sends SIGTERM at once and asserts exit status 0.
        b.stop();
        assert!(
            b.log_text().contains("stopped"),
            "round {round}: no clean stop in the log:\n{}",
            b.log_text()
        );
    }

    let mut b = TestBroker::start(&[]);
    let p = producer(&b).await;
    let sends = (0..20_000).map(|i| p.send(Message::new("t", format!("m{i}"))));
    for r in futures::future::join_all(sends).await {
        r.expect("send");
    }
    drop(p);
    for _ in 0..4 {
        b.kill9();
        b.start_again();
        b.stop();
        b.start_again();
        // Still whole after the interrupted starts.
        let p = producer(&b).await;
        p.send(Message::new("t", "after"))
            .await
            .expect("send after restart");
        drop(p);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    b.stop();
}

/// Issue 26, item 2: a broker with no users serves anyone who reaches it, so off
/// loopback it refuses to start unless told that this is meant (`--allow-anonymous`),
/// and says how else to start it; with the flag, or with a first user to make, it serves.
/// (In a network namespace of the test's own: no test listens off loopback elsewhere.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_users_refuses_to_serve_off_loopback() {
    let net = txmq_tests::netns::Net::create(1);
    let listen = format!("{}:7300", net.addr(0));
    let data = tempfile::tempdir().unwrap();
    let broker = txmq_tests::bin("txmq-broker");
    let (exited, err) = txmq_tests::run_refusal(
        net.command(0, broker.to_str().unwrap())
            .args([
                "--listen",
                &listen,
                "--grpc-listen",
                "none",
                "--remoting-listen",
                "none",
                "--data-dir",
            ])
            .arg(data.path()),
        Duration::from_secs(30),
    );
    assert!(
        exited.is_some_and(|s| !s.success()) && err.contains("--allow-anonymous"),
        "an open broker off loopback: {exited:?}\n{err}"
    );

    let mut open = TestBroker::start_in_netns(
        &net.ns(0),
        &listen,
        &["--grpc-listen", "none", "--allow-anonymous"],
    );
    assert!(
        txmq_tests::group::hello(open.addr()).await.is_ok(),
        "--allow-anonymous did not serve\n{}",
        open.log_text()
    );
    open.stop();

    let admin = data.path().join("admin");
    std::fs::write(&admin, "root a-long-enough-secret\n").unwrap();
    // With users, a gRPC endpoint off loopback needs TLS: its signature is a bearer
    // token on h2c.
    let grpc = format!("{}:7301", net.addr(0));
    let (exited, err) = txmq_tests::run_refusal(
        net.command(0, broker.to_str().unwrap())
            .args(["--listen", &listen, "--grpc-listen", &grpc, "--data-dir"])
            .arg(data.path())
            .arg("--bootstrap-admin-file")
            .arg(&admin),
        Duration::from_secs(30),
    );
    assert!(
        exited.is_some_and(|s| !s.success()) && err.contains("without TLS"),
        "a signed gRPC endpoint off loopback without TLS: {exited:?}\n{err}"
    );
    let closed = TestBroker::start_in_netns(
        &net.ns(0),
        &listen,
        &[
            "--grpc-listen",
            "none",
            "--bootstrap-admin-file",
            admin.to_str().unwrap(),
        ],
    );
    let refused = txmq_tests::group::hello(closed.addr()).await;
    assert!(
        matches!(refused, Err((code, _)) if code == txmq_client::ErrorCode::NotAuthenticated as i32),
        "a broker with a first user: {refused:?}\n{}",
        closed.log_text()
    );
}
