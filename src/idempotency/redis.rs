//! The Redis backend (`--idempotency-store redis://...`), shared by every
//! replica: records are small JSON values; a claim's lease is a second key,
//! `KEY:lease`, holding its owner and expiring on its own unless renewed.
//! Every change is one Lua script, so it is atomic, and each checks the
//! claim's owner: a claim is taken only on a free key (nothing there, or an
//! unsent claim whose lease lapsed), and renewed or settled only by its
//! holder. The connection is made lazily and remade after any
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

use super::{Backend, Entry, Record, StoreError};
use crate::upstream::redact_url;

/// Bound on opening a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on one command, reply included.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// The record and whether its lease is held.
const GET: &str = r"
return {redis.call('GET', KEYS[1]), redis.call('EXISTS', KEYS[2])}
";

/// Stores the claim `ARGV[1]` of owner `ARGV[2]` and its lease, both for
/// `ARGV[3]` ms, if the key is free: nothing there, or an unsent claim
/// whose lease lapsed (a claim without `sent`, from an older version, is
/// taken as sent).
const CLAIM: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local r = cjson.decode(current)
  if r.state ~= 'pending' or r.sent ~= false or redis.call('EXISTS', KEYS[2]) == 1 then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
";

/// If the key holds a claim of owner `ARGV[1]`, replaces it with `ARGV[2]`
/// (kept `ARGV[3]` ms) and renews the lease for `ARGV[4]` ms.
const RENEW: &str = r"
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local r = cjson.decode(current)
if r.state ~= 'pending' or r.owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4])
return 1
";

/// If the key holds a claim of owner `ARGV[1]` (or nothing), replaces it
/// with the record `ARGV[2]` (kept `ARGV[3]` ms), or deletes it when
/// `ARGV[2]` is empty, and ends the owner's lease. Another owner's record is
/// left alone; a vanished claim is written over: a late outcome is still
/// worth keeping.
const SETTLE: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local r = cjson.decode(current)
  if r.state ~= 'pending' or r.owner ~= ARGV[1] then return 0 end
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
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
        // Connect now, off the request path, so the first call does not pay
        // for the handshake (TLS included). A failure here is not logged:
        // the first call that fails says so.
        if let (Some(connection), Ok(runtime)) =
            (&connection, tokio::runtime::Handle::try_current())
        {
            let mut connection = connection.clone();
            runtime.spawn(async move {
                let _: RedisResult<()> = redis::cmd("PING").query_async(&mut connection).await;
            });
        }
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

fn millis(ttl: Duration) -> String {
    u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
        .to_string()
}

/// The key of a claim's lease.
fn lease_key(key: &str) -> String {
    format!("{key}:lease")
}

/// Runs `script` on `key` and its lease key with `args`.
fn script(script: &str, key: &str, args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(2).arg(key).arg(lease_key(key));
    for arg in args {
        cmd.arg(*arg);
    }
    cmd
}

#[async_trait::async_trait]
impl Backend for RedisBackend {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let cmd = script(GET, key, &[]);
        let (value, held): (Option<String>, i64) = self
            .call(|mut c| async move { cmd.query_async(&mut c).await })
            .await?;
        value
            .map(|v| {
                serde_json::from_str(&v)
                    .map(|record| Entry {
                        record,
                        held: held == 1,
                    })
                    .map_err(|e| {
                        StoreError(format!("undecodable record under a request_id key: {e}"))
                    })
            })
            .transpose()
    }

    async fn claim(&self, key: &str, claim: &Record, lease: Duration) -> Result<bool, StoreError> {
        let Record::Pending { owner, .. } = claim else {
            return Err(StoreError("only a pending record is a claim".into()));
        };
        let cmd = script(CLAIM, key, &[&encode(claim)?, owner, &millis(lease)]);
        let stored: i64 = self
            .call(|mut c| async move { cmd.query_async(&mut c).await })
            .await?;
        Ok(stored == 1)
    }

    async fn renew(
        &self,
        key: &str,
        owner: &str,
        claim: &Record,
        keep: Duration,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let args = [owner, &encode(claim)?, &millis(keep), &millis(lease)];
        let cmd = script(RENEW, key, &args);
        let renewed: i64 = self
            .call(|mut c| async move { cmd.query_async(&mut c).await })
            .await?;
        Ok(renewed == 1)
    }

    async fn settle(
        &self,
        key: &str,
        owner: &str,
        outcome: Option<&Record>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let outcome = outcome.map(encode).transpose()?.unwrap_or_default();
        let cmd = script(SETTLE, key, &[owner, &outcome, &millis(ttl)]);
        let _: i64 = self
            .call(|mut c| async move { cmd.query_async(&mut c).await })
            .await?;
        Ok(())
    }
}
