//! WatchImage at scale: N concurrent watches through a real `piclumen-grpc
//! serve` against a real `piclumen-grpc sim`, both child processes on
//! loopback. Reports upstream calls per round, ids per call, change-to-
//! delivery latency (p50/p99), the server's peak RSS and CPU per round.
//!
//! `cargo bench --bench watch_scale -- --watches 10000` (see BENCHMARKS.md).
//! A measurement, not a test: it asserts nothing about timing.

mod common;

use std::time::{Duration, Instant};

use common::{
    authed, change_share, connect, lag_ms, percentile, sim_json, spawn_server, spawn_sim,
    status_kib, unix_ms, usage,
};

use clap::Parser;
use piclumen_grpc::pb::{self, JobState};

const TOKEN: &str = "bench-token";

#[derive(Debug, Parser)]
struct Args {
    /// Concurrent watches (one job each).
    #[arg(long, default_value_t = 1000)]
    watches: usize,
    /// Server poll interval.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Server batch size.
    #[arg(long, default_value_t = 50)]
    batch_max: usize,
    /// Simulated job duration; long enough for every watch to be open at once.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    job_duration: Duration,
    /// Client connections the watches are spread over.
    #[arg(long, default_value_t = 20)]
    connections: usize,
    /// Tokens the watches are spread over (watch i uses token i % tokens).
    #[arg(long, default_value_t = 1)]
    tokens: usize,
    /// Ignored (cargo bench passes --bench).
    #[arg(long)]
    bench: bool,
}

