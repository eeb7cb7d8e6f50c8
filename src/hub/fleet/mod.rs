//! Fleet polling (`--fleet-polling`, on with a Redis store): replicas share
//! one poll per token through the shared store instead of each polling its
//! own watchers' jobs.
//!
//! For each token, the replicas that have watchers of it exchange with the
//! store every third of an interval (`coordinator`): one holds a lease and
//! polls the union of the ids the others register; it publishes every
//! answer (a round) on one channel that every replica listens to, and keeps
//! each answer as a state key for a few intervals, which followers read
//! back when they missed a round. A pause (429) or an outage of the holder
//! is published too, so it applies to the whole fleet. When the store is
//! unreachable each replica polls its own jobs, and goes back to sharing
//! when the store answers again.
//!
//! Keys and the rounds channel live in the deployment's namespace
//! (`StoreNamespace`), so only replicas calling the same Piclumen (or given
//! the same `--store-namespace`) share polling: a deployment calling
//! another URL on the same Redis never takes a lease or hears a round of
//! this one's.
//!
//! Tokens never reach the store: keys and rounds name a token by the
//! SHA-256 of it. A replica only ever polls with a token one of its own
//! callers gave it, and takes part (and takes the lease) only while it has
//! watchers of that token.

pub mod coordinator;
pub mod redis;
pub mod wire;

use std::{
    fmt,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::schedule::Id;
use crate::{job::Token, upstream::BoxFuture};
use wire::{Encoded, Entry, Round};

/// `--fleet-polling`: whether replicas sharing a Redis store also share
/// polling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FleetPolling {
    /// Share polling when the store is Redis (the default).
    #[default]
    On,
    /// Each replica polls its own watchers' jobs.
    Off,
}

impl FromStr for FleetPolling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err("expected `on` or `off`".into()),
        }
    }
}

impl fmt::Display for FleetPolling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::On => "on",
            Self::Off => "off",
        })
    }
}

/// A token's name in the shared store: the hex SHA-256 of the token.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct TokenKey(Arc<str>);

impl TokenKey {
    /// The key of `token`.
    pub fn of(token: &Token) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.expose().as_bytes());
        Self(crate::support::hex(digest.as_ref()).into())
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The store could not be reached or answered nonsense; the text is for
/// the log.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct FleetError(pub String);

/// One exchange of a replica with the store for one token.
#[derive(Debug, Clone)]
pub struct ExchangeRequest {
    /// The token's key.
    pub key: TokenKey,
    /// This replica.
    pub me: Arc<str>,
    /// Lease lifetime.
    pub lease: Duration,
    /// How long registered ids stay wanted.
    pub want_ttl: Duration,
    /// Ids to register (only when the lease is another's).
    pub register: Vec<Id>,
    /// Ids whose stored state to read back.
    pub read: Vec<Id>,
}

/// The store's answer to an exchange.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExchangeReply {
    /// True when this replica holds the lease (taken or renewed).
    pub holder: bool,
    /// For the holder: every id some replica wants.
    pub wanted: Vec<Id>,
    /// Stored states of the ids asked to read (those still kept).
    pub states: Vec<Entry>,
}

/// The shared store, as fleet polling needs it: Redis in production, a
/// scripted fake in tests.
pub trait FleetStore: Send + Sync + 'static {
    /// Takes or renews the lease, registers ids (when the lease is
    /// another's), and reads wanted ids (when it is ours) and stored states.
    fn exchange(&self, request: ExchangeRequest) -> BoxFuture<Result<ExchangeReply, FleetError>>;

    /// Keeps each entry of `round` as the job's state for `keep`, drops
    /// `done` ids from the wanted set, and publishes the round to every
    /// replica.
    fn publish(
        &self,
        round: Encoded,
        done: Vec<Id>,
        keep: Duration,
    ) -> BoxFuture<Result<(), FleetError>>;

    /// Gives the lease back if `me` holds it.
    fn release(&self, key: TokenKey, me: Arc<str>) -> BoxFuture<Result<(), FleetError>>;

    /// Every round any replica publishes from now on, until the
    /// subscription is lost (the receiver then ends; subscribe again).
    fn subscribe(&self) -> BoxFuture<Result<mpsc::Receiver<Arc<Round>>, FleetError>>;
}

/// A hub's link to the fleet: the store, this replica's name, and the
/// store's health, logged once per outage.
pub struct FleetLink {
    /// The store.
    pub store: Arc<dyn FleetStore>,
    /// This replica's name in leases and rounds (random per process).
    pub me: Arc<str>,
    down: AtomicBool,
}

impl fmt::Debug for FleetLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetLink")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl FleetLink {
    /// A link through `store`, under a fresh replica name.
    pub fn new(store: Arc<dyn FleetStore>) -> Self {
        let me = format!("{:016x}-{}", rand::random::<u64>(), std::process::id());
        Self {
            store,
            me: me.into(),
            down: AtomicBool::new(false),
        }
    }

    /// Records how a store operation went; logs the start and the end of an
    /// outage once each.
    pub fn report<T>(&self, result: &Result<T, FleetError>) {
        match result {
            Ok(_) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    info!(
                        "fleet polling: the shared store is reachable again; replicas share polling"
                    );
                }
            }
            Err(error) => {
                if !self.down.swap(true, Ordering::Relaxed) {
                    warn!(%error, "fleet polling: the shared store is unreachable; each replica polls its own jobs until it is back");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
