//! Named callers (`--callers-file`): who is calling, what they may spend,
//! and what they spent.
//!
//! - `file`: the TOML file, checked whole, indexed by key hash and subject.
//! - `reload`: the file re-read on SIGHUP and when its content changes.
//! - `limits`: windows and the limit rule as plain logic on `now`, and the
//!   per-process counters of the memory store.
//! - `redis`: the same counters shared by replicas in Redis.
//! - `gate`: what the service calls: identify a caller, charge a create,
//!   hold a watch place.
//! - `bill`: per-caller metrics; `trace`: the caller's name on the call's
//!   log lines and span.
//! - `settings`: the flags; `usage`: the `usage` and `hash-key` commands.

mod bill;
mod file;
mod gate;
mod limits;
mod redis;
mod reload;
mod settings;
mod trace;
pub mod usage;

use std::{fmt, sync::Arc};

pub use self::{
    bill::Rpc,
    file::{Directory, FileError, normalize_subject},
    gate::{CallerGate, Charge, WatchPlace},
    limits::{Clock, LimitKind, Limits, MemoryCounters, Refusal, Reserved, Windows, decide},
    redis::RedisCounters,
    settings::CallersConfig,
    trace::record_caller,
};
use crate::job::Token;

/// One named caller of the file.
pub struct Caller {
    /// Its name (in logs, metrics, Redis keys; never a secret).
    pub name: Arc<str>,
    /// Its limits.
    pub limits: Limits,
    /// Its own Piclumen token, used when it sends none.
    pub token: Option<Token>,
    /// Its metric handles.
    pub bill: bill::Bill,
}

impl Caller {
    /// A caller; its metric handles are made on first use.
    pub fn new(name: Arc<str>, limits: Limits, token: Option<Token>) -> Self {
        Self {
            bill: bill::Bill::new(Arc::clone(&name)),
            name,
            limits,
            token,
        }
    }
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caller")
            .field("name", &self.name)
            .field("limits", &self.limits)
            .field("token", &self.token.as_ref().map(|_| "redacted"))
            .finish()
    }
}

/// The SHA-256 of an API key, as `key_sha256` holds it.
pub fn key_hash(key: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, key);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}
