//! Code generated from `proto/` by `build.rs`, and the encoded descriptor set
//! that reflection serves. Lints are relaxed here only.
#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

tonic::include_proto!("piclumen.v1");

/// Encoded `FileDescriptorSet` of our protos and their imports, with comments.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("piclumen_descriptor");
