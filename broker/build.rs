//! Compiles the vendored RocketMQ 5 gRPC protocol (`proto/apache/rocketmq/v2`, Apache
//! 2.0, unchanged from apache/rocketmq-apis) into a tonic server, with a vendored protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // SAFETY: a build script is single-threaded; prost-build reads PROTOC.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("PROTOC", protoc);
    }
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .generate_default_stubs(true)
        .compile_protos(
            &["proto/apache/rocketmq/v2/service.proto"],
            &[
                "proto",
                include
                    .to_str()
                    .ok_or("protoc's include path is not UTF-8")?,
            ],
        )?;
    println!("cargo:rerun-if-changed=proto/apache/rocketmq/v2");
    Ok(())
}
