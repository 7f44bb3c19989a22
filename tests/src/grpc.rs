//! The official RocketMQ 5 Python client (`rocketmq-python-client` from PyPI, in a
//! virtualenv made once by `tests/grpc/setup.sh`), driven by `tests/grpc/client.py`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The virtualenv's python, made on first use (one test at a time makes it: a lock file
/// guards the directory across test processes).
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let lock = std::fs::File::create(std::env::temp_dir().join("txmq-grpc-venv.lock"))
            .expect("lock file");
        lock.lock().expect("lock the virtualenv");
        let out = Command::new("bash")
            .arg(root.join("grpc/setup.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run tests/grpc/setup.sh");
        assert!(out.status.success(), "tests/grpc/setup.sh failed");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// Runs `client.py ENDPOINT ARGS…` (bounded), asserts it succeeded, and returns the
/// JSON objects it printed.
pub fn client(endpoint: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let (ok, out, err) = run(endpoint, args, &[]);
    assert!(ok, "client.py {args:?} failed:\n{err}\nstdout:\n{out}");
    crate::json_lines(&out)
}

/// Starts `client.py ENDPOINT ARGS…` running on its own (a long-lived driver such as
/// `torture-produce`): its stdout piped, stderr dropped. The caller stops it.
pub fn spawn(endpoint: &str, args: &[&str]) -> std::process::Child {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc/client.py");
    Command::new(python())
        .arg(script)
        .arg(endpoint)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run client.py")
}

/// Runs `client.py` with environment `env` (bounded): whether it succeeded, its stdout
/// and its stderr.
pub fn run(endpoint: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc/client.py");
    let mut child = Command::new(python())
        .arg(script)
        .arg(endpoint)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run client.py");
    let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let (out, err) = (read(Box::new(stdout)), read(Box::new(stderr)));
    let status = crate::wait_timeout(&mut child, Duration::from_secs(120));
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    (status.is_some_and(|s| s.success()), out, err)
}

/// The official Node.js client's `node_modules` (installed once by
/// `tests/grpc/setup-node.sh`, guarded like the virtualenv).
pub fn node_modules() -> &'static Path {
    static MODULES: OnceLock<PathBuf> = OnceLock::new();
    MODULES.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let lock =
            std::fs::File::create(std::env::temp_dir().join("txmq-node.lock")).expect("lock file");
        lock.lock().expect("lock the node modules");
        let out = Command::new("bash")
            .arg(root.join("grpc/setup-node.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run tests/grpc/setup-node.sh");
        assert!(out.status.success(), "tests/grpc/setup-node.sh failed");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// Runs `node_client.js ENDPOINT ARGS…` (bounded), asserts it succeeded, and returns
/// the JSON objects it printed.
pub fn node_client(endpoint: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc/node_client.js");
    let out = Command::new("timeout")
        .arg("120")
        .arg("node")
        .arg(script)
        .arg(endpoint)
        .args(args)
        .env("NODE_PATH", node_modules())
        .env("HOME", std::env::temp_dir())
        .output()
        .expect("run node");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "node_client.js {args:?} failed:\n{}\nstdout:\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    crate::json_lines(&text)
}
