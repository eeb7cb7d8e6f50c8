//! Soak: minutes of mixed load (watches that finish, watches that are
//! cancelled, checks, generations, 5% upstream faults) against `sim`, then
//! quiet. Reports RSS, open file descriptors and live tasks of the server
//! at the start, during, at the end of the load and after it, and the calls'
//! outcomes by code. Bounded: it stops by itself after `--duration`.
//!
//! `cargo bench --bench soak -- --duration 10m` (see BENCHMARKS.md).

mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::Parser;
use common::{authed, connect, spawn_server, spawn_sim, status_kib, unused_addr};
use piclumen_grpc::pb::{self, image_service_client::ImageServiceClient};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
struct Args {
    /// How long the load runs.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Concurrent callers.
    #[arg(long, default_value_t = 100)]
    workers: usize,
    /// Ignored (cargo bench passes --bench).
    #[arg(long)]
    bench: bool,
}

type Codes = Arc<Mutex<BTreeMap<String, u64>>>;

fn count(codes: &Codes, rpc: &str, code: tonic::Code) {
    *codes
        .lock()
        .expect("codes")
        .entry(format!("{rpc} {code:?}"))
        .or_default() += 1;
}

async fn worker(mut client: ImageServiceClient<Channel>, id: usize, until: Instant, codes: Codes) {
    let token = format!("soak-token-{}", id % 10);
    let run: u32 = rand::random();
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let request = pb::GenerateImageRequest {
            prompt: format!("soak {id} {n}"),
            request_id: format!("soak-{run:08x}-{id}-{n}"),
            ..Default::default()
        };
        let mark_id = match client.generate_image(authed(&token, request)).await {
            Ok(r) => {
                count(&codes, "GenerateImage", tonic::Code::Ok);
                r.into_inner().mark_id
            }
            Err(s) => {
                count(&codes, "GenerateImage", s.code());
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        match n % 7 {
            // Checks now and then.
            0 | 1 => {
                for _ in 0..3 {
                    let request = authed(
                        &token,
                        pb::CheckImageRequest {
                            mark_id: mark_id.clone(),
                        },
                    );
                    let code = client
                        .check_image(request)
                        .await
                        .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
                    count(&codes, "CheckImage", code);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            // A watch the caller abandons half-way.
            2 => {
                let request = authed(&token, pb::WatchImageRequest { mark_id });
                if let Ok(r) = client.watch_image(request).await {
                    let mut stream = r.into_inner();
                    let _ = tokio::time::timeout(Duration::from_secs(1), stream.message()).await;
                    count(&codes, "WatchImage cancelled", tonic::Code::Ok);
                }
            }
            // Most watch to the end.
            _ => {
                let request = authed(&token, pb::WatchImageRequest { mark_id });
                let code = match client.watch_image(request).await {
                    Err(s) => s.code(),
                    Ok(r) => {
                        let mut stream = r.into_inner();
                        loop {
                            match stream.message().await {
                                Ok(Some(_)) => continue,
                                Ok(None) => break tonic::Code::Ok,
                                Err(s) => break s.code(),
                            }
                        }
                    }
                };
                count(&codes, "WatchImage", code);
            }
        }
    }
}

/// Quiet time after load: pollers retire within a round; idle upstream
/// connections close after 30 s.
const QUIET: Duration = Duration::from_secs(40);

async fn run_load(
    clients: &[ImageServiceClient<Channel>],
    workers: usize,
    duration: Duration,
    codes: &Codes,
) {
    let until = Instant::now() + duration;
    let tasks: Vec<_> = (0..workers)
        .map(|i| {
            tokio::spawn(worker(
                clients[i % clients.len()].clone(),
                i,
                until,
                codes.clone(),
            ))
        })
        .collect();
    for t in tasks {
        t.await.expect("worker");
    }
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

async fn tasks(http: &reqwest::Client, metrics: &str) -> f64 {
    let text = match http.get(format!("http://{metrics}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return f64::NAN,
    };
    text.lines()
        .find(|l| l.starts_with("piclumen_runtime_alive_tasks "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let sim = spawn_sim(&[
        "--job-duration",
        "4s",
        "--job-jitter",
        "0.5",
        "--fail-5xx-rate",
        "0.03",
        "--fail-429-rate",
        "0.02",
    ]);
    let metrics = unused_addr().to_string();
    let server = spawn_server(
        &sim.addr,
        &[
            "--poll-interval",
            "1s",
            // Every call here has a fresh request_id; a short window lets the
            // quiet period show the store emptying (the default keeps 10 min).
            "--idempotency-ttl",
            "20s",
            "--metrics-listen",
            &metrics,
        ],
    );
    let pid = server.pid();
    let http = reqwest::Client::new();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = |label: &str, tasks: f64| {
        println!(
            "{label:>12}: RSS {:6.1} MiB, open fds {:4}, live tasks {tasks:5}",
            status_kib(pid, "VmRSS:") as f64 / 1024.0,
            fds(pid),
        );
    };
    report("idle start", tasks(&http, &metrics).await);
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(connect(&server.addr).await);
    }
    let codes: Codes = Arc::default();
    // Warm-up: allocator arenas, connection pools and buffers reach their
    // working size; the baseline is taken in the quiet after it.
    let warmup = (args.duration / 10).min(Duration::from_secs(30));
    run_load(&clients, args.workers, warmup, &codes).await;
    tokio::time::sleep(QUIET).await;
    report("baseline", tasks(&http, &metrics).await);
    let (rss0, fds0, tasks0) = (
        status_kib(pid, "VmRSS:"),
        fds(pid),
        tasks(&http, &metrics).await,
    );

    codes.lock().expect("codes").clear();
    let started = Instant::now();
    let load = run_load(&clients, args.workers, args.duration, &codes);
    tokio::pin!(load);
    loop {
        tokio::select! {
            () = &mut load => break,
            () = tokio::time::sleep(Duration::from_secs(60)) => {
                report(&format!("t+{}s", started.elapsed().as_secs()), tasks(&http, &metrics).await);
            }
        }
    }
    report("load ended", tasks(&http, &metrics).await);
    tokio::time::sleep(QUIET).await;
    let tasks1 = tasks(&http, &metrics).await;
    report("after", tasks1);
    let (rss1, fds1) = (status_kib(pid, "VmRSS:"), fds(pid));
    println!("outcomes by code:");
    for (key, n) in codes.lock().expect("codes").iter() {
        println!("  {key}: {n}");
    }
    println!(
        "after vs baseline: RSS {:+.1} MiB, fds {:+}, live tasks {:+}",
        (rss1 as f64 - rss0 as f64) / 1024.0,
        fds1 as i64 - fds0 as i64,
        tasks1 - tasks0
    );
}
