//! Fleet polling's store in Redis (the `--idempotency-store redis://...`
//! server). Everything lives in the deployment's namespace (see
//! `StoreNamespace`: `--store-namespace`, else a hash of `--upstream-url`),
//! so deployments calling different Piclumen URLs on one Redis neither
//! share leases nor hear each other's rounds. Per token, under
//! `piclumen-grpc:<namespace>:fleet:v1:<sha256 of token>:`: `lease` (the
//! holder's name, `PX` one interval), `want` (a sorted set of ids scored by
//! when each stops being wanted, in Redis's own clock), and `job:<id>` (the
//! last published answer, `PX` a few intervals). Rounds go out on one
//! channel per namespace, `piclumen-grpc:<namespace>:fleet:v1:rounds`, that
//! every replica of the deployment subscribes to. An exchange is one Lua
//! script, so it costs one round trip.
//!
//! Why pub/sub plus keys: pub/sub delivers a round to every replica within a
//! millisecond or two, which a follower polling keys could only match by
//! reading them several times a round per token; keys make up for what
//! pub/sub cannot promise (a replica whose subscription was down reads back
//! what it missed).

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use redis::{
    RedisResult, Value,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tokio::sync::mpsc;

use super::{
    ExchangeReply, ExchangeRequest, FleetError, FleetStore, TokenKey,
    wire::{Encoded, Entry, Round},
};
use crate::{hub::schedule::Id, idempotency::StoreNamespace, upstream::BoxFuture};

/// What follows the namespace's prefix in every key, versioned with the
/// formats.
const KIND: &str = "fleet:v1:";
/// What follows the namespace's prefix in the name of the channel rounds
/// are published on.
const CHANNEL: &str = "fleet:v1:rounds";
/// Bound on opening a connection and on one command.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Rounds buffered between the subscription and the hub.
const ROUNDS_BUFFER: usize = 1024;

/// KEYS: lease, want. ARGV: me, lease ms, want ms, n (ids to register),
/// the n ids, then the state keys to read. Returns {holder, wanted, states}.
const EXCHANGE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holder = redis.call('GET', KEYS[1])
local mine = 0
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  mine = 1
elseif not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  mine = 1
end
local n = tonumber(ARGV[4])
local wanted = {}
if mine == 1 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  wanted = redis.call('ZRANGE', KEYS[2], 0, -1)
elseif n > 0 then
  local score = now + tonumber(ARGV[3])
  local args = {}
  for i = 5, 4 + n do
    args[#args + 1] = score
    args[#args + 1] = ARGV[i]
    if #args >= 1000 then
      redis.call('ZADD', KEYS[2], 'GT', unpack(args))
      args = {}
    end
  end
  if #args > 0 then redis.call('ZADD', KEYS[2], 'GT', unpack(args)) end
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) * 2)
end
local states = {}
for i = 5 + n, #ARGV do
  local v = redis.call('GET', ARGV[i])
  if v then states[#states + 1] = v end
end
return {mine, wanted, states}
";

/// KEYS: want. ARGV: keep ms, channel, round, n (states), n pairs of
/// (state key, entry), then the ids to drop from the wanted set.
const PUBLISH: &str = r"
local n = tonumber(ARGV[4])
for i = 0, n - 1 do
  redis.call('SET', ARGV[5 + 2 * i], ARGV[6 + 2 * i], 'PX', ARGV[1])
end
for i = 5 + 2 * n, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
";

/// KEYS: lease. ARGV: me.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

/// See the module docs.
pub struct RedisFleet {
    client: Option<redis::Client>,
    connection: Option<ConnectionManager>,
    names: Names,
}

/// The namespace's key prefix and rounds channel.
#[derive(Debug, Clone)]
struct Names {
    /// `piclumen-grpc:<namespace>:fleet:v1:`.
    prefix: Arc<str>,
    /// `piclumen-grpc:<namespace>:fleet:v1:rounds`.
    channel: Arc<str>,
}

impl Names {
    fn of(namespace: &StoreNamespace) -> Self {
        let base = namespace.prefix();
        Self {
            prefix: format!("{base}{KIND}").into(),
            channel: format!("{base}{CHANNEL}").into(),
        }
    }

    fn key(&self, token: &TokenKey, part: &str) -> String {
        format!("{}{}:{part}", self.prefix, token.as_str())
    }

    fn state_key(&self, token: &TokenKey, id: &str) -> String {
        self.key(token, &format!("job:{id}"))
    }
}

impl std::fmt::Debug for RedisFleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisFleet").finish_non_exhaustive()
    }
}

impl RedisFleet {
    /// A store at `url` (already checked when the flag was parsed) for the
    /// deployment named `namespace`; connects on first use and after every
    /// failure.
    pub fn new(url: &str, namespace: &StoreNamespace) -> Self {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(0);
        let client = redis::Client::open(url).ok();
        let connection = client
            .clone()
            .and_then(|c| ConnectionManager::new_lazy_with_config(c, config).ok());
        Self {
            client,
            connection,
            names: Names::of(namespace),
        }
    }

