//! The Redis backend (`--idempotency-store redis://...`), shared by every
//! replica: records are small JSON values; a claim is `SET key claim NX PX
//! claim_ttl`; an outcome replaces the claim only while it is still ours (a
//! short Lua script). The connection is made lazily and remade after any
//! I/O error (the `redis` crate's `ConnectionManager`), so the store comes
//! back by itself when Redis does; every operation is bounded, so an
//! unreachable Redis fails calls quickly. An outage is logged once when it
//! starts and once when it ends.

use std::{
    future::Future,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use redis::{
    RedisResult,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tracing::{info, warn};

use super::{Backend, Record, StoreError};
use crate::upstream::redact_url;

/// Bound on opening a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on one command, reply included.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// Replaces the claim in `ARGV[1]` by the record in `ARGV[2]` (kept
/// `ARGV[3]` ms), or deletes it when `ARGV[2]` is empty; another owner's
/// record is left alone. A vanished claim (expired) is written over too:
/// a late outcome is still worth keeping.
const SETTLE: &str = r"
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  if current then redis.call('DEL', KEYS[1]) end
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
";

/// See the module docs.
#[derive(Debug)]
pub(super) struct RedisBackend {
    /// `None` when the client could not be built: every call then fails,
    /// as with an unreachable Redis.
    connection: Option<ConnectionManager>,
    /// The URL without its password, for logs.
    location: String,
    /// True during an outage, so it is logged once.
    down: AtomicBool,
}

impl RedisBackend {
    /// A backend for `url` (already checked by `StoreLocation::from_str`);
    /// connects on first use.
    pub(super) fn new(url: &str) -> Self {
        let location = redact_url(url);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            // Fail this call fast; the next one reconnects.
            .set_number_of_retries(0);
        let connection = redis::Client::open(url)
            .and_then(|client| ConnectionManager::new_lazy_with_config(client, config))
            .inspect_err(|e| warn!(store = %location, error = %e, "cannot set up the Redis client"))
            .ok();
        Self {
            connection,
            location,
            down: AtomicBool::new(false),
        }
    }

    /// Runs one command on the shared connection, bounded, and logs the
    /// start and end of an outage.
    async fn call<T, F, Fut>(&self, command: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let result = match &self.connection {
            None => Err("the Redis client could not be set up".to_owned()),
            Some(connection) => {
                let bound = CONNECT_TIMEOUT + COMMAND_TIMEOUT;
                match tokio::time::timeout(bound, command(connection.clone())).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no reply within {bound:?}")),
                }
            }
        };
        match result {
            Ok(value) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    info!(store = %self.location, "idempotency store reachable again");
                }
                Ok(value)
            }
            Err(error) => {
                if !self.down.swap(true, Ordering::Relaxed) {
                    warn!(
                        store = %self.location,
                        %error,
                        "idempotency store unreachable: GenerateImage calls with a request_id \
                         answer UNAVAILABLE until it is back"
                    );
                }
                Err(StoreError(error))
            }
        }
    }
}

fn encode(record: &Record) -> Result<String, StoreError> {
    serde_json::to_string(record).map_err(|e| StoreError(format!("cannot encode a record: {e}")))
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait::async_trait]
impl Backend for RedisBackend {
    async fn get(&self, key: &str) -> Result<Option<Record>, StoreError> {
        let value: Option<String> = self
            .call(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await?;
        value
            .map(|v| {
                serde_json::from_str(&v).map_err(|e| {
                    StoreError(format!("undecodable record under a request_id key: {e}"))
                })
            })
            .transpose()
    }

    async fn claim(&self, key: &str, claim: &Record, ttl: Duration) -> Result<bool, StoreError> {
        let value = encode(claim)?;
        let set: Option<String> = self
            .call(|mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(ttl))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(set.is_some())
    }

    async fn settle(
        &self,
        key: &str,
        claim: &Record,
        outcome: Option<&Record>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let claim = encode(claim)?;
        let outcome = outcome.map(encode).transpose()?.unwrap_or_default();
        let _: i64 = self
            .call(|mut c| async move {
                redis::cmd("EVAL")
                    .arg(SETTLE)
                    .arg(1)
                    .arg(key)
                    .arg(claim)
                    .arg(outcome)
                    .arg(millis(ttl))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }
}
