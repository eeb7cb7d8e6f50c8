//! `--idempotency-store redis://` against a real `redis-server`
//! (`support/redis_server.rs`): each test starts its own server, two
//! replicas and one simulator. Replicas dying mid-create and rollouts are
//! in `tests/rollout.rs`.

mod common;

use std::time::Duration;

use common::*;
use piclumen_grpc::{pb, server::ServerConfig};
use serde_json::json;
use tonic::{Code, Request};

#[path = "support/redis_server.rs"]
mod redis_server;

use redis_server::Redis;

fn shared(redis: &Redis) -> ServerConfig {
    let mut config = server_config();
    config.idempotency.store = redis.location();
    config
}

fn with_id(prompt: &str, id: &str) -> pb::GenerateImageRequest {
    pb::GenerateImageRequest {
        request_id: id.into(),
        ..generate(prompt)
    }
}

fn call(token: &str, id: &str, timeout: Duration) -> Request<pb::GenerateImageRequest> {
    let mut request = authed(token, with_id("p", id));
    request.set_timeout(timeout);
    request
}

/// What the in-process servers log at info level, as text.
fn logs() -> &'static Captured {
    Captured::global("info", false)
}

/// Log lines containing every one of `parts`.
fn log_lines(parts: &[&str]) -> usize {
    let text = logs().text();
    text.lines()
        .filter(|line| parts.iter().all(|p| line.contains(p)))
        .count()
}

#[tokio::test]
async fn a_request_id_done_on_one_replica_is_returned_by_another() {
    let redis = Redis::start();
    let sim = Sim::start(sim_config()).await;
    let a = Server::start(shared(&redis), sim.url()).await;
    let b = Server::start(shared(&redis), sim.url()).await;
    let (mut a, mut b) = (a.client().await, b.client().await);

    let first = a
        .generate_image(call(TOKEN, "across", Duration::from_secs(5)))
        .await
        .expect("created on A")
        .into_inner();
    let retry = b
        .generate_image(call(TOKEN, "across", Duration::from_secs(5)))
        .await
        .expect("B returns A's outcome")
        .into_inner();
    assert_eq!(retry, first, "same mark id and seed");
    assert_eq!(sim.stat("create_calls").await, 1);

    // The same key with other parameters is refused on any replica.
    let status = b
        .generate_image(authed(TOKEN, with_id("other prompt", "across")))
        .await
        .expect_err("other parameters");
    assert_status(&status, Code::InvalidArgument, "INVALID_REQUEST");
    // Another token's key is another generation.
    let other = b
        .generate_image(call(OTHER_TOKEN, "across", Duration::from_secs(5)))
        .await
        .expect("other token")
        .into_inner();
    assert_ne!(other.mark_id, first.mark_id);
    assert_eq!(sim.stat("create_calls").await, 2);
}

#[tokio::test]
async fn one_request_id_sent_to_two_replicas_at_once_creates_once() {
    let redis = Redis::start();
    let sim = Sim::start(sim_config()).await;
    let a = Server::start(shared(&redis), sim.url()).await;
    let b = Server::start(shared(&redis), sim.url()).await;
    // Each create takes 1 s: a second one would surely overlap the first.
    sim.script(json!([{"endpoint": "create", "delay_ms": 1000, "times": 2}]))
        .await;
    let mut handles = Vec::new();
    for server in [&a, &b] {
        let mut client = server.client().await;
        handles.push(tokio::spawn(async move {
            client
                .generate_image(call(TOKEN, "together", Duration::from_secs(10)))
                .await
        }));
    }
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.await.expect("join").expect("created").into_inner());
    }
    assert_eq!(
        results[0], results[1],
        "both callers get one mark id and seed"
    );
    assert_eq!(sim.stat("create_calls").await, 1);
}

