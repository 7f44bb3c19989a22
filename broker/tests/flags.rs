//! The `txmq-broker` binary's command line: bad settings are refused with one clear line.

use std::process::Command;

fn broker(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_txmq-broker"))
        .args(args)
        .output()
        .expect("run txmq-broker")
}

/// Runs the broker with `args` for at most `limit`: its output, or `None` (it is killed)
/// when it was still running then.
fn broker_within(args: &[&str], limit: std::time::Duration) -> Option<std::process::Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_txmq-broker"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run txmq-broker");
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Some(child.wait_with_output().expect("its output"))
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
        .args([
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "none",
            "--remoting-listen",
            "none",
            "--data-dir",
            data,
        ])
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
    // Storage opens right after the bind: wait (boundedly) until the first broker has
    // it, or a second one started on a busy machine could win the lock and serve.
    let current = dir.path().join("CURRENT");
    for _ in 0..300 {
        if current.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut err = String::new();
    for _ in 0..50 {
        // Bounded: a second broker that won the directory would serve for ever.
        let Some(out) = broker_within(
            &[
                "--listen",
                "127.0.0.1:0",
                "--grpc-listen",
                "none",
                "--remoting-listen",
                "none",
                "--data-dir",
                data,
            ],
            std::time::Duration::from_secs(30),
        ) else {
            err = "a second broker on the same directory was still running after 30 s".into();
            break;
        };
        err = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            break;
        }
    }
    let _ = first.kill();
    let _ = first.wait();
    assert!(err.contains("in use by another broker"), "{err}");
}

/// `--config` file, `TXMQ_*` environment and flags, each overriding the one before, as
/// `--print-config` shows them; a bad key in the file is one clear line.
#[test]
fn config_file_environment_and_flags_layer_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("txmq.toml");
    std::fs::write(
        &file,
        "window = 64\nlease = \"10s\"\ncheck_max = 3\nmetrics_listen = \"127.0.0.1:9999\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_txmq-broker"))
        .args([
            "--config",
            file.to_str().unwrap(),
            "--print-config",
            "--lease",
            "5s",
        ])
        .env("TXMQ_WINDOW", "32")
        .env("TXMQ_MAX_ATTEMPTS", "7")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout).unwrap();
    for line in [
        "window = 32",      // environment over file
        "lease = \"5s\"",   // flag over file
        "check_max = 3",    // file over default
        "max_attempts = 7", // environment over default
        "metrics_listen = \"127.0.0.1:9999\"",
        "max_connections = 10000", // default
    ] {
        assert!(
            printed.lines().any(|l| l == line),
            "{line:?} missing in:\n{printed}"
        );
    }

    std::fs::write(&file, "windw = 64\n").unwrap();
    let out = broker(&["--config", file.to_str().unwrap(), "--print-config"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `windw`"), "{err}");
    let out = broker(&["--config", "/nonexistent/txmq.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read config file"), "{err}");
}
