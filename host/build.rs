//! Build script: compiles the gRPC contract in `schema/proto/` with protox (no `protoc` needed),
//! generates the tonic services, and writes the descriptor set that server reflection serves.

use std::path::PathBuf;

use anyhow::Context;
use prost::Message;

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let schema = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../schema/proto");
    let proto = schema.join("streaming/v1/streaming.proto");
    println!("cargo:rerun-if-changed={}", proto.display());

    let fds = protox::compile([&proto], [&schema]).context("compiling streaming.proto")?;
    std::fs::write(
        out_dir.join("streaming_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .bytes(".")
        .compile_fds(fds)
        .context("generating the tonic services")?;
    Ok(())
}