#[tokio::test]
async fn a_redis_outage_fails_request_ids_closed_and_heals() {
    logs();
    let mut redis = Redis::start();
    let port = redis.port.to_string();
    let sim = Sim::start(sim_config()).await;
    let a = Server::start(shared(&redis), sim.url()).await;
    let mut client = a.client().await;
    let before = client
        .generate_image(call(TOKEN, "before", Duration::from_secs(5)))
        .await
        .expect("store up")
        .into_inner();
    assert_eq!(sim.stat("create_calls").await, 1);

    redis.stop();
    for n in 0..3 {
        let status = client
            .generate_image(call(TOKEN, &format!("during-{n}"), Duration::from_secs(10)))
            .await
            .expect_err("no store, no create");
        assert_status(&status, Code::Unavailable, "IDEMPOTENCY_STORE_UNAVAILABLE");
    }
    assert_eq!(sim.stat("create_calls").await, 1, "nothing was created");
    assert_eq!(
        log_lines(&["idempotency store unreachable", &port]),
        1,
        "one log line per outage"
    );
    assert_eq!(
        log_lines(&["WARN", "request_id store is unreachable"]),
        0,
        "no warning per call"
    );

    // Everything without a request_id goes on.
    let plain = client
        .generate_image(authed(TOKEN, generate("no key")))
        .await
        .expect("no request_id, no store")
        .into_inner();
    assert_eq!(sim.stat("create_calls").await, 2);
    client
        .check_image(authed(TOKEN, check_request(before.mark_id.clone())))
        .await
        .expect("CheckImage works");
    let (_, end) = collect_watch(&mut client, TOKEN, &plain.mark_id).await;
    end.expect("WatchImage works");

    // Redis comes back on the same port: the store heals by itself.
    let _redis = Redis::start_on(redis.port);
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    let healed = loop {
        match client
            .generate_image(call(TOKEN, "after", Duration::from_secs(5)))
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(status) => {
                assert_status(&status, Code::Unavailable, "IDEMPOTENCY_STORE_UNAVAILABLE");
                assert!(
                    tokio::time::Instant::now() < end,
                    "the store did not recover once Redis was back"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let again = client
        .generate_image(call(TOKEN, "after", Duration::from_secs(5)))
        .await
        .expect("kept in the restarted Redis")
        .into_inner();
    assert_eq!(again, healed);
    assert_eq!(sim.stat("create_calls").await, 3);
    assert_eq!(
        log_lines(&["idempotency store reachable again", &port]),
        1,
        "one log line on recovery"
    );
}

/// A replica: `serve --listen 127.0.0.1:0 ARGS...` as a child process.
type Replica = Process;

fn replica(args: &[&str], env: &[(&str, &str)]) -> Replica {
    Process::serve(&[&["--listen", "127.0.0.1:0"], args].concat(), env)
}

#[tokio::test]
async fn rediss_urls_speak_tls() {
    let (redis, ca) = Redis::start_tls();
    let sim = Sim::start(sim_config()).await;
    let upstream = sim.url();
    let store = format!("rediss://127.0.0.1:{}", redis.port);
    let ca = ca.to_string_lossy().into_owned();
    // The store trusts the system's roots; SSL_CERT_FILE points them at our CA.
    let env = [
        ("PICLUMEN_IDEMPOTENCY_STORE", store.as_str()),
        ("SSL_CERT_FILE", ca.as_str()),
    ];
    let a = replica(&["--upstream-url", &upstream], &env);
    let b = replica(&["--upstream-url", &upstream], &env);
    // UNAVAILABLE `IDEMPOTENCY_STORE_UNAVAILABLE` promises nothing was
    // created and asks for a retry: a loaded machine may need one while the
    // first TLS handshake completes. A store that never speaks TLS fails.
    let mut client = a.client().await;
    let end = tokio::time::Instant::now() + Duration::from_secs(15);
    let first = loop {
        match client
            .generate_image(call(TOKEN, "tls", Duration::from_secs(10)))
            .await
        {
            Ok(reply) => break reply.into_inner(),
            Err(status) => {
                assert_status(&status, Code::Unavailable, "IDEMPOTENCY_STORE_UNAVAILABLE");
                assert!(
                    tokio::time::Instant::now() < end,
                    "no create through the TLS store: {status:?}\n{}",
                    a.log_text()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let retry = b
        .client()
        .await
        .generate_image(call(TOKEN, "tls", Duration::from_secs(10)))
        .await
        .expect("the other replica reads it back")
        .into_inner();
    assert_eq!(retry, first);
    assert_eq!(sim.stat("create_calls").await, 1);
}
