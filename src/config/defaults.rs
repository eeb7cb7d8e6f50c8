//! Every default and bound of the server's and the simulator's settings,
//! gathered for the flags: each value lives in the module that owns the
//! setting (next to its settings struct and `Default`), and is re-exported
//! here so clap's defaults, the validation and the tests read one list.

use std::time::Duration;

pub use crate::{
    convert::bounds::{MAX_DIMENSION, MAX_PROMPT_CHARS, MIN_DIMENSION},
    hub::defaults::{
        BATCH_MAX, FAILURE_BUDGET, GATHER, MAX_BATCH, MIN_POLL_INTERVAL, POLL_INTERVAL,
    },
    server::defaults::{
        DRAIN_TIMEOUT, HTTP2_KEEPALIVE_INTERVAL, HTTP2_KEEPALIVE_TIMEOUT, MAX_REQUEST_BYTES,
        MAX_STREAMS_PER_CONNECTION, PORT,
    },
    service::defaults::{
        HEARTBEAT, IDEMPOTENCY_TTL, MAX_GENERATES_PER_TOKEN, MAX_WATCH, MAX_WATCHES, MIN_HEARTBEAT,
    },
    sim::defaults::{
        SIM_FAIL_5XX_RATE, SIM_FAIL_429_RATE, SIM_JOB_DURATION, SIM_JOB_JITTER, SIM_LATENCY,
        SIM_LISTEN, SIMULATOR_TOKEN,
    },
    telemetry::DEFAULT_LOG as LOG,
    upstream::defaults::{UPSTREAM_CONNECT_TIMEOUT, UPSTREAM_TIMEOUT, UPSTREAM_URL},
};

/// Longest accepted duration of any flag: far beyond any sensible setting,
/// and far from the overflow of `Instant + Duration`.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);
