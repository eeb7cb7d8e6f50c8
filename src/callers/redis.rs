//! Callers' counters in Redis, shared by every replica: one key per caller
//! and window under the deployment's namespace,
//! `piclumen-grpc:<ns>:caller:v1:<name>:day:<YYYY-MM-DD>` (images),
//! `...:month:<YYYY-MM>` (images) and `...:minute:<minutes since epoch>`
//! (creates). Taking a create is one Lua script that reads the day and the
//! minute, compares them with the limits ([`super::limits::decide`]'s
//! rule) and increments all three only when the create fits: atomic, so
//! replicas racing for the last image never both get it. Each key expires
//! on its own after its window. The connection is made lazily and remade
//! after an error; every command is bounded, so an unreachable Redis fails
//! a call within about two seconds.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tracing::{info, warn};

use super::limits::{LimitKind, Limits, Refusal, Reserved, Windows};
use crate::{idempotency::StoreNamespace, upstream::redact_url};

/// Bound on opening a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on one command, reply included.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// How long past its window a day's key stays readable.
const DAY_KEPT: Duration = Duration::from_secs(2 * 86_400);
/// How long past its window a month's key stays readable.
const MONTH_KEPT: Duration = Duration::from_secs(7 * 86_400);

/// KEYS: day, minute, month. ARGV: images, day limit, minute limit (-1:
/// none), then the three keys' lifetimes in ms. Returns {0, day after} when
/// taken, {1, day} or {2, minute} when the day or the minute refuses.
const RESERVE: &str = r"
local images = tonumber(ARGV[1])
local day = tonumber(redis.call('GET', KEYS[1]) or '0')
local minute = tonumber(redis.call('GET', KEYS[2]) or '0')
local day_limit = tonumber(ARGV[2])
local minute_limit = tonumber(ARGV[3])
if day_limit >= 0 and day + images > day_limit then return {1, day} end
if minute_limit >= 0 and minute + 1 > minute_limit then return {2, minute} end
redis.call('INCRBY', KEYS[1], images)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('INCRBY', KEYS[3], images)
redis.call('PEXPIRE', KEYS[3], ARGV[6])
return {0, day + images}
";

/// KEYS: day, minute, month. ARGV: images. Takes a reservation back from
/// the keys still there, never below zero.
const GIVE_BACK: &str = r"
local amounts = {tonumber(ARGV[1]), 1, tonumber(ARGV[1])}
for i = 1, 3 do
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  if current > 0 then
    local back = math.min(current, amounts[i])
    redis.call('DECRBY', KEYS[i], back)
  end
end
return 1
";

/// The Redis store is unreachable; the text is for the log.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StoreDown(pub String);

/// See the module docs.
#[derive(Debug)]
pub struct RedisCounters {
    connection: Option<ConnectionManager>,
    prefix: String,
    location: String,
    down: AtomicBool,
}

impl RedisCounters {
    /// Counters at `url` (checked by `StoreLocation`) under `namespace`;
    /// connects on first use.
    pub fn new(url: &str, namespace: &StoreNamespace) -> Self {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(0);
        let location = redact_url(url);
        let connection = redis::Client::open(url)
            .and_then(|client| ConnectionManager::new_lazy_with_config(client, config))
            .inspect_err(|e| warn!(store = %location, error = %e, "cannot set up the Redis client"))
            .ok();
        Self {
            connection,
            prefix: format!("{}caller:v1:", namespace.prefix()),
            location,
            down: AtomicBool::new(false),
        }
    }

    fn keys(&self, caller: &str, windows: &Windows) -> [String; 3] {
        let base = format!("{}{caller}:", self.prefix);
        [
            format!("{base}day:{}", windows.day_label()),
            format!("{base}minute:{}", windows.minute),
            format!("{base}month:{}", windows.month_label()),
        ]
    }

    /// Takes one create of `images` from `caller`'s windows, or refuses.
    pub async fn reserve(
        &self,
        caller: &std::sync::Arc<str>,
        limits: &Limits,
        images: u64,
        windows: Windows,
    ) -> Result<Result<Reserved, Refusal>, StoreDown> {
        let limit = |l: Option<u64>| l.map_or("-1".to_owned(), |l| l.to_string());
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(RESERVE).arg(3).arg(&self.keys(caller, &windows));
        cmd.arg(images)
            .arg(limit(limits.images_per_day))
            .arg(limit(limits.creates_per_minute))
            .arg(millis(windows.until_next_day() + DAY_KEPT))
            .arg(millis(
                windows.until_next_minute() + Duration::from_secs(60),
            ))
            .arg(millis(windows.until_next_month() + MONTH_KEPT));
        let (verdict, used): (i64, u64) = self.query(cmd).await?;
        let refusal = |limit: LimitKind, allowed: Option<u64>, retry_after| Refusal {
            limit,
            allowed: allowed.unwrap_or_default(),
            used,
            retry_after,
        };
        Ok(match verdict {
            0 => Ok(Reserved {
                caller: std::sync::Arc::clone(caller),
                images,
                windows,
            }),
            1 => Err(refusal(
                LimitKind::ImagesPerDay,
                limits.images_per_day,
                windows.until_next_day(),
            )),
            _ => Err(refusal(
                LimitKind::CreatesPerMinute,
                limits.creates_per_minute,
                windows.until_next_minute(),
            )),
        })
    }

    /// Gives back a create that created nothing.
    pub async fn give_back(&self, reserved: &Reserved) -> Result<(), StoreDown> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(GIVE_BACK)
            .arg(3)
            .arg(&self.keys(&reserved.caller, &reserved.windows))
            .arg(reserved.images);
        let _: i64 = self.query(cmd).await?;
        Ok(())
    }

    /// Images of each caller today and this month, and creates this minute.
    pub async fn used(
        &self,
        callers: &[&str],
        windows: &Windows,
    ) -> Result<Vec<[u64; 3]>, StoreDown> {
        if callers.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for caller in callers {
            let [day, minute, month] = self.keys(caller, windows);
            cmd.arg(day).arg(month).arg(minute);
        }
        let values: Vec<Option<u64>> = self.query(cmd).await?;
        Ok(values
            .chunks(3)
            .map(|c| [0, 1, 2].map(|i| c.get(i).copied().flatten().unwrap_or(0)))
            .collect())
    }

    /// Runs one command, bounded; logs an outage once when it starts and
    /// once when it ends.
    async fn query<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, StoreDown> {
        let result = match &self.connection {
            None => Err("the Redis client could not be set up".to_owned()),
            Some(connection) => {
                let mut connection = connection.clone();
                let bound = CONNECT_TIMEOUT + COMMAND_TIMEOUT;
                match tokio::time::timeout(bound, cmd.query_async(&mut connection)).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no reply within {bound:?}")),
                }
            }
        };
        match result {
            Ok(value) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    info!(store = %self.location, "callers' counters reachable again");
                }
                Ok(value)
            }
            Err(error) => {
                if !self.down.swap(true, Ordering::Relaxed) {
                    warn!(store = %self.location, %error, "callers' counters unreachable");
                }
                Err(StoreDown(error))
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
