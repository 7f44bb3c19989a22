//! Compiles `proto/txmq.proto` with a vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded, and prost-build reads PROTOC.
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    config.bytes([".txmq.v1.Message.body", ".txmq.v1.StoredMessage.body"]);
    config.compile_protos(&["proto/txmq.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/txmq.proto");
    Ok(())
}
