//! The `txmq-broker` binary's command line: bad settings are refused with one clear line.

use std::process::Command;

fn broker(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_txmq-broker"))
        .args(args)
        .output()
        .expect("run txmq-broker")
}

#[test]
fn bad_durations_are_refused_clearly() {
    let out = broker(&[
        "--check-backoff",
        "10s,soon",
        "--data-dir",
        "/nonexistent/x",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad duration \"soon\""), "{err}");
}

#[test]
fn inconsistent_settings_are_refused_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let out = broker(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--check-max",
        "0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("check-max must be at least 1"), "{err}");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "refused config still touched the data directory"
    );
}

#[test]
fn a_second_broker_on_the_same_directory_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let mut first = Command::new(env!("CARGO_BIN_EXE_txmq-broker"))
        .args(["--listen", "127.0.0.1:0", "--data-dir", data])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(first.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(
        line.starts_with("txmq-broker listening on 127.0.0.1:"),
        "{line}"
    );
    // Storage opens right after the bind; give the lock a moment, boundedly.
    let mut err = String::new();
    for _ in 0..50 {
        let out = broker(&["--listen", "127.0.0.1:0", "--data-dir", data]);
        err = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            break;
        }
    }
    let _ = first.kill();
    let _ = first.wait();
    assert!(err.contains("in use by another broker"), "{err}");
}
