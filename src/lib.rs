//! piclumen-grpc: a gRPC service in front of Piclumen's image-generation API.
//!
//! # Layout
//!
//! - `auth`: caller authentication (API keys) and TLS settings.
//! - `config`: the command line (clap), every flag with an environment variable;
//!   one home per default (`config::defaults`) and the flags-to-settings step.
//! - `codec`: the prost codec with small per-call buffers.
//! - `pb`: code generated from `proto/`, and the descriptor set for reflection.
//! - `grpc_metrics`: per-RPC Prometheus metrics (grpc-go's names and labels).
//! - `request_id`: `x-request-id` on every call, its responses and log lines.
//! - `server`: the tonic server: service, health, reflection, drain on shutdown.
//! - `service`: `ImageService`: tokens, deadlines, validation, streams.
//! - `convert`: proto <-> domain <-> upstream JSON, with Piclumen's defaults.
//! - `error`: the one error enum and its mapping to `tonic::Status`.
//! - `idempotency`: `request_id` dedupe for GenerateImage (in memory or Redis).
//! - `http_api`: the first version's HTTP/JSON endpoints, Swagger UI, on the same service.
//! - `hub`: shared, batched polling behind WatchImage.
//! - `job`: domain types: jobs, states, the redacting `Token`.
//! - `upstream`: the Piclumen HTTP/JSON client.
//! - `sim`: the Piclumen simulator.
//! - `cli`: the human client (`generate`, `watch`, `check`).
//! - `telemetry`: logging and metrics setup.
//! - `otel`: OpenTelemetry tracing: W3C trace context in, spans out over OTLP.
//!
//! Data flows one way: service -> hub -> upstream.

pub mod auth;
pub mod cli;
pub mod codec;
pub mod config;
pub mod convert;
pub mod error;
pub mod grpc_metrics;
pub mod http_api;
pub mod hub;
pub mod idempotency;
pub mod job;
pub mod otel;
pub mod pb;
pub mod request_id;
pub mod server;
pub mod service;
pub mod sim;
pub mod telemetry;
pub mod upstream;
