//! The `txmq` binary's command line.

use std::process::Command;

#[test]
fn unreachable_broker_is_one_clear_line_and_exit_1() {
    let out = Command::new(env!("CARGO_BIN_EXE_txmq"))
        .args(["--broker", "127.0.0.1:1", "topic", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("txmq: cannot connect to 127.0.0.1:1"),
        "{err}"
    );
}

#[test]
fn transactional_produce_needs_a_group() {
    let out = Command::new(env!("CARGO_BIN_EXE_txmq"))
        .args(["produce", "--topic", "t", "--body", "x", "--transactional"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--group"));
}
