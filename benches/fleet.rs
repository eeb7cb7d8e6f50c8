//! Fleet polling: R `piclumen-grpc serve` replicas sharing one
//! `redis-server` (`--idempotency-store redis://...`, fleet polling on by
//! default) against one `piclumen-grpc sim`, all child processes on
//! loopback. J jobs of one token, every replica watching every job. Reports
//! the simulator's status calls per poll round in steady state against the
//! floor `ceil(J / batch_max)`, and for every replica the time from each of
//! the simulator's state changes to its delivery on that replica.
//!
//! `cargo bench --bench fleet -- --replicas 4 --jobs 40` (see BENCHMARKS.md).
//! A measurement, not a test: it asserts nothing about timing.

mod common;
#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use clap::Parser;
use common::{
    Process, authed, change_share, connect, lag_ms, percentile, sim_json, spawn_server, spawn_sim,
    unix_ms,
};
use piclumen_grpc::pb::{self, image_service_client::ImageServiceClient};
use redis_server::Redis;
use tonic::transport::Channel;

const TOKEN: &str = "bench-token";

#[derive(Debug, Parser)]
struct Args {
    /// Replicas.
    #[arg(long, default_value_t = 4)]
    replicas: usize,
    /// Jobs of the one token, each watched on every replica.
    #[arg(long, default_value_t = 40)]
    jobs: usize,
    /// Server poll interval.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Server batch size.
    #[arg(long, default_value_t = 50)]
    batch_max: usize,
    /// Simulated job duration; long enough for the steady-state rounds.
    #[arg(long, default_value = "24s", value_parser = humantime::parse_duration)]
    job_duration: Duration,
    /// `serve --fleet-polling`: `off` shows what replicas polling alone cost.
    #[arg(long, default_value = "on")]
    fleet_polling: String,
    /// Ignored (cargo bench passes --bench).
    #[arg(long)]
    bench: bool,
}

/// Follows one watch; returns (mark id, share of the job's duration at
/// which the simulator made the change, when it arrived) per change.
async fn follow(
    mut client: ImageServiceClient<Channel>,
    mark_id: String,
) -> Vec<(String, f64, f64)> {
    let mut stream = client
        .watch_image(authed(
            TOKEN,
            pb::WatchImageRequest {
                mark_id: mark_id.clone(),
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    let mut previous = None;
    let mut seen = Vec::new();
    while let Ok(Some(update)) = stream.message().await {
        if update.heartbeat {
            continue;
        }
        let state = update.job.expect("job").state();
        let changed = previous.replace(state) != Some(state);
        if let Some(share) = change_share(state).filter(|_| changed) {
            seen.push((mark_id.clone(), share, unix_ms()));
        }
    }
    seen
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let redis = Redis::start();
    let store = redis.url();
    let job = humantime::format_duration(args.job_duration).to_string();
    // Durations vary by 20%, so changes fall at random points of the round.
    let sim = spawn_sim(&["--job-duration", &job, "--job-jitter", "0.2"]);
    let interval = humantime::format_duration(args.poll_interval).to_string();
    let batch = args.batch_max.to_string();
    let replicas: Vec<Process> = (0..args.replicas)
        .map(|_| {
            spawn_server(
                &sim.addr,
                &[
                    "--poll-interval",
                    &interval,
                    "--batch-max",
                    &batch,
                    "--idempotency-store",
                    &store,
                    "--max-generates-per-token",
                    "1000",
                    "--fleet-polling",
                    &args.fleet_polling,
                ],
            )
        })
        .collect();
    let mut clients = Vec::new();
    for replica in &replicas {
        clients.push(connect(&replica.addr).await);
    }
    let mut ids = Vec::new();
    let count = clients.len();
    for i in 0..args.jobs {
        let created = clients[i % count]
            .generate_image(authed(
                TOKEN,
                pb::GenerateImageRequest {
                    prompt: format!("fleet bench {i}"),
                    ..Default::default()
                },
            ))
            .await
            .expect("generate")
            .into_inner();
        ids.push(created.mark_id);
    }
    let started = Instant::now();
    let watches: Vec<Vec<_>> = clients
        .iter()
        .map(|client| {
            ids.iter()
                .map(|id| tokio::spawn(follow(client.clone(), id.clone())))
                .collect()
        })
        .collect();

    // Steady state: two rounds to settle, then five measured.
    tokio::time::sleep(args.poll_interval * 2).await;
    let http = reqwest::Client::new();
    let rounds = 5;
    let c0 = sim_json(&http, &sim.addr, "/_sim/stats").await["status_calls"]
        .as_u64()
        .unwrap_or(0);
    tokio::time::sleep(args.poll_interval * rounds).await;
    let c1 = sim_json(&http, &sim.addr, "/_sim/stats").await["status_calls"]
        .as_u64()
        .unwrap_or(0);
    let per_round = (c1 - c0) as f64 / f64::from(rounds);
    let floor = args.jobs.div_ceil(args.batch_max);
    println!(
        "fleet of {} replicas, {} jobs of one token: {per_round:.2} status calls/round (floor {floor})",
        args.replicas, args.jobs
    );

    let created = sim_json(&http, &sim.addr, "/_sim/jobs").await;
    for (n, tasks) in watches.into_iter().enumerate() {
        let mut seen = Vec::new();
        for task in tasks {
            seen.extend(task.await.expect("watch task"));
        }
        let mut lags: Vec<f64> = seen
            .iter()
            .filter_map(|(id, share, received)| lag_ms(&created, id, *share, *received))
            .collect();
        lags.sort_by(f64::total_cmp);
        println!(
            "  replica {n}: change-to-delivery over {} changes: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target p99 < poll interval + 200 ms = {:.0} ms)",
            lags.len(),
            percentile(&lags, 0.5),
            percentile(&lags, 0.99),
            lags.last().copied().unwrap_or(f64::NAN),
            args.poll_interval.as_secs_f64() * 1000.0 + 200.0
        );
    }
    println!("total time {:.1}s", started.elapsed().as_secs_f64());
}
