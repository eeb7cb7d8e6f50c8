//! The service's settings and their defaults (the `serve` flags read these).

use std::time::Duration;

use crate::{auth::ApiKeys, convert::Limits, idempotency::StoreLocation, job::Token};

/// Settings of the service itself.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Token used when a call carries none.
    pub default_token: Option<Token>,
    /// When set, every call must carry one of these in `x-api-key`.
    pub api_keys: Option<ApiKeys>,
    /// Request bounds.
    pub limits: Limits,
    /// Longest a WatchImage stream stays open.
    pub max_watch: Duration,
    /// Quiet time after which a watch repeats its state.
    pub heartbeat: Duration,
    /// Most WatchImage streams open at once.
    pub max_watches: usize,
    /// Most creates in flight upstream per token.
    pub max_generates_per_token: usize,
    /// How long a `request_id`'s outcome is remembered.
    pub idempotency_ttl: Duration,
    /// Where `request_id` outcomes are kept.
    pub idempotency_store: StoreLocation,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            default_token: None,
            api_keys: None,
            limits: Limits::default(),
            max_watch: defaults::MAX_WATCH,
            heartbeat: defaults::HEARTBEAT,
            max_watches: defaults::MAX_WATCHES,
            max_generates_per_token: defaults::MAX_GENERATES_PER_TOKEN,
            idempotency_ttl: defaults::IDEMPOTENCY_TTL,
            idempotency_store: Default::default(),
        }
    }
}

/// The service's defaults and bounds (the `serve` flags read these).
pub mod defaults {
    use std::time::Duration;

    /// `--max-watch`.
    pub const MAX_WATCH: Duration = Duration::from_secs(30 * 60);
    /// `--heartbeat`.
    pub const HEARTBEAT: Duration = Duration::from_secs(30);
    /// Shortest `--heartbeat`.
    pub const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
    /// `--max-watches`: what one instance is shown to hold (BENCHMARKS.md:
    /// 30,000 watches of one token in 161 MiB, every change delivered within
    /// an interval).
    pub const MAX_WATCHES: usize = 30_000;
    /// `--max-generates-per-token`.
    pub const MAX_GENERATES_PER_TOKEN: usize = 16;
    /// `--idempotency-ttl`.
    pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(10 * 60);
}
