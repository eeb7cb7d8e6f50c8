//! Fleet polling end to end: real `serve` replicas (child processes) sharing
//! a real `redis-server` (installed by `scripts/redis.sh` when missing) and
//! one simulator, whose `/_sim/stats` counts every status call. Timing is
//! the wall clock's here, so bounds are generous; exact counts live in the
//! paused-time tests (`src/hub/fleet/tests/`) and figures in
//! `benches/fleet.rs`.

mod common;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::time::Duration;

use common::*;
use piclumen_grpc::{
    idempotency::StoreNamespace,
    pb::{self, JobState, image_service_client::ImageServiceClient},
    sim::SimConfig,
};
use redis_server::Redis;
use tonic::transport::Channel;

const INTERVAL: Duration = Duration::from_millis(500);

/// The pid in the name of the replica holding `token`'s lease, in the
/// namespace of replicas calling `sim`.
async fn lease_holder_pid(redis: &Redis, sim: &Sim, token: &str) -> Option<u32> {
    let namespace = StoreNamespace::of_upstream(&sim.url());
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let client = redis::Client::open(redis.url()).ok()?;
    let mut connection = client.get_multiplexed_async_connection().await.ok()?;
    let holder: Option<String> = redis::cmd("GET")
        .arg(format!("piclumen-grpc:{namespace}:fleet:v1:{hash}:lease"))
        .query_async(&mut connection)
        .await
        .ok()?;
    holder?.rsplit('-').next()?.parse().ok()
}

fn replicas(n: usize, sim: &Sim, redis: &Redis) -> Vec<Process> {
    let upstream = sim.url();
    let store = redis.url();
    let interval = humantime::format_duration(INTERVAL).to_string();
    (0..n)
        .map(|_| {
            Process::serve(
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--upstream-url",
                    &upstream,
                    "--poll-interval",
                    &interval,
                    "--max-generates-per-token",
                    "100",
                ],
                &[("PICLUMEN_IDEMPOTENCY_STORE", store.as_str())],
            )
        })
        .collect()
}

/// Opens a watch and follows it in the background; the task returns every
/// state delivered (heartbeats left out) and how the stream ended.
fn follow(
    mut client: ImageServiceClient<Channel>,
    mark_id: String,
) -> tokio::task::JoinHandle<(Vec<JobState>, Result<(), tonic::Status>)> {
    tokio::spawn(async move {
        let request = authed(TOKEN, pb::WatchImageRequest { mark_id });
        let mut stream = match client.watch_image(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => return (Vec::new(), Err(status)),
        };
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout(STALL_BOUND, stream.message()).await {
                Ok(Ok(Some(m))) if m.heartbeat => {}
                Ok(Ok(Some(m))) => seen.push(m.job.expect("job").state()),
                Ok(Ok(None)) => return (seen, Ok(())),
                Ok(Err(status)) => return (seen, Err(status)),
                Err(_) => panic!("watch stalled"),
            }
        }
    })
}

async fn jobs(client: &mut ImageServiceClient<Channel>, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(start_job(client, TOKEN, &format!("fleet {i}")).await);
    }
    ids
}

/// Status calls per round over `rounds` rounds.
async fn calls_per_round(sim: &Sim, rounds: u32) -> f64 {
    let before = sim.stat("status_calls").await;
    tokio::time::sleep(INTERVAL * rounds).await;
    let after = sim.stat("status_calls").await;
    (after - before) as f64 / f64::from(rounds)
}

