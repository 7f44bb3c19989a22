//! The Remoting face from the outside: the official RocketMQ Java client's scenarios
//! (the Maven project `tests/java`, run in one JVM by [`java`]), and a raw frame
//! client for what no well-behaved client sends.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A broker with the Remoting and gRPC faces on free ports, and check-backs quick
/// enough for tests (2 s after a half message, every 500 ms).
pub fn broker() -> crate::TestBroker {
    crate::TestBroker::start(&[
        "--remoting-listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
        "--check-timeout",
        "2s",
        "--check-interval",
        "500ms",
    ])
}

/// Runs the Java scenarios `tests` (a surefire `-Dtest` filter) against the Remoting
/// face at `namesrv`, with system properties `props`, in one JVM, bounded by `limit`;
/// asserts they passed and returns Maven's output. The dependencies were resolved by
/// `scripts/setup.sh`: Maven runs offline.
pub fn java(
    namesrv: &str,
    run: &str,
    tests: &str,
    props: &[(&str, &str)],
    limit: Duration,
) -> String {
    java_client(None, namesrv, run, tests, props, limit)
}

/// [`java`] with the Java client of Maven profile `profile` (`client49`: the 4.9 line).
pub fn java_client(
    profile: Option<&str>,
    namesrv: &str,
    run: &str,
    tests: &str,
    props: &[(&str, &str)],
    limit: Duration,
) -> String {
    maven("java", profile, namesrv, run, tests, props, limit)
}

/// Runs the Spring Boot order service of `tests/spring` (its test `OrderPointsTest`)
/// against the Remoting face at `namesrv`; asserts it passed and returns its output.
pub fn spring(namesrv: &str, run: &str, limit: Duration) -> String {
    maven("spring", None, namesrv, run, "OrderPointsTest", &[], limit)
}

/// Runs the RocketMQ 5 gRPC Java client's scenarios (`tests/java-grpc`) against the
/// gRPC face at `grpc`; asserts they passed and returns Maven's output.
pub fn java_grpc(grpc: &str, run: &str, limit: Duration) -> String {
    maven(
        "java-grpc",
        None,
        "",
        run,
        "GrpcClientTest",
        &[("txmq.grpc", grpc)],
        limit,
    )
}

/// Runs the tests `tests` of the Maven project `tests/<dir>` offline.
fn maven(
    dir: &str,
    profile: Option<&str>,
    namesrv: &str,
    run: &str,
    tests: &str,
    props: &[(&str, &str)],
    limit: Duration,
) -> String {
    let project = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    // Each caller's own build directory: tests in other processes run Maven at once.
    let build = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new("timeout")
        .arg(limit.as_secs().to_string())
        .args(["mvn", "-B", "-o", "-q", "-f"])
        .arg(project.join("pom.xml"))
        .arg(format!("-Dtxmq.build={}", build.path().display()))
        .args(profile.map(|p| format!("-P{p}")))
        .arg(format!("-Dtxmq.namesrv={namesrv}"))
        .arg(format!("-Dtxmq.run={run}"))
        .arg(format!("-Dtest={tests}"))
        .args(props.iter().map(|(k, v)| format!("-D{k}={v}")))
        .arg("test")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mvn (scripts/setup.sh installs Maven and resolves tests/java)");
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    let status = child.wait().expect("wait for mvn");
    assert!(
        status.success(),
        "the Java scenarios {tests} failed ({status}):\n{out}\n{err}"
    );
    out
}

/// An answer (or a request) read off a Remoting connection, JSON header only.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub code: i64,
    pub opaque: i64,
    pub flag: i64,
    pub remark: String,
    pub ext: HashMap<String, String>,
    pub body: Vec<u8>,
}

/// A raw Remoting connection.
pub struct Raw {
    stream: TcpStream,
}

impl Raw {
    /// Connects to `addr`, or `None` when nothing listens there (a node that died).
    pub fn try_connect(addr: &str) -> Option<Self> {
        let addr: std::net::SocketAddr = addr.parse().ok()?;
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        Some(Self { stream })
    }

    /// Connects to `addr`.
    pub fn connect(addr: &str) -> Self {
        let stream = TcpStream::connect(addr).expect("connect to the Remoting face");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Self { stream }
    }

