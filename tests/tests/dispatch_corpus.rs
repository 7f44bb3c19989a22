//! Replays the `dispatch` fuzz target's seeds and corpus (`fuzz/corpus/dispatch/`)
//! against the real broker with topic auto-creation off (issue 13, item 22): after each
//! input the broker must still answer and store a durable send. The seeds are the
//! requests a code review found holes in: transactional sends to missing topics, acks for
//! invented groups, durations that overflow the clock. `TXMQ_WRITE_DISPATCH_SEEDS=1`
//! writes the seeds into the corpus directory for `cargo fuzz run dispatch`. Each input
//! runs on an open broker and on a closed one (users, rules and the token: issue 26),
//! as the principal its first byte picks.

use std::path::PathBuf;

use txmq_client::Admin;
use txmq_tests::TestBroker;
use txmq_tests::dispatch::{ALIVE_TOPIC, closed_args, drive, prepare, seeds_as_everyone};

fn corpus_dir() -> PathBuf {
    let root = std::env::var("CARGO_MANIFEST_DIR").unwrap_or(env!("CARGO_MANIFEST_DIR").into());
    PathBuf::from(root).join("../fuzz/corpus/dispatch")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_seeds_and_corpus_leave_the_broker_serving() {
    let b = TestBroker::start(&["--auto-create-topics", "false"]);
    Admin::connect(b.addr(), "")
        .await
        .unwrap()
        .create_topic(ALIVE_TOPIC, false)
        .await
        .unwrap();
    let mut inputs: Vec<(String, Vec<u8>)> = seeds_as_everyone()
        .into_iter()
        .enumerate()
        .map(|(i, s)| (format!("seed {i}"), s))
        .collect();
    if std::env::var("TXMQ_WRITE_DISPATCH_SEEDS").is_ok() {
        std::fs::create_dir_all(corpus_dir()).unwrap();
        for (name, data) in &inputs {
            let file = corpus_dir().join(name.replace(' ', "-"));
            std::fs::write(file, data).unwrap();
        }
    }
    if let Ok(dir) = std::fs::read_dir(corpus_dir()) {
        for entry in dir {
            let path = entry.unwrap().path();
            inputs.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    // An open broker (every input anonymous), then a closed one (each input as the
    // principal its first byte picks: anonymous, the token, a user, a super user).
    for (name, data) in &inputs {
        if let Err(e) = drive(b.addr(), data, false).await {
            panic!("{name}, open broker: {e}\n{}", b.log_text());
        }
    }
    let (mut args, _files) = closed_args();
    args.extend(["--auto-create-topics".into(), "false".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let closed = TestBroker::start(&args);
    let ready = txmq_tests::eventually(std::time::Duration::from_secs(10), || async {
        prepare(closed.addr()).await.ok()
    })
    .await;
    assert!(ready.is_some(), "{}", closed.log_text());
    for (name, data) in &inputs {
        if let Err(e) = drive(closed.addr(), data, true).await {
            panic!("{name}, closed broker: {e}\n{}", closed.log_text());
        }
    }
}
