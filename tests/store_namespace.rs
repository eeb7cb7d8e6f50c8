//! Deployments sharing one real `redis-server` (`support/redis_server.rs`):
//! each one's keys and channel live in its namespace, derived from the
//! Piclumen URL it calls or set by `--store-namespace`. Two deployments
//! calling two simulators never answer each other's `request_id`s or
//! watches; two given one name share again.

mod common;

use std::time::Duration;

use common::*;
use piclumen_grpc::{
    idempotency::StoreNamespace,
    pb::{self, JobState, image_service_client::ImageServiceClient},
    server::ServerConfig,
};
use tonic::{Request, transport::Channel};

#[path = "support/redis_server.rs"]
mod redis_server;

use redis_server::Redis;

/// Watches per deployment, as in the report of two deployments seeing each
/// other.
const WATCHES: usize = 10;

fn shared(redis: &Redis, namespace: Option<&str>) -> ServerConfig {
    let mut config = server_config();
    config.idempotency.store = redis.location();
    config.idempotency.namespace = namespace.map(|n| n.parse().expect("a valid namespace"));
    config
}

/// Two replicas on `redis` calling Piclumen at `url`.
async fn deployment(redis: &Redis, url: &str, namespace: Option<&str>) -> [Server; 2] {
    [
        Server::start(shared(redis, namespace), url.to_owned()).await,
        Server::start(shared(redis, namespace), url.to_owned()).await,
    ]
}

fn call(id: &str) -> Request<pb::GenerateImageRequest> {
    let mut request = authed(
        TOKEN,
        pb::GenerateImageRequest {
            request_id: id.into(),
            ..generate("one prompt")
        },
    );
    request.set_timeout(Duration::from_secs(5));
    request
}

async fn create(server: &Server, id: &str) -> pb::GenerateImageResponse {
    server
        .client()
        .await
        .generate_image(call(id))
        .await
        .expect("created")
        .into_inner()
}

/// Starts `n` jobs on `server` and watches each on both `replicas`; returns
/// how every watch ended: its last state, and whether it ended cleanly.
async fn watch_jobs(
    replicas: &[Server; 2],
    n: usize,
) -> Vec<(Option<JobState>, Result<(), String>)> {
    let mut first = replicas[0].client().await;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(start_job(&mut first, TOKEN, &format!("job {i}")).await);
    }
    let mut clients: Vec<ImageServiceClient<Channel>> = Vec::new();
    for replica in replicas {
        clients.push(replica.client().await);
    }
    let mut watches = Vec::new();
    for client in &clients {
        for id in &ids {
            let (mut client, id) = (client.clone(), id.clone());
            watches.push(tokio::spawn(async move {
                let (messages, end) = collect_watch(&mut client, TOKEN, &id).await;
                (
                    states(&messages).last().copied(),
                    end.map_err(|s| format!("{:?}: {}", s.code(), s.message())),
                )
            }));
        }
    }
    let mut ends = Vec::new();
    for watch in watches {
        ends.push(watch.await.expect("join"));
    }
    ends
}

fn assert_all_succeeded(side: &str, ends: &[(Option<JobState>, Result<(), String>)]) {
    assert_eq!(ends.len(), 2 * WATCHES);
    for end in ends {
        assert_eq!(
            end,
            &(Some(JobState::Succeeded), Ok(())),
            "a watch on {side}"
        );
    }
}

#[tokio::test]
async fn deployments_calling_two_piclumens_on_one_redis_never_answer_each_other() {
    let redis = Redis::start();
    let (sim_x, sim_y) = (
        Sim::start(sim_config()).await,
        Sim::start(sim_config()).await,
    );
    assert_ne!(
        StoreNamespace::of_upstream(&sim_x.url()),
        StoreNamespace::of_upstream(&sim_y.url())
    );
    let x = deployment(&redis, &sim_x.url(), None).await;
    let y = deployment(&redis, &sim_y.url(), None).await;

    // One token and request_id on both sides: each side creates once on
    // its own Piclumen and keeps its own mark id.
    let on_x = create(&x[0], "same-id").await;
    let on_y = create(&y[0], "same-id").await;
    assert_ne!(on_x.mark_id, on_y.mark_id);
    assert_eq!(create(&x[1], "same-id").await, on_x, "X's retry: X's job");
    assert_eq!(create(&y[1], "same-id").await, on_y, "Y's retry: Y's job");
    assert_eq!(sim_x.stat("create_calls").await, 1);
    assert_eq!(sim_y.stat("create_calls").await, 1);
    // Y's mark id is a job of Y's Piclumen.
    let checked = y[1]
        .client()
        .await
        .check_image(authed(TOKEN, check_request(on_y.mark_id.clone())))
        .await;
    assert!(checked.is_ok(), "{checked:?}");

    // Watches of one token on both sides at once: each side's rounds reach
    // its own watchers only, so none ends NOT_FOUND.
    let (ends_x, ends_y) = tokio::join!(watch_jobs(&x, WATCHES), watch_jobs(&y, WATCHES));
    assert_all_succeeded("X", &ends_x);
    assert_all_succeeded("Y", &ends_y);
}

#[tokio::test]
async fn one_store_namespace_shares_across_spellings_of_one_piclumen() {
    let redis = Redis::start();
    let sim = Sim::start(sim_config()).await;
    let port = sim.addr.port();
    let (numeric, named) = (
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}/"),
    );
    // Derived, the two spellings are two namespaces.
    assert_ne!(
        StoreNamespace::of_upstream(&numeric),
        StoreNamespace::of_upstream(&named)
    );
    let a = deployment(&redis, &numeric, Some("team-a")).await;
    let b = deployment(&redis, &named, Some("team-a")).await;

    let first = create(&a[0], "shared-id").await;
    assert_eq!(create(&b[0], "shared-id").await, first, "B answers A's job");
    assert_eq!(create(&b[1], "shared-id").await, first);
    assert_eq!(sim.stat("create_calls").await, 1);

    let (ends_a, ends_b) = tokio::join!(watch_jobs(&a, WATCHES), watch_jobs(&b, WATCHES));
    assert_all_succeeded("A", &ends_a);
    assert_all_succeeded("B", &ends_b);

    // Without the name, the other spelling is a deployment of its own.
    let c = deployment(&redis, &named, None).await;
    assert_ne!(create(&c[0], "shared-id").await.mark_id, first.mark_id);
    assert_eq!(sim.stat("create_calls").await, 1 + 1 + 2 * WATCHES as u64);
}
