//! Compiles the RocketMQ 5 gRPC protocol the broker vendors (`broker/proto`, Apache 2.0,
//! unchanged from apache/rocketmq-apis) into a tonic client for `--protocol grpc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // SAFETY: a build script is single-threaded; prost-build reads PROTOC.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("PROTOC", protoc);
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_protos(
            &["../broker/proto/apache/rocketmq/v2/service.proto"],
            &[
                "../broker/proto",
                include
                    .to_str()
                    .ok_or("protoc's include path is not UTF-8")?,
            ],
        )?;
    println!("cargo:rerun-if-changed=../broker/proto/apache/rocketmq/v2");
    Ok(())
}
