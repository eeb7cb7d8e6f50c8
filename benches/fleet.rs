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

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use clap::Parser;
use common::{Process, spawn, spawn_server, unused_addr};
use piclumen_grpc::pb::{self, JobState, image_service_client::ImageServiceClient};
use tonic::{Request, transport::Channel};

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

/// A `redis-server` child, persistence off; killed when dropped.
struct Redis(std::process::Child, std::path::PathBuf);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn redis(port: u16) -> Redis {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis.sh");
    let output = Command::new("bash")
        .arg(script)
        .output()
        .expect("scripts/redis.sh");
    let binary = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let dir = std::env::temp_dir().join(format!("piclumen-bench-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let child = Command::new(binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Redis(child, dir)
}

async fn sim_json(http: &reqwest::Client, sim: &str, path: &str) -> serde_json::Value {
    let body = http
        .get(format!("http://{sim}{path}"))
        .send()
        .await
        .expect("sim")
        .text()
        .await
        .expect("sim body");
    serde_json::from_str(&body).expect("json")
}

fn authed<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ascii"),
    );
    request
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Follows one watch; returns (mark id, share of the job's duration at
/// which the simulator made the change, when it arrived) per change.
async fn follow(
    mut client: ImageServiceClient<Channel>,
    mark_id: String,
) -> Vec<(String, f64, f64)> {
    let mut stream = client
        .watch_image(authed(pb::WatchImageRequest {
            mark_id: mark_id.clone(),
        }))
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
        // Running at 40% of the duration, succeeded at 100%.
        let share = match state {
            JobState::Running => Some(0.4),
            JobState::Succeeded => Some(1.0),
            _ => None,
        };
        if let Some(share) = share.filter(|_| changed) {
            seen.push((mark_id.clone(), share, unix_ms()));
        }
    }
    seen
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let redis_port = unused_addr()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("port");
    let _redis = redis(redis_port);
    let store = format!("redis://127.0.0.1:{redis_port}");
    let job = humantime::format_duration(args.job_duration).to_string();
    // Durations vary by 20%, so changes fall at random points of the round.
    let sim = spawn(&[
        "sim",
        "--listen",
        "127.0.0.1:0",
        "--job-duration",
        &job,
        "--job-jitter",
        "0.2",
    ]);
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
        let channel = Channel::from_shared(format!("http://{}", replica.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        clients.push(ImageServiceClient::new(channel));
    }
    let mut ids = Vec::new();
    let count = clients.len();
    for i in 0..args.jobs {
        let created = clients[i % count]
            .generate_image(authed(pb::GenerateImageRequest {
                prompt: format!("fleet bench {i}"),
                ..Default::default()
            }))
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
            .filter_map(|(id, share, received)| {
                let job = &created[id];
                let at = job["created_unix_ms"].as_f64()? + job["duration_ms"].as_f64()? * share;
                Some(received - at)
            })
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
