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
    Ok(())
}
