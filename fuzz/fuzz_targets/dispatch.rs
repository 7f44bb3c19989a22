//! Arbitrary requests into a broker's dispatch (issue 13, item 22): one broker runs in
//! this process on a temporary directory (topic auto-creation off, as in the code review's
//! findings); each input is a sequence of length-prefixed `Frame`s
//! (`txmq_tests::dispatch::frames`) sent on one connection, after which the broker must
//! still answer and store a durable send on a fresh one. Seeds: `fuzz/corpus/dispatch`
//! (written by `TXMQ_WRITE_DISPATCH_SEEDS=1 cargo nextest run -p txmq-tests --test
//! dispatch_corpus`), replayed by that test on every run.
#![no_main]

use std::sync::OnceLock;

struct Broker {
    runtime: tokio::runtime::Runtime,
    addr: String,
    _dir: tempfile::TempDir,
}

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(|| {
        // libFuzzer's main is not Rust's, which would ignore SIGPIPE: without this, an
        // input after which the broker closed the connection kills the fuzzer with it.
        #[allow(unsafe_code)]
        // SAFETY: setting a signal's disposition to SIG_IGN, before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        // A closed broker: the token, a super user and a normal user with rules, so
        // that inputs run as each kind of principal (their first byte picks).
        use txmq_tests::dispatch::{ROOT, TOKEN};
        let config = txmq_broker::Config {
            data_dir: dir.path().join("data"),
            auto_create_topics: false,
            auth_token: Some(TOKEN.into()),
            bootstrap_admin: Some((ROOT.0.into(), ROOT.1.into())),
            grpc_listen: "none".into(),
            ..Default::default()
        };
        let addr = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr").to_string();
            tokio::spawn(txmq_broker::run(listener, config, std::future::pending()));
            while txmq_tests::dispatch::prepare(&addr).await.is_err() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            addr
        });
        Broker {
            runtime,
            addr,
            _dir: dir,
        }
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let b = broker();
    if let Err(e) = b
        .runtime
        .block_on(txmq_tests::dispatch::drive(&b.addr, data, true))
    {
        panic!("the broker stopped serving after this input: {e}");
    }
});
