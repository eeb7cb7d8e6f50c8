//! `piclumen.v1.ImageService`: a transport-free core and the gRPC edge over
//! it. The core takes and returns domain types (`upstream::CreateRequest`,
//! `job::JobStatus`, `error::Error`) and knows neither tonic nor proto; the
//! first version's HTTP API (`crate::http_api`) is a second edge over it.
//!
//! - `core`: admission, validation, GenerateImage, CheckImage, watch start.
//! - `admission`: credentials as plain inputs, token rules, watch slots.
//! - `in_flight`: the per-token create limit; where creates in flight live.
//! - `watch`: the WatchImage stream (heartbeats, maximum time, drain).
//! - `settings`: `ServiceConfig`, whose fields declare the service's flags.
//! - `grpc`: the tonic methods: metadata and proto in, proto out.
//! - `status`: `Error` -> `tonic::Status`, the gRPC edge's one mapping.

mod admission;
mod core;
mod grpc;
mod in_flight;
mod settings;
mod status;
mod watch;

#[cfg(test)]
mod tests;

pub use self::{
    admission::{Credentials, TokenInput},
    core::{Core, mark_id},
    grpc::{ImageServiceImpl, WatchStream, parse_grpc_timeout},
    settings::{ServiceConfig, defaults},
    watch::WatchEvent,
};
