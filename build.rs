//! Compiles `proto/` with protox (pure Rust, no protoc needed) and generates
//! tonic/prost code; also writes the descriptor set that reflection serves.
//! `proto-vendor/` holds the third-party protos ours import that protox does
//! not bundle (googleapis' `google/rpc/status.proto`); their Rust types come
//! from the crates that already have them, not from generated code.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &["piclumen/v1/image_service.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=proto-vendor");
    let fds = protox::Compiler::new(["proto", "proto-vendor"])?
        .include_imports(true)
        // Source info carries the proto comments to reflection, so that
        // `grpcurl describe` shows them.
        .include_source_info(true)
        .open_files(PROTOS)?
        .file_descriptor_set();

    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("piclumen_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .codec_path("crate::codec::LeanCodec")
        .build_client(true)
        .build_server(true)
        // tonic-types has google.rpc.Status as a prost message already.
        .extern_path(".google.rpc", "::tonic_types")
        .compile_fds(fds)?;
    Ok(())
}
