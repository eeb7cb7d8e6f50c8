//! `request_id` dedupe for GenerateImage: a retried call returns the first
//! call's mark id instead of paying for a second generation.
//!
//! The first call for a (token, request_id) claims the key atomically in a
//! backend ([`memory`] for one process, [`redis`] shared by replicas) and
//! runs the create in its own task ([`store`]), bounded by
//! `--upstream-timeout` only: it goes on when its caller gives up, and a
//! draining server waits for it ([`CreatesInFlight`]). Every caller (the
//! first, its retries, concurrent duplicates, here or on another replica)
//! waits for it within its own deadline and gets its outcome; callers in
//! this process are woken by a channel, callers elsewhere poll the key.
//!
//! A claim is a lease ([`lease`]): its holder renews it every second while
//! the create runs, and it records whether the create was already sent.
//! A holder that dies (killed, out of memory) stops renewing; within a few
//! seconds its lease lapses, and then:
//! - not yet sent: the key is free, a retry creates;
//! - sent: the job may exist, so retries get `Error::CreateOutcomeUnknown`
//!   for the rest of `--idempotency-ttl`, never a second create.
//!
//! What a create that ends leaves behind:
//! - success: the mark id and seed, kept for the TTL;
//! - a failure that surely never reached Piclumen, or a definite refusal
//!   (401, 400, a rejected envelope, ...): forgotten, a retry may create;
//! - sent without a usable reply (timeout, broken connection, a gateway's
//!   502/504, an unreadable 2xx): "outcome unknown", kept for the TTL; retries
//!   get `Error::CreateOutcomeUnknown` rather than a second paid job.
//!
//! Keys hold a SHA-256 of the token, never the token itself, and start
//! with the deployment's [`StoreNamespace`]: deployments sharing one Redis
//! but calling different Piclumen URLs never see each other's records.

mod in_flight;
mod lease;
mod memory;
mod namespace;
mod redis;
mod settings;
mod store;
mod traced;

pub use in_flight::{CreatesInFlight, InFlight};
pub use namespace::StoreNamespace;
pub use settings::IdempotencyConfig;
pub use store::IdempotencyStore;

use crate::support::{hex, lock};
use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{error::Error, job::Token, upstream::redact_url};

/// What follows the namespace's prefix in every key, versioned with the
/// record format: `piclumen-grpc:<namespace>:request-id:v1:<hash>`. Keys of
/// versions before namespaces (`piclumen-grpc:request-id:v1:<hash>`) are
/// not read: they may be another deployment's (see the README's "Scaling
/// out").
const KEY_KIND: &str = "request-id:v1:";

/// Where `request_id` outcomes are kept (`--idempotency-store`).
#[derive(Clone, Default, PartialEq, Eq)]
pub enum StoreLocation {
    /// In this process only (the default).
    #[default]
    Memory,
    /// In Redis, shared by every replica: a `redis://` or `rediss://` URL.
    Redis(String),
}

impl FromStr for StoreLocation {
    type Err = String;

    /// `memory`, `redis://HOST:PORT[/DB]` or `rediss://HOST:PORT[/DB]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "memory" {
            return Ok(Self::Memory);
        }
        if !(s.starts_with("redis://") || s.starts_with("rediss://")) {
            return Err(
                "expected `memory`, `redis://HOST:PORT[/DB]` or `rediss://HOST:PORT[/DB]`".into(),
            );
        }
        ::redis::Client::open(s).map_err(|e| format!("not a usable Redis URL: {e}"))?;
        Ok(Self::Redis(s.to_owned()))
    }
}

impl StoreLocation {
    /// The backend's name, for spans.
    fn system(&self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Redis(_) => "redis",
        }
    }
}

impl fmt::Display for StoreLocation {
    /// The location with any password left out, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory => f.write_str("memory"),
            Self::Redis(url) => f.write_str(&redact_url(url)),
        }
    }
}

impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a successful create returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// Piclumen's job id.
    pub mark_id: String,
    /// The seed sent.
    pub seed: i64,
}

/// A request's parameters as a SHA-256: the same in every process and
/// version, so replicas agree on what "the same request" is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(String);

/// The scheme of today's fingerprints (the SHA-256 of the domain request's
/// JSON). The first scheme, a bare hex SHA-256 of the proto encoding, had
/// no prefix.
const FINGERPRINT_SCHEME: &str = "v2:";