    fn connection(&self) -> Result<ConnectionManager, FleetError> {
        self.connection
            .clone()
            .ok_or_else(|| FleetError("the Redis client could not be set up".into()))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn failed(e: redis::RedisError) -> FleetError {
    FleetError(e.to_string())
}

async fn bounded<T>(operation: impl Future<Output = RedisResult<T>>) -> Result<T, FleetError> {
    match tokio::time::timeout(TIMEOUT * 2, operation).await {
        Ok(result) => result.map_err(failed),
        Err(_) => Err(FleetError(format!("no reply within {:?}", TIMEOUT * 2))),
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn list(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items.iter().filter_map(text).collect(),
        _ => Vec::new(),
    }
}

impl FleetStore for RedisFleet {
    fn exchange(&self, request: ExchangeRequest) -> BoxFuture<Result<ExchangeReply, FleetError>> {
        let connection = self.connection();
        let names = self.names.clone();
        Box::pin(async move {
            let mut connection = connection?;
            let mut invocation = redis::cmd("EVAL");
            invocation
                .arg(EXCHANGE)
                .arg(2)
                .arg(names.key(&request.key, "lease"))
                .arg(names.key(&request.key, "want"))
                .arg(&*request.me)
                .arg(millis(request.lease))
                .arg(millis(request.want_ttl))
                .arg(request.register.len());
            for id in &request.register {
                invocation.arg(&**id);
            }
            for id in &request.read {
                invocation.arg(names.state_key(&request.key, id));
            }
            let reply: Value = bounded(invocation.query_async(&mut connection)).await?;
            let Value::Array(parts) = reply else {
                return Err(FleetError("unexpected reply to an exchange".into()));
            };
            let holder = matches!(parts.first(), Some(Value::Int(1)));
            let wanted = list(parts.get(1))
                .into_iter()
                .map(|id| Id::from(id.as_str()))
                .collect();
            let states = list(parts.get(2))
                .iter()
                .filter_map(|json| serde_json::from_str::<Entry>(json).ok())
                .collect();
            Ok(ExchangeReply {
                holder,
                wanted,
                states,
            })
        })
    }

    fn publish(
        &self,
        round: Encoded,
        done: Vec<Id>,
        keep: Duration,
    ) -> BoxFuture<Result<(), FleetError>> {
        let connection = self.connection();
        let names = self.names.clone();
        Box::pin(async move {
            let mut connection = connection?;
            let token = TokenKey(round.round.key.as_str().into());
            let mut invocation = redis::cmd("EVAL");
            invocation
                .arg(PUBLISH)
                .arg(1)
                .arg(names.key(&token, "want"))
                .arg(millis(keep))
                .arg(&*names.channel)
                .arg(&round.json)
                .arg(round.entries.len());
            for (id, json) in &round.entries {
                invocation.arg(names.state_key(&token, id)).arg(json);
            }
            for id in &done {
                invocation.arg(&**id);
            }
            let _: i64 = bounded(invocation.query_async(&mut connection)).await?;
            Ok(())
        })
    }

    fn release(&self, key: TokenKey, me: Arc<str>) -> BoxFuture<Result<(), FleetError>> {
        let connection = self.connection();
        let lease = self.names.key(&key, "lease");
        Box::pin(async move {
            let mut connection = connection?;
            let _: i64 = bounded(
                redis::cmd("EVAL")
                    .arg(RELEASE)
                    .arg(1)
                    .arg(lease)
                    .arg(&*me)
                    .query_async(&mut connection),
            )
            .await?;
            Ok(())
        })
    }

    fn subscribe(&self) -> BoxFuture<Result<mpsc::Receiver<Arc<Round>>, FleetError>> {
        let client = self.client.clone();
        let channel = Arc::clone(&self.names.channel);
        Box::pin(async move {
            let client =
                client.ok_or_else(|| FleetError("the Redis client could not be set up".into()))?;
            let mut pubsub = bounded(client.get_async_pubsub()).await?;
            bounded(pubsub.subscribe(&*channel)).await?;
            let (tx, rx) = mpsc::channel(ROUNDS_BUFFER);
            tokio::spawn(async move {
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let Ok(payload) = message.get_payload::<String>() else {
                        continue;
                    };
                    let Ok(round) = serde_json::from_str::<Round>(&payload) else {
                        continue;
                    };
                    if tx.send(Arc::new(round)).await.is_err() {
                        return;
                    }
                }
            });
            Ok(rx)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_the_channel_live_in_the_namespace() {
        let here = Names::of(&StoreNamespace::of_upstream("http://127.0.0.1:4001"));
        let there = Names::of(&StoreNamespace::of_upstream("http://127.0.0.1:4002"));
        let token = TokenKey("ab12".into());
        let ns = StoreNamespace::of_upstream("http://127.0.0.1:4001");
        assert_eq!(
            here.key(&token, "lease"),
            format!("piclumen-grpc:{ns}:fleet:v1:ab12:lease")
        );
        assert_eq!(
            here.state_key(&token, "m1"),
            format!("piclumen-grpc:{ns}:fleet:v1:ab12:job:m1")
        );
        assert_eq!(
            &*here.channel,
            format!("piclumen-grpc:{ns}:fleet:v1:rounds")
        );
        assert_ne!(here.key(&token, "lease"), there.key(&token, "lease"));
        assert_ne!(here.state_key(&token, "m1"), there.state_key(&token, "m1"));
        assert_ne!(here.channel, there.channel);
        let named = Names::of(&"shared".parse().expect("valid"));
        assert_eq!(&*named.channel, "piclumen-grpc:shared:fleet:v1:rounds");
    }
}
