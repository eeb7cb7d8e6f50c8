//! Every default and every bound of the server's and the simulator's
//! settings, in one place: clap's defaults, the `Default` impls and the
//! validation all read these.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use crate::{
    convert::Limits, hub::HubConfig, server::ServerConfig, service::ServiceConfig,
    upstream::ClientConfig,
};

// === Defaults ===

/// `--upstream-url`: Piclumen's production API.
pub const UPSTREAM_URL: &str = super::PRODUCTION_URL;
/// Port used when neither `--listen` nor `PORT` is given.
pub const PORT: u16 = super::DEFAULT_PORT;
/// `--poll-interval`.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// `--batch-max`.
pub const BATCH_MAX: u16 = 50;
/// `--max-watch`.
pub const MAX_WATCH: Duration = Duration::from_secs(30 * 60);
/// `--heartbeat`.
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// `--max-watches`: what one instance is shown to hold (BENCHMARKS.md:
/// 30,000 watches of one token in 161 MiB, every change delivered within an
/// interval).
pub const MAX_WATCHES: usize = 30_000;
/// `--failure-budget`.
pub const FAILURE_BUDGET: Duration = Duration::from_secs(60);
/// `--upstream-timeout`.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// `--upstream-connect-timeout`.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// `--idempotency-ttl`.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(10 * 60);
/// `--min-dimension`.
pub const MIN_DIMENSION: i32 = 64;
/// `--max-dimension`.
pub const MAX_DIMENSION: i32 = 4096;
/// `--max-prompt-chars`.
pub const MAX_PROMPT_CHARS: usize = 4000;
/// `--drain-timeout`.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// `--max-generates-per-token`.
pub const MAX_GENERATES_PER_TOKEN: usize = 16;
/// `--max-request-bytes`.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// `--http2-keepalive-interval`.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// `--http2-keepalive-timeout`.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// `--max-streams-per-connection`.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// How long the hub gathers newly watched jobs into one batch-status call
/// (not a flag: short enough to be unnoticeable, long enough to batch a
/// burst of new watches).
pub const GATHER: Duration = Duration::from_millis(50);
/// Default token of `serve --simulate` when none is given, so the quick
/// start works without one. The simulator accepts any token.
pub const SIMULATOR_TOKEN: &str = "simulator-demo-token";
/// `--log`.
pub const LOG: &str = "info";

/// `sim --listen`.
pub const SIM_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
/// `sim --job-duration` and `serve --sim-job-duration`.
pub const SIM_JOB_DURATION: Duration = Duration::from_secs(6);
/// `sim --job-jitter`.
pub const SIM_JOB_JITTER: f64 = 0.0;
/// `sim --latency`.
pub const SIM_LATENCY: Duration = Duration::ZERO;
/// `sim --fail-5xx-rate`.
pub const SIM_FAIL_5XX_RATE: f64 = 0.0;
/// `sim --fail-429-rate`.
pub const SIM_FAIL_429_RATE: f64 = 0.0;

// === Bounds ===

/// Shortest `--poll-interval`: below it a watch costs Piclumen a status
/// call several times a second for no visible gain.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Shortest `--heartbeat`.
pub const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
/// Largest `--batch-max`: more mark ids than this in one batch-status call
/// makes one slow call carry too many watches.
pub const MAX_BATCH: u16 = 500;
/// Longest accepted duration of any flag: far beyond any sensible setting,
/// and far from the overflow of `Instant + Duration`.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

// === Default settings ===
//
// What each settings struct holds when no flag is given; `serve` with no
// flags builds exactly these (see `ServeArgs::settings`).

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            service: ServiceConfig::default(),
            hub: HubConfig::default(),
            drain_timeout: DRAIN_TIMEOUT,
            max_streams_per_connection: MAX_STREAMS_PER_CONNECTION,
            max_request_bytes: MAX_REQUEST_BYTES,
            http2_keepalive_interval: HTTP2_KEEPALIVE_INTERVAL,
            http2_keepalive_timeout: HTTP2_KEEPALIVE_TIMEOUT,
            tls: None,
            cors_allow_origins: Vec::new(),
        }
    }
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            default_token: None,
            api_keys: None,
            limits: Limits::default(),
            max_watch: MAX_WATCH,
            heartbeat: HEARTBEAT,
            max_watches: MAX_WATCHES,
            max_generates_per_token: MAX_GENERATES_PER_TOKEN,
            idempotency_ttl: IDEMPOTENCY_TTL,
            idempotency_store: Default::default(),
        }
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            poll_interval: POLL_INTERVAL,
            batch_max: BATCH_MAX.into(),
            gather: GATHER,
            failure_budget: FAILURE_BUDGET,
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            base_url: UPSTREAM_URL.into(),
            timeout: UPSTREAM_TIMEOUT,
            connect_timeout: UPSTREAM_CONNECT_TIMEOUT,
            user_agent: None,
            origin: None,
            referer: None,
        }
    }
}