/// The simulator's (status calls, ids asked) so far.
async fn sim_stats(http: &reqwest::Client, sim: &str) -> (u64, u64) {
    let v = sim_json(http, sim, "/_sim/stats").await;
    (
        v["status_calls"].as_u64().unwrap_or(0),
        v["status_ids"].as_u64().unwrap_or(0),
    )
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let job = humantime::format_duration(args.job_duration).to_string();
    let sim = spawn_sim(&["--job-duration", &job, "--job-jitter", "0.2"]);
    let interval = humantime::format_duration(args.poll_interval).to_string();
    let batch = args.batch_max.to_string();
    let max_watches = (args.watches + 100).to_string();
    let server = spawn_server(
        &sim.addr,
        &[
            "--poll-interval",
            &interval,
            "--batch-max",
            &batch,
            "--max-watches",
            &max_watches,
            "--max-generates-per-token",
            "1000",
        ],
    );
    let server_pid = server.pid();
    let (_, cpu_idle) = usage(server_pid);
    println!(
        "watches={} poll_interval={interval} batch_max={} job_duration={job}",
        args.watches, args.batch_max
    );

    let mut clients = Vec::new();
    for _ in 0..args.connections {
        clients.push(connect(&server.addr).await);
    }

    // Start every job and its watch; each task reports when its job reached
    // RUNNING and SUCCEEDED, relative to when the simulator switched it.
    let started = Instant::now();
    // Each watch reports how long its first state took from its opening.
    let (first_tx, mut first_rx) = tokio::sync::mpsc::unbounded_channel::<f64>();
    // Callers start jobs a few hundred at a time, as a fleet of services
    // would; the watches then all stay open together.
    let creating = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::new();
    for i in 0..args.watches {
        let mut client = clients[i % clients.len()].clone();
        let first_tx = first_tx.clone();
        let creating = creating.clone();
        let token = if args.tokens > 1 {
            format!("{TOKEN}-{}", i % args.tokens)
        } else {
            TOKEN.to_owned()
        };
        tasks.push(tokio::spawn(async move {
            let permit = creating.acquire_owned().await.expect("semaphore");
            let created = client
                .generate_image(authed(
                    &token,
                    pb::GenerateImageRequest {
                        prompt: format!("bench {i}"),
                        ..Default::default()
                    },
                ))
                .await
                .expect("generate")
                .into_inner();
            drop(permit);
            let opened = Instant::now();
            let mut stream = client
                .watch_image(authed(
                    &token,
                    pb::WatchImageRequest {
                        mark_id: created.mark_id.clone(),
                    },
                ))
                .await
                .expect("watch")
                .into_inner();
            let mut first = true;
            let mut previous: Option<JobState> = None;
            let mut seen = Vec::new();
            while let Some(update) = stream.message().await.expect("stream") {
                if first {
                    let _ = first_tx.send(opened.elapsed().as_secs_f64());
                    first = false;
                }
                // Heartbeats repeat a state already delivered: only the
                // first delivery of a state measures change-to-delivery.
                if update.heartbeat {
                    continue;
                }
                let state = update.job.expect("job").state();
                let last_state = previous.replace(state);
                if let Some(change) = change_share(state).filter(|_| last_state != Some(state)) {
                    seen.push((created.mark_id.clone(), change, unix_ms()));
                }
            }
            seen
        }));
    }
    drop(first_tx);
    let mut firsts = Vec::with_capacity(args.watches);
    while firsts.len() < args.watches {
        match first_rx.recv().await {
            Some(took) => firsts.push(took),
            None => break,
        }
    }
    let all_open = started.elapsed();
    firsts.sort_by(f64::total_cmp);
    println!(
        "all {} watches open with a first state after {:.1}s; opening to first state: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target: within two poll intervals = {:.0} ms)",
        args.watches,
        all_open.as_secs_f64(),
        percentile(&firsts, 0.5) * 1000.0,
        percentile(&firsts, 0.99) * 1000.0,
        firsts.last().copied().unwrap_or(f64::NAN) * 1000.0,
        args.poll_interval.as_secs_f64() * 2000.0
    );

    // Steady state: every watch open, no job finished yet. The first round
    // after the newcomers' own polls starts one interval in.
    tokio::time::sleep(args.poll_interval).await;
    let http = reqwest::Client::new();
    let window = args.poll_interval * 5;
    let (c0, i0) = sim_stats(&http, &sim.addr).await;
    let (_, cpu0) = usage(server_pid);
    tokio::time::sleep(window).await;
    let (c1, i1) = sim_stats(&http, &sim.addr).await;
    let (_, cpu1) = usage(server_pid);
    let holding = status_kib(server_pid, "VmRSS:");
    let rounds = window.as_secs_f64() / args.poll_interval.as_secs_f64();
    let calls_per_round = (c1 - c0) as f64 / rounds;
    // Per token: ceil(jobs of the token / batch_max).
    let per_token = args.watches.div_ceil(args.tokens.max(1));
    let ideal = per_token.div_ceil(args.batch_max) * args.tokens.max(1);
    println!(
        "steady state over {rounds:.0} rounds: {calls_per_round:.1} status calls/round (ideal {ideal}), {:.1} ids/call, {:.0} ids/round",
        (i1 - i0) as f64 / (c1 - c0).max(1) as f64,
        (i1 - i0) as f64 / rounds
    );
    println!(
        "server CPU: {:.1} ms per round in steady state ({:.2}s before any load)",
        (cpu1 - cpu0) * 1000.0 / rounds,
        cpu_idle
    );

    let mut seen = Vec::new();
    for t in tasks {
        seen.extend(t.await.expect("watch task"));
    }
    let created = sim_json(&http, &sim.addr, "/_sim/jobs").await;
    let lag_of = |(id, share, received): &(String, f64, f64)| {
        lag_ms(&created, id, *share, *received).map(|ms| ms / 1000.0)
    };
    let mut lags: Vec<f64> = seen.iter().filter_map(lag_of).collect();
    lags.sort_by(f64::total_cmp);
    for (name, share) in [("running", 0.4), ("succeeded", 1.0)] {
        let mut some: Vec<f64> = seen
            .iter()
            .filter(|s| s.1 == share)
            .filter_map(lag_of)
            .collect();
        some.sort_by(f64::total_cmp);
        println!(
            "  {name}: p50 {:.0} ms, p99 {:.0} ms",
            percentile(&some, 0.5) * 1000.0,
            percentile(&some, 0.99) * 1000.0
        );
    }
    let (rss, _) = usage(server_pid);
    println!(
        "change-to-delivery over {} changes: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target p99 < poll interval + 100 ms = {:.0} ms)",
        lags.len(),
        percentile(&lags, 0.5) * 1000.0,
        percentile(&lags, 0.99) * 1000.0,
        lags.last().copied().unwrap_or(f64::NAN) * 1000.0,
        args.poll_interval.as_secs_f64() * 1000.0 + 100.0
    );
    println!(
        "server RSS holding all {} watches: {:.1} MiB; peak RSS over the run: {:.1} MiB",
        args.watches,
        holding as f64 / 1024.0,
        rss as f64 / 1024.0
    );
    println!("total time {:.1}s", started.elapsed().as_secs_f64());
}
