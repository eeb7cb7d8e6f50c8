//! The idempotency store's settings: its `serve` flags, declared here. The
//! server opens the store from them ([`IdempotencyConfig::open`]) and hands
//! it to the service.

use std::{str::FromStr, time::Duration};

use clap::Args;

use super::{IdempotencyStore, StoreLocation, StoreNamespace};
use crate::flags::{no_flags, positive_duration};

/// Where `request_id` outcomes are kept, and for how long.
#[derive(Debug, Clone, Args)]
pub struct IdempotencyConfig {
    /// How long a GenerateImage `request_id`'s outcome is remembered.
    #[arg(
        id = "idempotency_ttl",
        value_name = "IDEMPOTENCY_TTL",
        long = "idempotency-ttl",
        env = "PICLUMEN_IDEMPOTENCY_TTL",
        default_value = "10m",
        value_parser = positive_duration
    )]
    pub ttl: Duration,
    /// Where `request_id` outcomes are kept: `memory` (this process only) or
    /// `redis://HOST:PORT[/DB]` / `rediss://...` (shared by replicas).
    #[arg(
        id = "idempotency_store",
        value_name = "IDEMPOTENCY_STORE",
        long = "idempotency-store",
        env = "PICLUMEN_IDEMPOTENCY_STORE",
        default_value = "memory",
        hide_env_values = true,
        value_parser = StoreLocation::from_str
    )]
    pub store: StoreLocation,
    /// The deployment's name in the shared store, in front of every key and
    /// channel; by default derived from `--upstream-url` (a hash of it), so
    /// deployments calling different Piclumen URLs never share records.
    /// Give replicas the same name to share, different names to split.
    #[arg(
        id = "store_namespace",
        value_name = "STORE_NAMESPACE",
        long = "store-namespace",
        env = "PICLUMEN_STORE_NAMESPACE",
        value_parser = StoreNamespace::from_str
    )]
    pub namespace: Option<StoreNamespace>,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        no_flags()
    }
}

impl IdempotencyConfig {
    /// The namespace of a deployment calling Piclumen at `upstream_url`:
    /// `--store-namespace` when given, else derived from the URL.
    pub fn namespace(&self, upstream_url: &str) -> StoreNamespace {
        StoreNamespace::resolve(self.namespace.as_ref(), upstream_url)
    }

    /// Opens the store under `namespace` ([`IdempotencyConfig::namespace`]);
    /// a Redis one connects lazily, so this never fails.
    pub fn open(&self, namespace: &StoreNamespace) -> IdempotencyStore {
        IdempotencyStore::open(&self.store, namespace, self.ttl)
    }
}