#[tokio::test]
async fn four_replicas_share_one_poll_per_round_for_forty_jobs_of_one_token() {
    let redis = Redis::start_on(unused_addr().port());
    let sim = Sim::start(long_jobs()).await;
    let fleet = replicas(4, &sim, &redis);
    let mut clients = Vec::new();
    for replica in &fleet {
        clients.push(replica.client().await);
    }
    let ids = jobs(&mut clients[0], 40).await;

    // One viewer per job, spread over the replicas.
    let spread: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| follow(clients[i % 4].clone(), id.clone()))
        .collect();
    tokio::time::sleep(INTERVAL * 3).await;
    let spread_rate = calls_per_round(&sim, 8).await;
    // Then every replica views every job.
    let every: Vec<_> = clients
        .iter()
        .flat_map(|c| ids.iter().map(|id| follow(c.clone(), id.clone())))
        .collect();
    tokio::time::sleep(INTERVAL * 3).await;
    let every_rate = calls_per_round(&sim, 8).await;
    eprintln!("calls per round: {spread_rate} (one viewer per job), {every_rate} (every replica)");
    // Alone, each replica would make one call per round: 4.0. The fleet
    // makes one (floor ceil(40 / 50) = 1); the bound leaves room for a slow
    // machine's late rounds.
    assert!(
        spread_rate <= 2.0,
        "one viewer per job: {spread_rate} calls/round"
    );
    assert!(
        every_rate <= 2.0,
        "every replica viewing: {every_rate} calls/round"
    );
    assert!(
        spread_rate >= 0.5 && every_rate >= 0.5,
        "the jobs are polled"
    );
    for task in spread.into_iter().chain(every) {
        task.abort();
    }
}

#[tokio::test]
async fn two_replicas_killed_mid_watch_leave_every_survivor_watch_succeeded_once() {
    let redis = Redis::start_on(unused_addr().port());
    let sim = Sim::start(SimConfig {
        job_duration: Duration::from_secs(6),
        ..sim_config()
    })
    .await;
    let mut fleet = replicas(4, &sim, &redis);
    let mut clients = Vec::new();
    for replica in &fleet {
        clients.push(replica.client().await);
    }
    let ids = jobs(&mut clients[0], 12).await;
    let mut watches = Vec::new();
    for (n, client) in clients.iter().enumerate() {
        for id in &ids {
            watches.push((n, follow(client.clone(), id.clone())));
        }
    }
    // The holder and one other replica die mid-watch (SIGKILL).
    let mut holder_pid = None;
    for _ in 0..200 {
        holder_pid = lease_holder_pid(&redis, &sim, TOKEN).await;
        if holder_pid.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let holder_pid = holder_pid.expect("a replica holds the token's lease");
    let holder = fleet
        .iter()
        .position(|r| r.pid() == holder_pid)
        .expect("the holder is one of ours");
    let other = (holder + 1) % 4;
    tokio::time::sleep(INTERVAL * 2).await;
    for dead in [holder, other] {
        fleet[dead].kill();
    }
    for (n, watch) in watches {
        let (states, end) = watch.await.expect("join");
        if n == holder || n == other {
            continue;
        }
        end.expect("a survivor's watch ends OK");
        let succeeded = states.iter().filter(|s| **s == JobState::Succeeded).count();
        assert_eq!(succeeded, 1, "SUCCEEDED exactly once: {states:?}");
        assert_eq!(states.last(), Some(&JobState::Succeeded));
    }
}

#[tokio::test]
async fn watches_go_on_through_a_redis_restart() {
    let mut redis = Redis::start_on(unused_addr().port());
    let sim = Sim::start(SimConfig {
        job_duration: Duration::from_secs(12),
        ..sim_config()
    })
    .await;
    let fleet = replicas(2, &sim, &redis);
    let mut clients = Vec::new();
    for replica in &fleet {
        clients.push(replica.client().await);
    }
    let ids = jobs(&mut clients[0], 6).await;
    let watches: Vec<_> = clients
        .iter()
        .flat_map(|c| ids.iter().map(|id| follow(c.clone(), id.clone())))
        .collect();
    tokio::time::sleep(INTERVAL * 3).await;
    redis.stop();
    // Each replica polls its own jobs meanwhile: both call.
    tokio::time::sleep(INTERVAL * 2).await;
    let alone = calls_per_round(&sim, 4).await;
    assert!(
        alone >= 1.5,
        "each replica polls alone: {alone} calls/round"
    );
    let _redis = Redis::start_on(redis.port);
    // Back to one poll for both once Redis answers again.
    tokio::time::sleep(INTERVAL * 4).await;
    let shared = calls_per_round(&sim, 4).await;
    assert!(shared <= 1.5, "shared again: {shared} calls/round");
    for watch in watches {
        let (states, end) = watch.await.expect("join");
        end.expect("the watch ends OK");
        assert_eq!(states.last(), Some(&JobState::Succeeded), "{states:?}");
        let succeeded = states.iter().filter(|s| **s == JobState::Succeeded).count();
        assert_eq!(succeeded, 1);
    }
}
