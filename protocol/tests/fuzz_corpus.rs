//! Replays the fuzz corpus (`fuzz/corpus/<target>/`, kept in the repository) through the
//! same property checks the fuzz targets run, so what fuzzing found once stays fixed.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    // The package directory at run time (cargo and nextest set it): a test binary in a
    // build cache shared by several clones must not read the clone it was built in.
    let root = std::env::var("CARGO_MANIFEST_DIR").unwrap_or(env!("CARGO_MANIFEST_DIR").into());
    let dir = Path::new(&root).join("../fuzz/corpus").join(target);
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("corpus file");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{} breaks {target}", path.display());
        inputs += 1;
    }
    assert!(inputs > 0, "the {target} corpus is empty");
}

#[test]
fn frame_decoder_corpus_holds() {
    replay("frame_decoder", txmq_protocol::fuzzing::frame_decoder);
}

#[test]
fn request_decoder_corpus_holds() {
    replay("request_decoder", txmq_protocol::fuzzing::request_decoder);
}
