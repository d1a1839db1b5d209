//! Compiles proto/ without a system `protoc`: protox parses the files into a
//! FileDescriptorSet, which feeds both tonic's code generator and gRPC
//! server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "envoy/service/ratelimit/v3/rls.proto",
        "sluice/admin/v1/admin.proto",
        "sluice/usage/v1/usage.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("sluice_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    // The RLS server sluice runs: the same service and route, taking a
    // `WireRequest` (the request with its strings as bytes, so a value that
    // is not UTF-8 is decided, not a decode error) and answering with
    // `WireResponse` (encoded straight from a decision) instead of the
    // generated types. Clients still use the generated ones.
    let direct = out.join("rls_direct");
    fs::create_dir_all(&direct)?;
    let rls = tonic_build::manual::Service::builder()
        .name("RateLimitService")
        .package("envoy.service.ratelimit.v3")
        .method(
            tonic_build::manual::Method::builder()
                .name("should_rate_limit")
                .route_name("ShouldRateLimit")
                .input_type("crate::server::wire::WireRequest")
                .output_type("crate::server::wire::WireResponse")
                .codec_path("tonic_prost::ProstCodec")
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new()
        .build_client(false)
        .out_dir(&direct)
        .compile(&[rls]);
    Ok(())
}
