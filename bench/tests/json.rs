//! `txmq-bench --json` prints the fields the performance notes rely on, for every
//! scenario (tiny runs: this checks the tool, not the speed).

use std::process::Command;

fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_txmq-bench"))
        .args(args)
        .arg("--json")
        .output()
        .expect("run txmq-bench");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn every_scenario_reports_its_figures() {
    for scenario in ["send", "txn", "e2e", "fifo"] {
        let r = bench(&[scenario, "--messages", "300", "--size", "100"]);
        assert_eq!(r["scenario"], scenario);
        assert_eq!(r["messages"], 300);
        for field in [
            "size",
            "msgs_per_sec",
            "mb_per_sec",
            "p50_us",
            "p99_us",
            "p999_us",
            "broker_cpu_s",
            "broker_peak_rss_mb",
        ] {
            assert!(r[field].is_number(), "{scenario}: {field} missing in {r}");
        }
    }
    // Paced: 300 messages at 3,000/s take about 0.1 s, and the rate shows.
    let r = bench(&["send", "--messages", "300", "--rate", "3000"]);
    let rate = r["msgs_per_sec"].as_f64().unwrap();
    assert!(rate < 6000.0, "--rate 3000 was not applied: {rate}");
    let r = bench(&[
        "backlog",
        "--messages",
        "300",
        "--backlog",
        "3000",
        "--prepared",
        "300",
    ]);
    for field in [
        "send_ratio",
        "consume_ratio",
        "empty_send_msgs_per_sec",
        "fill_secs",
    ] {
        assert!(r[field].is_number(), "backlog: {field} missing in {r}");
    }
    assert_eq!(r["backlog"], 3000);
    let r = bench(&[
        "schedule",
        "--messages",
        "300",
        "--waiting",
        "3000",
        "--rate",
        "1000",
    ]);
    for field in ["scheduled_send_msgs_per_sec", "p50_us", "p99_us"] {
        assert!(r[field].is_number(), "schedule: {field} missing in {r}");
    }
    assert_eq!(r["waiting"], 3000);
    assert_eq!(
        r["latency_of"],
        "arrival at a consumer minus the scheduled time"
    );
}

/// `--protocol remoting` and `--protocol grpc`: the same scenarios through the RocketMQ
/// faces, each run ending only once every message was sent (and, for e2e, received).
#[test]
fn the_rocketmq_faces_are_measured_too() {
    for protocol in ["remoting", "grpc"] {
        for scenario in ["send", "txn", "e2e"] {
            let r = bench(&[
                scenario,
                "--protocol",
                protocol,
                "--messages",
                "300",
                "--size",
                "100",
                "--consumers",
                "2",
            ]);
            assert_eq!(
                (r["scenario"].as_str(), r["protocol"].as_str()),
                (Some(scenario), Some(protocol)),
                "{r}"
            );
            assert_eq!(r["messages"], 300, "{r}");
            assert!(r["p99_us"].as_u64().is_some_and(|p| p > 0), "{r}");
        }
    }
    // Not for what the faces do not take.
    let out = Command::new(env!("CARGO_BIN_EXE_txmq-bench"))
        .args(["fifo", "--protocol", "remoting", "--messages", "10"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--protocol remoting and grpc"));
}
