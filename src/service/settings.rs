//! The service's settings: each field that is a `serve` flag declares it
//! (name, variable, default, parser) right here; `config` flattens them into
//! `serve` and fills the fields that are not flags.

use std::time::Duration;

use clap::Args;

use crate::{
    auth::ApiKeys,
    callers::CallersConfig,
    flags::{duration_at_least, no_flags, positive, positive_duration, up_to},
    job::Token,
    upstream::Limits,
};

/// Settings of the service itself.
#[derive(Debug, Clone, Args)]
pub struct ServiceConfig {
    /// Token used when a call carries none (from `--token`, checked by
    /// `config`).
    #[arg(skip)]
    pub default_token: Option<Token>,
    /// When set, every call must carry one of these in `x-api-key` (read
    /// from `--api-keys-file` by `config`).
    #[arg(skip)]
    pub api_keys: Option<ApiKeys>,
    /// Request bounds.
    #[command(flatten)]
    pub limits: Limits,
    /// Named callers and their limits (`--callers-file`).
    #[command(flatten)]
    pub callers: CallersConfig,
    /// Longest a WatchImage stream stays open (then DEADLINE_EXCEEDED).
    #[arg(long, env = "PICLUMEN_MAX_WATCH", default_value = "30m", value_parser = positive_duration)]
    pub max_watch: Duration,
    /// Quiet time after which a watch resends its state as a heartbeat (at
    /// least 1s).
    #[arg(long, env = "PICLUMEN_HEARTBEAT", default_value = "30s", value_parser = duration_at_least(defaults::MIN_HEARTBEAT))]
    pub heartbeat: Duration,
    /// Most watches open at once (beyond: RESOURCE_EXHAUSTED): a WatchImage
    /// stream holds one, a WatchImages stream one per job, a CheckImage one
    /// while it waits.
    // 30,000: what one instance is shown to hold (BENCHMARKS.md: 30,000
    // watches of one token in 161 MiB, every change delivered within an
    // interval). A semaphore holds the places, and it has a ceiling.
    #[arg(long, env = "PICLUMEN_MAX_WATCHES", default_value = "30000", value_parser = up_to(tokio::sync::Semaphore::MAX_PERMITS))]
    pub max_watches: usize,
    /// Longest a CheckImage waits for its job to change (`wait`, or
    /// `Prefer: wait` on the HTTP API); longer waits are cut to it. A
    /// waiting check holds one of `--max-watches` while it waits.
    #[arg(long, env = "PICLUMEN_MAX_CHECK_WAIT", default_value = "60s", value_parser = positive_duration)]
    pub max_check_wait: Duration,
    /// Most mark ids in one WatchImages call (beyond: INVALID_ARGUMENT).
    /// Each id holds one of `--max-watches` while its stream is open.
    #[arg(long, env = "PICLUMEN_MAX_WATCH_IDS", default_value = "1000", value_parser = up_to(tokio::sync::Semaphore::MAX_PERMITS))]
    pub max_watch_ids: usize,
    /// Most GenerateImage calls in flight per token (beyond: RESOURCE_EXHAUSTED).
    #[arg(long, env = "PICLUMEN_MAX_GENERATES_PER_TOKEN", default_value = "16", value_parser = positive::<usize>)]
    pub max_generates_per_token: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        no_flags()
    }
}

/// The service's bounds (its defaults are on the fields above).
pub mod defaults {
    use std::time::Duration;

    /// Shortest `--heartbeat`.
    pub const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
}
