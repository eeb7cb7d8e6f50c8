//! piclumen-grpc: a gRPC service in front of Piclumen's image-generation API.
//!
//! # Layout
//!
//! Imports flow one way: `main` -> `cli` | `server` | `sim` -> `http_api` ->
//! `service` -> `hub` | `idempotency` -> `upstream` -> domain types (`job`,
//! `error`), and every module may use the leaf `flags`. Each module owns its settings struct, and the struct declares
//! that module's flags (`#[derive(clap::Args)]`: flag, variable, default and
//! value parser on each field; `Default` parses no flags); `config` only
//! flattens them, checks what depends on several flags, reads files and
//! fills the settings that are not flags.
//!
//! - `config`: the command line (clap), every flag with an environment
//!   variable; the cross-checks and file reading (`config::settings`).
//! - `flags`: the value parsers every settings struct's flags use, and
//!   `no_flags`, the `Default` of each (a leaf: it imports nothing of ours).
//! - `server`: the tonic server: service, health, reflection, gRPC-Web, drain.
//! - `http_api/`: the first version's HTTP/JSON endpoints (routes, the lenient
//!   body decoder, error-class-to-HTTP table, OpenAPI) over the service core;
//!   no tonic, no proto.
//! - `service/`: a transport-free core (admission, create limit, watch
//!   streams) taking and returning domain types, and the gRPC edge over it
//!   (`ImageService`'s thin RPCs, `Error` -> `Status`).
//! - `hub/`: shared, batched polling (a pure schedule and its async shell).
//! - `idempotency/`: `request_id` dedupe for GenerateImage (memory or Redis).
//! - `upstream/`: the Piclumen HTTP/JSON client behind the `Upstream` trait,
//!   and the create request with its checks and Piclumen's defaults.
//! - `convert`: the gRPC edge's proto <-> domain conversions.
//! - `error`: the one error enum, its class and stable reason per variant.
//! - `job`: domain types: jobs, states, the redacting `Token` and `Secret`.
//! - `auth`: caller authentication (API keys) and TLS settings.
//! - `callers/`: named callers (`--callers-file`): identity, limits counted
//!   in memory or Redis, the file's reload, per-caller metrics, `usage`.
//! - `request_id`: `x-request-id` on every call, its responses and log lines.
//! - `grpc_metrics`: per-RPC Prometheus metrics (grpc-go's names and labels).
//! - `call_end`: how a gRPC call ended (status, unknown, cancelled), for
//!   the metrics and the SERVER spans.
//! - `telemetry`: logging and metrics setup.
//! - `redact`: the one URL redactor, for every log line with a URL.
//! - `codec`: the prost codec with small per-call buffers.
//! - `pb`: code generated from `proto/`, and the descriptor set for reflection.
//! - `sim/`: the Piclumen simulator (job world, faults, images, inspection).
//! - `cli`: the human client (`generate`, `watch`, `check`).
//! - `otel`: OpenTelemetry tracing: W3C trace context in, spans out over OTLP.

pub mod auth;
pub mod call_end;
pub mod callers;
pub mod cli;
pub mod codec;
pub mod config;
pub mod convert;
pub mod error;
pub mod flags;
pub mod grpc_metrics;
pub mod http_api;
pub mod hub;
pub mod idempotency;
pub mod job;
pub mod otel;
pub mod pb;
pub mod redact;
pub mod request_id;
pub mod server;
pub mod service;
pub mod sim;
pub mod support;
pub mod telemetry;
pub mod upstream;
