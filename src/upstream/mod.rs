//! The Piclumen HTTP/JSON client, knowing nothing of gRPC (`crate::error`
//! maps its errors to status codes). Its rooms:
//!
//! - `client`: the `reqwest` client, its settings (the `serve` flags
//!   `--upstream-*`, `--user-agent`, `--origin`, `--referer`, with their
//!   defaults), the two endpoints;
//! - `payload`: a create, from the caller's request (checked, Piclumen's
//!   defaults filled) to the body the service sends;
//! - `wire`: Piclumen's replies and their decoders (the status decoder is
//!   the one the poller uses);
//! - `error`: `UpstreamError` and how to tell its kinds apart;
//! - `metrics`: calls and durations per endpoint;
//!
//! Here: the [`Upstream`] trait the service calls through.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::job::Token;

mod client;
mod error;
pub mod metrics;
mod payload;
mod wire;

pub use crate::redact::redact_url;
pub use client::{CREATE_PATH, Client, ClientConfig, MAX_REPLY_BYTES, STATUS_PATH};
pub use error::UpstreamError;
pub use payload::{
    CreatePayload, CreateRequest, InvalidField, JsonObject, Limits, MAX_NAME_CHARS,
    MAX_REQUEST_ID_CHARS, Resolution, ResolutionWire, StyleListWire, defaults as create_defaults,
};
pub use wire::{BadEntry, StatusEntry, decode_create_reply, decode_status_entries};

/// A boxed future, as the [`Upstream`] trait's calls return.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// What the rest of the service needs from Piclumen: starting a generation
/// and asking for job states. [`Client`] is the production implementation;
/// tests put a scripted fake behind it to run the service on paused time.
pub trait Upstream: Send + Sync + 'static {
    /// Starts a generation and returns its mark id; never retried (it may
    /// have cost credits).
    fn create(
        &self,
        token: &Token,
        payload: &CreatePayload,
        deadline: Option<Instant>,
    ) -> BoxFuture<Result<String, UpstreamError>>;

    /// The states of `mark_ids` for `token`, each entry decoded on its own;
    /// ids absent from the answer are unknown to the token's account.
    fn batch_status(
        &self,
        token: &Token,
        mark_ids: &[Arc<str>],
    ) -> BoxFuture<Result<Vec<StatusEntry>, UpstreamError>>;

    /// The bound on one whole call (`--upstream-timeout`).
    fn timeout(&self) -> Duration;
}

impl Upstream for Client {
    fn create(
        &self,
        token: &Token,
        payload: &CreatePayload,
        deadline: Option<Instant>,
    ) -> BoxFuture<Result<String, UpstreamError>> {
        let body = match client::encode(payload) {
            Ok(body) => body,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let (client, token) = (self.clone(), token.clone());
        Box::pin(async move { client.create_encoded(&token, body, deadline).await })
    }

    fn batch_status(
        &self,
        token: &Token,
        mark_ids: &[Arc<str>],
    ) -> BoxFuture<Result<Vec<StatusEntry>, UpstreamError>> {
        let (client, token, ids) = (self.clone(), token.clone(), mark_ids.to_vec());
        Box::pin(async move { client.batch_status_entries(&token, &ids).await })
    }

    fn timeout(&self) -> Duration {
        Client::timeout(self)
    }
}