impl Fingerprint {
    /// The fingerprint of an encoded request.
    pub fn of(bytes: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        Self(format!("{FINGERPRINT_SCHEME}{}", hex(digest.as_ref())))
    }

    /// Whether a stored record was made for these parameters. A record of
    /// the first scheme cannot be compared and is trusted, so a retry that
    /// crosses a rolling deploy still gets its first outcome for the rest
    /// of the record's life instead of a refusal.
    fn matches(&self, stored: &str) -> bool {
        stored == self.0 || !stored.starts_with(FINGERPRINT_SCHEME)
    }
}

/// The backend failed or could not be reached; the text is for the log.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub(crate) struct StoreError(pub(crate) String);

/// What a backend keeps under a key (as JSON in Redis).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub(crate) enum Record {
    /// A create is claimed; `owner` names the claim, whose lease its holder
    /// renews. `sent`: the create may have reached Piclumen (a claim of an
    /// older version, without the field, is taken as sent).
    Pending {
        owner: String,
        fingerprint: String,
        #[serde(default = "sent_unless_said")]
        sent: bool,
    },
    /// The create succeeded.
    Done {
        fingerprint: String,
        mark_id: String,
        seed: i64,
    },
    /// The create was sent but no usable reply came.
    Unknown { fingerprint: String, cause: String },
}

fn sent_unless_said() -> bool {
    true
}

impl Record {
    fn fingerprint(&self) -> &str {
        match self {
            Self::Pending { fingerprint, .. }
            | Self::Done { fingerprint, .. }
            | Self::Unknown { fingerprint, .. } => fingerprint,
        }
    }
}

/// A key's record and whether its claim's lease is held (only meaningful
/// for `Pending`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) record: Record,
    pub(crate) held: bool,
}

impl Entry {
    /// A claim whose holder died before sending: the key is free.
    fn lapsed_unsent(&self) -> bool {
        matches!(self.record, Record::Pending { sent: false, .. }) && !self.held
    }
}

/// Where records live. Keys arrive hashed; values expire on their own. A
/// claim's lease lives beside its record (in Redis, under `KEY:lease`,
/// holding the owner) and every operation on a claim checks its owner.
#[async_trait::async_trait]
pub(crate) trait Backend: Send + Sync + fmt::Debug {
    /// The live record under `key`, if any, and whether its lease is held.
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError>;
    /// Stores the unsent `claim` and its lease, both for `lease`, if `key`
    /// is free (nothing there, or an unsent claim whose lease lapsed); true
    /// when stored (the caller then owns the key).
    async fn claim(&self, key: &str, claim: &Record, lease: Duration) -> Result<bool, StoreError>;
    /// If `key` still holds a claim of `owner`, replaces it with `claim`
    /// (kept for `keep`) and renews the lease for `lease`; false when the
    /// claim is no longer `owner`'s.
    async fn renew(
        &self,
        key: &str,
        owner: &str,
        claim: &Record,
        keep: Duration,
        lease: Duration,
    ) -> Result<bool, StoreError>;
    /// If `key` still holds a claim of `owner` (or nothing), replaces it
    /// with `outcome` for `ttl`, or removes it when `outcome` is `None`, and
    /// ends the lease. Leaves another owner's record alone.
    async fn settle(
        &self,
        key: &str,
        owner: &str,
        outcome: Option<&Record>,
        ttl: Duration,
    ) -> Result<(), StoreError>;
}

fn unavailable(_: StoreError) -> Error {
    // The backend logs the cause once per outage.
    Error::IdempotencyStoreUnavailable
}

/// The prefix of the keys of `namespace`.
fn key_prefix(namespace: &StoreNamespace) -> String {
    format!("{}{KEY_KIND}", namespace.prefix())
}

/// The store key of (token, request_id) under `prefix` ([`key_prefix`]): a
/// SHA-256 of both, length-prefixed so no two pairs share an input.
fn key(prefix: &str, token: &Token, request_id: &str) -> String {
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let token = token.expose().as_bytes();
    hash.update(&(token.len() as u64).to_be_bytes());
    hash.update(token);
    hash.update(request_id.as_bytes());
    format!("{prefix}{}", hex(hash.finish().as_ref()))
}

/// GenerateImage calls answered by a create already done or running for
/// their key (no create of their own); resolved once, not per call.
fn hits() -> &'static metrics::Counter {
    static HITS: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    HITS.get_or_init(|| metrics::counter!("piclumen_idempotency_hits_total"))
}

#[cfg(test)]
mod tests;