    /// Sends bytes as they are.
    pub fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Sends a request with a JSON header; `false` when the connection is gone (a
    /// client of a broker that may be killed).
    pub fn try_request(
        &mut self,
        code: i32,
        opaque: i32,
        flag: i32,
        ext: &[(&str, &str)],
        body: &[u8],
    ) -> bool {
        let ext: serde_json::Map<String, serde_json::Value> = ext
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_string(),
                    serde_json::Value::String((*v).to_string()),
                )
            })
            .collect();
        let header = serde_json::json!({
            "code": code, "extFields": ext, "flag": flag, "language": "JAVA",
            "opaque": opaque, "serializeTypeCurrentRPC": "JSON", "version": 479,
        });
        let header = serde_json::to_vec(&header).expect("json");
        let mut frame = Vec::new();
        frame.extend_from_slice(&((4 + header.len() + body.len()) as u32).to_be_bytes());
        frame.extend_from_slice(&(header.len() as u32).to_be_bytes());
        frame.extend_from_slice(&header);
        frame.extend_from_slice(body);
        self.stream.write_all(&frame).is_ok()
    }

    /// Sends a request with a JSON header.
    pub fn request(
        &mut self,
        code: i32,
        opaque: i32,
        flag: i32,
        ext: &[(&str, &str)],
        body: &[u8],
    ) {
        assert!(self.try_request(code, opaque, flag, ext, body), "write");
    }

    /// Sends a request signed as RocketMQ's `AclClientRPCHook` signs it: the fields
    /// `AccessKey` (`ak`) and `Signature`, the base64 HMAC-SHA1 under `sk` of every
    /// field's value in the order of their names, then the body.
    pub fn signed(
        &mut self,
        code: i32,
        opaque: i32,
        ext: &[(&str, &str)],
        body: &[u8],
        (ak, sk): (&str, &str),
    ) {
        use base64::Engine;
        use hmac::Mac;
        let mut fields: Vec<(&str, &str)> = ext.to_vec();
        fields.push(("AccessKey", ak));
        fields.sort_by_key(|(k, _)| *k);
        let mut mac =
            <hmac::Hmac<sha1::Sha1> as Mac>::new_from_slice(sk.as_bytes()).expect("a key");
        for (_, v) in &fields {
            mac.update(v.as_bytes());
        }
        mac.update(body);
        let signature =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        fields.push(("Signature", &signature));
        self.request(code, opaque, 0, &fields, body);
    }

    /// The next frame, or `None` when the connection closed or nothing came in
    /// `wait`.
    pub fn read(&mut self, wait: Duration) -> Option<Reply> {
        self.stream.set_read_timeout(Some(wait)).expect("timeout");
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).ok()?;
        let len = u32::from_be_bytes(len) as usize;
        let mut frame = vec![0u8; len];
        self.stream.read_exact(&mut frame).ok()?;
        let word = u32::from_be_bytes(frame[..4].try_into().ok()?);
        assert_eq!(word >> 24, 0, "the broker answers a JSON request in JSON");
        let header_len = (word & 0xFF_FFFF) as usize;
        let header: serde_json::Value =
            serde_json::from_slice(&frame[4..4 + header_len]).expect("JSON header");
        let ext = header["extFields"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().expect("string fields").to_string()))
                    .collect()
            })
            .unwrap_or_default();
        Some(Reply {
            code: header["code"].as_i64().unwrap_or(-1),
            opaque: header["opaque"].as_i64().unwrap_or(-1),
            flag: header["flag"].as_i64().unwrap_or(-1),
            remark: header["remark"].as_str().unwrap_or_default().to_string(),
            ext,
            body: frame[4 + header_len..].to_vec(),
        })
    }

    /// The answer to request `opaque` within `wait`, past the broker's own requests
    /// (a rebalance notice, a check-back) that come before it.
    pub fn answer(&mut self, opaque: i64, wait: Duration) -> Option<Reply> {
        let until = std::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let r = self.read(left.max(Duration::from_millis(1)))?;
            if r.flag & 1 == 1 && r.opaque == opaque {
                return Some(r);
            }
        }
    }

    /// Whether the broker closed the connection within `wait` (what it wrote before
    /// is read and dropped).
    pub fn is_closed(&mut self, wait: Duration) -> bool {
        let until = std::time::Instant::now() + wait;
        let mut buf = [0u8; 4096];
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream.set_read_timeout(Some(left)).expect("timeout");
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        }
    }
}

/// The classpath of the Java scenarios and mqadmin (`rocketmq-tools`), resolved once
/// (offline: `scripts/setup.sh` fetched it).
fn classpath() -> &'static str {
    static CLASSPATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CLASSPATH.get_or_init(|| {
        let project = Path::new(env!("CARGO_MANIFEST_DIR")).join("java");
        let build = tempfile::tempdir().expect("temp dir");
        let file = build.path().join("classpath");
        let out = Command::new("mvn")
            .args(["-B", "-o", "-q", "-f"])
            .arg(project.join("pom.xml"))
            .arg(format!("-Dtxmq.build={}", build.path().display()))
            .arg(format!("-Dmdep.outputFile={}", file.display()))
            .arg("dependency:build-classpath")
            .output()
            .expect("run mvn (scripts/setup.sh installs Maven and resolves tests/java)");
        assert!(
            out.status.success(),
            "mvn dependency:build-classpath failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::fs::read_to_string(&file).expect("the classpath")
    })
}

/// Runs `mqadmin ARGS -n NAMESRV` (RocketMQ's `MQAdminStartup`, bounded): whether it
/// said nothing of a failure, and what it printed.
pub fn mqadmin(namesrv: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("timeout")
        .arg("60")
        .args(["java", "-cp", classpath()])
        .arg("org.apache.rocketmq.tools.command.MQAdminStartup")
        .args(args)
        .args(["-n", namesrv])
        .env("ROCKETMQ_HOME", std::env::temp_dir())
        .output()
        .expect("run java");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // mqadmin prints a failed command's exception and still exits 0.
    let ok = out.status.success() && !text.contains("Exception");
    (ok, text)
}

/// Runs the Go tests matching `pattern` (`go test -run`) in `tests/go` with `envs`,
/// bounded by `limit`; asserts they passed. The modules were downloaded by
/// `scripts/setup.sh`.
pub fn go(pattern: &str, envs: &[(&str, &str)], limit: Duration) -> String {
    let project = Path::new(env!("CARGO_MANIFEST_DIR")).join("go");
    let out = Command::new("timeout")
        .arg(limit.as_secs().to_string())
        .args(["go", "test", "-count=1", "-run", pattern, "./..."])
        .current_dir(&project)
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .envs(envs.iter().copied())
        .output()
        .expect("run go (scripts/setup.sh downloads tests/go's modules)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "go test -run {pattern} failed:\n{text}"
    );
    text
}
