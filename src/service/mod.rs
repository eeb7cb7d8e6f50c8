//! `piclumen.v1.ImageService`: a transport-free core and the gRPC edge over
//! it. The core takes and returns domain types (`upstream::CreateRequest`,
//! `job::JobStatus`, `error::Error`) and knows neither tonic nor proto; the
//! first version's HTTP API (`crate::http_api`) is a second edge over it.
//!
//! - `core`: admission, validation, GenerateImage, CheckImage, watch start.
//! - `admission`: credentials as plain inputs, token rules, watch slots.
//! - `in_flight`: the per-token create limit; where creates in flight live.
//! - `watch`: the WatchImage stream (heartbeats, maximum time, drain).
//! - `watch_many`: the WatchImages stream (many jobs on one stream).
//! - `wait`: CheckImage that waits for a change, on the job's channel.
//! - `settings`: `ServiceConfig`, whose fields declare the service's flags.
//! - `grpc`: the tonic methods: metadata and proto in, proto out.
//! - `status`: `Error` -> `tonic::Status`, the gRPC edge's one mapping.

mod admission;
mod core;
mod grpc;
mod in_flight;
mod settings;
mod status;
mod wait;
mod watch;
mod watch_many;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod wait_tests;
#[cfg(test)]
mod watch_many_tests;

pub use self::{
    admission::{Credentials, TokenInput},
    core::{Core, mark_id, mark_ids},
    grpc::{ImageServiceImpl, ManyStream, WatchStream, parse_grpc_timeout},
    settings::{ServiceConfig, defaults},
    wait::WaitFor,
    watch::WatchEvent,
    watch_many::ManyEvent,
};
